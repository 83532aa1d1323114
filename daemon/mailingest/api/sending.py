"""POST /messages (send) and POST /messages/{id}/reply: mail from the CRM over SMTP, with
the CLI's rules (outgoing.py): daily limit first, stored exactly as sent, tagged crm_sent.

A user sends from their own accounts (an admin from any; another user's account is
answered as an unknown one); a reply goes out from the caller's primary account to a
message the caller may see. At most MAX_RECIPIENTS over To and Cc, a reply's included:
each is one more envelope recipient the daemon sends to."""

from __future__ import annotations

import email.utils
from typing import Any

from aiohttp import web

from mailingest import outgoing
from mailingest.api.errors import ApiError, json_object, known_keys, strings, text
from mailingest.api.host import caller_of, host_of
from mailingest.errors import (
    ConfigError,
    DataError,
    MailIngestError,
    PermissionDenied,
    StoreError,
    TemporaryError,
    UsageError,
)
from mailingest.logs import mask_text
from mailingest.matching import normalize
from mailingest.outgoing import Sent, TooManyRecipients

#: Recipients of one send or reply, To and Cc together (more: 422).
MAX_RECIPIENTS = 100


async def send(request: web.Request) -> web.Response:
    caller, host = caller_of(request), host_of(request)
    data = await json_object(request)
    known_keys(data, ("account", "to", "cc", "subject", "body"))
    name = text(data, "account")
    mine = (a for a in host.config.accounts if a.name == name and caller.may_manage(a.owner))
    if next(mine, None) is None:  # another user's account is answered as an unknown one
        raise ApiError(422, f"no account {name!r}", field="account")
    to = strings(data, "to")
    if not to:
        raise ApiError(422, "at least one recipient is needed", field="to")
    cc = strings(data, "cc") if "cc" in data else []
    if len(to) + len(cc) > MAX_RECIPIENTS:
        raise ApiError(
            422,
            f"{len(to) + len(cc)} recipients; at most {MAX_RECIPIENTS} over to and cc",
            field="to" if len(to) > MAX_RECIPIENTS else "cc",
        )
    for key, addresses in (("to", to), ("cc", cc)):
        bad = [a for a in addresses if not _one_address(a)]
        if bad:
            raise ApiError(422, f"not one address each: {', '.join(map(repr, bad))}", field=key)
    subject, body = text(data, "subject", ""), text(data, "body", "")
    if any(c in subject for c in "\r\n\x00"):
        raise ApiError(422, "a line break or NUL in the subject", field="subject")
    return await _sent(
        request,
        outgoing.send_with(host.store, host.config, name, to, cc, subject, body),
        field="to",
    )


def _one_address(entry: str) -> bool:
    """One address (with or without a display name): the header and the envelope then name
    the same recipients; no line break or control character."""
    if any(ord(c) < 32 or c in "\x7f\u2028\u2029" for c in entry):
        return False
    found = email.utils.getaddresses([entry])
    return len(found) == 1 and normalize(entry) is not None


async def reply(request: web.Request) -> web.Response:
    caller, host = caller_of(request), host_of(request)
    data = await json_object(request)
    known_keys(data, ("body", "all"))
    reply_all = data.get("all", False)
    if not isinstance(reply_all, bool):
        raise ApiError(422, "expected true or false", field="all")
    message_id = int(request.match_info["id"])
    if message_id >= 2**63:
        raise ApiError(404, f"message {message_id} does not exist or you may not see it")
    return await _sent(
        request,
        outgoing.reply_with(
            host.store,
            host.config,
            message_id,
            caller.user,
            text(data, "body", ""),
            reply_all=reply_all,
            max_recipients=MAX_RECIPIENTS,
        ),
        field="account",
        crowd="all" if reply_all else None,
    )


async def _sent(
    request: web.Request, sending: Any, *, field: str, crowd: str | None = None
) -> web.Response:
    """Await the send; count it; its errors as the API's: a refusal of the message (5xx)
    is 422 like the CLI's 65, an SMTP server unreachable or failing 502 (69), one that
    answers "try later" (4xx) or the daily limit 503 (75). A reply to too many recipients
    is bad input (422 naming ``crowd``), refused before any send, as a send's."""
    metrics = host_of(request).metrics
    try:
        sent: Sent = await sending
    except PermissionDenied as exc:
        raise ApiError(404, str(exc)) from None
    except TooManyRecipients as exc:
        raise ApiError(422, str(exc), field=crowd) from None
    except UsageError as exc:
        metrics.sent(False)
        raise ApiError(422, mask_text(str(exc)), field=field) from None
    except DataError as exc:  # the SMTP server refused the message (5xx), as the CLI's 65
        metrics.sent(False)
        raise ApiError(422, mask_text(str(exc))) from None
    except ConfigError as exc:
        metrics.sent(False)
        raise ApiError(422, f"this account cannot send: {exc}", field="account") from None
    except (TemporaryError, StoreError) as exc:
        metrics.sent(False)
        raise ApiError(503, mask_text(str(exc))) from None
    except MailIngestError as exc:  # its server's words quoted: masked as `check` does
        metrics.sent(False)
        raise ApiError(502, mask_text(f"the SMTP server: {exc}")) from None
    metrics.sent(True)
    return web.json_response(sent.to_json())
