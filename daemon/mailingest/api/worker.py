"""A helper process of the API (``[api] processes``, helpers.py): `python -P -m
mailingest.api.worker --forward SOCKET`, started by the daemon only.

It reads its settings from the daemon, one JSON line on stdin (helpers.Launch): the daemon's
version, store, address and log format as the daemon runs them, so that neither an edited
config file nor an upgraded package reaches a helper before the daemon has them. It
answers the read routes that need nothing but the store (a page of messages, one message,
its raw bytes, the records) and /healthz with the daemon's own handlers, and forwards
every other request to the daemon (forward.py): writes, polls, accounts, /readyz, metrics,
and a listing by account (the daemon knows the accounts added since this process started).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import Counter

from aiohttp import web

from mailingest import __version__, logs
from mailingest.api import messages, ops, records
from mailingest.api.app import ROUTES, SHUTDOWN_TIMEOUT, Handler, Route, build_app, tls_context
from mailingest.api.forward import DAEMON, daemon_session, forward, forward_with_token
from mailingest.api.helpers import Launch
from mailingest.config import Config
from mailingest.errors import EX_CONFIG, EX_UNAVAILABLE, MailIngestError
from mailingest.store import Store

log = logs.get_logger("mailingest.api")

#: Served here; every other route goes to the daemon.
LOCAL = frozenset({messages.get_message, messages.get_raw, records.list_records, ops.healthz})
#: Seconds between the counts this process sends the daemon for its /metrics.
REPORT_EVERY = 1.0


async def _list_messages(request: web.Request) -> web.StreamResponse:
    if "account" in request.query:  # checked against the daemon's accounts, as they are now
        return await forward_with_token(request)
    return await messages.list_messages(request)


def helper_routes() -> tuple[Route, ...]:
    def handler(original: Handler, token: bool) -> Handler:
        if original is messages.list_messages:
            return _list_messages
        if original in LOCAL:
            return original
        return forward_with_token if token else forward

    return tuple((method, path, handler(h, token), token) for method, path, h, token in ROUTES)


#: Handlers that check the token themselves, or need none.
NO_TOKEN_CHECK = frozenset({forward, forward_with_token, _list_messages, ops.healthz})


class _Tally:
    """The answers this process gave, by status, until the next report."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    def answered(self, status: int, count: int = 1) -> None:
        self.counts[status] += count

    def sent(self, ok: bool) -> None:
        raise RuntimeError("sending is the daemon's: forwarded")

    def render(self) -> tuple[bytes, str]:
        raise RuntimeError("/metrics is the daemon's: forwarded")

    def report(self) -> None:
        if self.counts:
            counts = {str(code): n for code, n in self.counts.items()}
            self.counts.clear()
            _say({"answered": counts})


class _Host:
    """The ApiHost of a helper: its own store; what the local routes never use raises."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.metrics = _Tally()
        self.ready = True

    @property
    def store(self) -> Store:
        return self._store

    @property
    def config(self) -> Config:
        raise RuntimeError("the daemon's: forwarded")

    @property
    def file_config(self) -> Config:
        raise RuntimeError("the daemon's: forwarded")

    async def accounts_changed(self) -> None:
        raise RuntimeError("the daemon's: forwarded")

    def changing(self, account: str, actor: str) -> contextlib.AbstractContextManager[None]:
        raise RuntimeError("the daemon's: forwarded")

    def poll_now(self, account: str) -> bool | None:
        raise RuntimeError("the daemon's: forwarded")


def _say(message: dict[str, object]) -> None:
    """A line to the daemon; none if it is gone (stdin's EOF stops this process then)."""
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


async def serve(launch: Launch, socket: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as held:  # each part closed whatever fails next
        store = await Store.open(launch.database, password=launch.password)
        held.push_async_callback(store.close)
        host = _Host(store)
        app = build_app(host, helper_routes(), NO_TOKEN_CHECK)
        app[DAEMON] = daemon_session(socket)
        held.push_async_callback(app[DAEMON].close)
        held.callback(host.metrics.report)  # the last counts, once the requests ended
        # Bodies go to the daemon as they came, compressed or not.
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            auto_decompress=False,
        )
        held.push_async_callback(runner.cleanup)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_reader(sys.stdin.fileno(), _on_stdin, stop)
        held.callback(loop.remove_reader, sys.stdin.fileno())
        await runner.setup()
        api = launch.api()
        context = tls_context(api)
        site = web.TCPSite(runner, api.host, api.port, ssl_context=context, reuse_port=True)
        await site.start()
        _say({"ready": True})
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REPORT_EVERY)
            host.metrics.report()


def _on_stdin(stop: asyncio.Event) -> None:
    """After the launch line the daemon writes nothing: readable means EOF, the daemon
    closed it or is gone."""
    with contextlib.suppress(OSError):
        if os.read(sys.stdin.fileno(), 4096):
            return
    stop.set()


def _read_line(fd: int, limit: int = 65536) -> bytes:
    """One line from ``fd``, a byte at a time: nothing after it is read (or buffered away
    from the EOF that stops this process)."""
    line = bytearray()
    while len(line) < limit and not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return bytes(line)


def _launch() -> Launch:
    try:
        said = json.loads(_read_line(sys.stdin.fileno()))
        version = said["version"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise MailIngestError(f"no launch line from the daemon on stdin ({exc!r})") from None
    if version != __version__:  # first: another version may say other things
        raise MailIngestError(
            f"this is mailingest {__version__}, the daemon runs {version}: restart the"
            " daemon after an upgrade"
        )
    try:
        return Launch(**said)
    except TypeError as exc:
        raise MailIngestError(f"not a launch line this version reads ({exc})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailingest.api.worker")
    parser.add_argument("--forward", required=True, metavar="SOCKET")
    args = parser.parse_args(argv)
    # Ctrl-C and SIGHUP reach the whole process group: the daemon decides for its helpers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logs.configure("auto")
    try:
        launch = _launch()
    except MailIngestError as exc:
        log.error("api_helper_failed", error=str(exc))
        return EX_CONFIG
    logs.register_secrets([launch.password] if launch.password else [])
    logs.configure(launch.log_format)
    try:
        asyncio.run(serve(launch, args.forward))
    except MailIngestError as exc:
        log.error("api_helper_failed", error=str(exc))
        return exc.exit_code
    except OSError as exc:  # the port, most likely: the daemon logs the exit code
        log.error("api_helper_failed", error=str(exc))
        return EX_UNAVAILABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
