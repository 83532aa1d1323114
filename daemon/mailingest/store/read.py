"""Reading stored mail: what a viewer may see, one message, its raw bytes."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from mailingest.model import ListedPage, StoredMessage, UnmatchedSender
from mailingest.store._db import Database, JsonSql, Reader, Row, parts

_COLUMNS = (
    "m.id, m.account, m.owner, m.direction, m.from_addr, m.to_addrs, m.cc_addrs, m.subject,"
    " m.date, m.message_id, m.visibility, m.reason, m.size, m.sha256, m.received_at,"
    " m.quarantine_reason, m.origin"
)

#: Where each message of a listing made by the database starts (page_json).
_START = '{"id"'
#: The order of ``messages`` (newest first), with m.id as the tie-break.
_KEY = "coalesce(m.date, m.received_at)"


@dataclass(frozen=True, slots=True)
class Listing:
    """Which of a viewer's messages, newest first (``quarantined``: only mail over its
    account's size limit, whose header alone is kept; ``before``: only what sorts after the
    message with this (sort key, id), a page's end)."""

    account: str | None = None
    label: str | None = None
    record: str | None = None
    limit: int | None = None
    quarantined: bool = False
    before: tuple[str, int] | None = None


async def messages(db: Database, viewer: str, listing: Listing) -> list[StoredMessage]:
    """What ``viewer`` may see: their own mail and mail shared with all."""
    return await db.snapshot(
        "reading messages", functools.partial(page, viewer=viewer, listing=listing)
    )


def page(reader: Reader, *, viewer: str, listing: Listing) -> list[StoredMessage]:
    """``messages`` inside a snapshot: the listing, then its labels and records, in one
    read transaction. A record's page reads its links only as far as the page, as
    ``page_json`` does, and again checking each message if a link's copy was wrong."""
    shape, args = _Shape.of(listing, fast=True), _args(viewer, listing)
    found = _select(shape)
    if found.in_order:  # sorted again: only SQLite keeps the links' order through the join
        rows = reader.fetchall(f"SELECT {_COLUMNS} {found.body}{found.tail}", args)
        if all(r[0] is not None for r in rows):  # None: a message the viewer may not see
            return _complete(reader, rows)
        found = _select(shape._replace(fast=False))
    rows = reader.fetchall(f"SELECT {_COLUMNS} {found.body}{found.tail}", args)
    return _complete(reader, rows)


def page_json(reader: Reader, *, viewer: str, listing: Listing) -> ListedPage:
    """``page`` as the API sends it: a JSON array made by the database, in one row of one
    statement (one step of SQLite, which lets go of the GIL for all of it). It reads one
    message more than the page, to know whether there is a next page."""
    limit = listing.limit
    if limit:
        listing = dataclasses.replace(listing, limit=limit + 1)
    shape, args = _Shape.of(listing, fast=True), _args(viewer, listing)
    [(text, count, read)] = reader.fetchall(_page_sql(shape, reader.json), args)
    if count < read:
        # A link said the viewer may see a message that says otherwise (the copies are
        # kept by triggers; should one ever be wrong): the links read fell short of the
        # page, so read it again checking each message before the limit.
        shape = shape._replace(fast=False)
        [(text, count, read)] = reader.fetchall(_page_sql(shape, reader.json), args)
    if not limit or count <= limit:
        return ListedPage(f"[{text or ''}]", int(count), None)
    # A JSON string escapes its quotes: '{"id"' only ever starts a message (id comes first).
    text = text[: text.rindex(_START) - 1]
    last = json.loads(text[text.rindex(_START) :])
    key = last["date"] if last["date"] is not None else last["received_at"]
    return ListedPage(f"[{text}]", limit, (key, last["id"]))


@functools.lru_cache(maxsize=1024)
def _page_sql(shape: _Shape, j: JsonSql) -> str:
    """The page's JSON, how many messages it holds, how many rows were read for it."""
    found = _select(shape)
    # Sorting the built JSON costs more than building it: where the links come in the
    # page's order, the messages are read in theirs (SQLite's nested loop keeps it), and
    # a message the viewer may not see is a row without one (``found.body``).
    message = _as_json(j)
    if found.in_order:
        message = f"CASE WHEN m.id IS NOT NULL THEN {message} END"
    rows = f"SELECT {message} AS o, {found.key} AS k, m.id AS i {found.body}"
    if not found.in_order:
        rows += found.tail
    joined = j.join.format(value="o", order="k DESC, i DESC")
    return f"SELECT {joined}, count(i), count(*) FROM ({rows}) AS page"


class _Shape(NamedTuple):
    """Which filters a listing has: what its SQL text depends on (made once per shape)."""

    record: bool
    account: bool
    label: bool
    quarantined: bool
    before: bool
    limit: int | None
    #: A record's links read only as far as the page, trusting their copy of who may see
    #: each message; the messages say it again (page_json), they do not filter.
    fast: bool

    @classmethod
    def of(cls, listing: Listing, *, fast: bool) -> _Shape:
        return cls(
            listing.record is not None,
            listing.account is not None,
            listing.label is not None,
            listing.quarantined,
            listing.before is not None,
            listing.limit or None,
            fast,
        )


@dataclass(frozen=True, slots=True)
class _Select:
    """A listing as SQL: ``SELECT ... {body}{tail}``, its values from ``_args``."""

    key: str  # what it is sorted by (newest first), then m.id
    body: str  # FROM ... WHERE ...
    tail: str  # ORDER BY ... LIMIT ...
    in_order: bool  # the body alone yields the page, in order: a nested loop over sorted links


@functools.lru_cache(maxsize=1024)
def _select(shape: _Shape) -> _Select:
    """A listing of this shape, newest first. Its placeholders are filled by ``_args``,
    in the same order."""
    seen = "(m.owner = ? OR m.visibility = 'shared')"
    sql = f"FROM messages m WHERE {seen}"
    key, order, in_order = _KEY, f"{_KEY} DESC, m.id DESC", False
    if shape.record:
        links, in_order = _links(shape)
        # CROSS JOIN: the links first, then their messages (left to itself SQLite starts
        # from the messages' owner and visibility indexes). The message's own columns decide:
        # links read in the page's order keep a row for a message the viewer may not see
        # (LEFT JOIN: its m.id is NULL), so that the caller can tell.
        join = "LEFT JOIN messages m ON" if in_order else "CROSS JOIN messages m WHERE"
        sql = f"FROM ({links}) AS r {join} m.id = r.message AND {seen}"
        key, order = "r.sort_key", "r.sort_key DESC, r.message DESC"
    if shape.account:
        sql += " AND m.account = ?"
    if shape.quarantined:
        sql += " AND m.quarantined = 1"
    if shape.label:
        sql += " AND EXISTS (SELECT 1 FROM message_labels l WHERE l.message = m.id AND l.label = ?)"
    if shape.before and not shape.record:  # _links has it
        sql += f" AND ({key} < ? OR ({key} = ? AND m.id < ?))"
    tail = f" ORDER BY {order}"
    if shape.limit:
        tail += f" LIMIT {int(shape.limit)}"
    return _Select(key, sql, tail, in_order)


def _links(shape: _Shape) -> tuple[str, bool]:
    """The record's links (message, sort_key) whose messages the viewer may see, from the
    two indexes that say who may see each: the viewer's own mail, and others' mail shared
    with all (the rest is never read: a record of 1,000 messages the viewer may see none
    of costs nothing). Where nothing but the record (and the cursor) filters, as on
    the API's page, each index is read only as far as the page reaches, and the links
    come sorted and limited (True)."""
    after = " AND (sort_key < ? OR (sort_key = ? AND message < ?))" if shape.before else ""
    bound = ""
    if shape.fast and shape.limit and not (shape.account or shape.label or shape.quarantined):
        bound = f" ORDER BY sort_key DESC, message DESC LIMIT {int(shape.limit)}"
    # The ORDER BY of a UNION ALL merges its arms as each index yields them, in order,
    # and stops at the LIMIT: neither arm is read further than the page nor sorted.
    branch = f"SELECT message, sort_key FROM message_records WHERE record = ? AND {{}}{after}"
    sql = (
        branch.format("owner = ?")
        + " UNION ALL "
        + branch.format("visibility = 'shared' AND owner <> ?")
        + bound
    )
    return sql, bool(bound)


def _args(viewer: str, listing: Listing) -> list[Any]:
    """The values of ``_select``'s placeholders, in its order."""
    before = list(listing.before) if listing.before is not None else []
    if listing.before is not None:
        before.insert(0, listing.before[0])  # key < ? OR (key = ? AND id < ?)
    args: list[Any] = []
    if listing.record is not None:
        args += [listing.record, viewer, *before] * 2  # _links: its own, others' shared
    args.append(viewer)
    if listing.account is not None:
        args.append(listing.account)
    if listing.label is not None:
        args.append(listing.label)
    if listing.record is None:
        args += before
    return args


@functools.cache
def _as_json(j: JsonSql) -> str:
    """One message (``m``) as ``StoredMessage.to_json`` makes it, in SQL: an object of its
    plain values, then its lists spliced in as stored. They are JSON text already (written
    by ``json.dumps`` in ingest.py, or by the triggers of _listed.py) and NOT NULL; parsing
    them again, as a JSON-typed value needs, was 40 % of a page's SQL on SQLite."""
    plain = {
        "id": "m.id",
        "account": "m.account",
        "owner": "m.owner",
        "direction": "m.direction",
        "from": "m.from_addr",
        "subject": "m.subject",
        "date": "m.date",
        "message_id": "m.message_id",
        "visibility": "m.visibility",
        "reason": "m.reason",
        "size": "m.size",
        "sha256": "m.sha256",
        "received_at": "m.received_at",
        "quarantine_reason": "m.quarantine_reason",
    }
    lists = {
        "to": "m.to_addrs",
        "cc": "m.cc_addrs",
        "records": "m.records_json",
        "labels": "m.labels_json",
    }
    pairs = ", ".join(f"'{key}', {value}" for key, value in plain.items())
    # The object ends with its one '}' (no value in it is an object or ends with one).
    sql = f"rtrim({j.text.format(f'{j.object}({pairs})')}, '}}')"
    for key, column in lists.items():
        sql += f" || ',\"{key}\":' || {column}"
    flag = "CASE WHEN m.quarantine_reason IS NULL THEN 'false' ELSE 'true' END"
    return f"{sql} || ',\"quarantined\":' || {flag} || '}}'"


async def unmatched(db: Database, owner: str) -> list[UnmatchedSender]:
    """The owner's incoming mail linked to no record, by sender: most messages first."""
    async with db.read("reading unmatched mail"):
        rows = await db.fetchall(
            "SELECT a.address, count(*), max(coalesce(m.date, m.received_at)), max(m.id)"
            " FROM messages m JOIN message_addresses a ON a.message = m.id AND a.role = 'from'"
            " WHERE m.owner = ? AND m.direction = 'in' AND NOT EXISTS"
            " (SELECT 1 FROM message_records r WHERE r.message = m.id)"
            " GROUP BY a.address ORDER BY count(*) DESC, a.address",
            (owner,),
        )
    return [UnmatchedSender(str(r[0]), int(r[1]), str(r[2]), int(r[3])) for r in rows]


async def message(db: Database, message_id: int) -> StoredMessage | None:
    def one(reader: Reader) -> list[StoredMessage]:
        sql = f"SELECT {_COLUMNS} FROM messages m WHERE m.id = ?"
        return _complete(reader, reader.fetchall(sql, (message_id,)))

    found = await db.snapshot("reading a message", one)
    return found[0] if found else None


async def raw_chunks(db: Database, message_id: int) -> AsyncIterator[bytes]:
    """The stored bytes of one message, a chunk at a time."""
    seq = 0
    while True:
        row = await db.snapshot(
            "reading a raw message",
            functools.partial(
                Reader.fetchone,
                sql="SELECT data FROM message_chunks WHERE message = ? AND seq = ?",
                args=(message_id, seq),
            ),
            quick=False,  # a megabyte from the disk: never on the event loop
        )
        if row is None:
            return
        yield bytes(row[0])
        seq += 1


def _complete(reader: Reader, rows: Sequence[Row]) -> list[StoredMessage]:
    """The labels and records of these messages, in one query."""
    found: dict[str, dict[int, list[str]]] = {"l": {}, "r": {}}
    for part in parts([int(r[0]) for r in rows]):
        marks = ",".join("?" * len(part))
        for kind, message_id, value in reader.fetchall(
            f"SELECT 'l', message, label FROM message_labels WHERE message IN ({marks})"
            f" UNION ALL SELECT 'r', message, record FROM message_records"
            f" WHERE message IN ({marks})",
            (*part, *part),
        ):
            found[str(kind)].setdefault(int(message_id), []).append(str(value))
    labels, records = found["l"], found["r"]
    return [_stored(r, sorted(labels.get(r[0], [])), sorted(records.get(r[0], []))) for r in rows]


def _stored(r: Row, labels: list[str], records: list[str]) -> StoredMessage:
    return StoredMessage(
        id=r[0],
        account=r[1],
        owner=r[2],
        direction=r[3],
        sender=r[4],
        to=json.loads(r[5]),
        cc=json.loads(r[6]),
        subject=r[7],
        date=r[8],
        message_id=r[9],
        visibility=r[10],
        reason=r[11],
        size=r[12],
        sha256=r[13],
        received_at=r[14],
        labels=labels,
        records=records,
        quarantine_reason=r[15],
        origin=r[16],
    )
