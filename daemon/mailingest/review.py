"""The owner's review of stored mail: the unmatched queue, and a record made from a sender."""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass
from typing import Any

from mailingest import crm
from mailingest.commands import open_store
from mailingest.config import Config
from mailingest.errors import DataError, PermissionDenied
from mailingest.matching import normalize
from mailingest.model import Record, UnmatchedSender
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
