"""The only module that touches aiosmtplib: build a message, log in, send, type the failures.

``starttls`` refuses to go on when the server does not offer STARTTLS: the password is
never sent in the clear by accident. Failures map to our errors: a rejected login -> 77,
unavailable or TLS -> 69, a 4xx reply (AUTH included) -> 75 (try later), a 5xx reply -> 65
(the server's words kept).
"""

from __future__ import annotations

import contextlib
import email.policy
import email.utils
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from email.message import EmailMessage

import aiosmtplib

from mailingest.config import Account, SmtpSettings
from mailingest.errors import (
    AuthError,
    DataError,
    MailIngestError,
    TemporaryError,
    TLSError,
    UnavailableError,
)
from mailingest.sasl import OAUTH2_MECHANISMS, oauthbearer, xoauth2
from mailingest.tls import client_context


def _tls_context(settings: SmtpSettings) -> ssl.SSLContext:
    return client_context(settings.ca_file, settings.tls_verify)


def from_address(account: Account) -> str:
    """The From the CRM sends with: the account's ``from_address``, else its identity."""
    return account.from_address or account.identity


def build_message(
    account: Account,
    *,
    to: Sequence[str],
    cc: Sequence[str] = (),
    subject: str,
    body: str,
    in_reply_to: str | None = None,
    references: str | None = None,
) -> tuple[bytes, str]:
    """The exact bytes to send (CRLF line ends, UTF-8 encoded properly) and the Message-ID."""
    sender = from_address(account)
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(usegmt=True)
    domain = sender.rpartition("@")[2] or None
    message_id = email.utils.make_msgid(domain=domain)
    msg["Message-ID"] = message_id
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = f"{references} {in_reply_to}".strip() if references else in_reply_to
    msg.set_content(body, charset="utf-8")
    return msg.as_bytes(policy=email.policy.SMTP), message_id


@contextlib.asynccontextmanager
async def _session(
    settings: SmtpSettings, account: str, token: str | None
) -> AsyncIterator[aiosmtplib.SMTP]:
    """Connected, secured and logged in; typed errors; always closed."""
    client = aiosmtplib.SMTP(
        hostname=settings.host,
        port=settings.port,
        timeout=settings.timeout,
        use_tls=settings.security == "tls",
        start_tls=False,
        tls_context=_tls_context(settings) if settings.security == "tls" else None,
    )
    try:
        with _translate(account, "connect"):
            await client.connect()
        if settings.security == "starttls":
            with _translate(account, "ehlo"):
                await client.ehlo()
            if not client.supports_extension("starttls"):
                raise TLSError(
                    "SMTP server does not offer STARTTLS; refusing to send the password "
                    "in plaintext",
                    account=account,
                )
            with _translate(account, "starttls"):
                await client.starttls(tls_context=_tls_context(settings))
        with _translate(account, "login"):
            if settings.auth is not None:
                assert token is not None, "an OAuth2 account's token is fetched first"
                await _oauth2_login(client, settings, token)
            else:
                await _login_once(client, settings)
        yield client
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.quit()
    finally:
        client.close()


async def _login_once(client: aiosmtplib.SMTP, settings: SmtpSettings) -> None:
    """One AUTH attempt with the best offered mechanism.

    aiosmtplib's login() retries a rejected password with every other mechanism; several
    failed logins in a row are what gets a mailbox locked by its provider.
    """
    await client.ehlo()
    offered = client.supported_auth_methods
    for name, method in (
        ("plain", client.auth_plain),
        ("login", client.auth_login),
        ("cram-md5", client.auth_crammd5),
    ):
        if name in offered and settings.password is not None:
            await method(settings.username, settings.password.reveal())
            return
    raise aiosmtplib.SMTPException(
        f"the server offers no AUTH mechanism we use (offered: {', '.join(offered) or 'none'})"
    )


async def _oauth2_login(client: aiosmtplib.SMTP, settings: SmtpSettings, token: str) -> None:
    """AUTH XOAUTH2 or OAUTHBEARER in two steps, as for POP3: the response on a line of
    its own after the server's 334, never on the AUTH line."""
    assert settings.auth is not None
    await client.ehlo()
    offered = {name.upper() for name in client.supported_auth_methods}
    mechanism = settings.auth.mechanism.upper()
    if mechanism == "AUTO":
        mechanism = next((m for m in OAUTH2_MECHANISMS if m in offered), "XOAUTH2")
    if mechanism == "XOAUTH2":
        response = xoauth2(settings.username, token)
    else:
        response = oauthbearer(settings.username, token, settings.host, settings.port)
    reply = await client.execute_command(b"AUTH", mechanism.encode("ascii"))
    if reply.code == 334:
        reply = await client.execute_command(response.encode("ascii"))
        if reply.code == 334:  # the error challenge: end the exchange, the server says 535
            reply = await client.execute_command(b"AQ==" if mechanism == "OAUTHBEARER" else b"")
    if reply.code != 235:
        said = reply.message.replace(response, "***").replace(token, "***")  # if echoed
        raise aiosmtplib.SMTPAuthenticationError(reply.code, f"{mechanism}: {said}")


@contextlib.contextmanager
def _translate(account: str, phase: str) -> Iterator[None]:
    try:
        yield
    except MailIngestError:
        raise
    except aiosmtplib.SMTPAuthenticationError as exc:
        # aiosmtplib raises this for any reply but 235: a 4xx (454 "try later") did not
        # judge the password, so it is temporary; a 5xx (535) rejected it.
        text = f"SMTP login rejected: {exc.code} {exc.message}"
        raise _by_reply(exc.code, text, account, otherwise=AuthError) from exc
    except aiosmtplib.SMTPRecipientsRefused as exc:
        codes = [r.code for r in exc.recipients]
        text = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
        if all(400 <= c < 500 for c in codes):
            raise TemporaryError(f"SMTP recipients refused: {text}", account=account) from exc
        raise DataError(f"SMTP recipients refused: {text}", account=account) from exc
    except aiosmtplib.SMTPResponseException as exc:
        text = f"SMTP {phase} refused: {exc.code} {exc.message}"
        otherwise = UnavailableError if phase == "connect" else DataError
        raise _by_reply(exc.code, text, account, otherwise=otherwise) from exc
    except aiosmtplib.SMTPTimeoutError as exc:
        raise TemporaryError(f"SMTP timed out during {phase}", account=account) from exc
    except ssl.SSLError as exc:
        raise _tls_error(exc, account, phase) from exc
    except aiosmtplib.SMTPConnectError as exc:
        if isinstance(exc.__cause__, ssl.SSLError):
            # Implicit TLS: aiosmtplib wraps a failed handshake in a connect error.
            raise _tls_error(exc.__cause__, account, phase) from exc
        raise UnavailableError(
            f"cannot connect to the SMTP server: {exc}", account=account
        ) from exc
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
        raise TemporaryError(
            f"SMTP connection lost during {phase}: {exc}", account=account
        ) from exc
    except aiosmtplib.SMTPException as exc:
        raise UnavailableError(f"SMTP {phase} failed: {exc}", account=account) from exc
    except OSError as exc:
        raise UnavailableError(
            f"cannot reach the SMTP server: {exc.strerror or exc}", account=account
        ) from exc


def _by_reply(
    code: int, text: str, account: str, *, otherwise: type[MailIngestError]
) -> MailIngestError:
    """A 4xx reply means try later (75), whatever the command; any other is ``otherwise``."""
    if 400 <= code < 500:
        return TemporaryError(text, account=account)
    return otherwise(text, account=account)


def _tls_error(exc: ssl.SSLError, account: str, phase: str) -> TLSError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSError(f"SMTP certificate rejected: {exc.verify_message}", account=account)
    return TLSError(f"SMTP TLS failed during {phase}: {exc.reason or exc}", account=account)


async def send(
    settings: SmtpSettings,
    account: str,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    token: str | None = None,
) -> list[str]:
    """Send ``data`` as is; raises a typed error if nobody accepted it.

    Returns the refusals ("addr: code text") when only some recipients were refused: the
    message went out to the others, so it counts as sent.
    """
    async with _session(settings, account, token) as client:
        with _translate(account, "send"):
            errors, _ = await client.sendmail(sender, list(recipients), data)
    return [f"{rcpt}: {resp.code} {resp.message}" for rcpt, resp in errors.items()]


async def check_login(settings: SmtpSettings, account: str, token: str | None = None) -> None:
    """Connect, secure, log in, quit: what `check` needs to tell a wrong SMTP password."""
    async with _session(settings, account, token):
        pass
