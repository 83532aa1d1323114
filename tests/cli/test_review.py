"""The unmatched review queue and `records create-from` (issue 17, item 11), against a real
Dovecot: the owner's mail linked to no record, grouped by sender; a lead made from one
message's sender links all of that sender's stored mail at once."""

from __future__ import annotations

from pathlib import Path

from builders import dovecot_account
from dovecot import Mailbox
from support import cli_json, fetch_json, run_cli, write_config


def _mail(sender: str, subject: str, to: str = "alice@crm.example") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@x>\r\n\r\nbody\r\n"
    ).encode()


JURGEN = "=?utf-8?q?J=C3=BCrgen_Koch?= <Juergen@Unknown.example>"
MAIL = [
    _mail(JURGEN, "first"),
    _mail("Someone <someone@other.example>", "once"),
    _mail("juergen@unknown.example", "second"),
    _mail("Lead <lead@customer.example>", "known"),
    _mail("<JUERGEN@unknown.example>", "third"),
    _mail("alice@crm.example", "sent by alice", to="juergen@unknown.example"),
]


def _setup(tmp_path: Path, mailbox: Mailbox) -> Path:
    mailbox.dovecot.deliver_many(mailbox.user, MAIL)
    account = dovecot_account(
        mailbox, "alice-mail", owner="alice", sharing="custom", from_address="alice@crm.example"
    )
    config = write_config(tmp_path, [account])
    csv = tmp_path / "records.csv"
    csv.write_text("id,kind,email,name\nL1,lead,lead@customer.example,Lead\n")
    assert run_cli(config, "records", "import", str(csv)).returncode == 0
    assert fetch_json(config)[0] == 0
    return config


def test_unmatched_mail_is_grouped_by_sender_and_create_from_links_it_all(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    config = _setup(tmp_path, mailbox)
    queue = cli_json(config, "messages", "--viewer", "alice", "--unmatched")
    assert [(g["sender"], g["count"]) for g in queue] == [
        ("juergen@unknown.example", 3),
        ("someone@other.example", 1),
    ]
    assert cli_json(config, "messages", "--viewer", "bob", "--unmatched") == []
    text = run_cli(config, "messages", "--viewer", "alice", "--unmatched")
    assert b"juergen@unknown.example" in text.stdout and b"sender" in text.stdout

    first = next(
        m for m in cli_json(config, "messages", "--viewer", "alice") if m["subject"] == "first"
    )
    assert first["records"] == [] and first["reason"] == "unmatched"
    created = cli_json(config, "records", "create-from", str(first["id"]), "--viewer", "alice")
    # Three from the sender and alice's own mail to that address: linked at once.
    assert created["linked"] == 4
    assert created["record"] == {
        "id": "juergen@unknown.example",
        "kind": "lead",
        "name": "Jürgen Koch",
        "emails": ["juergen@unknown.example"],
    }
    linked = cli_json(
        config, "messages", "--viewer", "alice", "--record", "juergen@unknown.example"
    )
    assert sorted(m["subject"] for m in linked) == ["first", "second", "sent by alice", "third"]
    assert {m["reason"] for m in linked} == {"custom_not_shared"}  # re-tagged with the link
    queue = cli_json(config, "messages", "--viewer", "alice", "--unmatched")
    assert [g["sender"] for g in queue] == ["someone@other.example"]
    listed = {r["id"] for r in cli_json(config, "records", "list")}
    assert listed == {"L1", "juergen@unknown.example"}

    again = run_cli(config, "records", "create-from", str(first["id"]), "--viewer", "alice")
    assert again.returncode == 65 and b"exists already" in again.stderr
    other = run_cli(config, "records", "create-from", str(first["id"]), "--viewer", "bob")
    assert other.returncode == 77
    sent = next(m for m in linked if m["subject"] == "sent by alice")
    outgoing = run_cli(config, "records", "create-from", str(sent["id"]), "--viewer", "alice")
    assert outgoing.returncode == 65 and b"outgoing" in outgoing.stderr


def test_create_from_takes_an_id_kind_and_name(tmp_path: Path, mailbox: Mailbox) -> None:
    config = _setup(tmp_path, mailbox)
    once = next(
        m for m in cli_json(config, "messages", "--viewer", "alice") if m["subject"] == "once"
    )
    created = cli_json(
        config, "records", "create-from", str(once["id"]), "--viewer", "alice",
        "--id", "C7", "--kind", "contact", "--name", "Some One",
    )  # fmt: skip
    assert created == {
        "record": {
            "id": "C7",
            "kind": "contact",
            "name": "Some One",
            "emails": ["someone@other.example"],
        },
        "linked": 1,
    }
