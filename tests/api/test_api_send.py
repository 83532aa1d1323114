"""POST /messages and /messages/{id}/reply: the CLI's `send` and `reply` through the API,
to a real SMTP server (aiosmtpd, STARTTLS and AUTH), with `mailingest run` and Dovecot."""

from __future__ import annotations

import email
from pathlib import Path

from test_api_metrics import scrape

from api_support import ApiWorld, mail
from dovecot import Dovecot
from smtp_support import SmtpServer, smtp_table


def test_send_and_reply_through_the_api(
    tmp_path: Path, dovecot: Dovecot, smtp_server: SmtpServer
) -> None:
    world = ApiWorld(
        tmp_path,
        dovecot,
        alice={"from_address": "alice@crm.example", "smtp": smtp_table(smtp_server)},
    )
    world.import_records()
    world.make_tokens()
    world.alice.deliver(mail(1, "Ann <ann@cust.example>"))
    crowd = ", ".join(f"p{n}@crowd.example" for n in range(101))
    world.alice.deliver(mail(3, "Ann <ann@cust.example>", to=crowd))
    world.bob.deliver(mail(2, "ann@cust.example"))
    with world.running() as daemon:
        world.wait_stored(3)
        body = {
            "account": "alice-mail",
            "to": ["Ann <ann@cust.example>"],
            "subject": "Offer",
            "body": "Grüße\n",
        }
        sent = world.send("POST", "alice", "/messages", json=body)
        assert sent.status_code == 200, sent.text
        out = sent.json()
        assert set(out) == {"id", "message_id", "account", "visibility", "reason", "refused"}
        assert (out["account"], out["visibility"], out["reason"]) == (
            "alice-mail",
            "shared",
            "crm_sent",
        )
        [(sender, rcpts, data)] = smtp_server.recorder.received
        assert (sender, rcpts) == ("alice@crm.example", ["ann@cust.example"])
        stored = world.get("alice", f"/messages/{out['id']}/raw").content
        assert stored.replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n")
        assert world.get("carol", f"/messages/{out['id']}").json()["direction"] == "out"

        [m1] = [m for m in world.all_messages("alice") if m["subject"] == "m1"]
        replied = world.send("POST", "alice", f"/messages/{m1['id']}/reply", json={"body": "ok"})
        assert replied.status_code == 200, replied.text
        reply = email.message_from_bytes(smtp_server.recorder.received[-1][2])
        assert reply["In-Reply-To"] == "<m1@api.test>" and reply["Subject"] == "Re: m1"

        others = world.send("POST", "bob", "/messages", json=body)  # as if it did not exist
        assert (others.status_code, others.json()["field"]) == (422, "account"), others.text
        assert world.send("POST", "bob", f"/messages/{m1['id']}/reply", json={}).status_code == 404
        bad = world.send("POST", "alice", "/messages", json={**body, "to": ["nobody"]})
        assert (bad.status_code, bad.json()["field"]) == (422, "to")
        none = world.send("POST", "alice", "/messages", json={**body, "to": []})
        assert (none.status_code, none.json()["field"]) == (422, "to")
        # One address per entry: the header and the envelope must name the same people;
        # no header line may be smuggled in; neither is a 500.
        for to in ("a@b.example, ann@cust.example", "a@b.example\r\nBcc: e@v.example"):
            two = world.send("POST", "alice", "/messages", json={**body, "to": [to]})
            assert (two.status_code, two.json()["field"]) == (422, "to"), two.text
        crlf = world.send(
            "POST", "alice", "/messages", json={**body, "subject": "x\r\nBcc: e@v.ex"}
        )
        assert (crlf.status_code, crlf.json()["field"]) == (422, "subject")
        # At most 100 recipients over to and cc; the reply-all to a crowd is refused whole.
        many = [f"p{n}@crowd.example" for n in range(101)]
        for to, cc, field in ((many, [], "to"), (many[:60], many[60:], "cc")):
            over = world.send("POST", "alice", "/messages", json={**body, "to": to, "cc": cc})
            assert (over.status_code, over.json()["field"]) == (422, field), over.text
        at_most = {**body, "to": many[:60], "cc": many[60:100], "subject": "\n"}
        within = world.send("POST", "alice", "/messages", json=at_most)  # 100: only the subject
        assert (within.status_code, within.json()["field"]) == (422, "subject")
        [m3] = [m for m in world.all_messages("alice") if m["subject"] == "m3"]
        to_all = world.send("POST", "alice", f"/messages/{m3['id']}/reply", json={"all": True})
        assert (to_all.status_code, to_all.json()["field"]) == (422, "all"), to_all.text
        huge = world.send("POST", "alice", f"/messages/{2**64}/reply", json={"body": "x"})
        assert huge.status_code == 404
        unknown = world.send("POST", "alice", "/messages", json={**body, "account": "x"})
        assert (unknown.status_code, unknown.json()["field"]) == (422, "account")
        # carol may see the shared sent mail but owns no account to reply from
        carol = world.send("POST", "carol", f"/messages/{out['id']}/reply", json={"body": "x"})
        assert (carol.status_code, carol.json()["field"]) == (422, "account")
        # bob's account has no SMTP table
        bob_body = {**body, "account": "bob-mail"}
        no_smtp = world.send("POST", "bob", "/messages", json=bob_body)
        assert (no_smtp.status_code, no_smtp.json()["field"]) == (422, "account")
        smtp_server.recorder.data_reply = "554 5.7.1 rejected"
        refused = world.send("POST", "alice", "/messages", json=body)
        assert (refused.status_code, refused.json()["field"]) == (422, None)
        assert "554 5.7.1 rejected" in refused.json()["message"]
        metrics = scrape(world)
        assert daemon.events("api_request_failed") == []
    assert len(smtp_server.recorder.received) == 2
    assert metrics[("mailingest_smtp_sends_total", (("result", "ok"),))] == 2
    # bad addresses are refused before any send: carol's, bob's and the 554 failed
    assert metrics[("mailingest_smtp_sends_total", (("result", "failed"),))] == 3
