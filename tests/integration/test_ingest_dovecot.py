"""Core ingestion against a real Dovecot: byte-exact, exactly once, leave-on-server, TLS, auth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from builders import crlf, dovecot_account, make_message, sha
from dovecot import Mailbox
from support import StoreAt, fetch_json, poplib_digests, run_cli, write_config

ODD_MESSAGES = [
    make_message(1),
    make_message(2, body=b".starts with a dot\n..two dots\n.\nnot the end\n"),
    make_message(3, body=b"x" * 150_000 + b"\nlong line above\n"),
    make_message(4, body=b"no final newline"),
    make_message(5, body="Grüße, ünïcödé body\n".encode()),
    b"Subject: =?utf-8?q?Angebot_f=C3=BCr_Q4?=\nFrom: a@b.example\n\nbody\n",
    b"From: broken <<<@@@\nSubject: \xff\xfe 8-bit junk\n\n\x00 NUL byte\n",
]


def _stored(at: StoreAt) -> list[tuple[str, int, str]]:
    return [
        (r[0], r[1], r[2])
        for r in at.query("SELECT sha256, size, direction FROM messages ORDER BY id")
    ]


def test_every_message_stored_byte_exact_and_once(
    tmp_path: Path, store_at: StoreAt, mailbox: Mailbox
) -> None:
    mailbox.deliver_many(ODD_MESSAGES)
    reference = sorted(
        poplib_digests(
            mailbox.dovecot.host, mailbox.dovecot.port, mailbox.user, mailbox.password, 20
        )
    )
    config = write_config(tmp_path, storage=store_at.storage(), accounts=[dovecot_account(mailbox)])

    code, out = fetch_json(config)

    assert code == 0, out
    [result] = out["accounts"]
    assert result["status"] == "ok" and result["error"] is None
    assert result["new"] == len(ODD_MESSAGES)
    assert sorted(row[0] for row in _stored(store_at)) == reference
    assert sorted(sha(crlf(m)) for m in ODD_MESSAGES) == reference
    assert mailbox.count() == len(ODD_MESSAGES)  # leave_on_server defaults to true

    code, again = fetch_json(config)
    assert code == 0 and again["accounts"][0]["new"] == 0
    assert len(_stored(store_at)) == len(ODD_MESSAGES)


def test_show_raw_returns_the_exact_bytes(
    tmp_path: Path, store_at: StoreAt, mailbox: Mailbox
) -> None:
    mailbox.deliver_many(ODD_MESSAGES[:3])
    config = write_config(tmp_path, storage=store_at.storage(), accounts=[dovecot_account(mailbox)])
    assert fetch_json(config)[0] == 0
    listing = json.loads(run_cli(config, "messages", "--viewer", "alice", "--json").stdout)
    assert len(listing) == 3
    for item in listing:
        raw = run_cli(config, "show", str(item["id"]), "--viewer", "alice", "--raw").stdout
        assert sha(raw) == item["sha256"] and len(raw) == item["size"]
    denied = run_cli(config, "show", str(listing[0]["id"]), "--viewer", "mallory")
    assert denied.returncode == 77


def test_leave_on_server_false_empties_the_server(
    tmp_path: Path, store_at: StoreAt, mailbox: Mailbox
) -> None:
    mailbox.deliver_many(make_message(i) for i in range(20))
    config = write_config(
        tmp_path,
        storage=store_at.storage(),
        accounts=[dovecot_account(mailbox, leave_on_server=False)],
    )

    code, out = fetch_json(config)

    assert code == 0
    assert out["accounts"][0]["new"] == 20 and out["accounts"][0]["deleted"] == 20
    assert mailbox.count() == 0
    assert len(_stored(store_at)) == 20


def test_recent_login_uses_identity_after_prefix(
    tmp_path: Path, store_at: StoreAt, mailbox: Mailbox
) -> None:
    mailbox.deliver(make_message(1, sender="friend@example.org"))
    mailbox.deliver(make_message(2, sender=mailbox.user))  # the owner's own sent mail
    account = dovecot_account(mailbox, username=mailbox.recent_user)
    config = write_config(tmp_path, storage=store_at.storage(), accounts=[account])

    code, out = fetch_json(config)

    assert code == 0, out
    assert out["accounts"][0]["new"] == 2
    assert sorted(row[2] for row in _stored(store_at)) == ["in", "out"]
    assert mailbox.count() == 2


def test_recent_with_deleting_is_a_config_error(
    tmp_path: Path, store_at: StoreAt, mailbox: Mailbox
) -> None:
    account = dovecot_account(mailbox, username=mailbox.recent_user, leave_on_server=False)
    config = write_config(tmp_path, storage=store_at.storage(), accounts=[account])
    proc = run_cli(config, "fetch")
    assert proc.returncode == 78
    assert b'accounts[0] ("acct").leave_on_server' in proc.stderr
    assert b"other clients" in proc.stderr


def test_wrong_password_exit_77_and_one_login_attempt(
    tmp_path: Path, store_at: StoreAt, mailbox: Mailbox
) -> None:
    mailbox.deliver(make_message(1))
    before = mailbox.dovecot.password_mismatches(mailbox.user, settle=0.2)
    config = write_config(
        tmp_path,
        storage=store_at.storage(),
        accounts=[dovecot_account(mailbox, password="wrong-Pw-481516")],
    )

    code, out = fetch_json(config)

    assert code == 77
    assert out["accounts"][0]["status"] == "auth_failed"
    assert "login rejected" in out["accounts"][0]["error"]
    assert mailbox.dovecot.password_mismatches(mailbox.user) - before == 1
    assert mailbox.count() == 1


def test_pop3s_self_signed_rejected_without_ca_file(
    tmp_path: Path, store_at: StoreAt, mailbox: Mailbox
) -> None:
    mailbox.deliver(make_message(1))
    server = mailbox.dovecot
    plain = {"security": "tls", "port": server.ssl_port, "host": "localhost"}
    del_keys = {"allow_plaintext"}
    account = {k: v for k, v in dovecot_account(mailbox, **plain).items() if k not in del_keys}
    config = write_config(tmp_path, storage=store_at.storage(), accounts=[account])

    code, out = fetch_json(config)
    assert code == 69
    assert out["accounts"][0]["status"] == "tls_failed"
    assert "certificate" in out["accounts"][0]["error"]

    config = write_config(
        tmp_path,
        storage=store_at.storage(),
        accounts=[{**account, "ca_file": str(server.cert_path)}],
    )
    code, out = fetch_json(config)
    assert code == 0, out
    assert out["accounts"][0]["new"] == 1


def test_starttls_works_with_ca_file(tmp_path: Path, store_at: StoreAt, mailbox: Mailbox) -> None:
    mailbox.deliver(make_message(1))
    server = mailbox.dovecot
    account = dovecot_account(mailbox, security="starttls", ca_file=str(server.cert_path))
    del account["allow_plaintext"]
    config = write_config(tmp_path, storage=store_at.storage(), accounts=[account])

    code, out = fetch_json(config)
    assert code == 0, out
    assert out["accounts"][0]["new"] == 1

    proc = run_cli(config, "check", "--json")
    assert proc.returncode == 0
    [checked] = json.loads(proc.stdout)["accounts"]
    assert checked["pop3"]["status"] == "ok" and checked["pop3"]["messages"] == 1
    assert "STLS" in " ".join(checked["pop3"]["capabilities"]) or checked["pop3"]["capabilities"]
    assert checked["smtp"] is None


def test_plain_without_opt_in_is_a_config_error(
    tmp_path: Path, store_at: StoreAt, mailbox: Mailbox
) -> None:
    account = dovecot_account(mailbox)
    del account["allow_plaintext"]
    proc = run_cli(write_config(tmp_path, storage=store_at.storage(), accounts=[account]), "check")
    assert proc.returncode == 78
    assert b'accounts[0] ("acct").security' in proc.stderr


def test_several_accounts_return_the_worst_exit(
    tmp_path: Path, store_at: StoreAt, dovecot: object
) -> None:
    from dovecot import Dovecot

    assert isinstance(dovecot, Dovecot)
    good, bad = dovecot.new_mailbox(), dovecot.new_mailbox()
    good.deliver(make_message(1))
    config = write_config(
        tmp_path,
        storage=store_at.storage(),
        accounts=[
            dovecot_account(good, "good"),
            dovecot_account(bad, "bad", password="nope-nope-nope"),
        ],
    )
    code, out = fetch_json(config)
    assert code == 77
    statuses = {a["account"]: a["status"] for a in out["accounts"]}
    assert statuses == {"good": "ok", "bad": "auth_failed"}

    code, out = fetch_json(config, "--account", "good")
    assert code == 0 and [a["account"] for a in out["accounts"]] == ["good"]
    assert run_cli(config, "fetch", "--account", "nosuch").returncode == 64


def test_status_reports_last_poll(tmp_path: Path, store_at: StoreAt, mailbox: Mailbox) -> None:
    mailbox.deliver_many([make_message(1), make_message(2)])
    config = write_config(tmp_path, storage=store_at.storage(), accounts=[dovecot_account(mailbox)])
    fetch_json(config)
    proc = run_cli(config, "status", "--json")
    assert proc.returncode == 0
    [state] = json.loads(proc.stdout)["accounts"]
    assert state["account"] == "acct" and state["owner"] == "alice"
    assert state["result"] == "ok" and state["new"] == 2 and state["stored"] == 2
    assert state["paused"] is False and state["consecutive_failures"] == 0
    assert state["last_poll"].endswith("+00:00")


@pytest.mark.parametrize("uidl_format", ["%v-%u"])
def test_renumbered_uidls_do_not_duplicate(
    tmp_path: Path, store_at: StoreAt, dovecot: object, uidl_format: str
) -> None:
    from dovecot import Dovecot

    assert isinstance(dovecot, Dovecot)
    box = dovecot.new_mailbox()
    box.deliver_many(make_message(i) for i in range(5))
    config = write_config(tmp_path, storage=store_at.storage(), accounts=[dovecot_account(box)])
    assert fetch_json(config)[1]["accounts"][0]["new"] == 5
    dovecot.restart(uidl_format=uidl_format)
    try:
        code, out = fetch_json(config)
        assert code == 0 and out["accounts"][0]["new"] == 0
        assert len(_stored(store_at)) == 5
    finally:
        dovecot.restart(uidl_format="%08Xu%08Xv")


def test_repeated_fetches_never_retry_a_rejected_password(
    tmp_path: Path, store_at: StoreAt, mailbox: Mailbox
) -> None:
    """A timer-driven fetch honours the auth pause: one rejected login, then none."""
    mailbox.deliver(make_message(1))
    before = mailbox.dovecot.password_mismatches(mailbox.user, settle=0.2)
    config = write_config(
        tmp_path,
        storage=store_at.storage(),
        accounts=[dovecot_account(mailbox, password="wrong-Pw-271828")],
    )
    logged = []
    for _ in range(3):
        code, out, events = _fetch_logged(config)
        assert code == 77 and out["accounts"][0]["status"] == "auth_failed"
        logged += [e["event"] for e in events]
    assert "no login attempted" in out["accounts"][0]["error"]
    assert logged.count("account_paused") == 1  # as the daemon: once per pause
    assert mailbox.dovecot.password_mismatches(mailbox.user) - before == 1
    [state] = json.loads(run_cli(config, "status", "--json").stdout)["accounts"]
    assert state["paused"] is True and state["pause_reason"] == "auth_failed"

    config = write_config(
        tmp_path, storage=store_at.storage(), accounts=[dovecot_account(mailbox)]
    )  # the password is fixed
    code, out, events = _fetch_logged(config)
    assert code == 0 and out["accounts"][0]["new"] == 1
    assert [e["reason"] for e in events if e["event"] == "account_resumed"] == [
        "credentials_changed"
    ]
    [state] = json.loads(run_cli(config, "status", "--json").stdout)["accounts"]
    assert state["paused"] is False


def _fetch_logged(config: Path) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """`fetch --json` with JSON logs: exit code, the result, the logged events."""
    proc = run_cli(config, "--log-format", "json", "fetch", "--json")
    events = [json.loads(line) for line in proc.stderr.decode().splitlines()]
    return proc.returncode, json.loads(proc.stdout), events
