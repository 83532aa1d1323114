"""The shared vocabulary: types every layer passes around (stdlib only, imports nothing of ours).

Keeping them here lets the store, the cycle, the daemon and the CLI agree on one set of
types without importing each other; the store in particular needs no policy module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol


class Status(StrEnum):
    """An account's result, as JSON ``status``/``result`` and the store show it (a StrEnum:
    it serialises as the plain string). A poll ends in one of ``POLL_STATUSES``; the others
    are the statuses of errors outside a poll, which only `check` can report (an SMTP server
    refusing EHLO with a 5xx is data_error)."""

    OK = "ok"
    AUTH_FAILED = "auth_failed"
    TLS_FAILED = "tls_failed"
    UNAVAILABLE = "unavailable"
    TEMP_FAILED = "temp_failed"
    ERROR = "error"
    CONFIG_ERROR = "config_error"
    USAGE = "usage"
    DATA_ERROR = "data_error"
    PERMISSION_DENIED = "permission_denied"

    @property
    def transient(self) -> bool:
        """Whether a poll that ended so may be retried early (backoff): a server down or
        busy, a drop, a locked store. A rejected login is never retried (it would lock the
        mailbox); TLS and protocol failures would fail the same way."""
        return self in _TRANSIENT


#: What a poll can end in (fetch maps any other error status to ERROR).
#: Gmail's recent mode: the login is "recent:" plus the address (the mailbox identity).
RECENT_PREFIX = "recent:"

POLL_STATUSES = frozenset(
    {
        Status.OK,
        Status.AUTH_FAILED,
        Status.TLS_FAILED,
        Status.UNAVAILABLE,
        Status.TEMP_FAILED,
        Status.ERROR,
    }
)
_TRANSIENT = frozenset({Status.UNAVAILABLE, Status.TEMP_FAILED})


@dataclass(frozen=True, slots=True)
class Pop3Login:
    """What one POP3 session needs of its account: where to connect, how, and as whom.

    The POP3 session (pop3/) takes these plain values rather than the config's ``Account``, so
    it depends on nothing above it. ``password`` is called where the session needs it (at
    connect, and to mask an echoed password in error text): a secret read lazily is read
    only by a session that logs in.
    """

    name: str  # the account, as errors name it
    host: str
    port: int
    security: str  # tls | starttls | plain
    username: str
    password: Callable[[], str] = field(repr=False, compare=False)
    ca_file: Path | None = None
    tls_verify: bool = True
    timeout: float = 60.0
    #: None: USER/PASS. Else OAuth2 sign-in (``password`` gives the access token) with
    #: "xoauth2", "oauthbearer", or "auto" (chosen from CAPA SASL).
    sasl: str | None = None


@dataclass(frozen=True, slots=True)
class Headers:
    """What the store indexes of one message."""

    from_addrs: tuple[str, ...] = ()
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()
    subject: str | None = None
    date: str | None = None
    message_id: str | None = None
    references: str | None = None

    @property
    def sender(self) -> str | None:
        return self.from_addrs[0] if self.from_addrs else None


@dataclass(frozen=True, slots=True)
class Facts:
    """What the sharing policy needs to know about one stored message."""

    direction: str  # in | out
    crm_sent: bool  # sent from the CRM (`send`/`reply`), not fetched
    linked: bool  # linked to at least one record
    owner_shared: bool  # the owner shared at least one linked record (custom mode)
    sender_domain: str | None
    recipient_domains: tuple[str, ...] = ()


#: Decides (visibility, reason) from a message's facts: sharing.decide with the account's
#: policy bound. The store applies it inside its transactions but never decides itself.
Tagger = Callable[[Facts], tuple[str, str]]


@dataclass(frozen=True, slots=True)
class AccountPolicy:
    """What the store needs of an account's settings to tag and label its messages."""

    tagger: Tagger
    magnet_label: str | None = None


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A retrieved message waiting in its spool file, with what the fetch decided about it."""

    uidl: str
    spool: IO[bytes]
    size: int
    sha256: str
    headers: Headers
    direction: str
    #: Normalised addresses by role, and the ones that link the message to records.
    senders: tuple[str, ...] = ()
    recipients_to: tuple[str, ...] = ()
    recipients_cc: tuple[str, ...] = ()
    link: tuple[str, ...] = ()
    origin: str = "pop3"  # pop3 (fetched) | crm (sent with `send`/`reply`)
    #: Over the account's size limit: only the header was fetched (see the size policy).
    quarantine: str | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """A CRM lead or contact: mail from or to one of its addresses links to it."""

    id: str
    kind: str
    name: str
    emails: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "name": self.name, "emails": list(self.emails)}


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A UIDL in the account's ledger: the message it is (None: not stored), when it was
    first listed, whether it was deleted from the server."""

    message: int | None
    first_seen: str
    deleted: bool
    held: bool = False  # its message is quarantined: kept on the server until released


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    """What storing one retrieved message came to: its message, and whether that content
    was stored already (a renumbered UIDL)."""

    uidl: str
    message: int | None
    duplicate: bool  # same content already stored for this account (renumbered UIDL)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A stored message as a viewer sees it listed (no raw bytes): its index fields, who
    may see it and why."""

    id: int
    account: str
    owner: str
    direction: str
    sender: str | None
    to: list[str]
    cc: list[str]
    subject: str | None
    date: str | None
    message_id: str | None
    visibility: str
    reason: str
    size: int
    sha256: str
    received_at: str
    labels: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    quarantine_reason: str | None = None  # set while only the header is stored
    origin: str = "pop3"  # pop3 (fetched) | crm (sent with `send`/`reply`)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "account": self.account,
            "owner": self.owner,
            "direction": self.direction,
            "from": self.sender,
            "to": self.to,
            "cc": self.cc,
            "subject": self.subject,
            "date": self.date,
            "message_id": self.message_id,
            "records": self.records,
            "visibility": self.visibility,
            "reason": self.reason,
            "labels": self.labels,
            "size": self.size,
            "sha256": self.sha256,
            "received_at": self.received_at,
            "quarantined": self.quarantine_reason is not None,
            "quarantine_reason": self.quarantine_reason,
        }


class ListedPage(NamedTuple):
    """A page of the API's listing as the store made it: a JSON array of the messages,
    each with ``StoredMessage.to_json``'s fields; where the next page starts (the last
    message's sort key and id), if there is one."""

    json: str
    found: int  # messages in it
    next: tuple[str, int] | None


@dataclass(frozen=True, slots=True)
class ShareFlag:
    """An owner's custom-mode share flag on one record, with who set it and when."""

    record: str
    set_by: str | None  # None: set before the audit existed
    set_at: str | None

    def to_json(self) -> dict[str, Any]:
        return {"record": self.record, "set_by": self.set_by, "set_at": self.set_at}


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One change of who may see mail: a mode, excluded domains, a share flag."""

    id: int
    at: str
    actor: str
    action: str  # share | unshare | sharing_changed
    owner: str | None
    account: str | None
    record: str | None
    detail: dict[str, Any]
    retagged: int  # messages whose visibility changed with it

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "owner": self.owner,
            "account": self.account,
            "record": self.record,
            "detail": self.detail,
            "retagged": self.retagged,
        }


@dataclass(frozen=True, slots=True)
class UnmatchedSender:
    """One sender in an owner's review queue: incoming mail linked to no record."""

    sender: str
    count: int
    latest: str  # the newest message's date (else when it was stored)
    last_message: int  # that message's id

    def to_json(self) -> dict[str, Any]:
        return {
            "sender": self.sender,
            "count": self.count,
            "latest": self.latest,
            "last_message": self.last_message,
        }


@dataclass(frozen=True, slots=True)
class AccountState:
    """One account's persisted state: the last poll, and the daemon's pause and schedule
    (times are ISO 8601 UTC strings). ``stored`` is 0 where it was not counted."""

    account: str
    owner: str | None = None
    last_poll: str | None = None
    result: Status | None = None
    error: str | None = None
    new: int = 0
    stored: int = 0
    paused: bool = False
    pause_reason: str | None = None
    pause_key: str | None = None
    next_poll: str | None = None
    next_login: str | None = None
    consecutive_failures: int = 0


@dataclass(frozen=True, slots=True)
class StoredAccount:
    """An account kept in the database: its ``[[accounts]]`` table without the passwords,
    which are sealed (see crypto.SecretBox)."""

    name: str
    owner: str
    settings: dict[str, Any]
    password: str
    smtp_password: str | None = None


@dataclass(frozen=True, slots=True)
class SettingsChange:
    """Who gave a stored account the sharing settings of ``snapshot`` (crm's): the audit
    names them when that change is applied, whichever process applies it."""

    actor: str
    snapshot: str


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to "may this process poll the account now?" (see Store.take_poll)."""

    taken: bool  # yes: the lease (and the scheduled poll, if claimed) is this process's
    holder: str | None = None  # taken: our lease; not taken: who has it, if that is why
    next_login: str | None = None  # taken: the earliest login LOGIN-DELAY allows (ISO UTC)
    next_poll: str | None = None  # not due: when it is due next (ISO 8601 UTC), if known
    paused: bool = False  # not taken: the account is paused (by whichever process)
    pause_key: str | None = None
    took_over: bool = False  # taken from another holder: one that died, or whose lease expired

    @property
    def busy(self) -> bool:
        """Another process holds the account's lease (it is polling it now)."""
        return not self.taken and self.holder is not None


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A bearer token of the HTTP API, as the store keeps it (its SHA-256, never itself)."""

    id: int
    user: str  # the CRM user it authenticates as
    admin: bool  # may change any owner's sharing, delete records
    act_for: bool  # may act as another user (X-Act-As): the CRM's service token
    label: str
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "admin": self.admin,
            "act_for": self.act_for,
            "label": self.label,
            "created_at": self.created_at,
        }


class StoreObserver(Protocol):
    """Hears what the store does, for metrics (the daemon's metrics.Metrics)."""

    def committed(self, seconds: float) -> None:
        """A write transaction's COMMIT took ``seconds``."""

    def lease_taken_over(self, account: str) -> None:
        """The lease of a dead holder was taken over."""


__all__ = [
    "POLL_STATUSES",
    "AccountPolicy",
    "AccountState",
    "ApiToken",
    "AuditEntry",
    "Claim",
    "Facts",
    "Headers",
    "LedgerEntry",
    "NewMessage",
    "Pop3Login",
    "Record",
    "ShareFlag",
    "Status",
    "StoreObserver",
    "StoreOutcome",
    "StoredAccount",
    "StoredMessage",
    "Tagger",
    "UnmatchedSender",
]
