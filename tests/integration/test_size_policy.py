"""Size policy (issue 17, item 10) against a real Dovecot: a message over the account's
``max_message_size`` is neither skipped nor deleted: its header is stored quarantined,
it stays on the server, and `mailingest release ID` fetches it in full."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from builders import dovecot_account
from dovecot import Mailbox
from support import cli_json, fetch_json, run_cli, write_config

LIMIT = 100_000
HEAD = b"From: lead@customer.example\r\nTo: alice@crm.example\r\nSubject: big\r\n"


def _message(subject: str, body_lines: int) -> bytes:
    head = HEAD.replace(b"big", subject.encode())
    return head + b"\r\n" + b"".join(b"line %06d of the body\r\n" % i for i in range(body_lines))


SMALL = _message("small", 10)
BIG = _message("big", 10_000)  # about 230 kB


def _setup(tmp_path: Path, mailbox: Mailbox, **account: Any) -> Path:
    mailbox.deliver(SMALL)
    mailbox.deliver(BIG)
    table = dovecot_account(mailbox, "a", owner="alice", max_message_size="100kB", **account)
    return write_config(tmp_path, [table])


def test_an_oversized_message_is_quarantined_kept_on_the_server_and_released_in_full(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    config = _setup(tmp_path, mailbox, leave_on_server=False)
    code, report = fetch_json(config)
    assert code == 0, report
    assert report["accounts"][0]["new"] == 2
    assert mailbox.count() == 1  # the small one deleted once stored; the big one kept
    held = cli_json(config, "messages", "--viewer", "alice", "--quarantined")
    assert [m["subject"] for m in held] == ["big"]
    [big] = held
    assert big["quarantined"] is True and big["size"] > LIMIT
    assert "max_message_size 100000" in big["quarantine_reason"]
    raw = run_cli(config, "show", str(big["id"]), "--viewer", "alice", "--raw").stdout
    assert raw == HEAD + b"\r\n"  # the header alone, as TOP sent it
    everything = cli_json(config, "messages", "--viewer", "alice")
    assert sorted(m["quarantined"] for m in everything) == [False, True]

    # Later polls neither fetch it again nor delete it from the server.
    code, report = fetch_json(config)
    assert (code, report["accounts"][0]["new"], report["accounts"][0]["deleted"]) == (0, 0, 0)
    assert mailbox.count() == 1

    released = cli_json(config, "release", str(big["id"]))
    assert released == {"id": big["id"], "account": "a", "size": len(BIG), "deleted": True}
    raw = run_cli(config, "show", str(big["id"]), "--viewer", "alice", "--raw").stdout
    assert raw == BIG
    assert cli_json(config, "messages", "--viewer", "alice", "--quarantined") == []
    shown = cli_json(config, "messages", "--viewer", "alice")
    assert len(shown) == 2 and not any(m["quarantined"] for m in shown)
    assert mailbox.count() == 0

    again = run_cli(config, "release", str(big["id"]))
    assert again.returncode == 65 and b"not quarantined" in again.stderr
    unknown = run_cli(config, "release", "999999")
    assert unknown.returncode == 65 and b"does not exist" in unknown.stderr


def test_leave_on_server_release_keeps_the_server_copy_and_it_is_not_fetched_again(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    config = _setup(tmp_path, mailbox, delete_after_days=1)
    assert fetch_json(config)[0] == 0
    [big] = cli_json(config, "messages", "--viewer", "alice", "--quarantined")
    assert cli_json(config, "release", str(big["id"]))["deleted"] is False
    code, report = fetch_json(config)
    assert (code, report["accounts"][0]["new"]) == (0, 0)
    assert mailbox.count() == 2
    assert len(cli_json(config, "messages", "--viewer", "alice")) == 2


def test_a_released_message_that_left_the_server_is_refused_and_its_header_kept(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    config = _setup(tmp_path, mailbox)
    assert fetch_json(config)[0] == 0
    [big] = cli_json(config, "messages", "--viewer", "alice", "--quarantined")
    for path in (mailbox.dovecot.maildir(mailbox.user) / "cur").iterdir():
        path.unlink()  # another client deleted everything
    for path in (mailbox.dovecot.maildir(mailbox.user) / "new").iterdir():
        path.unlink()
    proc = run_cli(config, "release", str(big["id"]))
    assert proc.returncode == 65 and b"no longer on the server" in proc.stderr
    assert len(cli_json(config, "messages", "--viewer", "alice", "--quarantined")) == 1


def test_a_bad_size_is_a_config_error_naming_the_key(tmp_path: Path, mailbox: Mailbox) -> None:
    table = dovecot_account(mailbox, "a", owner="alice", max_message_size="lots")
    proc = run_cli(write_config(tmp_path, [table]), "config")
    assert proc.returncode == 78
    assert b"max_message_size" in proc.stderr and b"lots" in proc.stderr
