"""ChunkPool: a node's RAM chunk pool, one file per chunk in a tmpfs directory.

The layout is :mod:`sdcache.pool_layout` (``<pool_dir>/<id[:2]>/<id>``, partial
writes in ``<pool_dir>/.tmp`` then renamed into place), so a client on the same
host may read a chunk file directly and never sees a partial one.

Capacity is a byte budget that is never exceeded: space is reserved before a
chunk file is written, and victims are unlinked before the new file appears.

Eviction is file-aware. Every chunk remembers the cache files (the ``path`` a
client asked for it under) it belongs to; the pool keeps those files in least
recently used order. To make room it takes whole files, oldest first, and frees
their chunks, except chunks that are pinned or that a file it keeps still
needs. It never evicts the chunks of the file it is admitting for: a file that
does not fit keeps its first part cached instead of thrashing through itself.
A chunk seen without a path is a one-chunk file of its own (``#<id>``).

All methods are synchronous and thread-safe; the node calls the ones that
touch files from a worker thread. Unlinking a chunk that is being read is fine:
open descriptors stay valid.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import xxhash

from sdcache import pool_layout
from sdcache.errors import CapacityExceeded
from sdcache.hashing import is_chunk_id

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
    """A snapshot of a pool's counters."""

    capacity: int
    used: int
    chunks: int
    files: int
    pinned: int
    hits: int
    misses: int
    evictions: int
    evicted_bytes: int
    bytes_served: int
    corrupt_dropped: int
    rejected: int

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class ChunkPool:
    """A byte-capped pool of verified chunks in a shared-memory directory.

    Create it, then call :meth:`load` once to adopt (and re-verify) whatever a
    previous run left in *pool_dir*.
    """

    def __init__(self, pool_dir: str, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.pool_dir = os.path.abspath(pool_dir)
        self.capacity = capacity
        self._tmp_dir = os.path.join(self.pool_dir, pool_layout.TMP_DIR)
        self._lock = threading.RLock()
        self._chunks: dict[str, _Chunk] = {}
        self._files: OrderedDict[str, _File] = OrderedDict()  # oldest first
        self._reserved: dict[str, int] = {}  # chunk id -> bytes, being written
        self._pinned: frozenset[str] = frozenset()
        self._used = 0  # bytes of present plus reserved chunks
        self._tmp_seq = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.evicted_bytes = 0
        self.bytes_served = 0
        self.corrupt_dropped = 0
        self.rejected = 0
        os.makedirs(self.pool_dir, exist_ok=True)

    # ------------------------------------------------------------------ startup

    def load(self, *, workers: int = 4) -> int:
        """Adopt the chunks a previous run left in the pool directory.

        Drops the ``.tmp`` directory (partial writes), every file whose
        xxh3-128 does not match its name and anything else that is not a chunk
        in a ``<id[:2]>`` directory; evicts the oldest (by mtime) if what is
        left exceeds the capacity. Returns the number of chunks adopted.
        """
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        os.makedirs(self._tmp_dir, exist_ok=True)
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
        with self._lock:
            for chunk_id, size, mtime in good:
                if chunk_id in self._chunks:
                    continue
                self._chunks[chunk_id] = _Chunk(size, {_anon(chunk_id)})
                self._files[_anon(chunk_id)] = _File({chunk_id}, mtime)
                self._used += size
            over = self._used - self.capacity
            victims: list[str] = []
            if over > 0:
                for name, f in list(self._files.items()):
                    if over <= 0:
                        break
                    (cid,) = f.chunks
                    over -= self._chunks[cid].size
                    victims.append(cid)
            for cid in victims:
                self.evicted_bytes += self._forget(cid)
                self.evictions += 1
        for cid in victims:
            self._unlink(cid)
        if victims:
            log.info("pool over capacity at start: evicted %d chunks", len(victims))
        log.info("pool %s: adopted %d chunks, %d bytes", self.pool_dir, len(self._chunks), self._used)
        return len(self._chunks)

    @staticmethod
    def bytes_on_disk(pool_dir: str) -> int:
        """Bytes of the chunk files a previous run left in *pool_dir* (no verification)."""
        total = 0
        try:
            top = os.scandir(pool_dir)
        except FileNotFoundError:
            return 0
        with top:
            for d in top:
                if len(d.name) != 2 or not d.is_dir(follow_symlinks=False):
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
        """Bytes held, including chunks being written."""
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

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                capacity=self.capacity,
                used=self._used,
                chunks=len(self._chunks),
                files=sum(1 for k in self._files if not k.startswith(_ANON)),
                pinned=sum(1 for i in self._pinned if i in self._chunks),
                hits=self.hits,
                misses=self.misses,
                evictions=self.evictions,
                evicted_bytes=self.evicted_bytes,
                bytes_served=self.bytes_served,
                corrupt_dropped=self.corrupt_dropped,
                rejected=self.rejected,
            )

    # ------------------------------------------------------------------ reads

    def get(self, chunk_id: str, path: str | None = None) -> bytes | None:
        """The verified bytes of *chunk_id*, or None (a miss).

        Reads the chunk file into memory and checks its xxh3-128 against the
        id; a file that fails is dropped from the pool and reported as a miss,
        so bad bytes are never returned. A hit marks *path* (or, without one,
        every file the chunk belongs to) as just used.
        """
        c = self._chunks.get(chunk_id)
        if c is None:
            with self._lock:
                self.misses += 1
            return None
        data: bytes | None
        try:
            fd = os.open(self.chunk_path(chunk_id), os.O_RDONLY)
        except FileNotFoundError:
            data = None
        else:
            try:
                data = os.read(fd, c.size)  # one allocation of the known size, one copy
            finally:
                os.close(fd)
        if data is None or xxhash.xxh3_128_hexdigest(data) != chunk_id:
            with self._lock:
                self.misses += 1
                known = chunk_id in self._chunks
                if known:
                    self._forget(chunk_id)
                    self.corrupt_dropped += 1
            if known:  # else it was evicted while we opened it: a plain miss
                log.warning("pool chunk %s is missing or corrupt; dropped it", chunk_id)
                self._unlink(chunk_id)
            return None
        with self._lock:
            self.hits += 1
            if chunk_id in self._chunks:
                self._touch(chunk_id, path)
        return data

    def touch(self, chunk_id: str, path: str | None = None) -> bool:
        """Associate a present chunk with *path* and mark it used; False if absent."""
        with self._lock:
            if chunk_id not in self._chunks:
                return False
            self._touch(chunk_id, path)
            return True

    def record_served(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_served += nbytes

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
        evicted then.
        """
        size = len(data)
        with self._lock:
            if chunk_id in self._chunks or chunk_id in self._reserved:
                if chunk_id in self._chunks:
                    self._touch(chunk_id, path)
                return False
            try:
                victims = self._pick_victims(size, path)
            except CapacityExceeded:
                self.rejected += 1
                raise
            for cid in victims:
                self.evicted_bytes += self._forget(cid)
                self.evictions += 1
            self._reserved[chunk_id] = size
            self._used += size
            self._tmp_seq += 1
            tmp = os.path.join(self._tmp_dir, f"{chunk_id}.{os.getpid()}.{self._tmp_seq}")
        for cid in victims:
            self._unlink(cid)
        final = self.chunk_path(chunk_id)
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:  # someone removed .tmp under us
                os.makedirs(self._tmp_dir, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with open(fd, "wb", buffering=0) as f:
                view = memoryview(data)
                while view:
                    n = f.write(view)
                    view = view[n:]
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(final), exist_ok=True)
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
        """Drop the chunks of *path* (or just *ids*); returns (chunks, bytes) freed.

        Pinned chunks and chunks that another cached file still needs stay
        (only their association with *path* goes).
        """
        freed: list[str] = []
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
                self.evictions += 1
                self.evicted_bytes += size
                nbytes += size
                freed.append(cid)
        for cid in freed:
            self._unlink(cid)
        return len(freed), nbytes

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
        """Remove a chunk from the books (the caller unlinks its file); returns its size."""
        c = self._chunks.pop(chunk_id)
        for name in list(c.files):
            f = self._files.get(name)
            if f is not None:
                f.chunks.discard(chunk_id)
                if not f.chunks:
                    del self._files[name]
        self._used -= c.size
        return c.size

    def _pick_victims(self, size: int, path: str | None) -> list[str]:
        """Chunks to evict so that *size* more bytes fit, whole files oldest first."""
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
                victims.append(cid)
                freed += c.size
            if freed >= need:
                return victims
        raise CapacityExceeded(
            f"pool full: {self._used} of {self.capacity} bytes held, "
            f"cannot free {need} bytes (the rest is pinned or in use by {path or 'this chunk'})"
        )

    def _unlink(self, chunk_id: str) -> None:
        try:
            os.unlink(self.chunk_path(chunk_id))
        except FileNotFoundError:
            pass
