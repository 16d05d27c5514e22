"""A node's life in the metadata service: register, heartbeat, follow pins.

The loop registers the node (retrying with capped backoff while the service
is not up yet), heartbeats every ``heartbeat_interval`` seconds with the pool's
fill, registers again when the service says it forgot the node, and reloads
the pinned chunk ids whenever the pins generation changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from sdcache._proto import meta_pb2 as pb
from sdcache._proto import meta_pb2_grpc as pbg

from .pool import ChunkPool

log = logging.getLogger(__name__)

BACKOFF_START = 0.1  # seconds before the first retry of a failed registration
BACKOFF_MAX = 5.0  # cap of the exponential backoff
RPC_TIMEOUT = 10.0  # seconds per RPC
DEFAULT_HEARTBEAT = 5.0  # when the service sends no interval


def unpack_ids(blob: bytes) -> list[str]:
    """16-byte xxh3-128 digests, concatenated, to hex chunk ids."""
    return [blob[i : i + 16].hex() for i in range(0, len(blob) - len(blob) % 16, 16)]


class Registration:
    """Keeps one node registered with the metadata service at *meta*."""

    def __init__(self, meta: str, node: Callable[[], pb.Node], pool: ChunkPool) -> None:
        self.meta = meta
        self._node = node
        self._pool = pool
        self.registered = asyncio.Event()
        self.registrations = 0
        self.heartbeats = 0
        self.pins_generation: int | None = None
        self.heartbeat_interval = DEFAULT_HEARTBEAT

    async def run(self) -> None:
        """Run until cancelled."""
        async with grpc.aio.insecure_channel(self.meta) as channel:
            stub = pbg.MetaStub(channel)
            while True:
                await self._register(stub)
                await self._heartbeat_until_forgotten(stub)

    async def _register(self, stub: pbg.MetaStub) -> None:
        delay = BACKOFF_START
        failures = 0
        while True:
            node = self._node()
            try:
                resp = await stub.RegisterNode(node, timeout=RPC_TIMEOUT)
                break
            except grpc.aio.AioRpcError as e:
                failures += 1
                level = logging.WARNING if failures in (1, 10) or failures % 100 == 0 else logging.DEBUG
                log.log(level, "cannot register with metadata service %s (%s), retrying", self.meta, e.code().name)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        self.registrations += 1
        self.heartbeat_interval = resp.heartbeat_interval if resp.heartbeat_interval > 0 else DEFAULT_HEARTBEAT
        log.info(
            "registered node %s (%s) with metadata service %s; heartbeat every %.1fs",
            node.node_id, node.address, self.meta, self.heartbeat_interval,
        )
        self.registered.set()
        await self._sync_pins(stub, resp.pins_generation)

    async def _heartbeat_until_forgotten(self, stub: pbg.MetaStub) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            st = self._pool.stats()
            node_id = self._node().node_id
            try:
                resp = await stub.Heartbeat(
                    pb.HeartbeatRequest(node_id=node_id, used=st.used, chunks=st.chunks), timeout=RPC_TIMEOUT
                )
            except grpc.aio.AioRpcError as e:
                log.warning("heartbeat to %s failed (%s)", self.meta, e.code().name)
                continue
            self.heartbeats += 1
            if not resp.known:
                log.info("metadata service forgot node %s; registering again", node_id)
                self.registered.clear()
                return
            await self._sync_pins(stub, resp.pins_generation)

    async def _sync_pins(self, stub: pbg.MetaStub, generation: int) -> None:
        if generation == self.pins_generation:
            return
        try:
            resp = await stub.PinnedChunks(pb.PinnedChunksRequest(), timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            log.warning("cannot load pinned chunks from %s (%s); will retry", self.meta, e.code().name)
            return
        ids = unpack_ids(resp.ids)
        self._pool.set_pinned(ids)
        self.pins_generation = resp.generation
        log.info("pins generation %d: %d pinned chunks", resp.generation, len(ids))
