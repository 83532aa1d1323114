"""Write the malformed-mail corpus: one ``NN-name.eml`` per case, raw bytes as a server holds them.

usage: python tests/corpus/make_corpus.py [--check]

Deterministic (no clock, a seeded PRNG): running it again rewrites the same bytes, and
``--check`` exits 1 if the committed files differ from what this script makes (a test runs it).
Each case is a kind of broken or hostile mail seen in the wild; the suite serves all of them
through a real Dovecot and checks that each is stored byte-exact and that nothing raises.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script: the tests' builders
from builders import served  # noqa: E402

Case = tuple[str, bytes]


def _msg(*headers: str | bytes, body: bytes = b"body\n") -> bytes:
    """A message from header lines (LF ends) and a body."""
    head = b"".join((h.encode() if isinstance(h, str) else h) + b"\n" for h in headers)
    return head + b"\n" + body


def _nested(depth: int) -> bytes:
    """``depth`` multiparts, each the only part of its parent."""
    head = b"From: deep@example.org\nSubject: nested %d deep\nMIME-Version: 1.0\n" % depth
    opening, closing = [], []
    for level in range(depth):
        opening.append(b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (level, level))
        closing.append(b"\n--b%d--\n" % level)
    leaf = b"Content-Type: text/plain\n\ninnermost\n"
    return head + b"".join(opening) + leaf + b"".join(reversed(closing))


def _mime(boundary_param: str, parts: bytes, subject: str) -> bytes:
    return _msg(
        "From: mime@example.org",
        f"Subject: {subject}",
        "MIME-Version: 1.0",
        f"Content-Type: multipart/mixed;{boundary_param}",
        body=parts,
    )


def mime_cases() -> list[Case]:
    part = b"--a\nContent-Type: text/plain\n\npart one\n"
    return [
        ("boundary-mismatch", _mime(' boundary="x"', part + b"--a--\n", "boundary mismatch")),
        ("boundary-unclosed", _mime(' boundary="a"', part + b"--a\n\nno end\n", "no close")),
        ("boundary-empty", _mime(' boundary=""', b"--\n\nempty boundary\n--\n", "empty")),
        ("boundary-missing", _mime("", part + b"--a--\n", "multipart without boundary")),
        (
            "boundary-overlong",
            _mime(f' boundary="{"z" * 500}"', b"--" + b"z" * 500 + b"--\n", "500-char boundary"),
        ),
        ("boundary-unquoted-spaces", _mime(" boundary=a b c", part, "unquoted spaces")),
        ("nested-100-deep", _nested(100)),
        ("nested-1000-deep", _nested(1000)),
        (
            "base64-garbage",
            _msg(
                "From: b64@example.org",
                "Subject: invalid base64 body",
                "Content-Transfer-Encoding: base64",
                body=b"!!!not base64 at all***\n====\nQUJD\x00\xff\n",
            ),
        ),
        (
            "quoted-printable-broken",
            _msg(
                "From: qp@example.org",
                "Subject: broken qp",
                "Content-Transfer-Encoding: quoted-printable",
                body=b"=ZZ=\n=4\n=\n" + b"=" * 300 + b"\n",
            ),
        ),
        (
            "rfc2231-broken",
            _msg(
                "From: rfc2231@example.org",
                "Subject: broken parameter continuations",
                "Content-Type: text/plain; name*0*=utf-8'en'%E2%82; name*2=x; name*=''",
                'Content-Disposition: attachment; filename*1*=%ZZ; filename*0="a',
            ),
        ),
    ]


def charset_cases() -> list[Case]:
    return [
        (
            "charset-unknown",
            _msg(
                "From: cs@example.org",
                "Subject: unknown charset",
                "Content-Type: text/plain; charset=x-no-such-charset",
                body="caf\u00e9\n".encode("latin-1"),
            ),
        ),
        ("rfc2047-unknown-charset", _msg("From: a@example.org", "Subject: =?x-bogus?Q?abc?=")),
        ("rfc2047-bad-base64", _msg("From: a@example.org", "Subject: =?utf-8?B?####?= tail")),
        ("rfc2047-unterminated", _msg("From: a@example.org", "Subject: =?utf-8?Q?caf=C3=A9")),
        ("rfc2047-bad-encoding", _msg("From: a@example.org", "Subject: =?utf-8?X?abc?= x")),
        (
            "rfc2047-invalid-utf8",
            _msg("From: a@example.org", "Subject: =?utf-8?Q?=FF=FE=C3=28?= invalid bytes"),
        ),
        (
            "rfc2047-display-name",
            _msg("From: =?koi8-r?B?8NLJ18XU?= =?nope?q?x?= <ivan@example.ru>", "Subject: koi8"),
        ),
        ("rfc2047-in-address", _msg("From: =?utf-8?q?x?=@example.org", "Subject: word as local")),
        (
            "rfc2047-500-words",
            _msg("From: a@example.org", "Subject: " + " ".join(["=?utf-8?q?w=C3=B6rd?="] * 500)),
        ),
        (
            "rfc2047-language-tag",
            _msg("From: a@example.org", "Subject: =?utf-8*en-us?q?tagged=20word?="),
        ),
        (
            "rfc2047-control-chars",
            _msg("From: a@example.org", "Subject: =?utf-8?q?a=0D=0Ab=00c=1B[31m?= injected"),
        ),
        (
            "latin1-8bit-headers",
            _msg(
                "From: J\u00fcrgen <juergen@example.de>".encode("latin-1"),
                "Subject: Gr\u00fc\u00dfe aus K\u00f6ln".encode("latin-1"),
            ),
        ),
        (
            "utf8-raw-headers",
            _msg(
                "From: J\u00fcrgen M\u00fcller <j\u00fcrgen@m\u00fcller.example>".encode(),
                "Subject: \u65e5\u672c\u8a9e\u306e\u4ef6\u540d \U0001f600".encode(),
            ),
        ),
        (
            "invalid-utf8-headers",
            _msg(b"From: bad \xc3\x28 <bad@example.org>", b"Subject: \xed\xa0\x80 \xf8\x88\x80"),
        ),
        ("utf16-bom", "\ufeffFrom: bom@example.org\nSubject: BOM\n\nx\n".encode("utf-16")),
        (
            "header-control-chars",
            _msg(b"From: ctl\x01\x02@example.org", b"Subject: bell\x07 esc\x1b del\x7f"),
        ),
        ("header-name-8bit", _msg(b"From: a@example.org", b"X-Caf\xe9: value", b"Subj\xffect: x")),
    ]


def _recipients(count: int) -> str:
    return ", ".join(f"r{i} <r{i}@example.net>" for i in range(count))


def address_cases() -> list[Case]:
    return [
        ("from-missing", _msg("To: a@example.org", "Subject: no From at all")),
        (
            "from-several",
            _msg(
                "From: first@example.org",
                "From: second@example.org",
                "Subject: two From headers",
                "From: third@example.org",
            ),
        ),
        ("from-empty", _msg("From:", "Subject: empty From")),
        ("from-name-only", _msg("From: Just A Name", "Subject: no address")),
        ("from-group", _msg("From: undisclosed-recipients:;", "Subject: group syntax")),
        ("from-comments", _msg("From: (comment) lead@example.org (more (nested))", "Subject: c")),
        ("from-unterminated-quote", _msg('From: "Bob <bob@example.org>', "Subject: open quote")),
        ("from-unterminated-angle", _msg("From: Bob <bob@example.org", "Subject: open angle")),
        ("from-nested-angles", _msg("From: <<a@example.org>>", "To: a@b@c.example, @, <>")),
        ("from-idna-ascii", _msg("From: JURGEN@xn--mller-kva.example", "Subject: idna ascii")),
        ("from-idna-unicode", _msg("From: jurgen@m\u00fcller.example".encode(), "Subject: u")),
        (
            "from-idna-invalid",
            _msg(
                "From: x@" + "a" * 70 + ".example",
                ("To: e@\U0001f600.example, f@xn--.example, g@xn--zz-garbage!.example").encode(),
                "Subject: invalid IDNA",
            ),
        ),
        ("from-ip-literal", _msg("From: ops@[192.0.2.1]", "To: v6@[IPv6:2001:db8::1]")),
        ("from-trailing-dot", _msg("From: Lead@Example.ORG.", "Subject: trailing dot domain")),
        ("local-part-10k", _msg("From: " + "l" * 10_000 + "@example.org", "Subject: long local")),
        ("to-10000-recipients", _msg("From: bulk@example.org", "To: " + _recipients(10_000))),
        ("to-commas", _msg("From: a@example.org", "To: " + ", " * 1000 + "z@example.org")),
        (
            "reply-to-odd",
            _msg("From: a@example.org", 'Reply-To: "x" <>, ;;; <@route:a@b.example>'),
        ),
    ]


def structure_cases() -> list[Case]:
    rng = random.Random(20261124)
    return [
        ("zero-length", b""),
        ("headers-only-no-newline", b"From: a@example.org\nSubject: headers only"),
        ("headers-only-blank-line", b"From: a@example.org\nSubject: headers, blank line\n\n"),
        ("body-only", b"\nno headers at all, the message starts with an empty line\n"),
        ("nul-in-headers", _msg(b"From: nul\x00@example.org", b"Subject: a\x00b")),
        ("nul-in-body", _msg("From: a@example.org", "Subject: nul body", body=b"a\x00\x00b\n")),
        ("bare-cr-lines", b"From: cr@example.org\rSubject: old mac\r\rbody\rline\r"),
        ("mixed-line-ends", b"From: a@example.org\r\nSubject: mixed\n\r\nbody\r\r\nx\n\ry\r"),
        ("header-no-colon", _msg("From: a@example.org", "This line has no colon", "Subject: x")),
        ("first-line-no-colon", _msg("garbage first line", "From: a@example.org")),
        ("continuation-first", _msg("  continued from nothing", "From: a@example.org")),
        ("space-before-colon", _msg("From : a@example.org", "Subject\t: spaced")),
        ("mbox-from-line", _msg("From MAILER-DAEMON Tue Nov 24 10:00:00 2026", "From: a@b.org")),
        (
            "mbox-escaped-body",
            _msg("From: a@example.org", "Subject: >From", body=b"From here\n>From there\n"),
        ),
        (
            "dot-lines",
            _msg("From: a@example.org", "Subject: dots", body=b".\n..\n...\n. \n.x\n"),
        ),
        ("final-dot-no-newline", _msg("From: a@example.org", "Subject: last dot", body=b"x\n.")),
        ("no-final-newline", _msg("From: a@example.org", "Subject: nfn", body=b"no newline")),
        ("blank-lines-only", b"\r\n" * 50),
        ("binary-junk", bytes(rng.randrange(256) for _ in range(8192))),
        (
            "huge-header-line-200k",
            _msg("From: a@example.org", "Subject: " + "s" * 200 * 1024),
        ),
        (
            "headers-over-1mib",
            _msg(*(f"X-Filler-{i}: {'f' * 1000}" for i in range(1100)), "From: late@example.org"),
        ),
        (
            "folded-10000-times",
            _msg("From: a@example.org", "Subject: start" + "\n fold" * 10_000),
        ),
        ("fold-tab-only", _msg("From: a@example.org", "Subject: x\n\t\n\t", "To: b@example.org")),
        ("no-blank-before-body", b"From: a@example.org\nSubject: x\nthis is body text\n"),
        ("cr-cr-lf", b"From: a@example.org\r\r\nSubject: crcrlf\r\r\n\r\nbody\r\r\n"),
        ("body-line-300k", _msg("From: a@example.org", "Subject: long", body=b"w" * 300_000)),
        ("short-lines-100k", _msg("From: a@example.org", "Subject: many", body=b"l\n" * 100_000)),
    ]


def field_cases() -> list[Case]:
    return [
        ("date-garbage", _msg("From: a@example.org", "Date: yesterday at noon")),
        ("date-out-of-range", _msg("From: a@example.org", "Date: Tue, 24 Nov 99999 10:00 +9999")),
        ("date-overflow", _msg("From: a@example.org", "Date: Mon, 32 Foo 1 25:61:61 +2500")),
        ("date-two-digit-year", _msg("From: a@example.org", "Date: 1 Jan 00 00:00 GMT")),
        ("date-several", _msg("From: a@example.org", "Date: 1 Jan 2020", "Date: not a date")),
        (
            "message-id-odd",
            _msg(
                "From: a@example.org",
                "Message-ID: <" + "i" * 5000 + "@example.org>",
                "Message-ID: second@x",
            ),
        ),
        ("message-id-empty", _msg("From: a@example.org", "Message-ID:", "References: <<<>>>")),
        (
            "subject-several",
            _msg("From: a@example.org", "Subject: first", "Subject: =?utf-8?q?second?="),
        ),
        ("subject-empty", _msg("From: a@example.org", "Subject:", "To:", "Cc:")),
    ]


def found_cases() -> list[Case]:
    """Mail that broke mailingest once (each fixed at its root; see the history)."""
    return [
        (
            "rfc2047-utf7-surrogates",  # decoded to lone surrogates: SQLite refused the batch
            _msg(
                "From: u7@example.org",
                "Subject: =?utf-7?q?+2AA-?= and =?unicode-escape?q?=5Cud800?= =?utf-7?q?+2D3eAA-?=",
            ),
        ),
        ("rfc2047-idna-charset", _msg("From: idna@example.org", "Subject: =?idna?q?xn--=2E?=")),
        (
            "utf8-headers-rfc6532",  # raw UTF-8 headers read as U+FFFD: addresses never matched
            _msg(
                "From: =?utf-8?q?J=C3=BCrgen?= <jurgen@m\u00fcller.example>".encode(),
                "To: \u0416\u0435\u043d\u044f <zhenya@\u043f\u0440\u0438.example>".encode(),
                "Subject: Gr\u00fc\u00dfe".encode(),
            ),
        ),
    ]


GROUPS: tuple[Callable[[], list[Case]], ...] = (
    mime_cases,
    charset_cases,
    address_cases,
    structure_cases,
    field_cases,
    found_cases,
)


def corpus() -> dict[str, bytes]:
    """File name -> bytes, numbered in a fixed order."""
    cases = [case for group in GROUPS for case in group()]
    files = {f"{n:02d}-{name}.eml": raw for n, (name, raw) in enumerate(cases, start=1)}
    # Distinct once served: the store keeps one copy of identical content per account.
    assert len({served(raw) for raw in files.values()}) == len(files), "duplicate content"
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args()
    wanted = corpus()
    present = {p.name: p.read_bytes() for p in HERE.glob("*.eml")}
    if args.check:
        if present != wanted:
            stale = sorted(
                set(present) ^ set(wanted) | {n for n in wanted if present.get(n) != wanted[n]}
            )
            sys.stderr.write(f"corpus out of date: {', '.join(stale)}\n")
            return 1
        return 0
    for name in set(present) - set(wanted):
        (HERE / name).unlink()
    for name, raw in wanted.items():
        (HERE / name).write_bytes(raw)
    sys.stdout.write(f"{len(wanted)} messages in {HERE.name}/\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
