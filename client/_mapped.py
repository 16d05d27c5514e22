"""Zero-copy loading from a same-host pool: chunk files mapped into one address range.

A node keeps each chunk as a file in shared memory. A client on the same
host can map those files instead of copying them, as safetensors maps a
file from the page cache. Chunks sit at arbitrary file offsets (tensor
boundaries), so the mapping does not reproduce the file layout byte for
byte; it gives every chunk a page-aligned place in one reserved range,
keeping the pieces of a large tensor back to back (they are 4 MiB apart,
a whole number of pages), so every tensor is contiguous.

Chunks that are not in a same-host pool, or whose mapped bytes fail their
hash, are fetched into anonymous memory at the same place. Every chunk is
verified before a tensor is handed out. Mappings are private (copy on
write): writing to a tensor never touches the pool. Each mapped chunk file is
held with a shared ``flock`` while mapped, so the node never frees (or stops
counting) a chunk a tensor still points into.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

import xxhash

from sdcache.manifest import Manifest
from sdcache.placement import rank
from sdcache.pool_layout import chunk_path
from sdcache.safetensors_header import HEADER_LEN, parse_header

from . import metrics
from ._inflight import settled

if TYPE_CHECKING:
    import torch

    from .fetcher import Fetcher

PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_MAP_FIXED = 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value


def _round_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def _joined(m: Manifest, tensors: list[tuple[int, int]]) -> set[int]:
    """Chunk indices whose start continues a tensor begun in the chunk before."""
    out: set[int] = set()
    for begin, end in tensors:
        first, last = m.chunk_index(begin), m.chunk_index(end - 1)
        out.update(range(first + 1, last + 1))
    return out


def _layout(m: Manifest, joined: set[int]) -> tuple[list[int], int]:
    """Page-aligned place of each chunk in the range, and the range's length."""
    places: list[int] = []
    pos = 0
    for i, c in enumerate(m.chunks):
        if i and i not in joined:
            pos = _round_up(pos)
        places.append(pos)
        pos += c.length
    return places, _round_up(max(pos, 1))


def _map_file(addr: int, length: int, path: str) -> bool:
    """Map chunk file *path* privately at *addr*; False if it is missing, the wrong size or evicted.

    Takes ``flock(LOCK_SH)`` on the file first. The lock belongs to the open
    file, which the mapping keeps alive after the descriptor is closed, so it
    lasts exactly as long as the mapping; the node sees it and keeps an
    evicted chunk's memory counted against its capacity until then (see
    ``sdcache.node.pool``). Never waits: the node holds a chunk file
    exclusively only for an instant, to free it or to see whether it is
    mapped, and the chunk is then fetched instead.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            now = os.stat(path)
        except OSError:
            return False
        st = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False  # evicted between our open and our lock: the node may free it any time
        if st.st_size != length:  # never map past EOF (SIGBUS on access)
            return False
        got = _libc.mmap(addr, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
        return got == addr
    finally:
        os.close(fd)


def _map_anonymous(addr: int, length: int) -> None:
    got = _libc.mmap(addr, _round_up(length), mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
    if got != addr:
        raise OSError(ctypes.get_errno(), "mmap of anonymous memory failed")


def load_mapped(fetcher: "Fetcher", m: Manifest, name: str) -> dict[str, "torch.Tensor"] | None:
    """Tensors of safetensors file *m*, same-host chunks mapped; None when nothing is local."""
    import torch

    from ._loader import tensor_views

    local = [n for n in fetcher.meta.nodes() if n.host_id == fetcher.host and n.pool_dir]
    if not local or not m.chunks:
        return None
    # The header comes first: it says where tensors are, hence which chunks must touch.
    head = bytearray(min(m.size, max(HEADER_LEN.size, m.chunks[0].length)))
    fetcher.read_into(m, 0, memoryview(head))
    (n,) = HEADER_LEN.unpack_from(head)
    if HEADER_LEN.size + n > len(head):
        head = bytearray(min(m.size, HEADER_LEN.size + n))
        fetcher.read_into(m, 0, memoryview(head))
    header = parse_header(bytes(head[HEADER_LEN.size : HEADER_LEN.size + n]), m.size)
    joined = _joined(m, [(t.begin, t.end) for t in header.tensors if t.end > t.begin])
    places, total = _layout(m, joined)

    region = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(region)
    base = ctypes.addressof(anchor)
    view = memoryview(region)
    try:
        # Each _place maps over (MAP_FIXED) or writes into the region: none may still run once the
        # region can be unmapped and its addresses reused, so the first error waits for the rest.
        pending: list[Future[object]] = []
        with settled(pending):
            for i, c in enumerate(m.chunks):
                dst = view[places[i] : places[i] + c.length]
                pending.append(fetcher._executor.submit(_place, fetcher, m, i, base + places[i], dst, local))
    finally:
        view.release()
        del anchor
    flat = torch.frombuffer(region, dtype=torch.uint8)

    def where(begin: int) -> int:
        i = m.chunk_index(begin)
        return places[i] + (begin - m.chunks[i].offset)

    return tensor_views(flat, header, where)


def _place(fetcher: "Fetcher", m: Manifest, i: int, addr: int, dst: memoryview, local: list) -> None:
    ref = m.chunks[i]
    t0 = time.perf_counter()
    for node in rank(ref.id, local):
        if _map_file(addr, ref.length, chunk_path(node.pool_dir, ref.id)):
            if xxhash.xxh3_128_hexdigest(dst) == ref.id:
                fetcher.tiers["local"] += 1
                metrics.FETCH_SECONDS_BY_TIER["local"].observe(time.perf_counter() - t0)
                metrics.FETCH_BYTES_BY_TIER["local"].inc(ref.length)
                return
            _map_anonymous(addr, ref.length)  # corrupt copy in the pool: fetch a good one
    fetcher.fetch_into(m, i, dst)
