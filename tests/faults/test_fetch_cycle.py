"""One account's fetch cycle against the scripted POP3 server: the happy path and the invariants.

Every test checks what the contract promises whatever the server does: ``fetch_account``
returns (never raises), a failure is typed and names the account, every message ends up
stored byte-exact exactly once, and nothing leaves the server before it is stored.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from builders import NAME, USER, account, expected, mailbox, message, served, sha
from mailingest.config import Secret
from mailingest.fetch import FetchResult
from mailingest.store import Store
from pop3d import Faults, Pop3d, Pop3TestServer, first_session
from support import assert_failed, fetch, stored_hashes

MESSAGES = [message(i) for i in range(1, 6)]


def assert_ok(result: FetchResult, new: int | None = None) -> None:
    assert result.status == "ok" and result.error is None, result
    if new is not None:
        assert result.new == new, result


# -- happy path ------------------------------------------------------------------------------


async def test_fetch_stores_every_message_byte_exact_and_the_next_fetch_nothing(
    store: Store,
    pop3d: Pop3d,
) -> None:
    server = await pop3d([mailbox(MESSAGES)])
    acc = account(server.port)
    first = await fetch(acc, store)
    assert_ok(first, new=len(MESSAGES))
    assert first.bytes == sum(len(served(m)) for m in MESSAGES)
    assert first.deleted == 0
    second = await fetch(acc, store)
    assert_ok(second, new=0)
    assert server.commands_seen("RETR") == len(MESSAGES)  # nothing fetched twice
    assert server.commands_seen("DELE") == 0
    assert server.mailbox(USER).remaining() == len(MESSAGES)  # leave_on_server default
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


async def test_leave_on_server_false_deletes_everything_after_storing_it(
    store: Store, pop3d: Pop3d
) -> None:
    server = await pop3d([mailbox(MESSAGES)])
    result = await fetch(account(server.port, leave_on_server=False), store)
    assert_ok(result, new=len(MESSAGES))
    assert result.deleted == len(MESSAGES)
    assert server.mailbox(USER).remaining() == 0
    assert server.mailbox(USER).deleted_total == len(MESSAGES)
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


@pytest.mark.parametrize(
    "capa",
    [
        pytest.param(["TOP", "USER", "UIDL", "PIPELINING", "RESP-CODES"], id="pipelining"),
        pytest.param(["TOP", "USER", "UIDL", "RESP-CODES"], id="no-pipelining"),
        pytest.param(None, id="no-capa"),
    ],
)
async def test_every_capability_set_stores_and_deletes_everything(
    store: Store, capa: list[str] | None, pop3d: Pop3d
) -> None:
    messages = [message(i) for i in range(1, 41)]  # more than one pipeline window
    server = await pop3d([mailbox(messages)], Faults(capa=capa))
    result = await fetch(account(server.port, leave_on_server=False), store)
    assert_ok(result, new=len(messages))
    assert server.mailbox(USER).remaining() == 0
    assert server.commands_seen("RETR") == len(messages)
    assert server.errors == []
    assert await stored_hashes(store) == expected(messages)


# -- crashes and drops -------------------------------------------------------------------------


async def test_crash_between_commit_and_quit_deletes_without_refetch(
    store: Store, pop3d: Pop3d
) -> None:
    """QUIT never answered: no expunge; the next cycle DELEs from the ledger, RETRs nothing."""
    server = await pop3d([mailbox(MESSAGES)], first_session(Faults(drop_after="QUIT")))
    acc = account(server.port, leave_on_server=False)
    first = await fetch(acc, store)
    assert_failed(first, "temp_failed")
    assert await stored_hashes(store) == expected(MESSAGES)  # committed before DELE and QUIT
    assert server.commands_seen("DELE") == len(MESSAGES)
    assert server.mailbox(USER).remaining() == len(MESSAGES)  # no QUIT, no expunge
    retrieved = server.commands_seen("RETR")
    assert retrieved == len(MESSAGES)

    second = await fetch(acc, store)
    assert_ok(second, new=0)
    assert second.deleted == len(MESSAGES)
    assert server.commands_seen("RETR") == retrieved  # deleted without refetching
    assert server.mailbox(USER).remaining() == 0
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


async def test_drop_mid_retr_commits_what_came_whole_and_the_next_fetch_the_rest(
    store: Store,
    pop3d: Pop3d,
) -> None:
    server = await pop3d([mailbox(MESSAGES)], first_session(Faults(drop_mid_retr=3)))
    acc = account(server.port, leave_on_server=False)
    first = await fetch(acc, store)
    assert_failed(first, "temp_failed")
    assert await stored_hashes(store) == expected(MESSAGES[:2])  # 1 and 2 whole, 3 cut
    assert server.commands_seen("DELE") == 0
    assert server.mailbox(USER).remaining() == len(MESSAGES)

    second = await fetch(acc, store)
    assert_ok(second, new=len(MESSAGES) - 2)
    assert server.commands_seen("RETR 1") == 1 and server.commands_seen("RETR 2") == 1
    assert server.mailbox(USER).remaining() == 0
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)  # nothing lost, nothing twice


async def test_a_failed_session_still_reports_the_messages_it_stored(
    store: Store, pop3d: Pop3d
) -> None:
    server = await pop3d([mailbox(MESSAGES)], first_session(Faults(drop_mid_retr=3)))
    result = await fetch(account(server.port), store)
    assert_failed(result, "temp_failed")
    assert len(await stored_hashes(store)) == 2
    assert result.new == 2


async def test_sys_temp_on_retr_2_keeps_message_1_and_the_next_fetch_completes(
    store: Store,
    pop3d: Pop3d,
) -> None:
    faults = first_session(Faults(err_on={"RETR 2": "-ERR [SYS/TEMP] try later"}))
    server = await pop3d([mailbox(MESSAGES)], faults)
    acc = account(server.port, leave_on_server=False)
    first = await fetch(acc, store)
    assert_failed(first, "temp_failed")
    assert "SYS/TEMP" in (first.error or "")
    assert await stored_hashes(store) == expected(MESSAGES[:1])
    assert server.mailbox(USER).remaining() == len(MESSAGES)

    second = await fetch(acc, store)
    assert_ok(second, new=len(MESSAGES) - 1)
    assert server.mailbox(USER).remaining() == 0
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


async def test_in_use_after_pass_is_a_temporary_failure(store: Store, pop3d: Pop3d) -> None:
    faults = Faults(err_on={"PASS": "-ERR [IN-USE] locked"})
    server = await pop3d([mailbox(MESSAGES)], faults)
    result = await fetch(account(server.port, leave_on_server=False), store)
    assert_failed(result, "temp_failed")
    assert server.login_attempts == 1
    assert server.commands_seen("RETR") == 0 and server.commands_seen("DELE") == 0
    assert server.mailbox(USER).remaining() == len(MESSAGES)
    assert server.errors == []
    assert await stored_hashes(store) == []


async def test_wrong_password_is_auth_failed_after_exactly_one_pass(
    store: Store, pop3d: Pop3d
) -> None:
    wrong = Secret(source="literal", ref="", value="not-the-password")
    server = await pop3d([mailbox(MESSAGES)])
    result = await fetch(account(server.port, password=wrong), store)
    assert_failed(result, "auth_failed")
    assert "not-the-password" not in (result.error or "")
    assert server.login_attempts == 1 and server.commands_seen("PASS") == 1
    assert server.sessions == 0
    assert server.mailbox(USER).remaining() == len(MESSAGES)
    assert server.errors == []
    assert await stored_hashes(store) == []


# -- UIDL oddities -----------------------------------------------------------------------------


async def test_duplicate_uidls_in_one_listing_store_the_message_once(
    store: Store, pop3d: Pop3d
) -> None:
    same = message(1)
    box = mailbox([same, same, message(2)], uidls=["dup", "dup", "other"])
    server = await pop3d([box])
    acc = account(server.port)
    result = await fetch(acc, store)
    assert_ok(result, new=2)
    assert_ok(await fetch(acc, store), new=0)
    assert server.mailbox(USER).remaining() == 3
    assert server.errors == []
    assert await stored_hashes(store) == expected([same, message(2)])


async def test_duplicate_uidl_never_deletes_a_message_that_was_not_stored(
    store: Store, pop3d: Pop3d
) -> None:
    first, second = message(1), message(2, body=b"different content\n")
    box = mailbox([first, second], uidls=["dup", "dup"])
    server = await pop3d([box])
    result = await fetch(account(server.port, leave_on_server=False), store)
    assert server.errors == []
    digests = await stored_hashes(store)
    remaining = server.mailbox(USER).messages
    # Every message is either stored or still on the server.
    for raw in (first, second):
        assert sha(served(raw)) in digests or raw in remaining
    assert_ok(result, new=2)  # the server cannot tell them apart by UIDL; content can
    assert remaining == []


async def test_renumbered_uidls_do_not_store_the_same_content_twice(store: Store) -> None:
    async with Pop3TestServer([mailbox(MESSAGES)]) as server:
        assert_ok(await fetch(account(server.port), store), new=len(MESSAGES))
    renumbered = mailbox(MESSAGES, uidls=[f"new-{i}" for i in range(len(MESSAGES))])
    async with Pop3TestServer([renumbered]) as server:
        acc = account(server.port, leave_on_server=False)
        result = await fetch(acc, store)
        assert_ok(result, new=0)  # every message is a content duplicate
        assert result.deleted == len(MESSAGES)  # ledger rows were added: safe to delete
        assert server.mailbox(USER).remaining() == 0
        assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


# -- Gmail-like servers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_sessions", "stored_count"),
    [pytest.param(10, 1000, id="ten"), pytest.param(1, 250, id="one")],
)
async def test_capped_listing_is_drained_by_several_sessions_in_one_fetch(
    store: Store, max_sessions: int, stored_count: int, pop3d: Pop3d
) -> None:
    messages = [message(i) for i in range(1000)]
    faults = Faults(max_list=250, hide_retrieved=True)
    server = await pop3d([mailbox(messages)], faults)
    result = await fetch(account(server.port), store, max_sessions=max_sessions)
    assert_ok(result, new=stored_count)
    assert result.sessions == min(max_sessions, 5)  # 4 x 250, then an empty one
    assert server.commands_seen("RETR") == stored_count
    assert server.errors == []
    assert await stored_hashes(store) == expected(messages[:stored_count])


@pytest.mark.pop3d_faults(max_list=250)
async def test_capped_listing_with_deleting_drains_the_mailbox(store: Store, pop3d: Pop3d) -> None:
    messages = [message(i) for i in range(600)]
    server = await pop3d([mailbox(messages)])
    result = await fetch(account(server.port, leave_on_server=False), store)
    assert_ok(result, new=600)
    assert result.deleted == 600
    assert server.mailbox(USER).remaining() == 0
    assert server.errors == []
    assert await stored_hashes(store) == expected(messages)


@pytest.mark.pop3d_faults(hide_retrieved=True)
async def test_gmail_normal_mode_hides_what_a_session_retrieved_but_all_is_stored(
    store: Store,
    pop3d: Pop3d,
) -> None:
    server = await pop3d([mailbox(MESSAGES)])
    acc = account(server.port)
    assert_ok(await fetch(acc, store), new=len(MESSAGES))
    assert_ok(await fetch(acc, store), new=0)
    assert server.commands_seen("RETR") == len(MESSAGES)
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


async def test_messages_are_committed_before_quit_even_when_quit_fails(
    store: Store, pop3d: Pop3d
) -> None:
    """Gmail applies QUIT (hides what was RETRieved) even if its reply never arrives.

    Without a DELE in the session the reply is not awaited (it says nothing we act on): the
    fetch is ok. After a DELE, a lost reply is a temporary failure (the hang tests)."""
    faults = Faults(hide_retrieved=True, reply_override={"QUIT": b""})
    server = await pop3d([mailbox(MESSAGES)], faults)
    acc = account(server.port)
    result = await fetch(acc, store)
    assert_ok(result, new=len(MESSAGES))
    assert server.commands_seen("QUIT") == 1
    assert await stored_hashes(store) == expected(MESSAGES)  # hidden now, but safely stored
    assert_ok(await fetch(acc, store), new=0)
    assert server.errors == []


@pytest.mark.pop3d_faults(login_delay=300)
async def test_login_delay_ends_the_cycle_instead_of_a_refused_second_login(
    store: Store,
    pop3d: Pop3d,
) -> None:
    server = await pop3d([mailbox(MESSAGES)])
    acc = account(server.port)
    result = await fetch(acc, store)
    assert await stored_hashes(store) == expected(MESSAGES)
    assert server.login_attempts == 1
    assert_ok(result, new=len(MESSAGES))
    again = await fetch(acc, store)  # too early: no login at all, a temporary failure
    assert_failed(again, "temp_failed")
    assert "LOGIN-DELAY" in (again.error or "")
    assert server.login_attempts == 1
    assert server.errors == []


async def test_login_delay_error_is_temporary_and_moves_the_next_login(
    store: Store, pop3d: Pop3d
) -> None:
    faults = first_session(Faults(err_on={"PASS": "-ERR [LOGIN-DELAY] wait"}, login_delay=5))
    server = await pop3d([mailbox(MESSAGES)], faults)
    result = await fetch(account(server.port), store)
    assert result.status == "temp_failed" and "LOGIN-DELAY" in (result.error or "")
    allowed = await store.next_login(NAME)
    assert allowed is not None
    attempts = server.login_attempts
    again = await fetch(account(server.port), store)
    assert again.status == "temp_failed" and server.login_attempts == attempts
    assert await stored_hashes(store) == []


async def test_a_per_user_login_delay_paces_the_next_login_though_the_listing_failed(
    store: Store, pop3d: Pop3d
) -> None:
    """The CAPA after the login goes out with UIDL and LIST; its LOGIN-DELAY (RFC 2449:
    per user, told only after the login) counts even when UIDL is refused."""
    faults = Faults(capa_after_login=["LOGIN-DELAY 3600"], err_on={"UIDL": "-ERR [SYS/TEMP] busy"})
    server = await pop3d([mailbox(MESSAGES)], faults)
    before = datetime.now(UTC)
    result = await fetch(account(server.port), store)
    assert result.status == "temp_failed", result
    allowed = await store.next_login(NAME)
    assert allowed is not None and allowed - before >= timedelta(seconds=3500), allowed
    assert server.commands_seen("CAPA") == 2 and server.login_attempts == 1


async def test_malformed_capa_after_the_login_is_named_as_such(store: Store, pop3d: Pop3d) -> None:
    faults = Faults(capa_after_login=["X-\xe9t\xe9"])
    server = await pop3d([mailbox(MESSAGES)], faults)
    result = await fetch(account(server.port), store)
    assert result.status != "ok" and "CAPA" in (result.error or ""), result
    assert "UIDL" not in (result.error or "")
    assert await stored_hashes(store) == []


async def test_disk_full_while_spooling_stops_without_dele(
    store: Store, monkeypatch: pytest.MonkeyPatch, pop3d: Pop3d
) -> None:
    from mailingest import retrieval

    real_write = retrieval.Spool.write
    writes = 0

    def full(self: Any, data: bytes) -> None:
        nonlocal writes
        writes += 1
        if writes > 1:  # the disk fills up during the second message
            raise OSError(28, "No space left on device")
        real_write(self, data)

    server = await pop3d([mailbox(MESSAGES)])
    monkeypatch.setattr(retrieval.Spool, "write", full)
    result = await fetch(account(server.port, leave_on_server=False), store)
    assert result.status == "temp_failed"
    assert "No space left on device" in (result.error or "") and NAME in (result.error or "")
    assert server.mailbox(USER).remaining() == len(MESSAGES)
    monkeypatch.setattr(retrieval.Spool, "write", real_write)
    # The message spooled whole before the disk filled was committed (never DELEted).
    assert_ok(
        await fetch(account(server.port, leave_on_server=False), store), new=len(MESSAGES) - 1
    )
    assert server.mailbox(USER).remaining() == 0
    assert await stored_hashes(store) == expected(MESSAGES)
