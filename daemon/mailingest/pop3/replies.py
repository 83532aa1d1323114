"""How a server's ``-ERR`` is typed: by its response code (RFC 2449, RFC 3206) and the
phase it came in. Whether the session survives it is the session's to act on.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from mailingest.errors import (
    AuthError,
    LoginDelayError,
    Pop3Error,
    ProtocolError,
    TemporaryError,
)
from mailingest.pop3.wire import reply_text, response_code

#: -ERR codes that say "busy, try later", not "wrong credentials".
TRANSIENT_CODES = {"SYS/TEMP", "IN-USE", "LOGIN-DELAY"}
#: Seconds to wait after ``-ERR [LOGIN-DELAY]`` when CAPA named no delay (Gmail's 300 s).
DEFAULT_LOGIN_DELAY = 300


def typed_error(
    phase: str, reply: bytes, *, account: str, login_delay: int | None, secrets: Iterable[str]
) -> tuple[Pop3Error, bool]:
    """The error for ``reply`` and whether the session must be dropped (no more commands)."""
    code = response_code(reply)
    text = reply_text(reply, secrets)
    if code == "LOGIN-DELAY":
        retry_at = datetime.now(UTC) + timedelta(seconds=login_delay or DEFAULT_LOGIN_DELAY)
        error: Pop3Error = LoginDelayError(
            f"the server refuses logins this soon (LOGIN-DELAY): {text}",
            account=account,
            retry_at=retry_at.isoformat(),
        )
        return error, True
    if code in TRANSIENT_CODES:
        return TemporaryError(f"server busy during {phase}: {text}", account=account), True
    if code == "AUTH" or phase == "login":
        return AuthError(f"login rejected: {text}", account=account), False
    return ProtocolError(f"{phase} failed: {text}", account=account), phase in {"greeting", "stls"}
