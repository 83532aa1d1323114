"""OAuth2 refresh tokens a provider rotated: kept sealed, so a restart uses the newest."""

from __future__ import annotations

from mailingest.store._db import Database, now_iso


async def rotated_token(db: Database, account: str, service: str, origin: str) -> str | None:
    """The sealed newest refresh token of ``account``'s ``service`` (pop3, smtp), if it
    descends from the configured token ``origin`` fingerprints; a new configured token
    (the user signed in again) makes older rotations void."""
    async with db.statement("reading an OAuth2 token", write=False):
        row = await db.fetchone(
            "SELECT token FROM oauth_tokens WHERE account = ? AND service = ? AND origin = ?",
            (account, service, origin),
        )
    return str(row[0]) if row is not None else None


async def save_rotated_token(
    db: Database, account: str, service: str, origin: str, sealed: str
) -> None:
    """Durably, in one statement: the provider may already have revoked the previous one."""
    async with db.statement("storing an OAuth2 token", write=True):
        await db.execute(
            "INSERT INTO oauth_tokens (account, service, origin, token, updated_at)"
            " VALUES (?,?,?,?,?) ON CONFLICT (account, service) DO UPDATE SET"
            " origin = excluded.origin, token = excluded.token,"
            " updated_at = excluded.updated_at",
            (account, service, origin, sealed, now_iso()),
        )
