"""Migration 11 of both backends: what a record's page needs, kept where it is read
(store/read.py), by triggers so that no write can forget it.

Each link carries its message's owner and visibility, in two indexes that list a record
(its mail shared with all, each owner's private mail, in listing order: the messages a
viewer may not see are never visited), and each message carries its records and labels as
JSON arrays, sorted by code point as Python sorts (no index lookups per message of a page).
The triggers follow what the store does: links and labels are inserted and deleted, never
updated in place; a message's visibility changes, its owner never does.

On PostgreSQL, where several processes write at once (READ COMMITTED), the triggers on
links and labels first lock the message's row (a change of visibility locks it by its own
UPDATE): two transactions changing one message's links, labels or visibility take turns,
and the second one's statements see what the first committed.
"""

from __future__ import annotations

_COLUMNS = """
    ALTER TABLE message_records ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE message_records ADD COLUMN visibility TEXT NOT NULL DEFAULT 'private';
    UPDATE message_records SET
        owner = (SELECT m.owner FROM messages m WHERE m.id = message_records.message),
        visibility = (SELECT m.visibility FROM messages m WHERE m.id = message_records.message);
    DROP INDEX message_records_sorted;
    DROP INDEX message_records_record;
    CREATE INDEX message_records_shared
        ON message_records (record, visibility, sort_key, message);
    CREATE INDEX message_records_own
        ON message_records (record, owner, visibility, sort_key, message);
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
    CREATE TRIGGER messages_visibility_changed AFTER UPDATE OF visibility ON messages
    WHEN OLD.visibility IS NOT NEW.visibility BEGIN
        UPDATE message_records SET visibility = NEW.visibility WHERE message = NEW.id;
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
    CREATE FUNCTION messages_visibility_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE message_records SET visibility = NEW.visibility WHERE message = NEW.id;
        RETURN NULL;
    END $$;
    CREATE TRIGGER messages_visibility_changed AFTER UPDATE OF visibility ON messages
        FOR EACH ROW WHEN (OLD.visibility IS DISTINCT FROM NEW.visibility)
        EXECUTE FUNCTION messages_visibility_changed();
    """


def _migration(array: str, kept: str, who: str, *, changed: str) -> str:
    script = _COLUMNS
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
