"""What the OAuth2 tests share: access tokens the session's Dovecot accepts, an account
that signs in through a loopback token endpoint, and what Dovecot's log says of logins."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt

from builders import dovecot_account
from dovecot import OAUTH2_ISSUER, OAUTH2_KEY, Mailbox
from support import write_config
from token_endpoint import Reply, TokenEndpoint

SEAL = "seal-key-for-oauth2-tests-0123456789"
CLIENT_SECRET = "client-secret-Hv83-never-printed"
REFRESH = "refresh-token-Kp21-never-printed"


def access_jwt(user: str, lifetime: int = 600) -> str:
    """An access token the fixture's Dovecot accepts for ``user`` until it expires."""
    now = int(time.time())
    claims = {"sub": user, "email": user, "iss": OAUTH2_ISSUER, "iat": now, "exp": now + lifetime}
    return jwt.encode(claims, OAUTH2_KEY, algorithm="HS256")


def oauth_config(tmp_path: Path, mailbox: Mailbox, endpoint: TokenEndpoint, **oauth2: Any) -> Path:
    account = dovecot_account(mailbox, name="m365")
    del account["password"]
    settings = {
        "provider": "custom",
        "token_url": endpoint.url,
        "scopes": ["pop"],
        "client_id": "app-1",
        "client_secret": CLIENT_SECRET,
        "refresh_token": REFRESH,
        **oauth2,
    }
    account["auth"] = {"oauth2": {k: v for k, v in settings.items() if v is not None}}
    storage = {"database": str(tmp_path / "mail.db"), "secret_key": SEAL}
    return write_config(tmp_path, [account], storage=storage)


def logins(mailbox: Mailbox) -> list[str]:
    """The mechanisms of this user's successful logins, from Dovecot's log."""
    text = mailbox.dovecot.log_path.read_text(errors="replace")
    found = []
    for line in text.splitlines():
        if f"Login: user=<{mailbox.user}>," in line:
            found.append(line.split("method=", 1)[1].split(",", 1)[0])
    return found


def failed_token_logins(mailbox: Mailbox) -> int:
    text = mailbox.dovecot.log_path.read_text(errors="replace")
    return sum(f"oauth2({mailbox.user}," in line and "failed" in line for line in text.splitlines())


def device_reply(interval: int = 1) -> Reply:
    """A device-code answer (RFC 8628) that asks to poll every ``interval`` seconds."""
    body = {
        "device_code": "dev-code-1",
        "user_code": "WXYZ-1234",
        "verification_uri": "https://microsoft.example/devicelogin",
        "expires_in": 60,
        "interval": interval,
    }
    return Reply(200, body)


def sign_in_replies(endpoint: TokenEndpoint, user: str, refresh: str) -> list[Reply]:
    """What the endpoint answers `auth login` (device code, then the tokens with
    ``refresh``) and the poll after it (a token for ``user``)."""
    return [
        device_reply(),
        endpoint.token(access_jwt(user), refresh_token=refresh),
        endpoint.token(access_jwt(user)),
    ]
