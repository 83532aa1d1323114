"""The secrets kept out of every output: the registry of their values, every form a
renderer or an error may write them in, and the mask that replaces them by ``***``.

logs.py masks log lines with it; errors quoted on stdout, in the store or in an API answer
are masked with ``mask_text`` too.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterable

#: A POP3/SMTP credential command written out (protocol debug, an echoed error reply);
#: upper case only, as clients send them, so that prose such as "pass" stays readable.
_AUTH_LINE = re.compile(
    r"\b(PASS|AUTH(?:\s+(?:PLAIN|LOGIN|XOAUTH2|OAUTHBEARER|CRAM-MD5))?|APOP)\s+\S+"
)
#: The shortest secret the mask knows: every form of one has this many first characters to
#: index it by. A shorter one is accepted (the server decides what a password may be) but
#: not masked: it cannot be told apart from the letters or digits of every line.
_PREFIX = 3


#: The forms that start with the same characters: their lengths, longest first, and them.
_Bucket = tuple[tuple[int, ...], frozenset[str]]


class Secrets:
    """The secrets to mask and every form they may be written in (``rendered_forms``),
    indexed by their first characters: a line is masked in one pass over its
    positions, however many accounts (each with its own password) the daemon holds. A
    position is tried against the lengths of the forms starting there, not each form, so
    thousands of passwords made alike ("Acme-...") cost no more than a few. The index is
    replaced whole, never changed, so a thread that masks sees one or the other."""

    def __init__(self) -> None:
        self.values: frozenset[str] = frozenset()
        self._index: dict[str, _Bucket] = {}
        self._adding = threading.Lock()  # two registrations at once must not lose one

    def add(self, values: Iterable[str]) -> None:
        """Remember ``values``; ones shorter than _PREFIX are left out (see there)."""
        wanted = {v for v in values if len(v) >= _PREFIX}
        with self._adding:
            fresh = wanted - self.values
            if not fresh:
                return
            grouped = {k: set(forms) for k, (_, forms) in self._index.items()}
            for secret in fresh:
                for form in rendered_forms(secret):
                    grouped.setdefault(form[:_PREFIX], set()).add(form)
            self._index = {
                k: (tuple(sorted({len(f) for f in v}, reverse=True)), frozenset(v))
                for k, v in grouped.items()
            }
            self.values = self.values | fresh

    def mask(self, text: str) -> str:
        """``text`` with every stretch that is (part of overlapping) secrets as ``***``."""
        index = self._index
        if not index or len(text) < _PREFIX:
            return text
        spans: list[tuple[int, int]] = []
        size = len(text)
        for i in range(size - _PREFIX + 1):
            bucket = index.get(text[i : i + _PREFIX])
            if bucket is None:
                continue
            lengths, forms = bucket
            for length in lengths:  # the longest form found here wins
                end = i + length
                if end <= size and text[i:end] in forms:
                    if spans and i <= spans[-1][1]:
                        spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
                    else:
                        spans.append((i, end))
                    break
        if not spans:
            return text
        out, last = [], 0
        for start, end in spans:
            out += [text[last:start], "***"]
            last = end
        out.append(text[last:])
        return "".join(out)


#: The process's secrets: the config's, registered as it is loaded (and reloaded).
registered = Secrets()


def register_secrets(values: Iterable[str]) -> None:
    """Remember secret values so that any log line containing one is masked."""
    registered.add(values)


def mask_text(text: str) -> str:
    """``text`` with registered secrets and credential commands replaced by ``***``."""
    text = registered.mask(text)
    return _AUTH_LINE.sub(lambda m: m.group(0).split()[0] + " ***", text)


def rendered_forms(secret: str) -> set[str]:
    """How a renderer or an error may write a secret: as is, JSON-escaped, and inside the
    repr of a text or of its UTF-8 bytes (a server line quoted as ``line[:80]!r``, poplib's
    replies in a traceback). A repr escapes ' only where it quotes with ', which the text
    around the secret decides: both are forms."""
    forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    forms.add(repr(secret + '"')[1:-2])  # quoted with '
    if '"' not in secret:
        forms.add(repr("'" + secret)[2:-1])  # quoted with ", as a repr does for a text with '
    with contextlib.suppress(UnicodeEncodeError):  # a lone surrogate has no UTF-8 bytes
        data = secret.encode("utf-8")
        forms.add(repr(data + b'"')[2:-2])
        if b'"' not in data:
            forms.add(repr(b"'" + data)[3:-1])
    return forms
