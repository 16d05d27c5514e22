"""ChunkPool: capacity, file-aware eviction, pins, verification, warm restart,
the one-owner lock, races with re-fills, evicted-but-mapped chunks, file modes."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import xxhash

from sdcache import pool_layout
from sdcache.client import _mapped
from sdcache.errors import AlreadyExists, CapacityExceeded, SdcacheError
from sdcache.hashing import chunk_id
from sdcache.node.pool import EVICTED_DIR, LOCK_FILE, ChunkPool, default_pool_dir

KB = 1024
rng = random.Random(1234)


def blob(n: int = 64 * KB) -> tuple[str, bytes]:
    data = rng.randbytes(n)
    return chunk_id(data), data


def disk_bytes(pool_dir: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(pool_dir):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


@pytest.fixture
def pool_dir(tmp_path) -> str:
    return str(tmp_path / "pool")


def test_put_then_get_returns_bytes_at_shared_layout(pool_dir):
    pool = ChunkPool(pool_dir, 1 << 20)
    pool.load()
    cid, data = blob()
    assert pool.put(cid, data, "/m/a.safetensors") is True
    assert pool.get(cid) == data
    # a same-host client reads the file directly: exactly the bytes, nothing left in .tmp
    with open(pool_layout.chunk_path(pool_dir, cid), "rb") as f:
        assert f.read() == data
    assert os.listdir(os.path.join(pool_dir, pool_layout.TMP_DIR)) == []
    st = pool.stats()
    assert (st.chunks, st.used, st.files, st.hits, st.misses) == (1, len(data), 1, 1, 0)


def test_capacity_never_exceeded(pool_dir):
    cap = 5 * 64 * KB + 100
    pool = ChunkPool(pool_dir, cap)
    pool.load()
    for i in range(40):
        cid, data = blob()
        pool.put(cid, data, f"/m/file{i % 7}")
        assert pool.used <= cap
        assert disk_bytes(pool_dir) <= cap
    assert pool.stats().evictions >= 35


def test_least_recently_used_file_goes_first_and_whole(pool_dir):
    pool = ChunkPool(pool_dir, 4 * 64 * KB)
    a = [blob() for _ in range(2)]
    b = [blob() for _ in range(2)]
    for cid, data in a:
        pool.put(cid, data, "/a")
    for cid, data in b:
        pool.put(cid, data, "/b")
    assert pool.get(a[0][0], "/a") is not None  # A used again: B is now the oldest
    c = blob()
    pool.put(c[0], c[1], "/c")  # needs one chunk of room: all of B goes
    assert all(cid in pool for cid, _ in a)
    assert not any(cid in pool for cid, _ in b)
    assert c[0] in pool
    assert pool.stats().evictions == 2


def test_hit_without_path_refreshes_the_chunks_files(pool_dir):
    pool = ChunkPool(pool_dir, 2 * 64 * KB)
    a, b = blob(), blob()
    pool.put(*a, "/a")
    pool.put(*b, "/b")
    pool.get(a[0])  # no path given: still counts as a use of /a
    pool.put(*blob(), "/c")
    assert a[0] in pool and b[0] not in pool


def test_pinned_chunks_are_never_evicted(pool_dir):
    pool = ChunkPool(pool_dir, 3 * 64 * KB)
    a, b = blob(), blob()
    pool.put(*a, "/a")
    pool.put(*b, "/b")
    pool.set_pinned({a[0]})
    c, d = blob(), blob()
    pool.put(*c, "/c")
    pool.put(*d, "/d")  # /a is the oldest but pinned: /b goes instead
    assert a[0] in pool and b[0] not in pool
    pool.set_pinned({a[0], c[0]})
    e = blob()
    pool.put(*e, "/e")  # only /d is evictable
    assert pool.present([a[0], c[0], d[0], e[0]]) == [a[0], c[0], e[0]]
    pool.set_pinned({a[0], c[0], e[0]})
    with pytest.raises(CapacityExceeded):
        pool.put(*blob(), "/f")
    assert pool.present([a[0], c[0], e[0]]) == [a[0], c[0], e[0]]  # a refused chunk evicts nothing
    assert pool.stats().rejected == 1 and pool.stats().pinned == 3


def test_file_larger_than_pool_keeps_its_first_part(pool_dir):
    pool = ChunkPool(pool_dir, 3 * 64 * KB)
    other = blob()
    pool.put(*other, "/old")
    chunks = [blob() for _ in range(5)]
    kept = []
    for cid, data in chunks:
        try:
            pool.put(cid, data, "/big")
            kept.append(cid)
        except CapacityExceeded:
            pass
    # /old made room; /big never evicts itself, so its first three chunks stay
    assert other[0] not in pool
    assert kept == [c for c, _ in chunks[:3]]
    assert pool.can_admit(64 * KB, "/big") is False
    assert pool.can_admit(64 * KB, "/other") is True


def test_chunk_shared_by_two_files_stays_while_either_is_kept(pool_dir):
    pool = ChunkPool(pool_dir, 3 * 64 * KB)
    shared, a_only, b_only = blob(), blob(), blob()
    pool.put(*shared, "/a")
    pool.put(*a_only, "/a")
    pool.put(*b_only, "/b")
    pool.touch(shared[0], "/b")  # /b also holds the shared chunk (e.g. the same VAE)
    pool.put(*blob(), "/c")  # evicts /a, the oldest, but /b still needs the shared chunk
    assert a_only[0] not in pool
    assert shared[0] in pool and b_only[0] in pool


def test_corrupt_chunk_is_dropped_not_returned(pool_dir):
    pool = ChunkPool(pool_dir, 1 << 20)
    cid, data = blob()
    pool.put(cid, data, "/a")
    path = pool_layout.chunk_path(pool_dir, cid)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(bytes([data[100] ^ 0xFF]))
    assert pool.get(cid) is None
    assert cid not in pool and not os.path.exists(path)
    assert pool.used == 0 and pool.stats().corrupt_dropped == 1


def test_evict_path_and_ids(pool_dir):
    pool = ChunkPool(pool_dir, 1 << 20)
    a = [blob() for _ in range(3)]
    for c in a:
        pool.put(*c, "/a")
    b = blob()
    pool.put(*b, "/b")
    assert pool.evict("/a", [a[0][0]]) == (1, 64 * KB)
    assert pool.evict("/a") == (2, 128 * KB)
    assert pool.present([c for c, _ in a]) == []
    assert pool.evict("/nothing") == (0, 0)
    assert b[0] in pool


def test_restart_adopts_good_chunks_and_drops_bad_ones(pool_dir):
    pool = ChunkPool(pool_dir, 1 << 20)
    good = [blob() for _ in range(3)]
    bad = blob()
    for c in [*good, bad]:
        pool.put(*c, "/a")
    with open(pool_layout.chunk_path(pool_dir, bad[0]), "r+b") as f:
        f.write(b"\x00" * 8)
    tmp = os.path.join(pool_dir, pool_layout.TMP_DIR)
    with open(os.path.join(tmp, "partial"), "wb") as f:
        f.write(b"half a chunk")
    misnamed = os.path.join(pool_dir, "ab", "not-a-chunk")
    os.makedirs(os.path.dirname(misnamed), exist_ok=True)
    open(misnamed, "wb").close()
    pool.close()  # the node stops; its successor takes the directory

    again = ChunkPool(pool_dir, 1 << 20)
    assert again.load() == 3
    assert sorted(again.present([c for c, _ in [*good, bad]])) == sorted(c for c, _ in good)
    assert again.get(good[0][0]) == good[0][1]
    assert not os.path.exists(pool_layout.chunk_path(pool_dir, bad[0]))
    assert not os.path.exists(misnamed)
    assert os.listdir(tmp) == []
    assert again.used == 3 * 64 * KB


def test_restart_with_smaller_capacity_evicts_oldest(pool_dir):
    pool = ChunkPool(pool_dir, 1 << 20)
    chunks = [blob() for _ in range(4)]
    for i, c in enumerate(chunks):
        pool.put(*c, f"/f{i}")
        os.utime(pool_layout.chunk_path(pool_dir, c[0]), (1000 + i, 1000 + i))
    pool.close()
    again = ChunkPool(pool_dir, 2 * 64 * KB)
    assert again.load() == 2
    assert again.present([c for c, _ in chunks]) == [c for c, _ in chunks[2:]]
    assert disk_bytes(pool_dir) <= 2 * 64 * KB


# --------------------------------------------------------------------------- one owner per directory

HOLD_POOL = """
import sys
from sdcache.node.pool import ChunkPool
pool = ChunkPool(sys.argv[1], 1 << 20)
print("locked", flush=True)
sys.stdin.read()  # hold the directory until the parent closes our stdin
pool.close()
"""

TRY_POOL = """
import sys
from sdcache.errors import SdcacheError
from sdcache.node.pool import ChunkPool
try:
    ChunkPool(sys.argv[1], 1 << 20).close()
except SdcacheError as e:
    print(type(e).__name__, e)
    sys.exit(3)
print("opened")
"""


def test_second_pool_on_a_held_directory_fails_at_once(pool_dir):
    pool = ChunkPool(pool_dir, 1 << 20)
    pool.put(*blob(), "/a")
    with pytest.raises(AlreadyExists) as e:
        ChunkPool(pool_dir, 1 << 20)
    assert isinstance(e.value, SdcacheError) and isinstance(e.value, FileExistsError)
    assert os.path.abspath(pool_dir) in str(e.value) and "another node holds it" in str(e.value)
    assert len(pool) == 1  # the refused pool touched nothing
    pool.close()
    pool.close()  # idempotent
    with ChunkPool(pool_dir, 1 << 20) as again:  # released: a successor may take it
        assert again.load() == 1


def test_pool_lock_excludes_other_processes(pool_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_POOL, pool_dir],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(AlreadyExists, match="another node holds it"):
            ChunkPool(pool_dir, 1 << 20)
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    with ChunkPool(pool_dir, 1 << 20):  # the other process is gone: ours now
        other = subprocess.run([sys.executable, "-c", TRY_POOL, pool_dir],
                               capture_output=True, text=True, timeout=60)
        assert other.returncode == 3, other.stderr
        assert other.stdout.startswith("AlreadyExists ")
        assert os.path.abspath(pool_dir) in other.stdout and "another node holds it" in other.stdout
    other = subprocess.run([sys.executable, "-c", TRY_POOL, pool_dir], capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == "opened", other.stderr


def test_lock_file_is_not_a_chunk(pool_dir):
    pool = ChunkPool(pool_dir, 1 << 20)
    a, b = blob(), blob()
    pool.put(*a, "/a")
    pool.put(*b, "/a")
    assert os.path.isfile(os.path.join(pool_dir, LOCK_FILE))
    assert ChunkPool.bytes_on_disk(pool_dir) == 2 * 64 * KB
    pool.close()
    again = ChunkPool(pool_dir, 1 << 20)
    assert again.load() == 2
    st = again.stats()
    assert (st.chunks, st.used, st.corrupt_dropped) == (2, 2 * 64 * KB, 0)
    assert os.path.isfile(os.path.join(pool_dir, LOCK_FILE))
    with pytest.raises(AlreadyExists):  # still locked after load
        ChunkPool(pool_dir, 1 << 20)
    again.close()


# --------------------------------------------------------------------------- eviction vs re-fill


class _WatchedLock:
    """The pool's RLock, telling the test when a chosen thread has to wait for it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.watch: threading.Thread | None = None
        self.blocked = threading.Event()

    def __enter__(self) -> None:
        if self._lock.acquire(blocking=False):
            return
        if threading.current_thread() is self.watch:
            self.blocked.set()
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_refill_while_its_eviction_is_under_way_is_not_deleted(pool_dir):
    pool = ChunkPool(pool_dir, 2 * 64 * KB)
    lock = pool._lock = _WatchedLock()
    x, w, y = blob(), blob(), blob()
    pool.put(*x, "/x")
    pool.put(*w, "/w")
    unlink = pool._unlink
    fired: list[BaseException | None] = []

    def refill() -> None:
        try:
            pool.put(*x, "/x-again")
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            fired.append(e)

    def victim_file_goes(cid: str, *rest: object) -> None:
        if cid == x[0] and not fired:
            # Another thread puts X again while this one is removing X's file:
            # the re-fill either finishes first or waits for the pool's lock.
            fired.append(None)
            t = lock.watch = threading.Thread(target=refill)
            progressed = threading.Event()
            t.start()
            threading.Thread(target=lambda: (t.join(), progressed.set()), daemon=True).start()
            threading.Thread(target=lambda: (lock.blocked.wait(), progressed.set()), daemon=True).start()
            assert progressed.wait(timeout=30)
            threads.append(t)
        unlink(cid, *rest)

    threads: list[threading.Thread] = []
    pool._unlink = victim_file_goes
    pool.put(*y, "/y")  # X is the oldest file: its eviction lets the re-fill in
    for t in threads:
        t.join(timeout=30)
    assert fired[0] is None and fired[1:] == [], fired
    assert x[0] in pool and y[0] in pool
    with open(pool_layout.chunk_path(pool_dir, x[0]), "rb") as f:
        assert f.read() == x[1]  # the re-filled file survived the eviction that let it in
    assert pool.get(x[0]) == x[1]
    assert pool.stats().corrupt_dropped == 0
    assert pool.used <= pool.capacity and disk_bytes(pool_dir) <= pool.capacity


# --------------------------------------------------------------------------- evicted while mapped


@contextmanager
def reserved_range(length: int) -> Iterator[tuple[int, mmap.mmap]]:
    """An address range of *length* bytes, as the loader reserves one, unmapped on exit."""
    region = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(region)
    base = ctypes.addressof(anchor)
    del anchor
    try:
        yield base, region
    finally:
        region.close()  # munmap: a reader's lock goes with the mapping


@contextmanager
def mapped_like_a_reader(path: str, length: int) -> Iterator[memoryview]:
    """Map a pool chunk file the way a same-host loader does (client/_mapped.py)."""
    with reserved_range(length) as (base, region):
        assert _mapped._map_file(base, length, path)
        view = memoryview(region)
        try:
            yield view
        finally:
            view.release()


def pool_files(pool_dir: str, sub: str) -> list[str]:
    d = os.path.join(pool_dir, sub)
    return os.listdir(d) if os.path.isdir(d) else []


def test_evicted_chunk_stays_counted_until_its_mapping_goes(pool_dir):
    cap = 3 * 64 * KB
    pool = ChunkPool(pool_dir, cap)
    pool.load()
    a, b = blob(), blob()
    pool.put(*a, "/a")
    pool.put(*b, "/b")
    with mapped_like_a_reader(pool.chunk_path(a[0]), 64 * KB) as view:
        assert xxhash.xxh3_128_hexdigest(view) == a[0]
        assert pool.evict("/a") == (1, 64 * KB)
        assert a[0] not in pool
        assert not os.path.exists(pool.chunk_path(a[0]))  # no new reader finds it
        with reserved_range(64 * KB) as (base, _):
            assert not _mapped._map_file(base, 64 * KB, pool.chunk_path(a[0]))
        st = pool.stats()
        assert (st.used, st.evicted_mapped_bytes, st.chunks) == (2 * 64 * KB, 64 * KB, 1)
        assert ChunkPool.bytes_on_disk(pool_dir) == 2 * 64 * KB
        c, d = blob(), blob()
        pool.put(*c, "/c")  # fills the pool: a's bytes are still part of it
        assert pool.used == cap
        pool.put(*d, "/d")  # must evict something that frees memory: /b
        assert b[0] not in pool and pool.present([c[0], d[0]]) == [c[0], d[0]]
        assert pool.used == cap and disk_bytes(pool_dir) <= cap
        pool.set_pinned({c[0], d[0]})
        with pytest.raises(CapacityExceeded):  # only the mapped chunk's space is left: none
            pool.put(*blob(), "/e")
        assert xxhash.xxh3_128_hexdigest(view) == a[0]  # the reader's bytes never changed
    st = pool.stats()  # the mapping is gone: its bytes come back
    assert (st.used, st.evicted_mapped_bytes) == (2 * 64 * KB, 0)
    assert pool_files(pool_dir, EVICTED_DIR) == []
    pool.put(*blob(), "/e")
    assert pool.used == cap


def test_mapped_chunks_are_not_chosen_to_make_room(pool_dir):
    pool = ChunkPool(pool_dir, 2 * 64 * KB)
    a, b = blob(), blob()
    pool.put(*a, "/a")
    pool.put(*b, "/b")
    with mapped_like_a_reader(pool.chunk_path(a[0]), 64 * KB):
        c = blob()
        pool.put(*c, "/c")  # /a is older but evicting it would free nothing: /b goes
        assert pool.present([a[0], b[0], c[0]]) == [a[0], c[0]]
        assert pool.stats().evicted_mapped_bytes == 0
        assert pool.can_admit(64 * KB, "/c") is False  # only the mapped chunk is left to take
    assert pool.can_admit(64 * KB, "/c") is True


def test_restart_keeps_counting_evicted_chunks_still_mapped(pool_dir):
    pool = ChunkPool(pool_dir, 1 << 20)
    pool.load()
    a, b = blob(), blob()
    pool.put(*a, "/a")
    pool.put(*b, "/b")
    stray = os.path.join(pool_dir, EVICTED_DIR, "left-by-a-crash")
    with open(stray, "wb") as f:
        f.write(b"x" * 100)
    with mapped_like_a_reader(pool.chunk_path(a[0]), 64 * KB) as view:
        pool.evict("/a")
        pool.close()  # the node restarts while the reader keeps its tensors
        again = ChunkPool(pool_dir, 1 << 20)
        assert again.load() == 1
        st = again.stats()
        assert (st.used, st.evicted_mapped_bytes, st.corrupt_dropped) == (2 * 64 * KB, 64 * KB, 0)
        assert not os.path.exists(stray)  # nobody mapped it: cleared at load
        assert xxhash.xxh3_128_hexdigest(view) == a[0]
    st = again.stats()
    assert (st.used, st.evicted_mapped_bytes) == (64 * KB, 0)
    assert pool_files(pool_dir, EVICTED_DIR) == []
    again.close()


# --------------------------------------------------------------------------- permissions and location


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o077, 0o000, 0o022])
def test_pool_dir_is_0750_and_chunks_0640_whatever_the_umask(tmp_path, mask):
    pool_dir = str(tmp_path / "deep" / "pool")
    with umask(mask):
        pool = ChunkPool(pool_dir, 1 << 20)
        pool.load()
        cid, data = blob()
        pool.put(cid, data, "/a")
    assert mode(pool_dir) == 0o750
    assert mode(os.path.dirname(pool.chunk_path(cid))) == 0o750
    assert mode(os.path.join(pool_dir, pool_layout.TMP_DIR)) == 0o750
    assert mode(os.path.join(pool_dir, EVICTED_DIR)) == 0o750
    assert mode(pool.chunk_path(cid)) == 0o640
    assert mode(os.path.join(pool_dir, LOCK_FILE)) == 0o640
    pool.close()


def test_existing_wider_pool_dir_is_narrowed(pool_dir):
    os.makedirs(pool_dir)
    os.chmod(pool_dir, 0o777)
    ChunkPool(pool_dir, 1 << 20).close()
    assert mode(pool_dir) == 0o750


def test_default_pool_dir_is_stable_and_stays_inside_sdcache():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    root = os.path.join(base, "sdcache")
    assert default_pool_dir("gpu-host-1-7071") == os.path.join(root, "gpu-host-1-7071")
    assert default_pool_dir("gpu-host-1-7071") == default_pool_dir("gpu-host-1-7071")
    for odd in ["a/b", "a_b", "..", ".", "", "../../etc", "x" * 300, "n\x00id"]:
        d = default_pool_dir(odd)
        assert os.path.dirname(d) == root and os.path.basename(d) not in ("", ".", ".."), odd
        assert len(os.path.basename(d)) <= 100
    assert default_pool_dir("a/b") != default_pool_dir("a_b")
