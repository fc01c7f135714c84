"""The one exception tree of spillway.

Every failure a client can see is one of these. An error carries meaning, not a wire format:
its HTTP status, its ``kind`` (the class of failure, named as OpenAI names its error types),
a ``code``, whether the router may fall back after it, and how long to wait before retrying.
Each front door renders it in its own protocol (``server/responses.py`` for OpenAI's
``{"error": …}``)::

    SpillwayError                      500 server_error
    ├── ConfigError                    (start-up only: exit status 2, never an HTTP answer)
    ├── StartupError                   (start-up only: a managed node or the ledger won't start)
    ├── InvalidRequest                 400 invalid_request_error
    │   ├── PayloadTooLarge            413
    │   ├── PiiDetected                      code=pii_detected (personal data, action block)
    │   ├── ModelNotFound              404   code=model_not_found
    │   ├── KeyNotFound                404   code=key_not_found (/admin/keys, spillway keys)
    │   └── NotFound                   404   code=not_found (a file or batch, or another tenant's)
    ├── AuthenticationFailed           401 authentication_error   code=invalid_api_key
    ├── PermissionDenied               403 permission_error       code=permission_denied
    ├── QueueFull                      429 rate_limit_error       code=queue_full (+Retry-After)
    ├── RateLimitExceeded              429 requests | tokens      code=rate_limit_exceeded
    │                                      (+Retry-After and the key's quota)
    ├── InsufficientQuota              429 insufficient_quota     code=insufficient_quota
    ├── NoEligibleNode                 503 service_unavailable    code=no_eligible_node
    │   └── NoSpareCapacity                  code=no_spare_capacity (a batch line: run later)
    ├── TooManyConnections             503 service_unavailable    code=too_many_connections
    ├── DeadlineExceeded               504 timeout                code=deadline_exceeded
    └── UpstreamError                  502 upstream_error         (one node failed)
        ├── UpstreamConnectError           connect refused, reset, DNS      → fall back
        ├── UpstreamTimeout                connect / first token / idle / total → fall back
        ├── UpstreamStatusError            5xx, 429, or a node-side 4xx (401, 403, 404…) → fall back
        ├── UpstreamBadAnswer              a 200 that is not a JSON object, or an answer over
        │                                  the node's max_response_bytes → fall back
        ├── UpstreamRejected               the node says the *request* is bad (400, 413, 422):
        │                                  forwarded with the node's status, never retried
        ├── StreamInterrupted              failed after the stream committed: never retried
        └── UpstreamsExhausted             every candidate failed; keeps each node's error

Library exceptions (aiohttp, OSError, asyncio timeouts) are translated into this tree at exactly
one boundary, ``spillway.nodes.http``. Messages say what to fix and never carry secrets,
tracebacks or file paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from spillway.quota import Quota


class SpillwayError(Exception):
    """Base of every spillway error."""

    status: int = 500
    #: the class of failure; OpenAI's error type names, which front doors map to their own
    kind: str = "server_error"
    default_code: str | None = None
    #: the router may try the next candidate node after this error
    may_fall_back: bool = False
    #: seconds the client should wait before trying again (``Retry-After``), when it is known
    retry_after_s: int | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code


class StartupError(SpillwayError):
    """Something the gateway needs could not be started (a managed node, the ledger store)."""


class ConfigError(SpillwayError):
    """The configuration is invalid; ``path`` names the exact setting (``nodes.a.base_url``)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


class InvalidRequest(SpillwayError):
    status = 400
    kind = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status = 413
    default_code = "payload_too_large"


class PiiDetected(InvalidRequest):
    """The request holds personal data and the key's ``pii`` action is ``block``. The message
    names the kinds and counts found, never the values."""

    default_code = "pii_detected"
    #: the kinds and counts found, never a value: for the request's ledger row
    counts: Mapping[str, int] = MappingProxyType({})


class ModelNotFound(InvalidRequest):
    status = 404
    default_code = "model_not_found"

    @classmethod
    def named(cls, model: str) -> ModelNotFound:
        """The one answer for a model that is not there, or that the key may not see: the
        two are the same to the caller, so a key learns nothing of models beyond its own."""
        return cls(
            f"The model '{model}' does not exist on this gateway. "
            "GET /v1/models lists the models you can use.",
            param="model",
        )


class KeyNotFound(InvalidRequest):
    """No managed key has the prefix, key id or key given (``/admin/keys``, ``spillway keys``)."""

    status = 404
    default_code = "key_not_found"


class NotFound(InvalidRequest):
    """No such file or batch for this tenant (another tenant's is answered the same way)."""

    status = 404
    default_code = "not_found"


class AuthenticationFailed(SpillwayError):
    status = 401
    kind = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(SpillwayError):
    status = 403
    kind = "permission_error"
    default_code = "permission_denied"


class QueueFull(SpillwayError):
    """Every node for the model is busy and its wait queue is full: shed load at once."""

    status = 429
    kind = "rate_limit_error"
    default_code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimitExceeded(SpillwayError):
    """The API key is over its ``rpm``, ``tpm`` or ``max_parallel``. ``kind`` is OpenAI's
    type for it: "requests" (rpm and max_parallel) or "tokens"; ``quota`` is what the key's
    limits looked like; ``retry_after_s`` is None when waiting cannot help (one request over
    the whole tpm)."""

    status = 429
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, quota: Quota, retry_after_s: int | None):
        super().__init__(message)
        self.kind = kind
        self.quota = quota
        self.retry_after_s = retry_after_s


class InsufficientQuota(SpillwayError):
    """The API key's budget for this period is spent (or this request could overspend it)."""

    status = 429
    kind = "insufficient_quota"
    default_code = "insufficient_quota"


class NoEligibleNode(SpillwayError):
    status = 503
    kind = "service_unavailable"
    default_code = "no_eligible_node"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoSpareCapacity(NoEligibleNode):
    """A batch line found no node with spare capacity: the batch runs it later."""

    default_code = "no_spare_capacity"


class TooManyConnections(SpillwayError):
    """The process has as many client connections open as it may, each busy with a request."""

    status = 503
    kind = "service_unavailable"
    default_code = "too_many_connections"
    retry_after_s = 1


class DeadlineExceeded(SpillwayError):
    status = 504
    kind = "timeout"
    default_code = "deadline_exceeded"


class UpstreamError(SpillwayError):
    """One node failed to answer. ``node`` is the node's configured name."""

    status = 502
    kind = "upstream_error"
    default_code = "upstream_error"
    may_fall_back = True

    def __init__(self, node: str, message: str, *, code: str | None = None):
        super().__init__(f"node '{node}': {message}", code=code)
        self.node = node
        self.detail = message


class UpstreamConnectError(UpstreamError):
    default_code = "upstream_connect_error"

    def __init__(self, node: str, message: str, *, delivered: bool = True):
        super().__init__(node, message)
        #: False when the request never reached the node (connection refused, DNS): trying
        #: another node then adds no load anywhere, so it needs no retry budget (gRPC's
        #: "transparent retry").
        self.delivered = delivered


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "upstream_timeout"

    def __init__(self, node: str, phase: str, seconds: float):
        super().__init__(node, f"no {phase} within {seconds:g} s")
        self.phase = phase


class UpstreamStatusError(UpstreamError):
    """The node answered with an error status that is the node's problem, not the request's."""

    def __init__(
        self, node: str, upstream_status: int, detail: str, *, retry_after: str | None = None
    ):
        super().__init__(node, f"HTTP {upstream_status}: {detail}")
        self.upstream_status = upstream_status
        #: the node's Retry-After header, unparsed (the retry policy decides what it means)
        self.retry_after = retry_after


class UpstreamBadAnswer(UpstreamError):
    """The node answered, but with nothing spillway may pass on: a success whose body is not
    a JSON object (an HTML error page, cut or broken JSON), or an answer larger than the
    node's ``max_response_bytes``. The message is spillway's own words, never the body."""

    default_code = "upstream_bad_answer"


class UpstreamRejected(UpstreamError):
    """The node judged the request itself invalid; the client gets the node's status."""

    may_fall_back = False
    kind = "invalid_request_error"

    def __init__(
        self,
        node: str,
        upstream_status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(node, message, code=code)
        # The node's own words are what the client needs to fix the request.
        self.message = message
        self.param = param
        self.status = upstream_status


class StreamInterrupted(UpstreamError):
    """The node failed after the first chunk went to the client: never retried."""

    may_fall_back = False
    default_code = "stream_interrupted"


class UpstreamsExhausted(UpstreamError):
    """Every candidate failed; the message keeps each node's error, in the order tried."""

    may_fall_back = False

    def __init__(self, errors: Sequence[UpstreamError]):
        summary = "; ".join(f"{e.node}: {e.detail}" for e in errors)
        SpillwayError.__init__(self, f"all {len(errors)} candidate nodes failed: {summary}")
        self.errors = list(errors)
        self.node = errors[-1].node if errors else ""
        self.detail = summary
        # A timeout everywhere is a timeout for the client, too.
        if errors and all(isinstance(e, UpstreamTimeout) for e in errors):
            self.status = 504
            self.code = "upstream_timeout"
