""" "Why can I see this?" and the audit log (issue 17, item 12), against a real Dovecot:
`explain ID --viewer U` names the rule that decided, and every change of a mode, excluded
domain or share flag is kept with who, when and how many messages it re-tagged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from builders import dovecot_account
from dovecot import Dovecot
from support import cli_json, fetch_json, run_cli, write_config


def _mail(sender: str, subject: str) -> bytes:
    return f"From: {sender}\r\nTo: someone@crm.example\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()


def _write(tmp_path: Path, dovecot: Dovecot, boxes: list[Any], alice_mode: str) -> Path:
    alice, bob = boxes
    return write_config(
        tmp_path,
        [
            dovecot_account(alice, "alice-mail", owner="alice", sharing=alice_mode),
            dovecot_account(
                bob, "bob-mail", owner="bob", sharing="public", excluded_domains=["secret.example"]
            ),
        ],
    )


def _by_subject(config: Path, viewer: str) -> dict[str, Any]:
    return {m["subject"]: m for m in cli_json(config, "messages", "--viewer", viewer)}


def test_explain_names_the_rule_and_the_audit_log_keeps_every_sharing_change(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    boxes = [dovecot.new_mailbox(), dovecot.new_mailbox()]
    boxes[0].deliver(_mail("Lead <lead@customer.example>", "alice lead"))
    boxes[0].deliver(_mail("stranger@nowhere.example", "alice stranger"))
    boxes[1].deliver(_mail("lead@customer.example", "bob lead"))
    boxes[1].deliver(_mail("spy@secret.example", "bob secret"))
    config = _write(tmp_path, dovecot, boxes, "custom")
    csv = tmp_path / "records.csv"
    csv.write_text(
        "id,kind,email,name\nL1,lead,lead@customer.example,\nC2,contact,spy@secret.example,\n"
    )
    assert run_cli(config, "records", "import", str(csv)).returncode == 0
    assert fetch_json(config)[0] == 0
    assert cli_json(config, "audit") == []  # storing mail under the first settings is no change

    assert (
        run_cli(config, "records", "share", "L1", "--owner", "alice", "--by", "carol").returncode
        == 0
    )
    mine = _by_subject(config, "alice")
    bobs = _by_subject(config, "bob")
    shared = cli_json(config, "explain", str(mine["alice lead"]["id"]), "--viewer", "bob")
    assert (shared["may_see"], shared["reason"], shared["mode"]) == (
        True,
        "custom_shared",
        "custom",
    )
    assert shared["why"] == "it is shared with every CRM user"
    assert [(s["record"], s["set_by"]) for s in shared["shares"]] == [("L1", "carol")]
    assert shared["shares"][0]["set_at"] and "set by carol" in shared["rule"]
    assert [h["action"] for h in shared["history"]] == ["share"]

    own = cli_json(config, "explain", str(mine["alice stranger"]["id"]), "--viewer", "alice")
    assert own["reason"] == "unmatched" and own["why"] == "alice owns it"
    assert "linked to no CRM record" in own["rule"]
    hidden = run_cli(config, "explain", str(mine["alice stranger"]["id"]), "--viewer", "bob")
    assert hidden.returncode == 77 and b"may not see" in hidden.stderr

    excluded = cli_json(config, "explain", str(bobs["bob secret"]["id"]), "--viewer", "bob")
    assert (excluded["reason"], excluded["excluded_domain"]) == (
        "excluded_domain",
        "secret.example",
    )
    assert excluded["excluded_domains"] == ["secret.example"]
    public = cli_json(config, "explain", str(bobs["bob lead"]["id"]), "--viewer", "alice")
    assert (public["reason"], public["excluded_domain"]) == ("public", None)
    assert "customer.example" in public["rule"]
    text = run_cli(config, "explain", str(bobs["bob secret"]["id"]), "--viewer", "bob")
    assert b"rule: public mode, but secret.example is in excluded_domains" in text.stdout

    # A mode change in the config file is applied (and audited) by the next command.
    config = _write(tmp_path, dovecot, boxes, "private")
    assert cli_json(config, "status", env={"SUDO_USER": "dave"}) is not None
    off = ("records", "share", "L1", "--owner", "alice", "--off", "--by", "carol")
    assert run_cli(config, *off).returncode == 0
    log = cli_json(config, "audit")
    assert [(e["action"], e["actor"], e["retagged"]) for e in log] == [
        ("unshare", "carol", 0),  # private mode now: the flag no longer decides anything
        ("sharing_changed", "dave", 1),
        ("share", "carol", 1),
    ]
    change = log[1]
    assert (change["account"], change["owner"]) == ("alice-mail", "alice")
    assert change["detail"] == {"sharing": {"from": "custom", "to": "private"}}
    assert [e["action"] for e in cli_json(config, "audit", "--owner", "bob")] == []
    assert len(cli_json(config, "audit", "--limit", "1")) == 1
    table = run_cli(config, "audit").stdout.decode()
    assert "account alice-mail: sharing custom -> private" in table and "carol" in table
    now = cli_json(config, "explain", str(mine["alice lead"]["id"]), "--viewer", "alice")
    assert now["reason"] == "mode_private" and now["shares"] == []
    assert [h["action"] for h in now["history"]] == ["unshare", "sharing_changed", "share"]
