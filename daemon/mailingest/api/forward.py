"""A helper process's way to the daemon: a request it does not answer itself goes, as it
came (method, path and query byte for byte, headers, body), over the daemon's private Unix
socket, and the daemon's answer comes back as the daemon sent it. The daemon checks the
token again and counts the answer in its /metrics; the helper counts nothing it passed on.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web
from yarl import URL

from mailingest.api.auth import authenticate
from mailingest.api.errors import ApiError
from mailingest.api.host import host_of
from mailingest.logs import get_logger

log = get_logger("mailingest.api")

#: The daemon's client session (a Unix connector to its socket), in the helper's app.
DAEMON = web.AppKey("daemon", aiohttp.ClientSession)
#: Set on a request the daemon answered: the helper does not count it again.
FORWARDED = "forwarded"

#: Connection-level headers (RFC 9110, 7.6.1) and what aiohttp sets itself on each hop.
_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Expect",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
        "Host",
        "Date",
        "Server",
    )
)


def daemon_session(socket: str) -> aiohttp.ClientSession:
    """No total timeout: a "check now" waits for a test login, as it does on the daemon;
    no limit on connections: the helper's own clients are the bound."""
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=socket, limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )


async def forward_with_token(request: web.Request) -> web.StreamResponse:
    """A route that needs a token: checked here first (one read, as the daemon's first
    step), so that a caller without one is refused before its body is read."""
    await authenticate(request, host_of(request).store)
    return await forward(request)


async def forward(request: web.Request) -> web.StreamResponse:
    """The daemon's answer to ``request``; 503 if the daemon does not take it."""
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
    body = await request.read() if request.body_exists else None  # 413 past MAX_BODY
    # The path and query as sent (an absolute-form request line gives its path only).
    url = URL(f"http://mailingest{request.rel_url.raw_path_qs}", encoded=True)
    session = request.app[DAEMON]
    try:
        reply = await session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        )
    except aiohttp.ClientError:
        raise ApiError(503, "the daemon does not answer; try again") from None
    async with reply:
        request[FORWARDED] = True
        response = web.StreamResponse(status=reply.status, reason=reply.reason)
        for key, value in reply.headers.items():
            if key.lower() not in _HOP:
                response.headers.add(key, value)
        if reply.content_length is not None:
            response.content_length = reply.content_length
        await response.prepare(request)
        while True:
            try:
                chunk = await reply.content.readany()
            except aiohttp.ClientError as exc:
                # The daemon's side broke: too late for a status, the answer is cut short.
                log.error(
                    "api_request_failed", method=request.method, path=request.path, error=str(exc)
                )
                if request.transport is not None:
                    request.transport.close()
                return response
            if not chunk:
                break
            await response.write(chunk)  # a client gone raises: aiohttp ends the request
        await response.write_eof()
        return response
