"""Browser clients: CORS for the exact origins in ``[server.cors] allow_origins``.

Off unless origins are listed. A listed origin gets its own name back in
``Access-Control-Allow-Origin`` (never ``*``), with ``Vary: Origin`` so that a shared cache
keeps answers to different origins apart; any other origin gets no grant, and the browser
then refuses to hand the answer to the page. The grant is added as each response is prepared
(``on_response_prepare``), so errors and streams carry it too: a page that cannot read a 401
or a 429 cannot tell its user what went wrong.

spillway authenticates with the ``Authorization`` header, not cookies, so it never sends
``Access-Control-Allow-Credentials``: a page's cookies for the gateway's host are of no use
to anyone, and a wildcard with credentials, which browsers refuse anyway, cannot arise.

A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is answered before
authentication, as the fetch standard requires: the browser sends it without the key.
"""

from __future__ import annotations

from aiohttp import web

from spillway.config.privacy import CorsConfig

#: request headers a page may send: the OpenAI and Anthropic SDKs' own, and spillway's
_ALLOWED_HEADERS = frozenset(
    [
        "authorization",
        "content-type",
        "cache-control",
        "x-request-id",
        "x-spillway-cache",
        "x-spillway-timeout",
        "openai-organization",
        "openai-project",
        "openai-beta",
        "x-api-key",
        "anthropic-version",
        "anthropic-beta",
        "anthropic-dangerous-direct-browser-access",
    ]
)
#: the SDKs also send x-stainless-lang, -os, -arch, -runtime, -retry-count and more
_ALLOWED_PREFIXES = ("x-stainless-",)
_METHODS = "GET, POST, DELETE, OPTIONS"
#: response headers a page may read
_EXPOSED = (
    "x-request-id, x-spillway-node, x-spillway-source, x-spillway-cache, x-spillway-cache-note, "
    "x-spillway-merged, retry-after, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
    "x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, "
    "x-ratelimit-reset-tokens"
)


class Cors:
    """The configured origins; ``preflight`` and ``grant`` per request."""

    def __init__(self, config: CorsConfig):
        self._origins = frozenset(config.allow_origins)
        self._max_age = str(config.max_age_s)

    @property
    def enabled(self) -> bool:
        return bool(self._origins)

    def is_preflight(self, request: web.Request) -> bool:
        return (
            self.enabled
            and request.method == "OPTIONS"
            and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers
        )

    def preflight(self, request: web.Request) -> web.Response:
        """The answer to a preflight: a grant for a listed origin, a bare 204 for others."""
        response = web.Response(status=204, headers={"Vary": "Origin"})
        origin = request.headers["Origin"]
        if origin not in self._origins:
            return response
        asked = request.headers.get("Access-Control-Request-Headers", "")
        allowed = [h for h in _names(asked) if _allowed_header(h)]
        response.headers.update(
            {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": _METHODS,
                "Access-Control-Allow-Headers": ", ".join(allowed),
                "Access-Control-Max-Age": self._max_age,
            }
        )
        return response

    async def grant(self, request: web.Request, response: web.StreamResponse) -> None:
        """``on_response_prepare``: every answer to a listed origin carries its grant."""
        if "Access-Control-Allow-Origin" in response.headers:
            return  # a preflight's own answer
        if "Origin" not in response.headers.get("Vary", ""):
            response.headers.add("Vary", "Origin")
        origin = request.headers.get("Origin")
        if origin in self._origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = _EXPOSED


CORS = web.AppKey("cors", Cors)


def _names(header: str) -> list[str]:
    return [name.strip().lower() for name in header.split(",") if name.strip()]


def _allowed_header(name: str) -> bool:
    return name in _ALLOWED_HEADERS or name.startswith(_ALLOWED_PREFIXES)
