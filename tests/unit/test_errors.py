import inspect
from collections.abc import Callable

import pytest

from spillway import errors
from spillway.errors import (
    AuthenticationFailed,
    ConfigError,
    DeadlineExceeded,
    InsufficientQuota,
    InvalidRequest,
    ModelNotFound,
    NoEligibleNode,
    PayloadTooLarge,
    PermissionDenied,
    PiiDetected,
    QueueFull,
    RateLimitExceeded,
    SpillwayError,
    StartupError,
    StreamInterrupted,
    UpstreamBadAnswer,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRejected,
    UpstreamsExhausted,
    UpstreamStatusError,
    UpstreamTimeout,
)
from spillway.quota import Quota
from spillway.secrets import Redactor
from spillway.server.responses import error_headers
from spillway.wire.errors import error_body

#: One instance of every error class, with the status and OpenAI type it must answer with.
QUOTA = Quota(30, 0, 2.0, 1000, 10, 59.4)
EXAMPLES: dict[type[SpillwayError], tuple[Callable[[], SpillwayError], int, str]] = {
    SpillwayError: (lambda: SpillwayError("x"), 500, "server_error"),
    ConfigError: (lambda: ConfigError("nodes.a", "bad"), 500, "server_error"),
    StartupError: (lambda: StartupError("x"), 500, "server_error"),
    InvalidRequest: (lambda: InvalidRequest("x", param="p"), 400, "invalid_request_error"),
    PayloadTooLarge: (lambda: PayloadTooLarge("x"), 413, "invalid_request_error"),
    ModelNotFound: (lambda: ModelNotFound("x"), 404, "invalid_request_error"),
    errors.KeyNotFound: (lambda: errors.KeyNotFound("x"), 404, "invalid_request_error"),
    errors.NotFound: (lambda: errors.NotFound("x"), 404, "invalid_request_error"),
    errors.NoSpareCapacity: (lambda: errors.NoSpareCapacity("x"), 503, "service_unavailable"),
    AuthenticationFailed: (lambda: AuthenticationFailed("x"), 401, "authentication_error"),
    NoEligibleNode: (lambda: NoEligibleNode("x"), 503, "service_unavailable"),
    errors.TooManyConnections: (lambda: errors.TooManyConnections("x"), 503, "service_unavailable"),
    PermissionDenied: (lambda: PermissionDenied("x"), 403, "permission_error"),
    QueueFull: (lambda: QueueFull("x", retry_after_s=2), 429, "rate_limit_error"),
    InsufficientQuota: (lambda: InsufficientQuota("x"), 429, "insufficient_quota"),
    PiiDetected: (lambda: PiiDetected("x"), 400, "invalid_request_error"),
    RateLimitExceeded: (
        lambda: RateLimitExceeded("x", kind="tokens", quota=QUOTA, retry_after_s=3),
        429,
        "tokens",
    ),
    DeadlineExceeded: (lambda: DeadlineExceeded("x"), 504, "timeout"),
    UpstreamError: (lambda: UpstreamError("a", "x"), 502, "upstream_error"),
    UpstreamConnectError: (lambda: UpstreamConnectError("a", "x"), 502, "upstream_error"),
    UpstreamTimeout: (lambda: UpstreamTimeout("a", "first token", 30), 504, "upstream_error"),
    UpstreamStatusError: (lambda: UpstreamStatusError("a", 503, "x"), 502, "upstream_error"),
    UpstreamBadAnswer: (lambda: UpstreamBadAnswer("a", "x"), 502, "upstream_error"),
    UpstreamRejected: (
        lambda: UpstreamRejected("a", 422, "x"),
        422,
        "invalid_request_error",
    ),
    StreamInterrupted: (lambda: StreamInterrupted("a", "x"), 502, "upstream_error"),
    UpstreamsExhausted: (
        lambda: UpstreamsExhausted([UpstreamConnectError("a", "x")]),
        502,
        "upstream_error",
    ),
}


def test_every_error_class_has_an_example() -> None:
    defined = {
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, SpillwayError) and cls.__module__ == errors.__name__
    }
    assert defined == set(EXAMPLES)


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda c: c.__name__)
def test_envelope_has_exactly_the_openai_fields(cls: type[SpillwayError]) -> None:
    make, status, error_type = EXAMPLES[cls]
    error = make()
    envelope = error_body(error, Redactor([]))
    assert list(envelope) == ["error"]
    assert set(envelope["error"]) == {"message", "type", "param", "code"}
    assert envelope["error"]["type"] == error_type
    assert envelope["error"]["message"] == error.message
    assert error.status == status


def test_codes_default_per_class_and_can_be_overridden() -> None:
    assert ModelNotFound("x").code == "model_not_found"
    assert UpstreamTimeout("a", "idle", 5).code == "upstream_timeout"
    assert InvalidRequest("x").code is None
    assert InvalidRequest("x", code="custom").code == "custom"


@pytest.mark.parametrize(
    ("error", "falls_back"),
    [
        (UpstreamConnectError("a", "refused"), True),
        (UpstreamTimeout("a", "connect", 3), True),
        (UpstreamStatusError("a", 429, "slow down"), True),
        (UpstreamBadAnswer("a", "HTTP 200 with a body that is not a JSON object"), True),
        (UpstreamRejected("a", 400, "bad"), False),
        (StreamInterrupted("a", "reset"), False),
        (UpstreamsExhausted([UpstreamConnectError("a", "x")]), False),
        (InvalidRequest("x"), False),
    ],
)
def test_which_errors_may_fall_back(error: SpillwayError, falls_back: bool) -> None:
    assert error.may_fall_back is falls_back


def test_upstream_error_names_the_node() -> None:
    error = UpstreamTimeout("ascend-1", "first token", 30.0)
    assert error.message == "node 'ascend-1': no first token within 30 s"
    assert (error.node, error.phase) == ("ascend-1", "first token")


def test_exhausted_keeps_each_error_in_order() -> None:
    tried = [
        UpstreamConnectError("a", "connection refused"),
        UpstreamTimeout("b", "first token", 30),
        UpstreamStatusError("c", 503, "overloaded"),
    ]
    error = UpstreamsExhausted(tried)
    assert error.errors == tried
    assert error.message == (
        "all 3 candidate nodes failed: a: connection refused; "
        "b: no first token within 30 s; c: HTTP 503: overloaded"
    )
    assert (error.status, error.code, error.node) == (502, "upstream_error", "c")


def test_exhausted_by_timeouts_only_is_a_timeout() -> None:
    error = UpstreamsExhausted(
        [UpstreamTimeout("a", "connect", 3), UpstreamTimeout("b", "idle", 9)]
    )
    assert error.status == 504
    assert error.code == "upstream_timeout"
    assert error_body(error, Redactor([]))["error"]["code"] == "upstream_timeout"


def test_rejected_keeps_upstream_status_and_words() -> None:
    error = UpstreamRejected("a", 422, "max_tokens too large", param="max_tokens", code="bad")
    assert error.status == 422
    assert error_body(error, Redactor([]))["error"] == {
        "message": "max_tokens too large",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "bad",
    }
    assert not error.may_fall_back
    assert UpstreamRejected.status == 502  # the instance's status does not leak to the class


def test_no_eligible_node_asks_for_retry_after() -> None:
    assert error_headers(NoEligibleNode("x", retry_after_s=7)) == {"Retry-After": "7"}
    assert error_headers(UpstreamError("a", "x")) == {}


def test_config_error_names_the_path() -> None:
    error = ConfigError("nodes.a.base_url", "not a URL")
    assert str(error) == "nodes.a.base_url: not a URL"
    assert str(ConfigError("", "file not found")) == "file not found"
