"""Bearer tokens of the HTTP API: created, looked up by their hash, listed, revoked."""

from __future__ import annotations

import functools

from mailingest.model import ApiToken
from mailingest.store._db import Database, Reader, Row, now_iso

_COLUMNS = "id, user_name, admin, act_for, label, created_at"


async def add_api_token(
    db: Database, user: str, token_hash: str, *, admin: bool, act_for: bool, label: str
) -> ApiToken:
    async with db.write("creating an API token"):
        await db.execute(
            "INSERT INTO api_tokens (user_name, token_hash, admin, act_for, label, created_at)"
            " VALUES (?,?,?,?,?,?)",
            (user, token_hash, int(admin), int(act_for), label, now_iso()),
        )
        row = await db.fetchone(
            f"SELECT {_COLUMNS} FROM api_tokens WHERE token_hash = ?", (token_hash,)
        )
    assert row is not None
    return _token(row)


async def api_token(db: Database, token_hash: str) -> ApiToken | None:
    """The token whose SHA-256 is ``token_hash``, if it exists (not revoked)."""
    return await db.snapshot(
        "reading an API token", functools.partial(lookup, token_hash=token_hash)
    )


def lookup(reader: Reader, *, token_hash: str) -> ApiToken | None:
    """``api_token`` inside a snapshot (another read of the same request may share it)."""
    row = reader.fetchone(f"SELECT {_COLUMNS} FROM api_tokens WHERE token_hash = ?", (token_hash,))
    return _token(row) if row is not None else None


async def api_tokens(db: Database) -> list[ApiToken]:
    async with db.read("listing API tokens"):
        rows = await db.fetchall(f"SELECT {_COLUMNS} FROM api_tokens ORDER BY id")
    return [_token(r) for r in rows]


async def revoke_api_token(db: Database, token_id: int) -> bool:
    """Forget the token: it authenticates nothing from the next request on."""
    async with db.write("revoking an API token"):
        return await db.execute("DELETE FROM api_tokens WHERE id = ?", (token_id,)) > 0


def _token(r: Row) -> ApiToken:
    return ApiToken(int(r[0]), str(r[1]), bool(r[2]), bool(r[3]), str(r[4]), str(r[5]))
