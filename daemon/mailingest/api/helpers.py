"""``[api] processes`` above 1: helper processes that answer on the daemon's port.

One process serves the API from one core (a page of messages costs about 0.2 ms of it),
so under load the queue, not the store, sets the latency. Each helper is `python -m
mailingest.api.worker`: it listens on the same address with SO_REUSEPORT (the kernel
spreads new connections over the processes), answers the read routes from its own store
connection, and passes every other request to the daemon over a private Unix socket, so
that a write, a poll or a metric is the daemon's as before. It takes its settings from the
daemon (``Launch``, on its stdin), never from the config file, which may have changed
since the daemon read it; a helper of another version than the daemon refuses to start.

The daemon starts the helpers, restarts one that ends (1 s, doubling to a minute), and
stops them at its stop. A helper stops by itself when the daemon is gone, even killed: its
stdin is a pipe from the daemon, which reads EOF after the launch line. On its stdout it
writes JSON lines: ``{"ready": true}`` once it listens, and every second the answers it
counted by status (``{"answered": {"200": 812}}``), which the daemon adds to its /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aiohttp import web

from mailingest import __version__
from mailingest.api.host import ApiMetrics
from mailingest.errors import EX_CONFIG, ConfigError
from mailingest.logs import get_logger
from mailingest.settings import ApiSettings, Config

log = get_logger("mailingest.api")

RESTART_FIRST = 1.0
RESTART_MAX = 60.0
#: A helper asked to stop gets this long (its requests in flight get SHUTDOWN_TIMEOUT, as
#: the daemon's), then is killed.
STOP_WAIT = 3.0


@dataclass(frozen=True, slots=True)
class Launch:
    """What the daemon tells a helper at its start (one JSON line on its stdin)."""

    version: str
    database: str
    password: str | None = field(repr=False)
    host: str
    port: int
    tls_cert: str | None
    tls_key: str | None
    log_format: str

    @classmethod
    def of(cls, config: Config) -> Launch:
        """The daemon's settings as it runs them (a reload that changes them needs a
        restart: ``[api]``, ``[storage]``)."""
        api, storage = config.api, config.storage
        assert api is not None, "serving the API"
        cert, key = (str(p) if p else None for p in (api.tls_cert, api.tls_key))
        return cls(
            __version__,
            str(storage.database),
            storage.reveal_password(),
            api.host,
            api.port,
            cert,
            key,
            config.daemon.log_format,
        )

    def line(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    def api(self) -> ApiSettings:
        cert, key = (Path(p) if p else None for p in (self.tls_cert, self.tls_key))
        return ApiSettings(self.host, self.port, cert, key)


class Helpers:
    """The helper processes of one API server; ``start`` once, ``close`` once."""

    def __init__(self, launch: Launch, processes: int, metrics: ApiMetrics) -> None:
        self._launch = launch
        self._count = processes - 1
        self._metrics = metrics
        self._directory: Path | None = None
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def start(self, runner: web.AppRunner) -> None:
        """The daemon's app on a Unix socket of its own too, then the helpers (their start
        is not awaited: until one listens, the others answer)."""
        try:
            self._directory = Path(tempfile.mkdtemp(prefix="mailingest-api-"))  # mode 0700
            await web.UnixSite(runner, str(self.socket)).start()
        except OSError as exc:
            raise ConfigError(
                f"cannot open the socket for the helper processes in {tempfile.gettempdir()}:"
                f" {exc.strerror or exc} (set TMPDIR, or processes = 1)",
                key_path="api.processes",
            ) from exc
        self._tasks = [
            asyncio.create_task(self._keep(index), name=f"api-helper:{index}")
            for index in range(1, self._count + 1)
        ]

    @property
    def socket(self) -> Path:
        assert self._directory is not None, "started"
        return self._directory / "daemon.sock"

    async def close(self) -> None:
        """Each helper is asked to stop; one not gone within STOP_WAIT is killed (its
        task's ``_run`` kills and reaps it when cancelled)."""
        self._closing = True
        try:
            for proc in list(self._procs.values()):
                _stop(proc)
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=STOP_WAIT)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            if self._directory is not None:
                shutil.rmtree(self._directory, ignore_errors=True)

    async def _keep(self, index: int) -> None:
        wait = RESTART_FIRST
        while not self._closing:
            started = time.monotonic()
            code = await self._run(index)
            if self._closing:
                return
            if code == EX_CONFIG:  # its settings or version: the same again at every start
                log.error("api_helper_exited", helper=index, code=code, restart_in_s=None)
                return
            if time.monotonic() - started > RESTART_MAX:
                wait = RESTART_FIRST  # it served a while: a new failure, not the same one
            log.error("api_helper_exited", helper=index, code=code, restart_in_s=wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, RESTART_MAX)

    async def _run(self, index: int) -> int | None:
        """One helper from start to end: its exit code (None: it could not be started)."""
        try:
            # -P: the working directory is not put on the module path.
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",
                "-m",
                "mailingest.api.worker",
                "--forward",
                str(self.socket),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            log.error("api_helper_not_started", helper=index, error=str(exc))
            return None
        self._procs[index] = proc
        if self._closing:  # started while close() asked the others to stop
            _stop(proc)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(self._launch.line())  # a pipe's buffer holds it: no wait
            async for line in proc.stdout:
                self._heard(index, proc.pid, line)
            return await proc.wait()
        except (OSError, ValueError) as exc:  # its pipe broke, or a line was too long
            log.error("api_helper_said", helper=index, line=str(exc)[:200])
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return await proc.wait()
        finally:
            del self._procs[index]
            if proc.returncode is None:  # cancelled: never leave it behind, nor unreaped
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    def _heard(self, index: int, pid: int, line: bytes) -> None:
        try:
            said = json.loads(line)
            if said.get("ready"):
                log.info("api_helper_started", helper=index, pid=pid)
            for code, count in said.get("answered", {}).items():
                self._metrics.answered(int(code), int(count))
        except (ValueError, TypeError, AttributeError):
            log.warning("api_helper_said", helper=index, line=line[:200].decode(errors="replace"))


def _stop(proc: asyncio.subprocess.Process) -> None:
    """EOF on its stdin and SIGTERM: it stops listening and ends its requests."""
    if proc.stdin is not None:
        proc.stdin.close()
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
