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
    thousands of passwords made alike ("Acme-...") cost no more than a few.

    Secrets are kept for the process's life (``add``: the config's), or in a named slot
    whose values a later ``hold`` replaces (an account's OAuth2 tokens, new every hour,
    must not pile up). A bucket of the index is replaced, never changed, in one
    assignment, so a thread that masks sees it before or after a change."""

    def __init__(self) -> None:
        self._index: dict[str, _Bucket] = {}
        self._counts: dict[str, int] = {}  # form -> how many held secrets have it
        self._kept: frozenset[str] = frozenset()
        self._slots: dict[str, frozenset[str]] = {}
        self._changing = threading.Lock()  # two changes at once must not lose one

    def add(self, values: Iterable[str]) -> None:
        """Mask ``values`` for good; ones shorter than _PREFIX are left out (see there)."""
        with self._changing:
            fresh = _maskable(values) - self._kept
            if fresh:
                self._kept = self._kept | fresh
                self._change(fresh, ())

    def hold(self, slot: str, values: Iterable[str]) -> None:
        """Mask ``values`` in place of what ``slot`` held before."""
        with self._changing:
            new = _maskable(values)
            old = self._slots.get(slot, frozenset())
            if new == old:
                return
            if new:
                self._slots[slot] = new
            else:
                self._slots.pop(slot, None)
            self._change(new - old, old - new)

    def _change(self, gained: Iterable[str], lost: Iterable[str]) -> None:
        """Count the forms of ``gained`` in and those of ``lost`` out; rebuild each bucket
        whose forms changed, once."""
        added: dict[str, set[str]] = {}
        dropped: dict[str, set[str]] = {}
        for secret in gained:
            for form in rendered_forms(secret):
                self._counts[form] = self._counts.get(form, 0) + 1
                if self._counts[form] == 1:
                    added.setdefault(form[:_PREFIX], set()).add(form)
        for secret in lost:
            for form in rendered_forms(secret):
                self._counts[form] -= 1
                if not self._counts[form]:
                    del self._counts[form]
                    dropped.setdefault(form[:_PREFIX], set()).add(form)
        for key in added.keys() | dropped.keys():
            _, forms = self._index.get(key, ((), frozenset()))
            now = (forms | added.get(key, set())) - dropped.get(key, set())
            if now:
                self._index[key] = (tuple(sorted({len(f) for f in now}, reverse=True)), now)
            else:
                del self._index[key]

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


def _maskable(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v for v in values if len(v) >= _PREFIX)


#: The process's secrets: the config's, registered as it is loaded (and reloaded).
registered = Secrets()


def register_secrets(values: Iterable[str]) -> None:
    """Remember secret values so that any log line containing one is masked."""
    registered.add(values)


def hold_secrets(slot: str, values: Iterable[str]) -> None:
    """Mask ``values`` in place of what ``slot`` held (tokens that replace each other)."""
    registered.hold(slot, values)


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
