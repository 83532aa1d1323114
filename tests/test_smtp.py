"""send / reply from the CRM through a real SMTP server (aiosmtpd: AUTH, STARTTLS, test cert)."""

from __future__ import annotations

import email
import email.policy
import json
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from dovecot import free_port
from mailingest.popserver import Mailbox, ThreadedPop3Server
from support import run_cli, sha, write_config

SMTP_USER, SMTP_PASSWORD = "alice-out", "Smtp-Pass-Walnut-77"


@dataclass
class Recorder:
    """aiosmtpd handler that keeps every envelope."""

    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.received.append((str(envelope.mail_from), list(envelope.rcpt_tos), content))
        return "250 OK"


def _authenticator(
    server: Any, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        SMTP_USER.encode(),
        SMTP_PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("smtp-cert")
    key, crt = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return crt, key


@dataclass
class SmtpServer:
    port: int
    recorder: Recorder
    cert: Path


def _start(cert: tuple[Path, Path], *, starttls: bool) -> tuple[Controller, SmtpServer]:
    recorder = Recorder()
    context = None
    if starttls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    port = free_port()
    controller = Controller(
        recorder,
        hostname="127.0.0.1",
        port=port,
        authenticator=_authenticator,
        auth_require_tls=starttls,
        tls_context=context,
        require_starttls=starttls,
    )
    controller.start()
    return controller, SmtpServer(port, recorder, cert[0])


@pytest.fixture
def smtp_server(cert: tuple[Path, Path]) -> Iterator[SmtpServer]:
    controller, server = _start(cert, starttls=True)
    yield server
    controller.stop()


@pytest.fixture
def smtp_without_starttls(cert: tuple[Path, Path]) -> Iterator[SmtpServer]:
    controller, server = _start(cert, starttls=False)
    yield server
    controller.stop()


INBOX = [
    b"From: Lead One <lead@customer.example>\r\nTo: alice@crm.example\r\n"
    b"Reply-To: Sales Desk <desk@customer.example>\r\n"
    b"Subject: Re: Quote\r\nMessage-ID: <q1@customer.example>\r\n"
    b"References: <q0@crm.example>\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n\r\nhello\r\n"
]


@pytest.fixture
def pop3() -> Iterator[ThreadedPop3Server]:
    boxes = [Mailbox("alice", "pw-a", list(INBOX)), Mailbox("bob", "pw-b", [])]
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

    smtp_table = {
        "host": "127.0.0.1",
        "port": server.port,
        "security": "starttls",
        "username": SMTP_USER,
        "password": SMTP_PASSWORD,
        "ca_file": str(server.cert),
        "timeout": "5s",
    }
    smtp_table.update(alice.pop("smtp", {}))
    return [
        account("alice", from_address="alice@crm.example", smtp=smtp_table, **alice),
        account("bob", smtp={**smtp_table}),
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
    assert mail_from == "bob" and parsed["From"] == "bob"  # bob's identity, his own account
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
