import orjson
import pytest

from spillway.nodes.managed import default_model_path
from spillway.nodes.tokens import (
    EstimatingCounter,
    GgufTokenCounter,
    TokenCounter,
    counter_for,
    most_prompt_tokens,
)

SAY_HI = {"model": "default", "messages": [{"role": "user", "content": "Say hi"}]}
REPLY = "I'm glad you're here! I'm a helpful AI, and I can help with anything."


@pytest.fixture(scope="module")
def gguf() -> GgufTokenCounter:
    return GgufTokenCounter(default_model_path())


def test_estimate_counts_the_whole_body_and_messages() -> None:
    counter = EstimatingCounter()
    body = {"messages": [{"role": "system", "content": "abcdefgh"}, {"role": "user"}]}
    # 69 bytes of JSON at 4 a token, rounded up, and 4 tokens for each message
    assert counter.prompt_tokens(body) == 18 + 2 * 4
    assert not counter.exact


def test_estimate_counts_tools_names_and_every_content_part() -> None:
    # Message text alone missed all of these; a node reads them as prompt.
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    tool = {"type": "function", "function": {"name": "lookup", "description": "d" * 400}}
    parts = [
        {"type": "text", "text": "hi"},
        {"type": "input_audio", "input_audio": {"data": "x" * 400}},
    ]
    counter = EstimatingCounter()
    assert counter.prompt_tokens({**plain, "tools": [tool]}) > counter.prompt_tokens(plain) + 100
    named = {"messages": [{"role": "user", "content": "hi", "name": "n" * 400}]}
    assert counter.prompt_tokens(named) > counter.prompt_tokens(plain) + 100
    with_parts = {"messages": [{"role": "user", "content": parts}]}
    assert counter.prompt_tokens(with_parts) > counter.prompt_tokens(plain) + 100


def test_estimate_rounds_completion_up() -> None:
    counter = EstimatingCounter()
    assert [counter.completion_tokens(t) for t in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]
    assert counter.completion_tokens("日本語") == 3  # 9 bytes


def test_estimate_without_messages() -> None:
    assert EstimatingCounter().prompt_tokens({}) == 1  # "{}"


def test_prompt_bound_is_every_byte_sent_plus_the_template_framing() -> None:
    # 8 tokens a message (role markers, separators) and 256 a request (BOS, a default system
    # prompt, a tool-use preamble): docs/ledger.md#budgets
    assert most_prompt_tokens(1000, 3) == 1000 + 3 * 8 + 256
    assert most_prompt_tokens(0, 1) == 8 + 256


ADVERSARIAL = [
    "\ufdfa" * 40,  # NFKC expands it to 18 characters
    "\u331a" * 40,  # NFKC: five katakana
    "\U0001f600" * 40,
    "\x00\x01\x1f" * 40,  # control characters: JSON escapes them, 6 bytes each
    " " * 300 + "\n" * 300,
    "<|im_start|>" * 20,  # a special token's text: one token at most (or byte pieces)
    "".join(chr(c) for c in range(0x4E00, 0x4E00 + 300, 7)),
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_prompt_bound_holds_for_a_real_tokenizer(gguf: GgufTokenCounter, text: str) -> None:
    assert gguf.completion_tokens(text) <= len(text.encode("utf-8"))
    many = [{"role": r, "content": ""} for r in ("user", "assistant") * 50]
    for messages in ([{"role": "user", "content": text}], many):
        body = {"model": "m", "messages": messages}
        bound = most_prompt_tokens(len(orjson.dumps(body)), len(messages))
        assert gguf.prompt_tokens(body) <= bound


def test_counter_for_picks_by_tokenizer() -> None:
    assert isinstance(counter_for(None), EstimatingCounter)
    chosen: TokenCounter = counter_for(default_model_path())
    assert isinstance(chosen, GgufTokenCounter)
    assert chosen.exact


def test_gguf_prompt_count_matches_llama_cpp_server(gguf: GgufTokenCounter) -> None:
    # 32 is the prompt_tokens llama-cpp-python's server reports for this request.
    assert gguf.prompt_tokens(SAY_HI) == 32


def test_gguf_completion_count_matches_llama_cpp_server(gguf: GgufTokenCounter) -> None:
    assert gguf.completion_tokens(REPLY) == 20


def test_gguf_empty_completion_is_zero(gguf: GgufTokenCounter) -> None:
    assert gguf.completion_tokens("") == 0


def test_gguf_prompt_grows_with_messages(gguf: GgufTokenCounter) -> None:
    longer = {"messages": [*SAY_HI["messages"], {"role": "assistant", "content": REPLY}]}
    assert gguf.prompt_tokens(longer) > 32 + 20
