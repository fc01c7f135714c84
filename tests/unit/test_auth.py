import pytest

from spillway.config.keys import KeyConfig
from spillway.errors import AuthenticationFailed
from spillway.pipeline.principal import ANONYMOUS, Principal
from spillway.secrets import Redactor
from spillway.server.auth import KeyRing, key_id
from spillway.wire.errors import error_body

KEYS = (
    KeyConfig.model_validate({"key": "team-a-key-123456", "tenant": "team-a"}),
    KeyConfig.model_validate(
        {"key": "team-b-key-654321", "tenant": "team-b", "private_only": True}
    ),
)


def test_no_keys_means_open_and_anonymous() -> None:
    ring = KeyRing(())
    assert ring.open
    assert ring.authenticate(None) is ANONYMOUS
    assert ring.authenticate("Bearer anything-at-all") is ANONYMOUS


@pytest.mark.parametrize(
    ("header", "sent"),
    [
        (None, None),
        ("", None),
        ("team-a-key-123456", "team-a-key-123456"),
        ("Basic dGVhbS1hLWtleQ==", "dGVhbS1hLWtleQ=="),
        ("Bearer ", None),
        ("Bearer sk-guessed-key-000000", "sk-guessed-key-000000"),
        ("Bearer team-a-key-12345", "team-a-key-12345"),
    ],
)
def test_bad_credentials_fail_without_echoing_the_key(header: str | None, sent: str | None) -> None:
    ring = KeyRing(KEYS)
    with pytest.raises(AuthenticationFailed) as info:
        ring.authenticate(header)
    error = info.value
    assert error.status == 401
    assert error.code == "invalid_api_key"
    if sent is not None:
        assert sent not in str(error)
        assert sent not in str(error_body(error, Redactor([])))


def test_missing_header_says_how_to_send_the_key() -> None:
    with pytest.raises(AuthenticationFailed, match="Authorization: Bearer"):
        KeyRing(KEYS).authenticate(None)


@pytest.mark.parametrize(
    ("header", "principal"),
    [
        (
            "Bearer team-a-key-123456",
            Principal("team-a", False, key_id=key_id("team-a-key-123456")),
        ),
        ("bearer team-b-key-654321", Principal("team-b", True, key_id=key_id("team-b-key-654321"))),
        (
            "Bearer  team-a-key-123456 ",
            Principal("team-a", False, key_id=key_id("team-a-key-123456")),
        ),
    ],
)
def test_right_key_gives_tenant_and_policy(header: str, principal: Principal) -> None:
    ring = KeyRing(KEYS)
    assert not ring.open
    assert ring.authenticate(header) == principal


def test_key_id_is_a_short_digest_never_the_key() -> None:
    principal = KeyRing(KEYS).authenticate("Bearer team-a-key-123456")
    assert len(principal.key_id) == 16
    assert "team-a" not in principal.key_id
    assert principal.key_id == key_id("team-a-key-123456")


def test_a_key_that_is_not_utf8_is_refused_as_a_bad_key() -> None:
    """aiohttp keeps header bytes that are not UTF-8 as lone surrogates; hashing one raised
    UnicodeEncodeError (a 500 with a traceback) instead of a 401."""
    with pytest.raises(AuthenticationFailed, match="not valid UTF-8") as info:
        KeyRing(KEYS).authenticate("Bearer \udcff\udcfe-key")
    assert info.value.status == 401
