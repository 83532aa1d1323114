"""`mailingest release ID`: fetch a quarantined message (over its account's size limit) in
full, under the account's lease, and replace its stored header with it.

The same invariant as a fetch: the server's copy is deleted (where the account deletes)
only after the whole message is committed.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from mailingest import signin
from mailingest.config import Account
from mailingest.errors import BusyError, DataError
from mailingest.lease import take_poll
from mailingest.logs import get_logger
from mailingest.pop3 import Pop3Session
from mailingest.retrieval import retrieve_spooled
from mailingest.store import Store

log = get_logger("mailingest.release")

#: A ledger key of a UIDL the server listed twice: the UIDL, "/", the content's SHA-256.
_SUSPECT_KEY = re.compile(r"(.+)/[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Released:
    id: int
    account: str
    size: int
    deleted: bool

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "account": self.account, "size": self.size, "deleted": self.deleted}


async def release(account: Account, store: Store, message: int) -> Released:
    claim = await take_poll(store, account.name)
    if claim.busy:
        raise BusyError(
            "busy: another process is fetching this account; try again", account=account.name
        )
    assert claim.holder is not None
    try:
        keys = await store.held_keys(account.name, message)
        if not keys:
            raise DataError(f"message {message} is not quarantined", account=account.name)
        uidls = {(m[1] if (m := _SUSPECT_KEY.fullmatch(k)) else k): k for k in keys}
        login, _ = await signin.pop3_login(account, store)
        session = Pop3Session(login)
        try:
            return await _fetch(account, store, session, message, uidls)
        finally:
            session.close()
    finally:
        await store.release_lease(account.name, claim.holder)


async def _fetch(
    account: Account, store: Store, session: Pop3Session, message: int, uidls: dict[str, str]
) -> Released:
    def find() -> int | None:
        session.connect()
        listing, _ = session.listing()
        return next((num for num, uidl in listing if uidl in uidls), None)

    num = await asyncio.to_thread(find)
    if num is None:
        raise DataError(
            f"message {message} is no longer on the server; its header stays stored",
            account=account.name,
        )
    done, error = await asyncio.to_thread(
        retrieve_spooled, session, [(num, "release")], store.spool_dir, set()
    )
    if error is not None or not done:
        for _, _, spool in done:
            spool.discard()
        raise error or DataError(f"message {message}: the server sent nothing")
    spool = done[0][2]
    try:
        stored = await store.release(
            account.name, message, spool.file, spool.size, spool.hash.hexdigest()
        )
    finally:
        spool.discard()
    deleted = not account.leave_on_server
    if deleted:
        await asyncio.to_thread(session.delete, [num])
    await asyncio.to_thread(session.quit)
    if deleted:
        await store.mark_deleted(account.name, list(uidls.values()))
    log.info("message_released", account=account.name, message=stored, size=spool.size)
    return Released(stored, account.name, spool.size, deleted)


__all__ = ["Released", "release"]
