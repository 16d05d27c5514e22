"""Chunks from the other cache nodes: how a missing replica is re-made without the under-store.

On a pool miss, before reading the under-store, a node asks its peers: first
the nodes it was told hold the chunk (``/warm`` with ``peers``, from the
metadata service's repairer), then the chunk's other owners under the file's
placement (:func:`sdcache.placement.plan_file` over the live nodes, the same
plan every client computes), then, in one parallel round of ``POST /has``, up
to :data:`PROBE_PEERS` more nodes in rendezvous order (after nodes join or
leave, a chunk may still sit on its previous owner). The first peer holding
it sends it.

The trust boundary stays where it was: a node only ever asks for chunks of a
committed manifest it has itself read (the caller located the chunk there
first), names peers by node id from the registry it reads with its own node
token (``ListNodes``; a request never names an address), asks them with that
token for the pool copy only (``GET /chunks/{id}`` without ``path``: a peer
that misses answers 404 and reads nothing through), and keeps the bytes only
if they hash to the chunk id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp
import xxhash

from sdcache.errors import SdcacheError
from sdcache.manifest import Manifest
from sdcache.placement import NodeInfo, node_set_key, plan_file, rank
from sdcache.tls import Credentials

log = logging.getLogger(__name__)

NODES_TTL = 2.0  # seconds a node list is used before asking again (clients use the same)
PROBE_PEERS = 16  # nodes asked at once, after the owners, whether they hold a chunk
TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=3)
PLANS_KEPT = 64  # file plans cached (a plan of a 7 GB file over 16 nodes takes ~0.1 s)


@dataclass(slots=True)
class PeerStats:
    fetched: int = 0  # chunks a peer sent
    fetched_bytes: int = 0
    not_found: int = 0  # misses no peer could serve
    errors: int = 0  # peers that failed or sent bad bytes

    def as_dict(self) -> dict[str, int]:
        return {"peer_fetches": self.fetched, "peer_bytes": self.fetched_bytes,
                "peer_not_found": self.not_found, "peer_errors": self.errors}


class Peers:
    """Fetches chunks from other nodes of the cluster (see the module docstring)."""

    def __init__(self, node_id: Callable[[], str | None], list_nodes: Callable[[], Awaitable[list[NodeInfo]]],
                 credentials: Credentials) -> None:
        self._node_id = node_id
        self._list_nodes = list_nodes
        self._headers = credentials.headers()
        self._ssl = credentials.tls.client_context() if credentials.tls else None
        self._scheme = "https" if credentials.tls else "http"
        self._session: aiohttp.ClientSession | None = None
        self._nodes: list[NodeInfo] = []
        self._nodes_at = float("-inf")
        self._nodes_lock = asyncio.Lock()
        self._plans: OrderedDict[tuple[object, ...], dict[str, list[NodeInfo]]] = OrderedDict()
        self.stats = PeerStats()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl else aiohttp.TCPConnector()
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self._session

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes other than this one (the last list fetched when the registry does not answer)."""
        async with self._nodes_lock:
            if time.monotonic() - self._nodes_at >= NODES_TTL:
                try:
                    self._nodes = await self._list_nodes()
                except (SdcacheError, OSError) as exc:
                    log.debug("cannot refresh the node list: %s", exc)
                self._nodes_at = time.monotonic()
        me = self._node_id()
        return [n for n in self._nodes if n.node_id != me]

    def _owners(self, m: Manifest, chunk_id: str, nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
        everyone = [*nodes]
        me = self._node_id()
        # The plan is over every live node, this one included, exactly as clients compute it.
        mine = next((n for n in self._nodes if n.node_id == me), None)
        if mine is not None:
            everyone.append(mine)
        key = (m.path, m.generation, m.replicas, node_set_key(everyone))
        plan = self._plans.get(key)
        if plan is None:
            plan = plan_file(m.chunks, everyone, m.replicas)
            self._plans[key] = plan
            while len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return [o for o in plan.get(chunk_id, ()) if o.node_id != me]

    async def fetch(self, chunk_id: str, length: int, *, manifest: Manifest | None = None,
                    hints: Sequence[str] = ()) -> bytes | None:
        """The chunk's verified bytes from some peer, or None when none of those asked holds it."""
        nodes = await self.nodes()
        if not nodes:
            return None
        by_id = {n.node_id: n for n in nodes}
        order: list[NodeInfo] = [by_id[h] for h in dict.fromkeys(hints) if h in by_id]
        if manifest is not None:
            owners = await asyncio.to_thread(self._owners, manifest, chunk_id, nodes)
            order += [o for o in owners if o not in order]
        for node in order:
            data = await self._get(node, chunk_id, length)
            if data is not None:
                return data
        tried = {n.node_id for n in order}
        rest = [n for n in rank(chunk_id, nodes) if n.node_id not in tried][:PROBE_PEERS]
        if rest:
            answers = await asyncio.gather(*(self._has(n, chunk_id) for n in rest))
            for node, held in zip(rest, answers):
                if held:
                    data = await self._get(node, chunk_id, length)
                    if data is not None:
                        return data
        self.stats.not_found += 1
        return None

    async def _get(self, node: NodeInfo, chunk_id: str, length: int) -> bytes | None:
        url = f"{self._scheme}://{node.address}/chunks/{chunk_id}"  # no path: the peer's pool only
        try:
            async with self._http().get(url, timeout=TIMEOUT) as resp:
                if resp.status != 200:
                    await resp.read()
                    return None
                data = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.stats.errors += 1
            log.debug("peer %s (%s): %s", node.node_id, node.address, exc)
            return None
        if len(data) != length or xxhash.xxh3_128_hexdigest(data) != chunk_id:
            self.stats.errors += 1
            log.warning("peer %s sent bytes that are not chunk %s; ignored", node.node_id, chunk_id,
                        extra={"node": node.node_id, "chunk": chunk_id})
            return None
        self.stats.fetched += 1
        self.stats.fetched_bytes += len(data)
        return data

    async def _has(self, node: NodeInfo, chunk_id: str) -> bool:
        url = f"{self._scheme}://{node.address}/has"
        try:
            async with self._http().post(url, json={"ids": [chunk_id]}, timeout=TIMEOUT) as resp:
                if resp.status != 200:
                    await resp.read()
                    return False
                doc = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return False
        return isinstance(doc, dict) and chunk_id in (doc.get("present") or ())
