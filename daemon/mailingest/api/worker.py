"""A helper process of the API (``[api] processes``, helpers.py): `python -m
mailingest.api.worker --config FILE --forward SOCKET`, started by the daemon only.

It answers the read routes that need nothing but the store (a page of messages, one
message, its raw bytes, the records) with the daemon's own handlers, and forwards every
other request to the daemon (forward.py): writes, polls, accounts, health, metrics, and a
listing by account (the daemon knows the accounts added since this process started).
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
from pathlib import Path

from aiohttp import web

from mailingest import logs
from mailingest.api import messages, records
from mailingest.api.app import ROUTES, SHUTDOWN_TIMEOUT, Handler, Route, build_app, tls_context
from mailingest.api.forward import DAEMON, daemon_session, forward
from mailingest.config import Config, load_config
from mailingest.errors import EX_UNAVAILABLE, MailIngestError
from mailingest.store import Store

log = logs.get_logger("mailingest.api")

#: Served here; every other route goes to the daemon.
LOCAL = frozenset({messages.get_message, messages.get_raw, records.list_records})
#: Seconds between the counts this process sends the daemon for its /metrics.
REPORT_EVERY = 1.0


async def _list_messages(request: web.Request) -> web.StreamResponse:
    if "account" in request.query:  # checked against the daemon's accounts, as they are now
        return await forward(request)
    return await messages.list_messages(request)


def helper_routes() -> tuple[Route, ...]:
    def handler(original: Handler) -> Handler:
        if original is messages.list_messages:
            return _list_messages
        return original if original in LOCAL else forward

    return tuple((method, path, handler(h), token) for method, path, h, token in ROUTES)


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

    def __init__(self, store: Store, config: Config) -> None:
        self._store = store
        self._config = config
        self.metrics = _Tally()
        self.ready = True

    @property
    def store(self) -> Store:
        return self._store

    @property
    def config(self) -> Config:
        return self._config

    @property
    def file_config(self) -> Config:
        return self._config

    async def accounts_changed(self) -> None:
        raise RuntimeError("the daemon's: forwarded")

    def changing(self, account: str, actor: str) -> contextlib.AbstractContextManager[None]:
        raise RuntimeError("the daemon's: forwarded")

    def poll_now(self, account: str) -> bool | None:
        raise RuntimeError("the daemon's: forwarded")


def _say(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve(config: Config, socket: str) -> None:
    api = config.api
    if api is None:
        raise MailIngestError("the config has no [api] table")
    storage = config.storage
    store = await Store.open(storage.database, password=storage.reveal_password())
    host = _Host(store, config)
    no_check = frozenset({forward, _list_messages})
    app = build_app(host, helper_routes(), no_check)
    app[DAEMON] = daemon_session(socket)
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), _on_stdin, stop)
    try:
        await runner.setup()
        context = tls_context(api)
        site = web.TCPSite(runner, api.host, api.port, ssl_context=context, reuse_port=True)
        await site.start()
        _say({"ready": True})
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REPORT_EVERY)
            host.metrics.report()
    finally:
        loop.remove_reader(sys.stdin.fileno())
        await runner.cleanup()
        host.metrics.report()
        await app[DAEMON].close()
        await store.close()


def _on_stdin(stop: asyncio.Event) -> None:
    """The daemon writes nothing: readable means EOF, the daemon closed it or is gone."""
    with contextlib.suppress(OSError):
        if os.read(sys.stdin.fileno(), 4096):
            return
    stop.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailingest.api.worker")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--forward", required=True, metavar="SOCKET")
    args = parser.parse_args(argv)
    # Ctrl-C and SIGHUP reach the whole process group: the daemon decides for its helpers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logs.configure("auto")
    try:
        config = load_config(args.config, secrets=False)
        logs.register_secrets(config.secrets())
        logs.configure(config.daemon.log_format)
        asyncio.run(serve(config, args.forward))
    except MailIngestError as exc:
        log.error("api_helper_failed", error=str(exc))
        return exc.exit_code
    except OSError as exc:  # the port, most likely: the daemon logs the exit code
        log.error("api_helper_failed", error=str(exc))
        return EX_UNAVAILABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
