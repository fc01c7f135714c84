"""The canary sweep (#20 item 6): a run of ordinary and failing requests with canary secrets
in every place a secret lives (the client's key, a wrong key, a key in a query string, a
node's API key, a node's extra header, a proxy's password), then a search for each canary in
everything the gateway wrote or said: its log (every logger, DEBUG and up), every response
body and header, and every file in its data directory (the ledger, the cache, the spool).

A managed key (``/admin/keys``) is used, misused and revoked in the same run: apart from
the answer that issued it, no trace of it may remain either.

/metrics does not exist yet; when it does, it joins the search."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from tests.fakes.gateway import node, running_gateway
from tests.fakes.upstream import FakeUpstream, Script, closed_port

CLIENT_KEY = "sk-CANARY-client-key-41c9e2"
WRONG_KEY = "sk-CANARY-wrong-key-d07b55"
NODE_KEY = "sk-CANARY-node-key-8e2f10"
NODE_HEADER = "CANARY-header-value-5a7731"
PROXY_PASSWORD = "CANARYproxyPass93"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


async def test_no_secret_appears_in_logs_answers_ledger_or_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    private, cloud = await FakeUpstream("a").start(), await FakeUpstream("cloud").start()
    proxy = f"http://spillway:{PROXY_PASSWORD}@127.0.0.1:{closed_port()}"
    config = {
        "server": {"data_dir": str(tmp_path)},
        "timeouts": {"connect_s": 1.0, "total_s": 5.0, "deadline_s": 10.0},
        "cache": {"mode": "exact"},
        "nodes": {
            "a": node("private", private.base_url),
            "cloud": node(
                "cloud", cloud.base_url, api_key=NODE_KEY, headers={"X-Org-Token": NODE_HEADER}
            ),
            "behind-proxy": {
                "kind": "cloud",
                "base_url": "http://10.255.0.1/v1",
                "models": {"p": "p"},
                "api_key": NODE_KEY,
                "proxy": proxy,
            },
        },
        "keys": [{"key": CLIENT_KEY, "tenant": "t", "admin": True}],
    }
    said: list[str] = []
    async with running_gateway(config) as gw, httpx.AsyncClient(base_url=gw.base_url) as http:
        auth = {"Authorization": f"Bearer {CLIENT_KEY}"}

        async def call(path: str, **kwargs: object) -> httpx.Response:
            response = await http.post(path, **kwargs)  # type: ignore[arg-type]
            said.append(response.text + str(dict(response.headers)))
            return response

        assert (await call("/chat/completions", json=CHAT, headers=auth)).status_code == 200
        assert (await call("/chat/completions", json=CHAT, headers=auth)).status_code == 200
        stream = await call("/chat/completions", json={**CHAT, "stream": True}, headers=auth)
        assert stream.status_code == 200
        embed = {"model": "m", "input": "hello"}
        assert (await call("/embeddings", json=embed, headers=auth)).status_code == 200
        # A key pasted where the model name goes (the attack pass found it kept in the ledger).
        for pasted in (CLIENT_KEY, NODE_KEY):
            misplaced = await call(
                "/chat/completions", json={**CHAT, "model": pasted}, headers=auth
            )
            assert misplaced.status_code == 404
        wrong = {"Authorization": f"Bearer {WRONG_KEY}"}
        assert (await call("/chat/completions", json=CHAT, headers=wrong)).status_code == 401
        query = await call(f"/chat/completions?api_key={CLIENT_KEY}", json=CHAT)
        assert query.status_code == 401
        # The private node fails; the cloud node answers with an error quoting its own key,
        # as some providers do ("Incorrect API key provided: sk-…").
        private.script = Script(mode="status", status=503)
        cloud.script = Script(mode="status", status=401,
                              error_message=f"Incorrect API key provided: {NODE_KEY}")  # fmt: skip
        fresh = {**CHAT, "messages": [{"role": "user", "content": "something new"}]}
        failed = await call("/chat/completions", json=fresh, headers=auth)
        assert failed.status_code >= 400
        streamed = await call("/chat/completions", json={**fresh, "stream": True}, headers=auth)
        assert streamed.status_code >= 400
        # ... and quoting it altered: half starred (as providers do), upper-cased, split.
        for altered in (NODE_KEY[:12] + "****" + NODE_KEY[-6:], NODE_KEY.upper(),
                        NODE_KEY[:10] + " " + NODE_KEY[10:]):  # fmt: skip
            cloud.script = Script(mode="status", status=400, error_message=f"bad key {altered}")
            for stream in (False, True):
                body = {**fresh, "stream": stream}
                assert (await call("/chat/completions", json=body, headers=auth)).status_code == 400
        behind = await call("/chat/completions", json={**CHAT, "model": "p"}, headers=auth)
        assert behind.status_code >= 500
        nodes = await http.get("/admin/nodes", headers=auth)
        said.append(nodes.text)
        # A managed key: its one showing (the create answer) is the only place it may be.
        made = await http.post(f"{gw.url}/admin/keys", json={"tenant": "u"}, headers=auth)
        managed = made.json()["key"]
        private.script = cloud.script = Script()
        mine = {"Authorization": f"Bearer {managed}"}
        assert (await call("/chat/completions", json=CHAT, headers=mine)).status_code == 200
        pasted = {**CHAT, "model": managed}
        assert (await call("/chat/completions", json=pasted, headers=mine)).status_code == 404
        revoked = await http.post(f"{gw.url}/admin/keys/{managed[:15]}/revoke", headers=auth)
        said.append(revoked.text)
        assert (await call("/chat/completions", json=CHAT, headers=mine)).status_code == 401
    await private.stop()
    await cloud.stop()

    assert cloud.received, "the cloud node was asked (so its key was in play)"
    # The gateway's log: every record but the test client's own (httpx, httpcore).
    ours = [r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpc"))]
    assert any(r.name == "aiohttp.access" for r in caplog.records)  # the access log is in
    places = {"log": "\n".join(ours), "answers": "\n".join(said)}
    places.update(_files(tmp_path))
    assert any(name.startswith("ledger") for name in places), "the ledger was written"
    # Every canary holds "CANARY": no trace of one, in any case or any piece, may remain.
    leaks = {where: text.lower().count("canary") for where, text in places.items()}
    assert {where: n for where, n in leaks.items() if n} == {}
    secret_part = managed[15:].lower()  # all but its public prefix
    assert [where for where, text in places.items() if secret_part in text.lower()] == []


def _files(root: Path) -> dict[str, str]:
    """Every file under ``root`` (the ledger, the cache, the spool), as text."""
    return {
        str(path.relative_to(root)): path.read_bytes().decode("latin-1")
        for path in root.rglob("*")
        if path.is_file()
    }
