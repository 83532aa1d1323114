"""A helper process's way to the daemon: a request it does not answer itself goes, as it
came (method, path and query byte for byte, headers, body), over the daemon's private Unix
socket, and the daemon's answer comes back as the daemon sent it. The daemon checks the
token and counts the answer in its /metrics; the helper adds nothing."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from yarl import URL

from mailingest.api.errors import ApiError

#: The daemon's client session (a Unix connector to its socket), in the helper's app.
DAEMON = web.AppKey("daemon", aiohttp.ClientSession)
#: Set on a request the daemon answered: the helper does not count it again.
FORWARDED = "forwarded"

#: Connection-level headers (RFC 9110, 7.6.1) and what aiohttp sets itself on each hop.
_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
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
    """No total timeout: a "check now" waits for a test login, as it does on the daemon."""
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=socket),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )


async def forward(request: web.Request) -> web.StreamResponse:
    """The daemon's answer to ``request``; 503 if the daemon does not take it."""
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
    body = await request.read() if request.body_exists else None  # 413 past MAX_BODY
    url = URL(f"http://mailingest{request.raw_path}", encoded=True)
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
        try:
            async for chunk in reply.content.iter_any():
                await response.write(chunk)
        except aiohttp.ClientError as exc:
            # The answer has begun: no error can be sent now, only the connection cut.
            raise ConnectionResetError(f"the daemon's answer broke off: {exc}") from exc
        await response.write_eof()
        return response
