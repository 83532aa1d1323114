"""The SASL client responses of OAuth2 sign-in (POP3 AUTH, SMTP AUTH). Apart from oauth2.py
(token requests), so that the POP3 session of a password account does not import it."""

from __future__ import annotations

import base64

#: SASL mechanisms in the order they are preferred when the server offers both: XOAUTH2 is
#: what Google and Microsoft document for POP3 and SMTP.
OAUTH2_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")


def xoauth2(user: str, token: str) -> str:
    """The XOAUTH2 client response (Google's and Microsoft's format), base64."""
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode("utf-8")).decode("ascii")


def oauthbearer(user: str, token: str, host: str, port: int) -> str:
    """The OAUTHBEARER client response (RFC 7628 section 3.1), base64."""
    name = user.replace("=", "=3D").replace(",", "=2C")
    raw = f"n,a={name},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode("utf-8")).decode("ascii")
