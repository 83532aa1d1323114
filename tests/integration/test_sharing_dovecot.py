"""Records, matching and sharing end to end: real Dovecot mailboxes of two owners, the CLI.

alice and bob each own one POP3 account; carol is a CRM user without one. Every check reads
what a viewer gets from `mailingest messages --json`, as the CRM would.
"""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

from builders import MAIL_BASE as BASE
from builders import crlf, dovecot_account, sha
from builders import numbered_mail as mail
from dovecot import Dovecot, Mailbox
from support import StoreAt, fetch_json, run_cli, write_config

RECORDS_CSV = """id,kind,email,name
L1,lead,Ann <ann@cust.example>,Ann Lead
L2,lead,ben@other.example,Ben Lead
C1,contact,ceo@own.example,The CEO
R1,lead,rick@rival.example;RITA@eu.rival.example,Rival people
N1,contact,nora@notrival.example,Nora
"""
RECORD_IDS = ("L1", "L2", "C1", "R1", "N1")
#: `messages --json` keys of the contract (extra keys may be added, none removed).
MESSAGE_KEYS = {
    "id",
    "account",
    "owner",
    "direction",
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message_id",
    "records",
    "visibility",
    "reason",
    "labels",
    "size",
    "sha256",
}


class Crm:
    """Two owners' accounts on one Dovecot, one config and database, driven through the CLI."""

    def __init__(self, directory: Path, dovecot: Dovecot, at: StoreAt) -> None:
        self.directory = directory
        self.at = at
        self.alice: Mailbox = dovecot.new_mailbox()
        self.bob: Mailbox = dovecot.new_mailbox()
        self.config = self.configure()

    def configure(
        self, alice: dict[str, Any] | None = None, bob: dict[str, Any] | None = None
    ) -> Path:
        """(Re)write the config; the settings go into alice's / bob's account tables."""
        self.config = write_config(
            self.directory,
            storage=self.at.storage(),
            accounts=[
                dovecot_account(self.alice, "alice-mail", owner="alice", **(alice or {})),
                dovecot_account(self.bob, "bob-mail", owner="bob", **(bob or {})),
            ],
        )
        return self.config

    def cli(self, *args: str, code: int = 0) -> subprocess.CompletedProcess[bytes]:
        proc = run_cli(self.config, *args)
        assert proc.returncode == code, (args, proc.returncode, proc.stderr.decode())
        return proc

    def import_records(self, text: str = RECORDS_CSV, *, code: int = 0) -> str:
        path = self.directory / "records.csv"
        path.write_text(text, encoding="utf-8")
        return self.cli("records", "import", str(path), code=code).stderr.decode()

    def fetch(self) -> None:
        code, out = fetch_json(self.config)
        assert code == 0, out
        assert all(a["status"] == "ok" for a in out["accounts"]), out

    def messages(self, viewer: str, *args: str) -> list[dict[str, Any]]:
        found = json.loads(self.cli("messages", "--viewer", viewer, "--json", *args).stdout)
        assert isinstance(found, list)
        return found

    def subjects(self, viewer: str, *args: str) -> list[str]:
        """What ``viewer`` sees, newest first, by subject."""
        return [m["subject"] for m in self.messages(viewer, *args)]

    def tags(self, viewer: str) -> dict[str, tuple[str, str, list[str]]]:
        """subject -> (visibility, reason, records) of what ``viewer`` sees."""
        return {
            m["subject"]: (m["visibility"], m["reason"], m["records"])
            for m in self.messages(viewer)
        }


def test_private_default_owner_sees_own_only_and_unmatched_mail_is_in_no_record_list(
    tmp_path: Path, dovecot: Dovecot, store_at: StoreAt
) -> None:
    crm = Crm(tmp_path, dovecot, store_at)
    crm.configure(bob={"sharing": "private"})  # alice: the default
    crm.import_records()
    crm.alice.deliver_many([mail(1, "Ann <ann@cust.example>"), mail(2, "x@nowhere.example")])
    crm.bob.deliver(mail(3, "ANN@CUST.EXAMPLE"))
    crm.fetch()

    assert crm.tags("alice") == {
        "m2": ("private", "unmatched", []),
        "m1": ("private", "mode_private", ["L1"]),
    }
    assert crm.subjects("alice") == ["m2", "m1"]
    assert crm.tags("bob") == {"m3": ("private", "mode_private", ["L1"])}
    assert crm.subjects("carol") == []
    assert crm.subjects("alice", "--record", "L1") == ["m1"]
    assert crm.subjects("bob", "--record", "L1") == ["m3"]
    assert crm.subjects("carol", "--record", "L1") == []
    for record in RECORD_IDS:
        assert "m2" not in crm.subjects("alice", "--record", record), record


def test_ceo_contact_stays_private_under_the_default_mode(
    tmp_path: Path, dovecot: Dovecot, store_at: StoreAt
) -> None:
    crm = Crm(tmp_path, dovecot, store_at)
    crm.import_records()  # C1 is the CEO's address, added as a contact
    raw = mail(1, "The CEO <ceo@own.example>")
    crm.alice.deliver(raw)
    crm.fetch()
    notes = crm.cli("records", "share", "C1", "--owner", "alice").stderr.decode()
    assert "no effect" in notes and "alice-mail" in notes

    [mine] = crm.messages("alice", "--record", "C1")
    assert (mine["visibility"], mine["reason"], mine["records"]) == (
        "private",
        "mode_private",
        ["C1"],
    )
    assert mine["sha256"] == sha(crlf(raw))
    assert crm.messages("bob") == []
    assert crm.messages("bob", "--record", "C1") == []
    refused = crm.cli("show", str(mine["id"]), "--viewer", "bob", code=77)
    assert "may not see" in refused.stderr.decode()
    assert refused.stdout == b""
    shown = crm.cli("show", str(mine["id"]), "--viewer", "alice", "--raw")
    assert shown.stdout == crlf(raw)
    crm.cli("show", "999999", "--viewer", "alice", code=77)


def test_custom_mode_shares_a_record_and_unshares_it(
    tmp_path: Path, dovecot: Dovecot, store_at: StoreAt
) -> None:
    crm = Crm(tmp_path, dovecot, store_at)
    crm.configure(alice={"sharing": "custom"}, bob={"sharing": "custom"})
    crm.import_records()
    crm.alice.deliver_many([mail(1, "ann@cust.example"), mail(2, "ben@other.example")])
    crm.bob.deliver(mail(3, "ann@cust.example"))
    crm.fetch()
    assert crm.subjects("carol") == []
    assert crm.tags("bob") == {"m3": ("private", "custom_not_shared", ["L1"])}

    crm.cli("records", "share", "L1", "--owner", "alice")
    assert crm.tags("carol") == {"m1": ("shared", "custom_shared", ["L1"])}
    assert crm.subjects("bob") == ["m3", "m1"]  # bob's own and alice's shared one
    assert crm.tags("alice") == {
        "m2": ("private", "custom_not_shared", ["L2"]),
        "m1": ("shared", "custom_shared", ["L1"]),
    }  # alice's flag shares alice's mail, never bob's m3
    assert crm.subjects("carol", "--record", "L1") == ["m1"]
    assert crm.subjects("carol", "--record", "L2") == []
    assert crm.subjects("carol", "--account", "alice-mail") == ["m1"]
    assert crm.subjects("carol", "--account", "bob-mail") == []
    assert crm.subjects("bob", "--limit", "1") == ["m3"]

    [m1] = crm.messages("carol")
    assert MESSAGE_KEYS <= set(m1)
    assert (m1["account"], m1["owner"], m1["direction"]) == ("alice-mail", "alice", "in")
    assert (m1["from"], m1["to"], m1["cc"]) == ("ann@cust.example", ["owner@own.example"], [])
    assert m1["message_id"] == "<m1@sharing.test>"
    assert m1["date"] == (BASE + timedelta(minutes=1)).isoformat()
    assert m1["labels"] == [] and isinstance(m1["id"], int) and m1["size"] > 0

    crm.cli("records", "share", "L1", "--owner", "alice", "--off")
    assert crm.subjects("carol") == []
    assert crm.tags("alice")["m1"] == ("private", "custom_not_shared", ["L1"])
    crm.cli("records", "share", "NOPE", "--owner", "alice", code=64)


def test_public_mode_excludes_a_domain_and_its_subdomains(
    tmp_path: Path, dovecot: Dovecot, store_at: StoreAt
) -> None:
    crm = Crm(tmp_path, dovecot, store_at)
    crm.configure(alice={"sharing": "public", "excluded_domains": ["rival.example"]})
    crm.import_records()
    crm.alice.deliver_many(
        [
            mail(1, "ann@cust.example"),
            mail(2, "rick@rival.example"),
            mail(3, "Rita <rita@EU.Rival.example>"),
            mail(4, "nora@notrival.example"),
            mail(5, "stranger@cust.example"),
        ]
    )
    crm.bob.deliver(mail(6, "ann@cust.example"))
    crm.fetch()

    assert crm.tags("alice") == {
        "m1": ("shared", "public", ["L1"]),
        "m2": ("private", "excluded_domain", ["R1"]),
        "m3": ("private", "excluded_domain", ["R1"]),
        "m4": ("shared", "public", ["N1"]),
        "m5": ("private", "unmatched", []),
    }
    assert crm.subjects("bob") == ["m6", "m4", "m1"]  # owner always sees own (private) m6
    assert crm.subjects("carol") == ["m4", "m1"]
    assert crm.subjects("alice", "--record", "R1") == ["m3", "m2"]
    assert crm.subjects("bob", "--record", "R1") == []

    # Public mode has no share flag: the CLI refuses one (65), so it never seems to lift
    # an excluded domain, and nothing changes.
    error = crm.cli("records", "share", "R1", "--owner", "alice", code=65).stderr.decode()
    assert "public" in error and "nothing changed" in error
    assert crm.subjects("carol") == ["m4", "m1"]


def test_address_change_keeps_links_links_stored_mail_and_not_future_old_mail(
    tmp_path: Path, dovecot: Dovecot, store_at: StoreAt
) -> None:
    crm = Crm(tmp_path, dovecot, store_at)
    crm.configure(alice={"sharing": "public"})
    crm.import_records("id,kind,email,name\nL1,lead,ann@cust.example,Ann\n")
    crm.alice.deliver_many([mail(1, "ann@cust.example"), mail(2, "ann.new@cust.example")])
    crm.fetch()
    assert crm.subjects("bob") == ["m1"]
    assert crm.tags("alice")["m2"] == ("private", "unmatched", [])

    out = crm.cli("records", "set-email", "L1", "Ann <Ann.New@Cust.Example>").stdout.decode()
    assert "ann.new@cust.example" in out
    [record] = json.loads(crm.cli("records", "list", "--json").stdout)
    assert record["emails"] == ["ann.new@cust.example"]
    assert crm.tags("bob") == {  # m1 keeps its link; stored m2 is linked and re-tagged
        "m2": ("shared", "public", ["L1"]),
        "m1": ("shared", "public", ["L1"]),
    }

    crm.alice.deliver_many([mail(3, "ann@cust.example"), mail(4, "ann.new@cust.example")])
    crm.fetch()
    assert crm.subjects("alice", "--record", "L1") == ["m4", "m2", "m1"]
    assert crm.tags("alice")["m3"] == ("private", "unmatched", [])  # the old address
    assert crm.subjects("bob") == ["m4", "m2", "m1"]

    crm.cli("records", "set-email", "L1", "not an address", code=65)
    crm.cli("records", "set-email", "NOPE", "x@cust.example", code=64)


def test_config_mode_change_retags_and_magnet_label_labels_at_next_cli_start(
    tmp_path: Path, dovecot: Dovecot, store_at: StoreAt
) -> None:
    crm = Crm(tmp_path, dovecot, store_at)
    crm.import_records()
    crm.alice.deliver_many([mail(1, "ann@cust.example"), mail(2, "x@nowhere.example")])
    crm.fetch()
    assert crm.subjects("bob") == []
    assert crm.subjects("alice", "--label", "CRM") == []

    crm.configure(alice={"sharing": "public", "magnet_label": "CRM"})
    assert crm.tags("bob") == {"m1": ("shared", "public", ["L1"])}
    labelled = crm.messages("alice", "--label", "CRM")
    assert [(m["subject"], m["labels"]) for m in labelled] == [("m1", ["CRM"])]
    assert crm.tags("alice")["m2"] == ("private", "unmatched", [])
    assert crm.subjects("bob", "--label", "CRM") == ["m1"]

    crm.configure(alice={"sharing": "custom", "magnet_label": "Deals"})
    assert crm.subjects("bob") == []
    assert crm.tags("alice")["m1"] == ("private", "custom_not_shared", ["L1"])
    assert crm.subjects("alice", "--label", "CRM") == []
    assert crm.subjects("alice", "--label", "Deals") == ["m1"]

    # New mail is labelled and tagged as it is stored.
    crm.alice.deliver(mail(3, "ben@other.example"))
    crm.fetch()
    assert crm.subjects("alice", "--label", "Deals") == ["m3", "m1"]


def test_bad_csv_rows_exit_65_name_every_bad_line_and_import_nothing(
    tmp_path: Path, dovecot: Dovecot, store_at: StoreAt
) -> None:
    crm = Crm(tmp_path, dovecot, store_at)
    stderr = crm.import_records(
        "id,kind,email,name\n"
        "L1,lead,ann@cust.example,Good\n"
        "L2,prospect,ben@other.example,Unknown kind\n"
        ",contact,carl@cust.example,Empty id\n"
        'L4,lead,"not an address",Unparseable\n'
        "L5,lead,ann@cust.example,Good again\n"
        "L6,contact,good@cust.example;bad@@cust.example,One bad address of two\n",
        code=65,
    )
    for line in (3, 4, 5, 7):
        assert f"line {line}:" in stderr, stderr
    for line in (2, 6):
        assert f"line {line}:" not in stderr, stderr
    assert "nothing imported" in stderr
    assert json.loads(crm.cli("records", "list", "--json").stdout) == []

    crm.import_records(
        "id,kind,email,name\nC2,Contact,Jürgen <JÜRGEN@Müller.example>; j@cust.example,Jürgen\n"
    )
    assert json.loads(crm.cli("records", "list", "--json").stdout) == [
        {
            "id": "C2",
            "kind": "contact",
            "name": "Jürgen",
            "emails": ["j@cust.example", "jürgen@xn--mller-kva.example"],
        }
    ]
