"""delete_after_days on a leave_on_server account, against Dovecot, with the clock moved forward.

A message's age counts from when the account first stored it (its ledger row's first_seen),
not from its Date header: fetch compares first_seen with ``datetime.now(UTC)``. Neither
``fetch_account`` nor the store takes a clock, so the ``clock`` fixture moves the one both
read: ``datetime`` in mailingest.fetch (the age check) and in the store's ``_db`` (``now_iso``,
which stamps first_seen).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Self

import pytest

from builders import crlf, dovecot_account, make_message, sha
from dovecot import Mailbox
from mailingest import fetch as fetch_module
from mailingest.config import Account, load_config
from mailingest.fetch import FetchResult
from mailingest.store import Store
from mailingest.store import _db as store_db_module
from support import fetch, stored_hashes, write_config

DAYS = 3
OWNER = "alice"  # dovecot_account()'s owner
FETCH_BOUND = 60.0  # no single fetch here may take longer than this


class Clock:
    """What fetch and the store take for the time: the real time plus ``offset``."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    moved = Clock()

    class MovedDatetime(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Self:
            real = datetime.now(tz) + moved.offset
            return cls.fromtimestamp(real.timestamp(), real.tzinfo)

    monkeypatch.setattr(fetch_module, "datetime", MovedDatetime)
    monkeypatch.setattr(store_db_module, "datetime", MovedDatetime)
    return moved


def account(tmp_path: Path, mailbox: Mailbox, days: int) -> Account:
    """The account as a user writes it: leave_on_server = true, delete_after_days = days."""
    table = dovecot_account(mailbox, leave_on_server=True, delete_after_days=days)
    return load_config(write_config(tmp_path, [table])).accounts[0]


async def fetch_ok(acc: Account, store: Store) -> FetchResult:
    result = await fetch(acc, store, bound=FETCH_BOUND)
    assert result.status == "ok" and result.error is None, result
    return result


async def stored(store: Store) -> Counter[str]:
    """sha256 of every stored message, recomputed from the stored bytes."""
    return Counter(await stored_hashes(store, OWNER))


def on_server(mailbox: Mailbox) -> Counter[str]:
    """sha256 of what the server would serve for each message still in the mailbox."""
    maildir = mailbox.dovecot.maildir(mailbox.user)
    return Counter(
        sha(crlf(path.read_bytes()))
        for sub in ("new", "cur")
        for path in (maildir / sub).iterdir()
        if not path.name.startswith(".")
    )


def as_served(messages: list[bytes]) -> Counter[str]:
    return Counter(sha(crlf(m)) for m in messages)


def batch(first: int, count: int) -> list[bytes]:
    return [make_message(i) for i in range(first, first + count)]


async def test_messages_younger_than_delete_after_days_stay_on_the_server(
    tmp_path: Path, mailbox: Mailbox, store: Store, clock: Clock
) -> None:
    messages = batch(0, 4)
    mailbox.deliver_many(messages)
    acc = account(tmp_path, mailbox, DAYS)

    first = await fetch_ok(acc, store)
    clock.advance(days=DAYS, minutes=-1)
    second = await fetch_ok(acc, store)

    assert (first.new, first.deleted) == (4, 0)
    assert (second.new, second.deleted) == (0, 0)
    assert on_server(mailbox) == as_served(messages)
    assert await stored(store) == as_served(messages)


async def test_age_counts_from_when_a_message_was_stored_not_from_its_date_header(
    tmp_path: Path, mailbox: Mailbox, store: Store, clock: Clock
) -> None:
    old = make_message(1).replace(b"Date: Tue, 24 Nov 2026", b"Date: Mon, 01 Jan 2001")
    assert b"Date: Mon, 01 Jan 2001" in old
    mailbox.deliver(old)
    acc = account(tmp_path, mailbox, DAYS)

    first = await fetch_ok(acc, store)
    second = await fetch_ok(acc, store)

    assert (first.new, first.deleted, second.deleted) == (1, 0, 0)
    assert on_server(mailbox) == as_served([old])


async def test_messages_older_than_delete_after_days_are_deleted_by_the_next_fetch_only(
    tmp_path: Path, mailbox: Mailbox, store: Store, clock: Clock
) -> None:
    """Older than N days since stored: DELEted by the next fetch; younger ones stay; nothing
    is fetched again or stored twice, before or after the deletion."""
    older, younger = batch(0, 3), batch(3, 2)
    acc = account(tmp_path, mailbox, DAYS)
    mailbox.deliver_many(older)
    day_0 = await fetch_ok(acc, store)
    clock.advance(days=DAYS - 1)
    mailbox.deliver_many(younger)
    day_2 = await fetch_ok(acc, store)

    clock.advance(days=1, minutes=1)  # older: N days and a minute; younger: a day and a minute
    day_3 = await fetch_ok(acc, store)
    day_3_again = await fetch_ok(acc, store)

    assert (day_0.new, day_0.deleted, day_2.new, day_2.deleted) == (3, 0, 2, 0)
    assert (day_3.new, day_3.deleted) == (0, len(older))
    assert (day_3_again.new, day_3_again.deleted) == (0, 0)
    assert on_server(mailbox) == as_served(younger)
    assert await stored(store) == as_served(older + younger)

    clock.advance(days=DAYS)
    later = await fetch_ok(acc, store)

    assert (later.new, later.deleted) == (0, len(younger))
    assert mailbox.count() == 0
    assert await stored(store) == as_served(older + younger)


async def test_delete_after_days_zero_never_deletes(
    tmp_path: Path, mailbox: Mailbox, store: Store, clock: Clock
) -> None:
    messages = batch(0, 3)
    mailbox.deliver_many(messages)
    acc = account(tmp_path, mailbox, 0)

    first = await fetch_ok(acc, store)
    clock.advance(days=3650)
    later = await fetch_ok(acc, store)

    assert (first.new, first.deleted, later.new, later.deleted) == (3, 0, 0, 0)
    assert on_server(mailbox) == as_served(messages)
    assert await stored(store) == as_served(messages)
