"""Commands that log in nowhere resolve no secret (issue 16): under the shipped systemd unit
only the daemon sees the credentials, and `messages`, `show`, `records`, `status` and
`config` must still work from a shell; the commands that log in fail with 78 naming the key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builders import dovecot_account, make_message
from dovecot import Mailbox
from mailingest.config import load_config
from mailingest.errors import ConfigError
from support import fetch_json, run_cli, write_config

KEY = "k3y-for-tests-0123456789abcdef"
READ_ONLY = [
    ("messages", "--viewer", "alice", "--json"),
    ("status", "--json"),
    ("config",),
    ("records", "list", "--json"),
]


def _fetched(tmp_path: Path, mailbox: Mailbox) -> int:
    """One message fetched and stored with the password at hand; its id."""
    mailbox.deliver(make_message(1))
    config = write_config(tmp_path, [dovecot_account(mailbox, owner="alice")])
    assert fetch_json(config)[0] == 0
    proc = run_cli(config, "messages", "--viewer", "alice", "--json")
    [message] = json.loads(proc.stdout)
    return int(message["id"])


def test_read_only_commands_work_when_the_pop3_and_smtp_secrets_are_not_there(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    message = _fetched(tmp_path, mailbox)
    smtp = {"host": "127.0.0.1", "port": 25, "username": "out", "password": {"env": "NO_SUCH"}}
    account = dovecot_account(
        mailbox,
        owner="alice",
        from_address="alice@crm.example",
        password={"credential": "alice-pop"},  # $CREDENTIALS_DIRECTORY: the unit's only
        smtp=smtp,
    )
    config = write_config(tmp_path, [account])
    for command in [*READ_ONLY, ("show", str(message), "--viewer", "alice", "--raw")]:
        proc = run_cli(config, *command)
        assert proc.returncode == 0, (command, proc.stderr.decode())
    assert 'password = { credential = "alice-pop" }' in run_cli(config, "config").stdout.decode()
    for command in (("fetch",), ("check",)):
        proc = run_cli(config, *command)
        assert proc.returncode == 78, (command, proc.stderr.decode())
        error = proc.stderr.decode()
        assert '("acct").password' in error and "CREDENTIALS_DIRECTORY" in error, error


def test_read_only_commands_list_stored_accounts_without_the_secret_key(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    key = tmp_path / "secret-key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    storage = {"database": "mail.db", "secret_key": {"file": str(key)}}
    config = write_config(tmp_path, [], storage=storage)
    added = run_cli(
        config,
        *("accounts", "add", "mine", "--owner", "alice", "--host", mailbox.dovecot.host),
        *("--port", str(mailbox.dovecot.port), "--security", "plain", "--allow-plaintext"),
        *("--username", mailbox.user, "--password-stdin"),
        stdin=mailbox.password.encode() + b"\n",
    )
    assert added.returncode == 0, added.stderr.decode()
    mailbox.deliver(make_message(1))
    assert fetch_json(config)[0] == 0
    key.unlink()  # only the daemon's unit can read it
    for command in READ_ONLY:
        proc = run_cli(config, *command)
        assert proc.returncode == 0, (command, proc.stderr.decode())
    status = json.loads(run_cli(config, "status", "--json").stdout)
    assert [(a["account"], a["stored"]) for a in status["accounts"]] == [("mine", 1)]
    proc = run_cli(config, "fetch")
    assert proc.returncode == 78 and "storage.secret_key" in proc.stderr.decode()


def test_an_env_file_this_user_may_not_read_fails_only_what_needs_an_env_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a shell user next to the systemd unit's root-only env file (the tests run as
    root, who may read anything: os.access answers as for that user)."""
    env = tmp_path / "secrets.env"
    env.write_text("POP_PW=from-the-file\n")
    env.chmod(0o600)
    account = {
        "name": "a", "owner": "alice", "host": "127.0.0.1", "port": 110,
        "security": "plain", "allow_plaintext": True, "username": "u",
        "password": {"env": "POP_PW"},
    }  # fmt: skip
    config = write_config(tmp_path, [account], daemon={"env_file": str(env)})
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == env else real_access(p, mode)
    )
    quiet = load_config(config, secrets=False)
    assert quiet.daemon.env_file == env
    with pytest.raises(ConfigError) as caught:
        quiet.accounts[0].password.reveal()
    assert caught.value.key_path == "daemon.env_file" and "permission denied" in str(caught.value)
    # A command that logs in reads it at once (here, as root, it can).
    assert load_config(config).accounts[0].password.reveal() == "from-the-file"
