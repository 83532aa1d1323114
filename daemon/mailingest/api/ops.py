"""Operations: /healthz, /readyz, /metrics, /openapi.json (no token: probes and scrapers;
keep the API on loopback or behind a proxy), and GET /accounts (a token)."""

from __future__ import annotations

from aiohttp import web

from mailingest import commands
from mailingest.api import openapi
from mailingest.api.host import caller_of, host_of
from mailingest.errors import StoreError


async def healthz(request: web.Request) -> web.Response:
    """The process answers and the store is reachable."""
    try:
        await host_of(request).store.check_reachable()
    except StoreError as exc:
        return web.json_response({"status": "failing", "store": str(exc)}, status=503)
    return web.json_response({"status": "ok", "store": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The accounts are loaded and the store takes writes."""
    host = host_of(request)
    body: dict[str, object] = {"status": "ok", "accounts": "loaded", "store": "writable"}
    if not host.ready:
        body |= {"status": "not_ready", "accounts": "loading"}
    try:
        await host.store.check_writable()
    except StoreError as exc:
        body |= {"status": "not_ready", "store": str(exc)}
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
