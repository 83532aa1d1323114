"""Migration 11 of both backends: what a record's page needs, kept where it is read
(store/read.py), by triggers so that no write can forget it.

Each link carries its message's owner and visibility, in two indexes that list a record:
each owner's links, and (a partial index) the links of mail shared with all, in listing
order; the messages a viewer may not see are never visited. Each message carries its
records and labels as JSON arrays, sorted by code point as Python sorts (no index lookups
per message of a page). Triggers fill a new link's copy and the arrays (links and labels are
inserted and deleted, never updated in place; a message's owner never changes); a re-tag
changes the links' visibility with its messages', a page of messages at a time in one
statement (store/records.py: per message in a trigger, a re-tag of 500,000 messages took
three times as long).

On PostgreSQL, where several processes write at once (READ COMMITTED), the triggers on
links and labels first lock the message's row (a re-tag locks it by its own UPDATE): two
transactions changing one message's links, labels or visibility take turns, and the second
one's statements see what the first committed.
"""

from __future__ import annotations

from mailingest.store._db import Database, parts

#: Linked messages whose visibility one re-tag changes past which SQLite may make the index
#: of shared links again rather than changing it a link at a time (LinkCopies).
BULK_FLIPS = 20_000

#: The links of mail shared with all, by record in listing order (a re-tag may make it again).
SHARED_LINKS_INDEX = (
    "CREATE INDEX message_records_shared ON message_records (record, sort_key, message, owner)"
    " WHERE visibility = 'shared'"
)
_COLUMNS = """
    ALTER TABLE message_records ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE message_records ADD COLUMN visibility TEXT NOT NULL DEFAULT 'private';
    UPDATE message_records SET
        owner = (SELECT m.owner FROM messages m WHERE m.id = message_records.message),
        visibility = (SELECT m.visibility FROM messages m WHERE m.id = message_records.message);
    DROP INDEX message_records_sorted;
    DROP INDEX message_records_record;
    {shared_links_index};
    CREATE INDEX message_records_own ON message_records (record, owner, sort_key, message);
    ALTER TABLE messages ADD COLUMN records_json TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE messages ADD COLUMN labels_json TEXT NOT NULL DEFAULT '[]';
    """
#: (table, its value column, the messages column that copies them as a JSON array)
_LISTS = (("message_records", "record", "records_json"), ("message_labels", "label", "labels_json"))
#: One message's values of a list, sorted, as a JSON array (SQLite keeps a subquery's ORDER
#: BY under an aggregate other than count, min and max).
_SQLITE_ARRAY = (
    "(SELECT json_group_array(v) FROM"
    " (SELECT {column} AS v FROM {table} WHERE message = {id} ORDER BY v) AS s)"
)
_POSTGRES_ARRAY = (
    "(SELECT coalesce(json_agg({column} ORDER BY {column} COLLATE \"C\"), '[]')::text"
    " FROM {table} WHERE message = {id})"
)
_FILLED = """
    UPDATE messages SET {copy} = {array} WHERE id IN (SELECT message FROM {table});
    """
_SQLITE_KEPT = """
    CREATE TRIGGER {table}_added AFTER INSERT ON {table} BEGIN
        UPDATE messages SET {copy} = {new} WHERE id = NEW.message;
    END;
    CREATE TRIGGER {table}_removed AFTER DELETE ON {table} BEGIN
        UPDATE messages SET {copy} = {old} WHERE id = OLD.message;
    END;
    """
_POSTGRES_KEPT = """
    CREATE FUNCTION {table}_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE changed BIGINT := CASE WHEN TG_OP = 'DELETE' THEN OLD.message ELSE NEW.message END;
    BEGIN
        PERFORM 1 FROM messages WHERE id = changed FOR NO KEY UPDATE;
        UPDATE messages SET {copy} = {changed} WHERE id = changed;
        RETURN NULL;
    END $$;
    CREATE TRIGGER {table}_changed AFTER INSERT OR DELETE ON {table}
        FOR EACH ROW EXECUTE FUNCTION {table}_changed();
    """
_SQLITE_WHO = """
    CREATE TRIGGER message_records_who AFTER INSERT ON message_records BEGIN
        UPDATE message_records SET
            owner = (SELECT m.owner FROM messages m WHERE m.id = NEW.message),
            visibility = (SELECT m.visibility FROM messages m WHERE m.id = NEW.message)
        WHERE rowid = NEW.rowid;
    END;
    """
_POSTGRES_WHO = """
    CREATE FUNCTION message_records_who() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        SELECT m.owner, m.visibility INTO NEW.owner, NEW.visibility
            FROM messages m WHERE m.id = NEW.message FOR NO KEY UPDATE;
        RETURN NEW;
    END $$;
    CREATE TRIGGER message_records_who BEFORE INSERT ON message_records
        FOR EACH ROW EXECUTE FUNCTION message_records_who();
    """


def _migration(array: str, kept: str, who: str, *, changed: str) -> str:
    script = _COLUMNS.format(shared_links_index=SHARED_LINKS_INDEX)
    for table, column, copy in _LISTS:
        of = array.format(table=table, column=column, id="{id}")
        script += _FILLED.format(copy=copy, table=table, array=of.format(id="messages.id"))
        script += kept.format(
            table=table,
            copy=copy,
            new=of.format(id="NEW.message"),
            old=of.format(id="OLD.message"),
            changed=of.format(id=changed),
        )
    return script + who


SQLITE_LISTED = _migration(_SQLITE_ARRAY, _SQLITE_KEPT, _SQLITE_WHO, changed="")
POSTGRES_LISTED = _migration(_POSTGRES_ARRAY, _POSTGRES_KEPT, _POSTGRES_WHO, changed="changed")


class LinkCopies:
    """A re-tag's changes to its messages' links' copy of their visibility (_listed.py),
    written a page at a time: the links of a message whose visibility it changed get the
    new one, a statement per visibility. What the re-tag read is still so when it writes:
    SQLite writes one transaction at a time, and on PostgreSQL a re-tag holds the tag lock
    (``Database.tag_lock``) that every writer of tags and links takes.

    Past BULK_FLIPS such messages in one re-tag (an account's mode changed), and past 1 in
    30 of the shared links, SQLite drops the index of shared links and makes it again at
    the end: one sort instead of an insert or delete at a random place for each (500,000
    messages re-tagged: 1.3 s instead of 5 s). PostgreSQL keeps it: DDL would hold every
    reader."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._flips: dict[str, list[int]] = {}
        self._count = 0
        self._dropped = False
        self._indexed: int | None = None  # shared links when the re-tag began to count

    def flip(self, message: int, visibility: str) -> None:
        self._flips.setdefault(visibility, []).append(message)

    async def write(self) -> None:
        for visibility, ids in self._flips.items():
            self._count += len(ids)
            if self._count > BULK_FLIPS and self._db.rebuilds_indexes and not self._dropped:
                await self._drop_if_cheaper()
            for part in parts(ids):
                await self._db.execute(
                    "UPDATE message_records SET visibility = ?"
                    f" WHERE message IN ({','.join('?' * len(part))})",
                    (visibility, *part),
                )
        self._flips.clear()

    async def _drop_if_cheaper(self) -> None:
        """Making the index again costs about as much as changing it at 1 in 30 of its
        links (each change an insert or delete at a random place): on a big store a
        re-tag of a few tens of thousands of links keeps it."""
        if self._indexed is None:
            row = await self._db.fetchone(
                "SELECT count(*) FROM message_records WHERE visibility = 'shared'"
            )
            self._indexed = int(row[0]) if row else 0
        if self._count > self._indexed // 30:
            await self._db.execute("DROP INDEX message_records_shared")
            self._dropped = True

    async def done(self) -> None:
        if self._dropped:
            await self._db.execute(SHARED_LINKS_INDEX)
            self._dropped = False
