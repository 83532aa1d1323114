"""The store's part of the HTTP API, on both backends: hashed tokens, record deletion with
its re-tag and audit, cursor pages of a viewer's mail, the health checks, the observer."""

from __future__ import annotations

import dataclasses
import hashlib
import io

from mailingest.model import AccountPolicy, Headers, NewMessage, Record
from mailingest.store import Store

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
