"""The owner's review of stored mail: the unmatched queue, a record made from a sender,
why a message is visible, and the audit log of sharing changes."""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass
from typing import Any

from mailingest import crm
from mailingest.commands import open_store
from mailingest.config import Config
from mailingest.errors import DataError, PermissionDenied
from mailingest.matching import domain_matches, normalize, normalize_domain
from mailingest.model import AuditEntry, Record, ShareFlag, StoredMessage, UnmatchedSender
from mailingest.sharing import may_see
from mailingest.store import Store

RECORD_KINDS = ("lead", "contact")


async def unmatched(config: Config, viewer: str) -> list[UnmatchedSender]:
    async with open_store(config) as store:
        return await store.unmatched(viewer)


@dataclass(frozen=True, slots=True)
class Created:
    record: Record
    linked: int  # stored messages linked to it now

    def to_json(self) -> dict[str, Any]:
        return {"record": self.record.to_json(), "linked": self.linked}


async def create_from(
    config: Config,
    message_id: int,
    viewer: str,
    *,
    record_id: str | None = None,
    kind: str = "lead",
    name: str | None = None,
) -> Created:
    """A record for the sender of a message ``viewer`` may see; all of that sender's
    stored mail links to it at once (and is re-tagged)."""
    async with open_store(config) as store:
        message = await store.message(message_id)
        if message is None or not may_see(viewer, message.owner, message.visibility):
            raise PermissionDenied(
                f"message {message_id} does not exist or {viewer!r} may not see it"
            )
        if message.direction != "in":
            raise DataError(
                f"message {message_id} is outgoing: its sender is the owner, not a customer"
            )
        sender = normalize(message.sender)
        if sender is None:
            raise DataError(f"message {message_id} has no usable From address")
        shown = name if name is not None else await _display_name(store, message_id)
        record = Record(record_id or sender, kind, shown, (sender,))
        linked = await store.create_record(record, crm.policies(config))
        if linked is None:
            raise DataError(
                f"record {record.id!r} exists already; use `mailingest records set-email` "
                "or choose another --id"
            )
        return Created(record, linked)


async def _display_name(store: Store, message_id: int) -> str:
    """The From header's display name, decoded, as the sender wrote it ("" when none)."""
    async for chunk in store.raw_chunks(message_id):
        head = chunk.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
        parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
        try:
            found = parsed.get("From")
            addresses = getattr(found, "addresses", ())
            return next((a.display_name.strip() for a in addresses if a.display_name), "")
        except Exception:  # a header broken beyond parsing: the name is a nicety
            return ""
    return ""


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a viewer may see a message: the rule that tagged it, with its inputs."""

    message: StoredMessage
    viewer: str
    rule: str
    mode: str | None  # None: the account is no longer configured
    excluded_domains: tuple[str, ...]
    excluded_domain: str | None  # the partner domain that matched, if one did
    shares: list[ShareFlag]
    history: list[AuditEntry]

    @property
    def why_visible(self) -> str:
        if self.viewer == self.message.owner:
            return f"{self.viewer} owns it"
        return "it is shared with every CRM user"

    def to_json(self) -> dict[str, Any]:
        m = self.message
        return {
            "id": m.id,
            "viewer": self.viewer,
            "may_see": True,
            "why": self.why_visible,
            "visibility": m.visibility,
            "reason": m.reason,
            "rule": self.rule,
            "owner": m.owner,
            "account": m.account,
            "mode": self.mode,
            "records": m.records,
            "shares": [s.to_json() for s in self.shares],
            "excluded_domains": list(self.excluded_domains),
            "excluded_domain": self.excluded_domain,
            "crm_sent": m.origin == "crm",
            "history": [h.to_json() for h in self.history],
        }


async def explain(config: Config, message_id: int, viewer: str) -> Explanation:
    """The rule behind a message's visibility, for a viewer who may see it (others learn
    nothing, as with `show`)."""
    async with open_store(config) as store:
        message = await store.message(message_id)
        if message is None or not may_see(viewer, message.owner, message.visibility):
            raise PermissionDenied(
                f"message {message_id} does not exist or {viewer!r} may not see it"
            )
        account = next((a for a in config.accounts if a.name == message.account), None)
        shares = await store.share_flags(message.owner, message.records)
        history = [
            *await store.audit(account=message.account, limit=5),
            *[
                entry
                for record in message.records
                for entry in await store.audit(owner=message.owner, record=record, limit=5)
            ],
        ]
    history.sort(key=lambda e: e.id, reverse=True)
    excluded = tuple(account.excluded_domains) if account is not None else ()
    matched = _excluded_partner(message, excluded)
    mode = account.sharing if account is not None else None
    return Explanation(
        message, viewer, _rule(message, mode, shares, excluded, matched), mode, excluded,
        matched, shares, history[:10],
    )  # fmt: skip


def _partner_domains(message: StoredMessage) -> list[str]:
    """Whom the conversation is with: the recipients of mail the owner sent, else the sender."""
    sent = message.direction == "out" or message.origin == "crm"
    found = [*message.to, *message.cc] if sent else [message.sender or ""]
    return [a.rpartition("@")[2] for a in map(normalize, found) if a]


def _excluded_partner(message: StoredMessage, excluded: tuple[str, ...]) -> str | None:
    wanted = [normalize_domain(d) or d for d in excluded]
    return next((d for d in _partner_domains(message) if domain_matches(d, wanted)), None)


def _rule(
    message: StoredMessage,
    mode: str | None,
    shares: list[ShareFlag],
    excluded: tuple[str, ...],
    matched: str | None,
) -> str:
    owner, records = message.owner, ", ".join(message.records)
    rules = {
        "unmatched": f"linked to no CRM record: private to {owner} in every sharing mode",
        "mode_private": f"account {message.account!r} is in private mode: only {owner} sees it",
        "custom_shared": f"custom mode: {owner} shared "
        + "; ".join(
            f"record {s.record}" + (f" (set by {s.set_by} at {s.set_at})" if s.set_by else "")
            for s in shares
        ),
        "custom_not_shared": f"custom mode: {owner} shares none of its records ({records})",
        "crm_sent": f"sent from the CRM by {owner} in {mode or 'a shared'} mode: "
        "shared with every CRM user",
        "public": f"public mode: shared with every CRM user; "
        f"{', '.join(_partner_domains(message)) or 'no partner domain'} is not in "
        f"excluded_domains ({', '.join(excluded) or 'none'})",
        "excluded_domain": f"public mode, but {matched or 'a partner domain'} is in "
        f"excluded_domains: private to {owner}",
    }
    return rules.get(message.reason, f"tagged {message.visibility} ({message.reason})")


async def audit(
    config: Config,
    *,
    owner: str | None = None,
    account: str | None = None,
    record: str | None = None,
    limit: int | None = None,
) -> list[AuditEntry]:
    async with open_store(config) as store:
        return await store.audit(owner=owner, account=account, record=record, limit=limit)
