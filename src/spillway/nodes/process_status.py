"""What a managed node's process is doing, why it is not serving, and when it is tried again.

A supervisor owns the facts; the router, ``/readyz`` and ``/admin/nodes`` read them. With
``--workers`` the supervisor lives in the parent process, so it also writes them to a small
JSON file that each worker reads (``StatusFile``), at most every ``STATUS_FILE_TTL_S``.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson

State = Literal["stopped", "starting", "running", "restarting", "failed"]

#: After this long serving without a crash, the next crash backs off from the start again.
STABLE_S = 60.0
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 300.0
STATUS_FILE_TTL_S = 0.5

#: How to rebuild the embedded node for the CPU it runs on (docs/architecture.md).
REBUILD_HINT = (
    "rebuild it without native CPU tuning: `python scripts/install_llama_cpp.py` from a "
    "spillway checkout (make run and make test do this), or "
    "`CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --no-cache-dir --force-reinstall "
    "llama-cpp-python`"
)

#: What a signal most likely means when it kills an inference server.
SIGNAL_MEANINGS: dict[int, str] = {
    signal.SIGILL: (
        "illegal instruction: this llama.cpp build uses CPU instructions (AMX, AVX-512…) "
        "that this machine cannot run; " + REBUILD_HINT
    ),
    signal.SIGKILL: "killed, most often by the kernel's out-of-memory killer (see `dmesg`)",
    signal.SIGSEGV: "segmentation fault inside the server (see the node's log)",
    signal.SIGBUS: "bus error: the model file may have been changed or truncated while in use",
    signal.SIGABRT: "aborted: the server stopped on a failed internal check (see its log)",
    signal.SIGFPE: "arithmetic fault inside the server",
}


def killing_signal(code: int) -> int | None:
    """The signal that ended a process, from its returncode: negative when it was killed
    directly, 128 + the signal when a shell in between (a ``command`` wrapper script) reported
    its child's death; None when it exited on its own."""
    if code < 0:
        return -code
    if 128 < code < 160 and code - 128 in SIGNAL_MEANINGS:
        return code - 128
    return None


def describe_exit(code: int) -> tuple[str, str]:
    """A returncode in words: (short, with its likely meaning), the short one for clients:
    "process killed by SIGILL"."""
    number = killing_signal(code)
    if number is None:
        short = f"process exited with status {code}"
        return short, short
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    short = f"process killed by {name}"
    if code > 0:
        short += f" (exit status {code} from a shell)"
    meaning = SIGNAL_MEANINGS.get(number)
    return short, f"{short}: {meaning}" if meaning else short


def restart_delay(crashes: int) -> float:
    """Seconds before the next start after ``crashes`` crashes in a row: 1, 2, 4 … 300."""
    return float(min(FIRST_DELAY_S * 2.0 ** max(crashes - 1, 0), MAX_DELAY_S))


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    """One managed node's process, as the supervisor last saw it."""

    state: State
    pid: int | None = None
    restarts: int = 0
    #: crashes in a row (reset once the node has served for STABLE_S)
    crashes: int = 0
    #: why the node is not serving, and what to do; kept until it serves again
    reason: str | None = None
    #: the same in a few words, for clients ("process killed by SIGILL")
    summary: str | None = None
    #: wall-clock time of the next start attempt, while backing off
    retry_at: float | None = None

    @property
    def serving(self) -> bool:
        return self.state == "running"

    def describe(self, wall_now: float) -> dict[str, Any]:
        """For /readyz and /admin/nodes."""
        info: dict[str, Any] = {
            "process": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "crashes_in_a_row": self.crashes,
        }
        if self.reason is not None:
            info["summary"], info["reason"] = self.summary, self.reason
        if self.retry_at is not None:
            info["next_start_in_s"] = round(max(0.0, self.retry_at - wall_now), 1)
        return info


class ProcessView(Protocol):
    """Reads a managed node's current status (the supervisor itself, or its status file)."""

    def status(self) -> ProcessStatus: ...


class StatusFile:
    """A supervisor's status as a JSON file: written atomically, read with a short cache.
    Until a reader has read the file once it assumes the node serves (routing fails open:
    the breaker still guards a node that does not)."""

    def __init__(self, path: Path, monotonic: Callable[[], float]):
        self.path = path
        self._monotonic = monotonic
        self._cached: ProcessStatus = ProcessStatus("running")
        self._read_at: float | None = None

    def write(self, status: ProcessStatus) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        partial.write_bytes(orjson.dumps(asdict(status)))
        os.replace(partial, self.path)

    def status(self) -> ProcessStatus:
        now = self._monotonic()
        if self._read_at is None or now - self._read_at >= STATUS_FILE_TTL_S:
            self._read_at = now
            with contextlib.suppress(OSError, ValueError, TypeError):
                self._cached = ProcessStatus(**orjson.loads(self.path.read_bytes()))
        return self._cached
