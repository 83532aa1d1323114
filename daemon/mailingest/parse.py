"""Header extraction from raw message bytes; never raises, whatever the bytes.

The raw message is always stored as received; what this module derives is only an index
(From/To/Cc/Subject/Date/Message-ID) and degrades to ``None``/empty on broken input.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from datetime import UTC
from typing import IO, TYPE_CHECKING

from mailingest.model import Headers

if TYPE_CHECKING:
    import email.parser

# The email package (some 10 ms to import) is imported at the first message parsed: a
# fetch that finds no new mail never needs it.

#: Header blocks longer than this are cut: the index needs the first few headers only.
MAX_HEAD = 1024 * 1024


def read_head(stream: IO[bytes], limit: int = MAX_HEAD) -> bytes:
    """The header block (up to the first empty line), at most ``limit`` bytes."""
    out = bytearray()
    while len(out) < limit:
        line = stream.readline(limit - len(out))
        if not line or line in (b"\r\n", b"\n"):
            break
        out += line
    return bytes(out)


_SURROGATES = re.compile("[\ud800-\udfff]+")


def _unsurrogate(match: re.Match[str]) -> str:
    run = match.group()
    if all("\udc80" <= c <= "\udcff" for c in run):  # 8-bit bytes, surrogate-escaped
        return run.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    # Any other surrogate (a UTF-7 or unicode-escape encoded word decodes to one): a pair
    # becomes its character, a lone one U+FFFD.
    return run.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _clean(text: str) -> str:
    """Valid Unicode whatever came in: surrogate-escaped 8-bit junk decoded as UTF-8 where it
    is (else replaced), other surrogates replaced. SQLite and JSON refuse lone surrogates:
    one such Subject used to fail the storing of its whole batch, fetch after fetch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _SURROGATES.sub(_unsurrogate, text)
    return text


def decode_text(value: str) -> str:
    """RFC 2047 decoding that tolerates garbage: unknown charsets and bad encodings."""
    import email.header

    value = _clean(value)
    try:
        parts = email.header.decode_header(value)
    except Exception:
        return " ".join(value.split())
    words: list[str] = []
    for chunk, charset in parts:
        if isinstance(chunk, str):
            words.append(chunk)
            continue
        try:
            words.append(chunk.decode(charset or "ascii"))
        except (LookupError, UnicodeError):  # UnicodeError: the idna codec raises it bare
            words.append(chunk.decode("utf-8", "replace"))
    # decode_header drops the space between encoded and plain words inconsistently.
    return _clean(" ".join("".join(words).split()))


#: An address header holding one plain address, bare or after a simple display name: most
#: mail. Such values are read with this (the address is group 1 or 2) instead of the email
#: package's address parser, which walks the text a character at a time in Python (40 % of
#: a message's header parse); ``tests/unit/test_parse.py`` checks both agree.
_ATOMS = r"[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*"
_ADDRESS = rf"{_ATOMS}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE = re.compile(
    rf"[ \t]*(?:({_ADDRESS})|[A-Za-z0-9_'-]+(?:[ .]+[A-Za-z0-9_'-]+)*[ ]*<({_ADDRESS})>)[ \t]*"
)


def _addresses(values: Iterable[str]) -> tuple[str, ...]:
    values = list(values)
    simple = [_SIMPLE.fullmatch(v) for v in values]
    if all(simple):
        return tuple(m.group(1) or m.group(2) for m in simple if m)
    import email.utils

    try:
        pairs = email.utils.getaddresses([_clean(v) for v in values])
    except Exception:
        return ()
    return tuple(addr.strip() for _, addr in pairs if addr and addr.strip())


def _date(value: str | None) -> str | None:
    if not value:
        return None
    import email.utils

    try:
        parsed = email.utils.parsedate_to_datetime(_clean(value))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC).isoformat()
    except (OverflowError, ValueError):
        return None


@functools.cache
def _parser() -> email.parser.BytesHeaderParser:
    """A header parser whose policy is compat32 handing header values back as parsed, 8-bit
    bytes surrogate-escaped.

    compat32 wraps such a value in a ``Header`` whose ``str()`` turns every 8-bit byte into
    U+FFFD, so raw UTF-8 headers (RFC 6532 mail, or Courier after ``UTF8``) lost their text
    and their addresses; ``_clean`` decodes the escaped bytes as UTF-8 instead.
    """
    import email.parser
    import email.policy

    class RawValues(email.policy.Compat32):
        def header_fetch_parse(self, name: str, value: str) -> str:
            return value

    return email.parser.BytesHeaderParser(policy=RawValues())


def parse_headers(head: bytes) -> Headers:
    """Index fields of a header block; broken headers give empty fields, never an exception."""
    try:
        msg = _parser().parsebytes(head)
        get_all = msg.get_all
        first = msg.get
    except Exception:
        return Headers()

    def text(name: str) -> str | None:
        value = first(name)
        if value is None:
            return None
        return decode_text(str(value)) if not isinstance(value, str) else decode_text(value)

    def raw_all(name: str) -> list[str]:
        return [str(v) for v in (get_all(name) or [])]

    message_id = text("Message-ID")
    return Headers(
        from_addrs=_addresses(raw_all("From")),
        to=_addresses(raw_all("To")),
        cc=_addresses(raw_all("Cc")),
        reply_to=_addresses(raw_all("Reply-To")),
        subject=text("Subject"),
        date=_date(text("Date")),
        message_id=message_id.strip() if message_id else None,
        references=text("References"),
    )
