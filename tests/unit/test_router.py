from typing import Any

import pytest

from spillway.config.schema import NodeKind, Timeouts
from spillway.errors import ModelNotFound, NoEligibleNode
from spillway.nodes.tokens import EstimatingCounter
from spillway.routing.router import NodeHandle, Router


def handle(
    name: str,
    kind: NodeKind = "private",
    *,
    in_flight: int = 0,
    max_concurrency: int = 4,
    weight: float = 1.0,
    models: tuple[str, ...] = ("m",),
) -> NodeHandle:
    dummy: Any = object()  # the router never calls the node
    return NodeHandle(
        name=name,
        kind=kind,
        node=dummy,
        models={m: f"{m}-upstream" for m in models},
        max_concurrency=max_concurrency,
        weight=weight,
        timeouts=Timeouts(),
        counter=EstimatingCounter(),
        in_flight=in_flight,
    )


def names(handles: list[NodeHandle]) -> list[str]:
    return [h.name for h in handles]


def test_unknown_model_raises_model_not_found() -> None:
    router = Router([handle("a")])
    with pytest.raises(ModelNotFound) as info:
        router.candidates("gpt-9", private_only=False)
    assert info.value.status == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    assert "gpt-9" in info.value.message


def test_models_lists_every_served_model_once() -> None:
    router = Router([handle("a", models=("m", "x")), handle("b", "cloud", models=("x", "y"))])
    assert router.models() == ["m", "x", "y"]


def test_private_nodes_ordered_by_in_flight_per_weight() -> None:
    router = Router(
        [
            handle("busy", in_flight=3, weight=1.0),  # 3.0
            handle("big", in_flight=3, weight=4.0),  # 0.75
            handle("idle", in_flight=0),  # 0.0
            handle("some", in_flight=1, weight=1.0),  # 1.0
        ]
    )
    assert names(router.candidates("m", private_only=False)) == ["idle", "big", "some", "busy"]


def test_private_first_then_cloud_in_config_order() -> None:
    router = Router([handle("c2", "cloud"), handle("p"), handle("c1", "cloud", in_flight=9)])
    assert names(router.candidates("m", private_only=False)) == ["p", "c2", "c1"]


def test_full_private_nodes_go_after_cloud() -> None:
    router = Router(
        [
            handle("full", in_flight=2, max_concurrency=2),
            handle("cloud-a", "cloud"),
            handle("free", in_flight=1, max_concurrency=2),
            handle("cloud-b", "cloud"),
        ]
    )
    assert names(router.candidates("m", private_only=False)) == [
        "free",
        "cloud-a",
        "cloud-b",
        "full",
    ]


def test_only_nodes_serving_the_model_are_candidates() -> None:
    router = Router([handle("a", models=("x",)), handle("b"), handle("c", "cloud")])
    assert names(router.candidates("m", private_only=False)) == ["b", "c"]


def test_private_only_never_returns_cloud() -> None:
    router = Router(
        [handle("cloud", "cloud"), handle("p1", in_flight=4, max_concurrency=4), handle("p2")]
    )
    assert names(router.candidates("m", private_only=True)) == ["p2", "p1"]


def test_private_only_puts_free_nodes_before_full_ones() -> None:
    full = handle("full", in_flight=1, max_concurrency=1, weight=10.0)  # load 0.1, no capacity
    free = handle("free", in_flight=1, max_concurrency=4, weight=1.0)  # load 1.0, has capacity
    router = Router([full, free])
    assert names(router.candidates("m", private_only=False)) == ["free", "full"]
    assert names(router.candidates("m", private_only=True)) == ["free", "full"]


def test_private_only_without_private_node_raises_no_eligible_node() -> None:
    router = Router([handle("cloud", "cloud"), handle("p", models=("other",))])
    with pytest.raises(NoEligibleNode) as info:
        router.candidates("m", private_only=True)
    assert info.value.status == 503
    assert info.value.code == "no_eligible_node"
    assert info.value.headers() == {"Retry-After": "1"}
    assert "private_only" in info.value.message


def test_acquire_counts_and_release_is_idempotent() -> None:
    node = handle("a")
    first, second = node.acquire(), node.acquire()
    assert (node.in_flight, node.served) == (2, 2)
    first.release()
    first.release()
    assert node.in_flight == 1
    second.release()
    assert (node.in_flight, node.served) == (0, 2)


def test_capacity_follows_in_flight() -> None:
    node = handle("a", max_concurrency=1)
    slot = node.acquire()
    assert not node.has_capacity
    slot.release()
    assert node.has_capacity
