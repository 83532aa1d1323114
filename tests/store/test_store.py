"""The store's own behaviour, on both backends (the ``store`` fixture runs each test twice)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailingest.errors import StoreError
from mailingest.model import AccountPolicy, Facts, Headers, NewMessage, Record, StoredAccount
from mailingest.store import CHUNK, Store
from mailingest.store import _listed as listed
from mailingest.store import _sqlite as sqlite_backend
from mailingest.store._db import Fetch, Plan, Reader
from mailingest.store._listed import POSTGRES_LISTED, SQLITE_LISTED
from mailingest.store._schema import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS, statements
from mailingest.store._sqlite import SqliteDatabase
from support import StoreAt, run_sql

#: A bound on any one wait here (never a benchmark).
WAIT_S = 30.0
POLICY = AccountPolicy(tagger=lambda facts: ("private", "unmatched"))


def item(uidl: str, raw: bytes) -> NewMessage:
    return NewMessage(
        uidl=uidl,
        spool=io.BytesIO(raw),
        size=len(raw),
        sha256=hashlib.sha256(raw).hexdigest(),
        headers=Headers(subject=uidl),
        direction="in",
    )


async def raw(store: Store, message: int) -> bytes:
    return b"".join([chunk async for chunk in store.raw_chunks(message)])


async def test_a_batch_of_small_and_multi_chunk_messages_is_stored_byte_exact(
    store: Store,
) -> None:
    big = bytes(range(256)) * (9 * CHUNK // 256) + b"tail\r\n"  # ten chunks, the last short
    raws = [b"Subject: a\r\n\r\none\r\n", big, b"", b"Subject: c\r\n\r\n" + b"x" * CHUNK]
    outcomes = await store.add_batch(
        "acct", "alice", [item(f"u{n}", r) for n, r in enumerate(raws)], POLICY
    )
    assert [o.duplicate for o in outcomes] == [False] * 4
    for outcome, expected in zip(outcomes, raws, strict=True):
        assert outcome.message is not None
        assert await raw(store, outcome.message) == expected
    assert sorted(m.size for m in await store.messages("alice")) == sorted(map(len, raws))


class _BrokenSpool(io.BytesIO):
    """A spool whose disk fails once its message row is in: after the first statements."""

    def read(self, size: int | None = -1, /) -> bytes:
        raise OSError(5, "Input/output error")


async def test_a_batch_that_fails_midway_stores_nothing_and_the_next_one_goes_in(
    store: Store,
) -> None:
    """A batch is one plan of statements: SQLite runs it whole in its thread (one trip),
    PostgreSQL a statement a round trip; either way all of it or nothing."""
    await _fail_midway_then_store(store)


async def test_sqlite_runs_a_plan_a_statement_a_trip_where_aiosqlite_cannot_run_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiosqlite runs a function in its thread only through private names: if they go, a
    # batch is still stored whole or not at all.
    monkeypatch.setattr(sqlite_backend, "thread_runner", lambda db: None)
    store = await Store.open(tmp_path / "mail.db")
    try:
        await _fail_midway_then_store(store)
    finally:
        await store.close()


def _open_at_once(path: Path, start: threading.Barrier, failures: list[str]) -> None:
    """In a thread of its own (its own loop): open the store when the others do."""

    async def opening() -> None:
        start.wait(WAIT_S)
        try:
            store = await Store.open(path)
        except StoreError as exc:
            failures.append(str(exc))
            return
        await store.close()

    asyncio.run(opening())


def test_a_new_sqlite_file_opened_by_several_connections_at_once_opens_for_all(
    tmp_path: Path,
) -> None:
    """Two connections switching a new file to WAL at once: SQLite refuses one at once
    ("database is locked") instead of waiting; the open tries again. Before it did, about
    one round in thirty failed here."""
    failures: list[str] = []
    for round_ in range(100):  # bounded: a few seconds
        start = threading.Barrier(6)
        path = tmp_path / f"r{round_}" / "mail.db"
        threads = [
            threading.Thread(target=_open_at_once, args=(path, start, failures)) for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
            assert not thread.is_alive(), f"an open still waits after {WAIT_S:.0f}s"
        assert failures == [], (round_, failures)


async def _fail_midway_then_store(store: Store) -> None:
    broken = dataclasses.replace(item("u2", b"two"), spool=_BrokenSpool())
    with pytest.raises(OSError, match="Input/output"):
        await store.add_batch("acct", "alice", [item("u1", b"one"), broken], POLICY)
    assert await store.ledger("acct") == {} and await store.messages("alice") == []
    outcomes = await store.add_batch("acct", "alice", [item("u1", b"one")], POLICY)
    assert [o.uidl for o in outcomes] == ["u1"] and set(await store.ledger("acct")) == {"u1"}
    assert outcomes[0].message is not None and await raw(store, outcomes[0].message) == b"one"


async def test_a_uidl_stored_once_and_renumbered_content_only_gets_a_ledger_row(
    store: Store,
) -> None:
    first = await store.add_batch("acct", "alice", [item("u1", b"A"), item("u1", b"A")], POLICY)
    assert len(first) == 1 and not first[0].duplicate
    again = await store.add_batch("acct", "alice", [item("u1", b"A"), item("u9", b"A")], POLICY)
    assert [(o.uidl, o.message, o.duplicate) for o in again] == [("u9", first[0].message, True)]
    assert set(await store.ledger("acct")) == {"u1", "u9"}
    assert len(await store.messages("alice")) == 1


async def test_a_quarantined_header_is_held_then_released_whole_or_merged(store: Store) -> None:
    head = b"Subject: big\r\n\r\n"
    held = dataclasses.replace(item("u1", head), size=10**9, quarantine="over the limit")
    outcome, _ = await store.add_batch("acct", "alice", [held, item("u2", b"same")], POLICY)
    assert outcome.message is not None
    ledger = await store.ledger("acct")
    assert (ledger["u1"].held, ledger["u2"].held) == (True, False)
    [shown] = await store.messages("alice", quarantined=True)
    assert (shown.id, shown.size, shown.quarantine_reason) == (
        outcome.message,
        10**9,
        "over the limit",
    )
    assert await store.held_keys("acct", outcome.message) == ["u1"]
    whole = head + b"body\r\n"
    sha = hashlib.sha256(whole).hexdigest()
    assert await store.release("acct", outcome.message, io.BytesIO(whole), len(whole), sha) == (
        outcome.message
    )
    assert await raw(store, outcome.message) == whole
    assert not (await store.ledger("acct"))["u1"].held
    assert await store.messages("alice", quarantined=True) == []
    assert await store.held_keys("acct", outcome.message) == []
    # A header whose whole message turns out to be stored already: the ledger moves there.
    [again] = await store.add_batch(
        "acct",
        "alice",
        [dataclasses.replace(item("u3", b"Subject: x\r\n\r\n"), quarantine="r")],
        POLICY,
    )
    same = hashlib.sha256(b"same").hexdigest()
    stored = (await store.ledger("acct"))["u2"].message
    assert again.message is not None
    assert await store.release("acct", again.message, io.BytesIO(b"same"), 4, same) == stored
    assert (await store.ledger("acct"))["u3"].message == stored
    assert await store.message(again.message) is None


async def test_a_poll_is_claimed_once_until_it_is_due_again(store: Store) -> None:
    now = datetime.now(UTC)
    later = now + timedelta(minutes=5)
    first = await store.take_poll("acct", "h1", 60, due=(now, later))
    assert (first.taken, first.holder, first.busy) == (True, "h1", False)
    await store.record_poll("acct", "alice", result="ok", error=None, new=0, holder="h1")
    lost = await store.take_poll("acct", "h2", 60, due=(now, later))
    assert not lost.taken and not lost.busy
    assert lost.next_poll == later.isoformat(timespec="seconds")
    assert (await store.take_poll("acct", "h2", 60, due=(now, later), force=True)).taken
    await store.release_lease("acct", "h2")
    assert (await store.take_poll("acct", "h3", 60, due=(later, later))).taken
    await store.release_lease("acct", "h3")
    await store.set_paused("acct", "auth_failed", "key")
    paused = await store.take_poll("acct", "h4", 60, due=(later, later), force=True)
    assert (paused.taken, paused.paused, paused.pause_key) == (False, True, "key")
    # A one-shot fetch takes the lease of a paused account (it decides for itself).
    assert (await store.take_poll("acct", "h4", 60)).taken


async def test_a_daemon_starting_never_moves_back_a_next_poll_another_one_claimed(
    store: Store,
) -> None:
    """A starting daemon plans its first polls from the states it read; a poll claimed
    since (next poll an interval ahead) keeps its next poll, or it was polled twice."""
    now = datetime.now(UTC)
    soon, later = now + timedelta(seconds=2), now + timedelta(minutes=5)
    seen: dict[str, str | None] = {"acct": None, "new": None}  # read: neither has a state
    assert (await store.take_poll("acct", "h1", 60, due=(now, later))).taken  # another daemon
    await store.set_next_polls({"acct": soon, "new": soon}, seen=seen)
    states = await store.account_states()
    assert states["acct"].next_poll == later.isoformat(timespec="seconds")
    assert states["new"].next_poll == soon.isoformat(timespec="seconds")
    assert not (await store.take_poll("acct", "h2", 60, due=(soon, later))).taken
    # A plan made from what the store holds now is written.
    await store.set_next_polls({"acct": soon}, seen={"acct": states["acct"].next_poll})
    assert (await store.account_states())["acct"].next_poll == soon.isoformat(timespec="seconds")


async def test_a_lease_claim_cancelled_before_it_commits_leaves_no_lease_nor_a_moved_poll(
    store: Store, store_at: StoreAt
) -> None:
    """A daemon stopping cancels a runner that is still claiming its poll: the claim must
    leave nothing behind (a lease nobody releases, a next poll an interval ahead)."""
    now = datetime.now(UTC)
    later = now + timedelta(minutes=5)
    with store_at.write_locked():  # another process writes: the claim waits for it
        claim = asyncio.create_task(store.take_poll("acct", "h1", 60, due=(now, later)))
        await asyncio.sleep(0.2)
        claim.cancel()
        await asyncio.sleep(0.2)  # the cancel is seen while the claim still waits
    with pytest.raises(asyncio.CancelledError):
        await claim
    assert (await store.take_poll("acct", "h2", 60, due=(now, later))).taken
    # The store is usable, and durable writes are fsynced as before (SQLite: the level the
    # cancelled claim set is not taken for the one the next transaction needs).
    await store.record_poll("acct", "alice", result="ok", error=None, new=0, holder="h2")
    assert (await store.take_poll("acct", "h3", 60)).taken  # released by the record


async def test_a_lease_is_held_by_one_holder_until_released_expired_or_its_holder_is_dead(
    store: Store,
) -> None:
    await store.set_next_login("acct", datetime(2030, 1, 1, 0, 0, 0, 5, tzinfo=UTC))
    taken = await store.take_poll("acct", "h1", 60)
    assert (taken.taken, taken.next_login) == (True, "2030-01-01T00:00:01+00:00")
    busy = await store.take_poll("acct", "h2", 60, due=(datetime.now(UTC), datetime.now(UTC)))
    assert (busy.taken, busy.busy, busy.holder) == (False, True, "h1")
    # Not taken: the scheduled poll did not move either.
    assert (await store.account_states())["acct"].next_poll is None
    assert (await store.take_poll("acct", "h2", 60, stale="h1")).taken  # h1 died
    # A record in another holder's name releases nothing; the holder's own record does.
    await store.record_poll("acct", "alice", result="ok", error=None, new=0, holder="h1")
    assert (await store.take_poll("acct", "h3", 60)).busy
    allowed = await store.record_poll("acct", "alice", result="ok", error=None, new=0, holder="h2")
    assert allowed == "2030-01-01T00:00:01+00:00"
    assert (await store.take_poll("acct", "h3", 0.0)).taken
    await asyncio.sleep(0.01)
    assert (await store.take_poll("acct", "h4", 60)).taken  # h3's lease expired


async def test_the_tagger_sees_the_same_facts_when_storing_and_re_tagging(store: Store) -> None:
    seen: list[Facts] = []

    def tagger(facts: Facts) -> tuple[str, str]:
        seen.append(facts)
        return "private", "mode_private"

    policy = AccountPolicy(tagger=tagger)
    message = NewMessage(
        uidl="u1",
        spool=io.BytesIO(b"x"),
        size=1,
        sha256=hashlib.sha256(b"x").hexdigest(),
        headers=Headers(),
        direction="out",
        senders=("me@own.example",),
        recipients_to=("a@b.example", "c@d.example"),
        recipients_cc=("e@f.example",),
    )
    await store.add_batch("acct", "alice", [message], policy)
    await store.retag_changed({"acct": "{}"}, {"acct": policy}, force=["acct"])
    assert len(seen) == 2 and seen[0] == seen[1], seen
    assert seen[0].sender_domain == "own.example"
    assert sorted(seen[0].recipient_domains) == ["b.example", "d.example", "f.example"]


async def test_share_flags_and_settings_changes_are_audited_with_their_re_tag_counts(
    store: Store,
) -> None:
    shared = AccountPolicy(
        tagger=lambda f: (
            ("shared", "custom_shared") if f.owner_shared else ("private", "custom_not_shared")
        )
    )
    linked = dataclasses.replace(item("u1", b"Subject: x\r\n\r\n"), link=("lead@x.example",))
    await store.import_records([Record("L1", "lead", "", ("lead@x.example",))], {})
    await store.add_batch("acct", "alice", [linked], shared)
    assert await store.set_share("alice", "L1", True, {"acct": shared}, actor="carol")
    assert await store.set_share("alice", "L1", True, {"acct": shared}, actor="dave")  # no change
    [flag] = await store.share_flags("alice", ["L1", "L9"])
    assert (flag.record, flag.set_by) == ("L1", "carol") and flag.set_at
    before = '{"owner": "alice", "sharing": "custom"}'
    after = '{"owner": "alice", "sharing": "private"}'
    private = AccountPolicy(tagger=lambda f: ("private", "mode_private"))
    await store.retag_changed({"acct": before}, {"acct": shared}, actor="x")  # first: no entry
    await store.retag_changed({"acct": after}, {"acct": private}, actor="erin")
    log = await store.audit()
    assert [(e.action, e.actor, e.retagged) for e in log] == [
        ("sharing_changed", "erin", 1),
        ("share", "carol", 1),
    ]
    assert log[0].detail == {"sharing": {"from": "custom", "to": "private"}}
    assert [e.action for e in await store.audit(owner="alice", record="L1")] == ["share"]
    assert await store.audit(account="other") == []


async def test_reads_of_an_unreachable_store_are_store_errors(store_at: StoreAt) -> None:
    store = await store_at.open()
    await store.close()
    if store_at.backend == "sqlite":
        with pytest.raises(ValueError):  # aiosqlite: no connection; not a database error
            await store.ledger("acct")
        return
    # PostgreSQL reconnects on the next use: the store is usable again.
    assert await store.ledger("acct") == {}
    await store.close()


async def test_a_wrong_postgresql_password_is_a_store_error_naming_the_database(
    postgres_at: StoreAt,
) -> None:
    with pytest.raises(StoreError) as info:
        await Store.open(postgres_at.database, password="not-the-password")
    text = str(info.value)
    assert "cannot connect to postgresql://mailingest@127.0.0.1" in text
    assert "not-the-password" not in text and info.value.exit_code == 75


async def test_postgresql_notifies_account_changes_to_other_connections(
    postgres_at: StoreAt,
) -> None:
    """A watcher wakes as soon as another store commits, and looks once when it starts to
    listen (for what changed before); it looks for nothing in between."""
    watcher, writer = await postgres_at.open(), await postgres_at.open()
    changes = watcher.account_changes(every=0.1)
    try:
        await asyncio.wait_for(anext(changes), 10)  # LISTEN is in place
        pending = asyncio.ensure_future(anext(changes))
        await asyncio.sleep(0.5)
        assert not pending.done()
        row = StoredAccount("mine", "alice", {"host": "h"}, password="sealed")
        assert await writer.add_account(row)
        await asyncio.wait_for(pending, 10)
        assert await watcher.accounts_version() == 1
    finally:
        await changes.aclose()
        await watcher.close()
        await writer.close()


async def test_a_dropped_postgresql_connection_is_a_store_error_then_replaced(
    postgres_at: StoreAt,
) -> None:
    """A server restart or a killed backend: the call that meets it fails typed (a temporary
    failure, the poll retries), and the next call runs on a new connection."""
    store = await postgres_at.open()
    try:
        await store.add_batch("acct", "alice", [item("u1", b"A")], POLICY)
        postgres_at.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        with pytest.raises(StoreError) as info:
            await store.ledger("acct")
        assert info.value.exit_code == 75 and info.value.transient
        assert set(await store.ledger("acct")) == {"u1"}
        outcomes = await store.add_batch("acct", "alice", [item("u2", b"B")], POLICY)
        assert [o.uidl for o in outcomes] == ["u2"]
    finally:
        await store.close()


async def test_a_rotated_oauth2_token_is_kept_per_origin(store: Store) -> None:
    assert await store.rotated_token("acct", "pop3", "o1") is None
    await store.save_rotated_token("acct", "pop3", "o1", "sealed-1")
    await store.save_rotated_token("acct", "pop3", "o1", "sealed-2")
    await store.save_rotated_token("acct", "smtp", "o1", "sealed-s")
    assert await store.rotated_token("acct", "pop3", "o1") == "sealed-2"
    assert await store.rotated_token("acct", "smtp", "o1") == "sealed-s"
    assert await store.rotated_token("acct", "pop3", "o2") is None  # signed in again since


async def test_removing_a_stored_account_forgets_its_refresh_tokens(store: Store) -> None:
    """An account added later under the same name is someone else's."""
    row = StoredAccount("acct", "alice", {"host": "h.example"}, "sealed-password")
    assert await store.add_account(row)
    await store.save_rotated_token("acct", "pop3", "o1", "sealed-1")
    assert await store.remove_account("acct")
    assert await store.rotated_token("acct", "pop3", "o1") is None


async def test_a_records_messages_come_newest_first_page_by_page_however_they_were_linked(
    store: Store,
) -> None:
    """A record's listing reads its links in their stored order (the sort key): it must be
    the order of the whole listing, for mail linked when stored and mail linked later by
    an address change, with and without a Date."""
    await store.import_records([Record("L1", "lead", "L", ("lead@x.example",))], {})
    dates = ["2026-01-03T00:00:00+00:00", None, "2026-01-01T00:00:00+00:00", None]
    dates += ["2026-01-03T00:00:00+00:00", "2026-01-02T00:00:00+00:00"]
    senders = ["lead@x.example", "other@y.example"] * 3
    batch = [
        dataclasses.replace(
            item(f"u{n}", f"m{n}".encode()),
            headers=Headers(subject=f"u{n}", date=date),
            senders=(sender,),
            link=(sender,),
        )
        for n, (date, sender) in enumerate(zip(dates, senders, strict=True))
    ]
    await store.add_batch("acct", "alice", batch, POLICY)
    # The other half is linked by an address change, after it was stored.
    await store.set_record_emails("L1", ["lead@x.example", "other@y.example"], {})
    everything = await store.messages("alice")
    listed = await store.messages("alice", record="L1")
    assert [m.id for m in listed] == [m.id for m in everything] and len(listed) == 6
    pages: list[int] = []
    before = None
    while True:
        page = await store.messages("alice", record="L1", limit=2, before=before)
        pages += [m.id for m in page]
        if len(page) < 2:
            break
        before = (page[-1].date or page[-1].received_at, page[-1].id)
    assert pages == [m.id for m in listed]


async def test_sqlite_fsyncs_mail_commits_and_lets_bookkeeping_skip_the_flush(
    tmp_path: Path,
) -> None:
    """SQLite only: PostgreSQL flushes every commit. WAL's NORMAL level survives a crash of
    the process (the kill tests), not a power cut; it is used for bookkeeping alone."""
    db = await SqliteDatabase.open(tmp_path / "mail.db")

    async def level(durable: bool) -> int:
        async with db.write("bookkeeping", durable=durable):
            row = await db.fetchone("PRAGMA synchronous")
        assert row is not None
        return int(row[0])

    def read_level() -> Plan[int]:
        rows: list[tuple[int]] = yield Fetch("PRAGMA synchronous")
        return rows[0][0]

    async def planned(durable: bool) -> int:  # a plan runs whole in SQLite's thread
        return await db.run_plan("bookkeeping", read_level(), durable=durable)

    try:
        full, normal = 2, 1
        assert await level(True) == full
        assert [await level(False), await level(False), await level(True)] == [normal] * 2 + [full]
        assert [await planned(False), await level(True), await level(False)] == [
            normal,
            full,
            normal,
        ]
        assert [await planned(True), await planned(False), await planned(True)] == [
            full,
            normal,
            full,
        ]
        # BEGIN refused (another process writes): the level is unknown, set again next time.
        await db.execute("PRAGMA busy_timeout = 50")
        with (
            StoreAt(tmp_path / "mail.db").write_locked(),
            pytest.raises(StoreError, match="locked"),
        ):
            await level(False)
        assert await level(True) == full
        with (
            StoreAt(tmp_path / "mail.db").write_locked(),
            pytest.raises(StoreError, match="locked"),
        ):
            await planned(False)
        assert await level(True) == full
    finally:
        await db.close()


@pytest.mark.parametrize("start", [1, len(SQLITE_MIGRATIONS) - 1])
async def test_an_older_sqlite_store_is_migrated_to_the_newest_schema_in_one_go(
    tmp_path: Path, start: int
) -> None:
    path = tmp_path / "mail.db"
    for number, script in enumerate(SQLITE_MIGRATIONS[:start], start=1):  # as they shipped
        for statement in script.split(";"):
            if statement.strip():
                run_sql(path, statement)
        run_sql(path, f"PRAGMA user_version = {number}")
    store = await Store.open(path)
    try:
        outcomes = await store.add_batch("acct", "alice", [item("u1", b"one")], POLICY)
        assert outcomes[0].message is not None
    finally:
        await store.close()
    assert run_sql(path, "PRAGMA user_version") == [(len(SQLITE_MIGRATIONS),)]


def listing_copies_hold(at: StoreAt) -> None:
    """What triggers keep for a record's page (migration 11) says what the tables say:
    each link's owner and visibility are its message's, each message's records and labels
    (as JSON, sorted by code point) are its links' and labels'."""
    links = at.query(
        "SELECT r.message, r.owner, r.visibility, m.owner, m.visibility"
        " FROM message_records r JOIN messages m ON m.id = r.message"
    )
    assert all(r[1:3] == r[3:5] for r in links), links
    rows = at.query("SELECT id, records_json, labels_json FROM messages")
    records = at.query("SELECT message, record FROM message_records")
    labels = at.query("SELECT message, label FROM message_labels")
    for message, records_json, labels_json in rows:
        assert json.loads(records_json) == sorted(r for m, r in records if m == message)
        assert json.loads(labels_json) == sorted(v for m, v in labels if m == message)


async def test_postgresql_compresses_raw_mail_with_lz4(postgres_at: StoreAt) -> None:
    """Raw chunks are compressed with lz4 where the server has it (this one does): pglz,
    PostgreSQL's default, cost the server five times the CPU. The mail comes back exact."""
    store = await postgres_at.open()
    try:
        text = b"Subject: repeated\r\n\r\n" + b"the same line of mail again\r\n" * 2000
        [stored] = await store.add_batch("acct", "alice", [item("u1", text)], POLICY)
        assert await raw(store, stored.message) == text
    finally:
        await store.close()
    [(method,)] = postgres_at.query(
        "SELECT attcompression FROM pg_attribute"
        " WHERE attrelid = 'message_chunks'::regclass AND attname = 'data'"
    )
    assert method == "l"
    [(compressed,)] = postgres_at.query("SELECT pg_column_compression(data) FROM message_chunks")
    assert compressed == "lz4"


async def test_links_learn_who_may_see_their_message_when_the_store_is_migrated(
    store_at: StoreAt,
) -> None:
    """Migration 11 fills what a record's page reads (links' owner and visibility,
    messages' records and labels) on a store of the schema before it."""
    if store_at.backend == "sqlite":
        scripts, done = (
            SQLITE_MIGRATIONS[: SQLITE_MIGRATIONS.index(SQLITE_LISTED)],
            "PRAGMA user_version = {number}",
        )
    else:
        scripts = POSTGRES_MIGRATIONS[: POSTGRES_MIGRATIONS.index(POSTGRES_LISTED)]
        done = "INSERT INTO schema_version (version) VALUES ({number})"
        store_at.query("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for number, script in enumerate(scripts, start=1):
        for statement in statements(script):
            store_at.query(statement)
        store_at.query(done.format(number=number))
    for message, visibility in ((1, "shared"), (2, "private")):
        store_at.query(
            "INSERT INTO messages (id, account, owner, direction, size, sha256, visibility,"
            " reason, received_at) VALUES (?, 'acct', 'alice', 'in', 1, ?, ?, 'public', ?)",
            (message, f"sha{message}", visibility, f"2026-12-0{message}T00:00:00+00:00"),
        )
        for record in ("R1", "R0", "é") if message == 1 else ("R1",):
            store_at.query(
                "INSERT INTO message_records (message, record, sort_key) VALUES (?, ?, ?)",
                (message, record, f"2026-12-0{message}T00:00:00+00:00"),
            )
    store_at.query("INSERT INTO message_labels (message, label) VALUES (1, 'b'), (1, 'B')")
    store = await store_at.open()
    try:
        assert [m.id for m in await store.messages("bob", record="R1")] == [1]
        assert [m.id for m in await store.messages("alice", record="R1")] == [2, 1]
    finally:
        await store.close()
    links = "SELECT message, owner, visibility FROM message_records WHERE record = 'R1'"
    assert sorted(store_at.query(links)) == [(1, "alice", "shared"), (2, "alice", "private")]
    lists = "SELECT records_json, labels_json FROM messages WHERE id = 1"
    [(records_json, labels_json)] = store_at.query(lists)
    assert (json.loads(records_json), json.loads(labels_json)) == (["R0", "R1", "é"], ["B", "b"])
    listing_copies_hold(store_at)


async def test_triggers_keep_the_listing_copies_through_every_change(
    store: Store, store_at: StoreAt
) -> None:
    """Links made and dropped by ingestion, record imports, address changes, share flags
    (a re-tag) and record deletion, labels by magnet and by hand: the copies a record's
    page reads follow each change."""
    custom = AccountPolicy(
        tagger=lambda f: ("shared", "custom_shared") if f.owner_shared else ("private", "x"),
        magnet_label="crm",
    )
    policies = {"acct": custom}
    await store.import_records([Record("L1", "lead", "", ("l@x.example",))], policies)
    linked = [
        dataclasses.replace(item(f"u{n}", f"m{n}".encode()), senders=(sender,), link=(sender,))
        for n, sender in enumerate(["l@x.example", "k@x.example", "l@x.example"])
    ]
    await store.add_batch("acct", "alice", linked, custom)
    listing_copies_hold(store_at)
    assert await store.messages("bob", record="L1") == []
    assert await store.set_share("alice", "L1", True, policies, actor="alice")
    listing_copies_hold(store_at)
    assert len(await store.messages("bob", record="L1")) == 2
    await store.import_records([Record("K2", "lead", "", ("k@x.example",))], policies)
    assert await store.set_record_emails("L1", ["l@x.example", "k@x.example"], policies)
    listing_copies_hold(store_at)
    assert len(await store.messages("bob", record="L1")) == 3
    store_at.query("INSERT INTO message_labels (message, label) SELECT id, 'Zz' FROM messages")
    store_at.query("DELETE FROM message_labels WHERE label = 'crm' AND message = 1")
    listing_copies_hold(store_at)
    assert await store.set_share("alice", "L1", False, policies, actor="alice")
    assert await store.delete_record("K2", policies, actor="admin")
    listing_copies_hold(store_at)
    assert await store.messages("bob", record="L1") == []
    assert await store.delete_record("L1", policies, actor="admin")
    listing_copies_hold(store_at)
    assert store_at.query("SELECT DISTINCT records_json FROM messages") == [("[]",)]


async def test_a_sqlite_read_runs_on_the_event_loop_unless_it_takes_too_long(
    tmp_path: Path,
) -> None:
    """A snapshot read is tried on the event loop's thread, stopped at its time limit and
    run again in a reader thread: same answer, the loop's connection left usable."""
    db = await SqliteDatabase.open(tmp_path / "mail.db")
    ran: list[tuple[str, object]] = []

    def read(sql: str) -> Callable[[Reader], object]:
        def run(reader: Reader) -> object:
            ran.append((threading.current_thread().name, None))
            found = reader.fetchall(sql)[0][0]
            ran[-1] = (ran[-1][0], found)
            return found

        return run

    # Seconds of SQLite work: far over the limit on any machine.
    slow = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000)"
        " SELECT sum(i) FROM n"
    )
    try:
        assert await db.snapshot("a quick read", read("SELECT 6 * 7")) == 42
        assert ran == [(threading.current_thread().name, 42)]
        ran.clear()
        assert await db.snapshot("a slow read", read(slow)) == 3000000 * 3000001 // 2
        [(first, stopped), (second, found)] = ran
        assert first == threading.current_thread().name and stopped is None
        assert second != first and found == 3000000 * 3000001 // 2
        ran.clear()
        assert await db.snapshot("a quick read again", read("SELECT 1")) == 1
        assert ran == [(threading.current_thread().name, 1)]
    finally:
        await db.close()


def _wait_for_lock_wait(at: StoreAt) -> None:
    """Until another session of this database waits for a lock (bounded)."""
    for _ in range(200):
        waiting = at.query(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting[0][0]:
            return
        time.sleep(0.05)
    raise AssertionError("the second session never waited for the first")


async def test_postgresql_sessions_changing_one_message_take_turns(postgres_at: StoreAt) -> None:
    """Two sessions at once (READ COMMITTED) linking one message, or one re-tagging it
    while the other links it: the copies a record's page reads end as the tables say."""
    import psycopg

    store = await postgres_at.open()
    try:
        [stored] = await store.add_batch("acct", "alice", [item("u1", b"one")], POLICY)
    finally:
        await store.close()
    message = stored.message

    def session() -> psycopg.Connection[Any]:
        assert isinstance(postgres_at.database, str)
        return psycopg.connect(postgres_at.database, password=postgres_at.password)

    Step = list[tuple[str, tuple[Any, ...]]]

    def link(record: str) -> Step:
        sql = "INSERT INTO message_records (message, record, sort_key) VALUES (%s, %s, 'k')"
        return [(sql, (message, record))]

    def retag(visibility: str) -> Step:
        """As the store's: the message, then its links' copy (store/_listed.py,
        LinkCopies); without the tag lock, which only a re-tag and ingestion take."""
        return [
            ("UPDATE messages SET visibility = %s WHERE id = %s", (visibility, message)),
            (
                "UPDATE message_records SET visibility = %s WHERE message = %s",
                (visibility, message),
            ),
        ]

    steps: list[tuple[Step, Step]] = [
        (link("R1"), link("R2")),  # records_json keeps both
        (retag("shared"), link("R3")),  # R3 learns "shared"
        (link("R4"), retag("private")),  # the re-tag reaches R4
    ]
    for first, second in steps:
        with session() as a, session() as b:
            for statement in first:
                a.execute(*statement)

            def then(b: psycopg.Connection[Any] = b, step: Step = second) -> None:
                for statement in step:
                    b.execute(*statement)
                b.commit()

            behind = threading.Thread(target=then)
            behind.start()
            _wait_for_lock_wait(postgres_at)
            a.commit()
            behind.join(timeout=30)
            assert not behind.is_alive()
        listing_copies_hold(postgres_at)  # after each pair: a later one would mend it


@pytest.mark.parametrize("deciding", ["settings re-tag", "ingestion"])
async def test_a_postgresql_tag_decision_never_writes_over_an_unshare_it_did_not_see(
    postgres_at: StoreAt, deciding: str
) -> None:
    """A settings re-tag (or a batch being stored) reads the sharing facts and decides;
    meanwhile the owner unshares the record in another session (READ COMMITTED). The
    unshare waits for it and re-tags after it: the mail ends private, as the facts say,
    and its links say so too (nothing decided on the old facts is written over it)."""

    def custom(reason: str) -> Callable[[Facts], tuple[str, str]]:
        return lambda f: ("shared", reason) if f.owner_shared else ("private", "not_shared")

    first_rule = AccountPolicy(tagger=custom("shared_v1"))
    store = await postgres_at.open()
    try:
        await store.import_records([Record("L1", "lead", "", ("l@x.example",))], {})
        linked = dataclasses.replace(
            item("u1", b"x"), senders=("l@x.example",), link=("l@x.example",)
        )
        await store.add_batch("acct", "alice", [linked], first_rule)
        await store.retag_changed({"acct": '{"v": 1}'}, {"acct": first_rule})
        assert await store.set_share("alice", "L1", True, {"acct": first_rule}, actor="alice")
        assert [m.id for m in await store.messages("bob", record="L1")] == [1]
    finally:
        await store.close()
    read, unshared = threading.Event(), threading.Event()

    def second_rule(facts: Facts) -> tuple[str, str]:
        read.set()  # the page is read: give the unshare time to commit in between
        unshared.wait(3)
        return custom("shared_v2")(facts)

    async def settings_change() -> None:
        store = await postgres_at.open()
        try:
            if deciding == "ingestion":
                mail = dataclasses.replace(
                    item("u2", b"y"), senders=linked.senders, link=linked.link
                )
                await store.add_batch("acct", "alice", [mail], AccountPolicy(second_rule))
            else:
                await store.retag_changed(
                    {"acct": '{"v": 2}'}, {"acct": AccountPolicy(second_rule)}
                )
        finally:
            await store.close()

    async def unshare() -> None:
        assert read.wait(30)
        store = await postgres_at.open()
        try:
            await store.set_share("alice", "L1", False, {"acct": first_rule}, actor="alice")
        finally:
            await store.close()
            unshared.set()

    sessions = [
        threading.Thread(target=asyncio.run, args=(run(),)) for run in (settings_change, unshare)
    ]
    for session in sessions:
        session.start()
    for session in sessions:
        session.join(60)
        assert not session.is_alive()
    assert postgres_at.query("SELECT owner, record FROM shares") == []
    assert set(postgres_at.query("SELECT visibility FROM messages")) == {("private",)}
    listing_copies_hold(postgres_at)
    store = await postgres_at.open()
    try:
        assert await store.messages("bob", record="L1") == []
        assert await store.messages("bob") == []
    finally:
        await store.close()


async def test_a_closed_store_reads_nothing(store_at: StoreAt) -> None:
    """Reads after close fail as the store being closed, whether or not one ran before
    (none opens a connection again)."""
    for read_before in (False, True):
        store = await store_at.open()
        if read_before:
            assert await store.messages("alice") == []
        await store.close()
        with pytest.raises(StoreError, match="closed"):
            await store.messages("alice")


async def test_a_bulk_retag_makes_the_index_of_shared_links_again(
    store: Store, store_at: StoreAt, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past a number of links whose visibility one re-tag changes, SQLite drops the index of
    shared links and makes it again at the end; the copies and the pages are as ever."""
    monkeypatch.setattr(listed, "BULK_FLIPS", 2)
    dropped: list[bool] = []
    done = listed.LinkCopies.done

    async def noted(copies: listed.LinkCopies) -> None:
        dropped.append(copies._dropped)
        await done(copies)

    monkeypatch.setattr(listed.LinkCopies, "done", noted)
    custom = AccountPolicy(
        tagger=lambda f: ("shared", "custom_shared") if f.owner_shared else ("private", "x")
    )
    policies = {"acct": custom}
    await store.import_records([Record("L1", "lead", "", ("l@x.example",))], policies)
    linked = [
        dataclasses.replace(
            item(f"u{n}", f"m{n}".encode()), senders=("l@x.example",), link=("l@x.example",)
        )
        for n in range(5)
    ]
    await store.add_batch("acct", "alice", linked, custom)
    for shared in (True, False, True):
        assert await store.set_share("alice", "L1", shared, policies, actor="alice")
        listing_copies_hold(store_at)
        assert len(await store.messages("bob", record="L1", limit=3)) == (3 if shared else 0)
    index = (
        "SELECT count(*) FROM sqlite_master WHERE name = 'message_records_shared'"
        if store_at.backend == "sqlite"
        else "SELECT count(*) FROM pg_indexes WHERE indexname = 'message_records_shared'"
    )
    assert store_at.query(index) == [(1,)]
    assert any(dropped) == (store_at.backend == "sqlite"), dropped  # PostgreSQL keeps it
