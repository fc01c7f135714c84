"""A managed node's process status: signals in words, the restart delay, the shared file."""

from __future__ import annotations

import signal
from pathlib import Path

from spillway.clock import ManualClock
from spillway.nodes.process_status import (
    ProcessStatus,
    StatusFile,
    describe_exit,
    killing_signal,
    restart_delay,
)


def test_a_signal_is_named_with_its_likely_meaning() -> None:
    short, full = describe_exit(-signal.SIGILL)
    assert short == "process killed by SIGILL"
    assert full.startswith("process killed by SIGILL: illegal instruction")
    assert "install_llama_cpp.py" in full and "GGML_NATIVE=OFF" in full
    assert "out-of-memory" in describe_exit(-signal.SIGKILL)[1]
    assert describe_exit(-signal.SIGUSR2) == ("process killed by SIGUSR2",) * 2
    assert describe_exit(3) == ("process exited with status 3",) * 2


def test_the_restart_delay_doubles_per_crash_in_a_row_up_to_five_minutes() -> None:
    assert [restart_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 32, 64]
    assert restart_delay(9) == 256 and restart_delay(10) == 300 and restart_delay(50) == 300
    assert restart_delay(0) == 1


def test_the_status_file_round_trips_and_is_reread_after_its_ttl(tmp_path: Path) -> None:
    clock = ManualClock()
    path = tmp_path / "run" / "node-local.json"
    writer, reader = StatusFile(path, clock.monotonic), StatusFile(path, clock.monotonic)
    assert reader.status().serving  # nothing written yet: routing fails open
    failed = ProcessStatus("failed", None, 2, 3, "long reason", "process killed by SIGILL", 5.0)
    writer.write(failed)
    assert reader.status().serving  # read moments ago: cached
    clock.advance(0.5)
    assert reader.status() == failed
    writer.write(ProcessStatus("running", 123, 3))
    clock.advance(0.5)
    assert reader.status() == ProcessStatus("running", 123, 3)
    assert not list(path.parent.glob("*.tmp"))  # written by rename, nothing left behind


def test_describe_says_when_the_next_start_is() -> None:
    status = ProcessStatus("failed", None, 1, 2, "why", "short", retry_at=110.0)
    assert status.describe(wall_now=100.0) == {
        "process": "failed",
        "pid": None,
        "restarts": 1,
        "crashes_in_a_row": 2,
        "summary": "short",
        "reason": "why",
        "next_start_in_s": 10.0,
    }


def test_a_shell_reports_its_childs_signal_as_128_plus_it() -> None:
    """A ``command`` run through a wrapper script: the shell exits 132 when its server dies
    by SIGILL, which is still a crash with the rebuild hint, not a configuration error."""
    assert killing_signal(128 + signal.SIGILL) == signal.SIGILL
    assert killing_signal(-signal.SIGSEGV) == signal.SIGSEGV
    assert killing_signal(1) is None and killing_signal(128 + 63) is None
    short, full = describe_exit(132)
    assert short == "process killed by SIGILL (exit status 132 from a shell)"
    assert "CPU instructions" in full
