"""The visibility policy of ARCHITECTURE.md's sharing table, as pure functions (no I/O).

``private`` means only the owner may read a message; ``shared`` means every CRM user may.
The default mode is ``private``: adding, say, the CEO's address as a contact must not expose
that conversation to every user.

One case the table leaves open is decided here: mail the owner sent from another client
and fetched over POP3 (Gmail ``recent:`` mode returns it, ``direction = "out"``) follows
the "received mail" column, except that in ``public`` mode its *recipients'* domains are
checked against ``excluded_domains`` (the conversation partner is the recipient).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mailingest.matching import domain_matches
from mailingest.model import Facts

PRIVATE = "private"
SHARED = "shared"

REASONS = (
    "mode_private",
    "custom_shared",
    "custom_not_shared",
    "public",
    "excluded_domain",
    "crm_sent",
    "unmatched",
)


@dataclass(frozen=True, slots=True)
class Policy:
    """An account's sharing settings."""

    sharing: str = "private"  # private | custom | public
    excluded_domains: tuple[str, ...] = ()


def decide(policy: Policy, facts: Facts) -> tuple[str, str]:
    """(visibility, reason) for one message."""
    if not facts.linked:
        return PRIVATE, "unmatched"
    if policy.sharing == "custom":
        if facts.crm_sent:
            return SHARED, "crm_sent"
        return (SHARED, "custom_shared") if facts.owner_shared else (PRIVATE, "custom_not_shared")
    if policy.sharing == "public":
        if facts.crm_sent or facts.direction == "out":
            partners: Iterable[str] = facts.recipient_domains
        else:
            partners = (facts.sender_domain,) if facts.sender_domain else ()
        if any(domain_matches(d, policy.excluded_domains) for d in partners):
            return PRIVATE, "excluded_domain"
        return SHARED, "crm_sent" if facts.crm_sent else "public"
    return PRIVATE, "mode_private"


def may_see(viewer: str, owner: str, visibility: str) -> bool:
    """The owner always sees their own mail; others only what is shared."""
    return viewer == owner or visibility == SHARED
