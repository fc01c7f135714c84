import logging

import pytest

from spillway.config.load import validate
from spillway.secrets import MASK, RedactingFilter, Redactor

SHORT = "tenant-key-1"
LONG = "tenant-key-1-and-more"


def test_configured_secret_is_masked() -> None:
    assert Redactor([SHORT]).scrub(f"key={SHORT}; again {SHORT}") == f"key={MASK}; again {MASK}"


def test_longest_secret_is_masked_first() -> None:
    assert Redactor([SHORT, LONG]).scrub(f"got {LONG}") == f"got {MASK}"


def test_an_excerpt_is_scrubbed_before_it_is_cut() -> None:
    """Cut first, the key would be split at the cut and its first half would go out."""
    text = f"bad key {LONG} given"
    assert Redactor([LONG]).excerpt(text, 12) == f"bad key {MASK} "
    assert Redactor([LONG]).excerpt(text, 12, "…") == f"bad key {MASK} …"
    assert Redactor([LONG]).excerpt("short", 12, "…") == "short"


@pytest.mark.parametrize(
    "key", ["sk-abcdefghijklmnop", "sk-proj-AbC_123-456789xyz", "hs-0123456789abcdef"]
)
def test_key_shaped_strings_are_masked(key: str) -> None:
    assert Redactor([]).scrub(f"Incorrect API key provided: {key}.") == (
        f"Incorrect API key provided: {MASK}."
    )


@pytest.mark.parametrize(
    "text",
    [
        "node 'a': HTTP 503: upstream overloaded",
        "ask-me-anything and task-1234567890123 are fine",
        "sk-short",
        "",
    ],
)
def test_normal_text_is_left_alone(text: str) -> None:
    assert Redactor(["tenant-key-1", ""]).scrub(text) == text


def test_for_config_knows_node_and_client_keys() -> None:
    config = validate(
        {
            "nodes": {
                "c": {
                    "kind": "cloud",
                    "base_url": "https://x.example/v1",
                    "api_key": "node-secret-value",
                    "models": {"m": "n"},
                }
            },
            "keys": [{"key": "client-secret-value", "tenant": "t"}],
        }
    )
    scrubbed = Redactor.for_config(config).scrub("node-secret-value client-secret-value")
    assert scrubbed == f"{MASK} {MASK}"


@pytest.fixture
def redacted_caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="spillway.test")
    caplog.handler.addFilter(RedactingFilter(Redactor([SHORT])))
    return caplog


def test_filter_scrubs_percent_args(redacted_caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("spillway.test").info("client sent %s for %s", SHORT, "team-a")
    assert redacted_caplog.messages == [f"client sent {MASK} for team-a"]
    assert SHORT not in redacted_caplog.text


def test_filter_scrubs_key_shaped_message(redacted_caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("spillway.test").warning("upstream said: bad key sk-abcdefghijklmnop")
    assert redacted_caplog.messages == [f"upstream said: bad key {MASK}"]


def test_filter_leaves_clean_records_alone(redacted_caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("spillway.test").info("%d%% done", 50)
    [record] = redacted_caplog.records
    assert record.getMessage() == "50% done"
    assert record.args == (50,)


def test_filter_scrubs_exception_text(redacted_caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise RuntimeError(f"refused {SHORT}")
    except RuntimeError:
        logging.getLogger("spillway.test").exception("failed")
    assert "RuntimeError: refused ***" in redacted_caplog.text
    assert SHORT not in redacted_caplog.text


NODE_KEY = "sk-live-node-key-8e2f10c4"


@pytest.mark.parametrize(
    "echoed",
    [
        NODE_KEY.upper(),  # in another case
        NODE_KEY[:12] + "****" + NODE_KEY[-6:],  # half starred, as providers quote keys
        NODE_KEY[:10] + " " + NODE_KEY[10:],  # split
        NODE_KEY[:-3],  # cut short
    ],
)
def test_a_long_secret_is_masked_however_it_is_echoed(echoed: str) -> None:
    scrubbed = Redactor([NODE_KEY]).scrub(f"upstream said: bad key {echoed}.")
    assert scrubbed.startswith("upstream said: bad key ***")
    for piece in (NODE_KEY[:10], NODE_KEY[-6:], "live-node"):
        assert piece.lower() not in scrubbed.lower()


def test_masking_pieces_leaves_ordinary_text_and_short_secrets_alone() -> None:
    redactor = Redactor([NODE_KEY, "pin-1234"])
    text = "request 0661f33c: node 'cloud' took 2.5 s; 000000 and key=value"
    assert redactor.scrub(text) == text
    assert redactor.scrub("pin-1234 and pin-12") == f"{MASK} and pin-12"  # no pieces of short ones
    assert redactor.scrub(f"key={NODE_KEY};") == f"key={MASK};"


def test_a_piece_inside_a_huge_token_is_masked_without_walking_all_of_it() -> None:
    text = "a" * 100_000 + NODE_KEY[-6:] + "b" * 100_000
    scrubbed = Redactor([NODE_KEY]).scrub(text)
    assert NODE_KEY[-6:] not in scrubbed and len(scrubbed) > 199_000


@pytest.mark.parametrize(
    ("secret", "text"),
    [
        ("pässİword-12345678", "key is pässİword-12345678 ok"),  # İ lowers to two characters
        ("ΠΑΣΣΩΡΔΣ", "x ΠΑΣΣΩΡΔΣΑ y"),  # a final sigma lowers by its context
    ],
)
def test_a_secret_whose_letters_lower_unevenly_is_still_masked(secret: str, text: str) -> None:
    assert secret not in Redactor([secret]).scrub(text)
