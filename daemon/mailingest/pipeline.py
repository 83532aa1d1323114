"""One session's retrieval pipeline: RETR a batch in a worker thread while the previous
batch commits, so network and store work overlap; each batch is one durable transaction.

Split from the cycle (fetch.py) because its cancel and failure paths are their own
concern: a commit under way completes, a retrieval in flight is abandoned with its
session, and nothing it spooled is kept.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from mailingest.config import Account
from mailingest.crm import account_policy
from mailingest.errors import MailIngestError
from mailingest.logs import get_logger
from mailingest.model import AccountPolicy, NewMessage
from mailingest.pop3 import Pop3Session
from mailingest.progress import Tally
from mailingest.retrieval import Retrieved, Spool, retrieve_prepared
from mailingest.store import Store

log = get_logger("mailingest.fetch")


@dataclass
class SessionTally:
    """What one POP3 session did."""

    new: int = 0
    bytes: int = 0
    deleted: int = 0
    listed: int = 0  # the last session's listing


async def store_batches(
    account: Account,
    store: Store,
    session: Pop3Session,
    batches: list[list[tuple[int, str]]],
    *,
    spool_dir: Path,
    suspect: set[str],
    key_of: dict[int, str],
    result: SessionTally,
    tally: Tally | None,
    held: dict[int, int] | None = None,
) -> MailIngestError | None:
    """RETR and commit batch after batch; returns a refused message's error, if any.

    The next batch is retrieved while this one commits, so network and SQLite work overlap.
    ``key_of`` gains each committed message's ledger key: DELE only ever targets those.
    ``suspect``: UIDLs listed more than once, told apart by content.
    ``held``: oversized messages (listed sizes), whose headers alone are stored, quarantined.
    """
    policy = account_policy(account)
    refused: MailIngestError | None = None  # a message the server would not serve
    arrived = tally.hook() if tally is not None else None

    def retrieve(index: int) -> asyncio.Future[Retrieved] | None:
        if index >= len(batches):
            return None
        return asyncio.ensure_future(
            asyncio.to_thread(
                retrieve_prepared,
                account,
                session,
                batches[index],
                spool_dir,
                suspect,
                held,
                arrived,
            )
        )

    fetching = retrieve(0)
    try:
        for index in range(len(batches)):
            assert fetching is not None
            # Shielded: a cancel must not leave the worker thread running unwatched; the
            # finally below closes the session, which ends it, and discards what it spooled.
            retrieved, items, failure = await asyncio.shield(fetching)
            # The next RETRs go out now unless this batch failed (then it decides below).
            fetching = retrieve(index + 1) if failure is None else None
            await _commit(account, store, policy, retrieved, items, result)
            for num, key, _ in retrieved:
                key_of[num] = key  # committed now, or by an earlier session
            if tally is not None:
                tally.committed(result.new, result.bytes, [s.size for _, _, s in retrieved])
            if failure is not None:
                if session.broken:
                    raise failure
                # One RETR refused with a whole -ERR line: the session is in step, so the
                # others are stored and DELEted as usual; the error ends the cycle later.
                refused = refused or failure
                fetching = retrieve(index + 1)
    finally:
        if fetching is not None:
            await _abandon(session, fetching)
        if tally is not None:
            tally.drop()
    return refused


async def _abandon(session: Pop3Session, fetching: asyncio.Future[Retrieved]) -> None:
    """Leaving early (a failed commit, a cancel) with a retrieval in flight: abandon the
    session, which ends that retrieval too. Nothing it fetched is committed or DELEted, so
    it is fetched again next time."""
    session.close()
    # Its spools are discarded when it ends, even if another cancel cuts this wait short.
    fetching.add_done_callback(_discard_retrieved)
    await asyncio.wait({fetching})


def _discard_retrieved(fetching: asyncio.Future[Retrieved]) -> None:
    if fetching.cancelled() or fetching.exception() is not None:
        return  # an exception is the worker's own cleanup having run (see retrieve_spooled)
    for _, _, spool in fetching.result()[0]:
        spool.discard()


async def _commit(
    account: Account,
    store: Store,
    policy: AccountPolicy,
    retrieved: list[tuple[int, str, Spool]],
    items: list[NewMessage],
    result: SessionTally,
) -> None:
    """Commit one retrieved batch (one fsynced transaction) and count what was new."""
    try:
        # Shielded: once the commit is under way it completes even if we are cancelled,
        # and the spools it reads stay open until it has.
        commit = asyncio.ensure_future(store.add_batch(account.name, account.owner, items, policy))
        try:
            outcomes = await asyncio.shield(commit)
        except asyncio.CancelledError:
            await asyncio.wait({commit})
            raise
    finally:
        for _, _, spool in retrieved:
            spool.discard()
    # Bytes as fetched: a quarantined message's header, not the size the server listed.
    sizes_of = {key: spool.size for _, key, spool in retrieved}
    held = {item.uidl: item for item in items if item.quarantine is not None}
    for outcome in outcomes:
        if not outcome.duplicate:
            result.new += 1
            result.bytes += sizes_of[outcome.uidl]
            log.debug(
                "message_stored",
                account=account.name,
                uidl=outcome.uidl,
                size=sizes_of[outcome.uidl],
            )
            if outcome.uidl in held:
                log.warning(
                    "message_quarantined",
                    account=account.name,
                    message=outcome.message,
                    size=held[outcome.uidl].size,
                    max_message_size=account.max_message_size,
                )
