"""Processes for bench/harness.py: free loopback ports, starting a candidate in its own process
group (recorded in a pid file so that bench/run's exit trap can stop it too), stopping it, and
the memory of its process tree read from /proc."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Proc:
    """A started command: its own session and process group, its output in ``log``."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    pidfile: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


def start(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> Proc:
    """Start ``argv`` in a new session (so its whole tree can be signalled at once)."""
    log = workdir / f"{name}.log"
    pidfile = workdir / "pids"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=workdir,
        )
    with pidfile.open("a") as f:
        f.write(f"{popen.pid}\n")
    return Proc(name, popen, log, pidfile)


def stop(proc: Proc, grace_s: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
    pgid = proc.pid  # the leader of its own session: pgid == pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(pgid):
        proc.popen.poll()  # reap the leader so that it stops counting
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(timeout=5)
    _forget(proc)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forget(proc: Proc) -> None:
    try:
        pids = proc.pidfile.read_text().split()
    except OSError:
        return
    rest = [pid for pid in pids if pid != str(proc.pid)]
    proc.pidfile.write_text("".join(f"{pid}\n" for pid in rest))


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive."""
    children = _children()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class Memory:
    processes: int
    rss_mb: float  # sum of VmRSS: counts pages shared between the processes once per process
    pss_mb: float  # sum of Pss: shared pages divided among the processes that share them


def memory(pid: int) -> Memory:
    pids = tree(pid)
    rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return Memory(len(pids), rss / 1024, pss / 1024)


def system_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields
    # irq and softirq are left out: loopback traffic is handled there, and that is ours
    return user + nice + system + steal, sum(fields)


def tree_ticks(pid: int) -> int:
    """CPU ticks used by ``pid``'s live tree, including its reaped children (cutime, cstime)."""
    ticks = 0
    for p in tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks


class OtherLoad:
    """How much of the machine's CPU went to processes outside the benchmark between two
    points: the benchmark is this process and everything it started (nginx, the candidates,
    wrk, ttft.py), whose CPU time this process's tree accounts for."""

    def __init__(self) -> None:
        self._start = (*system_ticks(), tree_ticks(os.getpid()))

    def percent(self) -> float:
        busy0, total0, ours0 = self._start
        busy1, total1 = system_ticks()
        ours1 = tree_ticks(os.getpid())
        other = (busy1 - busy0) - (ours1 - ours0)
        return max(0.0, 100.0 * other / max(1, total1 - total0))


def http_request(
    url: str,
    key: str,
    body: dict[str, object] | None = None,
    timeout: float = 10,
    headers_out: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """GET (or POST ``body`` as JSON) with a Bearer ``key``, never through a proxy: (status,
    body); the response headers, lower-cased, go into ``headers_out``."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            if headers_out is not None:
                headers_out.update((k.lower(), v) for k, v in response.headers.items())
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
