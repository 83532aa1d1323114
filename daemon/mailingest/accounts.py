"""Accounts kept in the database (``mailingest accounts``), beside those of the config file.

Users add their own mailbox at run time, as a CRM's "add account, test account, create"
page does; the file's accounts stay as they are. A stored account is validated exactly as an
``[[accounts]]`` table, its passwords are sealed with ``[storage] secret_key``, and a running
daemon picks a change up within seconds (it watches the store's accounts version).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mailingest.config import Account, Config, Secret, Taken, stored_account, with_accounts
from mailingest.crm import settings_snapshot
from mailingest.crypto import SecretBox
from mailingest.errors import ConfigError, DataError, UsageError
from mailingest.logs import get_logger
from mailingest.model import SettingsChange, Status, StoredAccount
from mailingest.store import Store

log = get_logger("mailingest.accounts")

#: Keys of an account table that the database row keeps apart from the settings.
_APART = ("name", "owner", "password")


async def with_stored(store: Store, config: Config, *, secrets: bool = True) -> tuple[int, Config]:
    """The config with the database's accounts after the file's, and the accounts version.

    A stored account that the file shadows (same name) or that no longer validates is
    skipped with an error event; a missing or wrong ``secret_key`` is a ConfigError (78).
    ``secrets=False``: passwords are opened at first use (see load_config), and only then
    is the key needed.
    """
    version, stored = await store.stored_accounts()
    if not stored:
        return version, config
    box = _Box(config, len(stored))
    if secrets:
        box.get()
    extra: list[Account] = []
    in_file = {a.name for a in config.accounts}
    taken = Taken(config.accounts)
    for row in stored:
        if row.name in in_file:
            _skipped(row.name, "the config file defines an account of this name; it wins")
            continue
        try:
            account = await asyncio.to_thread(_account, row, box, config, taken, secrets)
            extra.append(taken.add(account))
        except ConfigError as exc:
            if exc.key_path == "storage.secret_key":
                raise
            _skipped(row.name, str(exc))
    return version, with_accounts(config, extra)


async def effective_config(config: Config, *, secrets: bool = True) -> Config:
    """``config`` with the database's accounts (for a one-shot command)."""
    storage = config.storage
    store = await Store.open(storage.database, password=storage.reveal_password())
    try:
        return (await with_stored(store, config, secrets=secrets))[1]
    finally:
        await store.close()


def secret_box(config: Config, stored: int | None = None) -> SecretBox:
    key = config.storage.secret_key
    if key is None:
        held = f"the database holds {stored} accounts whose" if stored else "accounts kept in"
        raise ConfigError(
            f"missing: {held} passwords are sealed with it; set secret_key = "
            '{ credential = "..." } (or env, file) in [storage]',
            file=str(config.path),
            key_path="storage.secret_key",
        )
    return SecretBox(key.reveal())


class _Box:
    """The SecretBox of ``[storage] secret_key``, made when first needed."""

    def __init__(self, config: Config, stored: int) -> None:
        self._config, self._stored = config, stored
        self._box: SecretBox | None = None

    def get(self) -> SecretBox:
        if self._box is None:
            self._box = secret_box(self._config, self._stored)
        return self._box

    def secret(self, name: str, sealed: str, what: str, now: bool) -> Secret:
        if now:
            return Secret("database", name, self.get().open(sealed, what))
        return Secret("database", name, "", resolver=lambda: self.get().open(sealed, what))


def _account(
    row: StoredAccount, box: _Box, config: Config, earlier: Taken, now: bool = True
) -> Account:
    table = dict(row.settings)
    table.update(name=row.name, owner=row.owner)
    _put_secret(table, box.secret(row.name, row.password, f"{row.name!r}", now))
    if row.smtp_password is not None and isinstance(table.get("smtp"), dict):
        smtp = box.secret(row.name, row.smtp_password, f"{row.name!r} (SMTP)", now)
        table["smtp"] = {**table["smtp"], "password": smtp}
    return stored_account(table, config.path.parent, earlier, config.storage.secret_key)


def _put_secret(table: dict[str, Any], secret: Secret) -> None:
    """The sealed secret of a stored account is its POP3 password, or, for an account that
    signs in with OAuth2, its client secret (none for a public client: sealed "")."""
    auth = table.get("auth")
    if not (isinstance(auth, dict) and isinstance(auth.get("oauth2"), dict)):
        table["password"] = secret
        return
    # Unopened (a command that signs in nowhere): kept as it is, never asked for.
    if secret.resolved and not secret.value:
        return
    table["auth"] = {"oauth2": {**auth["oauth2"], "client_secret": secret}}


def _skipped(name: str, error: str) -> None:
    log.error("stored_account_skipped", account=name, error=error)


# -- the `accounts` commands -------------------------------------------------------------------


@dataclass(frozen=True)
class NewPasswords:
    """The passwords `accounts add` or `set` was given (None: none, or unchanged)."""

    pop3: str | None = None
    smtp: str | None = None


def validate(
    table: Mapping[str, Any], passwords: NewPasswords, config: Config, others: Sequence[Account]
) -> Account:
    """The account a user asked for, checked as the file's are (65 naming the key if not)."""
    full = dict(table)
    if passwords.pop3 is not None:
        _put_secret(full, Secret("database", str(full.get("name", "")), passwords.pop3))
    if passwords.smtp is not None and isinstance(full.get("smtp"), dict):
        full["smtp"] = {**full["smtp"], "password": Secret("database", "smtp", passwords.smtp)}
    try:
        return stored_account(full, config.path.parent, list(others), config.storage.secret_key)
    except ConfigError as exc:
        where = ": ".join(p for p in (exc.key_path, exc.message) if p)
        raise DataError(f"account {full.get('name', '?')!r}: {where}") from exc


def to_row(table: Mapping[str, Any], passwords: NewPasswords, box: SecretBox) -> StoredAccount:
    """The row to store: the settings without name, owner and passwords; those sealed
    (an OAuth2 account's "password" is its client secret, "" for a public client)."""
    assert passwords.pop3 is not None
    settings = {k: v for k, v in table.items() if k not in _APART}
    if isinstance(settings.get("smtp"), dict):
        settings["smtp"] = {k: v for k, v in settings["smtp"].items() if k != "password"}
    return StoredAccount(
        name=str(table["name"]),
        owner=str(table["owner"]),
        settings=settings,
        password=box.seal(passwords.pop3),
        smtp_password=box.seal(passwords.smtp) if passwords.smtp is not None else None,
    )


def stored_table(row: StoredAccount) -> dict[str, Any]:
    """A stored account as the table a user would have written (no passwords)."""
    return {"name": row.name, "owner": row.owner, **row.settings}


def opened(row: StoredAccount, box: SecretBox) -> NewPasswords:
    smtp = box.open(row.smtp_password, f"{row.name!r} (SMTP)") if row.smtp_password else None
    return NewPasswords(box.open(row.password, repr(row.name)), smtp)


def not_stored(name: str, config: Config) -> UsageError:
    if any(a.name == name for a in config.accounts):
        return UsageError(
            f"account {name!r} is defined in the config file {config.path}; change it there"
        )
    return UsageError(f"no account {name!r} in the database; see `mailingest accounts list`")


@contextlib.asynccontextmanager
async def _opened(config: Config, store: Store | None) -> AsyncIterator[Store]:
    """``store`` if given (the daemon's, for the API), else the config's, opened for this."""
    if store is not None:
        yield store
        return
    from mailingest import commands

    async with commands.open_store(config) as opened:
        yield opened


async def add(
    config: Config,
    table: dict[str, Any],
    passwords: NewPasswords,
    *,
    test: bool,
    store: Store | None = None,
    actor: str | None = None,
) -> dict[str, Any]:
    """Validate, test (as `check` does) unless told not to, then store: nothing is stored
    for an account that fails its test. ``added`` says which. ``actor``: who asks, for the
    audit of its sharing settings (see change)."""
    from mailingest import commands

    box = secret_box(config)
    name = str(table.get("name", ""))
    async with _opened(config, store) as store:
        _, current = await with_stored(store, config)
        if any(a.name == name for a in current.accounts):
            raise UsageError(f"account {name!r} exists already; see `mailingest accounts list`")
        account = validate(table, passwords, config, current.accounts)
        pop3 = await commands.check_pop3_with(account, store) if test else None
        if pop3 is not None and pop3["status"] != Status.OK:
            return {"account": name, "added": False, "pop3": pop3}
        asked = SettingsChange(actor, settings_snapshot(account)) if actor else None
        if not await store.add_account(to_row(table, passwords, box), asked):
            raise UsageError(f"account {name!r} exists already; see `mailingest accounts list`")
    return {"account": name, "added": True, "pop3": pop3}


async def change(
    config: Config,
    name: str,
    changes: dict[str, Any],
    passwords: NewPasswords,
    *,
    client_secret: bool = False,
    store: Store | None = None,
    actor: str | None = None,
) -> dict[str, Any]:
    """Change a stored account's settings (``None`` removes a key) and passwords
    (``client_secret``: ``passwords.pop3`` is an OAuth2 account's client secret).

    ``actor`` (who asks) is kept with new sharing settings: the audit names them when the
    change is applied, often by a running daemon (``daemon`` otherwise)."""
    box = secret_box(config)
    async with _opened(config, store) as store:
        _, stored = await store.stored_accounts()
        row = next((r for r in stored if r.name == name), None)
        if row is None:
            raise not_stored(name, config)
        _, current = await with_stored(store, config)
        table = stored_table(row)
        if passwords.pop3 is not None and client_secret != ("auth" in table):
            wanted = "--client-secret-*" if "auth" in table else "--password-*"
            raise UsageError(f"account {name!r} takes {wanted} (it signs in that way)")
        for key, value in changes.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
        old = opened(row, box)
        new = NewPasswords(passwords.pop3 or old.pop3, passwords.smtp or old.smtp)
        others = [a for a in current.accounts if a.name != name]
        snapshot = settings_snapshot(validate(table, new, config, others))
        before = [settings_snapshot(a) for a in current.accounts if a.name == name]
        asked = SettingsChange(actor, snapshot) if actor and before != [snapshot] else None
        if not await store.update_account(to_row(table, new, box), asked):
            raise not_stored(name, config)
    secret = "client_secret" if client_secret else "password"
    changed = sorted(changes) + ([secret] if passwords.pop3 else [])
    return {"account": name, "changed": changed}


async def remove(config: Config, name: str) -> dict[str, Any]:
    """Forget a stored account: no more polls; the mail it stored stays."""
    from mailingest import commands

    async with commands.open_store(config) as store:
        if not await store.remove_account(name):
            raise not_stored(name, config)
    return {"account": name, "removed": True}


async def listing(config: Config) -> list[dict[str, Any]]:
    full = await effective_config(config)
    from_file = {a.name for a in config.accounts}
    return [
        {
            "account": a.name,
            "owner": a.owner,
            "host": a.host,
            "port": a.port,
            "username": a.username,
            "sharing": a.sharing,
            "primary": a.primary,
            "source": "config" if a.name in from_file else "database",
        }
        for a in full.accounts
    ]
