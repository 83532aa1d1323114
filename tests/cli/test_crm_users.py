"""What a CRM user trips over (issue 17), against a real Dovecot and a real SMTP server:
replies to your own mail, a From that is no address, share flags outside custom mode, and
Email Magnet on outgoing mail."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path
from typing import Any

from builders import dovecot_account
from dovecot import Mailbox
from smtp_support import SmtpServer, smtp_table
from support import cli_json, fetch_json, run_cli, write_config

LEAD = "lead@customer.example"
BOSS = "boss@customer.example"
INCOMING = (
    b"From: Lead One <lead@customer.example>\r\nTo: alice@crm.example, carol@crm.example\r\n"
    b"Cc: boss@customer.example, Alice <ALICE@crm.example>\r\nSubject: Quote\r\n"
    b"Message-ID: <q1@customer.example>\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n\r\nhi\r\n"
)


def _config(tmp_path: Path, mailbox: Mailbox, server: SmtpServer, **alice: Any) -> Path:
    account = dovecot_account(
        mailbox,
        "alice-mail",
        owner="alice",
        from_address="alice@crm.example",
        smtp=smtp_table(server),
        **alice,
    )
    config = write_config(tmp_path, [account])
    csv = tmp_path / "records.csv"
    csv.write_text("id,kind,email,name\nL1,lead,lead@customer.example,Lead One\n")
    assert run_cli(config, "records", "import", str(csv)).returncode == 0
    return config


def _fetched(tmp_path: Path, mailbox: Mailbox, server: SmtpServer, **alice: Any) -> Path:
    """INCOMING delivered, the config written, one fetch run: the config."""
    mailbox.deliver(INCOMING)
    config = _config(tmp_path, mailbox, server, **alice)
    assert fetch_json(config)[0] == 0
    return config


def _send(config: Path, tmp_path: Path, *cc: str) -> Any:
    """`send` from alice-mail to LEAD (and ``cc``), Subject "Offer"; its JSON."""
    copies = ("--cc", *cc) if cc else ()
    return cli_json(
        config, "send", "--account", "alice-mail", "--to", LEAD, *copies,
        "--subject", "Offer", "--body-file", _body(tmp_path),
    )  # fmt: skip


def _body(tmp_path: Path) -> str:
    path = tmp_path / "body.txt"
    path.write_text("Thanks!\n", encoding="utf-8")
    return str(path)


def _last_sent(server: SmtpServer) -> tuple[list[str], email.message.EmailMessage]:
    _, rcpts, data = server.recorder.received[-1]
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return rcpts, parsed


def test_a_reply_to_your_own_sent_mail_goes_to_its_recipients_and_all_adds_its_cc(
    tmp_path: Path, mailbox: Mailbox, smtp_server: SmtpServer
) -> None:
    config = _config(tmp_path, mailbox, smtp_server)
    sent = _send(config, tmp_path, BOSS)
    body = _body(tmp_path)
    cli_json(config, "reply", str(sent["id"]), "--viewer", "alice", "--body-file", body)
    rcpts, message = _last_sent(smtp_server)
    assert (rcpts, message["To"], message["Cc"]) == ([LEAD], LEAD, None)
    assert message["Subject"] == "Re: Offer" and message["In-Reply-To"] == sent["message_id"]
    cli_json(config, "reply", str(sent["id"]), "--viewer", "alice", "--body-file", body, "--all")
    rcpts, message = _last_sent(smtp_server)
    assert (rcpts, message["To"], message["Cc"]) == ([LEAD, BOSS], LEAD, BOSS)


def test_reply_all_to_incoming_mail_copies_the_others_but_never_yourself(
    tmp_path: Path, mailbox: Mailbox, smtp_server: SmtpServer
) -> None:
    config = _fetched(tmp_path, mailbox, smtp_server)
    [incoming] = cli_json(config, "messages", "--viewer", "alice")
    body = _body(tmp_path)
    cli_json(config, "reply", str(incoming["id"]), "--viewer", "alice", "--body-file", body)
    assert _last_sent(smtp_server)[0] == [LEAD]
    cli_json(
        config, "reply", str(incoming["id"]), "--viewer", "alice", "--body-file", body, "--all"
    )
    rcpts, message = _last_sent(smtp_server)
    # alice@crm.example is alice's own From (in any case): never copied.
    assert rcpts == [LEAD, "carol@crm.example", BOSS]
    assert (message["To"], message["Cc"]) == (LEAD, f"carol@crm.example, {BOSS}")


def test_an_account_that_sends_needs_an_address_as_from(
    tmp_path: Path, mailbox: Mailbox, smtp_server: SmtpServer
) -> None:
    # The Dovecot login ("u<n>") is no address: without from_address mail would go out as
    # "From: u<n>". Refused when the config is read, with the fix.
    account = dovecot_account(mailbox, "alice-mail", owner="alice", smtp=smtp_table(smtp_server))
    config = write_config(tmp_path, [account])
    for command in (("check",), ("config",), ("messages", "--viewer", "alice")):
        proc = run_cli(config, *command)
        assert proc.returncode == 78, (command, proc.stderr.decode())
        error = proc.stderr.decode()
        assert ".from_address: " in error and "set from_address = " in error, error
    # Without [accounts.smtp] the account never sends: nothing to refuse.
    del account["smtp"]
    assert run_cli(write_config(tmp_path, [account]), "check").returncode == 0


def test_a_share_flag_outside_custom_mode_is_refused_and_changes_nothing(
    tmp_path: Path, mailbox: Mailbox, smtp_server: SmtpServer
) -> None:
    config = _fetched(tmp_path, mailbox, smtp_server, sharing="public")
    proc = run_cli(config, "records", "share", "L1", "--owner", "alice")
    assert proc.returncode == 65, proc.stderr.decode()
    error = proc.stderr.decode()
    assert "(public: 'alice-mail')" in error and "nothing changed" in error, error
    # Clearing a flag is always allowed.
    assert run_cli(config, "records", "share", "L1", "--owner", "alice", "--off").returncode == 0
    # The refused flag did not lie in wait for a later switch to custom mode.
    custom = _config(tmp_path, mailbox, smtp_server, sharing="custom")
    assert cli_json(custom, "messages", "--viewer", "bob") == []
    [mine] = cli_json(custom, "messages", "--viewer", "alice")
    assert mine["reason"] == "custom_not_shared"
    assert run_cli(custom, "records", "share", "L1", "--owner", "alice").returncode == 0
    assert [m["reason"] for m in cli_json(custom, "messages", "--viewer", "bob")] == [
        "custom_shared"
    ]


def test_email_magnet_labels_incoming_customer_mail_only(
    tmp_path: Path, mailbox: Mailbox, smtp_server: SmtpServer
) -> None:
    config = _fetched(tmp_path, mailbox, smtp_server, magnet_label="CRM")
    _send(config, tmp_path)
    mine = cli_json(config, "messages", "--viewer", "alice")
    assert sorted((m["direction"], m["records"], m["labels"]) for m in mine) == [
        ("in", ["L1"], ["CRM"]),
        ("out", ["L1"], []),
    ]
    labelled = cli_json(config, "messages", "--viewer", "alice", "--label", "CRM")
    assert [m["subject"] for m in labelled] == ["Quote"]
    # A new label re-labels the stored mail the same way, as does a record's new address.
    relabelled = _config(tmp_path, mailbox, smtp_server, magnet_label="Deals")
    deals = cli_json(relabelled, "messages", "--viewer", "alice", "--label", "Deals")
    assert [m["direction"] for m in deals] == ["in"]
    assert run_cli(relabelled, "records", "set-email", "L1", f"{LEAD};{BOSS}").returncode == 0
    deals = cli_json(relabelled, "messages", "--viewer", "alice", "--label", "Deals")
    assert [m["direction"] for m in deals] == ["in"]


def test_mail_the_owner_sent_from_the_crm_from_or_an_alias_is_recognised_as_theirs(
    tmp_path: Path, mailbox: Mailbox, smtp_server: SmtpServer
) -> None:
    def sent_by(sender: bytes, n: int) -> bytes:
        return (
            b"From: " + sender + b"\r\nTo: Lead One <lead@customer.example>\r\n"
            b"Subject: s" + str(n).encode() + b"\r\nMessage-ID: <s" + str(n).encode()
            + b"@crm.example>\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n\r\nhi\r\n"
        )  # fmt: skip

    # Gmail recent: mode returns the owner's sent mail; the POP login ("u<n>") is none of
    # the addresses it was sent from.
    mailbox.deliver(sent_by(b"Alice <alice@crm.example>", 1))  # the CRM's From
    mailbox.deliver(sent_by(b"A. Smith <A.Smith@CRM.example>", 2))  # an alias, any case
    mailbox.deliver(sent_by(b"Mallory <mallory@crm.example>", 3))  # a colleague: incoming
    config = _config(
        tmp_path,
        mailbox,
        smtp_server,
        username=mailbox.recent_user,
        aliases=["a.smith@crm.example"],
    )
    assert fetch_json(config)[0] == 0
    stored = {m["subject"]: m for m in cli_json(config, "messages", "--viewer", "alice")}
    assert {s: (m["direction"], m["records"]) for s, m in stored.items()} == {
        "s1": ("out", ["L1"]),  # outgoing mail links on its recipients
        "s2": ("out", ["L1"]),
        "s3": ("in", []),  # incoming mail links on its sender, who is no record
    }
    # A bad alias is a config error naming the key.
    account = dovecot_account(mailbox, owner="alice", aliases=["a.smith@crm.example", "bob"])
    proc = run_cli(write_config(tmp_path, [account]), "check")
    assert proc.returncode == 78 and ".aliases[1]: " in proc.stderr.decode()


def test_the_fetched_copy_of_mail_sent_from_the_crm_is_that_message_stored_once(
    tmp_path: Path, mailbox: Mailbox, smtp_server: SmtpServer
) -> None:
    config = _config(tmp_path, mailbox, smtp_server, username=mailbox.recent_user, sharing="custom")
    sent = _send(config, tmp_path)
    # Gmail's copy in recent: mode: other bytes (its own headers), the same Message-ID.
    data = smtp_server.recorder.received[-1][2]
    mailbox.deliver(b"Received: by mx.gmail.example; Tue, 24 Nov 2026 10:00:01 +0000\r\n" + data)
    for _ in range(2):
        assert fetch_json(config)[0] == 0
        [stored] = cli_json(config, "messages", "--viewer", "alice")
        assert (stored["id"], stored["reason"]) == (sent["id"], "crm_sent")
    assert [m["id"] for m in cli_json(config, "messages", "--viewer", "bob")] == [sent["id"]]


def test_an_address_change_links_the_addresss_mail_even_where_another_record_has_it(
    tmp_path: Path, mailbox: Mailbox, smtp_server: SmtpServer
) -> None:
    # A person's mail can belong to several records (a lead and the contact it became, one
    # address in two companies): set-email links stored mail from the new address exactly
    # as a fetch would have, had the address been there; existing links stay.
    mailbox.deliver(INCOMING)
    config = _config(tmp_path, mailbox, smtp_server)
    csv = tmp_path / "more.csv"
    csv.write_text("id,kind,email,name\nC1,contact,old@customer.example,Lead as contact\n")
    assert run_cli(config, "records", "import", str(csv)).returncode == 0
    assert fetch_json(config)[0] == 0
    [before] = cli_json(config, "messages", "--viewer", "alice")
    assert before["records"] == ["L1"]
    assert run_cli(config, "records", "set-email", "C1", LEAD).returncode == 0
    [after] = cli_json(config, "messages", "--viewer", "alice")
    assert sorted(after["records"]) == ["C1", "L1"]
    assert [
        m["id"] for m in cli_json(config, "messages", "--viewer", "alice", "--record", "C1")
    ] == [after["id"]]
