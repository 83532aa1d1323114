"""The aiohttp application: routes, the error and token middlewares, and serving it on the
daemon's event loop (``serve``), plain or over TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from mailingest.api import accounts, messages, ops, records, sending
from mailingest.api.auth import authenticate
from mailingest.api.errors import ApiError, error_response
from mailingest.api.forward import FORWARDED
from mailingest.api.helpers import Helpers, Launch
from mailingest.api.host import CALLER, HOST, ApiHost, host_of
from mailingest.config import ApiSettings
from mailingest.errors import ConfigError, MailIngestError, StoreError
from mailingest.logs import get_logger

log = get_logger("mailingest.api")

#: Request bodies above this are refused (413) before they are read whole.
MAX_BODY = 1024 * 1024
#: Requests in flight at the stop get this long to finish (seconds).
SHUTDOWN_TIMEOUT = 2.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: (method, path, handler, needs a token).
Route = tuple[str, str, Handler, bool]
#: openapi.py describes exactly these.
ROUTES: tuple[Route, ...] = (
    ("GET", "/healthz", ops.healthz, False),
    ("GET", "/readyz", ops.readyz, False),
    ("GET", "/metrics", ops.metrics, False),
    ("GET", "/openapi.json", ops.openapi_json, False),
    ("GET", "/messages", messages.list_messages, True),
    ("GET", "/messages/{id:[0-9]{1,19}}", messages.get_message, True),
    ("GET", "/messages/{id:[0-9]{1,19}}/raw", messages.get_raw, True),
    ("POST", "/messages", sending.send, True),
    ("POST", "/messages/{id:[0-9]{1,19}}/reply", sending.reply, True),
    ("GET", "/records", records.list_records, True),
    ("PUT", "/records/{id}", records.put_record, True),
    ("DELETE", "/records/{id}", records.delete_record, True),
    ("PUT", "/records/{id}/emails", records.put_emails, True),
    ("PUT", "/records/{id}/shares/{owner}", records.share, True),
    ("DELETE", "/records/{id}/shares/{owner}", records.share, True),
    ("GET", "/accounts", ops.accounts, True),
    ("POST", "/accounts", accounts.add_account, True),
    ("GET", "/accounts/{name}", accounts.get_settings, True),
    ("PATCH", "/accounts/{name}", accounts.patch_settings, True),
    ("POST", "/accounts/{name}/check", accounts.check, True),
    ("POST", "/accounts/{name}/fetch", accounts.fetch_now, True),
)
#: Handlers the token middleware leaves alone: no token (the public ones), or the handler
#: looks the token up itself, in the same read as its answer.
NO_TOKEN_CHECK = frozenset(
    {*(handler for _, _, handler, token in ROUTES if not token), messages.list_messages}
)
_NO_TOKEN_CHECK = web.AppKey("no_token_check", frozenset[Handler])


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes the JSON error shape; a bug is logged, never shown."""
    try:
        response = await handler(request)
    except ApiError as exc:
        response = exc.response()
    except web.HTTPException as exc:  # no such route (404), method (405), body too large (413)
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason)
    except StoreError as exc:
        # Its text names the database and its host: for the log, not for every token holder.
        log.warning(
            "api_store_unavailable", method=request.method, path=request.path, error=str(exc)
        )
        response = error_response(503, "the store is unavailable; the daemon's log has the details")
    except MailIngestError as exc:
        response = error_response(422, str(exc))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        log.exception(
            "api_request_failed", method=request.method, path=request.path, error=repr(exc)
        )
        response = error_response(500, "internal error; the daemon's log has the details")
    if not request.get(FORWARDED):  # else the daemon counted it
        host_of(request).metrics.answered(response.status)
    return response


@web.middleware
async def _token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Routes that need a token get the caller in ``request["caller"]`` (handlers in
    ``NO_TOKEN_CHECK`` set it themselves, or need none). A NUL in the path or a query value
    is bad input (PostgreSQL would refuse it as the store being down)."""
    for key, value in [("path", request.path), *request.query.items()]:
        if "\x00" in value or "\x00" in key:
            raise ApiError(422, "a NUL byte", field=key)
    mine = handler in request.app[_NO_TOKEN_CHECK]
    if request.match_info.http_exception is None and not mine:
        request[CALLER] = await authenticate(request, host_of(request).store)
    return await handler(request)


def build_app(
    host: ApiHost,
    routes: tuple[Route, ...] = ROUTES,
    no_token_check: frozenset[Handler] = NO_TOKEN_CHECK,
) -> web.Application:
    """The daemon's app; a helper process (worker.py) gives its own handlers and set."""
    app = web.Application(middlewares=[_errors, _token], client_max_size=MAX_BODY)
    app[HOST] = host
    app[_NO_TOKEN_CHECK] = no_token_check
    app[messages.DECODING] = asyncio.Semaphore(messages.DECODE_AT_ONCE)
    app[accounts.TEST_LOGINS] = asyncio.Semaphore(accounts.TEST_LOGINS_AT_ONCE)
    app[ops.WRITE_PROBE] = ops.WriteProbe()
    for method, path, handler, _ in routes:
        app.router.add_route(method, path, handler)
    return app


class ApiServer:
    """The API listening; ``close`` stops it (requests in flight get SHUTDOWN_TIMEOUT),
    its helper processes first."""

    def __init__(self, runner: web.AppRunner, helpers: Helpers | None) -> None:
        self._runner = runner
        self._helpers = helpers

    async def close(self) -> None:
        # Together: the helpers' requests in flight may need the daemon's socket, and the
        # stop's grace period counts from the signal.
        closing = [self._runner.cleanup()]
        if self._helpers is not None:
            closing.append(self._helpers.close())
        for outcome in await asyncio.gather(*closing, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome


async def serve(host: ApiHost, settings: ApiSettings) -> ApiServer:
    """Listen on ``[api] listen``; a port taken or a TLS file unusable is a ConfigError.
    With ``processes`` above 1, the port is shared (SO_REUSEPORT) with helper processes
    (helpers.py), once it is known to be free."""
    context = tls_context(settings)
    runner = web.AppRunner(
        build_app(host), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    shared = settings.processes > 1
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=context, reuse_port=shared)
    helpers = Helpers(Launch.of(host.config), settings.processes, host.metrics) if shared else None
    try:
        try:
            if shared:  # SO_REUSEPORT would let a second daemon bind beside the first
                await _check_free(settings.host, settings.port)
            await site.start()
        except OSError as exc:
            where = f"{settings.host}:{settings.port}"
            raise ConfigError(
                f"cannot listen on {where}: {exc.strerror or exc}", key_path="api.listen"
            ) from exc
        if helpers is not None:
            await helpers.start(runner)
    except BaseException:
        if helpers is not None:
            await helpers.close()
        await runner.cleanup()
        raise
    log.info(
        "api_started",
        host=settings.host,
        port=settings.port,
        tls=context is not None,
        processes=settings.processes,
    )
    return ApiServer(runner, helpers)


async def _check_free(host: str, port: int) -> None:
    """OSError if something listens on ``host:port`` (a bind without SO_REUSEPORT fails)."""
    loop = asyncio.get_running_loop()
    found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)


def tls_context(settings: ApiSettings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load {settings.tls_cert} / {settings.tls_key}: {exc}", key_path="api.tls_cert"
        ) from exc
    return context
