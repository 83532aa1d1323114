"""Several daemons on one PostgreSQL share the accounts (real Dovecot, real PostgreSQL).

Three ``mailingest run`` processes, one config, sixty accounts: each account is polled by one
daemon at a time (the claim and the lease in the database), the polls spread over the
daemons, and when one is killed mid-fetch the others take its accounts over within one poll
interval: nothing lost, nothing stored twice, nothing deleted before it is committed.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections import defaultdict
from pathlib import Path

from builders import crlf, dovecot_account, make_message, sha
from daemon_support import DaemonProcess, wait_until
from dovecot import Dovecot, Mailbox
from support import StoreAt, write_config

ACCOUNTS = 60
DAEMONS = 3
INTERVAL = 4.0  # seconds: the takeover is bounded by it
FIRST, SECOND = 3, 3  # messages per account before and during the kill


def _deliver(boxes: list[Mailbox], round_: int, count: int, size: int) -> dict[str, set[str]]:
    sent: dict[str, set[str]] = defaultdict(set)
    for a, box in enumerate(boxes):
        raws = [
            make_message(
                (round_ * 1000 + a) * 10 + i,
                body=(f"account {a} round {round_} message {i}\n".encode() * (size // 40 + 1)),
            )
            for i in range(count)
        ]
        box.dovecot.deliver_many(box.user, raws)
        sent[f"a{a}"] |= {sha(crlf(raw)) for raw in raws}
    return sent


def _stored(at: StoreAt) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for account, digest in at.query("SELECT account, sha256 FROM messages"):
        found[account].append(digest)
    return found


def _polls(daemons: list[DaemonProcess]) -> dict[str, int]:
    """How many polls of each account these daemons completed so far."""
    count: dict[str, int] = defaultdict(int)
    for daemon in daemons:
        for event in daemon.events("poll_completed"):
            count[event["account"]] += 1
    return count


def _complete(at: StoreAt, sent: dict[str, set[str]]) -> bool:
    return sum(len(v) for v in _stored(at).values()) >= sum(len(v) for v in sent.values())


def test_three_daemons_share_sixty_accounts_and_take_over_a_killed_ones(
    dovecot: Dovecot, postgres_at: StoreAt, tmp_path: Path
) -> None:
    store_at = postgres_at
    boxes = [dovecot.new_mailbox() for _ in range(ACCOUNTS)]
    deleting = {f"a{a}" for a in range(0, ACCOUNTS, 2)}
    tables = [
        dovecot_account(box, f"a{a}", owner="alice", leave_on_server=f"a{a}" not in deleting)
        for a, box in enumerate(boxes)
    ]
    config = write_config(
        tmp_path,
        tables,
        storage=store_at.storage(),
        daemon={"poll_interval": f"{INTERVAL:g}s", "max_concurrent": 8},
    )
    sent = _deliver(boxes, 0, FIRST, 200)
    daemons = [DaemonProcess(config) for _ in range(DAEMONS)]
    try:
        for daemon in daemons:
            daemon.wait_event("daemon_started")
        wait_until(lambda: _complete(store_at, sent), "the first mail of every account", 90)
        # The second round is larger, so that fetches are under way when the kill comes.
        for account, digests in _deliver(boxes, 1, SECOND, 150_000).items():
            sent[account] |= digests
        victim = daemons[0]
        mine = f":{victim.proc.pid}:"
        held: list[str] = []

        def victim_fetching() -> bool:
            held[:] = [
                str(r[0])
                for r in store_at.query(
                    "SELECT account FROM account_state WHERE lease_holder LIKE ?", (f"%{mine}%",)
                )
            ]
            return bool(held)

        wait_until(victim_fetching, "the first daemon holding a lease", 60)
        before = _polls(daemons[1:])
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        # Each account it held is polled again by another daemon (the victim may have stored
        # all of one's mail before the kill, so the mail alone does not show the takeover).
        wait_until(
            lambda: all(_polls(daemons[1:])[a] > before[a] for a in held),
            "the killed daemon's accounts polled by the others",
            INTERVAL + 30,
        )
        # Its accounts are fetched by the others within one interval (plus the fetch).
        wait_until(
            lambda: _complete(store_at, sent), "every message, after the kill", INTERVAL + 30
        )
        wait_until(
            lambda: all(dovecot.count(boxes[int(a[1:])].user) == 0 for a in deleting),
            "the deleting accounts' mailboxes emptied",
            INTERVAL + 30,
        )
        for survivor in daemons[1:]:
            assert survivor.proc.poll() is None, survivor.text()
    finally:
        for daemon in daemons:
            if daemon.proc.poll() is None:
                daemon.stop()

    stored = _stored(store_at)
    for account, digests in sent.items():
        assert sorted(stored[account]) == sorted(digests), account  # 0 lost, 0 duplicated
    assert sum(len(v) for v in stored.values()) == sum(len(v) for v in sent.values())

    # The polls spread over the daemons.
    polled_by = [{e["account"] for e in d.events("poll_completed")} for d in daemons]
    assert all(polled_by), [len(p) for p in polled_by]

    # No two sessions of one user overlapped, except one cut by the kill.
    by_user: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for session in dovecot.sessions():
        if session.logged_out and session.ended is not None:
            by_user[session.user].append((session.began, session.ended))
    users = {box.user for box in boxes}
    assert users <= set(by_user), users - set(by_user)
    for user in users:
        spans = sorted(by_user[user])
        for (_, ended), (began, _) in itertools.pairwise(spans):
            assert began >= ended, (user, spans)
