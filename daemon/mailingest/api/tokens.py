"""Bearer tokens: made here, shown once, kept only as their SHA-256.

A token holds 256 random bits, so a plain SHA-256 suffices (no salt or slow hash: nothing
to guess); the prefix makes a leaked one easy to recognise in a scan.
"""

from __future__ import annotations

import hashlib
import re
import secrets

PREFIX = "mgi_"
#: CRM user names a token may carry: what account owners look like.
USER_RE = re.compile(r"[A-Za-z0-9._@-]{1,200}")


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
