"""Is the store there, and does it take writes? For the API's /healthz and /readyz."""

from __future__ import annotations

from mailingest.store._db import Database

#: The row the write check rewrites (store_meta also keeps the accounts' version).
_PROBE = "health_probe"


async def check_reachable(db: Database) -> None:
    """One read round trip; raises StoreError if it fails."""
    async with db.statement("checking the store", write=False):
        await db.fetchone("SELECT 1")


async def check_writable(db: Database) -> None:
    """One committed write (a read-only file, a full disk or a lost lock fail it)."""
    async with db.write("checking the store takes writes"):
        await db.execute(
            "INSERT INTO store_meta (key, value) VALUES (?, 0)"
            " ON CONFLICT (key) DO UPDATE SET value = 0",
            (_PROBE,),
        )
