"""Placement over zones and replicas (pure core): spread, balance, minimal movement, validation."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest

from sdcache import errors
from sdcache.chunking import ChunkRef
from sdcache.placement import (
    NodeInfo,
    ReplicaPolicy,
    check_zone,
    plan_file,
    rank,
    read_order,
    shares,
)

GiB = 1 << 30


def _ids(n: int, seed: int = 0) -> list[str]:
    return [hashlib.md5(f"{seed}-{i}".encode()).hexdigest() for i in range(n)]


def _nodes(k: int, zones: int = 1, capacity: int = GiB, first: int = 0) -> list[NodeInfo]:
    return [NodeInfo(f"n{i}", f"10.0.0.{i}:7071", capacity, zone=f"z{i % zones}" if zones > 1 else "")
            for i in range(first, first + k)]


def _counts(plan: dict[str, list[NodeInfo]]) -> Counter[str]:
    return Counter(o.node_id for owners in plan.values() for o in owners)


def _moved(before: dict[str, list[NodeInfo]], after: dict[str, list[NodeInfo]]) -> int:
    """Owner slots that a node gained (each one a chunk copy to make)."""
    return sum(len({o.node_id for o in after[c]} - {o.node_id for o in before[c]}) for c in after)


@pytest.mark.parametrize("k,replicas,zones", [(2, 1, 1), (4, 1, 1), (8, 1, 1), (4, 2, 2), (8, 2, 2),
                                              (4, 2, 1), (8, 3, 2), (6, 3, 3), (5, 2, 2)])
@pytest.mark.parametrize("chunks", [512, 97])
def test_a_file_is_dealt_evenly_over_its_nodes(k: int, replicas: int, zones: int, chunks: int) -> None:
    nodes = _nodes(k, zones)
    plan = plan_file(_ids(chunks), nodes, replicas)
    counts = _counts(plan)
    assert sum(counts.values()) == chunks * replicas and len(counts) == k
    for z in {n.zone for n in nodes}:  # within a zone: +-1 chunk (a smaller zone's nodes hold more)
        mine = [counts[n.node_id] for n in nodes if n.zone == z]
        assert max(mine) - min(mine) <= 1, counts
    if k % zones == 0:
        assert max(counts.values()) - min(counts.values()) <= 1, counts
    for owners in plan.values():
        assert len(owners) == replicas == len({o.node_id for o in owners})  # distinct nodes
        assert len({o.zone for o in owners}) == min(replicas, zones)  # as many zones as there are


def test_plain_rendezvous_is_what_the_balancing_fixes() -> None:
    """The seed measurement: per-chunk rendezvous leaves one of 4 nodes well above its quarter."""
    ids, nodes = _ids(512), _nodes(4)
    plain = Counter(rank(i, nodes)[0].node_id for i in ids)
    assert max(plain.values()) > 128 + 5
    assert max(_counts(plan_file(ids, nodes, 1)).values()) == 128


def test_capacity_weights_the_deal_and_zones_take_their_share() -> None:
    nodes = [NodeInfo("a", "h:1", GiB), NodeInfo("b", "h:2", GiB), NodeInfo("c", "h:3", 2 * GiB)]
    counts = _counts(plan_file(_ids(400), nodes, 1))
    assert (counts["a"], counts["b"], counts["c"]) == (100, 100, 200)
    # Two zones, three replicas: each chunk in both zones; a zone holds at most two of its copies.
    zoned = [NodeInfo(f"n{i}", f"h:{i}", GiB, zone="a" if i < 2 else "b") for i in range(5)]
    plan = plan_file(_ids(300), zoned, 3)
    for owners in plan.values():
        per_zone = Counter(o.zone for o in owners)
        assert set(per_zone) == {"a", "b"} and max(per_zone.values()) <= 2
    share, per_zone_limit = shares(sorted(zoned, key=lambda n: n.node_id), 300, 3)
    assert per_zone_limit == 2 and sum(share) == pytest.approx(900)
    assert sum(share[:2]) == pytest.approx(360) and sum(share[2:]) == pytest.approx(540)  # by capacity


def test_bytes_not_chunk_counts_are_balanced() -> None:
    """Real safetensors chunks run from KBs to 4 MiB: each node's bytes end within one chunk of its share."""
    rng = random.Random(7)
    chunks = [ChunkRef(0, rng.choice([4 << 20, 4 << 20, rng.randint(1, 4 << 20), rng.randint(1, 64 << 10)]), i)
              for i in _ids(600)]
    total = sum(c.length for c in chunks)
    for k, replicas, zones in ((4, 1, 1), (8, 1, 1), (8, 2, 2), (4, 2, 1), (6, 3, 3)):
        nodes = _nodes(k, zones)
        held: Counter[str] = Counter()
        plan = plan_file(chunks, nodes, replicas)
        for c in chunks:
            for o in plan[c.id]:
                held[o.node_id] += c.length
        fair = total * replicas / k
        assert all(abs(held[n.node_id] - fair) <= (4 << 20) for n in nodes), (k, replicas, zones, held, fair)
    plain: Counter[str] = Counter()
    for c in chunks:
        plain[rank(c.id, _nodes(8))[0].node_id] += c.length
    assert max(plain.values()) > total / 8 + (8 << 20)  # what per-chunk rendezvous alone leaves


def test_who_rounds_up_is_the_chunks_choice_not_a_fixed_node() -> None:
    """One-chunk files (small LoRAs, embeddings) land on their rendezvous winner, spread over the nodes."""
    nodes = [NodeInfo("a", "h:1", GiB), NodeInfo("b", "h:2", GiB), NodeInfo("c", "h:3", 2 * GiB)]
    owners = Counter(plan_file([i], nodes, 1)[i][0].node_id for i in _ids(4000))
    assert all(owners[n] > 0.8 * 1000 for n in "ab") and 0.4 < owners["c"] / 4000 < 0.6
    assert all(plan_file([i], nodes, 1)[i][0] == rank(i, nodes)[0] for i in _ids(200))
    two = Counter(o.node_id for i in _ids(2000) for o in plan_file([i], _nodes(4, 2), 2)[i])
    assert min(two.values()) > 0.8 * 1000


def test_plans_ignore_chunk_order_and_repeats_and_match_everywhere() -> None:
    ids, nodes = _ids(200), _nodes(5, 2)
    plan = plan_file(ids, nodes, 2)
    assert plan_file(list(reversed(ids)) + ids[:10], list(reversed(nodes)), 2) == plan
    # Every chunk's owners are its best-scored nodes first: a reader's first try is the primary.
    assert all(owners[0] in nodes for owners in plan.values())


@pytest.mark.parametrize("k,replicas,zones", [(4, 1, 1), (8, 1, 1), (4, 2, 2), (8, 2, 2), (8, 3, 2)])
def test_a_node_joining_or_leaving_moves_close_to_its_own_share(k: int, replicas: int, zones: int) -> None:
    ids = _ids(512)
    nodes = _nodes(k, zones)
    before = plan_file(ids, nodes, replicas)
    joined = nodes + _nodes(1, zones, first=k)
    joined = [NodeInfo(n.node_id, n.address, n.capacity, zone=f"z{int(n.node_id[1:]) % zones}" if zones > 1 else "")
              for n in joined]
    after = plan_file(ids, joined, replicas)
    gained = _counts(after)[f"n{k}"]
    mates = [c for n, c in _counts(after).items() if n != f"n{k}" and joined[int(n[1:])].zone == joined[k].zone]
    assert gained >= min(mates) - 1  # the newcomer gets its share of its zone ...
    assert _moved(before, after) <= 1.35 * gained  # ... and little else moves
    left = plan_file(ids, nodes[1:], replicas)
    lost = _counts(before)["n0"]
    assert _moved(before, left) <= 1.35 * lost


def test_losing_a_zone_keeps_the_survivors_copies_as_owners() -> None:
    ids, nodes = _ids(512), _nodes(8, 2)
    before = plan_file(ids, nodes, 2)
    survivors = [n for n in nodes if n.zone == "z1"]
    after = plan_file(ids, survivors, 2)
    kept = sum(1 for c in ids if {o.node_id for o in before[c] if o.zone == "z1"} <= {o.node_id for o in after[c]})
    assert kept >= 0.97 * len(ids)
    assert max(_counts(after).values()) - min(_counts(after).values()) <= 1


def test_more_replicas_than_nodes_means_every_node() -> None:
    nodes = _nodes(2)
    plan = plan_file(_ids(10), nodes, 3)
    assert all(len(owners) == 2 for owners in plan.values())
    assert plan_file(_ids(3), [], 2) == {i: [] for i in _ids(3)}


def test_readers_try_their_own_zone_first() -> None:
    a1, b1, a2 = (NodeInfo("a1", "h:1", GiB, zone="a"), NodeInfo("b1", "h:2", GiB, zone="b"),
                  NodeInfo("a2", "h:3", GiB, zone="a"))
    assert read_order([b1, a1, a2], "a") == [a1, a2, b1]
    assert read_order([b1, a1], "") == [b1, a1]
    assert read_order([b1], "c") == [b1]


def test_replica_policy_takes_the_deepest_override() -> None:
    policy = ReplicaPolicy(2, {"/models": 3, "/models/loras": 1, "/models/x.safetensors": 4})
    assert policy.for_path("/other/f") == 2
    assert policy.for_path("/models/sd15.safetensors") == 3
    assert policy.for_path("/models/loras/a/b.safetensors") == 1
    assert policy.for_path("/models/x.safetensors") == 4
    assert policy.for_path("/modelsx/f") == 2  # a directory, not a prefix of a name
    assert ReplicaPolicy(1).for_path("/a") == 1


@pytest.mark.parametrize("zone", ["eu-west-1a", "rack_7", "A", "z.1"])
def test_zone_names(zone: str) -> None:
    assert check_zone(zone) == zone


@pytest.mark.parametrize("zone", ["a b", "-a", "a-", "zone/1", "z\n", "ä", "x" * 64])
def test_odd_zone_names_are_one_clear_error(zone: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        check_zone(zone)
    assert "\n" not in str(info.value) and "letters, digits" in str(info.value)
