"""The audit log of sharing changes, and who set a share flag when.

Entries are written by the same transaction as the change and its re-tagging, so the log
never claims a change that did not happen (or misses one that did).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mailingest.model import AuditEntry, ShareFlag
from mailingest.store._db import Database, now_iso


async def add(
    db: Database,
    actor: str,
    action: str,
    *,
    owner: str | None = None,
    account: str | None = None,
    record: str | None = None,
    detail: dict[str, Any] | None = None,
    retagged: int = 0,
) -> None:
    """One entry; inside the caller's write transaction."""
    await db.execute(
        "INSERT INTO audit (at, actor, action, owner, account, record, detail, retagged)"
        " VALUES (?,?,?,?,?,?,?,?)",
        (
            now_iso(),
            actor,
            action,
            owner,
            account,
            record,
            json.dumps(detail or {}, sort_keys=True),
            retagged,
        ),
    )


async def entries(
    db: Database,
    *,
    owner: str | None = None,
    account: str | None = None,
    record: str | None = None,
    limit: int | None = None,
) -> list[AuditEntry]:
    """Newest first, optionally those of one owner, account or record."""
    sql = "SELECT id, at, actor, action, owner, account, record, detail, retagged FROM audit"
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("owner", owner), ("account", account), ("record", record)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC"
    if limit:
        sql += f" LIMIT {int(limit)}"
    async with db.read("reading the audit log"):
        rows = await db.fetchall(sql, args)
    return [
        AuditEntry(
            id=int(r[0]),
            at=r[1],
            actor=r[2],
            action=r[3],
            owner=r[4],
            account=r[5],
            record=r[6],
            detail=json.loads(r[7]),
            retagged=int(r[8]),
        )
        for r in rows
    ]


async def share_flags(db: Database, owner: str, records: Sequence[str]) -> list[ShareFlag]:
    """The owner's share flags among ``records``, with who set each and when."""
    async with db.read("reading share flags"):
        rows = await db.fetch_in(
            "SELECT record, set_by, set_at FROM shares WHERE owner = ? AND record IN ({marks})"
            " ORDER BY record",
            list(records),
            owner,
        )
    return [ShareFlag(str(r[0]), r[1], r[2]) for r in rows]
