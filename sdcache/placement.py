"""Where a chunk lives: weighted rendezvous hashing over the live nodes.

Every client computes the same order from the same node list, so placement
needs no per-chunk lookup. A node's weight is its capacity, so a node twice
as large owns about twice as many chunks; adding or removing a node moves only
the chunks it gains or loses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

_TWO64 = float(1 << 64)


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


def score(chunk_id: str, node: NodeInfo) -> float:
    """Rendezvous score of *node* for *chunk_id*; higher wins."""
    h = xxhash.xxh3_64_intdigest(chunk_id.encode() + b"\x00" + node.node_id.encode())
    u = (h + 0.5) / _TWO64  # uniform in (0, 1)
    return -max(node.capacity, 1) / math.log(u)


def rank(chunk_id: str, nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
    """All *nodes* in preference order for *chunk_id*: owner first, then fallbacks."""
    return sorted(nodes, key=lambda n: score(chunk_id, n), reverse=True)


def owner(chunk_id: str, nodes: Sequence[NodeInfo]) -> NodeInfo | None:
    return max(nodes, key=lambda n: score(chunk_id, n), default=None)
