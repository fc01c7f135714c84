"""A real, throw-away Redis for tests: Debian's ``/usr/bin/redis-server`` (``apt-get install
redis-server``), on a free loopback port, with no persistence.

``redis_server()`` starts it, waits until it answers PING, yields a :class:`RedisServer` and
stops it on exit. Within a test, ``stop()``/``start()`` take it down and bring it back on the
same port (an outage), and ``pause()``/``resume()`` freeze it with SIGSTOP (a server that
accepts connections but never answers). Like tests/pg.py, the server gets SIGTERM when the
test process dies (``prctl(PR_SET_PDEATHSIG)``), so none outlives its tests.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REDIS_SERVER = "/usr/bin/redis-server"
HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_PR_SET_PDEATHSIG = 1


class RedisServer:
    """One redis-server process, restartable on the same port."""

    def __init__(self, port: int, work_dir: Path, password: str | None = None):
        self.host = HOST
        self.port = port
        self.password = password
        self._dir = work_dir
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", self.host]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(self._dir)]
        if self.password:
            args += ["--requirepass", self.password]
        self._proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def _answers(self) -> bool:
        """PING answered (+PONG, or -NOAUTH when a password is set: it is up either way)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64)[:5] in (b"+PONG", b"-NOAU")
        except OSError:
            return False


@contextmanager
def redis_server(password: str | None = None) -> Iterator[RedisServer]:
    """Start a fresh redis-server on a free loopback port; stop it on exit. Skips the test
    when redis-server is not installed."""
    if shutil.which(REDIS_SERVER) is None:
        pytest.skip(f"{REDIS_SERVER} is not installed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="spillway-redis-") as work_dir:
        server = _started(Path(work_dir), password)
        try:
            yield server
        finally:
            server.stop()


def _started(work_dir: Path, password: str | None) -> RedisServer:
    """A started server; a port taken between our probe and the bind is retried."""
    for attempt in range(5):
        server = RedisServer(_free_port(), work_dir, password)
        try:
            server.start()
            return server
        except RuntimeError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when our process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
