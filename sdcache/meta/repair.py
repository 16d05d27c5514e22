"""Re-replication and rebalancing: every cached chunk on all its owners, and only there.

When the live node set changes (a node dies, joins or comes back) or a
replica override changes, the owners of many chunks change with it
(:func:`sdcache.placement.plan_file` over the new set; rendezvous keeps the
change near the minimum). The :class:`Repairer` then, once the node set has
been steady for one pass interval:

1. reads every file's manifest and computes its plan over the live nodes;
2. asks every live node which of those chunks it holds (``POST /has``);
3. for each chunk held somewhere but missing on an owner, asks that owner to
   load it *from the peers that hold it* (``/warm`` with ``peers`` and
   ``peers_only``: the under-store is not read; the node reads the chunk's
   range only from a committed manifest, as always);
4. then, once the node set has also been steady for ``trim_after`` seconds
   (so a node restarting, or nodes registering one by one, cost no copies),
   asks each node that holds a chunk it no longer owns under any file's plan
   to drop it (``/evict`` of that file's ids), but only once every owner of
   the chunk holds it, so no pass ever leaves a chunk with fewer copies.

A chunk no node holds is not touched: loading it is warm-up's job. A node
that comes back (its pool survived in ``/dev/shm``) is an owner again of what
it held, so step 3 finds it warm, and step 4 drops the copies made while it
was gone.

Cost: a pass reads every manifest and asks every node about every chunk id
(batched, nodes in parallel); it runs only after a change, not on a timer.
Several metadata services over one store may each run it; the requests are
idempotent (a chunk already held is only touched).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ..errors import Unavailable
from ..manifest import Manifest
from ..placement import NodeInfo, ReplicaPolicy, node_set_key
from ..units import format_size
from .fanout import ID_BATCH, WARM_BATCH, file_owners
from .nodeclient import NodeClient

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RepairReport:
    """What one pass did."""

    files: int = 0
    copied: int = 0  # chunk replicas made from peers
    copied_bytes: int = 0
    failed: int = 0  # replicas no peer could provide (or the owner refused)
    trimmed: int = 0  # copies dropped from nodes that no longer own them
    trimmed_bytes: int = 0


class Repairer:
    """Runs repair passes after node-set or policy changes (see the module docstring)."""

    def __init__(self, client: NodeClient, live_nodes: Callable[[], Awaitable[list[NodeInfo]]],
                 all_files: Callable[[], Awaitable[list[Manifest]]], policy: Callable[[], Awaitable[ReplicaPolicy]],
                 interval: float, trim_after: float | None = None) -> None:
        self.client = client
        self._live_nodes = live_nodes
        self._all_files = all_files
        self._policy = policy
        self.interval = interval
        self.trim_after = 10 * interval if trim_after is None else trim_after
        self._poked = asyncio.Event()
        self.passes = 0
        self.last: RepairReport | None = None
        self.copied_for: object = None  # the (node set, policy) the last copy pass was for
        self.trimmed_for: object = None  # ... and the last pass that also trimmed

    def poke(self) -> None:
        """Run a pass soon (a replica override changed)."""
        self.copied_for = self.trimmed_for = None
        self._poked.set()

    async def run(self) -> None:
        """Until cancelled: a pass whenever the live node set or the policy has changed and is steady."""
        seen: object = None
        steady_since = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._poked.wait(), self.interval)
            except TimeoutError:
                pass
            self._poked.clear()
            try:
                nodes = await self._live_nodes()
                policy = await self._policy()
            except Exception as exc:  # noqa: BLE001 - the store may be down for a while; try again later
                log.warning("repair: cannot read the node list or policy: %s", exc)
                continue
            key = (node_set_key(nodes), tuple(sorted(policy.overrides.items())), policy.default)
            if key != seen:  # changed since the last look: wait one more interval for it to settle
                seen, steady_since = key, loop.time()
                # A set seen before (a node back within trim_after) is not repaired for: other
                # copies were made meanwhile.
                self.copied_for = self.trimmed_for = None
                continue
            trim = loop.time() - steady_since >= self.trim_after
            if key == self.trimmed_for or (key == self.copied_for and not trim):
                continue
            try:
                self.last = await self.repair(nodes, trim=trim)
            except Exception:  # noqa: BLE001 - a failed pass is retried at the next interval
                log.exception("repair pass failed")
                continue
            self.passes += 1
            self.copied_for = key
            if trim:
                self.trimmed_for = key

    async def repair(self, nodes: Sequence[NodeInfo], *, trim: bool = True) -> RepairReport:
        """One pass over every file for the live *nodes* (copies, then with *trim* the drops)."""
        report = RepairReport()
        if not nodes:
            return report
        files = await self._all_files()
        report.files = len(files)
        if not files:
            return report
        want = max(m.replicas for m in files)
        if want > len(nodes):
            log.warning("repair: %d replicas wanted but only %d live nodes: each chunk is kept on %d",
                        want, len(nodes), len(nodes))
        plans = await asyncio.to_thread(lambda: [file_owners(m, nodes) for m in files])
        owners_of: dict[str, set[str]] = {}
        length: dict[str, int] = {}
        for m, plan in zip(files, plans):
            for c in m.chunks:
                length[c.id] = c.length
            for cid, owners in plan.items():
                owners_of.setdefault(cid, set()).update(o.node_id for o in owners)
        holders = await self._holders(nodes, list(owners_of))

        # Copies: each owner missing a chunk that some node holds loads it from those peers.
        by_id = {n.node_id: n for n in nodes}
        jobs: dict[str, list[tuple[str, list[str], list[str]]]] = {}  # node id -> [(path, ids, peers)]
        for m, plan in zip(files, plans):
            per_node: dict[str, tuple[list[str], set[str]]] = {}
            for cid, owners in plan.items():
                have = holders.get(cid, set())
                if not have:
                    continue
                for o in owners:
                    if o.node_id not in have:
                        ids, peers = per_node.setdefault(o.node_id, ([], set()))
                        ids.append(cid)
                        peers.update(have)
            for nid, (ids, peers) in per_node.items():
                for i in range(0, len(ids), WARM_BATCH):
                    jobs.setdefault(nid, []).append((m.path, ids[i:i + WARM_BATCH], sorted(peers)))

        async def copy(node: NodeInfo, work: list[tuple[str, list[str], list[str]]]) -> None:
            for path, ids, peers in work:
                try:
                    reply = await self.client.warm(node.address, path, ids, peers=peers, peers_only=True)
                except Unavailable as exc:
                    log.warning("repair: %s", exc)
                    report.failed += len(ids)
                    continue
                report.failed += len(reply.failed) + reply.no_space
                report.copied += reply.loaded
                report.copied_bytes += reply.bytes
                for cid in ids:
                    if cid not in reply.failed:
                        holders.setdefault(cid, set()).add(node.node_id)

        async with asyncio.TaskGroup() as tg:
            for nid, work in jobs.items():
                tg.create_task(copy(by_id[nid], work))
        if jobs:
            # What the copies actually left (a node may have lacked room): ask the owners again.
            holders = await self._holders(nodes, [cid for cid in owners_of if holders.get(cid)])

        # Trim: copies on nodes that own the chunk under no file's plan, once every owner has it.
        drops: dict[str, dict[str, list[str]]] = {}  # node id -> path -> ids
        for m in files if trim else ():
            for cid in dict.fromkeys(c.id for c in m.chunks):
                have = holders.get(cid, set())
                owners = owners_of.get(cid, set())
                extra = have - owners
                if extra and owners <= have:
                    for nid in extra:
                        drops.setdefault(nid, {}).setdefault(m.path, []).append(cid)

        async def trim(node: NodeInfo, work: dict[str, list[str]]) -> None:
            for path, ids in work.items():
                for i in range(0, len(ids), ID_BATCH):
                    try:
                        n, nbytes = await self.client.evict(node.address, path, ids[i:i + ID_BATCH])
                    except Unavailable as exc:
                        log.warning("repair: %s", exc)
                        continue
                    report.trimmed += n
                    report.trimmed_bytes += nbytes

        async with asyncio.TaskGroup() as tg:
            for nid, work in drops.items():
                tg.create_task(trim(by_id[nid], work))
        if report.copied or report.trimmed or report.failed:
            log.info("repair over %d nodes, %d files: %d replicas re-made from peers (%s), %d failed, "
                     "%d copies trimmed (%s)", len(nodes), report.files, report.copied,
                     format_size(report.copied_bytes), report.failed, report.trimmed,
                     format_size(report.trimmed_bytes))
        return report

    async def _holders(self, nodes: Sequence[NodeInfo], ids: list[str]) -> dict[str, set[str]]:
        """Chunk id -> ids of the live nodes that hold it."""
        held: dict[str, set[str]] = {}

        async def ask(node: NodeInfo) -> None:
            for i in range(0, len(ids), ID_BATCH):
                try:
                    present = await self.client.has(node.address, ids[i:i + ID_BATCH])
                except Unavailable as exc:
                    log.warning("repair: %s", exc)
                    return
                for cid in present:
                    held.setdefault(cid, set()).add(node.node_id)

        async with asyncio.TaskGroup() as tg:
            for node in nodes:
                tg.create_task(ask(node))
        return held
