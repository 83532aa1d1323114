"""Accounts through the API: add with a test login, an owner's sharing settings (read,
change: re-tagged before the answer), check now, fetch now. `mailingest run` and Dovecot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from api_support import ApiWorld, mail
from daemon_support import WAIT
from dovecot import Dovecot, Mailbox
from pop3d import Faults, Pop3dThreaded
from pop3d import Mailbox as ScriptedMailbox

STORAGE = {"database": "mail.db", "secret_key": "a-test-key-of-32-characters-long"}


def _table(mailbox: Mailbox, name: str, owner: str, **more: Any) -> dict[str, Any]:
    server = mailbox.dovecot
    return {
        "name": name,
        "owner": owner,
        "host": server.host,
        "port": server.port,
        "security": "plain",
        "allow_plaintext": True,
        "username": mailbox.user,
        "password": mailbox.password,
        "timeout": "20s",
        **more,
    }


def _until(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_accounts_through_the_api(tmp_path: Path, dovecot: Dovecot) -> None:
    world = ApiWorld(tmp_path, dovecot, storage=STORAGE)
    world.import_records()
    world.make_tokens()
    carol_box = dovecot.new_mailbox()
    carol_box.deliver(mail(1, "Ann <ann@cust.example>"))
    with world.running():
        table = _table(carol_box, "carol-mail", "carol", sharing="custom")
        assert world.send("POST", "bob", "/accounts", json=table).status_code == 403
        assert world.get("carol", "/accounts").json() == {"accounts": []}  # she owns none yet
        wrong = world.send("POST", "carol", "/accounts", json={**table, "password": "nope"})
        assert (wrong.status_code, wrong.json()["field"]) == (422, "password"), wrong.text
        assert world.get("carol", "/accounts/carol-mail").status_code == 404  # nothing stored
        added = world.send("POST", "carol", "/accounts", json=table)
        assert added.status_code == 200, added.text
        body = added.json()
        assert (body["account"], body["added"], body["pop3"]["status"]) == (
            "carol-mail",
            True,
            "ok",
        )
        assert body["pop3"]["messages"] == 1
        assert world.send("POST", "carol", "/accounts", json=table).status_code == 409
        bad = world.send("POST", "carol", "/accounts", json={**table, "name": "c2", "port": "x"})
        assert (bad.status_code, bad.json()["field"]) == (422, "port"), bad.text
        names = [a["account"] for a in world.get("carol", "/accounts").json()["accounts"]]
        assert names == ["carol-mail"]  # applied before the answer; only hers
        _until(lambda: len(world.all_messages("carol")) == 1, "carol's mail to be fetched")

        # Another user's account is answered as absent, whatever the route: no names leak.
        for method, path in (
            ("GET", "/accounts/carol-mail"),
            ("PATCH", "/accounts/carol-mail"),
            ("POST", "/accounts/carol-mail/check"),
            ("POST", "/accounts/carol-mail/fetch"),
        ):
            other = world.send(method, "bob", path, json={"sharing": "public"})
            assert other.status_code == 404, (method, path, other.text)
            assert other.json()["message"] == "no account 'carol-mail'"  # as for an unknown one
        as_carol = world.get("crm", "/accounts/carol-mail", headers={"X-Act-As": "carol"})
        assert as_carol.status_code == 200
        settings = world.get("admin", "/accounts/carol-mail").json()
        assert settings == {
            "account": "carol-mail",
            "owner": "carol",
            "source": "database",
            "sharing": "custom",
            "excluded_domains": [],
            "magnet_label": None,
            "from_address": None,
            "aliases": [],
            "primary": False,
        }
        assert world.get("alice", "/accounts/alice-mail").json()["source"] == "config"
        assert world.all_messages("bob") == []
        public = {"sharing": "public"}
        changed = world.send("PATCH", "carol", "/accounts/carol-mail", json=public)
        assert changed.json() == {"account": "carol-mail", "changed": ["sharing"]}
        [seen] = world.all_messages("bob")  # re-tagged before the answer
        assert (seen["owner"], seen["visibility"], seen["reason"]) == ("carol", "shared", "public")
        excluded = {"excluded_domains": ["other.example"]}
        as_carol = {"X-Act-As": "carol"}
        by_crm = world.send("PATCH", "crm", "/accounts/carol-mail", json=excluded, headers=as_carol)
        assert by_crm.status_code == 200, by_crm.text
        audit = json.loads(world.cli("audit", "--account", "carol-mail", "--json"))
        assert [(e["actor"], e["action"], sorted(e["detail"])) for e in audit] == [
            ("api:crm-service for carol", "sharing_changed", ["excluded_domains"]),
            ("api:carol", "sharing_changed", ["sharing"]),  # who asked, not "daemon"
        ]
        for patch, field in (
            ({"sharing": "open"}, "sharing"),
            ({"primary": "yes"}, "primary"),
            ({"excluded_domains": "x.example"}, "excluded_domains"),
            ({"owner": "bob"}, "owner"),
            ({}, "body"),
        ):
            response = world.send("PATCH", "carol", "/accounts/carol-mail", json=patch)
            assert (response.status_code, response.json()["field"]) == (422, field), patch
        labelled = {"magnet_label": "crm", "primary": True}
        assert world.send("PATCH", "admin", "/accounts/carol-mail", json=labelled).json() == {
            "account": "carol-mail",
            "changed": ["magnet_label", "primary"],
        }
        assert world.all_messages("carol")[0]["labels"] == ["crm"]
        file_account = world.send("PATCH", "alice", "/accounts/alice-mail", json=public)
        assert file_account.status_code == 409 and "config file" in file_account.json()["message"]

        checked = world.send("POST", "alice", "/accounts/alice-mail/check")
        assert checked.json()["pop3"]["status"] == "ok" and checked.json()["smtp"] is None
        assert world.send("POST", "bob", "/accounts/alice-mail/check").status_code == 404
        assert world.send("POST", "alice", "/accounts/nope/check").status_code == 404

        def alices() -> list[Any]:
            return [m for m in world.all_messages("alice") if m["owner"] == "alice"]

        assert alices() == []
        world.alice.deliver(mail(2, "ben@other.example"))  # the next regular poll: in an hour
        now = world.send("POST", "alice", "/accounts/alice-mail/fetch")
        assert now.status_code == 202
        assert now.json() == {"account": "alice-mail", "poll": "requested"}
        _until(lambda: len(alices()) == 1, "fetch now to store alice's mail")
        assert world.send("POST", "bob", "/accounts/alice-mail/fetch").status_code == 404

        untested = {**_table(dovecot.new_mailbox(), "paused-mail", "carol"), "password": "nope"}
        stored = world.send("POST", "admin", "/accounts", json={**untested, "test": False})
        assert stored.json()["pop3"] is None
        _until(
            lambda: world.send("POST", "carol", "/accounts/paused-mail/fetch").status_code == 409,
            "the rejected login to pause the account",
        )


def test_a_test_login_quotes_no_server_words_to_a_non_admin(
    tmp_path: Path, dovecot: Dovecot, pop3d_threaded: Pop3dThreaded
) -> None:
    """Any user may point a test login at any host: what that host says is no business of
    theirs (an internal service's banner), only the documented status and a fixed cause.
    An admin gets the server's words, as `check` prints them; the log has them too."""
    world = ApiWorld(tmp_path, dovecot, storage=STORAGE)
    world.make_tokens()
    banner = "-ERR db.internal.example ready, build 7f3a-secret"
    server = pop3d_threaded([ScriptedMailbox("carol", "pw-carol", [])], Faults(greeting=banner))
    table = {
        "name": "carol-x",
        "owner": "carol",
        "host": "127.0.0.1",
        "port": server.port,
        "security": "plain",
        "allow_plaintext": True,
        "username": "carol",
        "password": "pw-carol",
        "timeout": "10s",
    }
    with world.running() as daemon:
        failed = world.send("POST", "carol", "/accounts", json=table)
        assert (failed.status_code, failed.json()["field"]) == (422, "host"), failed.text
        assert failed.json()["message"] == (
            "the test login failed (error): the server did not answer as a POP3 server"
        )
        assert "secret" not in failed.text
        acting = world.send("POST", "crm", "/accounts", json=table, headers={"X-Act-As": "carol"})
        assert acting.json() == failed.json()
        admin = world.send("POST", "admin", "/accounts", json=table)
        assert (admin.status_code, admin.json()["field"]) == (422, "host")
        assert "build 7f3a-secret" in admin.json()["message"]
        logged = daemon.events("api_test_login_failed", account="carol-x")
        assert len(logged) == 3 and all("7f3a-secret" in e["error"] for e in logged)
        assert logged[0]["status"] == "error"

        rejected = {**_table(dovecot.new_mailbox(), "carol-y", "carol"), "password": "nope"}
        wrong = world.send("POST", "carol", "/accounts", json=rejected)
        assert (wrong.status_code, wrong.json()["field"]) == (422, "password")
        assert wrong.json()["message"] == (
            "the test login failed (auth_failed): the server rejected the login"
        )
        # Untested, a non-admin could make the daemon poll any host and read the errors
        # in GET /accounts: only an admin skips the test.
        untested = world.send("POST", "carol", "/accounts", json={**table, "test": False})
        assert untested.status_code == 403, untested.text
        assert world.get("carol", "/accounts").json() == {"accounts": []}
