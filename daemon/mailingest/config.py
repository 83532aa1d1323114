"""TOML configuration: loaded into frozen dataclasses, validated and resolved in one place."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailingest.envfile import EnvFileError, read_env_file
from mailingest.errors import ConfigError
from mailingest.model import Pop3Login

DEFAULT_CONFIG_PATH = Path("/etc/mailingest/mailingest.toml")
RECENT_PREFIX = "recent:"
MAX_EXCLUDED_DOMAINS = 5
SECURITY_MODES = ("tls", "starttls", "plain")
SHARING_MODES = ("private", "custom", "public")
LOG_FORMATS = ("auto", "json", "console")
_POP3_PORTS = {"tls": 995, "starttls": 110, "plain": 110}
_SMTP_PORTS = {"tls": 465, "starttls": 587, "plain": 25}

_TOP_KEYS = ("storage", "daemon", "accounts", "api")
_STORAGE_KEYS = ("database", "password", "secret_key")
#: The shortest secret_key accepted (characters).
SECRET_KEY_MIN = 16
_DAEMON_KEYS = (
    "poll_interval max_concurrent max_sessions_per_cycle log_format shutdown_timeout env_file"
)
_TRANSPORT_KEYS = "host port security username password allow_plaintext ca_file tls_verify timeout"
_SMTP_KEYS = (*_TRANSPORT_KEYS.split(), "daily_limit")
_ACCOUNT_KEYS = (
    *_TRANSPORT_KEYS.split(),
    *"name owner leave_on_server delete_after_days sharing excluded_domains magnet_label".split(),
    *"from_address aliases primary poll_interval max_message_size smtp".split(),
)
_SECRET_KEYS = ("env", "file", "credential")

_NAME_RE = re.compile(r"[A-Za-z0-9._@-]+")
_ADDRESS_RE = re.compile(r"[^@\s]+@[^@\s]+")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?[dhms])+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


@dataclass(frozen=True, slots=True)
class Secret:
    """A password and where it came from; repr and str never show the value."""

    source: str  # "literal" | "env" | "file" | "credential" | "database"
    ref: str  # "" for literal; else the variable name, file path or credential name
    value: str = field(repr=False)
    #: Reads the value at its first use (commands that log in nowhere never read it): a
    #: ConfigError naming the key if that fails.
    resolver: Callable[[], str] | None = field(default=None, repr=False, compare=False)

    def reveal(self) -> str:
        if self.resolver is not None:
            object.__setattr__(self, "value", self.resolver())
            object.__setattr__(self, "resolver", None)
        return self.value

    @property
    def resolved(self) -> bool:
        return self.resolver is None

    def describe(self) -> str:
        """TOML text that says where the secret comes from, never what it is."""
        if self.source == "literal":
            return '"***"'
        return f"{{ {self.source} = {_toml_str(self.ref)} }}"

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    host: str
    port: int
    security: str
    username: str
    password: Secret
    allow_plaintext: bool = False
    ca_file: Path | None = None
    tls_verify: bool = True
    daily_limit: int | None = None
    timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    owner: str
    host: str
    port: int
    security: str
    username: str
    password: Secret
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
        """The values a POP3 session needs (pop3.py never sees the config); the password
        stays unread until the session asks for it."""
        return Pop3Login(
            name=self.name,
            host=self.host,
            port=self.port,
            security=self.security,
            username=self.username,
            password=self.password.reveal,
            ca_file=self.ca_file,
            tls_verify=self.tls_verify,
            timeout=self.timeout,
        )


@dataclass(frozen=True, slots=True)
class StorageSettings:
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


@dataclass(frozen=True, slots=True)
class Config:
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
        # One not read yet (a command that logs in nowhere) has nothing to mask.
        yield from (s.value for s in found if s is not None and s.resolved)

    def account(self, name: str) -> Account:
        for account in self.accounts:
            if account.name == name:
                return account
        raise KeyError(name)


def resolve_config_path(cli_value: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """-c/--config, else $MAILINGEST_CONFIG, else the system default."""
    env = os.environ if environ is None else environ
    return Path(cli_value or env.get("MAILINGEST_CONFIG") or DEFAULT_CONFIG_PATH)


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}
_SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_duration(value: str | int | float, *, key_path: str = "") -> float:
    """Seconds from "90s", "5m", "2h", "1d", "1h30m" or a plain number of seconds (>= 0)."""
    expected = 'expected a duration such as "90s", "5m", "1h30m" or a number of seconds'
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        got = _type_name(value)
        raise ConfigError(f"{expected}, got {got}", key_path=key_path or None)
    text = value.strip() if isinstance(value, str) else ""
    try:
        if not isinstance(value, str):
            seconds = float(value)
        elif _NUMBER_RE.fullmatch(text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text) and _units_in_order(text):
            parts = _DURATION_PART_RE.findall(text)
            seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in parts)
        else:
            seconds = math.nan
    except OverflowError:
        seconds = math.inf
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"{expected}, got {value!r}", key_path=key_path or None)
    return seconds


def _units_in_order(text: str) -> bool:
    """Reject "5m1h" or "1m1m": each unit at most once, largest first."""
    order = [list(_UNIT_SECONDS).index(unit) for _, unit in _DURATION_PART_RE.findall(text)]
    return all(a < b for a, b in itertools.pairwise(order))


def load_config(
    path: Path, environ: Mapping[str, str] | None = None, *, secrets: bool = True
) -> Config:
    """Read, validate and resolve the config file; every problem is a ConfigError (exit 78).

    ``secrets=False`` (commands that log in nowhere: they read the store) leaves the
    accounts' passwords and the secret_key unread until first used: a credential that only
    the daemon's unit provides does not fail ``messages`` or ``status``."""
    path = Path(os.path.abspath(path))
    file = str(path)
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = tomllib.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        message = "file not found; pass -c PATH or set MAILINGEST_CONFIG"
        raise ConfigError(message, file=file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=file) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not valid UTF-8 (byte {exc.start})", file=file) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", file=file) from exc

    ctx = _Context(file, path.parent, os.environ if environ is None else environ)
    ctx.defer = not secrets
    root = _Table(data, ctx.file, "")
    root.check_keys(_TOP_KEYS)
    daemon = _daemon(root.table("daemon"), ctx)  # first: its env_file serves every { env }
    storage = _storage(root.table("storage"), ctx)
    raw_accounts = data.get("accounts", [])
    if not isinstance(raw_accounts, list):
        raise root.error("accounts", "expected an array of tables ([[accounts]])")
    accounts: list[Account] = []
    for index, raw in enumerate(raw_accounts):
        accounts.append(_account(raw, index, ctx, accounts))
    # Like fetchmail: a password others can read is a leaked password.
    if ctx.literals and mode & 0o077:
        raise ConfigError(
            f"holds a literal password ({ctx.literals[0]}) and is readable by group/others "
            f"(mode {mode & 0o777:03o}); chmod 600 it or use {{ env = ... }} / "
            "{ file = ... } / { credential = ... }",
            file=file,
        )
    return Config(path, storage, daemon, tuple(accounts), _api(root.table("api"), ctx))


class _Context:
    """What resolution needs: the file (for errors), its directory, the environment."""

    def __init__(self, file: str, base: Path, environ: Mapping[str, str]) -> None:
        self.file = file
        self.base = base
        self.environ = environ
        #: The ``[daemon] env_file``'s variables (read at load), before ``environ``.
        self.env_file: Mapping[str, str] = {}
        self.env_path: Path | None = None
        self.env_error: ConfigError | None = None  # unreadable, raised where it is needed
        self.literals: list[str] = []  # key paths of literal passwords, for the mode check
        self.defer = False  # leave secrets marked lazy unread until used

    def resolve(self, value: str) -> Path:
        return Path(os.path.normpath(self.base / value))


class _Table:
    """One TOML table and its key path: typed getters whose errors name file and key."""

    def __init__(self, data: Mapping[str, Any], file: str, prefix: str) -> None:
        self.data = data
        self.file = file
        self.prefix = prefix

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, key_path=self.path(key))

    def check_keys(self, allowed: Collection[str]) -> None:
        for key in self.data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise self.error(
                    key, f"unknown key; {hint}allowed keys: {', '.join(sorted(allowed))}"
                )

    def _get(self, key: str, kind: type, what: str) -> Any:
        value = self.data[key]
        # bool is a subclass of int in Python, but `port = true` is not a port.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.error(key, f"expected {what}, got {_type_name(value)}")
        return value

    def missing(self, key: str) -> ConfigError:
        return self.error(key, f"missing required key; add {key} = ...")

    def string(self, key: str, default: str | None = None) -> str:
        if key not in self.data:
            if default is None:
                raise self.missing(key)
            return default
        text: str = self._get(key, str, "a string")
        if not text.strip():
            raise self.error(key, "must not be empty")
        return text

    def optional_string(self, key: str) -> str | None:
        """Absent or "" means not set."""
        return self.string(key) if self.data.get(key, "") != "" else None

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in allowed:
            raise self.error(key, f"expected one of {', '.join(allowed)}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self._get(key, bool, "true or false")) if key in self.data else default

    def integer(self, key: str, default: int, low: int, high: int | None = None) -> int:
        rng = f"{low}\N{EN DASH}{high}" if high is not None else f">= {low}"
        if key not in self.data:
            return default
        value: int = self._get(key, int, f"an integer {rng}")
        if value < low or (high is not None and value > high):
            raise self.error(key, f"expected an integer {rng}, got {value}")
        return value

    def duration(self, key: str, default: float) -> float:
        if key not in self.data:
            return default
        try:
            seconds = parse_duration(self.data[key], key_path=self.path(key))
        except ConfigError as exc:
            exc.file = self.file
            raise
        if seconds <= 0:
            raise self.error(key, f"expected a duration greater than zero, got {self.data[key]!r}")
        return seconds

    def size(self, key: str) -> int:
        """Bytes from 26214400, "25MB" (10**6), "25MiB" (2**20), "512kB", "1GiB"; 0 = none."""
        if key not in self.data:
            return 0
        value = self.data[key]
        found = _SIZE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if found is None:
            expected = 'expected a size such as "25MB", "10MiB" or a number of bytes'
            raise self.error(key, f"{expected}, got {value!r}")
        return int(float(found[1]) * _SIZE_UNITS[(found[2] or "b").lower()])

    def table(self, key: str) -> _Table:
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_type_name(value)}")
        return _Table(value, self.file, self.path(key))


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
_TYPE_NAMES |= {list: "an array", dict: "a table"}


def _type_name(value: object) -> str:
    """The TOML type of a value, never the value itself (it may be a secret)."""
    return _TYPE_NAMES.get(type(value), "a date/time")


def _storage(t: _Table, ctx: _Context) -> StorageSettings:
    t.check_keys(_STORAGE_KEYS)
    key = _secret_key(t, ctx)
    if "database" in t.data:
        database = t.string("database")
        if database.startswith(("postgresql://", "postgres://")):
            return StorageSettings(_postgres_url(t, database), _db_password(t, ctx), key)
        if "password" in t.data:
            raise t.error("password", "only a postgresql:// database takes a password")
        return StorageSettings(ctx.resolve(database), secret_key=key)
    if "password" in t.data:
        raise t.error("password", "only a postgresql:// database takes a password")
    state = ctx.environ.get("STATE_DIRECTORY", "").split(":")[0]  # systemd StateDirectory=
    default = Path(state) / "mail.db" if state else ctx.base / "mail.db"
    return StorageSettings(default, secret_key=key)


def _secret_key(t: _Table, ctx: _Context) -> Secret | None:
    if "secret_key" not in t.data:
        return None

    def long_enough(key: Secret) -> Secret:
        if len(key.value) < SECRET_KEY_MIN:
            raise t.error(
                "secret_key",
                f"the key ({key.describe()}) is shorter than {SECRET_KEY_MIN} characters; "
                "make one with: openssl rand -base64 32",
            )
        return key

    return _secret(t, "secret_key", ctx, lazy=True, check=long_enough)


def _postgres_url(t: _Table, url: str) -> str:
    rest = url.partition("://")[2]
    userinfo, at, _ = rest.rpartition("@")
    if at and ":" in userinfo:
        # Never echo the URL: it holds the password.
        raise t.error(
            "database",
            "the URL holds a password; move it to storage.password "
            '(password = { env = "VAR" }, { file = ... } or { credential = ... })',
        )
    if "password=" in rest.partition("?")[2]:
        raise t.error("database", "the URL holds a password; move it to storage.password")
    return url


def _db_password(t: _Table, ctx: _Context) -> Secret | None:
    return _secret(t, "password", ctx) if "password" in t.data else None


def _daemon(t: _Table, ctx: _Context) -> DaemonSettings:
    t.check_keys(_DAEMON_KEYS.split())
    d = DaemonSettings()
    env_text = t.optional_string("env_file")
    env_file = ctx.resolve(env_text) if env_text is not None else None
    if env_file is not None:
        # Read by every load, even of commands that resolve no secret: like the config
        # file, it is part of the configuration, and `mailingest config` checks it. One
        # that this user may not read fails only where an { env } secret is needed: under
        # the systemd unit only the daemon reads it, and `messages` must still work.
        ctx.env_path = env_file
        if ctx.defer and env_file.exists() and not os.access(env_file, os.R_OK):
            ctx.env_error = t.error("env_file", f"cannot read {env_file}: permission denied")
        else:
            try:
                ctx.env_file = read_env_file(env_file)
            except EnvFileError as exc:
                raise t.error("env_file", str(exc)) from None
    return DaemonSettings(
        poll_interval=t.duration("poll_interval", d.poll_interval),
        max_concurrent=t.integer("max_concurrent", d.max_concurrent, 1),
        max_sessions_per_cycle=t.integer("max_sessions_per_cycle", d.max_sessions_per_cycle, 1),
        log_format=t.choice("log_format", d.log_format, LOG_FORMATS),
        shutdown_timeout=t.duration("shutdown_timeout", d.shutdown_timeout),
        env_file=env_file,
    )


def _api(t: _Table, ctx: _Context) -> ApiSettings | None:
    """``listen = "host:port"`` (``[::1]:8025`` for IPv6); no ``[api]`` table: no API."""
    t.check_keys(("listen", "tls_cert", "tls_key"))
    if not t.data:
        return None
    listen = t.string("listen")
    host, colon, port_text = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise t.error("listen", f'expected "host:port" such as "127.0.0.1:8025", got {listen!r}')
    paths = {key: t.optional_string(key) for key in ("tls_cert", "tls_key")}
    given = [key for key, value in paths.items() if value is not None]
    if len(given) == 1:
        other = "tls_key" if given[0] == "tls_cert" else "tls_cert"
        raise t.error(other, f"{given[0]} is set: HTTPS needs both tls_cert and tls_key")
    cert, key = (ctx.resolve(v) if v else None for v in paths.values())
    return ApiSettings(host, int(port_text), cert, key)


def _account(raw: object, index: int, ctx: _Context, earlier: list[Account]) -> Account:
    where = f"accounts[{index}]"
    if not isinstance(raw, dict):
        message = f"expected a table ([[accounts]]), got {_type_name(raw)}"
        raise ConfigError(message, file=ctx.file, key_path=where)
    name = _Table(raw, ctx.file, where).string("name")
    if not _NAME_RE.fullmatch(name):
        message = f"expected letters, digits and . _ @ - only, got {name!r}"
        raise ConfigError(message, file=ctx.file, key_path=f"{where}.name")
    t = _Table(raw, ctx.file, f'{where} ("{name}")')
    if any(a.name == name for a in earlier):
        raise t.error("name", "duplicate account name; names are unique (they key the ledger)")
    t.check_keys(_ACCOUNT_KEYS)
    transport = _transport(t, ctx, _POP3_PORTS, "tls")
    leave_on_server = t.boolean("leave_on_server", True)
    if str(transport["username"]).startswith(RECENT_PREFIX) and not leave_on_server:
        raise t.error(
            "leave_on_server",
            "must stay true with a recent: username: Gmail recent: mode returns the last "
            "30 days to every client; deleting there removes mail other clients still expect",
        )
    if str(transport["username"]).startswith(RECENT_PREFIX) and t.data.get("delete_after_days"):
        raise t.error(
            "delete_after_days",
            "must be 0 with a recent: username: Gmail recent: mode returns the last 30 days "
            "to every client; deleting there removes mail other clients still expect",
        )
    sharing = t.choice("sharing", "private", SHARING_MODES)
    primary = t.boolean("primary", False)
    owner = t.string("owner")
    if primary and any(a.primary and a.owner == owner for a in earlier):
        raise t.error("primary", f"owner {owner!r} already has a primary account; keep one")
    from_address = t.optional_string("from_address")
    if from_address is not None and not _ADDRESS_RE.fullmatch(from_address):
        raise t.error("from_address", f"expected an address like a@b.example, got {from_address!r}")
    aliases = _aliases(t)
    smtp_table = t.table("smtp")
    login = str(transport["username"]).removeprefix(RECENT_PREFIX)
    if "smtp" in t.data and from_address is None and "@" not in login:
        # Mail would go out as "From: bob": refused by most servers, unanswerable by all.
        raise t.error(
            "from_address",
            f"the account sends mail ([accounts.smtp]) but its login {login!r} is not an "
            'address; set from_address = "you@your.domain"',
        )
    return Account(
        name=name,
        owner=owner,
        **transport,
        leave_on_server=leave_on_server,
        delete_after_days=t.integer("delete_after_days", 0, 0),
        sharing=sharing,
        excluded_domains=_excluded_domains(t, sharing),
        magnet_label=t.optional_string("magnet_label"),
        from_address=from_address,
        aliases=aliases,
        primary=primary,
        poll_interval=t.duration("poll_interval", 0) if "poll_interval" in t.data else None,
        max_message_size=t.size("max_message_size"),
        smtp=_smtp(smtp_table, ctx) if "smtp" in t.data else None,
    )


def stored_account(
    table: Mapping[str, Any], base: Path, earlier: Sequence[Account] = ()
) -> Account:
    """An account kept in the database (``mailingest accounts``), validated exactly as a
    ``[[accounts]]`` table; its passwords are ``Secret`` values in the table. Errors name
    the account and the key, as for the file."""
    name = table.get("name", "?")
    ctx = _Context(f"account {name!r} in the database", base, {})
    return _account(dict(table), 0, ctx, list(earlier))


def with_accounts(config: Config, more: Sequence[Account]) -> Config:
    """The config with ``more`` accounts after its own."""
    return dataclasses.replace(config, accounts=(*config.accounts, *more))


def _smtp(t: _Table, ctx: _Context) -> SmtpSettings:
    t.check_keys(_SMTP_KEYS)
    daily_limit = t.integer("daily_limit", 0, 1) if "daily_limit" in t.data else None
    return SmtpSettings(**_transport(t, ctx, _SMTP_PORTS, "starttls"), daily_limit=daily_limit)


def _transport(t: _Table, ctx: _Context, ports: dict[str, int], security: str) -> dict[str, Any]:
    """The keys POP3 and SMTP share: where to connect, how, and as whom."""
    host = t.string("host")
    if any(c.isspace() for c in host):
        raise t.error("host", f"expected a host name or address, got {host!r}")
    security = t.choice("security", security, SECURITY_MODES)
    allow_plaintext = t.boolean("allow_plaintext", False)
    if security == "plain" and not allow_plaintext:
        raise t.error(
            "security",
            'security = "plain" sends the password unencrypted; use "tls" or "starttls", '
            "or set allow_plaintext = true (a local test server)",
        )
    username = t.string("username")
    if any(c in username for c in "\r\n\0"):
        raise t.error("username", "contains a line break or NUL; remove it")
    if username == RECENT_PREFIX:
        raise t.error("username", 'expected "recent:" followed by the address')
    ca_text = t.optional_string("ca_file")
    ca_file = ctx.resolve(ca_text) if ca_text is not None else None
    if ca_file is not None and not ca_file.is_file():
        raise t.error("ca_file", f"{ca_file} does not exist; fix the path or remove the key")
    return {
        "host": host,
        "port": t.integer("port", ports[security], 1, 65535),
        "security": security,
        "username": username,
        "password": _secret(t, "password", ctx, lazy=True),
        "allow_plaintext": allow_plaintext,
        "ca_file": ca_file,
        "tls_verify": t.boolean("tls_verify", True),
        "timeout": t.duration("timeout", 60.0),
    }


def _aliases(t: _Table) -> tuple[str, ...]:
    raw = t.data.get("aliases", [])
    if not isinstance(raw, list):
        raise t.error("aliases", f"expected an array of addresses, got {_type_name(raw)}")
    found: list[str] = []
    for i, item in enumerate(raw):
        if not isinstance(item, str) or not _ADDRESS_RE.fullmatch(item.strip()):
            raise t.error(f"aliases[{i}]", f"expected an address like a@b.example, got {item!r}")
        if item.strip() not in found:
            found.append(item.strip())
    return tuple(found)


def _excluded_domains(t: _Table, sharing: str) -> tuple[str, ...]:
    raw = t.data.get("excluded_domains", [])
    if not isinstance(raw, list):
        raise t.error("excluded_domains", f"expected an array of domains, got {_type_name(raw)}")
    domains: list[str] = []
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise t.error(f"excluded_domains[{i}]", f"expected a string, got {_type_name(item)}")
        domain = item.strip().lower().removeprefix("@")
        if not _plausible_domain(domain):
            raise t.error(f"excluded_domains[{i}]", f"expected a domain like x.example: {item!r}")
        if domain not in domains:
            domains.append(domain)
    if domains and sharing != "public":
        raise t.error("excluded_domains", 'only applies with sharing = "public"; remove it')
    if len(domains) > MAX_EXCLUDED_DOMAINS:
        raise t.error("excluded_domains", f"at most {MAX_EXCLUDED_DOMAINS}, got {len(domains)}")
    return tuple(domains)


def _plausible_domain(domain: str) -> bool:
    """Two or more DNS labels; Unicode domains are checked in their IDNA form."""
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_domain.split(".")
    return len(labels) >= 2 and all(_LABEL_RE.fullmatch(label) for label in labels)


def _secret(
    t: _Table,
    key: str,
    ctx: _Context,
    *,
    lazy: bool = False,
    check: Callable[[Secret], Secret] | None = None,
) -> Secret:
    """A literal string or exactly one of { env | file | credential }; errors never show it.

    ``lazy``: where the context defers secrets, read it at first use instead of now."""
    if key not in t.data:
        raise t.error(key, f'missing required key; add {key} = {{ env = "VAR" }} (or file, ...)')
    raw = t.data[key]
    if isinstance(raw, Secret):  # an account kept in the database: already opened, or lazy
        return _checked(t, key, raw) if raw.resolved else raw
    if isinstance(raw, str):
        ctx.literals.append(t.path(key))
        secret = _checked(t, key, Secret("literal", "", raw))
        return check(secret) if check else secret
    if not isinstance(raw, dict):
        got = _type_name(raw)
        raise t.error(key, f'expected a string or {{ env = "VAR" }}, {{ file = ... }}, got {got}')
    sub = _Table(raw, ctx.file, t.path(key))
    sub.check_keys(_SECRET_KEYS)
    if len(raw) != 1:
        raise t.error(key, "expected exactly one of env, file, credential")
    source = next(iter(raw))
    ref = sub.string(source)

    def read() -> Secret:
        secret = _read_secret(t, key, ctx, source, ref)
        return check(secret) if check else secret

    if lazy and ctx.defer:
        shown = str(ctx.resolve(ref)) if source == "file" else ref
        return Secret(source, shown, "", resolver=lambda: read().value)
    return read()


def _read_secret(t: _Table, key: str, ctx: _Context, source: str, ref: str) -> Secret:
    if source == "env":
        if ctx.env_error is not None:
            raise ctx.env_error
        if ref in ctx.env_file:
            return _checked(t, key, Secret("env", ref, ctx.env_file[ref]))
        if ref in ctx.environ:
            return _checked(t, key, Secret("env", ref, ctx.environ[ref]))
        if ctx.env_path is not None:
            raise t.error(
                key, f"{ref} is neither in daemon.env_file ({ctx.env_path}) nor in the environment"
            )
        raise t.error(key, f"environment variable {ref} is not set; set it or use {{ file = ... }}")
    if source == "file":
        path = ctx.resolve(ref)
    else:
        directory = ctx.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise t.error(key, f"credential {ref!r} needs $CREDENTIALS_DIRECTORY (LoadCredential=)")
        if "/" in ref or ref in (".", ".."):
            raise t.error(key, f"expected a credential name without '/', got {ref!r}")
        path = Path(directory) / ref
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise t.error(key, f"cannot read {source} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise t.error(key, f"{source} {path} is not valid UTF-8") from exc
    # One trailing newline is how editors and `echo` end a file; it is not part of the password.
    text = text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
    return _checked(t, key, Secret(source, ref if source == "credential" else str(path), text))


def _checked(t: _Table, key: str, secret: Secret) -> Secret:
    if not secret.value:
        raise t.error(key, f"the password ({secret.describe()}) is empty")
    if "\r" in secret.value or "\n" in secret.value:
        raise t.error(
            key,
            f"the password ({secret.describe()}) contains a line break; POP3 servers such as "
            "Gmail answer +OK and then desynchronise; remove it",
        )
    if "\0" in secret.value:
        raise t.error(key, f"the password ({secret.describe()}) contains a NUL byte; remove it")
    try:
        secret.value.encode("utf-8")
    except UnicodeEncodeError:  # an environment variable holding bytes that are not UTF-8
        raise t.error(key, f"the password ({secret.describe()}) is not valid UTF-8 text") from None
    return secret


def render_config(config: Config) -> str:
    """The effective config as TOML: defaults filled in, paths resolved, secrets described."""
    lines = [f"# effective configuration of {_toml_str(str(config.path))}", "", "[storage]"]
    lines += _render_fields(config.storage)
    lines += ["", "[daemon]", *_render_fields(config.daemon)]
    if config.api is not None:
        lines += ["", "[api]", *_render_fields(config.api)]
    for account in config.accounts:
        lines += ["", "[[accounts]]", *_render_fields(account)]
        if account.smtp is not None:
            lines += ["", "[accounts.smtp]", *_render_fields(account.smtp)]
    return "\n".join(lines) + "\n"


_UNSET = {
    "ca_file": "the system CA store",
    "daily_limit": "no limit",
    "magnet_label": "no label",
    "from_address": "the identity",
    "poll_interval": "the [daemon] poll_interval",
    "env_file": "{ env } secrets come from the process environment only",
    "tls_cert": "plain HTTP",
    "tls_key": "plain HTTP",
}


def _render_fields(obj: Any) -> list[str]:
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "smtp":
            continue
        if value is None:
            lines.append(f"# {f.name}: not set ({_UNSET.get(f.name, 'default')})")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    return lines


def _toml_value(value: object) -> str:
    if isinstance(value, Secret):
        return value.describe()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):  # every float in the config is a duration
        return _format_duration(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_str(str(value))


def _format_duration(seconds: float) -> str:
    if not seconds.is_integer():
        return repr(seconds)
    rest, parts = int(seconds), []
    for unit, size in _UNIT_SECONDS.items():
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return _toml_str("".join(parts) or "0s")


def _toml_str(text: str) -> str:
    """A TOML basic string: JSON's escapes are valid TOML; DEL must be escaped too."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
