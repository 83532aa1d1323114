"""SASL XOAUTH2 / OAUTHBEARER on the wire (issue 15), against the scripted server: the
two-step form only (a server that refuses the one-line form, as Microsoft's does), the
mechanism chosen from CAPA SASL, the error challenge answered, and the token masked in
whatever a server echoes back."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from mailingest.errors import AuthError, ProtocolError
from mailingest.model import Pop3Login
from mailingest.pop3 import Pop3Session
from mailingest.sasl import oauthbearer, xoauth2
from pop3d import Faults, Mailbox, Pop3TestServer, _ScriptedSession

TOKEN = "access-token-Wm42-never-printed"
USER = "carol@contoso.example"


class SaslSession(_ScriptedSession):
    """AUTH as Microsoft's POP3 does it: the bare ``AUTH XOAUTH2``, ``+``, the response; a
    response on the AUTH line closes the connection with -ERR."""

    server: SaslServer

    def knows(self, verb: str) -> bool:
        return verb == "AUTH" or super().knows(verb)

    async def authorization(self, verb: str, arg: str) -> bool:
        if verb != "AUTH":
            return await super().authorization(verb, arg)
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if initial:
            await self.reply("-ERR Protocol error. Connection is closed. 10")
            return False
        if mechanism not in self.server.mechanisms:
            return await self.reply("-ERR unsupported mechanism")
        if self.server.plus_ok_to_auth:  # a broken server: "success" before any response
            return await self.reply("+OK fine")
        await self.reply("+ ")
        line = await self._readline()
        if line is None:
            return False
        response = line.decode("ascii", "replace")
        self.server.responses.append((mechanism, response))
        if self.server.echo_response:
            return await self.reply(f"-ERR unknown command {response}")
        token = _bearer(base64.b64decode(response).decode())
        if token != self.server.valid_token:
            error = base64.b64encode(b'{"status":"401","schemes":"bearer"}').decode()
            await self.reply(f"+ {error}")
            self.server.dummies.append(await self._readline() or b"")
            return await self.reply("-ERR [AUTH] Authentication failed.")
        # Log in as USER/PASS would, with the token as the mailbox's "password".
        self.user = USER
        return await self._pass(token)


def _bearer(text: str) -> str:
    for part in text.split("\x01"):
        if part.startswith("auth=Bearer "):
            return part.removeprefix("auth=Bearer ")
    return ""


class SaslServer(Pop3TestServer):
    def __init__(self, mechanisms: tuple[str, ...], **kwargs: Any) -> None:
        capa = ["USER", "UIDL", *(["SASL " + " ".join(mechanisms)] if mechanisms else [])]
        box = Mailbox(USER, TOKEN, [b"Subject: x\r\n\r\nbody\r\n"])
        super().__init__([box], Faults(capa=capa), **kwargs)
        self.mechanisms = mechanisms or ("XOAUTH2",)
        self.valid_token = TOKEN
        self.echo_response = False
        self.plus_ok_to_auth = False
        self.responses: list[tuple[str, str]] = []
        self.dummies: list[bytes] = []

    def session(self, number: int, reader: Any, writer: Any) -> SaslSession:
        return SaslSession(self, number, self.faults, reader, writer)


def _login(port: int, sasl: str = "auto", token: str = TOKEN) -> Pop3Login:
    return Pop3Login(
        name="m365",
        host="127.0.0.1",
        port=port,
        security="plain",
        username=USER,
        password=lambda: token,
        timeout=5.0,
        sasl=sasl,
    )


def _sign_in(login: Pop3Login) -> tuple[str, int]:
    session = Pop3Session(login)
    try:
        session.connect()
        count, _ = session.stat()
        session.quit()
        return session.mechanism, count
    finally:
        session.close()


@pytest.mark.parametrize(
    ("offered", "sasl", "used"),
    [
        (("XOAUTH2",), "auto", "XOAUTH2"),
        (("OAUTHBEARER",), "auto", "OAUTHBEARER"),
        (("PLAIN", "OAUTHBEARER", "XOAUTH2"), "auto", "XOAUTH2"),
        (("XOAUTH2", "OAUTHBEARER"), "oauthbearer", "OAUTHBEARER"),
        ((), "auto", "XOAUTH2"),  # no SASL line: the mechanism the providers document
    ],
)
async def test_the_response_goes_on_its_own_line_after_the_plus(
    offered: tuple[str, ...], sasl: str, used: str
) -> None:
    async with SaslServer(offered) as server:
        mechanism, count = await asyncio.to_thread(_sign_in, _login(server.port, sasl))
    assert (mechanism, count) == (used, 1)
    [(seen, response)] = server.responses
    expected = (
        xoauth2(USER, TOKEN)
        if used == "XOAUTH2"
        else oauthbearer(USER, TOKEN, "127.0.0.1", server.port)
    )
    assert (seen, response) == (used, expected)
    assert f"AUTH {used}" not in " ".join(server.log)  # the log masks AUTH lines
    assert any(entry.endswith("AUTH ***") for entry in server.log)


async def test_a_refused_token_answers_the_challenge_and_is_an_auth_failure() -> None:
    async with SaslServer(("OAUTHBEARER",)) as server:
        server.valid_token = "another"
        with pytest.raises(AuthError) as caught:
            await asyncio.to_thread(_sign_in, _login(server.port))
    assert server.dummies == [b"AQ=="]  # RFC 7628's dummy response ends the exchange
    assert "status=401" in str(caught.value) and TOKEN not in str(caught.value)


async def test_a_server_without_our_mechanisms_is_an_auth_failure_with_no_attempt() -> None:
    async with SaslServer(("PLAIN", "CRAM-MD5")) as server:
        with pytest.raises(AuthError, match="neither XOAUTH2 nor OAUTHBEARER"):
            await asyncio.to_thread(_sign_in, _login(server.port))
    assert server.responses == []


async def test_an_echoed_response_is_masked_in_the_error() -> None:
    async with SaslServer(("XOAUTH2",)) as server:
        server.echo_response = True
        with pytest.raises(AuthError) as caught:
            await asyncio.to_thread(_sign_in, _login(server.port))
    text = str(caught.value)
    assert "***" in text and xoauth2(USER, TOKEN) not in text and TOKEN not in text


async def test_plus_ok_to_a_bare_auth_is_a_protocol_error() -> None:
    async with SaslServer(("XOAUTH2",)) as server:
        server.plus_ok_to_auth = True
        with pytest.raises(ProtocolError):
            await asyncio.to_thread(_sign_in, _login(server.port))
