"""The PostgreSQL store's schema, its migrations and the column lists its statements select.

:mod:`sdcache.store.postgres` applies :data:`MIGRATIONS` in order up to
:data:`SCHEMA_VERSION` (see its docstring for how), and builds its
statements from the column lists here (in the order
:func:`~sdcache.store._namespace.file_entry` and
:func:`~sdcache.store._namespace.manifest_of` read them).
"""

from __future__ import annotations

SCHEMA_VERSION = 3
MIGRATION_LOCK = 0x5344_4341_4348_45  # pg_advisory_xact_lock key: "SDCACHE"

#: Migrations: version -> (description, statements). Version 1 and 2 are the
#: same tables as SQLite's versions 1 and 2.
MIGRATIONS: dict[int, tuple[str, str]] = {
    1: ("namespace, chunks, pins, nodes", """
CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO counters VALUES ('generation', 0), ('pins_generation', 0);
CREATE TABLE files (
    path TEXT COLLATE "C" PRIMARY KEY,
    parent TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    size BIGINT NOT NULL,
    mtime DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL,
    version_tag TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    kind TEXT NOT NULL,
    base TEXT NOT NULL,
    metadata TEXT NOT NULL,
    generation BIGINT NOT NULL,
    chunk_count INTEGER NOT NULL,
    chunks BYTEA NOT NULL
);
-- covers the listing columns, so a page is one index range scan
CREATE INDEX files_by_parent ON files (parent, name) INCLUDE (path, size, mtime, kind, sha256, generation, chunk_count);
CREATE TABLE dirs (
    path TEXT COLLATE "C" PRIMARY KEY,
    parent TEXT COLLATE "C",
    name TEXT COLLATE "C" NOT NULL,
    files BIGINT NOT NULL,
    bytes BIGINT NOT NULL
);
CREATE INDEX dirs_by_parent ON dirs (parent, name) INCLUDE (path, bytes);
INSERT INTO dirs VALUES ('/', NULL, '', 0, 0);
CREATE TABLE chunks (id BYTEA PRIMARY KEY, length INTEGER NOT NULL, refs BIGINT NOT NULL);
CREATE TABLE pins (path TEXT COLLATE "C" PRIMARY KEY);
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    capacity BIGINT NOT NULL,
    role TEXT NOT NULL,
    host_id TEXT NOT NULL,
    pool_dir TEXT NOT NULL,
    used BIGINT NOT NULL,
    chunks BIGINT NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL
);
"""),
    2: ("tokens", """
INSERT INTO counters VALUES ('auth_generation', 0);
CREATE TABLE tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    revoked DOUBLE PRECISION NOT NULL
);
"""),
    3: ("node zones, replica overrides", """
ALTER TABLE nodes ADD COLUMN zone TEXT NOT NULL DEFAULT '';
CREATE TABLE replicas (path TEXT COLLATE "C" PRIMARY KEY, replicas INTEGER NOT NULL);
"""),
}

ENTRY_COLS = "path, size, mtime, kind, sha256, generation, chunk_count"
LISTED_COLS = "size, mtime, kind, sha256, generation, chunk_count"  # an Entry's after path and is_dir
MANIFEST_COLS = "path, size, mtime, source, version_tag, sha256, kind, base, metadata, generation, chunks"
NODE_COLS = "node_id, address, capacity, role, host_id, pool_dir, used, chunks, last_seen, zone"
TOKEN_COLS = "name, role, created, expires, revoked"
NAMESPACE_LOCK = "SELECT value FROM counters WHERE name = 'generation' FOR UPDATE"
#: Drop the pins of deleted files; the pins generation moves if there were any.
UNPIN_BUMP = ("WITH gone AS (DELETE FROM pins WHERE {where} RETURNING 1)"
              " UPDATE counters SET value = value + 1 WHERE name = 'pins_generation' AND EXISTS (SELECT 1 FROM gone)")
