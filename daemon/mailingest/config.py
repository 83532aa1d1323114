"""TOML configuration: loaded into frozen dataclasses, validated and resolved in one place."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mailingest.config_storage import storage_settings
from mailingest.config_values import Context as _Context
from mailingest.config_values import Secret as Secret  # re-exported: the config's own type
from mailingest.config_values import Table as _Table
from mailingest.config_values import parse_duration as parse_duration
from mailingest.config_values import secret as _secret
from mailingest.config_values import type_name as _type_name
from mailingest.envfile import EnvFileError, read_env_file
from mailingest.errors import ConfigError
from mailingest.settings import RECENT_PREFIX as RECENT_PREFIX
from mailingest.settings import Account as Account
from mailingest.settings import ApiSettings as ApiSettings
from mailingest.settings import Config as Config
from mailingest.settings import DaemonSettings as DaemonSettings
from mailingest.settings import SmtpSettings as SmtpSettings
from mailingest.settings import StorageSettings as StorageSettings

DEFAULT_CONFIG_PATH = Path("/etc/mailingest/mailingest.toml")
MAX_EXCLUDED_DOMAINS = 5
SECURITY_MODES = ("tls", "starttls", "plain")
SHARING_MODES = ("private", "custom", "public")
LOG_FORMATS = ("auto", "json", "console")
_POP3_PORTS = {"tls": 995, "starttls": 110, "plain": 110}
_SMTP_PORTS = {"tls": 465, "starttls": 587, "plain": 25}

#: ``[api] processes`` at most: one per core is the point, and each holds a store connection.
MAX_API_PROCESSES = 16
_TOP_KEYS = ("storage", "daemon", "accounts", "api")
_DAEMON_KEYS = (
    "poll_interval max_concurrent max_sessions_per_cycle log_format shutdown_timeout env_file"
)
_TRANSPORT_KEYS = (
    "host port security username password auth allow_plaintext ca_file tls_verify timeout"
)
_SMTP_KEYS = (*_TRANSPORT_KEYS.split(), "daily_limit")
_ACCOUNT_KEYS = (
    *_TRANSPORT_KEYS.split(),
    *"name owner leave_on_server delete_after_days sharing excluded_domains magnet_label".split(),
    *"from_address aliases primary poll_interval max_message_size smtp".split(),
)

_NAME_RE = re.compile(r"[A-Za-z0-9._@-]+")
_ADDRESS_RE = re.compile(r"[^@\s]+@[^@\s]+")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def resolve_config_path(cli_value: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """-c/--config, else $MAILINGEST_CONFIG, else the system default."""
    env = os.environ if environ is None else environ
    return Path(cli_value or env.get("MAILINGEST_CONFIG") or DEFAULT_CONFIG_PATH)


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
    storage = storage_settings(root.table("storage"), ctx)
    raw_accounts = data.get("accounts", [])
    if not isinstance(raw_accounts, list):
        raise root.error("accounts", "expected an array of tables ([[accounts]])")
    accounts: list[Account] = []
    taken = Taken()
    for index, raw in enumerate(raw_accounts):
        accounts.append(taken.add(_account(raw, index, ctx, taken, storage.secret_key)))
    # Like fetchmail: a password others can read is a leaked password.
    if ctx.literals and mode & 0o077:
        raise ConfigError(
            f"holds a literal password ({ctx.literals[0]}) and is readable by group/others "
            f"(mode {mode & 0o777:03o}); chmod 600 it or use {{ env = ... }} / "
            "{ file = ... } / { credential = ... }",
            file=file,
        )
    return Config(path, storage, daemon, tuple(accounts), _api(root.table("api"), ctx))


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
    t.check_keys(("listen", "tls_cert", "tls_key", "processes"))
    if not t.data:
        return None
    listen = t.string("listen")
    host, colon, port_text = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    digits = port_text.isascii() and port_text.isdigit()
    if not colon or not host or not digits or not 0 < int(port_text) < 65536:
        raise t.error("listen", f'expected "host:port" such as "127.0.0.1:8025", got {listen!r}')
    paths = {key: t.optional_string(key) for key in ("tls_cert", "tls_key")}
    given = [key for key, value in paths.items() if value is not None]
    if len(given) == 1:
        other = "tls_key" if given[0] == "tls_cert" else "tls_cert"
        raise t.error(other, f"{given[0]} is set: HTTPS needs both tls_cert and tls_key")
    cert, key = (ctx.resolve(v) if v else None for v in paths.values())
    processes = t.integer("processes", 1, 1, MAX_API_PROCESSES)
    return ApiSettings(host, int(port_text), cert, key, processes)


def _account(
    raw: object,
    index: int,
    ctx: _Context,
    taken: Taken,
    seal_key: Secret | None = None,
) -> Account:
    where = f"accounts[{index}]"
    if not isinstance(raw, dict):
        message = f"expected a table ([[accounts]]), got {_type_name(raw)}"
        raise ConfigError(message, file=ctx.file, key_path=where)
    name = _Table(raw, ctx.file, where).string("name")
    if not _NAME_RE.fullmatch(name):
        message = f"expected letters, digits and . _ @ - only, got {name!r}"
        raise ConfigError(message, file=ctx.file, key_path=f"{where}.name")
    t = _Table(raw, ctx.file, f'{where} ("{name}")')
    if name in taken.names:
        raise t.error("name", "duplicate account name; names are unique (they key the ledger)")
    t.check_keys(_ACCOUNT_KEYS)
    transport = _transport(t, ctx, _POP3_PORTS, "tls", "pop3", seal_key)
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
    if primary and owner in taken.primary_owners:
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
        smtp=_smtp(smtp_table, ctx, seal_key) if "smtp" in t.data else None,
    )


class Taken:
    """The names, and the owners with a primary account, of the accounts read before the
    one being read: each check is a set lookup, so ten thousand accounts load in linear
    time (a scan of the earlier ones took seconds)."""

    def __init__(self, accounts: Iterable[Account] = ()) -> None:
        self.names: set[str] = set()
        self.primary_owners: set[str] = set()
        for account in accounts:
            self.add(account)

    def add(self, account: Account) -> Account:
        self.names.add(account.name)
        if account.primary:
            self.primary_owners.add(account.owner)
        return account


def stored_account(
    table: Mapping[str, Any],
    base: Path,
    earlier: Sequence[Account] | Taken = (),
    seal_key: Secret | None = None,
) -> Account:
    """An account kept in the database (``mailingest accounts``), validated exactly as a
    ``[[accounts]]`` table; its passwords are ``Secret`` values in the table. Errors name
    the account and the key, as for the file."""
    name = table.get("name", "?")
    ctx = _Context(f"account {name!r} in the database", base, {})
    taken = earlier if isinstance(earlier, Taken) else Taken(earlier)
    return _account(dict(table), 0, ctx, taken, seal_key)


def with_accounts(config: Config, more: Sequence[Account]) -> Config:
    """The config with ``more`` accounts after its own."""
    return dataclasses.replace(config, accounts=(*config.accounts, *more))


def _smtp(t: _Table, ctx: _Context, seal_key: Secret | None) -> SmtpSettings:
    t.check_keys(_SMTP_KEYS)
    daily_limit = t.integer("daily_limit", 0, 1) if "daily_limit" in t.data else None
    transport = _transport(t, ctx, _SMTP_PORTS, "starttls", "smtp", seal_key)
    return SmtpSettings(**transport, daily_limit=daily_limit)


def _transport(
    t: _Table,
    ctx: _Context,
    ports: dict[str, int],
    security: str,
    service: str,
    seal_key: Secret | None,
) -> dict[str, Any]:
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
    auth = None
    if "auth" in t.data:  # config_auth.py (a dataclass, URL checks) only where it is used
        from mailingest.config_auth import parse_auth

        auth = parse_auth(t, ctx, service=service, username=username, seal_key=seal_key)
    if auth is not None and "password" in t.data:
        raise t.error("password", "not used with auth = { oauth2 = ... }; remove it")
    ca_text = t.optional_string("ca_file")
    ca_file = ctx.resolve(ca_text) if ca_text is not None else None
    if ca_file is not None and not ca_file.is_file():
        raise t.error("ca_file", f"{ca_file} does not exist; fix the path or remove the key")
    return {
        "host": host,
        "port": t.integer("port", ports[security], 1, 65535),
        "security": security,
        "username": username,
        "password": _secret(t, "password", ctx, lazy=True) if auth is None else None,
        "auth": auth,
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
