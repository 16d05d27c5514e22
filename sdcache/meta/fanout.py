"""Warm-up, cache checks and eviction: a file request fanned out to the nodes.

Placement is computed, so the service knows each chunk's owners without asking
anyone: :func:`sdcache.placement.plan_file` of the file over the live nodes,
with the file's replica count (``Manifest.replicas``), exactly as every client
computes it. Warm-up sends every owner its chunks (so every replica is
filled) in batches of :data:`WARM_BATCH` (one file per batch), nodes in
parallel, and reports progress after every batch. It runs in two rounds: each
chunk's first owner loads it from the under-store, then the other owners copy
it from that node (``/warm`` naming it in ``peers``), so the under-store is
read once per chunk however many replicas there are.

Bytes are *replicated* bytes: a 2 GiB file with 2 replicas is 4 GiB to load
and 4 GiB of pool, which is what the nodes' capacity must hold.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from ..errors import Unavailable
from ..manifest import Manifest
from ..placement import NodeInfo, effective_replicas, plan_file
from ..units import format_size
from .nodeclient import NodeClient

log = logging.getLogger(__name__)

WARM_BATCH = 64  # chunks per /warm request
ID_BATCH = 4096  # ids per /has or /evict request


@dataclass(slots=True)
class WarmStatus:
    """One progress report of a warm-up or a check (``WarmupProgress`` on the wire)."""

    path: str
    total_bytes: int
    done_bytes: int
    pool_capacity: int
    fits_bytes: int
    message: str = ""
    done: bool = False


@dataclass(slots=True)
class _Batch:
    """Chunks of one file for one node; each id once, credited for every occurrence."""

    path: str
    chunks: list[str] = field(default_factory=list)  # ids; the node looks up where their bytes are
    credit: dict[str, int] = field(default_factory=dict)  # id -> bytes it stands for in the file
    peers: set[str] = field(default_factory=set)  # node ids to copy from first (the chunks' first owners)


def capacity_message(what: str, total: int, capacity: int) -> str:
    """The one-line warning when a request is larger than the pool, else ``""``."""
    if total <= capacity:
        return ""
    return (
        f"warm-up of {what} needs {format_size(total)} but the pool holds {format_size(capacity)};"
        f" {format_size(min(total, capacity))} fits"
    )


def replicated_size(m: Manifest, nodes: Sequence[NodeInfo]) -> int:
    """Bytes *m* takes in the pool with every chunk on all its owners."""
    return m.size * effective_replicas(m.replicas, nodes)


def replicas_message(files: Sequence[Manifest], nodes: Sequence[NodeInfo]) -> str:
    """The one-line warning when a file wants more replicas than there are live nodes, else ``""``."""
    want = max((m.replicas for m in files), default=1)
    if want <= len(nodes) or not nodes:
        return ""
    return (f"{want} replicas wanted but only {len(nodes)} live node{'s' if len(nodes) != 1 else ''}: "
            f"each chunk is kept on {len(nodes)}")


def _fitting(files: Sequence[Manifest], capacity: int,
             nodes: Sequence[NodeInfo] = ()) -> tuple[list[Manifest], list[Manifest]]:
    """Split *files* (in order) into those that fit the pool whole and the rest.

    A half-cached model is worth little, and loading more than the pool holds
    only evicts what this same warm-up loaded.
    """
    fit: list[Manifest] = []
    rest: list[Manifest] = []
    used = 0
    for m in files:
        size = replicated_size(m, nodes) if nodes else m.size
        if used + size <= capacity:
            fit.append(m)
            used += size
        else:
            rest.append(m)
    return fit, rest


def file_owners(m: Manifest, nodes: Sequence[NodeInfo]) -> dict[str, list[NodeInfo]]:
    """The owners of each distinct chunk of *m* (its plan over *nodes*)."""
    return plan_file(m.chunks, nodes, m.replicas)


def plan_warm(files: Sequence[Manifest], nodes: Sequence[NodeInfo], *,
              replicas: bool | None = None) -> dict[str, list[_Batch]]:
    """Batches of chunks per node id: each chunk goes to every one of its owners.

    *replicas* False: only each chunk's first owner; True: only the others
    (each batch naming the first owners as ``peers``); None: all of them.
    A batch names a file and chunk ids only: the node reads the file's
    committed manifest itself to learn where the bytes are (confined reads).
    """
    plan: dict[str, list[_Batch]] = {}
    for m in files:
        owners = file_owners(m, nodes)
        per_node: dict[str, _Batch] = {}
        for c in m.chunks:
            mine = owners[c.id]
            chosen = mine if replicas is None else (mine[1:] if replicas else mine[:1])
            for node in chosen:
                batch = per_node.get(node.node_id)
                if batch is None or (c.id not in batch.credit and len(batch.chunks) >= WARM_BATCH):
                    batch = per_node[node.node_id] = _Batch(m.path)
                    plan.setdefault(node.node_id, []).append(batch)
                if c.id in batch.credit:
                    batch.credit[c.id] += c.length
                else:
                    batch.chunks.append(c.id)
                    batch.credit[c.id] = c.length
                    if replicas:
                        batch.peers.add(mine[0].node_id)
    return plan


def _owned_ids(files: Sequence[Manifest], nodes: Sequence[NodeInfo]) -> dict[str, list[str]]:
    """Every distinct chunk id of *files*, grouped by owning node id (a chunk under each of its owners)."""
    ids: dict[str, dict[str, None]] = {}
    for m in files:
        for cid, owners in file_owners(m, nodes).items():
            for node in owners:
                ids.setdefault(node.node_id, {})[cid] = None
    return {n: list(v) for n, v in ids.items()}


def _batches(items: list[str], n: int) -> list[list[str]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


class Fanout:
    """Runs warm-ups, checks and evictions against live nodes through one :class:`NodeClient`."""

    def __init__(self, client: NodeClient) -> None:
        self.client = client

    # -- warm-up -------------------------------------------------------------

    async def warm(self, what: str, files: list[Manifest], nodes: list[NodeInfo]) -> AsyncIterator[WarmStatus]:
        """Load *files* into the pool, every replica; one status first, one per batch, a final one."""
        if not nodes:
            raise Unavailable(f"warm-up of {what}: no live cache nodes (start one with `sdcache node`)")
        total = sum(replicated_size(m, nodes) for m in files)
        capacity = sum(n.capacity for n in nodes)
        warning = "; ".join(w for w in (replicas_message(files, nodes), capacity_message(what, total, capacity)) if w)
        fit, skipped = _fitting(files, capacity, nodes)

        def status(path: str, done_bytes: int, message: str = "", done: bool = False) -> WarmStatus:
            return WarmStatus(path, total, done_bytes, capacity, min(total, capacity), message, done)

        yield status(what, 0, warning)
        by_id = {n.node_id: n for n in nodes}
        done_bytes, failed, no_space = 0, {}, 0
        for replicas in (False, True):  # first owners from the under-store, then the others from them
            plan = await asyncio.to_thread(plan_warm, fit, nodes, replicas=replicas)
            queue: asyncio.Queue[tuple[str, int, dict[str, str], int] | None] = asyncio.Queue()
            tasks = [asyncio.create_task(self._warm_node(by_id[nid], batches, queue)) for nid, batches in plan.items()]
            try:
                running = len(tasks)
                while running:
                    item = await queue.get()
                    if item is None:
                        running -= 1
                        continue
                    path, credited, batch_failed, batch_no_space = item
                    done_bytes += credited
                    failed.update(batch_failed)
                    no_space += batch_no_space
                    yield status(path, done_bytes)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        notes = [f"{what}: {format_size(done_bytes)} of {format_size(total)} in the pool"]
        if warning:
            notes.append(warning)
        if skipped:
            names = ", ".join(m.path for m in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            notes.append(f"skipped {len(skipped)} file(s) that do not fit: {names}")
        if failed:
            notes.append(f"{len(failed)} chunk(s) failed to load: {next(iter(failed.values()))}")
        if no_space:
            notes.append(f"{no_space} chunk(s) found no space on their node")
        yield status(what, done_bytes, "; ".join(notes), True)

    async def _warm_node(
        self,
        node: NodeInfo,
        batches: list[_Batch],
        queue: asyncio.Queue[tuple[str, int, dict[str, str], int] | None],
    ) -> None:
        try:
            for batch in batches:
                queue.put_nowait((batch.path, *await self._warm_batch(node, batch)))
        finally:
            queue.put_nowait(None)

    async def _warm_batch(self, node: NodeInfo, batch: _Batch) -> tuple[int, dict[str, str], int]:
        """``(bytes now in the pool, failed id -> why, no-space count)`` for one batch."""
        try:
            reply = await self.client.warm(node.address, batch.path, batch.chunks, peers=sorted(batch.peers))
        except Unavailable as exc:
            log.warning("warm-up of %s: %s", batch.path, exc)
            return 0, {i: str(exc) for i in batch.chunks}, 0
        if not reply.failed and not reply.no_space:
            return sum(batch.credit.values()), {}, 0
        # Some chunks did not make it: ask which did, rather than guess.
        try:
            present = await self.client.has(node.address, list(batch.credit))
        except Unavailable as exc:
            log.warning("warm-up of %s: %s", batch.path, exc)
            present = set()
        failed = {i: f"node {node.address}: {why}" for i, why in reply.failed.items()}
        return sum(batch.credit[i] for i in present if i in batch.credit), failed, reply.no_space

    # -- check ---------------------------------------------------------------

    async def check(self, what: str, files: list[Manifest], nodes: list[NodeInfo]) -> AsyncIterator[WarmStatus]:
        """Report how much of *files* the pool holds on their owners (replicated bytes):
        one status per file, a final one."""
        if not nodes:
            yield WarmStatus(what, sum(m.size for m in files), 0, 0, 0, f"{what}: no live cache nodes", True)
            return
        total = sum(replicated_size(m, nodes) for m in files)
        capacity = sum(n.capacity for n in nodes)
        fits = min(total, capacity)
        warning = "; ".join(w for w in (replicas_message(files, nodes), capacity_message(what, total, capacity)) if w)
        owned = await asyncio.to_thread(_owned_ids, files, nodes)
        by_id = {n.node_id: n for n in nodes}
        present: dict[str, set[str]] = {}  # node id -> ids it holds
        problems: list[str] = []

        async def ask(node: NodeInfo, ids: list[str]) -> None:
            held = present.setdefault(node.node_id, set())
            try:
                for batch in _batches(ids, ID_BATCH):
                    held.update(await self.client.has(node.address, batch))
            except Unavailable as exc:
                problems.append(str(exc))

        async with asyncio.TaskGroup() as tg:
            for nid, ids in owned.items():
                tg.create_task(ask(by_id[nid], ids))
        done_bytes = 0
        for m in files:
            owners = await asyncio.to_thread(file_owners, m, nodes)
            cached = sum(c.length for c in m.chunks for o in owners[c.id] if c.id in present.get(o.node_id, ()))
            done_bytes += cached
            size = replicated_size(m, nodes)
            yield WarmStatus(
                m.path, total, done_bytes, capacity, fits, f"{format_size(cached)} of {format_size(size)} cached"
            )
        notes = [f"{what}: {format_size(done_bytes)} of {format_size(total)} cached"]
        notes += [warning] if warning else []
        notes += problems[:3]
        yield WarmStatus(what, total, done_bytes, capacity, fits, "; ".join(notes), True)

    # -- eviction ------------------------------------------------------------

    async def evict(self, files: list[Manifest], nodes: list[NodeInfo]) -> tuple[int, int]:
        """Drop the chunks of *files* from every live node; ``(chunks, bytes)`` freed.

        Every node is asked, not only the owners: a chunk stays where it was
        loaded when nodes join or leave. Fails only when every node failed.
        """
        per_file = [(m.path, list(dict.fromkeys(c.id for c in m.chunks))) for m in files]
        totals = [0, 0]
        problems: list[str] = []

        async def one(node: NodeInfo) -> None:
            try:
                for path, ids in per_file:
                    for batch in _batches(ids, ID_BATCH):
                        chunks, nbytes = await self.client.evict(node.address, path, batch)
                        totals[0] += chunks
                        totals[1] += nbytes
            except Unavailable as exc:
                log.warning("evict: %s", exc)
                problems.append(str(exc))

        async with asyncio.TaskGroup() as tg:
            for node in nodes:
                tg.create_task(one(node))
        if nodes and len(problems) == len(nodes):
            raise Unavailable(f"evict: every node failed: {problems[0]}")
        return totals[0], totals[1]
