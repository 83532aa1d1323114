"""A stored message decoded for display: its text and HTML parts, its attachments.

Stored bytes stay as they are; this is a view. Parsing is lenient (the email package's
default policy): a part whose charset is unknown is decoded as UTF-8 with replacements.
"""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

#: Larger messages are not decoded (memory): the caller gets the raw bytes instead.
MAX_DECODED = 32 * 1024 * 1024


def decode(raw: bytes) -> dict[str, Any]:
    """``{"parts": [{"type", "text"}], "attachments": [{"filename", "type", "size"}]}``."""
    parts: list[dict[str, Any]] = []
    attachments: list[dict[str, Any]] = []
    try:
        message = BytesParser(policy=policy.default).parsebytes(raw)
        _walk(message, parts, attachments)
    except RecursionError:  # multiparts nested beyond reason: any sender can make one
        return {"parts": [], "attachments": [], "body_omitted": "nested too deep to decode"}
    return {"parts": parts, "attachments": attachments}


def _walk(
    part: EmailMessage, parts: list[dict[str, Any]], attachments: list[dict[str, Any]]
) -> None:
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        for sub in part.iter_parts():
            _walk(sub, parts, attachments)  # type: ignore[arg-type]
        return
    kind = part.get_content_type()
    filename = part.get_filename()
    inline_text = kind in ("text/plain", "text/html") and not filename
    if inline_text and part.get_content_disposition() != "attachment":
        parts.append({"type": kind, "text": _text(part)})
        return
    if part.is_multipart():  # message/rfc822: an attached message
        size = len(part.as_bytes())
    else:
        size = len(part.get_payload(decode=True) or b"")
    attachments.append({"filename": filename, "type": kind, "size": size})


def _text(part: EmailMessage) -> str:
    try:
        content = part.get_content()
    except (LookupError, UnicodeError, ValueError, AssertionError):
        content = None
    if isinstance(content, str):
        return content
    payload = part.get_payload(decode=True)
    return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
