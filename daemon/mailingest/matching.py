"""Address normalisation and which addresses of a message link it to CRM records.

Two addresses match when they are equal after normalisation: display name and comments
removed, case folded, and the domain in its ASCII (IDNA ``xn--``) form, so that
``jürgen@müller.example`` and ``JURGEN@xn--mller-kva.example`` are one address.
Nothing here raises on bad input: an address that cannot be read matches nothing.
"""

from __future__ import annotations

import email.utils
import unicodedata
from collections.abc import Iterable

from mailingest.parse import Headers


def _ascii_domain(domain: str) -> str | None:
    domain = domain.strip().rstrip(".").lower()
    if not domain or any(c.isspace() for c in domain):
        return None
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
    return ".".join(out)


def normalize(address: str | None) -> str | None:
    """``local@domain`` in canonical form, or None when the text holds no usable address."""
    if not address:
        return None
    try:
        _, addr = email.utils.parseaddr(address)
    except Exception:
        return None
    addr = addr.strip()
    local, at, domain = addr.rpartition("@")
    if not at or not local or any(c.isspace() for c in local):
        return None
    ascii_domain = _ascii_domain(domain)
    if ascii_domain is None:
        return None
    return f"{local.casefold()}@{ascii_domain}"


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


def direction_of(headers: Headers, identity: str) -> str:
    """``out`` when the mailbox owner sent it (Gmail recent: mode returns sent mail too)."""
    own = normalize(identity) or identity.strip().lower()
    sender = normalize(headers.sender) if headers.sender else None
    if sender is None and headers.sender:
        sender = headers.sender.strip().lower()
    return "out" if sender is not None and sender == own else "in"


def link_addresses(headers: Headers, direction: str) -> tuple[str, ...]:
    """Incoming mail links on From; the owner's outgoing mail links on To and Cc."""
    if direction == "out":
        return normalize_all((*headers.to, *headers.cc))
    return normalize_all(headers.from_addrs)
