"""The HTTP API end to end: `mailingest run` serving [api] on loopback, mail fetched from a
real Dovecot, tokens made with the CLI. Every answer is checked against the CLI's view."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from api_support import RECORDS, ApiWorld, mail
from builders import crlf
from dovecot import Dovecot
from mailingest.api.app import ROUTES
from postgres import Postgres
from support import StoreAt, run_cli

HTML_MAIL = (
    b"From: Cleo <cleo@third.example>\nTo: owner@own.example\nSubject: with parts\n"
    b"Date: Mon, 02 Mar 2026 10:30:00 +0000\nMessage-ID: <parts@api.test>\n"
    b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b1"\n\n'
    b'--b1\nContent-Type: multipart/alternative; boundary="b2"\n\n'
    b"--b2\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: "
    b"quoted-printable\n\nGr=FC=DFe\n"
    b"--b2\nContent-Type: text/html; charset=utf-8\n\n<p>Gr\xc3\xbc\xc3\x9fe</p>\n--b2--\n"
    b'--b1\nContent-Type: application/pdf\nContent-Disposition: attachment; filename="q.pdf"\n'
    b"Content-Transfer-Encoding: base64\n\nJVBERi0xLjQK\n--b1--\n"
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "sqlite-helper"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, dovecot: Dovecot
) -> Iterator[ApiWorld]:
    """The daemon on each backend (the other API tests use SQLite); "helper": every
    request goes to a helper process ([api] processes), which answers the reads from the
    store itself and passes the rest to the daemon."""
    directory = tmp_path_factory.mktemp("api")
    storage = None
    if request.param == "postgresql":
        postgres: Postgres = request.getfixturevalue("postgres")
        secret = directory / "db-password"
        secret.write_text(postgres.password + "\n")
        secret.chmod(0o600)
        storage = StoreAt(postgres.new_database(), secret).storage()
    world = ApiWorld(directory, dovecot, storage=storage, through_helper="helper" in request.param)
    world.import_records()
    world.make_tokens()
    world.alice.deliver_many(
        [mail(1, "Ann <ann@cust.example>"), mail(2, "ben@other.example"), mail(3, "x@no.example")]
    )
    world.alice.deliver(HTML_MAIL)
    world.bob.deliver_many([mail(5, "ann@cust.example"), mail(6, "ben@other.example")])
    with world.running() as daemon:
        world.wait_stored(6)
        yield world
        assert daemon.events("api_request_failed") == []  # no request met a bug
        assert [e for e in daemon.events() if e["level"] == "error"] == []


def subjects(found: list[dict[str, Any]]) -> list[str]:
    return [m["subject"] for m in found]


def test_each_viewer_gets_what_the_cli_shows_page_by_page(world: ApiWorld) -> None:
    world.send("PUT", "alice", "/records/L1/shares/alice").raise_for_status()
    try:
        for viewer in ("alice", "bob", "carol"):
            assert world.all_messages(viewer) == world.cli_messages(viewer)
            for flag, value in (("record", "L1"), ("account", "bob-mail"), ("label", "crm")):
                assert world.all_messages(viewer, {flag: value}) == world.cli_messages(
                    viewer, f"--{flag}", value
                )
        assert subjects(world.all_messages("carol")) == ["m1"]
    finally:
        world.send("DELETE", "alice", "/records/L1/shares/alice").raise_for_status()
    assert world.all_messages("carol") == []


def test_one_message_with_its_decoded_parts_and_attachments(world: ApiWorld) -> None:
    [listed] = [m for m in world.all_messages("alice") if m["subject"] == "with parts"]
    response = world.get("alice", f"/messages/{listed['id']}")
    assert response.status_code == 200
    shown = response.json()
    assert {k: shown[k] for k in listed} == listed  # the `messages`/`show` fields, unchanged
    assert shown["parts"] == [
        {"type": "text/plain", "text": "Grüße"},  # the CRLF before a boundary is its own
        {"type": "text/html", "text": "<p>Grüße</p>"},
    ]
    assert shown["attachments"] == [{"filename": "q.pdf", "type": "application/pdf", "size": 9}]
    assert shown["body_omitted"] is None


def test_raw_bytes_stream_exactly_as_stored(world: ApiWorld) -> None:
    [listed] = [m for m in world.all_messages("alice") if m["subject"] == "with parts"]
    response = world.get("alice", f"/messages/{listed['id']}/raw")
    assert response.status_code == 200
    assert response.headers["content-type"] == "message/rfc822"
    assert response.content == crlf(HTML_MAIL)
    assert hashlib.sha256(response.content).hexdigest() == listed["sha256"]
    cli = run_cli(world.config, "show", str(listed["id"]), "--viewer", "alice", "--raw")
    assert cli.stdout == response.content


def test_a_share_toggle_re_tags_at_once_for_every_viewer(world: ApiWorld) -> None:
    assert "m5" not in subjects(world.all_messages("alice"))
    done = world.send("PUT", "bob", "/records/L1/shares/bob")
    assert done.status_code == 200
    assert done.json() == {"record": "L1", "owner": "bob", "shared": True, "notes": []}
    assert "m5" in subjects(world.all_messages("alice"))
    assert subjects(world.all_messages("carol")) == ["m5"]
    [m5] = world.all_messages("carol")
    assert (m5["visibility"], m5["reason"]) == ("shared", "custom_shared")
    audit = json.loads(world.cli("audit", "--record", "L1", "--json"))
    assert audit[0]["actor"] == "api:bob" and audit[0]["action"] == "share"
    assert world.send("DELETE", "bob", "/records/L1/shares/bob").json()["shared"] is False
    assert world.all_messages("carol") == []
    assert world.get("carol", f"/messages/{m5['id']}").status_code == 404


def test_the_service_token_acts_for_a_user_and_admin_manages_any_owner(world: ApiWorld) -> None:
    as_bob = world.get("crm", "/messages", headers={"X-Act-As": "bob"})
    assert as_bob.status_code == 200
    assert as_bob.json()["messages"] == world.cli_messages("bob")
    shared = world.send("PUT", "crm", "/records/L2/shares/bob", headers={"X-Act-As": "bob"})
    assert shared.status_code == 200
    assert subjects(world.all_messages("carol")) == ["m6"]
    audit = json.loads(world.cli("audit", "--record", "L2", "--json"))
    assert audit[0]["actor"] == "api:crm-service for bob"
    assert world.send("DELETE", "admin", "/records/L2/shares/bob").status_code == 200
    assert world.all_messages("carol") == []


def test_records_upsert_readdress_and_delete(world: ApiWorld) -> None:
    body = {"kind": "lead", "name": "X", "emails": ["X <x@no.example>"]}
    made = world.send("PUT", "crm", "/records/LX", json=body)
    assert made.status_code == 200, made.text
    assert made.json() == {
        "record": {"id": "LX", "kind": "lead", "name": "X", "emails": ["x@no.example"]}
    }
    assert subjects(world.all_messages("alice", {"record": "LX"})) == ["m3"]
    assert {"id": "LX", "kind": "lead", "name": "X", "emails": ["x@no.example"]} in world.get(
        "carol", "/records"
    ).json()["records"]
    moved = world.send("PUT", "admin", "/records/LX/emails", json={"emails": ["ben@other.example"]})
    assert moved.json() == {"record": "LX", "emails": ["ben@other.example"]}
    assert subjects(world.all_messages("alice", {"record": "LX"})) == ["m3", "m2"]  # links stay
    assert world.send("PUT", "alice", "/records/LX/shares/alice").status_code == 200
    assert subjects(world.all_messages("carol")) == ["m3", "m2"]
    assert world.send("DELETE", "crm", "/records/LX").status_code == 403
    gone = world.send("DELETE", "admin", "/records/LX")
    assert gone.json() == {"record": "LX", "deleted": True}
    [unshared, shared] = json.loads(world.cli("audit", "--record", "LX", "--json"))
    assert [(e["actor"], e["action"]) for e in (unshared, shared)] == [
        ("api:root", "unshare"),  # the admin token's user, not the daemon
        ("api:alice", "share"),
    ]
    assert world.all_messages("carol") == []  # its share flag went with it
    assert world.all_messages("alice", {"record": "LX"}) == []
    assert world.send("DELETE", "admin", "/records/LX").status_code == 404


def test_accounts_status_is_the_cli_status_of_the_callers_accounts(world: ApiWorld) -> None:
    cli = json.loads(world.cli("status", "--json"))
    response = world.get("admin", "/accounts")
    assert response.status_code == 200
    assert response.json() == cli  # an admin sees every account
    for who, headers in (("alice", {}), ("bob", {}), ("crm", {"X-Act-As": "bob"})):
        owner = headers.get("X-Act-As", who)
        mine = {"accounts": [a for a in cli["accounts"] if a["owner"] == owner]}
        assert len(mine["accounts"]) == 1
        assert world.get(who, "/accounts", headers=headers).json() == mine
    assert world.get("carol", "/accounts").json() == {"accounts": []}
    assert world.get("crm", "/accounts").json() == {"accounts": []}  # its own user owns none


def _error(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    body: dict[str, Any] = response.json()
    assert set(body) == {"status", "error", "message", "field"} and body["status"] == status
    assert body["field"] == field
    assert "Traceback" not in response.text
    return body


def test_401_without_a_valid_token(world: ApiWorld) -> None:
    _error(world.get(None, "/messages"), 401)
    _error(world.get(None, "/messages", headers={"Authorization": "Basic YTpi"}), 401)
    _error(world.get(None, "/messages", headers={"Authorization": "Bearer nope"}), 401)
    response = world.get(None, "/records", headers={"Authorization": "Bearer"})
    _error(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    token = world.token("temp", "alice")
    listed = json.loads(world.cli("api", "token", "list", "--json"))["tokens"]
    assert token not in json.dumps(listed)
    [made] = [t for t in listed if t["id"] == max(t["id"] for t in listed)]
    assert world.get("temp", "/messages").status_code == 200
    revoked = json.loads(world.cli("api", "token", "revoke", str(made["id"]), "--json"))
    assert revoked == {"id": made["id"], "revoked": True}
    _error(world.get("temp", "/messages"), 401)
    world.cli("api", "token", "revoke", str(made["id"]), code=64)


def test_403_when_the_token_may_not(world: ApiWorld) -> None:
    _error(world.get("alice", "/messages", headers={"X-Act-As": "bob"}), 403)
    _error(world.send("PUT", "bob", "/records/L1/shares/alice"), 403)
    _error(world.send("DELETE", "carol", "/records/L1/shares/alice"), 403)
    body = {"kind": "lead", "emails": ["a@b.example"]}
    _error(world.send("PUT", "alice", "/records/L9", json=body), 403)
    _error(world.send("PUT", "alice", "/records/L1/emails", json={"emails": ["a@b.example"]}), 403)
    _error(world.send("DELETE", "alice", "/records/L1"), 403)
    assert world.get("admin", "/records").json()["records"][0]["id"] == "L1"  # unchanged


def test_404_for_unknown_ids_and_other_users_mail(world: ApiWorld) -> None:
    mine = [m for m in world.all_messages("alice") if m["owner"] == "alice"]
    for message in mine:
        _error(world.get("bob", f"/messages/{message['id']}"), 404)
        _error(world.get("bob", f"/messages/{message['id']}/raw"), 404)
    _error(world.get("alice", "/messages/999999"), 404)
    _error(world.get("alice", "/messages/99999999999999999999999"), 404)
    _error(world.get("alice", "/messages/-1"), 404)
    _error(world.send("PUT", "alice", "/records/NOPE/shares/alice"), 404)
    _error(world.send("PUT", "crm", "/records/NOPE/emails", json={"emails": ["a@b.example"]}), 404)
    _error(world.get("alice", "/nothing-here"), 404)
    _error(world.send("DELETE", "alice", "/messages"), 405)


@pytest.mark.parametrize(
    "path",
    [
        "/messages/..%2F..%2Fetc%2Fpasswd",
        "/messages/%2e%2e/raw",
        "/messages/1%00",
        "/records/..%2F..%2Fetc%2Fpasswd/shares/alice",
        "/records/L1/shares/..%2Falice",
        "/../../etc/passwd",
    ],
)
def test_path_traversal_in_ids_is_a_plain_404(world: ApiWorld, path: str) -> None:
    method = "PUT" if "/shares/" in path else "GET"
    response = world.send(method, "admin", path)
    assert response.status_code in (404, 422), response.text
    assert "root:" not in response.text
    _error(response, response.status_code, response.json()["field"])


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "\u00b2"}, "limit"),  # a digit to str.isdigit, not to int()
        ({"cursor": base64.urlsafe_b64encode(b"[" * 5000).decode()}, "cursor"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "WzEsMl0"}, "cursor"),  # [1,2]: well-formed, wrong types
        ({"quarantined": "yes"}, "quarantined"),
        ({"account": "nobody-mail"}, "account"),
        ({"viewer": "bob"}, "viewer"),
        (
            {
                "cursor": base64.urlsafe_b64encode(
                    b'["z", 1000000000000000000000000000000]'
                ).decode()
            },
            "cursor",
        ),
        ({"cursor": base64.urlsafe_b64encode(b'["z", true]').decode()}, "cursor"),
        ({"label": "a\x00b"}, "label"),  # PostgreSQL refuses a NUL: bad input, not a store down
        ({"record": "L1\x00"}, "record"),
        ({"record": "L1\nL2"}, "record"),
        ({"record": "R" * 201}, "record"),
        ({"record": " "}, "record"),
    ],
)
def test_422_names_the_bad_query_value(world: ApiWorld, params: dict[str, str], field: str) -> None:
    _error(world.get("alice", "/messages", params=params), 422, field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b"", "body"),
        (b'{"kind": "lead"}', "emails"),
        (b'{"kind": "boss", "emails": ["a@b.example"]}', "kind"),
        (b'{"kind": "lead", "emails": ["not an address"]}', "emails"),
        (b'{"kind": "lead", "emails": "a@b.example"}', "emails"),
        (b'{"kind": "lead", "emails": ["a@b.example"], "owner": "x"}', "owner"),
        (b'{"kind": "lead", "name": 5, "emails": ["a@b.example"]}', "name"),
        (b"\xff\xfe", "body"),
        (b"[" * 100_000, "body"),
        (b'{"kind": "lead", "name": "\\ud800", "emails": ["a@b.example"]}', "body"),
        (b'{"kind": "lead", "name": "a\\u0000b", "emails": ["a@b.example"]}', "body"),
    ],
)
def test_422_names_the_bad_body_field(world: ApiWorld, body: bytes, field: str) -> None:
    response = world.send("PUT", "admin", "/records/L9", content=body)
    _error(response, 422, field)
    assert "L9" not in {r["id"] for r in world.get("admin", "/records").json()["records"]}


def test_who_asks_is_answered_before_what_is_asked(world: ApiWorld) -> None:
    """GET /messages reads its token with its page, yet a bad token or X-Act-As still wins
    over a bad query value, as on every route."""
    bad = {"limit": "0"}
    _error(world.get(None, "/messages", params=bad), 401)
    _error(world.get(None, "/messages", params=bad, headers={"Authorization": "Bearer no"}), 401)
    _error(world.get("alice", "/messages", params=bad, headers={"X-Act-As": "bob"}), 403)
    _error(world.get("crm", "/messages", params=bad, headers={"X-Act-As": "a b"}), 422, "X-Act-As")
    _error(world.get("crm", "/messages", params=bad, headers={"X-Act-As": "bob"}), 422, "limit")


@pytest.mark.parametrize(
    "record_id",
    [
        "%20%20",  # blank
        "L" * 201,  # over the limit of 200
        "L%01x",
        "L%0Ax",  # a line break
        "L%7F",
        "L%C2%85",  # NEL, a C1 control
        "L%E2%80%A8",  # LINE SEPARATOR
    ],
)
def test_422_names_a_bad_record_id_on_every_record_route(world: ApiWorld, record_id: str) -> None:
    for method, path, body in (
        ("PUT", "", {"kind": "lead", "emails": ["a@b.example"]}),
        ("PUT", "/emails", {"emails": ["a@b.example"]}),
        ("PUT", "/shares/alice", None),
        ("DELETE", "/shares/alice", None),
        ("DELETE", "", None),
    ):
        response = world.send(method, "admin", f"/records/{record_id}{path}", json=body)
        _error(response, 422, "id")
    assert [r["id"] for r in world.get("admin", "/records").json()["records"]] == list(RECORDS)


def test_a_record_id_of_200_characters_is_fine(world: ApiWorld) -> None:
    longest = "Ä" + "L" * 199  # characters, not bytes
    made = world.send("PUT", "admin", f"/records/{longest}", json={"kind": "lead", "emails": []})
    _error(made, 422, "emails")  # the id passed; the body is checked next
    body = {"kind": "lead", "emails": ["a@b.example"]}
    assert world.send("PUT", "admin", f"/records/{longest}", json=body).status_code == 200
    assert world.send("DELETE", "admin", f"/records/{longest}").status_code == 200


def test_oversized_bodies_and_bad_act_as_names(world: ApiWorld) -> None:
    huge = b'{"kind": "lead", "emails": ["' + b"a" * (2 * 1024 * 1024) + b'"]}'
    _error(world.send("PUT", "admin", "/records/L9", content=huge), 413)
    _error(world.get("crm", "/messages", headers={"X-Act-As": "bob smith"}), 422, "X-Act-As")
    _error(world.send("PUT", "admin", "/records/L1/shares/a%20b"), 404)


def test_the_openapi_document_is_valid_and_describes_every_route(world: ApiWorld) -> None:
    response = world.get(None, "/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    described = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    served = {(m, p.replace("{id:[0-9]{1,19}}", "{id}")) for m, p, _, _ in ROUTES}
    assert described == served
    for method, path, _, token in ROUTES:
        operation = document["paths"][path.replace("{id:[0-9]{1,19}}", "{id}")][method.lower()]
        assert (operation.get("security") != []) == token, path


def test_health_and_readiness_need_no_token(world: ApiWorld) -> None:
    assert world.get(None, "/healthz").json() == {"status": "ok", "store": "ok"}
    ready = world.get(None, "/readyz")
    assert ready.json() == {"status": "ok", "accounts": "loaded", "store": "writable"}


def test_the_cli_token_commands(tmp_path: Path, world: ApiWorld) -> None:
    proc = run_cli(world.config, "api", "token", "create", "--user", "dave", "--admin")
    assert proc.returncode == 0
    token = proc.stdout.decode().strip()
    assert token.startswith("mgi_") and len(token) > 40
    assert "shown this once" in proc.stderr.decode()
    listing = run_cli(world.config, "api", "token", "list").stdout.decode()
    assert "dave" in listing and token not in listing
    bad = run_cli(world.config, "api", "token", "create", "--user", "no body")
    assert bad.returncode == 65
