"""nginx for tests: docs/deploy/nginx.conf (an http-context file) inside a minimal main config
whose pid, logs and temp files all live in a scratch directory, so it runs without root."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

NGINX = "/usr/sbin/nginx"
START_TIMEOUT_S = 10.0


def nginx_binary() -> str:
    found = NGINX if Path(NGINX).is_file() else shutil.which("nginx")
    if found is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    return found


def main_config(site: str, scratch: Path) -> Path:
    """``site`` included in a main config rooted in ``scratch``; returns its path."""
    included = scratch / "site.conf"
    included.write_text(site)
    temp_paths = "".join(
        f"    {kind}_temp_path {scratch / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = scratch / "nginx.conf"
    main.write_text(
        f"pid {scratch / 'nginx.pid'};\n"
        f"error_log {scratch / 'error.log'};\n"
        "daemon off;\n"
        "events {}\n"
        "http {\n"
        f"    access_log {scratch / 'access.log'};\n"
        f"{temp_paths}"
        f"    include {included};\n"
        "}\n"
    )
    return main


def on_port(site: str, port: int) -> str:
    """The site with its one ``listen 80;`` moved to 127.0.0.1:``port`` (80 needs root)."""
    listen = re.compile(r"^(\s*)listen 80;", re.MULTILINE)
    assert len(listen.findall(site)) == 1
    return listen.sub(rf"\g<1>listen 127.0.0.1:{port};", site)


def with_upstreams(site: str, addresses: Sequence[str]) -> str:
    """The site with its upstream ``server`` lines replaced by ``addresses`` (host:port)."""
    server = re.compile(r"^(\s*)server \S+( max_fails=\S+ fail_timeout=\S+);\n", re.MULTILINE)
    first = server.search(site)
    assert first is not None
    indent, options = first.group(1), first.group(2)
    lines = "".join(f"{indent}server {a}{options};\n" for a in addresses)
    return site[: first.start()] + lines + server.sub("", site[first.start() :])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def running_nginx(site: str, scratch: Path) -> Iterator[str]:
    """nginx serving ``site`` (listening on a free loopback port); yields its base URL."""
    port = free_port()
    main = main_config(on_port(site, port), scratch)
    binary = nginx_binary()
    argv = [binary, "-p", str(scratch), "-e", str(scratch / "error.log"), "-c", str(main)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _accepts(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((scratch / "error.log").read_text(errors="replace"))
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0
