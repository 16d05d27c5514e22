"""ChunkPool: a node's RAM chunk pool, one file per chunk in a tmpfs directory.

The layout is :mod:`sdcache.pool_layout` (``<pool_dir>/<id[:2]>/<id>``, partial
writes in ``<pool_dir>/.tmp`` then renamed into place), so a client on the same
host may read a chunk file directly and never sees a partial one. Two more
entries belong to the pool and are never taken for chunks: ``.lock`` and
``.evicted/`` (both below).

One owner. A pool holds an exclusive ``flock`` on ``<pool_dir>/.lock`` from the
moment it is created until :meth:`ChunkPool.close`, so two nodes can never
share one directory (each would evict and count the other's chunks). A second
pool on a held directory, in this process or another, fails at once with
:class:`~sdcache.errors.AlreadyExists`. The lock belongs to the open file, so
it goes away with the process however that ends (``kill -9`` included). The
file stays empty: it costs no pool bytes.

Permissions. The node creates the pool directory and its subdirectories mode
0750 and chunk files mode 0640, whatever the umask (a setgid bit already on the
directory is kept). Same-host short-circuit reads are therefore possible only
for processes running as the node's user or in its group; give readers that
group (a setgid parent directory owned by it makes new pools inherit it) rather
than widening the modes. Everyone else reads chunks over HTTP with a token.

Capacity is a byte budget that is never exceeded: space is reserved before a
chunk file is written, and victims leave the pool path before the new file
appears. ``used`` counts present chunks, chunks being written and evicted
chunks a same-host reader still has mapped (below).

Eviction is file-aware. Every chunk remembers the cache files (the ``path`` a
client asked for it under) it belongs to; the pool keeps those files in least
recently used order. To make room it takes whole files, oldest first, and frees
their chunks, except chunks that are pinned, that a file it keeps still needs,
or that a same-host reader has mapped (evicting those would free no memory). It
never evicts the chunks of the file it is admitting for: a file that does not
fit keeps its first part cached instead of thrashing through itself. A chunk
seen without a path is a one-chunk file of its own (``#<id>``).

Mapped chunks. A same-host reader that maps a chunk file (``client/_mapped.py``)
holds ``flock(LOCK_SH)`` on it for as long as the mapping lives; tmpfs pages of a
mapped file stay in memory after it is unlinked, so unlinking would not give
the bytes back. An evicted chunk's file is therefore first renamed into
``<pool_dir>/.evicted/`` and unlinked only once the pool can take
``LOCK_EX | LOCK_NB`` on it. Until then its bytes stay in ``used`` and in
``stats().evicted_mapped_bytes``; the pool retries whenever it needs room, on
every :meth:`ChunkPool.stats` and on :meth:`ChunkPool.load` after a restart.
Readers that only ``pread`` a chunk take no lock: their bytes are copied out
and an unlinked file goes as soon as they close it.

All methods are synchronous and thread-safe; the node calls the ones that
touch files from a worker thread. A victim's file leaves the pool path under
the pool's lock, so a concurrent re-fill of the same chunk id (which can only
reserve it after that) is never the file removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType

import xxhash

from sdcache import pool_layout
from sdcache.errors import CapacityExceeded
from sdcache.hashing import is_chunk_id

from .pool_dir import (
    EVICTED_DIR,
    FILE_MODE,
    LOCK_FILE,
    default_pool_dir,
    inode_of,
    lock_dir,
    make_dir,
    mapped_by_reader,
    try_remove,
)

__all__ = ["EVICTED_DIR", "LOCK_FILE", "ChunkPool", "PoolStats", "default_pool_dir"]

log = logging.getLogger(__name__)

_ANON = "#"  # prefix of the pseudo-file of a chunk seen without a path


def _anon(chunk_id: str) -> str:
    return _ANON + chunk_id


@dataclass(slots=True)
class _File:
    chunks: set[str] = field(default_factory=set)
    last_access: float = 0.0


@dataclass(slots=True)
class _Chunk:
    size: int
    files: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of a pool's counters.

    ``used`` includes ``evicted_mapped_bytes``: evicted chunks whose memory a
    same-host reader's mapping still holds. ``misses`` includes
    ``corrupt_reads`` (reads that found a bad copy and dropped it);
    ``corrupt_dropped`` also counts bad files dropped at :meth:`ChunkPool.load`.
    ``bytes_served`` is ``served_pool_bytes + served_understore_bytes + served_peer_bytes``.
    These counters are the node's one source of truth: ``/stats``,
    ``/metrics`` (:mod:`.metrics`) and the heartbeat all read them here.
    """

    capacity: int
    used: int
    chunks: int
    files: int
    pinned: int
    pinned_bytes: int
    hits: int
    misses: int
    evictions: int
    evicted_bytes: int
    bytes_served: int
    served_pool_bytes: int
    served_understore_bytes: int
    served_peer_bytes: int
    corrupt_dropped: int
    corrupt_reads: int
    rejected: int
    evicted_mapped_bytes: int

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class ChunkPool:
    """A byte-capped pool of verified chunks in a shared-memory directory.

    Creating it creates *pool_dir* (mode 0750) and takes the directory's lock:
    if another pool, in any process, holds it, this raises
    :class:`~sdcache.errors.AlreadyExists` (errno ``EEXIST``) naming the
    directory. Then call :meth:`load` once to adopt (and re-verify) whatever a
    previous run left there, and :meth:`close` when done to release the lock
    (a pool is also a context manager; a pool dropped unclosed releases it
    when collected).
    """

    def __init__(self, pool_dir: str, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.pool_dir = os.path.abspath(pool_dir)
        self.capacity = capacity
        self._tmp_dir = os.path.join(self.pool_dir, pool_layout.TMP_DIR)
        self._evicted_dir = os.path.join(self.pool_dir, EVICTED_DIR)
        self._lock = threading.RLock()
        self._chunks: dict[str, _Chunk] = {}
        self._files: OrderedDict[str, _File] = OrderedDict()  # oldest first
        self._reserved: dict[str, int] = {}  # chunk id -> bytes, being written
        self._held: dict[str, int] = {}  # name in .evicted -> bytes, mapped by a reader
        self._held_bytes = 0
        self._pinned: frozenset[str] = frozenset()
        self._used = 0  # bytes of present, reserved and held chunks
        self._tmp_seq = 0
        self._evict_seq = 0
        self._token = f"{os.getpid()}-{os.urandom(4).hex()}"  # unique names in .evicted
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.evicted_bytes = 0
        self.served_pool_bytes = 0
        self.served_understore_bytes = 0
        self.served_peer_bytes = 0
        self.corrupt_dropped = 0
        self.corrupt_reads = 0
        self.rejected = 0
        make_dir(self.pool_dir)
        fd = lock_dir(self.pool_dir)
        self._release = weakref.finalize(self, os.close, fd)  # closing the fd drops the flock

    def close(self) -> None:
        """Release the pool directory's lock, so another pool may open it; idempotent.

        Chunk files stay for the next run. The pool must not be used after.
        """
        with self._lock:
            if self._release.alive:
                self._release()
                log.debug("pool %s: released its lock", self.pool_dir)

    def __enter__(self) -> ChunkPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ startup

    def load(self, *, workers: int = 4) -> int:
        """Adopt the chunks a previous run left in the pool directory.

        Drops the ``.tmp`` directory (partial writes), every file whose
        xxh3-128 does not match its name and anything else that is not a chunk
        in a ``<id[:2]>`` directory; removes the files in ``.evicted`` that no
        reader maps any more and keeps counting the rest; evicts the oldest (by
        mtime) if what is left exceeds the capacity. Returns the number of
        chunks adopted.
        """
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        make_dir(self._tmp_dir)
        self._adopt_evicted()
        found: list[tuple[str, str]] = []
        with os.scandir(self.pool_dir) as top:
            for d in top:
                if len(d.name) != 2 or not all(c in "0123456789abcdef" for c in d.name):
                    continue
                if not d.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(d.path) as inner:
                    for e in inner:
                        found.append((e.name, e.path))

        def check(item: tuple[str, str]) -> tuple[str, int, float] | None:
            name, path = item
            try:
                st = os.lstat(path)
                ok = (
                    is_chunk_id(name)
                    and name[:2] == os.path.basename(os.path.dirname(path))
                    and os.path.isfile(path)
                    and not os.path.islink(path)
                )
                if ok:
                    with open(path, "rb", buffering=0) as f:
                        ok = xxhash.xxh3_128_hexdigest(f.read()) == name
                if ok:
                    return name, st.st_size, st.st_mtime
                log.warning("dropping bad pool file %s", path)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
            except OSError as e:
                log.warning("dropping unreadable pool file %s: %s", path, e)
                try:
                    os.unlink(path)
                except OSError:
                    pass
            return None

        with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
            good = [r for r in ex.map(check, found) if r is not None]
        self.corrupt_dropped += len(found) - len(good)
        good.sort(key=lambda r: r[2])  # oldest first: the LRU order we rebuild
        victims = 0
        with self._lock:
            for chunk_id, size, mtime in good:
                if chunk_id in self._chunks:
                    continue
                self._chunks[chunk_id] = _Chunk(size, {_anon(chunk_id)})
                self._files[_anon(chunk_id)] = _File({chunk_id}, mtime)
                self._used += size
            for name in list(self._files):  # oldest first
                if self._used <= self.capacity:
                    break
                f = self._files.get(name)
                for cid in list(f.chunks) if f else ():
                    self.evicted_bytes += self._forget(cid)
                    self.evictions += 1
                    victims += 1
                    self._unlink(cid)
            if self._used > self.capacity:
                log.warning("pool %s: %d bytes over capacity, all mapped by same-host readers",
                            self.pool_dir, self._used - self.capacity)
        if victims:
            log.info("pool over capacity at start: evicted %d chunks", victims)
        log.info("pool %s: adopted %d chunks, %d bytes (%d held by readers' mappings)",
                 self.pool_dir, len(self._chunks), self._used, self._held_bytes)
        return len(self._chunks)

    def _adopt_evicted(self) -> None:
        """Remove the unmapped leftovers of ``.evicted``; count the mapped ones as held."""
        make_dir(self._evicted_dir)
        with os.scandir(self._evicted_dir) as it:
            entries = list(it)
        with self._lock:
            for e in entries:
                if e.name in self._held:
                    continue
                try:
                    if not e.is_file(follow_symlinks=False):
                        log.warning("dropping stray %s", e.path)
                        if e.is_dir(follow_symlinks=False):
                            shutil.rmtree(e.path, ignore_errors=True)
                        else:
                            os.unlink(e.path)
                        continue
                    held = try_remove(e.path)
                except OSError as err:
                    log.warning("cannot clear evicted file %s: %s", e.path, err)
                    continue
                if held:
                    self._hold(e.name, held)

    @staticmethod
    def bytes_on_disk(pool_dir: str) -> int:
        """Bytes a previous run left in *pool_dir* (no verification).

        Chunk files plus evicted files a reader may still map; not the lock
        file or partial writes.
        """
        total = 0
        try:
            top = os.scandir(pool_dir)
        except FileNotFoundError:
            return 0
        with top:
            for d in top:
                if not (len(d.name) == 2 or d.name == EVICTED_DIR) or not d.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(d.path) as inner:
                    for e in inner:
                        try:
                            if e.is_file(follow_symlinks=False):
                                total += e.stat(follow_symlinks=False).st_size
                        except OSError:
                            pass
        return total

    # ------------------------------------------------------------------ queries

    @property
    def used(self) -> int:
        """Bytes held: chunks present or being written, and evicted ones still mapped."""
        return self._used

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._chunks

    def size_of(self, chunk_id: str) -> int | None:
        c = self._chunks.get(chunk_id)
        return c.size if c else None

    def present(self, ids: Iterable[str]) -> list[str]:
        """The ids among *ids* that the pool holds."""
        chunks = self._chunks
        return [i for i in ids if i in chunks]

    def chunk_path(self, chunk_id: str) -> str:
        return pool_layout.chunk_path(self.pool_dir, chunk_id)

    @property
    def bytes_served(self) -> int:
        return self.served_pool_bytes + self.served_understore_bytes + self.served_peer_bytes

    def stats(self) -> PoolStats:
        """The counters now; first frees evicted chunks whose mappings have gone."""
        with self._lock:
            if self._held:
                self._reap_held()
            chunks = self._chunks
            pinned = self._pinned
            if len(pinned) <= len(chunks):  # the smaller side: a heartbeat's cost is not the size of a pin list
                held = [c.size for i in pinned if (c := chunks.get(i)) is not None]
            else:
                held = [c.size for i, c in chunks.items() if i in pinned]
            return PoolStats(
                capacity=self.capacity,
                used=self._used,
                chunks=len(chunks),
                files=sum(1 for k in self._files if not k.startswith(_ANON)),
                pinned=len(held),
                pinned_bytes=sum(held),
                hits=self.hits,
                misses=self.misses,
                evictions=self.evictions,
                evicted_bytes=self.evicted_bytes,
                bytes_served=self.bytes_served,
                served_pool_bytes=self.served_pool_bytes,
                served_understore_bytes=self.served_understore_bytes,
                served_peer_bytes=self.served_peer_bytes,
                corrupt_dropped=self.corrupt_dropped,
                corrupt_reads=self.corrupt_reads,
                rejected=self.rejected,
                evicted_mapped_bytes=self._held_bytes,
            )

    # ------------------------------------------------------------------ reads

    def get(self, chunk_id: str, path: str | None = None) -> bytes | None:
        """The verified bytes of *chunk_id*, or None (a miss).

        Reads the chunk file into memory and checks its xxh3-128 against the
        id; a file that fails is dropped from the pool and reported as a miss,
        so bad bytes are never returned. A hit marks *path* (or, without one,
        every file the chunk belongs to) as just used.
        """
        return self.lookup(chunk_id, path)[0]

    def lookup(self, chunk_id: str, path: str | None = None) -> tuple[bytes | None, str]:
        """:meth:`get`, and what it found: ``"hit"``, ``"miss"`` or ``"corrupt"`` (a bad copy, now dropped)."""
        c = self._chunks.get(chunk_id)
        if c is None:
            with self._lock:
                self.misses += 1
            return None, "miss"
        file = self.chunk_path(chunk_id)
        data: bytes | None = None
        ino: int | None = None
        try:
            fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        else:
            try:
                ino = os.fstat(fd).st_ino
                data = os.read(fd, c.size)  # one allocation of the known size, one copy
            finally:
                os.close(fd)
        if data is None or xxhash.xxh3_128_hexdigest(data) != chunk_id:
            with self._lock:
                self.misses += 1
                # Drop only the file we judged: if the chunk was evicted and
                # filled again since, the new file is good and stays.
                drop = chunk_id in self._chunks and inode_of(file) == ino
                if drop:
                    self._forget(chunk_id)
                    self.corrupt_dropped += 1
                    self.corrupt_reads += 1
                    self._unlink(chunk_id)
            if drop:
                log.warning("pool chunk %s is missing or corrupt; dropped it", chunk_id,
                            extra={"chunk": chunk_id, "path": path})
                return None, "corrupt"
            return None, "miss"
        with self._lock:
            self.hits += 1
            if chunk_id in self._chunks:
                self._touch(chunk_id, path)
        return data, "hit"

    def touch(self, chunk_id: str, path: str | None = None) -> bool:
        """Associate a present chunk with *path* and mark it used; False if absent."""
        with self._lock:
            if chunk_id not in self._chunks:
                return False
            self._touch(chunk_id, path)
            return True

    def record_served(self, nbytes: int, hit: bool = True, *, peer: bool = False) -> None:
        """Count *nbytes* sent to a client: from the pool (*hit*), else fetched from a peer node
        (*peer*) or read through from the under-store."""
        with self._lock:
            if hit:
                self.served_pool_bytes += nbytes
            elif peer:
                self.served_peer_bytes += nbytes
            else:
                self.served_understore_bytes += nbytes

    # ------------------------------------------------------------------ writes

    def can_admit(self, size: int, path: str | None = None) -> bool:
        """Whether a chunk of *size* bytes could be admitted for *path* now."""
        with self._lock:
            try:
                self._pick_victims(size, path)
            except CapacityExceeded:
                return False
            return True

    def put(self, chunk_id: str, data: bytes | memoryview, path: str | None = None) -> bool:
        """Keep *data* (already verified to be *chunk_id*) for *path*.

        Evicts least recently used files first if space is needed. Returns
        False if the chunk was already present (it is then only touched).
        Raises :class:`CapacityExceeded` if it cannot be admitted; nothing is
        evicted then (unless a reader maps a victim in the instant between
        choosing and evicting it, and nothing else can go).
        """
        size = len(data)
        with self._lock:
            if chunk_id in self._chunks or chunk_id in self._reserved:
                if chunk_id in self._chunks:
                    self._touch(chunk_id, path)
                return False
            try:
                self._make_room(size, path)
            except CapacityExceeded:
                self.rejected += 1
                raise
            self._reserved[chunk_id] = size
            self._used += size
            self._tmp_seq += 1
            tmp = os.path.join(self._tmp_dir, f"{chunk_id}.{os.getpid()}.{self._tmp_seq}")
        final = self.chunk_path(chunk_id)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            try:
                fd = os.open(tmp, flags, FILE_MODE)
            except FileNotFoundError:  # someone removed .tmp under us, or load() never ran
                make_dir(self._tmp_dir)
                fd = os.open(tmp, flags, FILE_MODE)
            with open(fd, "wb", buffering=0) as f:
                os.fchmod(fd, FILE_MODE)  # the umask may have taken the group's read bit
                view = memoryview(data)
                while view:
                    n = f.write(view)
                    view = view[n:]
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                make_dir(os.path.dirname(final))
                os.rename(tmp, final)
        except BaseException:
            with self._lock:
                self._reserved.pop(chunk_id, None)
                self._used -= size
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        with self._lock:
            self._reserved.pop(chunk_id, None)
            self._chunks[chunk_id] = _Chunk(size)
            self._touch(chunk_id, path)
        return True

    def evict(self, path: str | None = None, ids: Iterable[str] | None = None) -> tuple[int, int]:
        """Drop the chunks of *path* (or just *ids*); returns (chunks, bytes) evicted.

        Pinned chunks and chunks that another cached file still needs stay
        (only their association with *path* goes). An evicted chunk a
        same-host reader has mapped leaves the pool but its bytes stay counted
        until the mapping goes (``stats().evicted_mapped_bytes``).
        """
        count = 0
        nbytes = 0
        with self._lock:
            if ids is None:
                f = self._files.get(path) if path is not None else None
                targets = set(f.chunks) if f else set()
            else:
                targets = {i for i in ids if i in self._chunks}
            for cid in targets:
                c = self._chunks.get(cid)
                if c is None:
                    continue
                if path is not None:
                    self._unlink_file(path, cid)
                others = {p for p in c.files if not p.startswith(_ANON)}
                if others or cid in self._pinned:
                    self._adopt_orphan(cid)
                    continue
                size = self._forget(cid)
                self._unlink(cid)
                self.evictions += 1
                self.evicted_bytes += size
                nbytes += size
                count += 1
        return count, nbytes

    def set_pinned(self, ids: Iterable[str]) -> None:
        """Replace the set of pinned chunk ids (they are never evicted)."""
        pinned = frozenset(ids)
        with self._lock:
            self._pinned = pinned

    @property
    def pinned(self) -> frozenset[str]:
        return self._pinned

    # ------------------------------------------------------------------ internals (lock held)

    def _touch(self, chunk_id: str, path: str | None) -> None:
        c = self._chunks[chunk_id]
        now = time.time()
        if path is not None:
            if path not in c.files:
                anon = _anon(chunk_id)
                if anon in c.files:
                    self._unlink_file(anon, chunk_id)
                c.files.add(path)
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = _File()
            f.chunks.add(chunk_id)
            f.last_access = now
            self._files.move_to_end(path)
            return
        self._adopt_orphan(chunk_id)
        for name in c.files:
            f = self._files[name]
            f.last_access = now
            self._files.move_to_end(name)

    def _unlink_file(self, path: str, chunk_id: str) -> None:
        """Drop the association of *chunk_id* with *path*."""
        c = self._chunks.get(chunk_id)
        if c is not None:
            c.files.discard(path)
        f = self._files.get(path)
        if f is not None:
            f.chunks.discard(chunk_id)
            if not f.chunks:
                del self._files[path]

    def _adopt_orphan(self, chunk_id: str) -> None:
        """Give a chunk that belongs to no file its own one-chunk file."""
        c = self._chunks[chunk_id]
        if not c.files:
            c.files.add(_anon(chunk_id))
            self._files[_anon(chunk_id)] = _File({chunk_id}, time.time())

    def _forget(self, chunk_id: str) -> int:
        """Remove a chunk from the books (the caller then calls :meth:`_unlink`); returns its size."""
        c = self._chunks.pop(chunk_id)
        for name in list(c.files):
            f = self._files.get(name)
            if f is not None:
                f.chunks.discard(chunk_id)
                if not f.chunks:
                    del self._files[name]
        self._used -= c.size
        return c.size

    def _make_room(self, size: int, path: str | None) -> None:
        """Evict until *size* more bytes fit, or raise :class:`CapacityExceeded`."""
        while victims := self._pick_victims(size, path):
            for cid in victims:
                self.evicted_bytes += self._forget(cid)
                self.evictions += 1
                self._unlink(cid)
            # A reader may have mapped a victim since it was picked: its bytes
            # are still counted, so look again until the chunk really fits.

    def _pick_victims(self, size: int, path: str | None) -> list[str]:
        """Chunks to evict so that *size* more bytes fit, whole files oldest first."""
        need = self._used + size - self.capacity
        if need > 0 and self._held:
            self._reap_held()
            need = self._used + size - self.capacity
        if need <= 0:
            return []
        if size > self.capacity:
            raise CapacityExceeded(f"chunk of {size} bytes exceeds the pool capacity {self.capacity}")
        pinned = self._pinned
        victim_files: set[str] = set()
        victims: list[str] = []
        freed = 0
        for name, f in self._files.items():
            if name == path:
                continue
            victim_files.add(name)
            for cid in f.chunks:
                c = self._chunks[cid]
                if cid in pinned or not c.files <= victim_files:
                    continue
                if mapped_by_reader(self.chunk_path(cid)):
                    continue  # evicting it would free no memory
                victims.append(cid)
                freed += c.size
            if freed >= need:
                return victims
        raise CapacityExceeded(
            f"pool full: {self._used} of {self.capacity} bytes held ({self._held_bytes} by evicted chunks "
            f"still mapped), cannot free {need} bytes (the rest is pinned, mapped by a same-host reader "
            f"or in use by {path or 'this chunk'})"
        )

    def _unlink(self, chunk_id: str) -> None:
        """Take a forgotten chunk's file out of the pool path, and free it unless it is mapped.

        Called with the lock held, right after :meth:`_forget`: a put of the
        same id can only reserve it once the lock is released, so the file
        removed here is never a re-fill's. The file is renamed into
        ``.evicted`` first, so no new reader finds it; a reader that had it
        mapped keeps its bytes counted (:meth:`_hold`).
        """
        src = self.chunk_path(chunk_id)
        self._evict_seq += 1
        name = f"{chunk_id}.{self._token}.{self._evict_seq}"
        dst = os.path.join(self._evicted_dir, name)
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            if not os.path.lexists(src):
                return
            make_dir(self._evicted_dir)
            try:
                os.rename(src, dst)
            except FileNotFoundError:
                return
        held = try_remove(dst)
        if held:
            self._hold(name, held)
            log.info("evicted chunk %s is mapped by a same-host reader: its %d bytes stay counted "
                     "until the mapping goes", chunk_id, held)

    def _hold(self, name: str, size: int) -> None:
        """Count *size* bytes of ``.evicted/<name>`` against the capacity until it is freed."""
        self._held[name] = size
        self._held_bytes += size
        self._used += size

    def _reap_held(self) -> None:
        """Free the evicted files whose readers have unmapped them."""
        for name, size in list(self._held.items()):
            try:
                still = try_remove(os.path.join(self._evicted_dir, name))
            except OSError as e:
                log.warning("cannot free evicted file %s: %s", name, e)
                continue
            if not still:
                del self._held[name]
                self._held_bytes -= size
                self._used -= size
