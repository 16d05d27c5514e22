"""Whole chunks in the FUSE daemon's memory: shared, merged, bounded, recycled.

The kernel asks a FUSE daemon for at most 1 MiB at a time, while chunks are
up to 4 MiB. The mount therefore fetches whole chunks through the parallel
:class:`~sdcache.client.fetcher.Fetcher` and answers each request with a
zero-copy slice of the chunk. Chunks are keyed by their id (content hash), so
two files that share a tensor share its chunk, and concurrent requests for one
chunk wait on one fetch (single flight).

Memory: every buffer the cache holds, in use or free for reuse, counts
against ``limit``. Chunks live in recycled buffers of power-of-two sizes (a
fresh buffer costs page faults and zeroing on every chunk, a recycled one
nothing).
Buffers are anonymous mappings, not heap memory: filled in many worker threads,
heap buffers would scatter over per-thread malloc arenas that keep freed
memory, and the process would outgrow the limit.
Finished chunks are evicted least recently used first; a read-ahead that does
not fit is skipped; a demand fetch that does not fit waits until a fetch in
flight finishes. A chunk is never recycled while a reader still waits on it.

Everything here runs on the trio event loop (one thread), so no locks. A
chunk in a pool on this host is copied (and verified) right there, in the
task that fills its slot; any other fetch runs in the fetcher's thread pool,
which wakes the loop once per chunk fetched.
"""

from __future__ import annotations

import logging
import mmap
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from sdcache import errors
from sdcache.chunking import CHUNK_SIZE
from sdcache.manifest import Manifest

from .fetcher import Fetcher

log = logging.getLogger(__name__)

MIN_BUFFER = 64 << 10  # buffers come in powers of two from 64 KiB to one chunk (4 MiB)


def buffer_size(length: int) -> int:
    """The size class of the buffer that holds a chunk of *length* bytes."""
    return max(MIN_BUFFER, 1 << (length - 1).bit_length())


def _to_thread_kwargs() -> dict[str, bool]:
    """trio renamed ``cancellable`` to ``abandon_on_cancel`` in 0.23."""
    import inspect

    params = inspect.signature(trio.to_thread.run_sync).parameters
    return {"abandon_on_cancel": True} if "abandon_on_cancel" in params else {"cancellable": True}


ABANDON = _to_thread_kwargs()


@dataclass(eq=False)
class _Slot:
    chunk_id: str
    length: int
    size: int  # bytes of its buffer, counted against the limit
    buf: mmap.mmap | None  # None until a fresh buffer is made in the worker thread
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    pins: int = 0  # readers holding or awaiting this chunk: it must not be evicted under them
    used: bool = False  # a reader took bytes from it (until then read-ahead may not evict it)


class ChunkCache:
    """Chunks fetched whole, held in memory under a byte limit, one fetch per chunk id."""

    def __init__(self, fetcher: Fetcher, *, limit: int, timeout: float) -> None:
        self.fetcher = fetcher
        self.limit = max(limit, 2 * CHUNK_SIZE)
        self.timeout = timeout
        self.held = 0  # bytes of every buffer held: chunks fetched, in flight, or free for reuse
        self.peak = 0
        self.fresh = 0  # buffers made (each costs page faults); the rest were recycled
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._free: dict[int, list[mmap.mmap]] = {}  # size class -> buffers ready for reuse
        self._in_flight = 0
        self._changed = trio.Event()
        self._waiting = 0  # readers waiting for memory
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Fetches run as tasks of *nursery*, so no single reader owns a shared fetch."""
        self._nursery = nursery

    # -- memory ------------------------------------------------------------------
    def _reserve(self, length: int, *, ahead: bool) -> tuple[bool, mmap.mmap | None]:
        """Room for a chunk of *length* bytes, evicting finished chunks least recently used first.

        Read-ahead (*ahead*) evicts only chunks a reader already used, never
        another reader's read-ahead. Returns (False, None) when nothing can
        go, else (True, a recycled buffer) or (True, None): a fresh buffer is
        to be made by the fetch (its pages come with the fetch's first write).
        """
        size = buffer_size(length)
        free = self._free.get(size)
        if free:
            return True, free.pop()
        while self.held + size > self.limit:
            spare = max((c for c, bufs in self._free.items() if bufs), default=0)
            if spare:
                self._free[spare].pop()  # unmapped: memory goes back to the system
                self.held -= spare
                continue
            victim = self._victim(size, ahead)
            if victim is None:
                return False, None
            del self._slots[victim.chunk_id]
            if victim.size == size:
                return True, victim.buf  # reuse it directly: held is unchanged
            self._recycle(victim)
        self._grow(size)
        self.fresh += 1
        return True, None

    def _victim(self, size: int, ahead: bool, scan: int = 32) -> _Slot | None:
        """The least recently used evictable chunk, preferring one whose buffer has *size*."""
        first = None
        for slot in self._slots.values():
            if slot.pins or not slot.done.is_set() or (ahead and not slot.used):
                continue
            if slot.size == size:
                return slot
            first = first or slot
            scan -= 1
            if not scan:
                break
        return first

    def _grow(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)

    def _recycle(self, slot: _Slot) -> None:
        if slot.buf is not None:
            self._free.setdefault(slot.size, []).append(slot.buf)
        else:
            self.held -= slot.size

    def _notify(self) -> None:
        if self._waiting:
            self._changed.set()
            self._changed = trio.Event()

    # -- fetching ----------------------------------------------------------------
    def prefetch(self, m: Manifest, index: int) -> None:
        """Start fetching chunk *index* of *m* unless it is held or memory is all in use."""
        ref = m.chunks[index]
        if ref.id in self._slots:
            return
        ok, buf = self._reserve(ref.length, ahead=True)
        if ok:
            self._start(m, index, buf)

    async def acquire(self, m: Manifest, index: int) -> _Slot:
        """Chunk *index* of *m*, fetched and verified, pinned until :meth:`release`."""
        ref = m.chunks[index]
        slot = self._slots.get(ref.id)
        while slot is None:
            ok, buf = self._reserve(ref.length, ahead=False)
            if ok:
                slot = self._start(m, index, buf)
            elif self._in_flight:
                changed = self._changed
                self._waiting += 1
                try:
                    await changed.wait()  # every buffer is in flight or pinned: wait for one to finish
                finally:
                    self._waiting -= 1
                slot = self._slots.get(ref.id)
            else:
                # Everything held is pinned by readers assembling requests: go over the limit by
                # one chunk rather than wait for each other forever.
                size = buffer_size(ref.length)
                self._grow(size)
                slot = self._start(m, index, None)
        self._slots.move_to_end(ref.id)
        slot.pins += 1
        if not slot.done.is_set():  # (waiting on a set Event would still yield to the scheduler)
            try:
                await slot.done.wait()
            except BaseException:
                self.release(slot)
                raise
        if slot.error is not None:
            self.release(slot)
            raise slot.error
        slot.used = True
        return slot

    def release(self, slot: _Slot) -> None:
        slot.pins -= 1
        if not slot.pins:
            self._notify()

    @staticmethod
    def view(slot: _Slot) -> memoryview:
        """The bytes of an acquired chunk, read-only."""
        assert slot.buf is not None
        return memoryview(slot.buf)[: slot.length].toreadonly()

    async def get(self, m: Manifest, index: int) -> memoryview:
        """Chunk *index* of *m*, verified, as a read-only view (fetched if needed).

        The view is valid until the caller next awaits: use it (reply, copy) at once.
        """
        slot = await self.acquire(m, index)
        self.release(slot)
        return self.view(slot)

    def _start(self, m: Manifest, index: int, buf: mmap.mmap | None) -> _Slot:
        ref = m.chunks[index]
        slot = _Slot(ref.id, ref.length, buffer_size(ref.length), buf)
        self._slots[ref.id] = slot
        self._in_flight += 1
        assert self._nursery is not None, "ChunkCache.attach() was not called"
        self._nursery.start_soon(self._fill, slot, m, index)
        return slot

    async def _fill(self, slot: _Slot, m: Manifest, index: int) -> None:
        # The fetch runs in the fetcher's thread pool, which reports back with one wake-up of the loop
        # (no thread started or renamed per chunk, as trio.to_thread does).
        finished = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def report(_: object) -> None:
            try:
                token.run_sync_soon(finished.set)
            except trio.RunFinishedError:
                pass  # the mount is gone

        if slot.buf is None:
            slot.buf = mmap.mmap(-1, slot.size, flags=mmap.MAP_PRIVATE)  # pages come with the first write
        view = memoryview(slot.buf)[: slot.length]
        try:
            local = self.fetcher.read_local(m, index, view)
        except Exception:  # the thread pool's fetch below reports what is wrong
            log.debug("local read of chunk %d of %s failed", index, m.path, exc_info=True)
            local = False
        if local:
            # A pool on this host had it: one copy and a hash, done here. Handing it to a worker thread
            # and back costs the loop more than the copy (thread wake-ups, the GIL passed to and fro).
            self._in_flight -= 1
            slot.done.set()
            self._notify()
            return
        fut = self.fetcher.submit_into(m, index, view)
        fut.add_done_callback(report)
        try:
            with trio.fail_after(self.timeout):
                await finished.wait()
            fut.result()
        except trio.TooSlowError:
            fut.cancel()
            slot.error = errors.Unavailable(
                f"{m.path}: chunk {index} was not fetched within {self.timeout:g}s "
                "(cache nodes and source unreachable?)")
        except trio.Cancelled:
            fut.cancel()
            slot.error = errors.Unavailable(f"{m.path}: the mount is shutting down")
            raise
        except Exception as exc:  # every failure reaches the reader as an errno
            slot.error = exc
        finally:
            self._in_flight -= 1
            if slot.error is not None:
                # A fetch given up on may still write into this buffer: never reuse it.
                if self._slots.get(slot.chunk_id) is slot:
                    del self._slots[slot.chunk_id]
                self.held -= slot.size
            slot.done.set()
            self._notify()
