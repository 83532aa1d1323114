"""The one error hierarchy; each class maps to one sysexits code and one account status.

::

    MailIngestError                 76 error
    ├── ConfigError                 78
    ├── UsageError                  64
    ├── DataError                   65
    ├── Pop3Error                   76 error
    │   ├── AuthError               77 auth_failed
    │   ├── TLSError                69 tls_failed
    │   ├── UnavailableError        69 unavailable   (transient)
    │   ├── TemporaryError          75 temp_failed   (transient)
    │   │   ├── BusyError               another process holds the account's lease
    │   │   └── LoginDelayError         LOGIN-DELAY forbids logging in yet
    │   └── ProtocolError           76 error
    ├── StoreError                  75 temp_failed   (transient: disk full, locked)
    ├── SendError                   69
    └── PermissionDenied            77

Context lives in keyword attributes (``account``, ``key_path``), not only in the message.
"""

from __future__ import annotations

from mailingest.model import Status

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78

#: Order in which `fetch` over several accounts picks the worst exit code.
EXIT_SEVERITY: tuple[int, ...] = (
    EX_CONFIG,
    EX_NOPERM,
    EX_UNAVAILABLE,
    EX_PROTOCOL,
    EX_TEMPFAIL,
    EX_DATAERR,
    EX_OK,
)

#: A poll's status (JSON ``status``/``result``) -> exit code.
STATUS_EXIT: dict[Status, int] = {
    Status.OK: EX_OK,
    Status.AUTH_FAILED: EX_NOPERM,
    Status.TLS_FAILED: EX_UNAVAILABLE,
    Status.UNAVAILABLE: EX_UNAVAILABLE,
    Status.TEMP_FAILED: EX_TEMPFAIL,
    Status.ERROR: EX_PROTOCOL,
}


def worst_exit(codes: list[int]) -> int:
    """The most severe exit code of several, per the contract's order."""
    for code in EXIT_SEVERITY:
        if code in codes:
            return code
    return EX_OK


class MailIngestError(Exception):
    """Base of every error mailingest raises on purpose."""

    exit_code: int = EX_PROTOCOL
    status: Status = Status.ERROR
    transient: bool = False

    def __init__(self, message: str, *, account: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.account = account

    def __str__(self) -> str:
        if self.account:
            return f"account {self.account!r}: {self.message}"
        return self.message


class ConfigError(MailIngestError):
    """The configuration is invalid; ``key_path`` names the offending key."""

    exit_code = EX_CONFIG
    status = Status.CONFIG_ERROR

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        key_path: str | None = None,
        account: str | None = None,
    ) -> None:
        super().__init__(message, account=account)
        self.file = file
        self.key_path = key_path

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.file, self.key_path) if part)
        return f"{where}: {self.message}" if where else self.message


class UsageError(MailIngestError):
    """The command line asked for something impossible (unknown account, bad ID)."""

    exit_code = EX_USAGE
    status = Status.USAGE


class DataError(MailIngestError):
    """Input data (a CSV, a body file) is malformed."""

    exit_code = EX_DATAERR
    status = Status.DATA_ERROR


class Pop3Error(MailIngestError):
    """A POP3 session failed; subclasses say how."""

    exit_code = EX_PROTOCOL
    status = Status.ERROR


class AuthError(Pop3Error):
    """The server rejected the credentials: never retried automatically."""

    exit_code = EX_NOPERM
    status = Status.AUTH_FAILED


class TLSError(Pop3Error):
    """Certificate or handshake failure, or STLS missing: retrying will not help."""

    exit_code = EX_UNAVAILABLE
    status = Status.TLS_FAILED


class UnavailableError(Pop3Error):
    """Connection refused, no route, DNS failure."""

    exit_code = EX_UNAVAILABLE
    status = Status.UNAVAILABLE
    transient = True


class TemporaryError(Pop3Error):
    """Timeouts, drops, ``[SYS/TEMP]``, ``[IN-USE]``, ``[LOGIN-DELAY]``, busy account."""

    exit_code = EX_TEMPFAIL
    status = Status.TEMP_FAILED
    transient = True


class BusyError(TemporaryError):
    """Another process holds the account's lease; this run touched nothing."""


class LoginDelayError(TemporaryError):
    """The server's LOGIN-DELAY forbids logging in before ``retry_at`` (ISO 8601, UTC)."""

    def __init__(self, message: str, *, account: str | None = None, retry_at: str) -> None:
        super().__init__(message, account=account)
        self.retry_at = retry_at


class ProtocolError(Pop3Error):
    """The server broke the protocol (garbage reply, over-long status line)."""

    exit_code = EX_PROTOCOL
    status = Status.ERROR


class StoreError(MailIngestError):
    """The store could not be written (disk full, database locked)."""

    exit_code = EX_TEMPFAIL
    status = Status.TEMP_FAILED
    transient = True


class SendError(MailIngestError):
    """Sending over SMTP failed."""

    exit_code = EX_UNAVAILABLE
    status = Status.UNAVAILABLE


class PermissionDenied(MailIngestError):
    """The viewer may not see the message."""

    exit_code = EX_NOPERM
    status = Status.PERMISSION_DENIED
