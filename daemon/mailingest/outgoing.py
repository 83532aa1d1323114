"""`send` and `reply`: mail from the CRM, sent over SMTP and stored exactly as sent.

Order matters: the daily limit is checked first (nothing sent at the limit), then the
message is sent, and only a sent message is stored, linked and tagged (``crm_sent``).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from mailingest import crm, signin, smtp
from mailingest.commands import open_store
from mailingest.config import Account, Config
from mailingest.errors import ConfigError, DataError, PermissionDenied, TemporaryError, UsageError
from mailingest.matching import normalize, normalize_all
from mailingest.model import Headers, NewMessage
from mailingest.parse import parse_headers, read_head
from mailingest.sharing import may_see
from mailingest.store import Store

_RE = re.compile(r"^\s*(re|aw|sv)\s*:", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Sent:
    id: int
    message_id: str
    account: str
    visibility: str
    reason: str
    refused: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "message_id": self.message_id,
            "account": self.account,
            "visibility": self.visibility,
            "reason": self.reason,
            "refused": list(self.refused),
        }


class TooManyRecipients(UsageError):
    """A reply would go to more recipients than the caller allows (the API's limit)."""


def reply_subject(subject: str | None) -> str:
    """``Re: subject``, without stacking a second ``Re:`` on one already there."""
    subject = (subject or "").strip()
    return subject if _RE.match(subject) else f"Re: {subject}".rstrip()


def sending_account(config: Config, owner: str) -> Account:
    """The owner's primary account, else their only one."""
    mine = [a for a in config.accounts if a.owner == owner]
    primary = [a for a in mine if a.primary]
    if primary:
        return primary[0]
    if len(mine) == 1:
        return mine[0]
    if not mine:
        raise UsageError(f"user {owner!r} has no account to send from")
    names = ", ".join(a.name for a in mine)
    raise UsageError(f"user {owner!r} has several accounts ({names}); mark one with primary = true")


def _check_addresses(addresses: Sequence[str], what: str) -> None:
    bad = [a for a in addresses if normalize(a) is None]
    if bad:
        raise UsageError(f"not an address in {what}: {', '.join(map(repr, bad))}")


async def _within_limit(store: Store, account: Account) -> None:
    assert account.smtp is not None
    limit = account.smtp.daily_limit
    if not limit:
        return
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    sent = await store.count_sent_since(account.name, midnight.isoformat(timespec="seconds"))
    if sent >= limit:
        reset = (midnight + timedelta(days=1)).isoformat(timespec="seconds")
        raise TemporaryError(
            f"daily limit of {limit} messages reached ({sent} sent today); resets at {reset}",
            account=account.name,
        )


async def _send_and_store(
    store: Store,
    account: Account,
    *,
    to: Sequence[str],
    cc: Sequence[str],
    subject: str,
    body: str,
    in_reply_to: str | None = None,
    references: str | None = None,
) -> Sent:
    if account.smtp is None:
        raise ConfigError(f"account {account.name!r} has no [accounts.smtp] table: it cannot send")
    if not account.smtp.daily_limit:
        return await _build_send_store(
            store, account, to, cc, subject, body, in_reply_to, references
        )
    # Count, send and store as one step per account, across processes: two sends at the
    # limit must not both see room for one more.
    async with store.exclusive(f"send:{account.name}"):
        await _within_limit(store, account)
        return await _build_send_store(
            store, account, to, cc, subject, body, in_reply_to, references
        )


async def _build_send_store(
    store: Store,
    account: Account,
    to: Sequence[str],
    cc: Sequence[str],
    subject: str,
    body: str,
    in_reply_to: str | None,
    references: str | None,
) -> Sent:
    assert account.smtp is not None
    data, message_id = smtp.build_message(
        account,
        to=to,
        cc=cc,
        subject=subject,
        body=body,
        in_reply_to=in_reply_to,
        references=references,
    )
    token = None
    if account.smtp.auth is not None:  # OAuth2: a fresh access token before connecting
        token = await signin.smtp_token(account.smtp, account.name, store)
    refused = await smtp.send(
        account.smtp, account.name, smtp.from_address(account), [*to, *cc], data, token
    )
    headers = parse_headers(read_head(io.BytesIO(data)))
    item = NewMessage(
        uidl=f"crm:{message_id}",
        spool=io.BytesIO(data),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        headers=headers,
        direction="out",
        senders=normalize_all(headers.from_addrs),
        recipients_to=normalize_all(headers.to),
        recipients_cc=normalize_all(headers.cc),
        link=normalize_all((*headers.to, *headers.cc)),
        origin="crm",
    )
    [outcome] = await store.add_batch(
        account.name, account.owner, [item], crm.account_policy(account)
    )
    assert outcome.message is not None
    stored = await store.message(outcome.message)
    assert stored is not None
    return Sent(
        stored.id, message_id, account.name, stored.visibility, stored.reason, tuple(refused)
    )


async def send(
    config: Config, account_name: str, to: Sequence[str], cc: Sequence[str], subject: str, body: str
) -> Sent:
    async with open_store(config) as store:
        return await send_with(store, config, account_name, to, cc, subject, body)


async def send_with(
    store: Store,
    config: Config,
    account_name: str,
    to: Sequence[str],
    cc: Sequence[str],
    subject: str,
    body: str,
) -> Sent:
    """`send` on an open store (the daemon's, for the API)."""
    account = next((a for a in config.accounts if a.name == account_name), None)
    if account is None:
        raise UsageError(f"unknown account {account_name!r}")
    if not to:
        raise UsageError("at least one --to address is needed")
    _check_addresses([*to, *cc], "--to/--cc")
    return await _send_and_store(store, account, to=to, cc=cc, subject=subject, body=body)


async def reply(
    config: Config, message_id: int, viewer: str, body: str, *, reply_all: bool = False
) -> Sent:
    async with open_store(config) as store:
        return await reply_with(store, config, message_id, viewer, body, reply_all=reply_all)


async def reply_with(
    store: Store,
    config: Config,
    message_id: int,
    viewer: str,
    body: str,
    *,
    reply_all: bool = False,
    max_recipients: int | None = None,
) -> Sent:
    """`reply` on an open store (the daemon's, for the API, which passes its limit of
    recipients: the original's headers may name any number)."""
    original = await store.message(message_id)
    if original is None or not may_see(viewer, original.owner, original.visibility):
        raise PermissionDenied(f"message {message_id} does not exist or {viewer!r} may not see it")
    account = sending_account(config, viewer)
    head = b""
    async for chunk in store.raw_chunks(message_id):
        head = chunk
        break
    headers = parse_headers(read_head(io.BytesIO(head)))
    to, cc = recipients(headers, own_addresses(config, viewer), reply_all=reply_all)
    if not to:
        raise DataError(f"message {message_id} has neither Reply-To nor From to reply to")
    if max_recipients is not None and len(to) + len(cc) > max_recipients:
        raise TooManyRecipients(
            f"the reply would go to {len(to) + len(cc)} recipients; at most {max_recipients}"
        )
    return await _send_and_store(
        store,
        account,
        to=to,
        cc=cc,
        subject=reply_subject(headers.subject),
        body=body,
        in_reply_to=headers.message_id,
        references=headers.references,
    )


def own_addresses(config: Config, user: str) -> set[str]:
    """Every address ``user`` sends as, over all their accounts."""
    found: set[str] = set()
    for account in config.accounts:
        if account.owner == user:
            found.update(n for a in account.addresses if (n := normalize(a)) is not None)
    return found


def recipients(
    headers: Headers, own: set[str], *, reply_all: bool = False
) -> tuple[list[str], list[str]]:
    """(To, Cc) of a reply, as mail clients choose them. To your own message: its original
    To (a follow-up, not a note to yourself); to anyone else's: Reply-To, else From. With
    ``reply_all``, the other recipients go in Cc; never your own addresses, never twice."""
    senders = {normalize(a) for a in headers.from_addrs}
    mine = bool(senders) and senders <= own
    to = list(headers.to if mine else (headers.reply_to or headers.from_addrs))
    others = headers.cc if mine else (*headers.to, *headers.cc)
    cc: list[str] = []
    if reply_all:
        seen = {normalize(a) for a in to} | own
        for address in others:
            normal = normalize(address)
            if normal is not None and normal not in seen:
                seen.add(normal)
                cc.append(address)
    return to, cc
