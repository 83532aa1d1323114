"""`mailingest run` re-tags stored mail when an account's sharing settings change: on SIGHUP
and at start, before any further fetch (the CLI does the same at each command's start).

The daemon runs as a process against the scripted POP3 server; who sees what is read with
`mailingest messages --viewer USER --json`, as the CRM would. That CLI would re-tag by itself
too, so each test first checks that the daemon did it: its `mail_retagged` line, and the
stored tags read directly, before any CLI command runs.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from builders import loopback_account, make_message
from daemon_support import DaemonProcess, wait_until
from pop3d import Mailbox, ThreadedPop3Server
from support import StoreAt, fetch_json, run_cli, write_config

PASSWORD = "Pw-retag-12345"
RECORDS = "id,kind,email,name\nL1,lead,lead@example.org,Lead One\n"
#: An hour between polls: nothing the tests see may come from a further fetch.
DAEMON = {"poll_interval": "1h", "log_format": "json", "shutdown_timeout": "5s"}


def _account(port: int, **overrides: Any) -> dict[str, Any]:
    return loopback_account(
        port, **({"name": "a", "username": "u", "password": PASSWORD} | overrides)
    )


def _import_records(config: Path) -> None:
    csv = config.parent / "records.csv"
    csv.write_text(RECORDS, encoding="utf-8")
    proc = run_cli(config, "records", "import", str(csv))
    assert proc.returncode == 0, proc.stderr.decode()


def _stored_tags(at: StoreAt) -> list[tuple[str, str]]:
    """(visibility, reason) of every stored message, read without any re-tag."""
    rows = at.query("SELECT visibility, reason FROM messages ORDER BY id")
    return [(str(v), str(r)) for v, r in rows]


def _messages(config: Path, viewer: str) -> list[dict[str, Any]]:
    proc = run_cli(config, "messages", "--viewer", viewer, "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    listed: list[dict[str, Any]] = json.loads(proc.stdout)
    return listed


def test_sighup_to_public_shares_stored_linked_mail_without_another_fetch(
    tmp_path: Path,
    store_at: StoreAt,
) -> None:
    box = Mailbox("u", PASSWORD, [make_message(1), make_message(2)])
    with ThreadedPop3Server([box]) as server:
        config = write_config(
            tmp_path, storage=store_at.storage(), accounts=[_account(server.port)], daemon=DAEMON
        )
        _import_records(config)
        with DaemonProcess(config) as daemon:
            daemon.wait_event("poll_completed", account="a")
            server.stop()  # from now on, no fetch can bring anything
            assert _messages(config, "bob") == []  # private mode: only alice sees them
            assert len(_messages(config, "alice")) == 2

            write_config(
                tmp_path,
                storage=store_at.storage(),
                accounts=[_account(server.port, sharing="public")],
                daemon=DAEMON,
            )
            daemon.send(signal.SIGHUP)
            daemon.wait_event("config_reloaded")
            assert daemon.events("mail_retagged")[-1]["accounts"] == ["a"]
            assert _stored_tags(store_at) == [("shared", "public")] * 2

            shared = _messages(config, "bob")
            assert [(m["visibility"], m["reason"], m["records"]) for m in shared] == [
                ("shared", "public", ["L1"])
            ] * 2
            code, _ = daemon.stop()
            assert code == 0, daemon.text()


def test_start_retags_mail_stored_under_settings_changed_while_stopped(
    tmp_path: Path, store_at: StoreAt
) -> None:
    box = Mailbox("u", PASSWORD, [make_message(1), make_message(2)])
    with ThreadedPop3Server([box]) as server:
        config = write_config(
            tmp_path, storage=store_at.storage(), accounts=[_account(server.port)], daemon=DAEMON
        )
        _import_records(config)
        code, result = fetch_json(config)
        assert code == 0, result
        port = server.port
    # The server is gone: whatever the daemon shows, it did not fetch it.
    assert _stored_tags(store_at) == [("private", "mode_private")] * 2
    changed = _account(port, sharing="public", magnet_label="CRM")
    write_config(tmp_path, storage=store_at.storage(), accounts=[changed], daemon=DAEMON)
    with DaemonProcess(config) as daemon:
        daemon.wait_event("daemon_started")
        assert daemon.events("mail_retagged")[0]["accounts"] == ["a"]
        names = [e["event"] for e in daemon.events()]
        assert names.index("mail_retagged") < names.index("daemon_started")  # before polling
        assert _stored_tags(store_at) == [("shared", "public")] * 2
        code, _ = daemon.stop()
        assert code == 0, daemon.text()
    labelled = _messages(config, "bob")
    assert [(m["reason"], m["labels"]) for m in labelled] == [("public", ["CRM"])] * 2


def test_a_restart_with_unchanged_settings_retags_nothing(
    tmp_path: Path, store_at: StoreAt
) -> None:
    box = Mailbox("u", PASSWORD, [make_message(1)])
    with ThreadedPop3Server([box]) as server:
        config = write_config(
            tmp_path, storage=store_at.storage(), accounts=[_account(server.port)], daemon=DAEMON
        )
        with DaemonProcess(config) as daemon:
            daemon.wait_event("poll_completed", account="a")
            assert daemon.stop()[0] == 0
            assert daemon.events("mail_retagged")[0]["accounts"] == ["a"]  # first seen
        with DaemonProcess(config) as daemon:
            daemon.wait_event("daemon_started")
            daemon.send(signal.SIGHUP)
            daemon.wait_event("config_reloaded")
            assert daemon.stop()[0] == 0
            assert daemon.events("mail_retagged") == []


def test_a_reload_retags_mail_stored_after_a_cli_command_saved_the_new_settings(
    tmp_path: Path,
    store_at: StoreAt,
) -> None:
    """Edit the config, run any command (it re-tags and saves the new settings), reload:
    what the daemon stored in between, under its old settings, is re-tagged too."""
    box = Mailbox("u", PASSWORD, [make_message(1)])
    polling = {**DAEMON, "poll_interval": "1s"}
    with ThreadedPop3Server([box]) as server:
        config = write_config(
            tmp_path, storage=store_at.storage(), accounts=[_account(server.port)], daemon=polling
        )
        _import_records(config)
        with DaemonProcess(config) as daemon:
            daemon.wait_event("poll_completed", account="a")
            write_config(
                tmp_path,
                storage=store_at.storage(),
                accounts=[_account(server.port, sharing="public")],
                daemon=polling,
            )
            assert len(_messages(config, "bob")) == 1  # this command re-tagged at its start
            server.server.mailbox("u").add(make_message(2))
            wait_until(lambda: len(_stored_tags(store_at)) == 2, "the daemon to store message 2")
            assert _stored_tags(store_at)[1] == ("private", "mode_private")  # its old settings

            daemon.send(signal.SIGHUP)
            daemon.wait_event("config_reloaded")
            assert daemon.events("mail_retagged")[-1]["accounts"] == ["a"]
            assert _stored_tags(store_at) == [("shared", "public")] * 2
            assert daemon.stop()[0] == 0
