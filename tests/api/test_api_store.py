"""The store's part of the HTTP API, on both backends: hashed tokens, record deletion with
its re-tag and audit, cursor pages of a viewer's mail, a page read with its token on a read
connection of its own, the health checks, the observer."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from mailingest.errors import StoreError
from mailingest.model import (
    AccountPolicy,
    ApiToken,
    Headers,
    ListedPage,
    NewMessage,
    Record,
    StoredMessage,
)
from mailingest.store import Store, read
from mailingest.store._sqlite import _SqliteReader
from support import StoreAt, run_sql

CUSTOM = AccountPolicy(
    tagger=lambda f: (
        ("shared", "custom_shared")
        if f.owner_shared
        else ("private", "custom_not_shared" if f.linked else "unmatched")
    ),
    magnet_label="crm",
)


def item(uidl: str, *, date: str | None = None, link: tuple[str, ...] = ()) -> NewMessage:
    raw = f"Subject: {uidl}\r\n\r\n{uidl}\r\n".encode()
    return NewMessage(
        uidl=uidl,
        spool=io.BytesIO(raw),
        size=len(raw),
        sha256=hashlib.sha256(raw).hexdigest(),
        headers=Headers(subject=uidl, date=date),
        direction="in",
        senders=link,
        link=link,
    )


async def test_tokens_are_kept_by_hash_listed_and_revoked(store: Store) -> None:
    digest = hashlib.sha256(b"tok").hexdigest()
    made = await store.add_api_token("crm", digest, admin=False, act_for=True, label="prod")
    assert (made.user, made.admin, made.act_for, made.label) == ("crm", False, True, "prod")
    assert await store.api_token(digest) == made
    assert await store.api_token(hashlib.sha256(b"other").hexdigest()) is None
    assert await store.api_tokens() == [made]
    assert await store.revoke_api_token(made.id)
    assert not await store.revoke_api_token(made.id)
    assert await store.api_token(digest) is None


async def test_deleting_a_record_unlinks_unshares_unlabels_and_retags(store: Store) -> None:
    policies = {"acct": CUSTOM}
    await store.import_records([Record("L1", "lead", "", ("lead@x.example",))], policies)
    [stored] = await store.add_batch(
        "acct", "alice", [item("u1", link=("lead@x.example",))], CUSTOM
    )
    assert await store.set_share("alice", "L1", True, policies, actor="alice")
    before = await store.message(stored.message or 0)
    assert before is not None and before.visibility == "shared" and before.labels == ["crm"]
    assert await store.delete_record("L1", policies, actor="admin")
    assert not await store.delete_record("L1", policies, actor="admin")
    after = await store.message(stored.message or 0)
    assert after is not None
    assert (after.visibility, after.reason, after.records, after.labels) == (
        "private",
        "unmatched",
        [],
        [],
    )
    assert await store.records() == []
    [entry, _] = await store.audit()
    assert (entry.action, entry.actor, entry.record, entry.retagged) == (
        "unshare",
        "admin",
        "L1",
        1,
    )
    assert entry.detail == {"record_deleted": True}


async def test_pages_follow_the_listing_order_without_gaps_or_repeats(store: Store) -> None:
    # Equal dates force the id tie-break; a missing date sorts by when it was stored.
    dates = ["2026-01-01T00:00:00+00:00"] * 3 + ["2026-02-01T00:00:00+00:00", None]
    items = [item(f"u{n}", date=d) for n, d in enumerate(dates)]
    await store.add_batch("acct", "alice", items, CUSTOM)
    whole = [m.id for m in await store.messages("alice")]
    pages: list[int] = []
    before = None
    while True:
        page = await store.messages("alice", limit=2, before=before)
        if not page:
            break
        pages += [m.id for m in page]
        last = page[-1]
        before = (last.date or last.received_at, last.id)
    assert pages == whole and len(whole) == 5


async def test_a_page_is_read_with_its_token_in_one_snapshot(store: Store) -> None:
    """``messages_for``: the token and the page of the viewer named for it. An unknown or
    revoked token, or one whose viewer is refused, reads no mail."""
    await store.add_batch("acct", "alice", [item("u1"), item("u2")], CUSTOM)
    digest = hashlib.sha256(b"tok").hexdigest()
    made = await store.add_api_token("alice", digest, admin=False, act_for=False)
    asked: list[ApiToken] = []

    def as_its_user(token: ApiToken) -> str:
        asked.append(token)
        return token.user

    token, page = await store.messages_for(digest, as_its_user, limit=1)
    assert token == made and asked == [made]
    listed = [m.to_json() for m in await store.messages("alice", limit=1)]
    assert json.loads(page.json) == listed and page.found == 1
    nothing = ListedPage("[]", 0, None)
    assert await store.messages_for(digest, lambda token: None) == (made, nothing)
    unknown = hashlib.sha256(b"other").hexdigest()
    assert await store.messages_for(unknown, as_its_user) == (None, nothing)
    assert await store.revoke_api_token(made.id)
    assert await store.messages_for(digest, as_its_user) == (None, nothing)
    assert asked == [made]


def chosen(message: StoredMessage, where: dict[str, Any]) -> bool:
    """Whether a listing with these filters holds ``message``: the filters in Python."""
    if "record" in where and where["record"] not in message.records:
        return False
    if "account" in where and where["account"] != message.account:
        return False
    if "label" in where and where["label"] not in message.labels:
        return False
    return not where.get("quarantined") or message.quarantine_reason is not None


async def test_a_record_page_reads_its_links_in_order_and_no_further(tmp_path: Path) -> None:
    """On SQLite, the API's page of a record merges the two indexes of its links (the
    viewer's own, others' shared) as they come, in order, up to the page: no table scan,
    no sort, whatever the record holds."""
    at = StoreAt(tmp_path / "mail.db")
    await (await at.open()).close()
    for before in (None, ("2026-01-01T00:00:00+00:00", 7)):
        listing = read.Listing(record="L1", limit=51, before=before)
        sql = read._page_sql(read._Shape.of(listing, fast=True), _SqliteReader.json)
        plan = " | ".join(
            str(row[-1])
            for row in run_sql(at, f"EXPLAIN QUERY PLAN {sql}", *read._args("bob", listing))
        )
        assert "MERGE (UNION ALL)" in plan, plan
        assert "INDEX message_records_own (record=? AND owner=?" in plan, plan
        assert "INDEX message_records_shared (record=?" in plan, plan
        assert "TEMP B-TREE" not in plan and "SCAN message_records" not in plan, plan


async def test_the_listing_as_json_is_what_the_messages_make(
    store: Store, store_at: StoreAt
) -> None:
    """The API's listing is JSON text made by the database: for every filter, it says
    what ``StoredMessage.to_json`` says, field for field, and its keys page as the
    messages' do. The data has what JSON must escape, several records and labels, a
    quarantined message, missing fields, and a viewer who sees only the shared part."""
    policies = {"acct": CUSTOM}
    leads = [Record(f"L{n}", "lead", "", (f"l{n}@x.example",)) for n in range(3)]
    await store.import_records(leads, policies)
    odd = 'Ünïcødé "quoted" \\ back\tslash \x01\x1f € 𝄞 <\u2028>'
    items = [
        dataclasses.replace(
            item(f"u{n}", date=None if n % 3 else f"2026-0{1 + n % 2}-01T00:00:00+00:00"),
            senders=("l0@x.example", "l1@x.example") if n % 2 else ("l2@x.example",),
            link=("l0@x.example", "l1@x.example") if n % 2 else ("l2@x.example",),
            headers=Headers(
                subject=odd if n == 1 else None if n == 2 else f"u{n}",
                date=None if n % 3 else f"2026-0{1 + n % 2}-01T00:00:00+00:00",
                from_addrs=("l0@x.example",) if n % 2 else (),
                to=("alice@crm.example", odd) if n == 3 else (),
                message_id=f"<u{n}@x.example>" if n % 2 else None,
            ),
            quarantine="larger than the account's size limit" if n == 4 else None,
        )
        for n in range(8)
    ]
    stored = await store.add_batch("acct", "alice", items, CUSTOM)
    for label in ("zeta", "Zeta", "émile"):  # sorted by code point: Zeta, crm, zeta, émile
        run_sql(
            store_at,
            "INSERT INTO message_labels (message, label) VALUES (?, ?)",
            stored[1].message,
            label,
        )
    assert await store.set_share("alice", "L1", True, policies, actor="alice")
    digest = hashlib.sha256(b"tok").hexdigest()
    await store.add_api_token("bob", digest, admin=False, act_for=True)
    filters: list[dict[str, Any]] = [
        {},
        {"record": "L0"},
        {"record": "L1"},
        {"record": "L2"},
        {"record": "nobody"},
        {"account": "acct"},
        {"label": "crm"},
        {"label": "zeta"},
        {"quarantined": True},
        {"record": "L1", "label": "crm", "account": "acct"},
    ]
    for viewer in ("alice", "bob"):

        def as_viewer(token: ApiToken, viewer: str = viewer) -> str:
            return viewer

        everything = await store.messages(viewer)  # by the messages alone, no link copies
        for where in filters:
            expected = [m for m in everything if chosen(m, where)]
            assert [m.id for m in await store.messages(viewer, **where)] == [m.id for m in expected]
            assert expected or viewer == "bob" or where == {"record": "nobody"}, where
            _, listed = await store.messages_for(digest, as_viewer, **where)
            assert json.loads(listed.json) == [m.to_json() for m in expected]
            assert (listed.found, listed.next) == (len(expected), None)
            # Page by two with the listing's own keys: the same messages, in order; the
            # last page says there is no next one, even when it is full.
            paged: list[int] = []
            before = None
            for _ in range(10):
                _, part = await store.messages_for(
                    digest, as_viewer, limit=2, before=before, **where
                )
                paged += [m["id"] for m in json.loads(part.json)]
                if part.next is None:
                    break
                before = part.next
            assert paged == [m.id for m in expected], (viewer, where)
    shared = await store.messages("bob", record="L1")
    assert shared and all(m.visibility == "shared" for m in shared)
    [labelled] = [m for m in await store.messages("alice") if m.id == stored[1].message]
    assert labelled.labels == ["Zeta", "crm", "zeta", "émile"]
    assert len(labelled.records) == 2


async def test_a_link_whose_copy_is_wrong_neither_shows_its_message_nor_ends_the_pages(
    store: Store, store_at: StoreAt
) -> None:
    """A record's page trusts its links' copy of who may see each message only to find
    them; should a copy ever say "shared" of a private message, the message stays hidden
    and the pages after it still come, through the API and the CLI's listing alike."""
    policies = {"acct": CUSTOM}
    await store.import_records([Record("L1", "lead", "", ("l@x.example",))], policies)
    items = [
        item(f"u{n}", date=f"2026-01-{1 + n:02d}T00:00:00+00:00", link=("l@x.example",))
        for n in range(9)
    ]
    stored = await store.add_batch("acct", "alice", items, CUSTOM)
    assert await store.set_share("alice", "L1", True, policies, actor="alice")
    ids = [o.message for o in stored]
    hidden = ids[6]  # newest first: the third message of the first page
    run_sql(store_at, "UPDATE messages SET visibility = 'private' WHERE id = ?", hidden)
    run_sql(store_at, "UPDATE message_records SET visibility = 'shared' WHERE message = ?", hidden)
    digest = hashlib.sha256(b"tok").hexdigest()
    await store.add_api_token("bob", digest, admin=False, act_for=False)
    paged: list[int] = []
    before = None
    for _ in range(10):
        _, page = await store.messages_for(
            digest, lambda token: token.user, record="L1", limit=3, before=before
        )
        paged += [m["id"] for m in json.loads(page.json)]
        if page.next is None:
            break
        before = page.next
    assert paged == [i for i in reversed(ids) if i != hidden]
    # The CLI's listing (Store.messages) reads a record's links the same way.
    for limit in (3, 7, None):
        listed = [m.id for m in await store.messages("bob", record="L1", limit=limit)]
        assert listed == [i for i in reversed(ids) if i != hidden][:limit]


async def test_reads_neither_wait_for_a_write_under_way_nor_see_it(store: Store) -> None:
    """Snapshot reads have connections of their own: a write transaction of the same
    process holds no read up, and shows only once committed."""
    await store.add_batch("acct", "alice", [item("u1")], CUSTOM)
    async with store._db.write("a test's write"):
        await store._db.execute("UPDATE messages SET subject = 'half done'")
        during = await asyncio.wait_for(store.messages("alice"), 60)
    assert [m.subject for m in during] == ["u1"]
    assert [m.subject for m in await store.messages("alice")] == ["half done"]


async def test_a_broken_read_connection_is_replaced(postgres_at: StoreAt) -> None:
    """A server restart or a dropped session breaks the read connections: at most the next
    read fails (503 in the API), the one after gets a new connection."""
    store = await postgres_at.open()
    try:
        await store.add_batch("acct", "alice", [item("u1")], CUSTOM)
        assert len(await store.messages("alice")) == 1
        postgres_at.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        failed = 0
        while True:
            try:
                assert len(await store.messages("alice")) == 1
                break
            except StoreError:
                failed += 1
                assert failed == 1
    finally:
        await store.close()


@dataclasses.dataclass
class Observer:
    """What the store reports to the daemon's metrics."""

    commits: list[float] = dataclasses.field(default_factory=list)
    taken: list[str] = dataclasses.field(default_factory=list)

    def committed(self, seconds: float) -> None:
        self.commits.append(seconds)

    def lease_taken_over(self, account: str) -> None:
        self.taken.append(account)


async def test_health_checks_and_the_observer(store: Store) -> None:
    seen = Observer()
    store.observer = seen
    await store.check_reachable()
    await store.check_writable()
    assert seen.commits and all(s >= 0 for s in seen.commits)
    assert (await store.take_poll("acct", "dead-holder", 60)).taken
    assert not (await store.take_poll("acct", "me", 60)).taken
    assert (await store.take_poll("acct", "me", 60, stale="dead-holder")).taken
    assert seen.taken == ["acct"]


async def test_an_expired_lease_taken_over_is_counted(store: Store) -> None:
    """A holder that died on another host leaves its lease to expire: the claim that takes
    it is a takeover too; a free lease, or one's own, is not."""
    seen = Observer()
    store.observer = seen
    assert (await store.take_poll("acct", "elsewhere:1:gone", 60)).taken
    run_out = (await store.take_poll("acct", "elsewhere:1:gone", -1)).taken  # renewed, expired
    assert run_out and seen.taken == []
    assert (await store.take_poll("acct", "me", 60)).taken
    assert seen.taken == ["acct"]
    assert (await store.take_poll("acct", "me", 60)).taken  # its own: no takeover
    await store.release_lease("acct", "me")
    assert (await store.take_poll("acct", "next", 60)).taken  # a free lease
    assert not (await store.take_poll("acct", "other", 60)).taken  # held: busy, as before
    assert seen.taken == ["acct"]


def test_a_body_nested_beyond_reason_is_omitted_not_a_crash() -> None:
    """Any sender can nest multiparts a thousand deep: the parts are omitted, with why."""
    from mailingest.api import bodies
    from support import TESTS

    raw = (TESTS / "corpus" / "08-nested-1000-deep.eml").read_bytes()
    decoded = bodies.decode(raw)
    assert decoded["parts"] == [] and decoded["body_omitted"] == "nested too deep to decode"
