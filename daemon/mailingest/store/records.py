"""CRM records, their addresses and share flags, message links, and re-tagging."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any

from mailingest.model import AccountPolicy, Record
from mailingest.store import _audit as audit
from mailingest.store._db import Database, domain, facts, linked_to, now_iso, parts
from mailingest.store._listed import LinkCopies

#: Messages re-tagged per query: memory stays bounded for large accounts.
_PAGE = 5000


async def records(db: Database) -> list[Record]:
    async with db.read("reading records"):
        rows = await db.fetchall("SELECT id, kind, name FROM records ORDER BY id")
        emails = await db.fetchall("SELECT record, email FROM record_emails ORDER BY email")
    by_record: dict[str, list[str]] = {}
    for record, email in emails:
        by_record.setdefault(record, []).append(email)
    return [Record(r[0], r[1], r[2], tuple(by_record.get(r[0], ()))) for r in rows]


async def import_records(
    db: Database, found: Sequence[Record], policies: dict[str, AccountPolicy]
) -> int:
    """Upsert records (their address sets replaced) and link stored mail, atomically."""
    async with _retagging(db, "importing records"):
        for record in found:
            await db.execute(
                "INSERT INTO records (id, kind, name) VALUES (?,?,?) ON CONFLICT (id)"
                " DO UPDATE SET kind = excluded.kind, name = excluded.name",
                (record.id, record.kind, record.name),
            )
            await _replace_emails(db, record.id, record.emails, policies)
        # In parts: one IN list of every id would be re-evaluated for each re-tag page.
        for part in parts([r.id for r in found]):
            await _retag(db, linked_to(len(part)), part, policies)
    return len(found)


async def create_record(
    db: Database, record: Record, policies: dict[str, AccountPolicy]
) -> int | None:
    """A new record, its stored mail linked and re-tagged at once: how many messages it
    links now (None: the id is taken, nothing changed)."""
    async with _retagging(db, "creating a record"):
        if await db.fetchone("SELECT 1 FROM records WHERE id = ?", (record.id,)) is not None:
            return None
        await db.execute(
            "INSERT INTO records (id, kind, name) VALUES (?,?,?)",
            (record.id, record.kind, record.name),
        )
        await _replace_emails(db, record.id, record.emails, policies)
        await _retag(db, linked_to(1), [record.id], policies)
        row = await db.fetchone(
            "SELECT count(*) FROM message_records WHERE record = ?", (record.id,)
        )
    return int(row[0]) if row is not None else 0


async def set_record_emails(
    db: Database, record: str, emails: Sequence[str], policies: dict[str, AccountPolicy]
) -> bool:
    """Address change: links stay, stored mail from the new addresses links now."""
    async with _retagging(db, "changing record addresses"):
        if await db.fetchone("SELECT 1 FROM records WHERE id = ?", (record,)) is None:
            return False
        await _replace_emails(db, record, emails, policies)
        await _retag(db, linked_to(1), [record], policies)
    return True


async def set_share(
    db: Database,
    owner: str,
    record: str,
    on: bool,
    policies: dict[str, AccountPolicy],
    actor: str,
) -> bool:
    """Toggle the owner's custom-mode share flag and re-tag that mail, atomically; the
    change (if it is one) goes to the audit log in the same transaction."""
    async with _retagging(db, "changing a share flag"):
        if await db.fetchone("SELECT 1 FROM records WHERE id = ?", (record,)) is None:
            return False
        if on:
            changed = await db.execute(
                "INSERT INTO shares (owner, record, set_by, set_at) VALUES (?,?,?,?)"
                " ON CONFLICT DO NOTHING",
                (owner, record, actor, now_iso()),
            )
        else:
            changed = await db.execute(
                "DELETE FROM shares WHERE owner = ? AND record = ?", (owner, record)
            )
        retagged = await _retag(
            db,
            "m.owner = ? AND m.id IN (SELECT message FROM message_records WHERE record = ?)",
            [owner, record],
            policies,
        )
        if changed:
            action = "share" if on else "unshare"
            await audit.add(db, actor, action, owner=owner, record=record, retagged=retagged)
    return True


async def delete_record(
    db: Database, record: str, policies: dict[str, AccountPolicy], actor: str
) -> bool:
    """Forget a record, its addresses, links and share flags; its mail re-tagged (and
    unlabelled where linked to nothing now) in the same transaction. Each share flag it
    drops goes to the audit log as an ``unshare``."""
    async with _retagging(db, "deleting a record"):
        if await db.fetchone("SELECT 1 FROM records WHERE id = ?", (record,)) is None:
            return False
        linked = [
            int(r[0])
            for r in await db.fetchall(
                "SELECT message FROM message_records WHERE record = ?", (record,)
            )
        ]
        owners = [
            str(r[0])
            for r in await db.fetchall("SELECT owner FROM shares WHERE record = ?", (record,))
        ]
        await db.execute("DELETE FROM shares WHERE record = ?", (record,))
        await db.execute("DELETE FROM message_records WHERE record = ?", (record,))
        await db.execute("DELETE FROM records WHERE id = ?", (record,))
        for label in {p.magnet_label for p in policies.values() if p.magnet_label}:
            for part in parts(linked):
                marks = ",".join("?" * len(part))
                await db.execute(
                    f"DELETE FROM message_labels WHERE label = ? AND message IN ({marks})"
                    " AND NOT EXISTS (SELECT 1 FROM message_records r"
                    " WHERE r.message = message_labels.message)",
                    (label, *part),
                )
        for owner in owners:
            retagged = 0
            for part in parts(linked):
                marks = ",".join("?" * len(part))
                where = f"m.owner = ? AND m.id IN ({marks})"
                retagged += await _retag(db, where, [owner, *part], policies)
            detail = {"record_deleted": True}
            await audit.add(
                db, actor, "unshare", owner=owner, record=record, detail=detail, retagged=retagged
            )
        for part in parts(linked):
            marks = ",".join("?" * len(part))
            await _retag(db, f"m.id IN ({marks})", part, policies)
    return True


async def retag_changed(
    db: Database,
    snapshots: dict[str, str],
    policies: dict[str, AccountPolicy],
    force: Collection[str] = (),
    actor: str = "mailingest",
    actors: Mapping[str, str] | None = None,
) -> list[str]:
    """Re-tag (and re-label) the mail of accounts whose sharing settings changed; a change
    of an account's known settings goes to the audit log, made by ``actors[account]`` if
    named there, else by who asked for these settings of a stored account (its row names
    them until then), else by ``actor``.

    ``force``: accounts re-tagged and re-labelled even if the snapshot matches, because
    mail was stored under other settings after the snapshot was saved (a daemon still
    running with its old config while a CLI command already saved the new one).
    """
    changed: list[str] = []
    async with db.read("reading the sharing settings"):
        rows = await db.fetchall("SELECT account, snapshot, magnet_label FROM account_settings")
    known = {r[0]: (r[1], r[2]) for r in rows}
    todo = {
        name: snap
        for name, snap in snapshots.items()
        if known.get(name) != (snap, policies[name].magnet_label) or name in force
    }
    if not todo:
        return changed
    async with _retagging(db, "re-tagging after a settings change"):
        # Only mail can need new tags or labels: an account without any (every account of a
        # new store, where this ran once per account) just has its settings recorded.
        with_mail = {
            str(r[0])
            for r in await db.fetch_in(
                "SELECT DISTINCT account FROM messages WHERE account IN ({marks})", sorted(todo)
            )
        }
        recorded: list[tuple[str, str, str | None]] = []
        for name, snap in todo.items():
            label = policies[name].magnet_label
            before = known.get(name, (None,))[0]
            retagged = 0
            if name in with_mail:
                await _relabel(db, name, label, known.get(name, (None, None))[1], name in force)
                if name in force or before != snap:
                    retagged = await _retag(db, "m.account = ?", [name], policies)
            if before is not None and before != snap:
                asked = await _asked_by(db, name, snap)
                who = (actors or {}).get(name) or asked or actor
                await _audit_settings(db, who, name, before, snap, retagged)
            recorded.append((name, snap, label))
            changed.append(name)
        await db.executemany(
            "INSERT INTO account_settings (account, snapshot, magnet_label)"
            " VALUES (?,?,?) ON CONFLICT (account) DO UPDATE SET"
            " snapshot = excluded.snapshot, magnet_label = excluded.magnet_label",
            recorded,
        )
    return changed


async def _relabel(
    db: Database, name: str, label: str | None, old_label: str | None, forced: bool
) -> None:
    """The account's customer mail carries its magnet label, and no label it had before."""
    if forced:  # whatever label the mail got: only this one stays
        # (`label <> ?`, not IS DISTINCT FROM: SQLite before 3.39 lacks it)
        others, args = ("label <> ? AND ", (label, name)) if label else ("", (name,))
        await db.execute(
            f"DELETE FROM message_labels WHERE {others}message IN"
            " (SELECT id FROM messages WHERE account = ?)",
            args,
        )
    elif old_label and old_label != label:
        await db.execute(
            "DELETE FROM message_labels WHERE label = ? AND message IN"
            " (SELECT id FROM messages WHERE account = ?)",
            (old_label, name),
        )
    if label:
        await db.execute(
            "INSERT INTO message_labels (message, label)"
            " SELECT DISTINCT r.message, ? FROM message_records r"
            " JOIN messages m ON m.id = r.message WHERE m.account = ?"
            " AND m.direction = 'in' ON CONFLICT DO NOTHING",
            (label, name),
        )


async def _asked_by(db: Database, account: str, snapshot: str) -> str | None:
    """Who gave a stored account the settings of ``snapshot`` (`accounts add|set`, the API),
    from its row, where that change is being applied now; forgotten once audited."""
    row = await db.fetchone(
        "SELECT changed_by FROM accounts WHERE name = ? AND changed_to = ?", (account, snapshot)
    )
    if row is None:
        return None
    await db.execute(
        "UPDATE accounts SET changed_by = NULL, changed_to = NULL WHERE name = ?", (account,)
    )
    return str(row[0])


async def _audit_settings(
    db: Database, actor: str, account: str, before: str, after: str, retagged: int
) -> None:
    old, new = json.loads(before), json.loads(after)
    detail = {
        key: {"from": old.get(key), "to": new.get(key)}
        for key in new
        if old.get(key) != new.get(key)
    }
    await audit.add(
        db,
        actor,
        "sharing_changed",
        owner=new.get("owner"),
        account=account,
        detail=detail,
        retagged=retagged,
    )


async def _replace_emails(
    db: Database, record: str, emails: Sequence[str], policies: dict[str, AccountPolicy]
) -> None:
    await db.execute("DELETE FROM record_emails WHERE record = ?", (record,))
    await db.executemany(
        "INSERT INTO record_emails (record, email) VALUES (?,?) ON CONFLICT DO NOTHING",
        [(record, e) for e in dict.fromkeys(emails)],
    )
    if not emails:
        return
    marks = ",".join("?" * len(emails))
    # Incoming mail links on its sender, the owner's outgoing mail on its recipients.
    await db.execute(
        "INSERT INTO message_records (message, record, sort_key)"
        " SELECT DISTINCT a.message, ?, coalesce(m.date, m.received_at) FROM message_addresses a"
        " JOIN messages m ON m.id = a.message"
        f" WHERE a.address IN ({marks}) AND ((a.role = 'from' AND m.direction = 'in')"
        " OR (a.role != 'from' AND m.direction = 'out'))"
        " ON CONFLICT DO NOTHING",
        (record, *emails),
    )
    for account, policy in policies.items():
        if policy.magnet_label:
            await db.execute(
                "INSERT INTO message_labels (message, label)"
                " SELECT r.message, ? FROM message_records r JOIN messages m"
                " ON m.id = r.message WHERE r.record = ? AND m.account = ?"
                " AND m.direction = 'in' ON CONFLICT DO NOTHING",
                (policy.magnet_label, record, account),
            )


@contextlib.asynccontextmanager
async def _retagging(db: Database, what: str) -> AsyncIterator[None]:
    """A write transaction that re-tags. Where writers run at once (PostgreSQL), its first
    statement waits for every other transaction that decides tags (ingestion included) to
    end, and keeps them waiting until this one ends: its reads see what they committed,
    none writes a tag decided on facts this one changes (an unshare, say), nor the
    reverse, and what it reads of a message is still so when it writes."""
    async with db.write(what):
        if db.tag_lock is not None:
            await db.fetchone(db.tag_lock[0])
        yield


async def _retag(
    db: Database, where: str, args: Sequence[Any], policies: dict[str, AccountPolicy]
) -> int:
    """Apply each account's tagger to the messages matching ``where``; inside a transaction.

    Pages through the messages by id so memory stays bounded for large accounts.
    """
    last, changed = 0, 0
    decided: dict[tuple[Any, ...], tuple[str, str]] = {}
    copies = LinkCopies(db)
    while True:
        if len(decided) > 100_000:
            decided.clear()  # bounded memory, whatever the variety of the mail
        rows = await db.fetchall(
            "SELECT m.id, m.account, m.direction, m.origin, m.visibility, m.reason,"
            " EXISTS (SELECT 1 FROM message_records r WHERE r.message = m.id),"
            " EXISTS (SELECT 1 FROM message_records r JOIN shares s ON s.record = r.record"
            "   AND s.owner = m.owner WHERE r.message = m.id),"
            # The first From, as ingestion uses it.
            " (SELECT a.address FROM message_addresses a WHERE a.message = m.id"
            f"   AND a.role = 'from' ORDER BY {db.address_order} LIMIT 1),"
            f" {db.recipients_sql}"
            f" FROM messages m WHERE m.id > ? AND ({where}) ORDER BY m.id LIMIT {_PAGE}",
            (last, *args),
        )
        if not rows:
            await copies.done()
            return changed
        updates = []
        for r in rows:
            policy = policies.get(r[1])
            if policy is None:
                continue  # an account no longer configured keeps its tags
            # Most messages share their facts with many others: decide each set once.
            sender = domain(r[8]) if r[8] else None
            key = (r[1], r[2], r[3], bool(r[6]), bool(r[7]), sender, r[9])
            tag = decided.get(key)
            if tag is None:
                tag = decided[key] = policy.tagger(
                    facts(r[2], r[3], bool(r[6]), bool(r[7]), r[8], (r[9] or "").split())
                )
            if tag != (r[4], r[5]):
                updates.append((*tag, r[0]))
                if tag[0] != r[4] and r[6]:  # linked: its links' copy too
                    copies.flip(r[0], tag[0])
        await db.executemany("UPDATE messages SET visibility = ?, reason = ? WHERE id = ?", updates)
        await copies.write()
        changed += len(updates)
        last = rows[-1][0]
