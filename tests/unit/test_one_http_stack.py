"""Everything spillway sends to a node goes through its own client (``nodes/pool.py``): no
module under ``nodes/`` or ``routing/`` imports aiohttp, whose client would bypass the node's
proxy, TLS and headers settings."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import spillway

SRC = Path(spillway.__file__).parent


@pytest.mark.parametrize(
    "path",
    sorted([*(SRC / "nodes").rglob("*.py"), *(SRC / "routing").rglob("*.py")]),
    ids=lambda p: str(p.relative_to(SRC)),
)
def test_nodes_and_routing_do_not_import_aiohttp(path: Path) -> None:
    tree = ast.parse(path.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [name for name in names if name.split(".")[0] == "aiohttp"] == []
