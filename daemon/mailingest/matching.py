"""Address normalisation and which addresses of a message link it to CRM records.

Two addresses match when they are equal after normalisation: display name and comments
removed, case folded, and the domain in its ASCII (IDNA ``xn--``) form, so that
``jürgen@müller.example`` and ``JURGEN@xn--mller-kva.example`` are one address.
Nothing here raises on bad input: an address that cannot be read matches nothing.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

from mailingest.model import Headers

#: An ASCII DNS label as mail really carries it (lenient: underscores, odd hyphens), and an
#: address literal such as ``[192.0.2.1]``. Anything else (quotes, brackets, commas) is no
#: domain: parseaddr hands back such fragments from garbage like ``<"@``.
_LABEL_RE = re.compile(r"[a-z0-9_-]+")
_LITERAL_RE = re.compile(r"\[[a-z0-9:.]+\]")


def _ascii_domain(domain: str) -> str | None:
    domain = domain.strip().rstrip(".").lower()
    if not domain or any(c.isspace() for c in domain):
        return None
    if domain.startswith("["):
        return domain if _LITERAL_RE.fullmatch(domain) else None
    labels = domain.split(".")
    out: list[str] = []
    for label in labels:
        if not label:
            return None
        if label.isascii():
            out.append(label)
            continue
        label = unicodedata.normalize("NFC", label)
        try:
            out.append(label.encode("idna").decode("ascii"))  # nameprep + punycode
        except UnicodeError:
            try:
                out.append("xn--" + label.encode("punycode").decode("ascii"))
            except UnicodeError:
                return None
    # Checked after the IDNA step too: nameprep maps some symbols to ASCII punctuation.
    if not all(_LABEL_RE.fullmatch(label) for label in out):
        return None
    return ".".join(out)


#: The common shapes, ``local@domain`` and ``Name Words <local@domain>`` with a dot-atom
#: address and a plain phrase, read without the email package's address parser: it costs
#: more than everything else a fetch does per message. Anything else takes the full path.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR = rf"({_ATOM}(?:\.{_ATOM})*)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)"


@functools.cache
def _simple_re() -> re.Pattern[str]:
    """Compiled at the first address (over a millisecond): a fetch of no mail needs none."""
    return re.compile(rf"[ \t]*(?:{_ADDR}|(?:[A-Za-z0-9]+[ \t]+)*<{_ADDR}>)[ \t]*")


def normalize(address: str | None) -> str | None:
    """``local@domain`` in canonical form, or None when the text holds no usable address."""
    if not address:
        return None
    simple = _simple_re().fullmatch(address)
    if simple is not None:
        local, domain = simple.group(1, 2) if simple.group(1) else simple.group(3, 4)
        # A dot-atom local part and an ASCII domain: what the full path below gives.
        ascii_domain = _ascii_domain(domain)
        return None if ascii_domain is None else f"{local.lower()}@{ascii_domain}"
    return _normalize_parsed(address)


def _normalize_parsed(address: str) -> str | None:
    """normalize() through the email package's address parser: any text at all."""
    import email.utils  # here: most addresses take the fast path, and start-up is shorter

    try:
        _, addr = email.utils.parseaddr(address)
    except Exception:  # parseaddr is tolerant; guard the odd crash anyway
        return None
    addr = addr.strip()
    local, at, domain = addr.rpartition("@")
    if not at or not local or any(c.isspace() for c in local):
        return None
    ascii_domain = _ascii_domain(domain)
    if ascii_domain is None:
        return None
    canonical = f"{local.casefold()}@{ascii_domain}"
    # A fixpoint, so record addresses and message addresses (normalised at different times,
    # from differently written text) compare equal: a local part that only parsed thanks to
    # its context (e.g. ``":@x`` gives ``:@x``) is no usable address.
    try:
        if email.utils.parseaddr(canonical)[1] != canonical:
            return None
    except Exception:  # as above
        return None
    return canonical


def normalize_all(addresses: Iterable[str]) -> tuple[str, ...]:
    """The normalisable addresses, each once, in first-seen order."""
    seen: dict[str, None] = {}
    for address in addresses:
        norm = normalize(address)
        if norm is not None:
            seen.setdefault(norm)
    return tuple(seen)


def domain_of(address: str) -> str:
    """The domain of a normalised address."""
    return address.rpartition("@")[2]


def normalize_domain(domain: str) -> str | None:
    """A domain (``@`` allowed in front) in the same form as normalised addresses use."""
    return _ascii_domain(domain.strip().lstrip("@"))


def domain_matches(domain: str, excluded: Iterable[str]) -> bool:
    """A domain matches an excluded domain when it is that domain or one of its subdomains."""
    return any(domain == ex or domain.endswith("." + ex) for ex in excluded)


def direction_of(headers: Headers, own: Iterable[str]) -> str:
    """``out`` when the mailbox owner sent it, From any of their ``own`` addresses (Gmail
    recent: mode returns sent mail too, sent from the CRM's From or an alias)."""
    mine = {normalize(a) or a.strip().lower() for a in own}
    sender = normalize(headers.sender) if headers.sender else None
    if sender is None and headers.sender:
        sender = headers.sender.strip().lower()
    return "out" if sender is not None and sender in mine else "in"


def link_addresses(headers: Headers, direction: str) -> tuple[str, ...]:
    """Incoming mail links on From; the owner's outgoing mail links on To and Cc."""
    if direction == "out":
        return normalize_all((*headers.to, *headers.cc))
    return normalize_all(headers.from_addrs)
