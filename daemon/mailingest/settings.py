"""The loaded configuration's types: what the rest of the daemon reads of the config
(frozen dataclasses; config.py builds and validates them)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mailingest.config_values import Secret
from mailingest.model import RECENT_PREFIX as RECENT_PREFIX
from mailingest.model import Pop3Login

if TYPE_CHECKING:
    from mailingest.config_auth import OAuth2Config


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    """An account's ``[accounts.smtp]``: where and how `send` and `reply` submit mail."""

    host: str
    port: int
    security: str
    username: str
    password: Secret | None  # None: OAuth2 sign-in (auth)
    allow_plaintext: bool = False
    ca_file: Path | None = None
    tls_verify: bool = True
    daily_limit: int | None = None
    timeout: float = 60.0
    auth: OAuth2Config | None = None  # None: the password


@dataclass(frozen=True, slots=True)
class Account:
    """One ``[[accounts]]`` table, or an account kept in the database, validated."""

    name: str
    owner: str
    host: str
    port: int
    security: str
    username: str
    password: Secret | None  # None: OAuth2 sign-in (auth)
    allow_plaintext: bool = False
    leave_on_server: bool = True
    delete_after_days: int = 0
    sharing: str = "private"
    excluded_domains: tuple[str, ...] = ()
    magnet_label: str | None = None
    from_address: str | None = None
    #: More addresses the owner sends as (mail From one of them is the owner's own).
    aliases: tuple[str, ...] = ()
    primary: bool = False
    ca_file: Path | None = None
    tls_verify: bool = True
    poll_interval: float | None = None  # seconds; None = the daemon's poll_interval
    #: Bytes; a message listed larger is quarantined (header stored, kept on the server).
    max_message_size: int = 0  # 0 = no limit
    timeout: float = 60.0
    smtp: SmtpSettings | None = None
    auth: OAuth2Config | None = None  # None: the password

    def login_bytes(self) -> bytes:
        """Everything that makes a login: another server, user name, password or OAuth2
        client is another attempt (the auth pause's key)."""
        head = "\0".join((self.host, str(self.port), self.username)).encode("utf-8")
        if self.auth is not None:
            return head + b"\0oauth2\0" + self.auth.login_bytes()
        assert self.password is not None
        return head + b"\0" + self.password.reveal().encode("utf-8")

    @property
    def recent_mode(self) -> bool:
        return self.username.startswith(RECENT_PREFIX)

    @property
    def identity(self) -> str:
        """The mailbox address: recent mode logs in as "recent:x" but the mailbox is x."""
        return self.username.removeprefix(RECENT_PREFIX).lower()

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address the owner sends as: the identity, ``from_address``, ``aliases``."""
        extra = (self.from_address,) if self.from_address else ()
        return (self.identity, *extra, *self.aliases)

    def pop3_login(self) -> Pop3Login:
        """The values a POP3 session needs (pop3/ never sees the config); the password
        stays unread until the session asks for it."""
        return Pop3Login(
            name=self.name,
            host=self.host,
            port=self.port,
            security=self.security,
            username=self.username,
            password=self.password.reveal if self.password is not None else _no_password,
            ca_file=self.ca_file,
            tls_verify=self.tls_verify,
            timeout=self.timeout,
            sasl=self.auth.mechanism if self.auth is not None else None,
        )


def _no_password() -> str:
    """An OAuth2 account's login before its token is in: a bug, not a blank password."""
    raise RuntimeError("an OAuth2 account's access token is fetched before its session starts")


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """``[storage]``: where the store is, and the secrets that open it."""

    #: A SQLite file, or a ``postgresql://user@host[:port]/db`` URL (never with a password).
    database: Path | str
    password: Secret | None = None  # PostgreSQL only
    #: Encrypts the passwords of accounts kept in the database (`mailingest accounts`).
    secret_key: Secret | None = None

    @property
    def postgres(self) -> bool:
        return isinstance(self.database, str)

    def reveal_password(self) -> str | None:
        return self.password.reveal() if self.password is not None else None


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """``[daemon]``: schedule, concurrency and logs of `run` (and `fetch`'s limits)."""

    poll_interval: float = 300.0
    max_concurrent: int = 16
    max_sessions_per_cycle: int = 10
    log_format: str = "auto"
    shutdown_timeout: float = 10.0
    #: NAME=value lines that { env = "NAME" } secrets read before the process environment;
    #: unlike the environment, re-read on every load (SIGHUP).
    env_file: Path | None = None


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """``[api]``: the daemon's HTTP API (off unless ``listen`` is set)."""

    host: str
    port: int
    #: Both or neither: HTTPS with this certificate chain and key (PEM), read at start.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Processes that answer on ``listen``: 1 is the daemon alone; each one more is a helper
    #: that serves the read routes from its own store connection (api/helpers.py).
    processes: int = 1


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration: the file's, and the database's accounts once added."""

    path: Path
    storage: StorageSettings
    daemon: DaemonSettings
    accounts: tuple[Account, ...]
    api: ApiSettings | None = None

    def secrets(self) -> Iterator[str]:
        """Every secret value (POP3, SMTP, database), for the log redaction."""
        found = [self.storage.password, self.storage.secret_key]
        for account in self.accounts:
            found += [account.password, account.smtp.password if account.smtp else None]
            for auth in (account.auth, account.smtp.auth if account.smtp else None):
                found += auth.secrets() if auth is not None else []
        # One not read yet (a command that logs in nowhere) has nothing to mask.
        yield from (s.value for s in found if s is not None and s.resolved)

    def account(self, name: str) -> Account:
        for account in self.accounts:
            if account.name == name:
                return account
        raise KeyError(name)
