"""The semantic half through the gateway: paraphrase hits stay within a tenant, private_only
prompts never reach a cloud embedder, and an embedder outage only costs hits.

The embedder here is a scripted node whose every vector is the same, so any two prompts are
cosine-identical: what decides a hit is then only scope, tenant and policy, which is what
these tests are about. The local all-MiniLM-L6-v2 model and the trained verifier are tested
on real paraphrases in tests/e2e/test_cache_shared.py and bench/semantic_cache_eval.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fakes.gateway import RunningGateway, node, running_gateway
from tests.fakes.upstream import FakeUpstream
from tests.faults.test_cache import KEY_A, KEY_B, settle
from tests.faults.test_failover import FAST

SOVEREIGN = "sovereign-secret-key"


def config(ups: dict[str, FakeUpstream], tmp: Path, embedder_kind: str) -> dict[str, Any]:
    return {
        "server": {"data_dir": str(tmp)},
        "timeouts": FAST,
        "nodes": {
            "llm": node("private", ups["llm"].base_url),
            "emb": {
                "kind": embedder_kind,
                "base_url": ups["emb"].base_url,
                "models": {"e": "emb-model"},
            },
        },
        "keys": [
            {"key": KEY_A, "tenant": "a"},
            {"key": KEY_B, "tenant": "b"},
            {"key": SOVEREIGN, "tenant": "gov", "private_only": True},
        ],
        "cache": {
            "mode": "semantic",
            "embedder": "emb",
            "embedding_model": "emb-model",
            "embedding_dim": 3,
            "threshold": 0.9,
        },
    }


async def status(gw: RunningGateway, key: str, prompt: str) -> str:
    return (await headers(gw, key, prompt))["x-spillway-cache"]


async def headers(gw: RunningGateway, key: str, prompt: str) -> Any:
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": prompt}], temperature=0
    )
    await settle(gw)
    return raw.headers


async def test_paraphrase_hits_never_cross_tenants(
    ups: dict[str, FakeUpstream], tmp_path: Path
) -> None:
    async with running_gateway(config(ups, tmp_path, "private")) as gw:
        a = [
            await status(gw, KEY_A, p)
            for p in ("tell me a joke", "tell me a joke", "please tell me a joke")
        ]
        b = [await status(gw, KEY_B, p) for p in ("tell me a joke", "please tell me a joke")]
    assert a == ["miss", "hit-exact", "hit-semantic"]
    assert b == ["miss", "hit-semantic"]  # a's entries are invisible; b then hits its own
    assert ups["llm"].calls == 2


async def test_the_context_must_match_exactly(ups: dict[str, FakeUpstream], tmp_path: Path) -> None:
    async with running_gateway(config(ups, tmp_path, "private")) as gw:
        client = gw.client(KEY_A)
        for system in ("Answer in English.", "Answer in French."):
            await client.chat.completions.create(
                model="m",
                temperature=0,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": "tell me a joke"},
                ],
            )
            await settle(gw)
    assert ups["llm"].calls == 2  # same question, other system prompt: no semantic hit


async def test_private_only_prompts_never_reach_a_cloud_embedder(
    ups: dict[str, FakeUpstream], tmp_path: Path
) -> None:
    async with running_gateway(config(ups, tmp_path, "cloud")) as gw:
        gov = [
            await status(gw, SOVEREIGN, p)
            for p in ("state secret", "state secret", "the state secret")
        ]
        embedded_before = ups["emb"].calls
        ordinary = [await status(gw, KEY_A, p) for p in ("hello there", "well hello there")]
        note = (await headers(gw, SOVEREIGN, "another secret")).get("x-spillway-cache-note")
    assert embedded_before == 0
    assert gov == ["miss", "hit-exact", "miss"]  # exact only: no embedder may see it
    assert note is not None and "private_only" in note and "exact lookups only" in note
    assert ordinary == ["miss", "hit-semantic"]
    assert all("state secret" not in str(r.body) for r in ups["emb"].received)


async def test_an_embedder_outage_costs_hits_not_requests(
    ups: dict[str, FakeUpstream], tmp_path: Path
) -> None:
    async with running_gateway(config(ups, tmp_path, "private")) as gw:
        await status(gw, KEY_A, "tell me a joke")
        await ups["emb"].stop()
        during = [await status(gw, KEY_A, p) for p in ("tell me a joke", "a joke please")]
        await ups["emb"].start()
        after = await status(gw, KEY_A, "a joke, please")
        failing = gw.gateway.pipeline.cache.statistics().errors
    assert during == ["hit-exact", "miss"]
    assert failing >= 1
    assert after == "hit-semantic"  # back: matched against the entry stored before the outage


async def test_prompts_with_personal_data_never_reach_a_cloud_embedder(
    ups: dict[str, FakeUpstream], tmp_path: Path
) -> None:
    """With ``[pii] action = "mask"`` the cache sees the original prompt: a cloud embedder
    must not (the attack-pass review found it did)."""
    settings = {**config(ups, tmp_path, "cloud"), "pii": {"action": "mask"}}
    async with running_gateway(settings) as gw:
        personal = await status(gw, KEY_A, "call me on 13812345678")
        embedded = ups["emb"].calls
        ordinary = await status(gw, KEY_A, "hello there")
    assert personal == "miss" and embedded == 0
    assert ordinary == "miss" and ups["emb"].calls >= 1  # ordinary prompts still embedded
    assert all("13812345678" not in str(r.body) for r in ups["emb"].received)
