"""Accounts kept in the database: `mailingest accounts add|test|set|remove|list`, on both
backends, against a real Dovecot and a running daemon (no reload, no SIGHUP)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from builders import make_message
from daemon_support import DaemonProcess, wait_until
from dovecot import Mailbox
from postgres import Postgres
from support import StoreAt, run_cli, write_config

KEY = "k3y-for-tests-0123456789abcdef"


def setup(tmp_path: Path, at: StoreAt, key: str | None = KEY) -> Path:
    storage = at.storage()
    if key is not None:
        (tmp_path / "secret-key").write_text(key + "\n")
        (tmp_path / "secret-key").chmod(0o600)
        storage["secret_key"] = {"file": str(tmp_path / "secret-key")}
    return write_config(tmp_path, [], storage=storage, daemon={"poll_interval": "1s"})


def cli(config: Path, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    done = run_cli(config, *args, stdin=stdin)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def add_args(box: Mailbox) -> tuple[str, ...]:
    """`accounts add mine` of alice for ``box``, the password on stdin."""
    return (
        *("accounts", "add", "mine", "--owner", "alice", "--host", box.dovecot.host),
        *("--port", str(box.dovecot.port), "--security", "plain", "--allow-plaintext"),
        *("--username", box.user, "--password-stdin"),
    )


def add(config: Path, box: Mailbox, password: str, *extra: str) -> tuple[int, dict[str, Any]]:
    code, out, err = cli(config, *add_args(box), "--json", *extra, stdin=password.encode() + b"\n")
    assert out, err
    return code, json.loads(out)


def database_dump(at: StoreAt, request: pytest.FixtureRequest) -> bytes:
    """Every byte the database holds: the SQLite files, or pg_dump's output."""
    if isinstance(at.database, Path):
        files = sorted(at.database.parent.glob(at.database.name + "*"))
        return b"".join(path.read_bytes() for path in files)
    server: Postgres = request.getfixturevalue("postgres")
    return server.dump(at.database)


def stored_rows(at: StoreAt) -> int:
    return int(at.query("SELECT count(*) FROM accounts")[0][0])


def test_add_refuses_a_wrong_password_with_77_and_stores_nothing(
    mailbox: Mailbox, store_at: StoreAt, tmp_path: Path
) -> None:
    config = setup(tmp_path, store_at)
    code, result = add(config, mailbox, "not-" + mailbox.password)
    assert code == 77
    assert result["added"] is False and result["pop3"]["status"] == "auth_failed"
    assert stored_rows(store_at) == 0
    code, out, _ = cli(config, "accounts", "list", "--json")
    assert code == 0 and json.loads(out) == {"accounts": []}
    assert mailbox.dovecot.password_mismatches(mailbox.user) == 1  # one login, no more


def test_a_short_wrong_password_is_tested_and_refused_like_any_other(
    mailbox: Mailbox, store_at: StoreAt, tmp_path: Path
) -> None:
    """A password too short for the log mask is still the server's to judge: the test login
    refuses a wrong one (77) and nothing is stored."""
    config = setup(tmp_path, store_at)
    code, _, err = cli(config, *add_args(mailbox), stdin=b"ab\n")
    assert code == 77, err
    assert stored_rows(store_at) == 0
    assert mailbox.dovecot.password_mismatches(mailbox.user) == 1


def test_a_running_daemon_polls_an_added_account_pauses_and_resumes_it_and_stops_at_remove(
    mailbox: Mailbox, store_at: StoreAt, tmp_path: Path
) -> None:
    config = setup(tmp_path, store_at)
    mailbox.deliver_many(make_message(i) for i in range(2))
    with DaemonProcess(config) as daemon:
        daemon.wait_event("daemon_started")
        code, result = add(config, mailbox, mailbox.password)
        assert code == 0 and result["added"] is True and result["pop3"]["messages"] == 2
        polled = daemon.wait_event("poll_completed", account="mine")
        assert polled["new"] == 2

        # A password changed elsewhere and stored wrong: one failed login, then a pause.
        _, out, err = cli(config, "accounts", "set", "mine", "--password-stdin", stdin=b"bad\n")
        assert "password" in out, err
        daemon.wait_event("account_paused", account="mine")
        mailbox.deliver(make_message(7))
        time.sleep(2.5)  # paused: no more logins over two poll intervals
        assert mailbox.dovecot.password_mismatches(mailbox.user) == 1
        code, out, err = cli(
            config, "accounts", "set", "mine", "--password-stdin", "--sharing", "public",
            stdin=mailbox.password.encode() + b"\n",
        )  # fmt: skip
        assert code == 0, err
        daemon.wait_event("account_resumed", account="mine")
        wait_until(lambda: len(daemon.events("poll_completed", account="mine", new=1)) == 1, "")

        code, out, err = cli(config, "accounts", "remove", "mine", "--json")
        assert code == 0 and json.loads(out) == {"account": "mine", "removed": True}, err
        daemon.wait_event("config_reloaded", removed=["mine"])
        polls = len(daemon.events("poll_completed", account="mine"))
        mailbox.deliver(make_message(8))
        time.sleep(2.5)
        assert len(daemon.events("poll_completed", account="mine")) == polls
        assert daemon.events("account_paused", account="mine").__len__() == 1
    # Its mail stays, with the settings it had (public: shared with everyone).
    code, out, _ = cli(config, "messages", "--viewer", "alice", "--json")
    assert code == 0 and len(json.loads(out)) == 3
    assert mailbox.dovecot.count(mailbox.user) == 4  # leave_on_server: nothing deleted


def test_a_change_a_running_daemon_applies_is_audited_as_the_cli_user_who_made_it(
    mailbox: Mailbox, store_at: StoreAt, tmp_path: Path
) -> None:
    """The daemon re-tags the mail of a stored account whose sharing `accounts set` changed,
    in its own process: the audit log names the user who ran the command, as
    `cli:<login name>`, not the daemon that applied it (the API names its caller alike)."""
    config = setup(tmp_path, store_at)
    as_carol = {"SUDO_USER": "", "LOGNAME": "carol-ops"}
    with DaemonProcess(config) as daemon:
        daemon.wait_event("daemon_started")
        assert add(config, mailbox, mailbox.password, "--no-test")[0] == 0
        daemon.wait_event("config_reloaded", added=["mine"])
        retagged = len(daemon.events("mail_retagged"))  # its first settings, when added
        done = run_cli(config, "accounts", "set", "mine", "--sharing", "public", env=as_carol)
        assert done.returncode == 0, done.stderr.decode()
        wait_until(lambda: len(daemon.events("mail_retagged")) > retagged, "the re-tag")
        assert daemon.events("mail_retagged")[-1]["accounts"] == ["mine"]
    # With no daemon running, the next command that loads the account applies the change.
    done = run_cli(config, "accounts", "set", "mine", "--sharing", "private", env=as_carol)
    assert done.returncode == 0, done.stderr.decode()
    as_dave = {"SUDO_USER": "", "LOGNAME": "dave"}
    assert run_cli(config, "fetch", env=as_dave).returncode == 0
    done = run_cli(config, "audit", "--account", "mine", "--json", env=as_dave)
    audit = json.loads(done.stdout)
    assert [(e["actor"], e["detail"]["sharing"]["to"]) for e in audit] == [
        ("cli:carol-ops", "private"),  # not dave, who ran the fetch that applied it
        ("cli:carol-ops", "public"),  # not the daemon, which applied it
    ]
    assert {e["action"] for e in audit} == {"sharing_changed"}


def test_the_database_holds_no_account_password(
    mailbox: Mailbox, store_at: StoreAt, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    config = setup(tmp_path, store_at)
    assert add(config, mailbox, mailbox.password)[0] == 0
    code, out, _ = cli(config, "accounts", "list", "--json")
    [row] = json.loads(out)["accounts"]
    assert code == 0 and (row["account"], row["source"]) == ("mine", "database")
    dump = database_dump(store_at, request)
    assert mailbox.user.encode() in dump  # the settings are there...
    assert mailbox.password.encode() not in dump  # ...the password only sealed
    assert KEY.encode() not in dump


def test_a_missing_or_wrong_secret_key_is_78_naming_the_key(
    mailbox: Mailbox, store_at: StoreAt, tmp_path: Path
) -> None:
    config = setup(tmp_path, store_at)
    assert add(config, mailbox, mailbox.password, "--no-test")[0] == 0
    for key in ("another-key-0123456789abcdef", None):
        other = setup(tmp_path, store_at, key)
        for command in ("fetch", "check"):
            code, _, err = cli(other, command)
            assert code == 78 and "storage.secret_key" in err, err
            assert mailbox.password not in err
        # A command that logs in nowhere needs no key (see test_readonly_secrets).
        assert cli(other, "status")[0] == 0
