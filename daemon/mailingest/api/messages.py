"""GET /messages, /messages/{id} and /messages/{id}/raw: what the caller may see.

A message the caller may not see is answered exactly as one that does not exist (404), as
`show` does: no probing for ids.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json

from aiohttp import web

from mailingest.api import bodies
from mailingest.api.auth import ACT_AS, bearer, caller_for, viewer_of
from mailingest.api.errors import ApiError, query_bool, query_int
from mailingest.api.host import CALLER, caller_of, host_of
from mailingest.crm import record_id_problem
from mailingest.errors import MailIngestError
from mailingest.logs import get_logger
from mailingest.model import StoredMessage
from mailingest.sharing import may_see

log = get_logger("mailingest.api")

#: Messages decoded at once (each is read whole, up to bodies.MAX_DECODED): memory bound.
DECODING = web.AppKey("decoding", asyncio.Semaphore)
DECODE_AT_ONCE = 4
PAGE_DEFAULT = 50
PAGE_MAX = 500
_FILTERS = ("record", "account", "label", "quarantined", "limit", "cursor")


async def list_messages(request: web.Request) -> web.Response:
    """Looks the caller's token up itself (app.py leaves this route out), in the same read
    as the page: the API's busiest request is one trip to the store."""
    host = host_of(request)
    hashed, act_as = bearer(request), request.headers.get(ACT_AS)
    try:
        for key in request.query:
            if key not in _FILTERS:
                allowed = ", ".join(_FILTERS)
                raise ApiError(422, f"unknown parameter; allowed: {allowed}", field=key)
        account = request.query.get("account")
        if account is not None and account not in {a.name for a in host.config.accounts}:
            raise ApiError(422, f"no account {account!r}", field="account")
        record = request.query.get("record")
        if record is not None and (problem := record_id_problem(record)) is not None:
            raise ApiError(422, problem, field="record")
        limit = query_int(request, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
        quarantined = query_bool(request, "quarantined")
        cursor = request.query.get("cursor")
        before = decode_cursor(cursor) if cursor else None
    except ApiError:
        # Who asks is answered first, as on every route: a bad token is 401, not 422.
        caller_for(await host.store.api_token(hashed), act_as)
        raise
    token, page = await host.store.messages_for(
        hashed,
        viewer_of(act_as),
        account=account,
        label=request.query.get("label"),
        record=record,
        limit=limit,
        quarantined=quarantined,
        before=before,
    )
    request[CALLER] = caller_for(token, act_as)
    # The page comes as JSON text from the store: sent as it is, not decoded and encoded.
    cursor = f'"{encode_cursor(*page.next)}"' if page.next else "null"  # base64: no escapes
    return web.Response(
        text=f'{{"messages": {page.json}, "next_cursor": {cursor}}}',
        content_type="application/json",
    )


def encode_cursor(key: str, message_id: int) -> str:
    """Opaque to the caller: where the page ended, in the listing's order."""
    raw = json.dumps([key, message_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key, message_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError, RecursionError):
        raise ApiError(422, "not a cursor this API returned", field="cursor") from None
    if (
        not isinstance(key, str)
        or "\x00" in key
        or isinstance(message_id, bool)
        or not isinstance(message_id, int)
        or not 0 <= message_id < 2**63
    ):
        raise ApiError(422, "not a cursor this API returned", field="cursor")
    return key, message_id


async def _visible(request: web.Request) -> StoredMessage:
    host, caller = host_of(request), caller_of(request)
    message_id = int(request.match_info["id"])
    message = await host.store.message(message_id) if message_id < 2**63 else None
    if message is None or not may_see(caller.user, message.owner, message.visibility):
        raise ApiError(404, f"message {message_id} does not exist or you may not see it")
    return message


async def get_message(request: web.Request) -> web.Response:
    """The `show` fields, with the body decoded: text and HTML parts, attachments."""
    message = await _visible(request)
    body: dict[str, object] = {"parts": [], "attachments": [], "body_omitted": None}
    if message.size > bodies.MAX_DECODED:
        body["body_omitted"] = f"larger than {bodies.MAX_DECODED} bytes: read /raw"
    else:
        async with request.app[DECODING]:
            chunks = [c async for c in host_of(request).store.raw_chunks(message.id)]
            body |= await asyncio.to_thread(bodies.decode, b"".join(chunks))
    return web.json_response({**message.to_json(), **body})


async def get_raw(request: web.Request) -> web.StreamResponse:
    """The exact stored bytes, streamed a chunk at a time (memory stays bounded)."""
    message = await _visible(request)
    chunks = host_of(request).store.raw_chunks(message.id)
    first = await anext(chunks, b"")  # a store error now is still a JSON answer
    # No Content-Length: a quarantined message's size is the server's listed one, but only
    # its header is stored; chunked, the answer ends where the stored bytes end.
    response = web.StreamResponse(
        headers={
            "Content-Type": "message/rfc822",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        }
    )
    await response.prepare(request)
    await response.write(first)
    try:
        async for chunk in chunks:
            await response.write(chunk)
    except MailIngestError as exc:  # too late for a status: cut the response short
        log.error("api_request_failed", method=request.method, path=request.path, error=str(exc))
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response
