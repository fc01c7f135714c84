import pytest

from spillway.nodes.managed import default_model_path
from spillway.nodes.tokens import (
    EstimatingCounter,
    GgufTokenCounter,
    TokenCounter,
    counter_for,
)

SAY_HI = {"model": "default", "messages": [{"role": "user", "content": "Say hi"}]}
REPLY = "I'm glad you're here! I'm a helpful AI, and I can help with anything."


@pytest.fixture(scope="module")
def gguf() -> GgufTokenCounter:
    return GgufTokenCounter(default_model_path())


def test_estimate_counts_characters_and_messages() -> None:
    counter = EstimatingCounter()
    body = {"messages": [{"role": "system", "content": "abcdefgh"}, {"role": "user"}]}
    assert counter.prompt_tokens(body) == 2 + 2 * 4
    assert not counter.exact


def test_estimate_counts_text_content_parts() -> None:
    parts = [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {}}]
    body = {"messages": [{"role": "user", "content": parts}]}
    assert EstimatingCounter().prompt_tokens(body) == 1 + 4


def test_estimate_rounds_completion_up() -> None:
    counter = EstimatingCounter()
    assert [counter.completion_tokens(t) for t in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]


def test_estimate_without_messages() -> None:
    assert EstimatingCounter().prompt_tokens({}) == 0


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
