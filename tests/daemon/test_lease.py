"""One fetcher per account across processes: the lease in the store, on a real Dovecot."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from builders import crlf, dovecot_account, make_message, sha
from daemon_support import WAIT, DaemonProcess, wait_until
from dovecot import Mailbox
from mailingest.lease import lease_host
from mailingest.retrieval import BATCH_COUNT
from proxy import CommandProxy
from support import fetch_json, run_sql, write_config


def _stored(config: Path) -> list[str]:
    return [r[0] for r in run_sql(config.parent / "mail.db", "SELECT sha256 FROM messages")]


def _set_lease(config: Path, holder: str, expires_in: float) -> None:
    run_sql(
        config.parent / "mail.db",
        "INSERT INTO account_state (account, lease_holder, lease_expires) VALUES (?,?,?)"
        " ON CONFLICT (account) DO UPDATE SET lease_holder = excluded.lease_holder,"
        " lease_expires = excluded.lease_expires",
        "acct",
        holder,
        time.time() + expires_in,
    )


def test_overlapping_fetches_store_once_and_losers_report_busy(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    messages = [make_message(i, body=f"overlap {i}\n".encode() * 30) for i in range(1500)]
    mailbox.deliver_many(messages)
    config = write_config(tmp_path, [dovecot_account(mailbox, leave_on_server=False)])
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mailingest", "-c", str(config), "fetch", "--json"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(3)
    ]
    outcomes = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        outcomes.append((proc.returncode, json.loads(out)["accounts"][0]))
    for code, result in outcomes:
        assert code in (0, 75), outcomes
        if code == 75:
            assert result["status"] == "temp_failed" and "busy" in result["error"]
            assert result["new"] == 0 and result["deleted"] == 0
    assert any(code == 0 for code, _ in outcomes)
    assert any(code == 75 for code, _ in outcomes), "the three runs should overlap"
    mailbox.deliver_many(make_message(i + 5000) for i in range(10))

    assert fetch_json(config)[0] == 0
    stored = _stored(config)
    assert len(stored) == len(set(stored)) == 1510
    expected = {sha(crlf(m)) for m in messages} | {
        sha(crlf(make_message(i + 5000))) for i in range(10)
    }
    assert set(stored) == expected
    assert mailbox.count() == 0


def test_live_lease_of_another_host_makes_fetch_busy(tmp_path: Path, mailbox: Mailbox) -> None:
    mailbox.deliver(make_message(1))
    config = write_config(tmp_path, [dovecot_account(mailbox)])
    assert fetch_json(config)[0] == 0
    mailbox.deliver(make_message(2))
    _set_lease(config, "otherhost:4242:abcd", expires_in=60)

    code, out = fetch_json(config)

    assert code == 75
    assert "busy" in out["accounts"][0]["error"] and out["accounts"][0]["new"] == 0
    assert len(_stored(config)) == 1


def test_expired_or_dead_holder_lease_is_taken_over(tmp_path: Path, mailbox: Mailbox) -> None:
    mailbox.deliver(make_message(1))
    config = write_config(tmp_path, [dovecot_account(mailbox)])
    assert fetch_json(config)[0] == 0
    mailbox.deliver(make_message(2))
    _set_lease(config, "otherhost:4242:abcd", expires_in=-1)  # its holder died a while ago
    assert fetch_json(config)[1]["accounts"][0]["new"] == 1

    mailbox.deliver(make_message(3))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _set_lease(config, f"{lease_host()}:{dead.pid}:dead", expires_in=60)
    code, out = fetch_json(config)
    assert code == 0 and out["accounts"][0]["new"] == 1


def test_a_dead_pid_under_the_same_host_name_in_another_pid_namespace_is_not_taken_over(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    """Containers sharing a host name number their own processes: a PID that does not
    exist here may be alive there, so only the lease's expiry frees the account."""
    mailbox.deliver(make_message(1))
    config = write_config(tmp_path, [dovecot_account(mailbox)])
    assert fetch_json(config)[0] == 0
    mailbox.deliver(make_message(2))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other_container = f"{socket.gethostname()}/otherboot-4026531999"
    _set_lease(config, f"{other_container}:{dead.pid}:live", expires_in=60)
    code, out = fetch_json(config)
    assert code == 75 and "busy" in out["accounts"][0]["error"], out
    assert out["accounts"][0]["new"] == 0 and mailbox.count() == 2


def test_fetch_killed_holding_the_lease_does_not_block_the_next(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    mailbox.deliver_many(make_message(i, body=b"y" * 200_000 + b"\n") for i in range(100))
    config = write_config(tmp_path, [dovecot_account(mailbox, leave_on_server=False)])
    assert fetch_json(config, "--account", "acct")[0] == 0
    mailbox.deliver_many(make_message(i + 100, body=b"z" * 200_000 + b"\n") for i in range(100))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailingest", "-c", str(config), "fetch"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until it holds the lease
        held = run_sql(config.parent / "mail.db", "SELECT lease_holder FROM account_state")
        if held and held[0][0]:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    code, out = fetch_json(config)

    assert code == 0, out
    assert len(set(_stored(config))) == len(_stored(config)) == 200
    assert mailbox.count() == 0


def _lease_holder(config: Path) -> str | None:
    rows = run_sql(
        config.parent / "mail.db", "SELECT lease_holder FROM account_state", readonly=True
    )
    return rows[0][0] if rows else None


def test_daemon_killed_holding_the_lease_does_not_block_the_next_fetch(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    """`run` is SIGKILLed mid-cycle: one batch committed, nothing deleted, its lease left."""
    messages = [make_message(i) for i in range(300)]
    mailbox.deliver_many(messages)
    stalled, release = threading.Event(), threading.Event()

    def hold(line: bytes) -> None:
        # Batch 2 (from RETR 201) is retrieved while batch 1 (200) commits: stall it.
        if line.split() == [b"RETR", b"250"] and not stalled.is_set():
            stalled.set()
            release.wait(WAIT)  # blocks the proxy: the daemon waits, holding the lease

    try:
        with CommandProxy(mailbox.dovecot.port, hold) as proxy:
            account = dovecot_account(mailbox, port=proxy.port, leave_on_server=False)
            daemon_config = write_config(
                tmp_path, [account], daemon={"poll_interval": "1s", "log_format": "json"}
            )
            with DaemonProcess(daemon_config) as daemon:
                wait_until(stalled.is_set, "the daemon's cycle to reach RETR 250")
                holder = _lease_holder(daemon_config)
                assert holder is not None and holder.split(":")[1] == str(daemon.proc.pid)
                # Batch 1's commit goes on while batch 2 is stalled; batch 2 cannot commit.
                wait_until(lambda: len(_stored(daemon_config)) == BATCH_COUNT, "batch 1's commit")
                daemon.proc.send_signal(signal.SIGKILL)
                daemon.proc.wait(timeout=10)
            release.set()
    finally:
        release.set()
    assert _lease_holder(daemon_config) == holder  # killed holding it, nothing released it
    assert mailbox.count() == len(messages)  # no QUIT: nothing deleted

    config = write_config(tmp_path, [dovecot_account(mailbox, leave_on_server=False)])
    code, out = fetch_json(config)

    assert code == 0, out
    assert out["accounts"][0]["new"] == len(messages) - BATCH_COUNT
    assert out["accounts"][0]["deleted"] == len(messages)
    stored = _stored(config)
    assert len(stored) == len(set(stored)) == len(messages)
    assert set(stored) == {sha(crlf(m)) for m in messages}
    assert mailbox.count() == 0
    assert _lease_holder(config) is None
