"""Client TLS settings shared by POP3 and SMTP: verification on unless explicitly off."""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(ca_file: Path | None, verify: bool) -> ssl.SSLContext:
    """System CAs plus an extra ``ca_file``; ``verify = False`` only by explicit choice."""
    ctx = ssl.create_default_context()
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
