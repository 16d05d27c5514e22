"""The cache node's logic: chunks served from the pool, read through from committed sources.

:class:`ChunkService` answers for one node, independent of any transport:
pool hits, read-through of exactly the byte range a committed manifest names
(:class:`~.locator.SourceLocator`), one under-store fetch per chunk at a time
(:class:`~.singleflight.SingleFlight`), and warm-ups. :class:`InflightBudget`
bounds the chunk bytes held for requests at once. The HTTP adapter over it is
:mod:`.http`; the server that wires both to a socket is :mod:`.server`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sdcache.chunking import CHUNK_SIZE
from sdcache.errors import (
    CapacityExceeded,
    InvalidArgument,
    NotFound,
    Overloaded,
    SdcacheError,
    StaleSource,
    error_name,
)
from sdcache.units import format_size

from . import metrics
from .locator import SourceLocator, SourceRange
from .peers import Peers
from .pool import ChunkPool
from .singleflight import SingleFlight
from .underfs import UnderStore

log = logging.getLogger(__name__)

WARM_CONCURRENCY = 8  # chunks one /warm request loads at a time
DEFAULT_MAX_INFLIGHT = 512 << 20  # chunk bytes held for requests at once
RETRY_AFTER_S = 1  # what a refused read is told to wait (the HTTP adapter's Retry-After too)


class InflightBudget:
    """Bytes of chunk data the node holds for requests at once, bounded.

    Reads take their chunk's size before touching the pool and give it back
    when the response is written; over the bound a read is refused
    (:class:`Overloaded`, 503 + ``Retry-After``) rather than queued, so a
    client tries another node. Warm-ups wait for room instead.
    """

    def __init__(self, limit: int) -> None:
        if limit < CHUNK_SIZE:
            raise InvalidArgument(f"--max-inflight must be at least one chunk ({format_size(CHUNK_SIZE)})")
        self.limit = limit
        self.used = 0
        self.refused = 0
        self._freed = asyncio.Condition()

    def try_take(self, n: int) -> None:
        if self.used + n > self.limit:
            self.refused += 1
            raise Overloaded(f"node busy: {format_size(self.used)} of {format_size(self.limit)} in flight; "
                             f"retry in {RETRY_AFTER_S}s or ask another node")
        self.used += n

    async def take(self, n: int) -> None:
        async with self._freed:
            await self._freed.wait_for(lambda: self.used + n <= self.limit)
            self.used += n

    async def give(self, n: int) -> None:
        self.used -= n
        async with self._freed:
            self._freed.notify_all()


class ChunkService:
    """Serve chunks from the pool, reading through from the under-store on a miss.

    Read-through reads only ranges that *locator* finds in committed manifests,
    from a peer node that holds the chunk when *peers* finds one, else from the
    under-store.
    """

    def __init__(self, pool: ChunkPool, under: UnderStore | None = None, *,
                 locator: SourceLocator | None = None, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 peers: Peers | None = None) -> None:
        self.pool = pool
        self.under = under or UnderStore()
        self.locator = locator or SourceLocator(None)
        self.peers = peers
        self.budget = InflightBudget(max_inflight)
        self.flights: SingleFlight[str, tuple[bytes, bool]] = SingleFlight()
        self.peer_flights: SingleFlight[str, tuple[bytes, bool]] = SingleFlight()
        self._flight_src: dict[str, str] = {}
        # Ids whose last read-through a peer served (the HTTP adapter's served-bytes counters).
        self._from_peer: set[str] = set()

    def came_from_peer(self, chunk_id: str) -> bool:
        """Whether the last read-through of *chunk_id* was served by a peer node (not the under-store)."""
        return chunk_id in self._from_peer

    async def read_pool(self, chunk_id: str, path: str | None) -> tuple[bytes | None, str]:
        """Verified bytes from the pool or None, and the result: ``hit``, ``miss`` or ``corrupt``."""
        if chunk_id not in self.pool:
            return self.pool.lookup(chunk_id, path)  # counts the miss; touches no file
        return await asyncio.to_thread(self.pool.lookup, chunk_id, path)

    async def read_through(self, chunk_id: str, where: SourceRange, path: str | None, *,
                           hints: list[str] | None = None, peers_only: bool = False) -> tuple[bytes, bool]:
        """Fetch a chunk from a peer node, else the under-store (one fetch per id at a time), and keep it if it fits.

        *where* comes from a committed manifest (:class:`SourceLocator`), never
        from a request. Peers are asked first (*hints*, node ids, before the
        chunk's other owners); with *peers_only* a chunk no peer holds is
        :class:`NotFound` and the under-store is not read. Returns (bytes,
        kept). Raises StaleSource or Unavailable.
        """
        src = where.url
        if peers_only:
            return await self._from_peers(chunk_id, where, path, hints or [])

        async def flight() -> tuple[bytes, bool]:
            data = await self._peer_bytes(chunk_id, where, path, hints or [])
            if data is not None:
                if len(self._from_peer) >= 65_536:  # a hint for the counters, not a record: bounded
                    self._from_peer.clear()
                self._from_peer.add(chunk_id)
                return await self._keep(chunk_id, data, path)
            self._from_peer.discard(chunk_id)
            data = await self.under.read(src, where.offset, where.length, chunk_id)
            return await self._keep(chunk_id, data, path)

        flight_src = self._flight_src.get(chunk_id) if self.flights.in_flight(chunk_id) else None
        if flight_src is None:
            self._flight_src[chunk_id] = src
        try:
            (data, kept), joined = await self.flights.do(chunk_id, flight)
        except StaleSource:
            # A flight we joined read another file that holds this chunk and
            # found it changed; our own source may still be good.
            if flight_src is None or flight_src == src:
                raise
            return await self.read_through(chunk_id, where, path)
        finally:
            if not self.flights.in_flight(chunk_id):
                self._flight_src.pop(chunk_id, None)
        if joined and kept and path is not None:
            self.pool.touch(chunk_id, path)
        return data, kept

    async def _peer_bytes(self, chunk_id: str, where: SourceRange, path: str | None,
                          hints: list[str]) -> bytes | None:
        if self.peers is None:
            return None
        return await self.peers.fetch(chunk_id, where.length, manifest=self.locator.manifest(path), hints=hints)

    async def _keep(self, chunk_id: str, data: bytes, path: str | None) -> tuple[bytes, bool]:
        try:
            await asyncio.to_thread(self.pool.put, chunk_id, data, path)
        except CapacityExceeded as e:
            log.debug("not keeping chunk %s: %s", chunk_id, e, extra={"chunk": chunk_id, "path": path})
            return data, False
        except OSError as e:
            log.warning("cannot write chunk %s to the pool: %s", chunk_id, e, extra={"chunk": chunk_id, "path": path})
            return data, False
        return data, True

    async def _from_peers(self, chunk_id: str, where: SourceRange, path: str | None,
                          hints: list[str]) -> tuple[bytes, bool]:
        """Re-replication: the chunk from a peer (its own flight, so a reader never waits on a
        peers-only fetch that may find nothing) or :class:`NotFound`."""

        async def flight() -> tuple[bytes, bool]:
            data = await self._peer_bytes(chunk_id, where, path, hints)
            if data is None:
                raise NotFound(f"no peer node holds chunk {chunk_id}")
            return await self._keep(chunk_id, data, path)

        (data, kept), joined = await self.peer_flights.do(chunk_id, flight)
        if joined and kept and path is not None:
            self.pool.touch(chunk_id, path)
        return data, kept

    async def get(self, chunk_id: str, path: str | None) -> tuple[bytes, bool]:
        """(bytes, hit): from the pool if it holds a good copy, else read through from *path*'s manifest.

        Observes ``sdcache_node_chunk_request_seconds`` by result, failures
        included; the request counters are the pool's own (:mod:`.metrics`).
        """
        t0 = time.perf_counter()
        result = metrics.MISS
        try:
            credited = path if path is not None and self.locator.known(path, chunk_id) else None
            data, result = await self.read_pool(chunk_id, credited)
            if data is not None:
                return data, True
            if path is None:
                raise NotFound(f"chunk {chunk_id} is not in this node's pool")
            where = await self.locator.locate(path, chunk_id)
            data, _ = await self.read_through(chunk_id, where, path)
            return data, False
        finally:
            metrics.CHUNK_REQUEST_SECONDS_BY_RESULT[result].observe(time.perf_counter() - t0)

    async def warm(self, path: str, ids: list[str], *, peers: list[str] | None = None,
                   peers_only: bool = False) -> dict[str, Any]:
        """Load chunks *ids* of file *path* into the pool, up to WARM_CONCURRENCY at a time.

        Each chunk comes from a peer node that holds it (*peers* asked first)
        when there is one, else from the under-store; with *peers_only*
        (re-replication) never from the under-store.
        """
        result: dict[str, Any] = {"loaded": 0, "bytes": 0, "present": 0, "failed": [], "no_space": 0}
        sem = asyncio.Semaphore(WARM_CONCURRENCY)

        async def one(chunk_id: str) -> None:
            async with sem:
                if self.pool.touch(chunk_id, path):
                    result["present"] += 1
                    return
                try:
                    where = await self.locator.locate(path, chunk_id)
                    if not self.pool.can_admit(where.length, path):
                        result["no_space"] += 1
                        return
                    await self.budget.take(where.length)
                    try:
                        _, kept = await self.read_through(chunk_id, where, path, hints=peers,
                                                          peers_only=peers_only)
                    finally:
                        await self.budget.give(where.length)
                except SdcacheError as e:
                    result["failed"].append({"id": chunk_id, "error": error_name(e), "message": str(e)})
                    return
                if kept:
                    result["loaded"] += 1
                    result["bytes"] += where.length
                else:
                    result["no_space"] += 1

        async with asyncio.TaskGroup() as tg:
            for chunk_id in dict.fromkeys(ids):  # each id once
                tg.create_task(one(chunk_id))
        return result
