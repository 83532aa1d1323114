"""Hostile-server faults the first fault suites left out, on the scripted loopback server.

Drops at PASS, after login, between RETR and DELE and among the DELEs (a drop at QUIT is in
test_fetch_cycle); a message the server refuses to serve; UIDLs that change between sessions
for the same content; malformed STAT replies and LOGIN-DELAY values. For each: the cycle returns
(the process survives), the status is typed and names the account in the result and in the
``poll_failed`` log line, the status is one the retry policy retries or not as it should,
and every message ends up stored once, byte-exact, or still on the server.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

import pytest

import builders
from builders import NAME, USER, expected, mailbox, message
from mailingest import commands
from mailingest import fetch as fetch_module
from mailingest.logs import capture
from mailingest.retry import PollFailure
from mailingest.store import Store
from pop3d import Faults, Pop3d, first_session
from support import fetch, stored_hashes

TIMEOUT = 1.0
account = functools.partial(builders.account, timeout=TIMEOUT)
#: Statuses the daemon's retry policy backs off and retries; the others wait for a change.
RETRIED = {"temp_failed", "unavailable"}
MESSAGES = [message(i) for i in range(1, 6)]


# -- one table: fault -> typed status, retry, what is committed, what the next fetch does ------


@dataclass(frozen=True)
class Case:
    faults: Faults
    status: str
    committed: int  # messages stored by the failed cycle (a prefix of MESSAGES)
    refetch: bool = True  # the next cycle RETRs again (False: it only DELEs)
    text: str = ""  # in the error message


CASES = {
    "drop-when-pass-arrives": Case(Faults(drop_after="PASS"), "temp_failed", 0, text="closed"),
    "drop-after-login": Case(Faults(drop_after="UIDL"), "temp_failed", 0, text="closed"),
    "drop-after-list": Case(Faults(drop_after="RETR 1"), "temp_failed", 0),
    "drop-between-retr-and-dele": Case(Faults(drop_after="DELE"), "temp_failed", 5, refetch=False),
    "drop-in-the-middle-of-dele": Case(
        Faults(drop_after="DELE 3"), "temp_failed", 5, refetch=False
    ),
    "sys-temp-on-dele": Case(
        Faults(err_on={"DELE 4": "-ERR [SYS/TEMP] try later"}), "temp_failed", 5, refetch=False
    ),
    "retr-status-over-64-kib": Case(
        Faults(reply_override={"RETR 2": b"+OK " + b"x" * 70_000 + b"\r\n"}), "error", 1
    ),
    # UIDL and LIST go out in one write (PIPELINING): LIST's status line arrives where the
    # missing "." should be, and is no UIDL line.
    "uidl-without-terminator": Case(
        Faults(reply_override={"UIDL": b"+OK\r\n1 a\r\n2 b\r\n"}),
        "error",
        0,
        text="malformed UIDL line",
    ),
    "uidl-without-terminator-lock-step": Case(
        Faults(
            reply_override={"UIDL": b"+OK\r\n1 a\r\n2 b\r\n"},
            capa=["TOP", "USER", "UIDL", "RESP-CODES"],
        ),
        "temp_failed",
        0,
        text="timed",
    ),
    "garbage-reply-to-retr": Case(
        Faults(reply_override={"RETR 4": b"HTTP/1.1 400 Bad Request\r\n"}), "error", 3
    ),
}


@pytest.mark.parametrize("name", CASES)
async def test_fault_is_typed_logged_and_loses_or_duplicates_nothing(
    store: Store, name: str, pop3d: Pop3d
) -> None:
    case = CASES[name]
    server = await pop3d([mailbox(MESSAGES)], first_session(case.faults))
    acc = account(server.port, leave_on_server=False)
    with capture() as logs:
        first = await fetch(acc, store)

    assert first.status == case.status, first
    # The daemon's policy retries by the status's error class (tested with the scheduler).
    assert PollFailure(first.status, first.error).transient == (case.status in RETRIED)
    assert first.error is not None and first.error.startswith(f"account {NAME!r}: ")
    assert case.text in first.error, first.error
    [failed] = [e for e in logs if e["event"] == "poll_failed"]
    assert failed["account"] == NAME and failed["error_kind"] == case.status
    # Transient failures are warnings (the daemon retries them), the rest errors.
    assert failed["log_level"] == ("warning" if case.status in RETRIED else "error")
    assert failed["retry_in_s"] is None  # a one-shot fetch never retries
    assert await stored_hashes(store) == expected(MESSAGES[: case.committed])
    assert server.mailbox(USER).remaining() == len(MESSAGES)  # no QUIT: nothing expunged
    assert "QUIT" not in server.session_log(0)
    retrieved = server.commands_seen("RETR")

    second = await fetch(acc, store)

    assert second.status == "ok", second
    assert second.new == len(MESSAGES) - case.committed
    assert second.deleted == len(MESSAGES)
    if not case.refetch:
        assert server.commands_seen("RETR") == retrieved  # DELE from the ledger only
    assert server.mailbox(USER).remaining() == 0
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


# -- a message the server will not serve -------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_message_the_server_refuses_does_not_hold_back_the_others(
    store: Store, pipelining: bool, pop3d: Pop3d
) -> None:
    """A plain -ERR to RETR of one message, at every cycle (a corrupt file on the server).

    It used to end the session at once: in a deleting account nothing after it was ever
    stored and nothing before it ever deleted. Now the others are stored and deleted, the
    refused one stays on the server, and each cycle reports the error (not retried early).
    """
    capa = ["UIDL", "PIPELINING"] if pipelining else ["UIDL"]
    refuse = "-ERR message is corrupt"

    def faults(number: int) -> Faults:  # it is message 3 at first, message 1 once 1-2 are gone
        return Faults(capa=capa, err_on={"RETR 3" if number == 0 else "RETR 1": refuse})

    box = mailbox(MESSAGES)
    server = await pop3d([box], Faults(per_session=faults))
    acc = account(server.port, leave_on_server=False)
    with capture() as logs:
        first = await fetch(acc, store)
    assert first.status == "error" and "corrupt" in (first.error or ""), first
    assert first.error is not None and first.error.startswith(f"account {NAME!r}: ")
    assert [e["account"] for e in logs if e["event"] == "poll_failed"] == [NAME]
    assert first.new == 4 and first.deleted == 4
    assert box.messages == [MESSAGES[2]]  # only the refused one is left
    assert await stored_hashes(store) == expected(MESSAGES[:2] + MESSAGES[3:])

    second = await fetch(acc, store)
    assert second.status == "error" and second.new == 0 and second.deleted == 0, second
    assert box.messages == [MESSAGES[2]]
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES[:2] + MESSAGES[3:])


# -- UIDLs that change between sessions --------------------------------------------------------


async def test_uidls_renumbered_after_a_crash_before_dele_store_nothing_twice(
    store: Store,
    pop3d: Pop3d,
) -> None:
    """Session 1 stores all and dies at DELE; the server then renumbers every UIDL."""
    box = mailbox(MESSAGES, uidls=[f"old-{i}" for i in range(5)])
    server = await pop3d([box], first_session(Faults(drop_after="DELE")))
    acc = account(server.port, leave_on_server=False)
    first = await fetch(acc, store)
    assert first.status == "temp_failed" and first.new == len(MESSAGES), first
    assert box.uidls is not None
    box.uidls[:] = [f"new-{i}" for i in range(5)]  # e.g. a server migration

    second = await fetch(acc, store)

    assert second.status == "ok" and second.new == 0, second  # content already stored
    assert second.deleted == len(MESSAGES)
    assert box.remaining() == 0
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


async def test_uidls_renumbered_at_every_session_of_one_cycle_drain_once(
    store: Store, monkeypatch: pytest.MonkeyPatch, pop3d: Pop3d
) -> None:
    """A capped listing (Gmail) and new UIDLs at every login, within one deleting fetch."""
    monkeypatch.setattr(fetch_module, "LISTING_CAP", 5)  # this server caps at 5, as Gmail at 250
    messages = [message(i) for i in range(1, 13)]
    box = mailbox(messages)

    def renumbering(number: int) -> Faults:
        box._sync()
        assert box.uidls is not None
        box.uidls[:] = [f"s{number}-{i}" for i in range(len(box.uidls))]
        return Faults(max_list=5)

    server = await pop3d([box], Faults(per_session=renumbering))
    result = await fetch(account(server.port, leave_on_server=False), store)
    assert result.status == "ok" and result.new == len(messages), result
    assert result.deleted == len(messages) and box.remaining() == 0
    assert server.commands_seen("RETR") == len(messages)  # each retrieved once
    assert server.errors == []
    assert await stored_hashes(store) == expected(messages)


async def test_uidls_renumbered_between_keeping_fetches_retrieve_but_store_once(
    store: Store,
    pop3d: Pop3d,
) -> None:
    """leave_on_server: new UIDLs look like new mail; its content is stored once only."""
    box = mailbox(MESSAGES, uidls=[f"a-{i}" for i in range(5)])
    server = await pop3d([box])
    acc = account(server.port)
    assert (await fetch(acc, store)).new == len(MESSAGES)
    assert box.uidls is not None
    box.uidls[:] = [f"b-{i}" for i in range(5)]
    again = await fetch(acc, store)
    assert again.status == "ok" and again.new == 0, again
    third = await fetch(acc, store)  # the new UIDLs are in the ledger now
    assert third.new == 0 and server.commands_seen("RETR") == 2 * len(MESSAGES)
    assert box.remaining() == len(MESSAGES) and server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


async def test_same_content_under_two_uidls_is_stored_once_and_both_deleted(
    store: Store,
    pop3d: Pop3d,
) -> None:
    """A resent message, byte for byte: one stored copy, and no copy left on the server."""
    same = message(9)
    box = mailbox([same, message(1), same], uidls=["x", "y", "z"])
    server = await pop3d([box])
    result = await fetch(account(server.port, leave_on_server=False), store)
    assert result.status == "ok" and result.new == 2 and result.deleted == 3, result
    assert box.remaining() == 0 and server.errors == []
    assert await stored_hashes(store) == expected([same, message(1)])


# -- malformed replies outside the fetch path ----------------------------------------------


@pytest.mark.parametrize("reply", [b"+OK\r\n", b"+OK lots of mail\r\n", b"+OK 3\r\n"])
async def test_malformed_stat_reply_is_a_typed_error_for_check(reply: bytes, pop3d: Pop3d) -> None:
    """`mailingest check` ran poplib's stat(), which raised IndexError/ValueError here."""
    faults = Faults(reply_override={"STAT": reply})
    server = await pop3d([mailbox(MESSAGES)], faults)
    result = await asyncio.to_thread(commands.check_pop3, account(server.port))
    assert result["status"] == "error", result
    assert result["error"].startswith(f"account {NAME!r}: malformed STAT reply")
    assert server.errors == []


@pytest.mark.parametrize("delay", [10**12, 10**30])
async def test_absurd_login_delay_is_bounded_not_a_crash(
    store: Store, delay: int, pop3d: Pop3d
) -> None:
    """CAPA "LOGIN-DELAY 10^12" overflowed datetime: the cycle crashed as an internal error."""
    server = await pop3d([mailbox(MESSAGES)], Faults(login_delay=delay))
    result = await fetch(account(server.port), store)
    assert result.status == "ok" and result.new == len(MESSAGES), result
    allowed = await store.next_login(NAME)
    assert allowed is not None  # honoured, within a day
    again = await fetch(account(server.port), store)
    assert again.status == "temp_failed" and "LOGIN-DELAY" in (again.error or "")
    assert server.login_attempts == 1 and server.errors == []
