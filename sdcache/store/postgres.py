"""The networked metadata store: PostgreSQL through psycopg 3 and a connection pool.

``sdcache meta --db postgresql://USER@HOST:PORT/DB``: several metadata
processes over one database serve one namespace. Nothing a call depends on
lives in one process: generations, pins, the node registry and token
revocations are rows, and every call is one server-side transaction, so
two processes see each other's work as soon as it is committed.

Writes. Every durable write (commit, delete, pin, register, tokens) takes
the row lock of the ``generation`` counter first, so namespace writes are
serialized across processes exactly as SQLite's single writer serializes
them: the checks of a commit (is the path a directory, is an ancestor a
file) and its changes see one settled namespace. Within a process writes
are group-committed like the SQLite store's: whoever holds the write lock
runs everything queued meanwhile in one transaction (one savepoint per
caller), so concurrent callers share one WAL flush; the transaction runs in
pipeline mode, so statements whose answers nothing waits for share round
trips. A write returns once PostgreSQL reported its COMMIT, i.e. once the
WAL is flushed (``synchronous_commit`` on, the server's default): it
survives ``kill -9`` of the metadata process and of the database server. A
write whose COMMIT was sent but not answered fails saying its outcome is
unknown; one whose connection died before that is run once more on another.

Heartbeats use their own small pool whose sessions run with
``synchronous_commit = off``: PostgreSQL writes their WAL without waiting
for the flush (the WAL writer flushes within ``wal_writer_delay``). A crash
of the database server may forget the last fraction of a second of
liveness, never a durable commit (a durable commit flushes all WAL before
it, heartbeats included).

Reads run on autocommit connections and are written as single statements,
so each sees one snapshot and costs one round trip.

Text columns that are compared or ordered use ``COLLATE "C"``: byte order,
the same as SQLite's and Python's code-point order, which the listing page
tokens and the subtree bounds rely on.

Schema versions: table ``schema_migrations`` holds one row per migration
applied; opening the store applies the missing ones in one transaction
under an advisory lock (two processes starting at once migrate once), and a
database with a version newer than this code raises
:class:`~sdcache.errors.SchemaTooNew` and is left alone.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors
from psycopg import pq

from .. import paths
from ..errors import (
    AlreadyExists,
    CapacityExceeded,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NotFound,
    PermissionDenied,
    ReadOnly,
    SchemaTooNew,
    SdcacheError,
    Unavailable,
)
from ..manifest import CHUNK_ENTRY, Entry, Manifest
from ._namespace import ID_SLICE, chunk_counts, file_entry, manifest_of, pack_valid, subtree
from ._pgschema import (
    ENTRY_COLS,
    LISTED_COLS,
    MANIFEST_COLS,
    MIGRATION_LOCK,
    MIGRATIONS,
    NAMESPACE_LOCK,
    NODE_COLS,
    SCHEMA_VERSION,
    TOKEN_COLS,
    UNPIN_BUMP,
)
from ._pgtarget import CONNECT_TIMEOUT, Target, connect_error, one_line
from .base import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MetaStore, NodeRecord, StoreStats, TokenRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a call waits for a pooled connection. The servicer never has more
#: calls in flight than the pool has connections, so a wait means the server is
#: unreachable: answer Unavailable well before a client's own deadline.
POOL_WAIT = 3.0
POOL_OPEN = 10.0  # seconds for the pool's first connections (the server just answered one)
POOL_SIZE = (2, 12)  # min, max connections per process: 4 reader + 8 writer threads in the servicer
LIVENESS_POOL_SIZE = (1, 4)
class _Job:
    """One caller's piece of a group-committed write transaction."""

    __slots__ = ("work", "result", "error", "done")

    def __init__(self, work: Callable[[psycopg.Connection], Any]) -> None:
        self.work = work
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False


class _CommitSent(Exception):
    """Marks a failure after COMMIT was sent: the outcome is unknown, so the batch is not retried."""


def _settle(pipe: psycopg.Pipeline) -> None:
    """Sync *pipe* after a failure, whose error (already raised once) is not news."""
    try:
        pipe.sync()
    except psycopg.Error:
        pass


def _liveness_session(conn: psycopg.Connection) -> None:
    conn.execute("SET synchronous_commit = off")


class PostgresStore(MetaStore):
    """:class:`MetaStore` in one PostgreSQL database (tables created or migrated on open).

    *url* is a libpq URL or conninfo string (``postgresql://user:pw@host:port/db``;
    a password may also come from ``$PGPASSWORD`` or ``~/.pgpass``). Raises,
    with one line naming the part that is wrong: :class:`Unavailable` (host
    or port), :class:`Unauthenticated` (user or password), :class:`NotFound`
    (database), :class:`PermissionDenied`, :class:`InvalidArgument` (not a
    URL), :class:`SchemaTooNew`.
    """

    def __init__(self, url: str, *, pool_wait: float = POOL_WAIT) -> None:
        self.target = Target.parse(url)
        self._pool_wait = pool_wait
        self._where = self.target.where()
        self._write_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Job] = []
        self._closed = False
        options = {"autocommit": True}
        given = {o.keyword.decode() for o in pq.Conninfo.parse(url.encode()) if o.val is not None}
        if "connect_timeout" not in given:
            options["connect_timeout"] = CONNECT_TIMEOUT
        if "application_name" not in given:
            options["application_name"] = "sdcache-meta"
        self._url, self._options = url, options
        try:
            first = psycopg.connect(url, **options)
        except psycopg.OperationalError as exc:
            raise connect_error(url, self.target, exc) from None
        except psycopg.Error as exc:
            raise self._translated(exc) from None
        with first:
            try:
                self._migrate(first)
            except psycopg.Error as exc:
                raise self._translated(exc) from None
        self._pool = psycopg_pool.ConnectionPool(
            url, kwargs=options, min_size=POOL_SIZE[0], max_size=POOL_SIZE[1], timeout=pool_wait,
            name="sdcache-meta", open=False)
        self._liveness = psycopg_pool.ConnectionPool(
            url, kwargs=options, min_size=LIVENESS_POOL_SIZE[0], max_size=LIVENESS_POOL_SIZE[1],
            timeout=pool_wait, configure=_liveness_session, name="sdcache-liveness", open=False)
        try:
            self._pool.open(wait=True, timeout=POOL_OPEN)
            self._liveness.open(wait=True, timeout=POOL_OPEN)
        except psycopg_pool.PoolTimeout:
            self.close()
            raise Unavailable(f"{self._where}: the connection pool could not open within {POOL_OPEN:.0f} s") from None
        log.info("metadata store: %s, schema version %d", self._where, SCHEMA_VERSION)

    # -- schema --------------------------------------------------------------

    def _migrate(self, conn: psycopg.Connection) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION` in one transaction, or refuse a newer one."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                         " version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
                         " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(f"{self._where}: metadata schema version {version} was written by a newer "
                                   f"sdcache; this one reads up to version {SCHEMA_VERSION} and changed nothing")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                description, script = MIGRATIONS[v]
                conn.execute(script)
                conn.execute("INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
                             (v, description))
                log.info("metadata schema migrated to version %d (%s)", v, description)

    # -- connections and transactions ---------------------------------------

    def _translated(self, exc: psycopg.Error) -> SdcacheError:
        """The sdcache error for a psycopg one, by class and SQLSTATE."""
        if isinstance(exc, psycopg_pool.PoolTimeout):
            err: SdcacheError = Unavailable(f"{self._where}: no database connection within {self._pool_wait:g} s "
                                            f"(is the server up?)")
        elif isinstance(exc, pg_errors.DiskFull | pg_errors.OutOfMemory):
            err = CapacityExceeded(f"{self._where}: {one_line(exc)}")
        elif isinstance(exc, pg_errors.ReadOnlySqlTransaction):
            err = ReadOnly(f"{self._where} is read-only (a standby?): {one_line(exc)}")
        elif isinstance(exc, pg_errors.InsufficientPrivilege):
            err = PermissionDenied(f"{self._where}: {one_line(exc)}")
        elif isinstance(exc, psycopg.OperationalError):  # connection lost, server shutting down or starting
            err = Unavailable(f"{self._where}: {one_line(exc)}")
        elif isinstance(exc, psycopg.DataError):
            err = InvalidArgument(f"{self._where}: {one_line(exc)}")
        else:
            err = SdcacheError(f"{self._where}: {one_line(exc)}")
        err.__cause__ = exc
        return err

    @contextmanager
    def _connection(self, pool: psycopg_pool.ConnectionPool) -> Iterator[psycopg.Connection]:
        """A connection from *pool*; a direct one when the pool has none to give within its wait.

        After the server was down, the pool reconnects on a backoff that grows
        to minutes; a call meanwhile connects directly (failing at once, with
        where and why, while the server is still down) instead of waiting it out.
        """
        if self._closed:
            raise SdcacheError("metadata store is closed")
        try:
            conn = pool.getconn()
        except psycopg_pool.PoolTimeout:
            conn = None
        if conn is not None:
            try:
                yield conn
            finally:
                pool.putconn(conn)
            return
        try:
            direct = psycopg.connect(self._url, **self._options)
        except psycopg.OperationalError as exc:
            raise connect_error(self._url, self.target, exc) from None
        with direct:
            if pool is self._liveness:
                _liveness_session(direct)
            yield direct

    def _run(self, pool: psycopg_pool.ConnectionPool, fn: Callable[[psycopg.Connection], T]) -> T:
        """*fn* on a pooled connection; once more on another if the first was dead.

        For reads and idempotent writes: after the database server restarted,
        every pooled connection is dead, and the first call on each finds out.
        """
        try:
            with self._connection(pool) as conn:
                try:
                    return fn(conn)
                except psycopg.OperationalError:
                    if not conn.broken:
                        raise
            pool.check()  # that connection was dead: drop the other dead ones too, then once more
            with self._connection(pool) as conn:
                return fn(conn)
        except psycopg.Error as exc:
            raise self._translated(exc) from exc

    def _read(self, fn: Callable[[psycopg.Connection], T]) -> T:
        return self._run(self._pool, fn)

    def _write(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run *work* in a write transaction holding the namespace lock; return once durable.

        Group commit, as in the SQLite store: callers queue their work;
        whoever holds the write lock runs everything queued so far in one
        transaction, each piece in its own savepoint (a failing piece rolls
        back alone), and waits for one WAL flush.
        """
        job = _Job(work)
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
            for attempt in (1, 2):
                for job in jobs:
                    job.result, job.error = None, None
                try:
                    with self._connection(self._pool) as conn:
                        try:
                            self._batch(conn, jobs)
                            break
                        except psycopg.OperationalError:
                            # Dead before COMMIT was sent: nothing happened, so once more on a live one.
                            if attempt == 2 or not conn.broken:
                                raise
                except _CommitSent as sent:
                    cause = sent.__cause__
                    assert isinstance(cause, psycopg.Error)
                    err = self._translated(cause)
                    raise type(err)(f"{err} (the outcome of this write is unknown: check before retrying)") \
                        from cause
                except psycopg.Error as exc:
                    raise self._translated(exc) from exc
                self._pool.check()
        except Exception as exc:  # noqa: BLE001 - the transaction failed: so did every job in it
            for job in jobs:
                if job.error is None:
                    job.error = exc
        for job in jobs:
            if isinstance(job.error, psycopg.Error):
                job.error = self._translated(job.error)
            job.done = True

    @staticmethod
    def _batch(conn: psycopg.Connection, jobs: list[_Job]) -> None:
        """One transaction for *jobs*, in pipeline mode; :class:`_CommitSent` if COMMIT itself failed.

        Pipeline mode sends statements without waiting for each answer, so a
        job costs the round trips of the results it reads plus one sync (at
        which every statement it sent has answered, so its errors are its
        own), not one per statement. Savepoints only when several jobs share
        the transaction.
        """
        several = len(jobs) > 1
        with conn.pipeline() as pipe:
            try:
                conn.execute("BEGIN")
                conn.execute(NAMESPACE_LOCK)
                for job in jobs:
                    if several:
                        conn.execute("SAVEPOINT job")
                    try:
                        job.result = job.work(conn)
                        pipe.sync()
                    except psycopg.OperationalError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - handed to the job's caller
                        job.error = exc
                        if not several:
                            raise
                        _settle(pipe)
                        conn.execute("ROLLBACK TO SAVEPOINT job")
                    if several:
                        conn.execute("RELEASE SAVEPOINT job")
            except BaseException:
                if not conn.broken:
                    _settle(pipe)
                    conn.execute("ROLLBACK")
                    _settle(pipe)
                raise
            try:
                conn.execute("COMMIT")
                pipe.sync()
            except psycopg.Error as exc:
                raise _CommitSent() from exc

    # -- helpers inside a transaction ----------------------------------------

    @staticmethod
    def _adjust_dirs(conn: psycopg.Connection, dirs: list[str], dfiles: int, dbytes: int) -> None:
        """Add to the subtree totals of *dirs*; drop those left without files."""
        conn.execute("UPDATE dirs SET files = files + %s, bytes = bytes + %s WHERE path = ANY(%s)",
                     (dfiles, dbytes, dirs))
        if dfiles < 0:
            conn.execute("DELETE FROM dirs WHERE path = ANY(%s) AND files <= 0 AND path <> '/'", (dirs,))

    @staticmethod
    def _ref_chunks(conn: psycopg.Connection, added: Iterable[bytes], removed: Iterable[bytes]) -> None:
        """Apply the chunk reference changes of tables *added* and *removed*, netted per chunk."""
        plus, lengths = chunk_counts(added)
        minus, old_lengths = chunk_counts(removed)
        delta = {d: plus.get(d, 0) - minus.get(d, 0) for d in plus.keys() | minus.keys()}
        delta = {d: n for d, n in delta.items() if n}
        if not delta:
            return
        ids = list(delta)
        conn.execute(
            "INSERT INTO chunks (id, length, refs) SELECT * FROM unnest(%s::bytea[], %s::integer[], %s::bigint[])"
            " ON CONFLICT (id) DO UPDATE SET refs = chunks.refs + excluded.refs",
            (ids, [lengths.get(d) or old_lengths[d] for d in ids], [delta[d] for d in ids]),
        )
        dropped = [d for d in ids if delta[d] < 0]
        if dropped:
            conn.execute("DELETE FROM chunks WHERE id = ANY(%s) AND refs <= 0", (dropped,))

    @staticmethod
    def _file_paths(conn: psycopg.Connection, path: str, recursive: bool) -> list[str]:
        """Files a command on *path* acts on (see :meth:`resolve_files`)."""
        lo, hi = subtree(path)
        rows = conn.execute(
            "SELECT 0, path FROM files WHERE path = %(p)s"
            " UNION ALL SELECT 1, path FROM dirs WHERE path = %(p)s"
            " UNION ALL SELECT 2, path FROM files WHERE %(r)s AND path > %(lo)s AND path < %(hi)s",
            {"p": path, "r": recursive, "lo": lo, "hi": hi},
        ).fetchall()
        kinds = {k for k, _ in rows}
        if 0 in kinds:
            return [path]
        if 1 not in kinds:
            raise NotFound(f"{path}: no such file or directory")
        if not recursive:
            raise IsADirectory(f"{path} is a directory (use recursive)")
        return sorted(p for k, p in rows if k == 2)

    # -- namespace -----------------------------------------------------------

    def stat(self, path: str) -> Entry:
        path = paths.normalize(path)

        def fn(conn: psycopg.Connection) -> tuple | None:
            return conn.execute(
                f"SELECT false, {ENTRY_COLS} FROM files WHERE path = %(p)s"
                " UNION ALL SELECT true, path, bytes, NULL, NULL, NULL, NULL, NULL FROM dirs WHERE path = %(p)s",
                {"p": path},
                binary=True,
            ).fetchone()

        row = self._read(fn)
        if row is None:
            raise NotFound(f"{path}: no such file or directory")
        if row[0]:
            return Entry(path, True, size=row[2])
        return file_entry(row[1:])

    def get_manifest(self, path: str) -> Manifest:
        path = paths.normalize(path)

        def fn(conn: psycopg.Connection) -> tuple | None:
            return conn.execute(
                f"SELECT false, {MANIFEST_COLS} FROM files WHERE path = %(p)s"
                " UNION ALL SELECT true, path, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL"
                " FROM dirs WHERE path = %(p)s",
                {"p": path},
                binary=True,
            ).fetchone()

        row = self._read(fn)
        if row is None:
            raise NotFound(f"{path}: no such file")
        if row[0]:
            raise IsADirectory(f"{path} is a directory")
        return manifest_of(row[1:])

    def list_dir(self, path: str, page_token: str = "", page_size: int = 0) -> tuple[list[Entry], str]:
        path = paths.normalize(path)
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)

        def fn(conn: psycopg.Connection) -> list[tuple]:
            # One statement, so one snapshot: the path itself (file or directory), then one
            # page of subdirectories and one of files, each by name. Children come without
            # their path (parent + name), in binary: a 10,000-entry page is half the bytes.
            return conn.execute(
                f"(SELECT 0 AS k, name, {LISTED_COLS} FROM files WHERE path = %(p)s)"
                " UNION ALL (SELECT 1, name, bytes, NULL, NULL, NULL, NULL, NULL FROM dirs WHERE path = %(p)s)"
                " UNION ALL (SELECT 2, name, bytes, NULL, NULL, NULL, NULL, NULL FROM dirs"
                "  WHERE parent = %(p)s AND name > %(t)s ORDER BY name LIMIT %(n)s)"
                f" UNION ALL (SELECT 3, name, {LISTED_COLS} FROM files"
                "  WHERE parent = %(p)s AND name > %(t)s ORDER BY name LIMIT %(n)s)",
                {"p": path, "t": page_token, "n": limit + 1},
                binary=True,
            ).fetchall()

        rows = self._read(fn)
        dirs: list[tuple] = []
        files: list[tuple] = []
        found_dir = False
        for row in rows:
            k = row[0]
            if k == 0:
                return [Entry(path, False, *row[2:])], ""
            if k == 1:
                found_dir = True
            elif k == 2:
                dirs.append(row)
            else:
                files.append(row)
        if not found_dir:
            raise NotFound(f"{path}: no such file or directory")
        dirs.sort(key=lambda r: r[1])  # already in order: a linear pass
        files.sort(key=lambda r: r[1])
        merged = list(heapq.merge(dirs, files, key=lambda r: r[1]))
        prefix = "" if path == "/" else path
        entries = [Entry(f"{prefix}/{r[1]}", True, size=r[2]) if r[0] == 2
                   else Entry(f"{prefix}/{r[1]}", False, *r[2:]) for r in merged[:limit]]
        token = merged[limit - 1][1] if len(merged) > limit else ""
        return entries, token

    def commit(self, manifest: Manifest) -> int:
        path = paths.normalize(manifest.path)
        if path == "/":
            raise IsADirectory("/ is a directory")
        manifest.path = path
        blob = pack_valid(manifest)
        ancestors = paths.ancestors(path)

        def work(conn: psycopg.Connection) -> int:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM dirs WHERE path = %(p)s),"
                " (SELECT min(path) FROM files WHERE path = ANY(%(a)s)),"
                " EXISTS (SELECT 1 FROM pins WHERE path = %(p)s),"
                " old.size, old.chunks"
                " FROM (SELECT 1) AS one LEFT JOIN files AS old ON old.path = %(p)s",
                {"p": path, "a": ancestors},
            ).fetchone()
            assert row is not None
            is_dir, clash, pinned, old_size, old_chunks = row
            if is_dir:
                raise IsADirectory(f"{path} is a directory")
            if clash:
                raise NotADirectory(f"{path}: {clash} is a file, not a directory")
            # Pipelined (see _batch): these are sent without waiting; the one
            # result read, the generation, comes back with all their answers.
            if old_size is None:
                conn.execute(
                    "INSERT INTO dirs (path, parent, name, files, bytes)"
                    " SELECT d, p, n, 1, %s FROM unnest(%s::text[], %s::text[], %s::text[]) AS t(d, p, n)"
                    " ON CONFLICT (path) DO UPDATE SET files = dirs.files + 1, bytes = dirs.bytes + excluded.bytes",
                    (manifest.size, ancestors, [paths.parent(d) if d != "/" else None for d in ancestors],
                     [paths.basename(d) for d in ancestors]),
                )
                self._ref_chunks(conn, [blob], [])
            else:
                self._adjust_dirs(conn, ancestors, 0, manifest.size - old_size)
                self._ref_chunks(conn, [blob], [bytes(old_chunks)])
            if pinned:
                conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'pins_generation'")
            row = conn.execute(
                "WITH g AS (UPDATE counters SET value = value + 1 WHERE name = 'generation' RETURNING value)"
                f" INSERT INTO files (parent, name, chunk_count, {MANIFEST_COLS})"
                " SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, g.value, %s FROM g"
                " ON CONFLICT (path) DO UPDATE SET size = excluded.size, mtime = excluded.mtime,"
                " source = excluded.source, version_tag = excluded.version_tag, sha256 = excluded.sha256,"
                " kind = excluded.kind, base = excluded.base, metadata = excluded.metadata,"
                " generation = excluded.generation, chunk_count = excluded.chunk_count, chunks = excluded.chunks"
                " RETURNING generation",
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
                    blob,
                ),
            ).fetchone()
            assert row is not None
            return row[0]

        generation = self._write(work)
        manifest.generation = generation
        log.debug("committed %s generation %d", path, generation)
        return generation

    def delete(self, path: str, recursive: bool = False) -> int:
        path = paths.normalize(path)

        def work(conn: psycopg.Connection) -> int:
            row = conn.execute("DELETE FROM files WHERE path = %s RETURNING size, chunks", (path,)).fetchone()
            if row:
                self._adjust_dirs(conn, paths.ancestors(path), -1, -row[0])
                self._ref_chunks(conn, [], [bytes(row[1])])
                conn.execute(UNPIN_BUMP.format(where="path = %s"), (path,))
                return 1
            row = conn.execute("SELECT files, bytes FROM dirs WHERE path = %s", (path,)).fetchone()
            if row is None:
                raise NotFound(f"{path}: no such file or directory")
            nfiles, nbytes = row
            if nfiles == 0:
                return 0
            if not recursive:
                raise IsADirectory(f"{path} is a non-empty directory (use recursive)")
            lo, hi = subtree(path)
            blobs = [bytes(r[0]) for r in conn.execute(
                "DELETE FROM files WHERE path > %s AND path < %s RETURNING chunks", (lo, hi))]
            self._ref_chunks(conn, [], blobs)
            conn.execute("DELETE FROM dirs WHERE path > %s AND path < %s", (lo, hi))
            self._adjust_dirs(conn, [*paths.ancestors(path), path] if path != "/" else ["/"], -nfiles, -nbytes)
            conn.execute(UNPIN_BUMP.format(where="path > %s AND path < %s"), (lo, hi))
            return nfiles

        return self._write(work)

    def resolve_files(self, path: str, recursive: bool = False) -> list[Manifest]:
        path = paths.normalize(path)
        lo, hi = subtree(path)
        nulls = ", ".join(["NULL"] * 10)

        def fn(conn: psycopg.Connection) -> list[tuple]:
            return conn.execute(
                f"SELECT 0, {MANIFEST_COLS} FROM files WHERE path = %(p)s"
                f" UNION ALL SELECT 1, path, {nulls} FROM dirs WHERE path = %(p)s"
                f" UNION ALL SELECT 2, {MANIFEST_COLS} FROM files WHERE %(r)s AND path > %(lo)s AND path < %(hi)s",
                {"p": path, "r": recursive, "lo": lo, "hi": hi},
                binary=True,
            ).fetchall()

        rows = self._read(fn)
        for row in rows:
            if row[0] == 0:
                return [manifest_of(row[1:])]
        if not any(row[0] == 1 for row in rows):
            raise NotFound(f"{path}: no such file or directory")
        if not recursive:
            raise IsADirectory(f"{path} is a directory (use recursive)")
        return sorted((manifest_of(row[1:]) for row in rows if row[0] == 2), key=lambda m: m.path)

    # -- pins ----------------------------------------------------------------

    def pin(self, path: str, recursive: bool = False) -> int:
        return self._change_pins(
            path, recursive,
            "INSERT INTO pins SELECT unnest(%s::text[]) ON CONFLICT (path) DO NOTHING RETURNING path")[0]

    def unpin(self, path: str, recursive: bool = False) -> int:
        return self._change_pins(path, recursive, "DELETE FROM pins WHERE path = ANY(%s) RETURNING path")[1]

    def _change_pins(self, path: str, recursive: bool, statement: str) -> tuple[int, int]:
        """Run *statement* over the files of *path*; ``(files, pins changed)``."""
        path = paths.normalize(path)

        def work(conn: psycopg.Connection) -> tuple[int, int]:
            files = self._file_paths(conn, path, recursive)
            changed = len(conn.execute(statement, (files,)).fetchall()) if files else 0
            if changed:
                conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'pins_generation'")
            return len(files), changed

        return self._write(work)

    def pins_generation(self) -> int:
        return self._counter("pins_generation")

    def pinned_chunks(self) -> tuple[int, bytes]:
        def fn(conn: psycopg.Connection) -> list[tuple]:
            return conn.execute(  # one statement, one snapshot: the generation and its pins
                "SELECT value, NULL::bytea FROM counters WHERE name = 'pins_generation'"
                " UNION ALL SELECT NULL, f.chunks FROM pins AS p JOIN files AS f ON f.path = p.path"
            ).fetchall()

        generation = 0
        ids: set[bytes] = set()
        for value, blob in self._read(fn):
            if blob is None:
                generation = value
                continue
            blob = bytes(blob)
            ids.update(blob[i + ID_SLICE.start : i + ID_SLICE.stop] for i in range(0, len(blob), CHUNK_ENTRY.size))
        return generation, b"".join(sorted(ids))

    def _counter(self, name: str) -> int:
        def fn(conn: psycopg.Connection) -> int:
            row = conn.execute("SELECT value FROM counters WHERE name = %s", (name,)).fetchone()
            assert row is not None
            return row[0]

        return self._read(fn)

    # -- nodes ---------------------------------------------------------------

    def register_node(self, node: NodeRecord) -> None:

        def work(conn: psycopg.Connection) -> None:
            conn.execute("DELETE FROM nodes WHERE address = %s AND node_id <> %s", (node.address, node.node_id))
            conn.execute(
                f"INSERT INTO nodes ({NODE_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (node_id) DO UPDATE SET address = excluded.address, capacity = excluded.capacity,"
                " role = excluded.role, host_id = excluded.host_id, pool_dir = excluded.pool_dir,"
                " used = excluded.used, chunks = excluded.chunks, last_seen = excluded.last_seen,"
                " zone = excluded.zone",
                (node.node_id, node.address, node.capacity, node.role, node.host_id, node.pool_dir, node.used,
                 node.chunks, node.last_seen, node.zone),
            )

        self._write(work)

    def heartbeat(self, node_id: str, used: int, chunks: int, now: float) -> bool:
        """On the liveness pool: asynchronous commit, no WAL flush waited for (see the module docstring)."""

        def fn(conn: psycopg.Connection) -> bool:
            cur = conn.execute("UPDATE nodes SET used = %s, chunks = %s, last_seen = %s WHERE node_id = %s",
                               (used, chunks, now, node_id))
            return cur.rowcount > 0

        return self._run(self._liveness, fn)

    def list_nodes(self) -> list[NodeRecord]:
        def fn(conn: psycopg.Connection) -> list[tuple]:
            return conn.execute(f"SELECT {NODE_COLS} FROM nodes ORDER BY node_id").fetchall()

        return [NodeRecord(*r) for r in self._read(fn)]

    # -- replica policy ------------------------------------------------------

    def set_replicas(self, path: str, replicas: int) -> None:
        path = paths.normalize(path)

        def work(conn: psycopg.Connection) -> None:
            if replicas:
                conn.execute("INSERT INTO replicas VALUES (%s, %s)"
                             " ON CONFLICT (path) DO UPDATE SET replicas = excluded.replicas", (path, replicas))
            else:
                conn.execute("DELETE FROM replicas WHERE path = %s", (path,))

        self._write(work)

    def replica_overrides(self) -> dict[str, int]:
        def fn(conn: psycopg.Connection) -> list[tuple]:
            return conn.execute("SELECT path, replicas FROM replicas ORDER BY path").fetchall()

        return dict(self._read(fn))

    # -- tokens --------------------------------------------------------------

    def add_token(self, token: TokenRecord) -> None:

        def work(conn: psycopg.Connection) -> None:
            cur = conn.execute("INSERT INTO tokens VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING"
                               " RETURNING name", (token.name, token.role, token.created, token.expires, token.revoked))
            if cur.fetchone() is None:
                raise AlreadyExists(f"a token named {token.name!r} exists already (names are never reused)")

        self._write(work)

    def list_tokens(self) -> list[TokenRecord]:
        def fn(conn: psycopg.Connection) -> list[tuple]:
            return conn.execute(f"SELECT {TOKEN_COLS} FROM tokens ORDER BY name").fetchall()

        return [TokenRecord(*r) for r in self._read(fn)]

    def revoke_token(self, name: str, now: float) -> TokenRecord:

        def work(conn: psycopg.Connection) -> TokenRecord:
            row = conn.execute(f"SELECT {TOKEN_COLS} FROM tokens WHERE name = %s", (name,)).fetchone()
            if row is None:
                rec = TokenRecord(name, "", 0.0, 0.0, now)
                conn.execute("INSERT INTO tokens VALUES (%s, '', 0, 0, %s)", (name, now))
            else:
                rec = TokenRecord(*row)
                if rec.revoked:
                    return rec
                rec.revoked = now
                conn.execute("UPDATE tokens SET revoked = %s WHERE name = %s", (now, name))
            conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'auth_generation'")
            return rec

        return self._write(work)

    def auth_generation(self) -> int:
        return self._counter("auth_generation")

    # -- totals and lifetime -------------------------------------------------

    def stats(self) -> StoreStats:
        def fn(conn: psycopg.Connection) -> tuple:
            row = conn.execute(
                "SELECT d.files, d.bytes, c.n, c.total, (SELECT count(*) FROM pins)"
                " FROM dirs AS d, (SELECT count(*) AS n, coalesce(sum(length), 0) AS total FROM chunks) AS c"
                " WHERE d.path = '/'"
            ).fetchone()
            assert row is not None
            return row

        files, nbytes, chunks, chunk_bytes, pinned = self._read(fn)
        return StoreStats(files, nbytes, chunks, int(chunk_bytes), pinned)

    def close(self) -> None:
        self._closed = True
        for pool in (getattr(self, "_pool", None), getattr(self, "_liveness", None)):
            if pool is not None:
                pool.close()
