"""The store: the only place with SQL. One interface, backends behind it.

``Store`` is the port the rest of mailingest uses; its parts (``ingest``, ``records``,
``state``, ``read``) hold the SQL by concern and never import each other. Every public method
runs in one ``read``, ``write`` or ``snapshot`` block of the backend, which maps driver errors
to ``StoreError`` in one place; a method that needs two parts in one snapshot composes them
here.
"""

from __future__ import annotations

import contextlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from datetime import datetime
from pathlib import Path
from typing import IO

from mailingest.model import (
    AccountPolicy,
    AccountState,
    ApiToken,
    AuditEntry,
    Claim,
    LedgerEntry,
    ListedPage,
    NewMessage,
    Record,
    SettingsChange,
    ShareFlag,
    Status,
    StoredAccount,
    StoredMessage,
    StoreObserver,
    StoreOutcome,
    UnmatchedSender,
)
from mailingest.store import (
    _audit,
    accounts,
    api_tokens,
    health,
    ingest,
    polls,
    read,
    records,
    state,
    tokens,
)
from mailingest.store._db import CHUNK, Database, Reader, now_iso
from mailingest.store._postgres import is_postgres_url, redacted
from mailingest.store._sqlite import BUSY_TIMEOUT_MS, SqliteDatabase


class Store:
    """An open store. Writes that must be atomic are single methods, one transaction each."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._polls: polls.PollBatches | None = None

    def __repr__(self) -> str:
        return f"<Store {self._db!r}>"

    @classmethod
    async def open(cls, database: Path | str, *, password: str | None = None) -> Store:
        """Open (and create or migrate) the store: a SQLite file, or a ``postgresql://`` URL
        (``password`` for it, if not given another way). Raises StoreError naming the cause."""
        if is_postgres_url(database):
            import tempfile

            from mailingest.store._postgres import PostgresDatabase

            spool = Path(tempfile.gettempdir())
            return cls(await PostgresDatabase.open(str(database), password, spool))
        return cls(await SqliteDatabase.open(Path(database)))

    async def close(self) -> None:
        if self._polls is not None:
            await self._polls.drain()
        await self._db.close()

    def batch_polls(self, window: float, most: int) -> None:
        """Claims and records of polls that come within ``window`` s of each other go out
        in one statement each, at once when ``most`` wait (polls.py: a daemon's many
        accounts; ``most``: its polls at once). ``most`` 0: each at once from now on."""
        if self._polls is None:
            self._polls = polls.PollBatches(self._db, window, most)
        self._polls.window, self._polls.most = window, most
        self._polls.flush()  # what waits under the old window goes now

    @property
    def spool_dir(self) -> Path:
        """Where a fetch spools messages before they are stored."""
        return self._db.spool_dir

    @property
    def observer(self) -> StoreObserver | None:
        return self._db.observer

    @observer.setter
    def observer(self, observer: StoreObserver | None) -> None:
        """Hears commit durations and lease takeovers (the daemon's metrics)."""
        self._db.observer = observer

    def exclusive(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Held by one process at a time (e.g. one sender per account); dropped if it dies."""
        return self._db.exclusive(name)

    # -- ingestion -------------------------------------------------------------------------------

    async def ledger(self, account: str) -> dict[str, LedgerEntry]:
        return await ingest.ledger(self._db, account)

    async def add_batch(
        self, account: str, owner: str, items: Sequence[NewMessage], policy: AccountPolicy
    ) -> list[StoreOutcome]:
        return await ingest.add_batch(self._db, account, owner, items, policy)

    async def mark_deleted(self, account: str, uidls: Iterable[str]) -> None:
        await ingest.mark_deleted(self._db, account, uidls)

    async def held_keys(self, account: str, message: int) -> list[str]:
        return await ingest.held_keys(self._db, account, message)

    async def release(
        self, account: str, message: int, spool: IO[bytes], size: int, sha256: str
    ) -> int:
        return await ingest.release(self._db, account, message, spool, size, sha256)

    # -- CRM records, links and re-tagging -------------------------------------------------------

    async def records(self) -> list[Record]:
        return await records.records(self._db)

    async def import_records(
        self, found: Sequence[Record], policies: dict[str, AccountPolicy]
    ) -> int:
        return await records.import_records(self._db, found, policies)

    async def create_record(self, record: Record, policies: dict[str, AccountPolicy]) -> int | None:
        return await records.create_record(self._db, record, policies)

    async def set_record_emails(
        self, record: str, emails: Sequence[str], policies: dict[str, AccountPolicy]
    ) -> bool:
        return await records.set_record_emails(self._db, record, emails, policies)

    async def set_share(
        self,
        owner: str,
        record: str,
        on: bool,
        policies: dict[str, AccountPolicy],
        *,
        actor: str = "mailingest",
    ) -> bool:
        return await records.set_share(self._db, owner, record, on, policies, actor)

    async def delete_record(
        self, record: str, policies: dict[str, AccountPolicy], *, actor: str = "mailingest"
    ) -> bool:
        return await records.delete_record(self._db, record, policies, actor)

    async def retag_changed(
        self,
        snapshots: dict[str, str],
        policies: dict[str, AccountPolicy],
        force: Collection[str] = (),
        *,
        actor: str = "mailingest",
        actors: Mapping[str, str] | None = None,
    ) -> list[str]:
        return await records.retag_changed(
            self._db, snapshots, policies, force, actor, actors or {}
        )

    async def audit(
        self,
        *,
        owner: str | None = None,
        account: str | None = None,
        record: str | None = None,
        limit: int | None = None,
    ) -> list[AuditEntry]:
        return await _audit.entries(
            self._db, owner=owner, account=account, record=record, limit=limit
        )

    async def share_flags(self, owner: str, records: Sequence[str]) -> list[ShareFlag]:
        return await _audit.share_flags(self._db, owner, records)

    # -- leases, login pacing, account state -----------------------------------------------------

    async def take_poll(
        self,
        account: str,
        holder: str,
        ttl: float,
        *,
        due: tuple[datetime, datetime] | None = None,
        force: bool = False,
        stale: str | None = None,
    ) -> Claim:
        if self._polls is not None and due is not None and not (force or stale):
            at, until = due
            row = polls.ClaimRow(account, holder, ttl, state.iso(at), state.iso(until))
            done = await self._polls.claim(row)
            if done.done:
                return Claim(taken=True, holder=holder, next_login=done.next_login)
        claim = await state.take_poll(
            self._db, account, holder, ttl, due=due, force=force, stale=stale
        )
        if claim.took_over and self._db.observer is not None:
            self._db.observer.lease_taken_over(account)
        return claim

    async def overdue(self, before: datetime, limit: int) -> list[tuple[str, str | None]]:
        return await state.overdue(self._db, before, limit)

    async def renew_lease(self, account: str, holder: str, ttl: float) -> None:
        await state.renew_lease(self._db, account, holder, ttl)

    async def release_lease(self, account: str, holder: str) -> None:
        await state.release_lease(self._db, account, holder)

    async def next_login(self, account: str) -> datetime | None:
        return await state.next_login(self._db, account)

    async def set_next_login(self, account: str, when: datetime | None) -> None:
        await state.set_next_login(self._db, account, when)

    async def record_poll(
        self,
        account: str,
        owner: str,
        *,
        result: Status,
        error: str | None,
        new: int,
        holder: str | None = None,
    ) -> str | None:
        if self._polls is not None:
            failed = result is not Status.OK
            row = polls.RecordRow(
                account, owner, now_iso(), str(result), error, new, failed, holder
            )
            done = await self._polls.record(row)
            if done.done:
                return done.next_login
        return await state.record_poll(
            self._db, account, owner, result=result, error=error, new=new, holder=holder
        )

    async def account_states(self, *, counts: bool = True) -> dict[str, AccountState]:
        return await state.account_states(self._db, counts=counts)

    async def count_sent_since(self, account: str, since: str) -> int:
        return await state.count_sent_since(self._db, account, since)

    async def stored_count(self, account: str) -> int:
        return await state.stored_count(self._db, account)

    async def set_paused(self, account: str, reason: str, key: str | None) -> None:
        await state.set_paused(self._db, account, reason, key)

    async def clear_pause(self, account: str) -> None:
        await state.clear_pause(self._db, account)

    async def pause_key(self, account: str) -> str | None:
        return await state.pause_key(self._db, account)

    async def set_next_polls(
        self, when: dict[str, datetime | None], *, seen: dict[str, str | None] | None = None
    ) -> None:
        await state.set_next_polls(self._db, when, seen=seen)

    # -- accounts kept in the database -------------------------------------------------------

    async def stored_accounts(self) -> tuple[int, list[StoredAccount]]:
        return await accounts.stored_accounts(self._db)

    def account_changes(self, every: float) -> AsyncGenerator[None, None]:
        """Yields when the stored accounts may have changed (then read accounts_version)."""
        return self._db.changes("mailingest_accounts", every)

    async def accounts_version(self) -> int:
        return await accounts.accounts_version(self._db)

    async def add_account(
        self, account: StoredAccount, change: SettingsChange | None = None
    ) -> bool:
        return await accounts.add_account(self._db, account, change)

    async def update_account(
        self, account: StoredAccount, change: SettingsChange | None = None
    ) -> bool:
        return await accounts.update_account(self._db, account, change)

    async def remove_account(self, name: str) -> bool:
        return await accounts.remove_account(self._db, name)

    # -- OAuth2 refresh tokens ----------------------------------------------------------------

    async def rotated_token(self, account: str, service: str, origin: str) -> str | None:
        return await tokens.rotated_token(self._db, account, service, origin)

    async def save_rotated_token(
        self, account: str, service: str, origin: str, sealed: str
    ) -> None:
        await tokens.save_rotated_token(self._db, account, service, origin, sealed)

    # -- HTTP API tokens, health --------------------------------------------------------------

    async def add_api_token(
        self, user: str, token_hash: str, *, admin: bool, act_for: bool, label: str = ""
    ) -> ApiToken:
        return await api_tokens.add_api_token(
            self._db, user, token_hash, admin=admin, act_for=act_for, label=label
        )

    async def api_token(self, token_hash: str) -> ApiToken | None:
        return await api_tokens.api_token(self._db, token_hash)

    async def api_tokens(self) -> list[ApiToken]:
        return await api_tokens.api_tokens(self._db)

    async def revoke_api_token(self, token_id: int) -> bool:
        return await api_tokens.revoke_api_token(self._db, token_id)

    async def check_reachable(self) -> None:
        await health.check_reachable(self._db)

    async def check_writable(self) -> None:
        await health.check_writable(self._db)

    # -- reading -------------------------------------------------------------------------------

    async def messages(
        self,
        viewer: str,
        *,
        account: str | None = None,
        label: str | None = None,
        record: str | None = None,
        limit: int | None = None,
        quarantined: bool = False,
        before: tuple[str, int] | None = None,
    ) -> list[StoredMessage]:
        listing = read.Listing(account, label, record, limit, quarantined, before)
        return await read.messages(self._db, viewer, listing)

    async def messages_for(
        self,
        token_hash: str,
        viewer_of: Callable[[ApiToken], str | None],
        *,
        account: str | None = None,
        label: str | None = None,
        record: str | None = None,
        limit: int | None = None,
        quarantined: bool = False,
        before: tuple[str, int] | None = None,
    ) -> tuple[ApiToken | None, ListedPage]:
        """The API token whose SHA-256 is ``token_hash`` and ``messages`` as the viewer
        ``viewer_of`` names for it, as JSON text, in one read (the API's hot path: one trip
        to the database). No token, or no viewer (the token may not ask this), reads no
        messages. ``viewer_of`` may run in a reader thread, and twice: it must only decide."""
        listing = read.Listing(account, label, record, limit, quarantined, before)

        def token_and_page(reader: Reader) -> tuple[ApiToken | None, ListedPage]:
            token = api_tokens.lookup(reader, token_hash=token_hash)
            viewer = viewer_of(token) if token is not None else None
            if viewer is None:
                return token, ListedPage("[]", 0, None)
            return token, read.page_json(reader, viewer=viewer, listing=listing)

        return await self._db.snapshot("reading messages", token_and_page)

    async def unmatched(self, owner: str) -> list[UnmatchedSender]:
        return await read.unmatched(self._db, owner)

    async def message(self, message_id: int) -> StoredMessage | None:
        return await read.message(self._db, message_id)

    def raw_chunks(self, message_id: int) -> AsyncIterator[bytes]:
        return read.raw_chunks(self._db, message_id)


__all__ = ["BUSY_TIMEOUT_MS", "CHUNK", "Store", "is_postgres_url", "redacted"]
