"""ChunkPool: capacity, file-aware eviction, pins, verification, warm restart."""

from __future__ import annotations

import os
import random

import pytest

from sdcache import pool_layout
from sdcache.errors import CapacityExceeded
from sdcache.hashing import chunk_id
from sdcache.node.pool import ChunkPool

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
    again = ChunkPool(pool_dir, 2 * 64 * KB)
    assert again.load() == 2
    assert again.present([c for c, _ in chunks]) == [c for c, _ in chunks[2:]]
    assert disk_bytes(pool_dir) <= 2 * 64 * KB
