"""A real SMTP server for tests: aiosmtpd on loopback with AUTH, STARTTLS or implicit TLS,
and a test certificate; it keeps every envelope it accepts."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from dovecot import free_port

SMTP_USER, SMTP_PASSWORD = "alice-out", "Smtp-Pass-Walnut-77"


@dataclass
class Recorder:
    """aiosmtpd handler and authenticator that keeps every accepted envelope.

    A test makes the server refuse by setting ``auth_reply``, ``rcpt_reply`` or ``data_reply``
    to the reply line it should answer with instead.
    """

    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    auth_reply: str | None = None
    rcpt_reply: str | None = None
    data_reply: str | None = None
    #: The access token AUTH XOAUTH2 / OAUTHBEARER accepts; each attempt is kept as
    #: (mechanism, response on the AUTH line or "", the decoded response).
    oauth2_token: str = "smtp-access-token-Tb61"
    oauth2_attempts: list[tuple[str, str, str]] = field(default_factory=list)

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:
        return await self._oauth2(server, args, b"")

    async def auth_OAUTHBEARER(self, server: Any, args: list[str]) -> AuthResult:
        return await self._oauth2(server, args, b"\x01")

    async def _oauth2(self, server: Any, args: list[str], dummy: bytes) -> AuthResult:
        """Microsoft's way: the response comes after a 334, never on the AUTH line."""
        if len(args) > 1:
            self.oauth2_attempts.append((args[0], args[1], ""))
            return AuthResult(success=False, handled=False, message="504 one-line form refused")
        response = await server.challenge_auth("")
        if not isinstance(response, bytes):
            return AuthResult(success=False, handled=True)
        text = response.decode("utf-8", "replace")
        self.oauth2_attempts.append((args[0], "", text))
        if f"auth=Bearer {self.oauth2_token}\x01" in text:
            return AuthResult(success=True, auth_data=text)
        if await server.challenge_auth('{"status":"401"}') != dummy:
            return AuthResult(success=False, handled=False, message="501 bad dummy response")
        return AuthResult(success=False, handled=False)

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        content = envelope.original_content or b""
        self.received.append((str(envelope.mail_from), list(envelope.rcpt_tos), content))
        return "250 OK"

    def authenticate(
        self, server: Any, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if self.auth_reply:
            return AuthResult(success=False, handled=False, message=self.auth_reply)
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            SMTP_USER.encode(),
            SMTP_PASSWORD.encode(),
        )
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert, key)."""
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


@contextmanager
def serving(cert: tuple[Path, Path], security: str) -> Iterator[SmtpServer]:
    """aiosmtpd on loopback; ``security``: starttls (required), tls (implicit) or plain."""
    recorder = Recorder()
    context = None
    if security != "plain":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    starttls = security == "starttls"
    port = free_port()
    controller = Controller(
        recorder,
        hostname="127.0.0.1",
        port=port,
        ssl_context=context if security == "tls" else None,
        authenticator=recorder.authenticate,
        auth_require_tls=starttls,  # implicit TLS is invisible to aiosmtpd's check
        tls_context=context if starttls else None,
        require_starttls=starttls,
    )
    controller.start()
    try:
        yield SmtpServer(port, recorder, cert[0])
    finally:
        controller.stop()


def smtp_table(server: SmtpServer) -> dict[str, Any]:
    """An ``[accounts.smtp]`` table for ``server`` (STARTTLS, the test CA, its login)."""
    return {
        "host": "127.0.0.1",
        "port": server.port,
        "security": "starttls",
        "username": SMTP_USER,
        "password": SMTP_PASSWORD,
        "ca_file": str(server.cert),
        "timeout": "5s",
    }
