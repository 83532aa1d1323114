"""Operations: /healthz, /readyz, /metrics, /openapi.json (no token: probes and scrapers;
keep the API on loopback or behind a proxy), and GET /accounts (a token)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

from mailingest import commands
from mailingest.api import openapi
from mailingest.api.host import caller_of, host_of
from mailingest.errors import StoreError
from mailingest.logs import get_logger
from mailingest.store import Store

log = get_logger("mailingest.api")

#: /readyz writes to the store at most this often (seconds); between, the last result.
WRITE_PROBE_EVERY = 5.0


class WriteProbe:
    """The store's write check for /readyz, redone at most every ``every`` seconds and one
    at a time: probes and scrapers need no token, and must not make the daemon write (and
    fsync) on every request. A failure is kept as long as a success."""

    def __init__(
        self, every: float = WRITE_PROBE_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._every = every
        self._clock = clock
        self._lock = asyncio.Lock()
        self._checked: float | None = None
        self._error: str | None = None

    async def check(self, store: Store) -> str | None:
        """None if the store took the last write, else why not."""
        async with self._lock:
            if self._checked is None or self._clock() - self._checked >= self._every:
                try:
                    await store.check_writable()
                except StoreError as exc:
                    self._error = str(exc)
                    log.warning("api_store_check_failed", check="writable", error=self._error)
                else:
                    self._error = None
                self._checked = self._clock()
            return self._error


WRITE_PROBE = web.AppKey("write_probe", WriteProbe)


async def healthz(request: web.Request) -> web.Response:
    """The process answers and the store is reachable (why not: in the log only)."""
    try:
        await host_of(request).store.check_reachable()
    except StoreError as exc:
        log.warning("api_store_check_failed", check="reachable", error=str(exc))
        return web.json_response({"status": "failing", "store": "unreachable"}, status=503)
    return web.json_response({"status": "ok", "store": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The accounts are loaded and the store takes writes (see WriteProbe)."""
    host = host_of(request)
    body: dict[str, object] = {"status": "ok", "accounts": "loaded", "store": "writable"}
    if not host.ready:
        body |= {"status": "not_ready", "accounts": "loading"}
    if await request.app[WRITE_PROBE].check(host.store) is not None:
        body |= {"status": "not_ready", "store": "not_writable"}
    return web.json_response(body, status=200 if body["status"] == "ok" else 503)


async def metrics(request: web.Request) -> web.Response:
    payload, content_type = host_of(request).metrics.render()
    response = web.Response(body=payload)
    response.headers["Content-Type"] = content_type
    return response


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


async def accounts(request: web.Request) -> web.Response:
    """`status --json` of the accounts the caller owns (an admin: every account the daemon
    polls): last poll, pause, next poll."""
    host, caller = host_of(request), caller_of(request)
    found = await commands.status_of(host.store, host.config)
    return web.json_response({"accounts": [a for a in found if caller.may_manage(a["owner"])]})
