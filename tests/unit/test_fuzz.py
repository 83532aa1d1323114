"""Property tests: header parsing, address normalisation and POP3 reply parsing never let an
exception escape, except our typed ``ProtocolError``/``TemporaryError`` where a reply is bad."""

from __future__ import annotations

import ast
import email.header
import io
import poplib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from builders import PASSWORD, account
from mailingest import pop3
from mailingest.errors import ProtocolError, TemporaryError
from mailingest.matching import (
    direction_of,
    domain_matches,
    link_addresses,
    normalize,
    normalize_all,
    normalize_domain,
)
from mailingest.model import Headers
from mailingest.parse import decode_text, parse_headers, read_head
from mailingest.pop3 import wire as pop3_wire
from pop3d import Mailbox, ThreadedPop3Server

NAME = "fuzz"
FAST = settings(max_examples=300, deadline=None)
# Every code point, lone surrogates included: 8-bit header bytes reach us surrogate-escaped.
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=200)


def check_headers(headers: Headers) -> None:
    """What the store and the JSON output rely on, whatever the input was."""
    for field in (headers.from_addrs, headers.to, headers.cc, headers.reply_to):
        assert isinstance(field, tuple) and all(isinstance(a, str) and a for a in field)
    for text in (headers.subject, headers.message_id, headers.references):
        assert text is None or isinstance(text, str)
        if text is not None:
            text.encode("utf-8")  # storable: no lone surrogates left
    if headers.date is not None:
        assert datetime.fromisoformat(headers.date).utcoffset() is not None
    for address in (*headers.from_addrs, *headers.to, *headers.cc):
        address.encode("utf-8")
    assert direction_of(headers, ("owner@example.com",)) in ("in", "out")
    for direction in ("in", "out"):
        for address in link_addresses(headers, direction):
            assert normalize(address) == address


# -- header parsing --------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=3000))
def test_parse_headers_takes_any_bytes(raw: bytes) -> None:
    check_headers(parse_headers(raw))
    check_headers(parse_headers(read_head(io.BytesIO(raw))))


HEADER_NAMES = st.sampled_from(
    ["From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", "References", "from", "X-A"]
)
SPECIALS = st.sampled_from([*'<>@",;:()[]\\.=?_ \t', "=?", "?=", "?q?", "?B?", "\x00"])
ENCODED_WORD = st.builds(
    lambda cs, enc, text: f"=?{cs}?{enc}?{text}?=",
    st.sampled_from(["utf-8", "iso-8859-1", "koi8-r", "x-bogus", "", "utf-8*en", "UTF-16"]),
    st.sampled_from(["Q", "B", "q", "b", "X", ""]),
    st.text(st.sampled_from(list("abcXYZ019+/=_?")), max_size=20),
)
VALUE_PIECE = st.one_of(
    st.text(max_size=12),
    SPECIALS,
    ENCODED_WORD,
    st.sampled_from(["a@b.example", "<x@y.example>", "J\u00fcrgen <j@m\u00fcller.example>"]),
)
LINE_END = st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\t", b"\r\n "])


@st.composite
def header_blocks(draw: st.DrawFn) -> bytes:
    """Header blocks that look like mail: known names, specials, encoded words, 8-bit text,
    folding and every kind of line end."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 8))):
        name = draw(HEADER_NAMES)
        value = "".join(draw(st.lists(VALUE_PIECE, max_size=8)))
        charset = draw(st.sampled_from(["utf-8", "latin-1", "utf-16-le"]))
        sep = draw(st.sampled_from([": ", ":", " : ", "", ":\t"]))
        out += name.encode() + sep.encode() + value.encode(charset, "replace")
        out += draw(LINE_END)
    if draw(st.booleans()):
        out += b"\r\n" + draw(st.binary(max_size=50))
    return bytes(out)


@FAST
@given(header_blocks())
def test_parse_headers_takes_any_mail_like_header_block(raw: bytes) -> None:
    check_headers(parse_headers(raw))


@FAST
@given(ANY_TEXT)
def test_decode_text_takes_any_text(value: str) -> None:
    decoded = decode_text(value)
    decoded.encode("utf-8")
    assert decoded == " ".join(decoded.split())


SUBJECT_TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=40
)


@FAST
@given(SUBJECT_TEXT)
def test_raw_utf8_and_rfc2047_headers_read_alike(subject: str) -> None:
    """RFC 6532 mail (raw UTF-8 headers) reads like the same text in RFC 2047 words."""
    assume(subject.strip() and "=?" not in subject)
    raw = parse_headers(b"Subject: " + subject.encode() + b"\r\n")
    encoded = email.header.Header(subject, "utf-8").encode()
    words = parse_headers(b"Subject: " + encoded.encode() + b"\r\n")
    assert raw.subject == words.subject == " ".join(subject.split())


# -- address normalisation -------------------------------------------------------------------


def check_normalized(result: str | None) -> None:
    if result is None:
        return
    local, at, domain = result.rpartition("@")
    assert at and local and domain
    assert domain.isascii() and domain == domain.lower()
    assert not any(c.isspace() for c in result)
    assert normalize(result) == result  # a fixpoint: stored and record forms compare equal


@FAST
@given(ANY_TEXT)
def test_normalize_takes_any_text(text: str) -> None:
    check_normalized(normalize(text))
    for address in normalize_all([text, text.upper(), f"<{text}>"]):
        check_normalized(address)
    domain = normalize_domain(text)
    assert domain is None or (domain.isascii() and domain_matches(domain, [domain]))


LOCAL = st.text(st.sampled_from(list("abcdefxyzABC0189._+-")), min_size=1, max_size=12).filter(
    lambda s: not s.startswith(".") and not s.endswith(".") and ".." not in s
)
LABEL = st.text(
    st.sampled_from([*"abcxyz019-", "\u00fc", "\u00e9", "\u00df", "\u65e5", "\u0416"]),
    min_size=1,
    max_size=10,
).filter(lambda s: not s.startswith("-") and not s.endswith("-"))
DOMAIN = st.lists(LABEL, min_size=1, max_size=3).map(lambda ls: ".".join([*ls, "example"]))
DISPLAY = st.text(st.sampled_from(list("abc XYZ\u00fc")), max_size=12)


@FAST
@given(LOCAL, DOMAIN, DISPLAY)
def test_one_address_however_written_normalises_alike(local: str, domain: str, name: str) -> None:
    plain = normalize(f"{local}@{domain}")
    check_normalized(plain)
    assume(plain is not None)
    assert normalize(f"{local.upper()}@{domain.upper()}") == plain
    assert normalize(f'"{name}" <{local}@{domain}>') == plain
    assert normalize(f"{local}@{domain}. (comment)") == plain
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return
    assert normalize(f"{local}@{ascii_domain}") == plain


ATEXT = st.text(st.sampled_from(list("aZ09!#$%&'*+/=?^_`{|}~-.@<> \t\"(),;:[]\\")), max_size=40)
PHRASE = st.text(st.sampled_from(list("aZ09 \t")), max_size=12)


@settings(max_examples=1000, deadline=None)
@given(ATEXT, PHRASE, LOCAL, st.lists(st.text("abz09-", min_size=1, max_size=5), min_size=1))
def test_fast_path_reads_addresses_as_the_email_parser_does(
    text: str, phrase: str, local: str, labels: list[str]
) -> None:
    """normalize() skips the email package for the common shapes; it must agree with it."""
    from mailingest.matching import _normalize_parsed

    address = f"{local}@{'.'.join(labels)}"
    for candidate in (text, f"{phrase}<{address}>", f" {address} ", f"{phrase} <{text}>"):
        assert normalize(candidate) == _normalize_parsed(candidate), candidate


# -- POP3 reply parsing ------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=300))
def test_response_code_takes_any_reply(reply: bytes) -> None:
    code = pop3_wire.response_code(reply)
    assert code is None or (code.isascii() and code == code.upper() and code)


@FAST
@given(st.binary(max_size=300))
def test_parse_pair_returns_a_pair_or_a_typed_error(line: bytes) -> None:
    try:
        number, ident = pop3_wire.parse_pair(line, NAME, "UIDL")
    except ProtocolError as exc:
        assert exc.account == NAME
    else:
        assert number >= 0 and ident and ident.isascii()


_AROUND = st.text("ab é\x00'\"\\", max_size=90).map(lambda t: t.encode())


@FAST
@given(_AROUND, st.text("Qq-1é'\\", min_size=1, max_size=20), _AROUND)
def test_a_quoted_line_masks_a_secret_before_it_is_cut(
    before: bytes, rest: str, after: bytes
) -> None:
    """Wherever the cut at 80 bytes falls, no head of the secret is left to show."""
    secret = "Zx" + rest
    text = pop3_wire.quoted(before + secret.encode() + after, [secret])
    assert "Zx" not in text and len(ast.literal_eval(text)) <= 80


class _FakeSock:
    def sendall(self, data: bytes) -> None:
        pass

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        pass


def _session(wire: bytes) -> pop3.Pop3Session:
    """A logged-in session whose server replies with ``wire`` (the real poplib parsing)."""
    pop: Any = pop3_wire.PlainPOP3.__new__(pop3_wire.PlainPOP3)
    pop.file, pop.sock, pop._debugging, pop.encoding = io.BytesIO(wire), _FakeSock(), 0, "UTF-8"
    session = pop3.Pop3Session(account(110, name=NAME, username="u", timeout=60.0).pop3_login())
    session._pop = pop
    return session


LISTING_LINE = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.builds(
        lambda n, v: n + b" " + v,
        st.integers(0, 10**20).map(lambda n: str(n).encode()),
        st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"").replace(b" ", b"")),
    ),
    st.just(b"x" * (pop3_wire.MAX_STATUS_LINE + 5)),
)
STATUS = st.sampled_from([b"+OK", b"+OK 3 messages", b"-ERR no", b"+ERR", b"", b"OK", b"+"])


@st.composite
def listings(draw: st.DrawFn, *, terminated: bool = False) -> bytes:
    """A multi-line reply: a status line, arbitrary lines, maybe the "." terminator."""
    lines = [draw(STATUS), *draw(st.lists(LISTING_LINE, max_size=6))]
    ends = [draw(st.sampled_from([b"\r\n", b"\n"])) for _ in lines]
    wire = b"".join(line + end for line, end in zip(lines, ends, strict=True))
    return wire + (b".\r\n" if terminated or draw(st.booleans()) else b"")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(listings(), st.sampled_from(["uidl", "sizes", "capa", "stat"]))
def test_listings_parse_or_fail_typed(wire: bytes, what: str) -> None:
    session = _session(wire)
    try:
        if what == "uidl":
            result: Any = session.uidl()
            assert all(isinstance(n, int) and u.isascii() for n, u in result)
        elif what == "sizes":
            result = session.sizes()
            assert all(isinstance(n, int) and s >= 0 for n, s in result.items())
        elif what == "capa":
            result = session._capa("capa")
            if result is None:  # -ERR: a server without CAPA (popa3d); carry on without
                assert wire.startswith(b"-ERR")
                return
            assert all(k == k.upper() for k in result)
        else:
            result = session.stat()
    except (ProtocolError, TemporaryError) as exc:
        assert exc.account == NAME
        return
    except poplib.error_proto:
        # An -ERR reply to a single-line command, typed by the caller's phase (_translate).
        assert what == "stat" and wire.startswith(b"-ERR")
        return
    assert wire.startswith(b"+OK")


@FAST
@given(st.lists(st.text(max_size=30), max_size=3))
def test_any_login_delay_argument_gives_a_usable_delay(args: list[str]) -> None:
    caps = pop3_wire.Capabilities(names={"LOGIN-DELAY": args})
    delay = caps.login_delay
    assert delay is None or 0 <= delay <= pop3_wire.MAX_LOGIN_DELAY
    datetime.now(UTC) + timedelta(seconds=delay or 0)  # what the fetch computes from it


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedPop3Server]:
    with ThreadedPop3Server([Mailbox("u", PASSWORD, [b"Subject: x\r\n\r\nx\r\n"])]) as srv:
        yield srv


@settings(max_examples=60, deadline=None)
@given(listings(terminated=True))
def test_uidl_over_a_real_socket_parses_or_fails_typed(
    server: ThreadedPop3Server, wire: bytes
) -> None:
    server.server.faults.reply_override["UIDL"] = wire
    acc = account(server.port, name=NAME, username="u", timeout=2.0)
    session = pop3.Pop3Session(acc.pop3_login())
    try:
        session.connect()
        listing = session.uidl()
    except (ProtocolError, TemporaryError) as exc:
        assert exc.account == NAME  # the fetch ends the session on it (test_pop3_faults)
    else:
        assert wire.startswith(b"+OK")
        assert all(isinstance(n, int) and u.isascii() for n, u in listing)
    finally:
        session.close()
    assert server.server.errors == []
