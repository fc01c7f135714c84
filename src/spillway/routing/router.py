"""Which nodes may answer a request, and in what order.

First version of the private-first rule: private nodes with free capacity (fewest in-flight
requests per unit of weight first), then cloud nodes, then private nodes already at their
``max_concurrency`` (their engines queue). A ``private_only`` request never sees a cloud node.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from spillway.config.schema import NodeKind, Timeouts
from spillway.errors import ModelNotFound, NoEligibleNode
from spillway.nodes.base import Node
from spillway.nodes.tokens import TokenCounter


@dataclass(eq=False)
class NodeHandle:
    """A node as the router sees it: what it serves, its limits, and its live in-flight count."""

    name: str
    kind: NodeKind
    node: Node
    models: dict[str, str]
    max_concurrency: int
    weight: float
    timeouts: Timeouts
    counter: TokenCounter
    in_flight: int = 0
    served: int = field(default=0)

    @property
    def private(self) -> bool:
        return self.kind == "private"

    @property
    def has_capacity(self) -> bool:
        return self.in_flight < self.max_concurrency

    def acquire(self) -> Slot:
        self.in_flight += 1
        self.served += 1
        return Slot(self)


class Slot:
    """One in-flight request on a node; ``release`` is idempotent."""

    __slots__ = ("_handle",)

    def __init__(self, handle: NodeHandle):
        self._handle: NodeHandle | None = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.in_flight -= 1
            self._handle = None


class Router:
    """Ranks candidate nodes per request. Pure bookkeeping: it never does I/O."""

    def __init__(self, handles: Iterable[NodeHandle]):
        self.handles = list(handles)
        self._by_model: dict[str, list[NodeHandle]] = {}
        for handle in self.handles:
            for model in handle.models:
                self._by_model.setdefault(model, []).append(handle)

    def models(self) -> list[str]:
        return list(self._by_model)

    def serving(self, model: str) -> list[NodeHandle]:
        handles = self._by_model.get(model)
        if not handles:
            raise ModelNotFound(
                f"The model '{model}' does not exist on this gateway. "
                "GET /v1/models lists the models you can use.",
                param="model",
            )
        return handles

    def candidates(self, model: str, private_only: bool) -> list[NodeHandle]:
        handles = self.serving(model)
        private = sorted((h for h in handles if h.private), key=_load)
        free = [h for h in private if h.has_capacity]
        full = [h for h in private if not h.has_capacity]
        if private_only:
            if not private:
                raise NoEligibleNode(
                    f"No private node serves '{model}', and this API key is private_only, "
                    "so the request was not sent to a cloud node."
                )
            return free + full
        cloud = [h for h in handles if not h.private]  # config order: the operator's preference
        return free + cloud + full


def _load(handle: NodeHandle) -> float:
    return handle.in_flight / handle.weight
