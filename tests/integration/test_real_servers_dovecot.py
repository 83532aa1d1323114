"""The real-server rules against a real Dovecot: commit before QUIT, session draining, CR/LF
secrets, one fetcher per account (see also test_lease.py), and the CLI's JSON shapes."""

from __future__ import annotations

import json
from pathlib import Path

from builders import dovecot_account, make_message
from dovecot import Mailbox
from mailingest.fetch import LISTING_CAP
from proxy import CommandProxy
from support import fetch_json, run_cli, run_sql, write_config


def _count(config: Path) -> int:
    return int(run_sql(config.parent / "mail.db", "SELECT count(*) FROM messages")[0][0])


def test_every_retrieved_message_is_committed_before_quit(tmp_path: Path, mailbox: Mailbox) -> None:
    mailbox.deliver_many(make_message(i) for i in range(450))
    config_path = tmp_path / "mailingest.toml"
    seen_at_quit: list[int] = []
    retrs = 0

    def watch(line: bytes) -> None:
        nonlocal retrs
        if line.upper().startswith(b"RETR"):
            retrs += 1
        if line.upper().startswith(b"QUIT"):
            seen_at_quit.append(_count(config_path) if retrs else 0)

    with CommandProxy(mailbox.dovecot.port, watch) as proxy:
        config = write_config(tmp_path, [dovecot_account(mailbox, port=proxy.port)])
        code, out = fetch_json(config)

    assert code == 0, out
    assert retrs == 450
    # Each session's QUIT came after all it had RETRieved was committed (Gmail marks what a
    # session retrieved as downloaded at QUIT).
    assert seen_at_quit and seen_at_quit[0] == 450


def test_max_sessions_per_cycle_bounds_the_logins(tmp_path: Path, mailbox: Mailbox) -> None:
    mailbox.deliver_many(make_message(i) for i in range(5))
    logins: list[bytes] = []

    def watch(line: bytes) -> None:
        if line.upper().startswith(b"PASS"):
            logins.append(line)

    with CommandProxy(mailbox.dovecot.port, watch) as proxy:
        account = dovecot_account(mailbox, port=proxy.port)
        config = write_config(tmp_path, [account], daemon={"max_sessions_per_cycle": 1})
        assert fetch_json(config)[1]["accounts"][0]["new"] == 5
        assert len(logins) == 1  # the limit stops the draining session
        mailbox.deliver(make_message(99))
        config = write_config(tmp_path, [account], daemon={"max_sessions_per_cycle": 3})
        assert fetch_json(config)[1]["accounts"][0]["new"] == 1
        # six listed: nothing can have been held back, so no session follows to look
        assert len(logins) == 2
        mailbox.deliver_many(make_message(i) for i in range(100, 100 + LISTING_CAP))
        assert fetch_json(config)[1]["accounts"][0]["new"] == LISTING_CAP
        # a listing as long as Gmail's cap may be capped: a session follows that stored
        # mail, until one finds nothing new
        assert len(logins) == 4


def test_secret_with_a_line_break_is_a_config_error(tmp_path: Path, mailbox: Mailbox) -> None:
    secret = tmp_path / "pop.secret"
    secret.write_text(f"{mailbox.password}\nSTAT\n", encoding="utf-8")
    config = write_config(tmp_path, [dovecot_account(mailbox, password={"file": str(secret)})])
    proc = run_cli(config, "fetch")
    assert proc.returncode == 78
    assert b'accounts[0] ("acct").password' in proc.stderr
    assert mailbox.password.encode() not in proc.stderr


def test_json_shapes_of_check_status_and_records(tmp_path: Path, mailbox: Mailbox) -> None:
    mailbox.deliver(make_message(1, sender="lead@customer.example"))
    config = write_config(tmp_path, [dovecot_account(mailbox, magnet_label="CRM")])
    csv = tmp_path / "records.csv"
    csv.write_text("id,kind,email,name\nL1,lead,Lead@Customer.example,Lead\n", encoding="utf-8")
    assert run_cli(config, "records", "import", str(csv)).returncode == 0
    assert fetch_json(config)[0] == 0

    check = json.loads(run_cli(config, "check", "--json").stdout)
    [acc] = check["accounts"]
    assert set(acc) >= {"account", "pop3", "smtp"} and acc["smtp"] is None
    assert set(acc["pop3"]) >= {"status", "error", "capabilities", "messages"}
    assert acc["pop3"]["messages"] == 1 and "UIDL" in acc["pop3"]["capabilities"]

    status = json.loads(run_cli(config, "status", "--json").stdout)
    [state] = status["accounts"]
    assert set(state) >= {
        "account", "owner", "last_poll", "result", "new", "stored", "paused",
        "pause_reason", "next_poll", "consecutive_failures",
    }  # fmt: skip

    records = json.loads(run_cli(config, "records", "list", "--json").stdout)
    assert records == [
        {"id": "L1", "kind": "lead", "name": "Lead", "emails": ["lead@customer.example"]}
    ]
    [message] = json.loads(run_cli(config, "messages", "--viewer", "alice", "--json").stdout)
    assert message["records"] == ["L1"] and message["labels"] == ["CRM"]
    assert set(message) >= {
        "id", "account", "owner", "direction", "from", "to", "cc", "subject", "date",
        "message_id", "records", "visibility", "reason", "labels", "size", "sha256",
    }  # fmt: skip
