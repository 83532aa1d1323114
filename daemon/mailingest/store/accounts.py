"""Accounts kept in the database, and the version number that tells daemons they changed."""

from __future__ import annotations

import json

from mailingest.model import SettingsChange, StoredAccount
from mailingest.store._db import Database, now_iso

_VERSION = "accounts_version"


async def stored_accounts(db: Database) -> tuple[int, list[StoredAccount]]:
    """The version and every stored account, read in one snapshot."""
    async with db.read("reading the stored accounts"):
        version = await _version(db)
        rows = await db.fetchall(
            "SELECT name, owner, settings, password, smtp_password FROM accounts ORDER BY name"
        )
    return version, [StoredAccount(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]


async def accounts_version(db: Database) -> int:
    """Bumped by every change of a stored account: a daemon polls this one row."""
    async with db.read("reading the accounts version"):
        return await _version(db)


async def add_account(
    db: Database, account: StoredAccount, change: SettingsChange | None = None
) -> bool:
    """Store a new account (``change``: who asked, for the audit); False if one of that
    name is stored already."""
    now = now_iso()
    async with db.write(f"storing account {account.name!r}"):
        added = await db.execute(
            "INSERT INTO accounts (name, owner, settings, password, smtp_password, created_at,"
            " updated_at, changed_by, changed_to) VALUES (?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT DO NOTHING",
            (
                account.name,
                account.owner,
                json.dumps(account.settings, sort_keys=True),
                account.password,
                account.smtp_password,
                now,
                now,
                change.actor if change else None,
                change.snapshot if change else None,
            ),
        )
        if added:
            await _bump(db)
    return added == 1


async def update_account(
    db: Database, account: StoredAccount, change: SettingsChange | None = None
) -> bool:
    """Replace a stored account's settings and passwords; False if there is none.
    ``change``: who asked for new sharing settings (None: they are not new; whoever asked
    for them before is still the one to audit)."""
    async with db.write(f"changing account {account.name!r}"):
        if change is not None:
            await db.execute(
                "UPDATE accounts SET changed_by = ?, changed_to = ? WHERE name = ?",
                (change.actor, change.snapshot, account.name),
            )
        changed = await db.execute(
            "UPDATE accounts SET owner = ?, settings = ?, password = ?, smtp_password = ?,"
            " updated_at = ? WHERE name = ?",
            (
                account.owner,
                json.dumps(account.settings, sort_keys=True),
                account.password,
                account.smtp_password,
                now_iso(),
                account.name,
            ),
        )
        if changed:
            await _bump(db)
    return changed == 1


async def remove_account(db: Database, name: str) -> bool:
    """Forget a stored account (its stored mail stays) and its OAuth2 refresh tokens (an
    account added later under the name is someone else's); False if there is none."""
    async with db.write(f"removing account {name!r}"):
        removed = await db.execute("DELETE FROM accounts WHERE name = ?", (name,))
        if removed:
            await db.execute("DELETE FROM oauth_tokens WHERE account = ?", (name,))
            await _bump(db)
    return removed == 1


async def _version(db: Database) -> int:
    row = await db.fetchone("SELECT value FROM store_meta WHERE key = ?", (_VERSION,))
    return int(row[0]) if row else 0


async def _bump(db: Database) -> None:
    await db.execute(
        "INSERT INTO store_meta (key, value) VALUES (?, 1)"
        " ON CONFLICT (key) DO UPDATE SET value = store_meta.value + 1",
        (_VERSION,),
    )
    await db.notify("mailingest_accounts")
