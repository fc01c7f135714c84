"""What a front door hands the pipeline, and what it gets back. No HTTP objects either way:
a door turns its wire format into these, and these into its wire format."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

from spillway.errors import SpillwayError
from spillway.pipeline.principal import Principal
from spillway.quota import Quota
from spillway.wire.requests import ChatRequest, EmbeddingsRequest

R = TypeVar("R", ChatRequest, EmbeddingsRequest)
#: Reads and parses the request when the pipeline asks for it, inside its accounting, so a
#: body that cannot be read or parsed still gets its ledger record.
Inbound = Callable[[], Awaitable[R]]
Source = Literal["private", "cloud", "cache"]


@dataclass(frozen=True, slots=True)
class Background:
    """A request that runs on spare capacity (a batch line): it may use a private node only
    while that node's in-flight count is under ``max_share`` of its ``max_concurrency`` (at
    least one slot), and a cloud node only when ``may_spill``; otherwise it is refused at
    once with ``NoSpareCapacity`` and tried again later, never queued behind interactive
    requests."""

    batch_id: str
    max_share: float
    may_spill: bool = False


@dataclass(frozen=True, slots=True)
class Call:
    """Who asks, and the facts of the asking that are not in the body."""

    principal: Principal
    request_id: str
    #: the id came from the client, so it may repeat (the ledger then keys a fresh one)
    client_request_id: bool = False
    #: the client's spillway directives by lower-case name: ``x-spillway-cache``,
    #: ``cache-control``, ``x-spillway-timeout`` (HTTP headers, for the HTTP doors)
    directives: Mapping[str, str] = field(default_factory=dict)
    #: set for a batch line: run it only on spare capacity
    background: Background | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """What happened to a request, for the caller."""

    #: the node that answered (None for the cache)
    node: str | None
    source: Source
    #: hit-exact, hit-semantic, miss or bypass (None: not a cacheable endpoint)
    cache: str | None = None
    #: why the cache did less than the request asked ("" when it did what was asked)
    cache_note: str = ""
    #: the answer was shared by an identical request already in flight
    merged: bool = False
    #: the key's rate limits once this request was counted (None: the key has none)
    quota: Quota | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete answer, as the node sent it (or as the cache replays it)."""

    body: bytes
    route: Route


class Stream(Protocol):
    """A committed stream: its route is known and its first chunk has arrived.

    Iterating yields each chunk's payload (an OpenAI ``chat.completion.chunk`` as JSON bytes,
    the format every node speaks). When iteration ends, ``error`` says whether the stream
    ended well (None) or broke (the error to tell the client). ``aclose`` must be called
    however the door finishes: it releases the node and writes the ledger record.
    """

    route: Route
    error: SpillwayError | None
    #: the longest the door may take to hand one chunk to its client; a client that reads
    #: nothing for that long is given up on (it would hold a node's slot for ever)
    idle_s: float

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    def client_gone(self, cancelled: bool = False) -> None:
        """The client went away mid-stream: found on a failed write, or ``cancelled`` (the
        door's request was cancelled); the ledger tells the two apart."""

    async def aclose(self) -> None: ...
