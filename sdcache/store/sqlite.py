"""The embedded metadata store: one SQLite file in WAL mode.

Durability: ``synchronous=FULL`` in WAL mode fsyncs the log on every commit,
so a commit that returned survives ``kill -9`` and power loss. Writers are
serialized by a lock and take the write lock up front (``BEGIN IMMEDIATE``);
readers use their own per-thread connections and never wait for writers.

Heartbeats are the exception: a transaction holding only heartbeats runs
with ``synchronous=NORMAL``, which in WAL mode writes the log without an
fsync. The next durable commit (or checkpoint) syncs those frames with its
own, so a heartbeat costs no fsync; a power loss may forget the last few
seconds of liveness, which the next heartbeat restores, and never anything
acknowledged as durable.

The schema version is ``PRAGMA user_version``; a database of a newer version
than this code raises :class:`~sdcache.errors.SchemaTooNew` and is left alone.

Tables::

    counters(name, value)                  generation, pins_generation
    files(path, parent, name, ..., chunks) one row per file; chunks = packed table
    dirs(path, parent, name, files, bytes) implicit directories, with subtree totals
    chunks(id, length, refs)               chunk refcounts, for deduplicated totals
    pins(path)                             pinned files
    nodes(node_id, address, ...)           node registry
    tokens(name, role, created, ...)       issued and revoked tokens (never the token)
    replicas(path, replicas)               per-path replica overrides (sdcache replicas)

A directory row exists exactly while a file lies under it (``/`` always), so
listing a directory is two indexed range scans, ``(parent, name) > token``.
"""

from __future__ import annotations

import heapq
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .. import paths
from ..errors import (
    AlreadyExists,
    CapacityExceeded,
    IsADirectory,
    NotADirectory,
    NotFound,
    ReadOnly,
    SchemaTooNew,
    SdcacheError,
)
from ..manifest import CHUNK_ENTRY, Entry, Manifest
from ._namespace import ID_SLICE as _ID
from ._namespace import chunk_counts as _chunk_counts
from ._namespace import file_entry, manifest_of
from ._namespace import pack_valid as _pack_valid
from ._namespace import subtree as _subtree
from .base import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MetaStore, NodeRecord, StoreStats, TokenRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO counters VALUES ('generation', 0), ('pins_generation', 0);
CREATE TABLE files (
    path TEXT PRIMARY KEY,
    parent TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    source TEXT NOT NULL,
    version_tag TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    kind TEXT NOT NULL,
    base TEXT NOT NULL,
    metadata TEXT NOT NULL,
    generation INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    chunks BLOB NOT NULL
);
-- covers the listing columns, so a page is one index range scan
CREATE INDEX files_by_parent ON files (parent, name, path, size, mtime, kind, sha256, generation, chunk_count);
CREATE TABLE dirs (
    path TEXT PRIMARY KEY,
    parent TEXT,
    name TEXT NOT NULL,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX dirs_by_parent ON dirs (parent, name, bytes);
INSERT INTO dirs VALUES ('/', NULL, '', 0, 0);
CREATE TABLE chunks (id BLOB PRIMARY KEY, length INTEGER NOT NULL, refs INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE pins (path TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    role TEXT NOT NULL,
    host_id TEXT NOT NULL,
    pool_dir TEXT NOT NULL,
    used INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    last_seen REAL NOT NULL
);
"""

#: Statements that take a database of version N-1 to N.
_MIGRATIONS = {
    2: """
INSERT INTO counters VALUES ('auth_generation', 0);
CREATE TABLE tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    revoked REAL NOT NULL
) WITHOUT ROWID;
""",
    3: """
ALTER TABLE nodes ADD COLUMN zone TEXT NOT NULL DEFAULT '';
CREATE TABLE replicas (path TEXT PRIMARY KEY, replicas INTEGER NOT NULL) WITHOUT ROWID;
""",
}

_ENTRY_COLS = "path, size, mtime, kind, sha256, generation, chunk_count"
_MANIFEST_COLS = "path, size, mtime, source, version_tag, sha256, kind, base, metadata, generation, chunks"
_NODE_COLS = "node_id, address, capacity, role, host_id, pool_dir, used, chunks, last_seen, zone"


def _dir_entry(path: str, nbytes: int) -> Entry:
    return Entry(path, True, size=nbytes)


class _Job:
    """One caller's piece of a group-committed write transaction."""

    __slots__ = ("work", "durable", "result", "error", "done")

    def __init__(self, work: Callable[[sqlite3.Connection], Any], durable: bool) -> None:
        self.work = work
        self.durable = durable  # False: liveness only, worth no fsync of its own
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False


class SqliteStore(MetaStore):
    """:class:`MetaStore` in one SQLite database file (created if missing)."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = Path(db_path)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Job] = []
        self._closed = False
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReadOnly(f"cannot create {self.db_path.parent}: {exc.strerror}") from None

        def work(conn: sqlite3.Connection) -> None:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"{self.db_path}: metadata schema version {version} was written by a newer sdcache; "
                    f"this one reads up to version {SCHEMA_VERSION} and changed nothing"
                )
            scripts = [_SCHEMA] if version == 0 else []
            scripts += [_MIGRATIONS[v] for v in range(max(version, 1) + 1, SCHEMA_VERSION + 1)]
            for script in scripts:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

        try:
            self._write(work)
        except BaseException:
            self.close()  # a database this sdcache cannot use keeps no connection open
            raise

    # -- connections and transactions ---------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise SdcacheError("metadata store is closed")
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA cache_size = -32768")  # 32 MiB
            self._local.conn = conn
            self._local.durable = True  # what PRAGMA synchronous is set to: FULL
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _translated(self, exc: sqlite3.Error) -> SdcacheError:
        """The sdcache error for an SQLite one."""
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL:
            err: SdcacheError = CapacityExceeded(f"metadata store {self.db_path}: disk full")
        elif code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
            err = ReadOnly(f"metadata store {self.db_path}: {exc}")
        else:
            err = SdcacheError(f"metadata store {self.db_path}: {exc}")
        err.__cause__ = exc
        return err

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """Turn SQLite's exceptions into sdcache errors."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self._translated(exc) from exc

    def _write(self, work: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run *work* in a write transaction; return once it is durable (unless not *durable*).

        Group commit: callers queue their work; whoever holds the write lock
        runs everything queued so far in one transaction, each piece inside
        its own savepoint (a failing piece rolls back alone), and pays for
        one fsync. Concurrent writers thus share fsyncs instead of queueing
        behind one each. A transaction of only non-*durable* work (heartbeats)
        commits without an fsync (see the module docstring).
        """
        job = _Job(work, durable)
        with self._queue_lock:
            self._queue.append(job)
        with self._write_lock:
            if not job.done:
                with self._queue_lock:
                    jobs, self._queue = self._queue, []
                self._run_jobs(jobs)
        if job.error is not None:
            raise job.error
        return job.result

    def _run_jobs(self, jobs: list[_Job]) -> None:
        try:
            with self._translate():
                conn = self._conn()
                durable = any(job.durable for job in jobs)
                if durable != self._local.durable:  # a pragma, so set between transactions
                    conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                    self._local.durable = durable
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for job in jobs:
                        conn.execute("SAVEPOINT job")
                        try:
                            job.result = job.work(conn)
                        except Exception as exc:  # noqa: BLE001 - handed to the job's caller
                            conn.execute("ROLLBACK TO job")
                            job.error = exc
                        conn.execute("RELEASE job")
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        except Exception as exc:  # noqa: BLE001 - the transaction failed: so did every job in it
            for job in jobs:
                job.error = exc
        for job in jobs:
            if isinstance(job.error, sqlite3.Error):
                job.error = self._translated(job.error)
            job.done = True

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query inside sees the same snapshot."""
        with self._translate():
            conn = self._conn()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    # -- helpers inside a transaction ----------------------------------------

    @staticmethod
    def _counter(conn: sqlite3.Connection, name: str) -> int:
        return conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str) -> int:
        conn.execute("UPDATE counters SET value = value + 1 WHERE name = ?", (name,))
        return SqliteStore._counter(conn, name)

    @staticmethod
    def _is_dir(conn: sqlite3.Connection, path: str) -> bool:
        return conn.execute("SELECT 1 FROM dirs WHERE path = ?", (path,)).fetchone() is not None

    @staticmethod
    def _adjust_dirs(conn: sqlite3.Connection, dirs: list[str], dfiles: int, dbytes: int) -> None:
        """Add to the subtree totals of *dirs*; drop those left without files."""
        conn.executemany(
            "UPDATE dirs SET files = files + ?, bytes = bytes + ? WHERE path = ?",
            [(dfiles, dbytes, d) for d in dirs],
        )
        if dfiles < 0:
            conn.executemany("DELETE FROM dirs WHERE path = ? AND files <= 0 AND path != '/'", [(d,) for d in dirs])

    @staticmethod
    def _ref_chunks(conn: sqlite3.Connection, blobs: Iterable[bytes], sign: int) -> None:
        counts, lengths = _chunk_counts(blobs)
        if sign > 0:
            conn.executemany(
                "INSERT INTO chunks VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE SET refs = refs + excluded.refs",
                [(d, lengths[d], n) for d, n in counts.items()],
            )
        else:
            conn.executemany("UPDATE chunks SET refs = refs - ? WHERE id = ?", [(n, d) for d, n in counts.items()])
            conn.executemany("DELETE FROM chunks WHERE id = ? AND refs <= 0", [(d,) for d in counts])

    def _subtree_of_dir(self, conn: sqlite3.Connection, path: str, recursive: bool) -> tuple[str, str]:
        """Subtree bounds of directory *path*, for a command that needs *recursive*.

        Call after *path* turned out not to be a file.
        """
        if not self._is_dir(conn, path):
            raise NotFound(f"{path}: no such file or directory")
        if not recursive:
            raise IsADirectory(f"{path} is a directory (use recursive)")
        return _subtree(path)

    def _file_paths(self, conn: sqlite3.Connection, path: str, recursive: bool) -> list[str]:
        """Files a command on *path* acts on (see :meth:`resolve_files`)."""
        if conn.execute("SELECT 1 FROM files WHERE path = ?", (path,)).fetchone():
            return [path]
        lo, hi = self._subtree_of_dir(conn, path, recursive)
        rows = conn.execute("SELECT path FROM files WHERE path > ? AND path < ? ORDER BY path", (lo, hi))
        return [r[0] for r in rows]

    # -- namespace -----------------------------------------------------------

    def stat(self, path: str) -> Entry:
        path = paths.normalize(path)
        with self._read() as conn:
            row = conn.execute(f"SELECT {_ENTRY_COLS} FROM files WHERE path = ?", (path,)).fetchone()
            if row:
                return file_entry(row)
            row = conn.execute("SELECT bytes FROM dirs WHERE path = ?", (path,)).fetchone()
        if row:
            return _dir_entry(path, row[0])
        raise NotFound(f"{path}: no such file or directory")

    def get_manifest(self, path: str) -> Manifest:
        path = paths.normalize(path)
        with self._read() as conn:
            row = conn.execute(f"SELECT {_MANIFEST_COLS} FROM files WHERE path = ?", (path,)).fetchone()
            if row:
                return manifest_of(row)
            if self._is_dir(conn, path):
                raise IsADirectory(f"{path} is a directory")
        raise NotFound(f"{path}: no such file")

    def list_dir(self, path: str, page_token: str = "", page_size: int = 0) -> tuple[list[Entry], str]:
        path = paths.normalize(path)
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        with self._read() as conn:
            row = conn.execute(f"SELECT {_ENTRY_COLS} FROM files WHERE path = ?", (path,)).fetchone()
            if row:
                return [file_entry(row)], ""
            if not self._is_dir(conn, path):
                raise NotFound(f"{path}: no such file or directory")
            dirs = conn.execute(
                "SELECT name, path, bytes FROM dirs WHERE parent = ? AND name > ? ORDER BY name LIMIT ?",
                (path, page_token, limit + 1),
            ).fetchall()
            files = conn.execute(
                f"SELECT name, {_ENTRY_COLS} FROM files WHERE parent = ? AND name > ? ORDER BY name LIMIT ?",
                (path, page_token, limit + 1),
            ).fetchall()
        rows = list(heapq.merge(dirs, files, key=lambda r: r[0]))
        entries = [_dir_entry(r[1], r[2]) if len(r) == 3 else file_entry(r[1:]) for r in rows[:limit]]
        token = rows[limit - 1][0] if len(rows) > limit else ""
        return entries, token

    def commit(self, manifest: Manifest) -> int:
        path = paths.normalize(manifest.path)
        if path == "/":
            raise IsADirectory("/ is a directory")
        manifest.path = path
        blob = _pack_valid(manifest)
        ancestors = paths.ancestors(path)

        def work(conn: sqlite3.Connection) -> int:
            if self._is_dir(conn, path):
                raise IsADirectory(f"{path} is a directory")
            marks = ",".join("?" * len(ancestors))
            clash = conn.execute(f"SELECT path FROM files WHERE path IN ({marks})", ancestors).fetchone()
            if clash:
                raise NotADirectory(f"{path}: {clash[0]} is a file, not a directory")
            old = conn.execute("SELECT size, chunks FROM files WHERE path = ?", (path,)).fetchone()
            generation = self._bump(conn, "generation")
            conn.execute(
                f"INSERT OR REPLACE INTO files (parent, name, chunk_count, {_MANIFEST_COLS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    paths.parent(path),
                    paths.basename(path),
                    len(manifest.chunks),
                    path,
                    manifest.size,
                    manifest.mtime,
                    manifest.source,
                    manifest.version_tag,
                    manifest.sha256,
                    manifest.kind,
                    manifest.base,
                    manifest.metadata_json(),
                    generation,
                    blob,
                ),
            )
            if old is None:
                conn.executemany(
                    "INSERT INTO dirs VALUES (?, ?, ?, 1, ?)"
                    " ON CONFLICT (path) DO UPDATE SET files = files + 1, bytes = bytes + excluded.bytes",
                    [(d, paths.parent(d) if d != "/" else None, paths.basename(d), manifest.size) for d in ancestors],
                )
            else:
                self._adjust_dirs(conn, ancestors, 0, manifest.size - old[0])
                self._ref_chunks(conn, [old[1]], -1)
            self._ref_chunks(conn, [blob], +1)
            if conn.execute("SELECT 1 FROM pins WHERE path = ?", (path,)).fetchone():
                self._bump(conn, "pins_generation")
            return generation

        generation = self._write(work)
        manifest.generation = generation
        log.debug("committed %s generation %d", path, generation)
        return generation

    def delete(self, path: str, recursive: bool = False) -> int:
        path = paths.normalize(path)

        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT size, chunks FROM files WHERE path = ?", (path,)).fetchone()
            if row:
                conn.execute("DELETE FROM files WHERE path = ?", (path,))
                self._adjust_dirs(conn, paths.ancestors(path), -1, -row[0])
                self._ref_chunks(conn, [row[1]], -1)
                if conn.execute("DELETE FROM pins WHERE path = ?", (path,)).rowcount:
                    self._bump(conn, "pins_generation")
                return 1
            row = conn.execute("SELECT files, bytes FROM dirs WHERE path = ?", (path,)).fetchone()
            if row is None:
                raise NotFound(f"{path}: no such file or directory")
            nfiles, nbytes = row
            if nfiles == 0:
                return 0
            if not recursive:
                raise IsADirectory(f"{path} is a non-empty directory (use recursive)")
            lo, hi = _subtree(path)
            blobs = [r[0] for r in conn.execute("SELECT chunks FROM files WHERE path > ? AND path < ?", (lo, hi))]
            self._ref_chunks(conn, blobs, -1)
            conn.execute("DELETE FROM files WHERE path > ? AND path < ?", (lo, hi))
            conn.execute("DELETE FROM dirs WHERE path > ? AND path < ?", (lo, hi))
            self._adjust_dirs(conn, [*paths.ancestors(path), path] if path != "/" else ["/"], -nfiles, -nbytes)
            if conn.execute("DELETE FROM pins WHERE path > ? AND path < ?", (lo, hi)).rowcount:
                self._bump(conn, "pins_generation")
            return nfiles

        return self._write(work)

    def resolve_files(self, path: str, recursive: bool = False) -> list[Manifest]:
        path = paths.normalize(path)
        with self._read() as conn:
            row = conn.execute(f"SELECT {_MANIFEST_COLS} FROM files WHERE path = ?", (path,)).fetchone()
            if row:
                return [manifest_of(row)]
            lo, hi = self._subtree_of_dir(conn, path, recursive)
            rows = conn.execute(
                f"SELECT {_MANIFEST_COLS} FROM files WHERE path > ? AND path < ? ORDER BY path", (lo, hi)
            ).fetchall()
        return [manifest_of(r) for r in rows]

    # -- pins ----------------------------------------------------------------

    def pin(self, path: str, recursive: bool = False) -> int:
        return self._change_pins(path, recursive, "INSERT OR IGNORE INTO pins VALUES (?)")[0]

    def unpin(self, path: str, recursive: bool = False) -> int:
        return self._change_pins(path, recursive, "DELETE FROM pins WHERE path = ?")[1]

    def _change_pins(self, path: str, recursive: bool, statement: str) -> tuple[int, int]:
        """Run *statement* for each file of *path*; ``(files, pins changed)``."""
        path = paths.normalize(path)

        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            files = self._file_paths(conn, path, recursive)
            before = conn.total_changes
            conn.executemany(statement, [(p,) for p in files])
            changed = conn.total_changes - before
            if changed:
                self._bump(conn, "pins_generation")
            return len(files), changed

        return self._write(work)

    def pins_generation(self) -> int:
        with self._read() as conn:
            return self._counter(conn, "pins_generation")

    def pinned_chunks(self) -> tuple[int, bytes]:
        with self._read() as conn:
            generation = self._counter(conn, "pins_generation")
            blobs = [r[0] for r in conn.execute("SELECT f.chunks FROM pins p JOIN files f ON f.path = p.path")]
        ids: set[bytes] = set()
        for blob in blobs:
            ids.update(blob[i + _ID.start : i + _ID.stop] for i in range(0, len(blob), CHUNK_ENTRY.size))
        return generation, b"".join(sorted(ids))

    # -- nodes ---------------------------------------------------------------

    def register_node(self, node: NodeRecord) -> None:

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM nodes WHERE address = ? AND node_id != ?", (node.address, node.node_id))
            conn.execute(
                f"INSERT OR REPLACE INTO nodes ({_NODE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    node.node_id,
                    node.address,
                    node.capacity,
                    node.role,
                    node.host_id,
                    node.pool_dir,
                    node.used,
                    node.chunks,
                    node.last_seen,
                    node.zone,
                ),
            )

        self._write(work)

    def heartbeat(self, node_id: str, used: int, chunks: int, now: float) -> bool:

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE nodes SET used = ?, chunks = ?, last_seen = ? WHERE node_id = ?", (used, chunks, now, node_id)
            )
            return cur.rowcount > 0

        return self._write(work, durable=False)

    def list_nodes(self) -> list[NodeRecord]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_NODE_COLS} FROM nodes ORDER BY node_id").fetchall()
        return [NodeRecord(*r) for r in rows]

    # -- replica policy ------------------------------------------------------

    def set_replicas(self, path: str, replicas: int) -> None:
        path = paths.normalize(path)

        def work(conn: sqlite3.Connection) -> None:
            if replicas:
                conn.execute("INSERT OR REPLACE INTO replicas VALUES (?, ?)", (path, replicas))
            else:
                conn.execute("DELETE FROM replicas WHERE path = ?", (path,))

        self._write(work)

    def replica_overrides(self) -> dict[str, int]:
        with self._read() as conn:
            return dict(conn.execute("SELECT path, replicas FROM replicas ORDER BY path").fetchall())

    # -- tokens --------------------------------------------------------------

    def add_token(self, token: TokenRecord) -> None:

        def work(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM tokens WHERE name = ?", (token.name,)).fetchone():
                raise AlreadyExists(f"a token named {token.name!r} exists already (names are never reused)")
            conn.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?)",
                         (token.name, token.role, token.created, token.expires, token.revoked))

        self._write(work)

    def list_tokens(self) -> list[TokenRecord]:
        with self._read() as conn:
            rows = conn.execute("SELECT name, role, created, expires, revoked FROM tokens ORDER BY name").fetchall()
        return [TokenRecord(*r) for r in rows]

    def revoke_token(self, name: str, now: float) -> TokenRecord:

        def work(conn: sqlite3.Connection) -> TokenRecord:
            row = conn.execute("SELECT name, role, created, expires, revoked FROM tokens WHERE name = ?",
                               (name,)).fetchone()
            if row is None:
                rec = TokenRecord(name, "", 0.0, 0.0, now)
                conn.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?)", (name, "", 0.0, 0.0, now))
            else:
                rec = TokenRecord(*row)
                if rec.revoked:
                    return rec
                rec.revoked = now
                conn.execute("UPDATE tokens SET revoked = ? WHERE name = ?", (now, name))
            self._bump(conn, "auth_generation")
            return rec

        return self._write(work)

    def auth_generation(self) -> int:
        with self._read() as conn:
            return self._counter(conn, "auth_generation")

    # -- totals and lifetime -------------------------------------------------

    def stats(self) -> StoreStats:
        with self._read() as conn:
            files, nbytes = conn.execute("SELECT files, bytes FROM dirs WHERE path = '/'").fetchone()
            chunks, chunk_bytes = conn.execute("SELECT count(*), coalesce(sum(length), 0) FROM chunks").fetchone()
            pinned = conn.execute("SELECT count(*) FROM pins").fetchone()[0]
        return StoreStats(files, nbytes, chunks, chunk_bytes, pinned)

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
