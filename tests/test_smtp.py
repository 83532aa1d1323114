"""send / reply from the CRM through a real SMTP server (aiosmtpd: AUTH, STARTTLS, test cert)."""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dovecot import free_port
from pop3d import Mailbox, ThreadedPop3Server
from smtp_support import Recorder, SmtpServer, serving, smtp_table
from support import TIMEOUT, run_cli, sha, write_config
from token_endpoint import TokenEndpoint, token_endpoint


@pytest.fixture(scope="module")
def cert(smtp_cert: tuple[Path, Path]) -> tuple[Path, Path]:
    return smtp_cert


@pytest.fixture
def smtp_without_starttls(cert: tuple[Path, Path]) -> Iterator[SmtpServer]:
    with serving(cert, "plain") as server:
        yield server


@pytest.fixture
def smtps_server(cert: tuple[Path, Path]) -> Iterator[SmtpServer]:
    with serving(cert, "tls") as server:
        yield server


INBOX = [
    b"From: Lead One <lead@customer.example>\r\nTo: alice@crm.example\r\n"
    b"Reply-To: Sales Desk <desk@customer.example>\r\n"
    b"Subject: Re: Quote\r\nMessage-ID: <q1@customer.example>\r\n"
    b"References: <q0@crm.example>\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n\r\nhello\r\n"
]


def _without_reply_to(subject: str) -> list[bytes]:
    """An inbox of one message that has no Reply-To, with the given Subject."""
    return [
        b"From: Lead One <lead@customer.example>\r\nTo: alice@crm.example\r\n"
        b"Subject: " + subject.encode() + b"\r\nMessage-ID: <q2@customer.example>\r\n"
        b"Date: Tue, 24 Nov 2026 11:00:00 +0000\r\n\r\nhello again\r\n"
    ]


@pytest.fixture
def pop3(request: pytest.FixtureRequest) -> Iterator[ThreadedPop3Server]:
    """alice's inbox is INBOX unless a test parametrizes ``pop3`` indirectly with another."""
    inbox: list[bytes] = getattr(request, "param", INBOX)
    boxes = [Mailbox("alice", "pw-a", list(inbox)), Mailbox("bob", "pw-b", [])]
    with ThreadedPop3Server(boxes) as server:
        yield server


def _accounts(pop3: ThreadedPop3Server, server: SmtpServer, **alice: Any) -> list[dict[str, Any]]:
    def account(owner: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": f"{owner}-mail",
            "owner": owner,
            "host": "127.0.0.1",
            "port": pop3.port,
            "security": "plain",
            "allow_plaintext": True,
            "username": owner,
            "password": f"pw-{owner[0]}",
            "timeout": "5s",
            **extra,
        }

    table = smtp_table(server)
    table.update(alice.pop("smtp", {}))
    table = {k: v for k, v in table.items() if v is not None}  # None: leave key out
    return [
        account("alice", from_address="alice@crm.example", smtp=table, **alice),
        account("bob", from_address="bob@crm.example", smtp={**table}),
    ]


def _body(tmp_path: Path, text: str = "Grüße aus dem CRM\nZeile zwei\n") -> Path:
    path = tmp_path / "body.txt"
    path.write_text(text, encoding="utf-8")
    return path


def _send(config: Path, body: Path, *extra: str, to: str = "lead@customer.example") -> Any:
    return run_cli(
        config, "send", "--account", "alice-mail", "--to", to, "--subject",
        "Angebot für Q4: 10 % Rabatt €", "--body-file", str(body), "--json", *extra,
    )  # fmt: skip


def _send_stdin(config: Path, body: bytes) -> subprocess.CompletedProcess[bytes]:
    """`send --body-file -` with ``body`` on stdin (support.run_cli gives the CLI no stdin)."""
    return subprocess.run(
        [sys.executable, "-m", "mailingest", "-c", str(config), "send", "--account",
         "alice-mail", "--to", "lead@customer.example", "--subject", "Aus stdin",
         "--body-file", "-", "--json"],
        input=body,
        capture_output=True,
        timeout=TIMEOUT,
    )  # fmt: skip


def _assert_nothing_sent_or_stored(config: Path, server: SmtpServer) -> None:
    assert server.recorder.received == []
    assert _messages(config, "alice") == []


def _messages(config: Path, viewer: str) -> list[dict[str, Any]]:
    proc = run_cli(config, "messages", "--viewer", viewer, "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return result


def _records(tmp_path: Path, config: Path) -> None:
    csv = tmp_path / "records.csv"
    csv.write_text(
        "id,kind,email,name\nL1,lead,lead@customer.example;desk@customer.example,Lead One\n"
        "C1,contact,partner@excluded.example,Partner\n",
        encoding="utf-8",
    )
    assert run_cli(config, "records", "import", str(csv)).returncode == 0


def test_send_stores_exactly_the_bytes_the_server_received(
    tmp_path: Path, smtp_server: SmtpServer, pop3: ThreadedPop3Server
) -> None:
    config = write_config(tmp_path, _accounts(pop3, smtp_server))
    proc = _send(config, _body(tmp_path), "--cc", "boss@crm.example")
    assert proc.returncode == 0, proc.stderr.decode()
    sent = json.loads(proc.stdout)

    [(mail_from, rcpts, data)] = smtp_server.recorder.received
    assert mail_from == "alice@crm.example"
    assert rcpts == ["lead@customer.example", "boss@crm.example"]
    raw = run_cli(config, "show", str(sent["id"]), "--viewer", "alice", "--raw").stdout
    assert raw == data and sha(raw) == sha(data)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Message-ID"] == sent["message_id"]
    assert parsed["From"] == "alice@crm.example"
    [stored] = _messages(config, "alice")
    assert stored["subject"] == "Angebot für Q4: 10 % Rabatt €"
    assert stored["direction"] == "out" and stored["message_id"] == sent["message_id"]
    assert parsed.get_content().replace("\r\n", "\n") == "Grüße aus dem CRM\nZeile zwei\n"


@pytest.mark.parametrize(
    ("settings", "to", "visibility", "reason"),
    [
        ({}, "lead@customer.example", "private", "mode_private"),
        ({"sharing": "custom"}, "lead@customer.example", "shared", "crm_sent"),
        ({"sharing": "public"}, "lead@customer.example", "shared", "crm_sent"),
        (
            {"sharing": "public", "excluded_domains": ["excluded.example"]},
            "partner@excluded.example",
            "private",
            "excluded_domain",
        ),
        ({"sharing": "public"}, "stranger@nowhere.example", "private", "unmatched"),
    ],
)
def test_visibility_of_sent_mail(
    tmp_path: Path,
    smtp_server: SmtpServer,
    pop3: ThreadedPop3Server,
    settings: dict[str, Any],
    to: str,
    visibility: str,
    reason: str,
) -> None:
    config = write_config(tmp_path, _accounts(pop3, smtp_server, **settings))
    _records(tmp_path, config)
    proc = _send(config, _body(tmp_path), to=to)
    assert proc.returncode == 0, proc.stderr.decode()
    sent = json.loads(proc.stdout)
    assert (sent["visibility"], sent["reason"]) == (visibility, reason)
    assert any(m["id"] == sent["id"] for m in _messages(config, "alice"))  # owner always
    bob_sees = any(m["id"] == sent["id"] for m in _messages(config, "bob"))
    assert bob_sees == (visibility == "shared")


def test_reply_threads_and_comes_from_the_repliers_account(
    tmp_path: Path, smtp_server: SmtpServer, pop3: ThreadedPop3Server
) -> None:
    config = write_config(tmp_path, _accounts(pop3, smtp_server, sharing="public"))
    _records(tmp_path, config)
    assert run_cli(config, "fetch").returncode == 0
    [original] = _messages(config, "alice")
    assert original["visibility"] == "shared"

    proc = run_cli(
        config, "reply", str(original["id"]), "--viewer", "bob", "--body-file",
        str(_body(tmp_path, "Thanks!\n")), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    [(mail_from, rcpts, data)] = smtp_server.recorder.received
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    # bob's own account and From (his login "bob" is no address: from_address is required)
    assert mail_from == "bob@crm.example" and parsed["From"] == "bob@crm.example"
    assert rcpts == ["desk@customer.example"]  # Reply-To wins over From
    assert parsed["Subject"] == "Re: Quote"  # no stacking
    assert parsed["In-Reply-To"] == "<q1@customer.example>"
    assert parsed["References"] == "<q0@crm.example> <q1@customer.example>"
    reply = json.loads(proc.stdout)
    assert any(m["id"] == reply["id"] and m["owner"] == "bob" for m in _messages(config, "bob"))


def test_reply_by_a_viewer_who_may_not_see_the_message_is_refused(
    tmp_path: Path, smtp_server: SmtpServer, pop3: ThreadedPop3Server
) -> None:
    config = write_config(tmp_path, _accounts(pop3, smtp_server))  # private
    _records(tmp_path, config)
    assert run_cli(config, "fetch").returncode == 0
    [original] = _messages(config, "alice")
    proc = run_cli(
        config, "reply", str(original["id"]), "--viewer", "bob", "--body-file",
        str(_body(tmp_path)),
    )  # fmt: skip
    assert proc.returncode == 77
    assert b"may not see" in proc.stderr
    assert smtp_server.recorder.received == []


def test_wrong_smtp_password_exit_77_nothing_stored_and_check_names_smtp(
    tmp_path: Path, smtp_server: SmtpServer, pop3: ThreadedPop3Server
) -> None:
    accounts = _accounts(pop3, smtp_server, smtp={"password": "Wrong-Walnut-00"})
    config = write_config(tmp_path, accounts)
    proc = _send(config, _body(tmp_path))
    assert proc.returncode == 77
    assert b"SMTP login rejected" in proc.stderr
    assert b"Wrong-Walnut-00" not in proc.stderr + proc.stdout
    assert _messages(config, "alice") == []
    assert smtp_server.recorder.received == []

    check = run_cli(config, "check", "--json", "--account", "alice-mail")
    assert check.returncode == 77
    [result] = json.loads(check.stdout)["accounts"]
    assert result["pop3"]["status"] == "ok"
    assert result["smtp"]["status"] == "auth_failed"


def test_starttls_missing_is_refused(
    tmp_path: Path, smtp_without_starttls: SmtpServer, pop3: ThreadedPop3Server
) -> None:
    config = write_config(tmp_path, _accounts(pop3, smtp_without_starttls))
    proc = _send(config, _body(tmp_path))
    assert proc.returncode == 69
    assert b"STARTTLS" in proc.stderr
    assert smtp_without_starttls.recorder.received == []
    assert _messages(config, "alice") == []


def test_daily_limit_reached_exit_75_and_nothing_sent(
    tmp_path: Path, smtp_server: SmtpServer, pop3: ThreadedPop3Server
) -> None:
    config = write_config(tmp_path, _accounts(pop3, smtp_server, smtp={"daily_limit": 2}))
    body = _body(tmp_path)
    assert _send(config, body).returncode == 0
    assert _send(config, body).returncode == 0
    proc = _send(config, body)
    assert proc.returncode == 75
    assert b"daily limit of 2" in proc.stderr and b"resets at" in proc.stderr
    assert len(smtp_server.recorder.received) == 2
    assert len(_messages(config, "alice")) == 2


def test_concurrent_sends_at_the_daily_limit_send_only_what_the_limit_allows(
    tmp_path: Path, smtp_server: SmtpServer, pop3: ThreadedPop3Server
) -> None:
    config = write_config(tmp_path, _accounts(pop3, smtp_server, smtp={"daily_limit": 1}))
    body = _body(tmp_path)
    with ThreadPoolExecutor(max_workers=4) as pool:
        codes = sorted(pool.map(lambda _: _send(config, body).returncode, range(4)))
    assert codes == [0, 75, 75, 75]
    assert len(smtp_server.recorder.received) == 1
    assert len(_messages(config, "alice")) == 1


def test_reply_sender_ambiguous_is_a_usage_error(
    tmp_path: Path, smtp_server: SmtpServer, pop3: ThreadedPop3Server
) -> None:
    accounts = _accounts(pop3, smtp_server, sharing="public")
    second = {**accounts[1], "name": "bob-other"}
    config = write_config(tmp_path, [*accounts, second])
    _records(tmp_path, config)
    assert run_cli(config, "fetch", "--account", "alice-mail").returncode == 0
    [original] = _messages(config, "alice")
    proc = run_cli(
        config, "reply", str(original["id"]), "--viewer", "bob", "--body-file",
        str(_body(tmp_path)),
    )  # fmt: skip
    assert proc.returncode == 64
    assert b"primary = true" in proc.stderr


def test_implicit_tls_sends_and_stores(
    tmp_path: Path, smtps_server: SmtpServer, pop3: ThreadedPop3Server
) -> None:
    config = write_config(tmp_path, _accounts(pop3, smtps_server, smtp={"security": "tls"}))
    proc = _send(config, _body(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode()
    sent = json.loads(proc.stdout)
    [(_, rcpts, data)] = smtps_server.recorder.received
    assert rcpts == ["lead@customer.example"]
    raw = run_cli(config, "show", str(sent["id"]), "--viewer", "alice", "--raw").stdout
    assert raw == data


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_untrusted_certificate_is_refused_as_tls_failure_and_nothing_stored(
    tmp_path: Path,
    cert: tuple[Path, Path],
    pop3: ThreadedPop3Server,
    security: str,
) -> None:
    with serving(cert, security) as server:
        smtp = {"security": security, "ca_file": None}  # the test CA is not in the system store
        config = write_config(tmp_path, _accounts(pop3, server, smtp=smtp))
        proc = _send(config, _body(tmp_path))
        assert proc.returncode == 69
        assert b"SMTP certificate rejected" in proc.stderr
        check = run_cli(config, "check", "--json", "--account", "alice-mail")
        [result] = json.loads(check.stdout)["accounts"]
        assert result["smtp"]["status"] == "tls_failed"
        _assert_nothing_sent_or_stored(config, server)


def test_unreachable_smtp_server_exit_69_nothing_stored(
    tmp_path: Path, cert: tuple[Path, Path], pop3: ThreadedPop3Server
) -> None:
    closed = SmtpServer(free_port(), Recorder(), cert[0])  # nothing listens on this port
    config = write_config(tmp_path, _accounts(pop3, closed))
    proc = _send(config, _body(tmp_path))
    assert proc.returncode == 69
    assert b"cannot connect to the SMTP server" in proc.stderr
    _assert_nothing_sent_or_stored(config, closed)


@pytest.mark.parametrize(
    ("phase", "reply", "code"),
    [
        ("rcpt", "450 4.2.0 Mailbox busy, try later", 75),
        ("data", "451 4.3.0 Queue full, try later", 75),
        ("rcpt", "550 5.1.1 No such user here", 65),
        ("data", "554 5.7.1 Message rejected as spam", 65),
    ],
)
def test_server_refusal_4xx_is_temporary_5xx_is_data_error_with_the_servers_words(
    tmp_path: Path,
    smtp_server: SmtpServer,
    pop3: ThreadedPop3Server,
    phase: str,
    reply: str,
    code: int,
) -> None:
    setattr(smtp_server.recorder, f"{phase}_reply", reply)
    config = write_config(tmp_path, _accounts(pop3, smtp_server))
    proc = _send(config, _body(tmp_path))
    assert proc.returncode == code, proc.stderr.decode()
    assert reply.encode() in proc.stderr
    _assert_nothing_sent_or_stored(config, smtp_server)


@pytest.mark.parametrize(
    ("reply", "code", "status"),
    [
        ("454 4.7.0 Temporary authentication failure", 75, "temp_failed"),
        ("535 5.7.8 Authentication credentials invalid", 77, "auth_failed"),
    ],
)
def test_auth_reply_4xx_is_temporary_5xx_is_auth_failed(
    tmp_path: Path,
    smtp_server: SmtpServer,
    pop3: ThreadedPop3Server,
    reply: str,
    code: int,
    status: str,
) -> None:
    smtp_server.recorder.auth_reply = reply
    config = write_config(tmp_path, _accounts(pop3, smtp_server))
    proc = _send(config, _body(tmp_path))
    assert proc.returncode == code, proc.stderr.decode()
    assert reply.encode() in proc.stderr
    check = run_cli(config, "check", "--json", "--account", "alice-mail")
    assert check.returncode == code
    [result] = json.loads(check.stdout)["accounts"]
    assert result["smtp"]["status"] == status
    _assert_nothing_sent_or_stored(config, smtp_server)


def test_send_reads_the_body_from_stdin_with_body_file_dash(
    tmp_path: Path, smtp_server: SmtpServer, pop3: ThreadedPop3Server
) -> None:
    config = write_config(tmp_path, _accounts(pop3, smtp_server))
    proc = _send_stdin(config, "Grüße von stdin\nZeile zwei\n".encode())
    assert proc.returncode == 0, proc.stderr.decode()
    [(_, _, data)] = smtp_server.recorder.received
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed.get_content().replace("\r\n", "\n") == "Grüße von stdin\nZeile zwei\n"
    [stored] = _messages(config, "alice")
    assert stored["id"] == json.loads(proc.stdout)["id"]


@pytest.mark.parametrize(
    ("pop3", "subject"),
    [(_without_reply_to("Quote"), "Re: Quote"), (_without_reply_to("AW: Angebot"), "AW: Angebot")],
    indirect=["pop3"],
)
def test_reply_without_reply_to_goes_to_from_and_re_is_added_once(
    tmp_path: Path, smtp_server: SmtpServer, pop3: ThreadedPop3Server, subject: str
) -> None:
    config = write_config(tmp_path, _accounts(pop3, smtp_server))
    assert run_cli(config, "fetch", "--account", "alice-mail").returncode == 0
    [original] = _messages(config, "alice")
    proc = run_cli(
        config, "reply", str(original["id"]), "--viewer", "alice", "--body-file",
        str(_body(tmp_path, "Thanks!\n")),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    [(_, rcpts, data)] = smtp_server.recorder.received
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert rcpts == ["lead@customer.example"]  # no Reply-To: the From address
    assert parsed["Subject"] == subject
    assert parsed["In-Reply-To"] == "<q2@customer.example>"


def test_a_body_on_stdin_that_is_not_utf8_is_bad_input_and_nothing_is_sent(
    tmp_path: Path, smtp_server: SmtpServer, pop3: ThreadedPop3Server
) -> None:
    config = write_config(tmp_path, _accounts(pop3, smtp_server))
    proc = _send_stdin(config, "Grüße".encode("latin-1"))
    assert proc.returncode == 65, proc.stderr.decode()
    assert b"cannot read the body" in proc.stderr
    _assert_nothing_sent_or_stored(config, smtp_server)


def _oauth2_smtp(endpoint: TokenEndpoint, **extra: Any) -> dict[str, Any]:
    settings = {
        "provider": "custom",
        "grant": "client_credentials",
        "token_url": endpoint.url,
        "scopes": ["smtp"],
        "client_id": "app-smtp",
        "client_secret": "smtp-client-secret-Lq40",
        **extra,
    }
    return {"password": None, "auth": {"oauth2": settings}}


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_send_signs_in_with_oauth2_in_two_steps(
    tmp_path: Path, smtp_server: SmtpServer, pop3: ThreadedPop3Server, mechanism: str
) -> None:
    token = smtp_server.recorder.oauth2_token
    with token_endpoint() as endpoint:
        endpoint.replies = [endpoint.token(token)]
        smtp = _oauth2_smtp(endpoint, mechanism=mechanism)
        config = write_config(tmp_path, _accounts(pop3, smtp_server, smtp=smtp))
        proc = _send(config, _body(tmp_path))
        assert proc.returncode == 0, proc.stderr.decode()
        check = run_cli(config, "check", "--json", "--account", "alice-mail")
    assert check.returncode == 0, check.stdout.decode()
    assert json.loads(check.stdout)["accounts"][0]["smtp"]["status"] == "ok"
    assert len(smtp_server.recorder.received) == 1
    attempts = smtp_server.recorder.oauth2_attempts
    assert [(m, line) for m, line, _ in attempts] == [(mechanism.upper(), "")] * 2
    assert endpoint.requests[0]["grant_type"] == "client_credentials"
    everything = proc.stdout + proc.stderr + check.stdout + check.stderr
    assert token.encode() not in everything and b"smtp-client-secret-Lq40" not in everything


def test_an_smtp_token_the_server_refuses_is_auth_failed_and_nothing_is_stored(
    tmp_path: Path, smtp_server: SmtpServer, pop3: ThreadedPop3Server
) -> None:
    with token_endpoint() as endpoint:
        endpoint.replies = [endpoint.token("a-token-the-server-does-not-know")]
        smtp = _oauth2_smtp(endpoint)
        config = write_config(tmp_path, _accounts(pop3, smtp_server, smtp=smtp))
        proc = _send(config, _body(tmp_path))
    assert proc.returncode == 77, proc.stderr.decode()
    assert b"SMTP login rejected" in proc.stderr
    assert b"a-token-the-server-does-not-know" not in proc.stderr + proc.stdout
    _assert_nothing_sent_or_stored(config, smtp_server)
