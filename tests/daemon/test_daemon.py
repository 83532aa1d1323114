"""The daemon in-process against the scripted POP3 server: backoff, pause, reload, LOGIN-DELAY.

Intervals are fractions of a second and the backoff is injected small, so each test runs
a few seconds; every wait is bounded and no assertion depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from builders import loopback_account, make_message
from daemon_support import events, running, until
from dovecot import free_port
from mailingest import commands, lease
from mailingest.config import Account, load_config
from mailingest.daemon import Daemon
from mailingest.daemon import runner as runner_module
from mailingest.fetch import FetchResult, fetch_account
from mailingest.logs import capture
from mailingest.retry import Backoff
from mailingest.store import Store
from pop3d import Faults, Mailbox, Pop3TestServer
from support import write_config

PASSWORD = "Right-Horse-7"
WRONG = "Wrong-Horse-7"
BOUND = 30.0
FAST = Backoff(initial=0.2, cap=1.6)


def account(port: int, name: str, **overrides: Any) -> dict[str, Any]:
    return loopback_account(
        port, **({"name": name, "username": "u", "password": PASSWORD} | overrides)
    )


def config_file(tmp_path: Path, accounts: list[dict[str, Any]], **daemon: Any) -> Path:
    settings = {"poll_interval": "0.5s", "shutdown_timeout": "5s", **daemon}
    return write_config(tmp_path, accounts, daemon=settings)


class Recorder:
    """The real fetch, with the start time of every poll noted per account."""

    def __init__(self) -> None:
        self.starts: dict[str, list[float]] = {}

    async def __call__(self, account: Account, store: Store, **kwargs: Any) -> FetchResult:
        self.starts.setdefault(account.name, []).append(time.monotonic())
        return await fetch_account(account, store, **kwargs)

    def polls(self, name: str) -> int:
        return len(self.starts.get(name, []))


async def private_with_a_lead(tmp_path: Path, port: int) -> Daemon:
    """A daemon polling account "a" (private, hourly) of a store that knows one lead."""
    config = config_file(tmp_path, [account(port, "a")], poll_interval="1h")
    csv = "id,kind,email,name\nL1,lead,lead@example.org,Lead\n"
    await commands.records_import(load_config(config), csv, "records.csv")
    return Daemon(load_config(config), config, backoff=FAST)


async def status(config: Path) -> dict[str, dict[str, Any]]:
    return {row["account"]: row for row in await commands.status(load_config(config))}


async def test_transient_failures_back_off_with_growing_delays_while_others_keep_polling(
    tmp_path: Path,
) -> None:
    good = Pop3TestServer([Mailbox("u", PASSWORD, [make_message(1)])])
    temp = Pop3TestServer(
        [Mailbox("u", PASSWORD, [make_message(2)])],
        Faults(err_on={"PASS": "-ERR [SYS/TEMP] maintenance, try later"}),
    )
    drop = Pop3TestServer([Mailbox("u", PASSWORD, [make_message(3)])], Faults(drop_mid_retr=1))
    async with good, temp, drop:
        config = config_file(
            tmp_path,
            [
                account(good.port, "good"),
                account(temp.port, "temp"),
                account(drop.port, "drop"),
                account(free_port(), "refused"),  # nothing listens there
            ],
        )
        recorder = Recorder()
        daemon = Daemon(load_config(config), config, backoff=FAST, fetch=recorder)
        bad = ("temp", "drop", "refused")
        with capture() as logs:
            async with running(daemon):
                await until(
                    lambda: all(len(events(logs, "retry_scheduled", n)) >= 5 for n in bad),
                    "five retries of each failing account",
                )
    expected_kind = {"temp": "temp_failed", "drop": "temp_failed", "refused": "unavailable"}
    for name in bad:
        retries = events(logs, "retry_scheduled", name)
        assert [e["attempt"] for e in retries[:5]] == [1, 2, 3, 4, 5]
        assert {e["error_kind"] for e in retries} == {expected_kind[name]}
        waits = [e["wait_s"] for e in retries]
        assert all(a < b for a, b in itertools.pairwise(waits[:4])), waits  # growing
        assert max(waits) <= FAST.cap, waits  # capped
        assert waits[0] <= 0.2 * (1 + FAST.jitter) + 0.001, waits
    # The healthy account polled on its own interval the whole time: the failing ones' retries
    # (about 4 s of backoff each) never held it back.
    assert recorder.polls("good") >= 5
    assert len(events(logs, "poll_completed", "good")) == recorder.polls("good")
    rows = await status(config)
    for name in bad:
        assert rows[name]["consecutive_failures"] >= 5
        assert rows[name]["next_poll"] is not None
        assert rows[name]["paused"] is False
    assert rows["good"]["result"] == "ok" and rows["good"]["stored"] == 1
    assert rows["good"]["consecutive_failures"] == 0


async def test_a_dropped_retrieval_is_retried_and_every_message_stored_once(
    tmp_path: Path,
) -> None:
    messages = [make_message(i) for i in range(1, 6)]
    faults = Faults(per_session=lambda n: Faults(drop_mid_retr=2) if n < 2 else Faults())
    server = Pop3TestServer([Mailbox("u", PASSWORD, list(messages))], faults)
    async with server:
        config = config_file(tmp_path, [account(server.port, "a", leave_on_server=False)])
        daemon = Daemon(load_config(config), config, backoff=FAST)
        with capture() as logs:
            async with running(daemon):
                await until(lambda: bool(events(logs, "poll_completed", "a")), "a good poll")
    assert len(events(logs, "retry_scheduled", "a")) == 2
    rows = await status(config)
    assert rows["a"]["stored"] == len(messages)
    assert rows["a"]["consecutive_failures"] == 0
    assert server.mailboxes[0].remaining() == 0  # deleted only once stored


async def test_wrong_password_pauses_after_one_login_and_a_reload_with_the_fix_resumes(
    tmp_path: Path,
) -> None:
    server = Pop3TestServer([Mailbox("u", PASSWORD, [make_message(1), make_message(2)])])
    async with server:
        config = config_file(tmp_path, [account(server.port, "a", password=WRONG)])
        daemon = Daemon(load_config(config), config, backoff=FAST)
        with capture() as logs:
            async with running(daemon):
                await until(lambda: bool(events(logs, "account_paused", "a")), "the pause")
                await asyncio.sleep(2.0)  # four poll intervals: no login may come
                assert server.login_attempts == 1
                rows = await status(config)
                assert rows["a"]["paused"] is True
                assert rows["a"]["pause_reason"] == "auth_failed"
                assert rows["a"]["result"] == "auth_failed"
                assert rows["a"]["next_poll"] is None
                # A reload that changes something else keeps the pause: same rejected login.
                config_file(tmp_path, [account(server.port, "a", password=WRONG, timeout="6s")])
                daemon.reload()
                await until(lambda: bool(events(logs, "config_reloaded")), "the first reload")
                await asyncio.sleep(1.0)
                assert server.login_attempts == 1
                # The CRM's password-change flow: the fixed password arrives with a reload.
                config_file(tmp_path, [account(server.port, "a")])
                daemon.reload()
                await until(lambda: bool(events(logs, "poll_completed", "a")), "a good poll")
    assert len(events(logs, "account_paused")) == 1
    assert events(logs, "account_paused")[0]["reason"] == "auth_failed"
    assert events(logs, "account_resumed", "a")[0]["reason"] == "credentials_changed"
    assert events(logs, "config_reloaded")[-1]["changed"] == ["a"]
    rows = await status(config)
    assert rows["a"]["paused"] is False and rows["a"]["pause_reason"] is None
    assert rows["a"]["stored"] == 2


async def test_a_pause_survives_a_restart_until_the_password_changes(tmp_path: Path) -> None:
    server = Pop3TestServer([Mailbox("u", PASSWORD, [make_message(1)])])
    async with server:
        config = config_file(tmp_path, [account(server.port, "a", password=WRONG)])
        with capture() as logs:
            async with running(Daemon(load_config(config), config)):
                await until(lambda: bool(events(logs, "account_paused")), "the pause")
            async with running(Daemon(load_config(config), config)):
                await asyncio.sleep(1.5)  # the first poll would come within 0.5 s
            assert server.login_attempts == 1
            assert (await status(config))["a"]["paused"] is True
            config_file(tmp_path, [account(server.port, "a")])
            async with running(Daemon(load_config(config), config)):
                await until(lambda: bool(events(logs, "poll_completed", "a")), "a good poll")
    assert [e["event"] for e in logs if e["event"].startswith("account_")] == [
        "account_paused",
        "account_resumed",
    ]
    assert (await status(config))["a"]["stored"] == 1


async def test_reload_keeps_the_old_config_when_invalid_adds_and_removes_accounts(
    tmp_path: Path,
) -> None:
    server = Pop3TestServer(
        [Mailbox("u", PASSWORD, [make_message(1)]), Mailbox("v", PASSWORD, [make_message(2)])]
    )
    async with server:
        config = config_file(tmp_path, [account(server.port, "a")])
        recorder = Recorder()
        daemon = Daemon(load_config(config), config, backoff=FAST, fetch=recorder)
        with capture() as logs:
            async with running(daemon):
                await until(lambda: recorder.polls("a") >= 1, "a's first poll")
                config.write_text("[daemon\npoll_interval = ", encoding="utf-8")
                daemon.reload()
                await until(lambda: bool(events(logs, "config_rejected")), "the rejection")
                before = recorder.polls("a")
                await until(lambda: recorder.polls("a") >= before + 2, "a to keep polling")
                config_file(
                    tmp_path, [account(server.port, "a"), account(server.port, "b", username="v")]
                )
                daemon.reload()
                await until(lambda: bool(events(logs, "poll_completed", "b")), "b's first poll")
                config_file(tmp_path, [account(server.port, "b", username="v")])
                daemon.reload()
                await until(lambda: len(events(logs, "config_reloaded")) == 2, "the removal")
                await asyncio.sleep(0.6)  # a poll of a that was under way may finish
                after = recorder.polls("a")
                await asyncio.sleep(1.5)
                assert recorder.polls("a") == after
                assert recorder.polls("b") >= 2
    rejected = events(logs, "config_rejected")[0]
    assert "invalid TOML" in rejected["error"]
    first, second = events(logs, "config_reloaded")
    assert (first["added"], first["removed"]) == (["b"], [])
    assert (second["added"], second["removed"]) == ([], ["a"])


async def test_login_delay_moves_the_next_poll_past_the_servers_limit(tmp_path: Path) -> None:
    server = Pop3TestServer([Mailbox("u", PASSWORD, [make_message(1)])], Faults(login_delay=120))
    async with server:
        config = config_file(tmp_path, [account(server.port, "a")])
        with capture() as logs:
            async with running(Daemon(load_config(config), config, backoff=FAST)):
                await until(lambda: bool(events(logs, "poll_completed", "a")), "a good poll")
                await asyncio.sleep(1.5)  # three intervals of 0.5 s
                assert server.login_attempts == 1
    next_poll = datetime.fromisoformat((await status(config))["a"]["next_poll"])
    assert (next_poll - datetime.now(UTC)).total_seconds() > 100


async def test_at_most_max_concurrent_polls_run_at_once(tmp_path: Path) -> None:
    boxes = [Mailbox(f"u{i}", PASSWORD, [make_message(i)]) for i in range(6)]
    server = Pop3TestServer(boxes, Faults(delay={"UIDL": 0.3}))
    async with server:
        accounts = [account(server.port, f"a{i}", username=f"u{i}") for i in range(6)]
        config = config_file(tmp_path, accounts, max_concurrent=2)
        active = peak = 0

        async def counting(acct: Account, store: Store, **kwargs: Any) -> FetchResult:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            try:
                return await fetch_account(acct, store, **kwargs)
            finally:
                active -= 1

        done: set[str] = set()

        async def noting(acct: Account, store: Store, **kwargs: Any) -> FetchResult:
            result = await counting(acct, store, **kwargs)
            done.add(acct.name)
            return result

        async with running(Daemon(load_config(config), config, fetch=noting)):
            await until(lambda: len(done) == 6, "every account to poll")
    assert peak == 2


async def test_poll_failed_in_the_daemon_carries_the_backoff_wait_before_the_retry(
    tmp_path: Path,
) -> None:
    faults = Faults(
        per_session=lambda n: (
            Faults(err_on={"PASS": "-ERR [SYS/TEMP] maintenance, try later"}) if n < 2 else Faults()
        )
    )
    server = Pop3TestServer([Mailbox("u", PASSWORD, [make_message(1)])], faults)
    async with server:
        config = config_file(tmp_path, [account(server.port, "a")])
        with capture() as logs:
            async with running(Daemon(load_config(config), config, backoff=FAST)):
                await until(lambda: bool(events(logs, "poll_completed", "a")), "a good poll")
    failed = events(logs, "poll_failed", "a")
    retries = events(logs, "retry_scheduled", "a")
    assert len(failed) == len(retries) == 2
    for line, retry in zip(failed, retries, strict=True):
        assert line["error_kind"] == "temp_failed" and line["log_level"] == "warning"
        assert "SYS/TEMP" in line["error"]
        assert line["retry_in_s"] == retry["wait_s"] > 0
    # Each poll_failed comes before its retry_scheduled: one failure, one line of each.
    order = [e["event"] for e in logs if e["event"] in ("poll_failed", "retry_scheduled")]
    assert order == ["poll_failed", "retry_scheduled"] * 2


async def test_poll_failed_of_a_rejected_login_has_no_retry_wait_the_account_pauses(
    tmp_path: Path,
) -> None:
    server = Pop3TestServer([Mailbox("u", PASSWORD, [make_message(1)])])
    async with server:
        config = config_file(tmp_path, [account(server.port, "a", password=WRONG)])
        with capture() as logs:
            async with running(Daemon(load_config(config), config, backoff=FAST)):
                await until(lambda: bool(events(logs, "account_paused", "a")), "the pause")
    [failed] = events(logs, "poll_failed", "a")
    assert (failed["error_kind"], failed["retry_in_s"]) == ("auth_failed", None)
    assert failed["log_level"] == "error"


async def test_a_cycle_cut_short_by_login_delay_polls_again_once_the_delay_allows(
    tmp_path: Path,
) -> None:
    """Five messages, two listed per session (as Gmail caps a listing), a 2 s LOGIN-DELAY
    and an hourly poll: the daemon drains the mailbox in sessions 2 s apart, not hours."""
    messages = [make_message(i) for i in range(1, 6)]
    server = Pop3TestServer(
        [Mailbox("u", PASSWORD, list(messages))], Faults(max_list=2, login_delay=2)
    )
    async with server:
        config = config_file(
            tmp_path, [account(server.port, "a", leave_on_server=False)], poll_interval="1h"
        )
        async with running(Daemon(load_config(config), config, backoff=FAST)):
            await until(lambda: server.sessions >= 2, "the second session", within=20.0)
            await until(lambda: server.mailboxes[0].remaining() == 0, "the mailbox drained")
            # The session that found nothing new ends the early polls: back to the interval.
            await until(lambda: server.sessions >= 4, "the session that finds nothing new")

            async def next_poll_in() -> float:
                when = (await status(config))["a"]["next_poll"]
                return (datetime.fromisoformat(when) - datetime.now(UTC)).total_seconds()

            deadline = time.monotonic() + BOUND
            while await next_poll_in() < 1800:
                assert time.monotonic() < deadline, "the next poll never went back to 1 h"
                await asyncio.sleep(0.05)
            assert server.sessions == 4
    assert server.login_attempts == server.sessions  # never a login the server refused
    rows = await status(config)
    assert rows["a"]["stored"] == len(messages)


async def test_mail_a_poll_stores_under_old_sharing_settings_is_retagged_when_it_ends(
    tmp_path: Path,
) -> None:
    """A reload to `public` while a poll retrieves under `private`: that poll tags what it
    stores the old way, so its account is re-tagged once it ends, not left half-applied.
    The change came through the API: the put-off re-tag is still audited as its caller's."""
    messages = [make_message(i) for i in range(1, 4)]
    faults = Faults(per_session=lambda n: Faults(delay={"RETR 3": 3.0}) if n == 0 else Faults())
    server = Pop3TestServer([Mailbox("u", PASSWORD, list(messages))], faults)
    async with server:
        daemon = await private_with_a_lead(tmp_path, server.port)
        with capture() as logs:
            async with running(daemon):
                await until(lambda: server.commands_seen("RETR 3") > 0, "the slow retrieval")
                with daemon.changing("a", "api:alice"):  # the request ends before the poll
                    config_file(tmp_path, [account(server.port, "a", sharing="public")])
                    daemon.reload()
                    await until(lambda: "a" in daemon.retag_pending, "the re-tag put off")
                await until(lambda: bool(events(logs, "poll_completed", "a")), "the poll's end")
                await until(lambda: not daemon.retag_pending, "the re-tag after the poll")
                seen = await daemon.store.messages("bob")
                [change] = await daemon.store.audit(account="a")
    assert events(logs, "mail_retagged")[-1]["accounts"] == ["a"]
    assert (change.action, change.actor) == ("sharing_changed", "api:alice")
    assert [(m.visibility, m.reason) for m in seen] == [("shared", "public")] * len(messages)


def test_the_daemon_raises_its_open_file_limit_to_the_hard_limit() -> None:
    """systemd starts services with a soft limit of 1,024 open files; hundreds of sessions
    and API clients need more."""
    import resource
    import subprocess
    import sys

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    code = (
        "import resource; from mailingest.daemon import process; process.raise_fd_limit(); "
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        check=True,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )
    expected = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    assert int(done.stdout) == max(256, expected)


async def test_a_reload_while_a_poll_is_being_claimed_retags_what_that_poll_stores(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A claim may wait for its batch (store/polls.py): a reload to `public` meanwhile finds
    the poll under way already, puts the re-tag off to its end, and what it stored under
    `private` is re-tagged then, not left tagged the old way."""
    messages = [make_message(i) for i in range(1, 3)]
    server = Pop3TestServer([Mailbox("u", PASSWORD, list(messages))])
    claiming, go_on = asyncio.Event(), asyncio.Event()

    async def held_claim(*args: Any, **kwargs: Any) -> Any:
        claiming.set()
        await go_on.wait()
        return await lease.take_poll(*args, **kwargs)

    monkeypatch.setattr(runner_module, "take_poll", held_claim)
    async with server:
        daemon = await private_with_a_lead(tmp_path, server.port)
        with capture() as logs:
            async with running(daemon):
                await until(claiming.is_set, "the claim")
                config_file(tmp_path, [account(server.port, "a", sharing="public")])
                daemon.reload()
                await until(lambda: "a" in daemon.retag_pending, "the re-tag put off")
                go_on.set()
                await until(lambda: bool(events(logs, "poll_completed", "a")), "the poll's end")
                await until(lambda: not daemon.retag_pending, "the re-tag after the poll")
                seen = await daemon.store.messages("bob")
    assert [(m.visibility, m.reason) for m in seen] == [("shared", "public")] * len(messages)
