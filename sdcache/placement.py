"""Where a chunk lives: weighted rendezvous hashing over the live nodes, zones and replicas.

Every client computes the same answer from the same inputs (a file's
manifest, its replica count and the live node list), so placement needs no
per-chunk lookup. A node's weight is its capacity, so a node twice as large
holds about twice as many chunks.

Two layers:

* :func:`score` / :func:`rank`: plain weighted rendezvous of one chunk id over
  the nodes. Adding or removing a node moves only the chunks it gains or
  loses. It is the fallback order after a chunk's owners.
* :func:`plan_file`: the owners of every chunk of one file. Per-chunk
  rendezvous alone leaves a file unevenly spread (one node of four holds about
  a third of a 500-chunk file, and that node sets the pace of a parallel
  load), so the file's chunks are *dealt* over the nodes instead:

  1. Each node gets a share of the file's ``replicas x bytes``, proportional
     to its capacity, so a file loads from every node at once. Bytes, not
     chunks: a safetensors file's chunks run from a few KB to 4 MiB (in a
     2 GB SD checkpoint only a sixth are full 4 MiB pieces), and equal chunk
     counts still left one node of eight 23% over its share. With zones,
     each zone first gets its share (proportional to its capacity, at most
     ``per_zone x bytes``, where ``per_zone`` is the fewest owners of one
     chunk a zone must take so ``replicas`` fit: 1 when there are at least as
     many zones as replicas), then its nodes split it.
  2. Every (chunk, node) pair is scored by rendezvous, and the pairs are taken
     best first: a pair becomes an owner when the chunk still needs owners,
     the chunk fits in what is left of the node's share, and the chunk has
     fewer than ``per_zone`` owners in that node's zone. This is the stable
     matching of chunks to nodes under one shared score, so it does not depend
     on the order of the chunks, and a node that joins or leaves moves little
     more than its own share (measured in ``tests/test_placement.py``).
  3. What that pass cannot seat (the shares' last fractions, or the last
     chunks finding room only on nodes that already own them) is seated by a
     swap of equally long chunks where one exists, else, biggest first, on
     the best-scored node with room for it, else on the best-scored node it
     takes at most one chunk past its share. So every node ends within about
     one chunk of its share, and a one-chunk file (a small LoRA) lands on its
     rendezvous winner: the shares do not favour any node.

  A chunk's owners come out best score first; :func:`read_order` puts those in
  the reader's zone first. A chunk shared by two files usually gets the same
  owners in both (the scores are the chunk's, not the file's); the few the
  shares move off their first choice may be kept once per file.

Zones and replica counts are validated here (:func:`check_zone`,
:func:`check_replicas`) so every entry point says the same thing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import xxhash

from .chunking import ChunkRef
from .errors import InvalidArgument

_TWO64 = float(1 << 64)
#: A zone name: what Kubernetes puts in topology.kubernetes.io/zone, and no more.
ZONE_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
MAX_REPLICAS = 16


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A live cache node as the metadata service reports it."""

    node_id: str
    address: str  # host:port of its chunk API
    capacity: int
    role: str = "memory"  # "gpu" or "memory"
    host_id: str = ""  # identifies the machine, for short-circuit reads
    pool_dir: str = ""  # its shared-memory pool directory on that machine
    used: int = 0
    zone: str = ""  # failure domain ("" = none given)


def check_zone(zone: str) -> str:
    """*zone* if it is a usable zone name (``""`` means none), else one clear :class:`InvalidArgument`."""
    if zone == "" or ZONE_RE.fullmatch(zone):
        return zone
    shown = zone if len(zone) <= 80 else zone[:80] + "..."
    raise InvalidArgument(f"zone name {shown!r} is not allowed: use 1-63 letters, digits, '.', '_' or '-', "
                          "starting and ending with a letter or digit (e.g. eu-west-1a)")


def check_replicas(n: int, what: str = "--replicas") -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_REPLICAS:
        raise InvalidArgument(f"{what} must be a whole number from 1 to {MAX_REPLICAS}, not {n!r}")
    return n


def score(chunk_id: str, node: NodeInfo) -> float:
    """Rendezvous score of *node* for *chunk_id*; higher wins."""
    h = xxhash.xxh3_64_intdigest(chunk_id.encode() + b"\x00" + node.node_id.encode())
    u = (h + 0.5) / _TWO64  # uniform in (0, 1)
    return -max(node.capacity, 1) / math.log(u)


def rank(chunk_id: str, nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
    """All *nodes* in rendezvous order for *chunk_id* (the fallback order after a chunk's owners)."""
    return sorted(nodes, key=lambda n: score(chunk_id, n), reverse=True)


def owner(chunk_id: str, nodes: Sequence[NodeInfo]) -> NodeInfo | None:
    """The plain rendezvous winner for *chunk_id* (no file balancing, one replica)."""
    return max(nodes, key=lambda n: score(chunk_id, n), default=None)


# --------------------------------------------------------------------------- replica policy


@dataclass(frozen=True, slots=True)
class ReplicaPolicy:
    """How many owners each file's chunks get: a default and per-directory overrides.

    The override of the deepest directory above a file wins (``/models/sdxl``
    over ``/models``); an override may also name one file.
    """

    default: int = 1
    overrides: Mapping[str, int] = field(default_factory=dict)

    def for_path(self, path: str) -> int:
        if not self.overrides:
            return self.default
        p = path
        while True:
            n = self.overrides.get(p)
            if n is not None:
                return n
            if p in ("/", ""):
                return self.default
            p = p.rsplit("/", 1)[0] or "/"


def effective_replicas(replicas: int, nodes: Sequence[NodeInfo]) -> int:
    """Owners a chunk actually gets: *replicas*, but never more than there are nodes."""
    return max(0, min(replicas, len(nodes)))


# --------------------------------------------------------------------------- a file's plan


def _shares(total: float, weights: Sequence[float], caps: Sequence[float]) -> list[float]:
    """Split *total* over items by *weights*, none above its cap (water-filling); sums to
    ``min(total, sum(caps))``."""
    n = len(weights)
    share = [0.0] * n
    fixed = [False] * n
    remaining = float(min(total, sum(caps)))
    while remaining > 1e-9:
        free = [i for i in range(n) if not fixed[i] and caps[i] > 0]
        if not free:
            break
        wsum = sum(max(weights[i], 1e-12) for i in free)
        over = [i for i in free if remaining * max(weights[i], 1e-12) / wsum >= caps[i]]
        if not over:
            for i in free:
                share[i] = remaining * max(weights[i], 1e-12) / wsum
            break
        for i in over:
            share[i], fixed[i] = float(caps[i]), True
            remaining -= caps[i]
    return share


def _per_zone_limit(zone_sizes: Sequence[int], replicas: int) -> int:
    """Fewest owners of one chunk a zone must be allowed so *replicas* distinct nodes fit."""
    for m in range(1, replicas + 1):
        if sum(min(m, s) for s in zone_sizes) >= replicas:
            return m
    return replicas


ChunkLike = Union[str, ChunkRef, tuple[str, int]]


def _distinct(chunks: Iterable[ChunkLike]) -> tuple[list[str], list[int]]:
    """Ids and lengths of the distinct chunks, in order; a bare id counts as length 1."""
    ids: list[str] = []
    lengths: list[int] = []
    seen: set[str] = set()
    for c in chunks:
        if isinstance(c, str):
            cid, n = c, 1
        elif isinstance(c, tuple):
            cid, n = c
        else:
            cid, n = c.id, c.length
        if cid not in seen:
            seen.add(cid)
            ids.append(cid)
            lengths.append(max(int(n), 1))
    return ids, lengths


def shares(nodes: Sequence[NodeInfo], file_bytes: float, replicas: int) -> tuple[list[float], int]:
    """Each node's share of a file's ``replicas x file_bytes`` owner bytes (in *nodes* order), and
    the most owners of one chunk a zone takes (step 1 of the module docstring)."""
    n = effective_replicas(replicas, nodes)
    zones: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        zones.setdefault(node.zone, []).append(i)
    names = sorted(zones)
    per_zone = _per_zone_limit([len(zones[z]) for z in names], n) if n else 1
    zone_share = _shares(n * file_bytes, [sum(nodes[i].capacity for i in zones[z]) for z in names],
                         [min(per_zone, len(zones[z])) * file_bytes for z in names])
    out = [0.0] * len(nodes)
    for z, share in zip(names, zone_share):
        members = zones[z]
        for i, sh in zip(members, _shares(share, [nodes[i].capacity for i in members],
                                          [file_bytes] * len(members))):
            out[i] = sh
    return out, per_zone


def plan_file(chunks: Iterable[ChunkLike], nodes: Sequence[NodeInfo], replicas: int = 1) -> dict[str, list[NodeInfo]]:
    """The owners of each distinct chunk of one file, best first (see the module docstring).

    *chunks*: the file's :class:`~sdcache.chunking.ChunkRef` entries (or ``(id, length)``
    pairs, or bare ids, which count as equal lengths), in file order; repeats are one chunk.
    *nodes*: the live nodes. Each chunk gets ``min(replicas, len(nodes))`` distinct owners, in
    as many zones as the zones allow, and each node owns its share of the file's bytes to
    within about one chunk.
    """
    ids, lengths = _distinct(chunks)
    if ids:  # canonical order: the plan depends on the set of chunks, not on their order in the file
        ids, lengths = map(list, zip(*sorted(zip(ids, lengths))))
    nodes = sorted(nodes, key=lambda nd: nd.node_id)
    n = effective_replicas(replicas, nodes)
    if n == 0 or not ids:
        return {cid: [] for cid in ids}
    share, per_zone = shares(nodes, float(sum(lengths)), n)
    slack = float(max(lengths))
    suffixes = [b"\x00" + nd.node_id.encode() for nd in nodes]
    weights = [max(nd.capacity, 1) for nd in nodes]
    zone_of = [nd.zone for nd in nodes]
    k = len(nodes)
    scores: list[list[float]] = []
    pairs: list[tuple[float, int, int]] = []
    digest = xxhash.xxh3_64_intdigest
    log = math.log
    for ci, cid in enumerate(ids):
        key = cid.encode()
        row = [-weights[ni] / log((digest(key + suffixes[ni]) + 0.5) / _TWO64) for ni in range(k)]
        scores.append(row)
        pairs.extend(zip(row, [ci] * k, range(k)))
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    owners: list[list[int]] = [[] for _ in ids]
    in_zone: list[dict[str, int]] = [{} for _ in ids]
    load = [0.0] * k

    def seat(ci: int, ni: int) -> None:
        owners[ci].append(ni)
        in_zone[ci][zone_of[ni]] = in_zone[ci].get(zone_of[ni], 0) + 1
        load[ni] += lengths[ci]

    # Step 2: best pairs first, within every node's share.
    for _, ci, ni in pairs:
        mine = owners[ci]
        if len(mine) >= n or ni in mine or load[ni] + lengths[ci] > share[ni] + 1e-6:
            continue
        if in_zone[ci].get(zone_of[ni], 0) >= per_zone:
            continue
        seat(ci, ni)
    _seat_by_swaps(owners, in_zone, load, share, lengths, scores, zone_of, n, per_zone)
    # Step 3: what is left, biggest first: a node with room for it, else one it takes at most one
    # chunk past its share (best score among either, so a one-chunk file goes to its rendezvous
    # winner), else the least loaded; the zone rule kept while it can be.
    for ci in sorted((ci for ci in range(len(ids)) if len(owners[ci]) < n), key=lambda ci: (-lengths[ci], ci)):
        mine = owners[ci]
        size = lengths[ci]
        while len(mine) < n:
            cand = [ni for ni in range(k) if ni not in mine and in_zone[ci].get(zone_of[ni], 0) < per_zone]
            cand = cand or [ni for ni in range(k) if ni not in mine]
            fits = [ni for ni in cand if share[ni] - load[ni] >= size - 1e-6]
            near = [ni for ni in cand if load[ni] + size - share[ni] <= slack + 1e-6]
            tier = fits or near
            if tier:
                pick = max(tier, key=lambda ni: scores[ci][ni])
            else:
                pick = min(cand, key=lambda ni: (load[ni] + size - share[ni], -scores[ci][ni]))
            seat(ci, pick)
    for ci, mine in enumerate(owners):
        mine.sort(key=lambda ni: -scores[ci][ni])
    return {cid: [nodes[ni] for ni in owners[ci]] for ci, cid in enumerate(ids)}


def _seat_by_swaps(owners: list[list[int]], in_zone: list[dict[str, int]], load: list[float], share: list[float],
                   lengths: list[int], scores: list[list[float]], zone_of: list[str], n: int, per_zone: int) -> None:
    """Seat slots step 2 left open without passing a share, where a swap can.

    A chunk *c* short of an owner while the nodes with room for it already own it (or are
    barred by the zone rule): move an equally long chunk *d*'s slot from node *b* to such a
    node *a*, and give *b* to *c* (an augmenting path of length two), losing the least score.
    Deterministic: chunks and nodes are visited in a fixed order.
    """
    k = len(zone_of)
    by_length: dict[int, list[int]] = {}
    for di, size in enumerate(lengths):
        by_length.setdefault(size, []).append(di)
    for ci, mine in enumerate(owners):
        size = lengths[ci]
        while len(mine) < n:
            best: tuple[float, int, int, int] | None = None  # (score lost, d, b, a)
            for a in range(k):
                if share[a] - load[a] < size - 1e-6:
                    continue
                za = zone_of[a]
                for di in by_length[size]:
                    theirs = owners[di]
                    if di == ci or a in theirs:
                        continue
                    for b in theirs:
                        zb = zone_of[b]
                        if b in mine or in_zone[ci].get(zb, 0) >= per_zone:
                            continue
                        if za != zb and in_zone[di].get(za, 0) >= per_zone:
                            continue
                        lost = scores[di][b] - scores[di][a]
                        if best is None or lost < best[0]:
                            best = (lost, di, b, a)
            if best is None:
                break  # step 3 seats it
            _, di, b, a = best
            theirs = owners[di]
            theirs[theirs.index(b)] = a
            in_zone[di][zone_of[b]] -= 1
            in_zone[di][zone_of[a]] = in_zone[di].get(zone_of[a], 0) + 1
            mine.append(b)
            in_zone[ci][zone_of[b]] = in_zone[ci].get(zone_of[b], 0) + 1
            load[a] += size


def read_order(owners: Sequence[NodeInfo], zone: str = "") -> list[NodeInfo]:
    """A chunk's owners as a reader in *zone* should try them: its own zone first, then the others."""
    if not zone:
        return list(owners)
    return [o for o in owners if o.zone == zone] + [o for o in owners if o.zone != zone]


def node_set_key(nodes: Iterable[NodeInfo]) -> tuple[tuple[str, str, int], ...]:
    """What a plan depends on in a node list (ids, zones, capacities), to cache plans by."""
    return tuple(sorted((n.node_id, n.zone, n.capacity) for n in nodes))
