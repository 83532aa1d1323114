"""`mailingest auth login`: a user's first OAuth2 sign-in, ending in a stored refresh token.

Two flows a user can finish from a terminal: the device code (RFC 8628; Microsoft), where
the user opens a page anywhere and types a code, and the authorization code with PKCE
(RFC 7636) on a loopback redirect (RFC 8252; Google), where the browser comes back to a
port this command listens on. The refresh token is sealed and stored as the daemon keeps a
rotated one, and the account's auth pause ends: signing in again is the fix for a refused
grant.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailingest import pause, signin
from mailingest.config import Account
from mailingest.config_auth import OAuth2Config
from mailingest.crypto import SecretBox
from mailingest.errors import (
    AuthError,
    MailIngestError,
    ProtocolError,
    TemporaryError,
    TLSError,
    UnavailableError,
    UsageError,
)
from mailingest.masking import hold_secrets
from mailingest.model import Status
from mailingest.oauth2 import Token, http_form
from mailingest.store import Store

_DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
#: A failed check's status as the error `auth login` exits with (its text names the account).
_BY_STATUS: dict[Status, type[MailIngestError]] = {
    Status.AUTH_FAILED: AuthError,
    Status.TLS_FAILED: TLSError,
    Status.UNAVAILABLE: UnavailableError,
    Status.TEMP_FAILED: TemporaryError,
}
#: How long the browser flow waits for the redirect (the user signs in meanwhile).
BROWSER_WAIT = 300.0

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class SignedIn:
    account: str
    service: str
    flow: str
    scopes: tuple[str, ...]


def flow_for(conf: OAuth2Config, wanted: str | None) -> str:
    """``device`` or ``browser``: the one asked for, else what the provider offers."""
    offered = [f for f, url in (("device", conf.device_url), ("browser", conf.auth_url)) if url]
    if wanted is not None:
        if wanted not in offered:
            raise UsageError(
                f"the {wanted} flow needs {'device_url' if wanted == 'device' else 'auth_url'} "
                "in the account's auth.oauth2 table"
            )
        return wanted
    if not offered:
        raise UsageError("set auth_url (browser sign-in) or device_url in auth.oauth2")
    return offered[0]


async def login(
    name: str,
    service: str,
    conf: OAuth2Config,
    store: Store,
    say: Say,
    *,
    identity: str,
    flow: str | None = None,
    http_timeout: float = 30.0,
) -> SignedIn:
    """Sign ``name``'s ``service`` (pop3, smtp) in; ``identity``: the mailbox, whose token
    this is (see OAuth2Config.origin)."""
    chosen = flow_for(conf, flow)
    if chosen == "device":
        token = await _device(name, conf, say, http_timeout)
    else:
        token = await _browser(name, conf, say, http_timeout)
    if not token.refresh_token:
        raise AuthError(
            "the provider sent no refresh token: ask for offline access "
            "(Microsoft: the offline_access scope; Google: a consent prompt)",
            account=name,
        )
    assert conf.seal_key is not None  # the refresh_token grant requires it
    sealed = SecretBox(conf.seal_key.reveal()).seal(token.refresh_token)
    await store.save_rotated_token(name, service, conf.origin(identity), sealed)
    await _end_pause(store, name, service)
    signin.forget(name, service)
    return SignedIn(name, service, chosen, conf.scopes)


async def confirm(account: Account, service: str, conf: OAuth2Config, store: Store) -> SignedIn:
    """A grant without a user step (client credentials, JWT bearer) has nobody to sign in:
    a token and a login that work end a pause that a fix outside the config (a mailbox
    permission granted, an app registered) would otherwise never end. Else the check's
    error, typed (77 for a refused grant or login)."""
    from mailingest import commands

    signin.forget(account.name, service)  # a fresh token, not one cached before the fix
    result = (await commands.check_one(account, store))[service]
    if result is None or result["status"] != Status.OK:
        status = result["status"] if result else Status.ERROR
        error = result["error"] if result else "nothing to check"
        raise _BY_STATUS.get(Status(status), ProtocolError)(str(error))
    await _end_pause(store, account.name, service)
    return SignedIn(account.name, service, conf.grant, conf.scopes)


async def _end_pause(store: Store, name: str, service: str) -> None:
    """A POP3 sign-in ends the account's auth pause (a running daemon sees it within an
    interval); an SMTP one does not: the pause is about the mailbox."""
    if service == "pop3" and await store.pause_key(name) is not None:
        await pause.resume(store, name, pause.SIGNED_IN)


async def _device(name: str, conf: OAuth2Config, say: Say, http_timeout: float) -> Token:
    assert conf.device_url is not None
    form = {"client_id": conf.client_id, "scope": " ".join(conf.scopes)}
    status, data = await http_form(name, conf.device_url, form, http_timeout)
    code, user_code = data.get("device_code"), data.get("user_code")
    if status != 200 or not isinstance(code, str) or not isinstance(user_code, str):
        raise AuthError(f"device sign-in refused: {data.get('error') or status}", account=name)
    where = data.get("verification_uri_complete") or data.get("verification_uri")
    say(f"To sign in {name!r}, open {where} and enter the code {user_code}")
    interval = max(1.0, _number(data.get("interval"), 5.0))
    deadline = time.monotonic() + min(_number(data.get("expires_in"), 900.0), 3600.0)
    poll = {"grant_type": _DEVICE_GRANT, "device_code": code, "client_id": conf.client_id}
    if conf.client_secret is not None:
        poll["client_secret"] = conf.client_secret.reveal()
    while time.monotonic() < deadline:
        await asyncio.sleep(interval)
        status, data = await http_form(name, conf.token_url, poll, http_timeout)
        error = data.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5  # RFC 8628 section 3.5
            continue
        return _token(name, status, data)
    raise TemporaryError("the device code expired before the sign-in finished", account=name)


async def _browser(name: str, conf: OAuth2Config, say: Say, http_timeout: float) -> Token:
    assert conf.auth_url is not None
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    state = secrets.token_urlsafe(16)
    arrived: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(
        lambda r, w: _redirect(r, w, arrived), host="127.0.0.1", port=0
    )
    try:
        port = server.sockets[0].getsockname()[1]
        redirect = f"http://127.0.0.1:{port}/"
        query = {
            "response_type": "code",
            "client_id": conf.client_id,
            "redirect_uri": redirect,
            "scope": " ".join(conf.scopes),
            "state": state,
            "code_challenge": challenge.decode().rstrip("="),
            "code_challenge_method": "S256",
            "access_type": "offline",  # Google: a refresh token
            "prompt": "consent",  # Google: a refresh token again on a second sign-in
        }
        url = f"{conf.auth_url}?{urllib.parse.urlencode(query)}"
        say(f"To sign in {name!r}, open this address in a browser on this machine:\n{url}")
        try:
            answer = await asyncio.wait_for(arrived, BROWSER_WAIT)
        except TimeoutError:
            raise TemporaryError("no sign-in arrived in time; run it again", account=name) from None
    finally:
        server.close()
    if answer.get("state") != state:
        raise AuthError("the sign-in answer does not belong to this request", account=name)
    if "code" not in answer:
        raise AuthError(f"sign-in refused: {answer.get('error', 'no code')}", account=name)
    form = {
        "grant_type": "authorization_code",
        "code": answer["code"],
        "redirect_uri": redirect,
        "client_id": conf.client_id,
        "code_verifier": verifier,
    }
    if conf.client_secret is not None:
        form["client_secret"] = conf.client_secret.reveal()
    status, data = await http_form(name, conf.token_url, form, http_timeout)
    return _token(name, status, data)


async def _redirect(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    arrived: asyncio.Future[dict[str, str]],
) -> None:
    """One request of the browser coming back: its query is the answer."""
    try:
        async with asyncio.timeout(10):
            line = await reader.readline()
            while (await reader.readline()).strip():
                pass
    except (TimeoutError, ConnectionError, ValueError):
        writer.close()
        return
    target = line.decode("latin-1").split(" ")
    query = urllib.parse.urlsplit(target[1] if len(target) > 1 else "/").query
    answer = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}
    found = "code" in answer or "error" in answer
    page = b"Signed in; you may close this page." if found else b"Waiting for the sign-in."
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        + f"Content-Length: {len(page)}\r\n\r\n".encode()
        + page
    )
    try:
        await writer.drain()
    finally:
        writer.close()
    if found and not arrived.done():
        arrived.set_result(answer)


def _number(value: Any, default: float) -> float:
    """A provider's number of seconds; its default when absent or not a number."""
    try:
        found = float(value)
    except (TypeError, ValueError):
        return default
    return found if found == found and 0 < found < float("inf") else default


def _token(name: str, status: int, data: dict[str, Any]) -> Token:
    access, refresh = data.get("access_token"), data.get("refresh_token")
    if status != 200 or not isinstance(access, str):
        raise AuthError(f"sign-in refused: {data.get('error') or f'HTTP {status}'}", account=name)
    hold_secrets(f"{name} sign-in", [access, *([refresh] if isinstance(refresh, str) else [])])
    return Token(access, time.time(), refresh if isinstance(refresh, str) else None)
