"""The schema, as versioned migrations per backend; a store runs the missing ones on open.

Both backends keep the same tables and columns, so the store's SQL is written once.
"""

from __future__ import annotations

import re

from mailingest.store._listed import POSTGRES_LISTED, SQLITE_LISTED

#: Later migrations are the same text for both backends (but the primary key).
_SIZE_POLICY_AND_AUDIT = """
    ALTER TABLE messages ADD COLUMN quarantined INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN quarantine_reason TEXT;
    CREATE INDEX messages_quarantined ON messages (quarantined, id);
    ALTER TABLE shares ADD COLUMN set_by TEXT;
    ALTER TABLE shares ADD COLUMN set_at TEXT;
    CREATE TABLE audit (
        id {pk},
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        owner TEXT,
        account TEXT,
        record TEXT,
        detail TEXT NOT NULL DEFAULT '{{}}',
        retagged INTEGER NOT NULL DEFAULT 0
    );
    """
_OAUTH_TOKENS = """
    CREATE TABLE oauth_tokens (
        account TEXT NOT NULL,
        service TEXT NOT NULL,
        origin TEXT NOT NULL,
        token TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (account, service)
    );
    """

#: API bearer tokens (`mailingest api token create`): only their SHA-256 is kept.
_API_TOKENS = """
    CREATE TABLE api_tokens (
        id {pk},
        user_name TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        admin INTEGER NOT NULL DEFAULT 0,
        act_for INTEGER NOT NULL DEFAULT 0,
        label TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL
    );
    """

#: A link carries its message's listing key (coalesce(date, received_at), never changed
#: once stored): a record's page is then read in order from the index and stops at its
#: limit, instead of sorting every message of the record (a million stored: 1,000 a record).
_RECORD_ORDER = """
    ALTER TABLE message_records ADD COLUMN sort_key TEXT NOT NULL DEFAULT '';
    UPDATE message_records SET sort_key = (SELECT coalesce(m.date, m.received_at)
        FROM messages m WHERE m.id = message_records.message);
    CREATE INDEX message_records_sorted ON message_records (record, sort_key, message);
    """

#: Who asked for a stored account's sharing settings, and their snapshot, until the re-tag
#: that applies them audits it (a daemon applies a CLI command's change in its own process).
_ACCOUNT_CHANGED_BY = """
    ALTER TABLE accounts ADD COLUMN changed_by TEXT;
    ALTER TABLE accounts ADD COLUMN changed_to TEXT;
    """

SQLITE_MIGRATIONS: tuple[str, ...] = (
    # 1: messages, raw chunks, UIDL ledger, account state
    """
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        account TEXT NOT NULL,
        owner TEXT NOT NULL,
        direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        from_addr TEXT,
        to_addrs TEXT NOT NULL DEFAULT '[]',
        cc_addrs TEXT NOT NULL DEFAULT '[]',
        subject TEXT,
        date TEXT,
        message_id TEXT,
        visibility TEXT NOT NULL CHECK (visibility IN ('private', 'shared')),
        reason TEXT NOT NULL,
        received_at TEXT NOT NULL,
        UNIQUE (account, sha256)
    );
    CREATE INDEX messages_owner ON messages (owner, id);
    CREATE TABLE message_chunks (
        message INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (message, seq)
    );
    CREATE TABLE message_labels (
        message INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        label TEXT NOT NULL,
        PRIMARY KEY (message, label)
    );
    CREATE TABLE ledger (
        account TEXT NOT NULL,
        uidl TEXT NOT NULL,
        message INTEGER REFERENCES messages (id),
        first_seen TEXT NOT NULL,
        deleted_at TEXT,
        PRIMARY KEY (account, uidl)
    );
    CREATE TABLE account_state (
        account TEXT PRIMARY KEY,
        owner TEXT,
        last_poll TEXT,
        result TEXT,
        error TEXT,
        new INTEGER NOT NULL DEFAULT 0,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        next_poll TEXT,
        paused INTEGER NOT NULL DEFAULT 0,
        pause_reason TEXT,
        lease_holder TEXT,
        lease_expires REAL,
        next_login TEXT
    );
    """,
    # 2: CRM records, their addresses, share flags, message links, settings snapshots
    """
    ALTER TABLE messages ADD COLUMN origin TEXT NOT NULL DEFAULT 'pop3';
    CREATE INDEX messages_visibility ON messages (visibility, id);
    CREATE INDEX messages_account ON messages (account, id);
    CREATE TABLE records (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('lead', 'contact')),
        name TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE record_emails (
        record TEXT NOT NULL REFERENCES records (id) ON DELETE CASCADE,
        email TEXT NOT NULL,
        PRIMARY KEY (record, email)
    );
    CREATE INDEX record_emails_email ON record_emails (email);
    CREATE TABLE shares (
        owner TEXT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (owner, record)
    );
    CREATE TABLE message_records (
        message INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        record TEXT NOT NULL,
        PRIMARY KEY (message, record)
    );
    CREATE INDEX message_records_record ON message_records (record, message);
    CREATE TABLE message_addresses (
        message INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('from', 'to', 'cc')),
        address TEXT NOT NULL,
        PRIMARY KEY (message, role, address)
    );
    CREATE INDEX message_addresses_address ON message_addresses (address, role);
    CREATE TABLE account_settings (
        account TEXT PRIMARY KEY,
        snapshot TEXT NOT NULL,
        magnet_label TEXT
    );
    """,
    # 3: the daemon's auth pause remembers which login was rejected (a salted scrypt hash)
    """
    ALTER TABLE account_state ADD COLUMN pause_key TEXT;
    """,
    # 4: accounts kept in the database (`mailingest accounts`), passwords sealed
    """
    CREATE TABLE accounts (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        settings TEXT NOT NULL,
        password TEXT NOT NULL,
        smtp_password TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE store_meta (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    """,
    # 5: Email Magnet labels incoming customer mail only (the CRM's help says so); the
    # owner's sent mail fetched back is found by Message-ID
    """
    DELETE FROM message_labels WHERE message IN (SELECT id FROM messages WHERE direction = 'out');
    CREATE INDEX messages_message_id ON messages (account, message_id);
    """,
    # 6: size policy (headers of an oversized message kept, quarantined), who set a share
    # flag and when, the audit log of sharing changes
    _SIZE_POLICY_AND_AUDIT.format(pk="INTEGER PRIMARY KEY"),
    # 7: OAuth2 refresh tokens a provider rotated, sealed with [storage] secret_key;
    # ``origin`` fingerprints the configured token they descend from
    _OAUTH_TOKENS,
    # 8: bearer tokens of the HTTP API, hashed
    _API_TOKENS.format(pk="INTEGER PRIMARY KEY"),
    # 9: a record's messages in listing order, from its index alone
    _RECORD_ORDER,
    # 10: who changed a stored account's sharing settings, for the audit
    _ACCOUNT_CHANGED_BY,
    # 11: what a record's page needs, where it is read
    SQLITE_LISTED,
)

#: The same tables for PostgreSQL. Its history starts at the schema SQLite reached with
#: migration 3; later changes are added to both lists.
POSTGRES_MIGRATIONS: tuple[str, ...] = (
    # 1: everything SQLite's migrations 1-3 make
    """
    CREATE TABLE messages (
        id BIGSERIAL PRIMARY KEY,
        account TEXT NOT NULL,
        owner TEXT NOT NULL,
        direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
        size BIGINT NOT NULL,
        sha256 TEXT NOT NULL,
        from_addr TEXT,
        to_addrs TEXT NOT NULL DEFAULT '[]',
        cc_addrs TEXT NOT NULL DEFAULT '[]',
        subject TEXT,
        date TEXT,
        message_id TEXT,
        visibility TEXT NOT NULL CHECK (visibility IN ('private', 'shared')),
        reason TEXT NOT NULL,
        received_at TEXT NOT NULL,
        origin TEXT NOT NULL DEFAULT 'pop3',
        UNIQUE (account, sha256)
    );
    CREATE INDEX messages_owner ON messages (owner, id);
    CREATE INDEX messages_visibility ON messages (visibility, id);
    CREATE INDEX messages_account ON messages (account, id);
    CREATE TABLE message_chunks (
        message BIGINT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (message, seq)
    );
    CREATE TABLE message_labels (
        message BIGINT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        label TEXT NOT NULL,
        PRIMARY KEY (message, label)
    );
    CREATE TABLE ledger (
        account TEXT NOT NULL,
        uidl TEXT NOT NULL,
        message BIGINT REFERENCES messages (id),
        first_seen TEXT NOT NULL,
        deleted_at TEXT,
        PRIMARY KEY (account, uidl)
    );
    CREATE TABLE account_state (
        account TEXT PRIMARY KEY,
        owner TEXT,
        last_poll TEXT,
        result TEXT,
        error TEXT,
        new INTEGER NOT NULL DEFAULT 0,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        next_poll TEXT,
        paused INTEGER NOT NULL DEFAULT 0,
        pause_reason TEXT,
        lease_holder TEXT,
        lease_expires DOUBLE PRECISION,
        next_login TEXT,
        pause_key TEXT
    );
    CREATE TABLE records (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('lead', 'contact')),
        name TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE record_emails (
        record TEXT NOT NULL REFERENCES records (id) ON DELETE CASCADE,
        email TEXT NOT NULL,
        PRIMARY KEY (record, email)
    );
    CREATE INDEX record_emails_email ON record_emails (email);
    CREATE TABLE shares (
        owner TEXT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (owner, record)
    );
    CREATE TABLE message_records (
        message BIGINT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        record TEXT NOT NULL,
        PRIMARY KEY (message, record)
    );
    CREATE INDEX message_records_record ON message_records (record, message);
    CREATE TABLE message_addresses (
        message BIGINT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('from', 'to', 'cc')),
        address TEXT NOT NULL,
        -- header order (SQLite keeps it in its rowid)
        pos BIGINT GENERATED ALWAYS AS IDENTITY,
        PRIMARY KEY (message, role, address)
    );
    CREATE INDEX message_addresses_address ON message_addresses (address, role);
    CREATE TABLE account_settings (
        account TEXT PRIMARY KEY,
        snapshot TEXT NOT NULL,
        magnet_label TEXT
    );
    """,
    # 2: accounts kept in the database, as SQLite's migration 4
    """
    CREATE TABLE accounts (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        settings TEXT NOT NULL,
        password TEXT NOT NULL,
        smtp_password TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE store_meta (
        key TEXT PRIMARY KEY,
        value BIGINT NOT NULL
    );
    """,
    # 3: as SQLite's migration 5
    """
    DELETE FROM message_labels WHERE message IN (SELECT id FROM messages WHERE direction = 'out');
    CREATE INDEX messages_message_id ON messages (account, message_id);
    """,
    # 4: as SQLite's migration 6
    _SIZE_POLICY_AND_AUDIT.format(pk="BIGSERIAL PRIMARY KEY"),
    # 5: as SQLite's migration 7
    _OAUTH_TOKENS,
    # 6: as SQLite's migration 8
    _API_TOKENS.format(pk="BIGSERIAL PRIMARY KEY"),
    # 7: as SQLite's migration 9
    _RECORD_ORDER,
    # 8: as SQLite's migration 10
    _ACCOUNT_CHANGED_BY,
    # 9: as SQLite's migration 11
    POSTGRES_LISTED,
    # 10: PostgreSQL only. Raw mail is compressed with lz4, not pglz (the default): pglz
    # cost the server 1 s of CPU for 42 MB of mail, lz4 0.2 s, storing it in 21 MB against
    # pglz's 13 MB and 44 MB uncompressed. A server built without lz4 keeps pglz.
    """
    DO $$
    BEGIN
        ALTER TABLE message_chunks ALTER COLUMN data SET COMPRESSION lz4;
    EXCEPTION WHEN feature_not_supported THEN
        NULL;
    END $$;
    """,
)


def statements(script: str) -> list[str]:
    """A migration's statements: split at ``;``, but not inside a function's $$-quoted
    body (PostgreSQL) or a trigger's BEGIN ... END (SQLite: as SQLite itself tells, that
    body ends at an END that follows a ``;``)."""
    found, part = [], ""
    for piece in script.split(";"):
        part += piece
        body = re.match(
            r"\s*CREATE\s+(TEMP\s+|TEMPORARY\s+)?TRIGGER\b.*\bBEGIN\b", part, re.I | re.S
        )
        if part.count("$$") % 2 == 1 or (body and piece.strip().upper() != "END"):
            part += ";"
            continue
        if part.strip():
            found.append(part.strip())
        part = ""
    return found
