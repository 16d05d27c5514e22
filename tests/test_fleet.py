"""A two-zone fleet on the multi-host test bed (tests/_testbed.py): replicas, zone loss, rejoin, join.

Every process runs on a "host" of its own (a network namespace with its own host id, so no
short-circuit reads): the metadata service, four nodes in zones ``a`` and ``b`` with
``--replicas 2``, a NAS (HTTP under-store) behind its own shaped link, and a client in zone
``a`` that reads through fsspec with ``SDCACHE_SHORT_CIRCUIT=0``. The tests run in order on one
fleet, each from where the last left it:

1. warm-up puts every chunk on two nodes, one per zone, and reads the NAS once per chunk;
2. the source is removed and zone ``a`` is SIGKILLed: the model still reads whole, sha256
   right, and the NAS sees no request at all;
3. zone ``a`` comes back on its old pools: warm, serving hits, and the copies made while it
   was gone are trimmed;
4. a fifth node joins: it gets its share of the model from its peers, not the NAS, and
   the pool holds exactly two copies of every chunk again.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ._testbed import Fleet, TestBed
from .conftest import wait_for

pytestmark = pytest.mark.requires("netns")

MB = 1_000_000
LINK = 200 * MB  # bytes/s of every node's and the NAS's link: the tests check behaviour, not speed
HEARTBEAT = 0.3
MODEL = "/models/m.safetensors"
CHUNK = 4 << 20



@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    bed = TestBed()
    f = None
    try:
        f = Fleet(bed, str(tmp_path_factory.mktemp("fleet")), node_rate=LINK, nas_rate=LINK, heartbeat=HEARTBEAT,
                  replicas=2).start()
        f.add_nodes([("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")], capacity=256 << 20)
        f.client("c1", zone="a")
        f.wait_live(f.clients["c1"], {"a1", "a2", "b1", "b2"})
        yield f
    finally:
        if f is not None:
            f.close()
        bed.close()


@pytest.fixture(scope="module")
def model(fleet: Fleet) -> dict[str, Any]:
    from sdcache.synth import write_sd_checkpoint

    path = os.path.join(fleet.nas.root, "m.safetensors")
    size = write_sd_checkpoint(path, 0.02)
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return {"path": path, "size": size, "sha256": sha, "url": fleet.nas.url("m.safetensors")}


def _c1(fleet: Fleet) -> Any:
    return fleet.clients["c1"]


def _used(fleet: Fleet) -> dict[str, int]:
    return {n: s["used"] for n, s in fleet.node_stats(_c1(fleet)).items()}


def _check(fleet: Fleet) -> dict[str, Any]:
    return fleet.call(_c1(fleet), "result = warm([path], check=True)", path=MODEL)


def _read(fleet: Fleet, fresh: bool = True) -> dict[str, Any]:
    """The model read whole through fsspec on the zone-a client (short-circuit reads off)."""
    return fleet.call(_c1(fleet), "result = read_sha256(path, fresh)", path=MODEL, fresh=fresh)


def test_warmup_fills_both_zones_and_reads_the_nas_once_per_chunk(fleet: Fleet, model: dict[str, Any]) -> None:
    c1 = _c1(fleet)
    sha = fleet.call(c1, "result = import_file(meta, url, path).manifest.sha256", url=model["url"], path=MODEL)
    assert sha == model["sha256"]
    warm = fleet.call(c1, "result = warm([path])", path=MODEL)
    assert warm["cached_bytes"] == warm["total_bytes"] == 2 * model["size"], warm["message"]
    check = _check(fleet)
    assert check["cached_bytes"] == check["total_bytes"] == 2 * model["size"]  # replicated bytes, all there
    used = _used(fleet)
    assert sum(used.values()) == 2 * model["size"]  # no chunk a third time
    assert used["a1"] + used["a2"] == used["b1"] + used["b2"] == model["size"]  # one copy per zone
    # dealt evenly: every node within one chunk (4 MiB) of half its zone's copy
    assert all(abs(u - model["size"] / 2) <= CHUNK for u in used.values()), used
    nas = fleet.nas.counters()
    # the import read it once, the warm-up each chunk once: the second replicas came from peers
    assert nas["read_bytes"] <= 2 * model["size"] + (1 << 20)
    stats_code = "s = meta.stats(); result = {f.name: getattr(s, f.name) for f in s.DESCRIPTOR.fields}"
    stats = wait_for(lambda: (st := fleet.call(c1, stats_code))["used"] == 2 * model["size"] and st,
                     "the next heartbeats to report the nodes' fill", timeout=10, step=0.2)
    assert (stats["replicas"], stats["zones"], stats["nodes"]) == (2, 2, 4)
    assert stats["replicated_bytes"] == 2 * stats["unique_bytes"] == 2 * model["size"]


def test_losing_a_zone_costs_no_read_and_no_nas_byte(fleet: Fleet, model: dict[str, Any]) -> None:
    c1 = _c1(fleet)
    os.unlink(model["path"])  # any read of the source now fails loudly
    before = fleet.nas.counters()
    under_before = {n: s["understore_reads"] for n, s in fleet.node_stats(c1).items()}
    for name in ("a1", "a2"):
        fleet.nodes[name].kill()  # SIGKILL: no goodbye to anyone
    t0 = time.monotonic()
    got = _read(fleet, fresh=False)  # at once: the dead nodes are still listed
    assert got["sha256"] == model["sha256"]
    assert got["tiers"].get("under", 0) == 0 and got["tiers"].get("local", 0) == 0
    assert got["short_circuit"] is False and got["zone"] == "a"
    fleet.wait_live(c1, {"b1", "b2"}, timeout=5)  # dropped within 3 heartbeats (+ the client's 2 s list)
    assert time.monotonic() - t0 < 10
    again = _read(fleet)  # and after they left the registry
    assert again["sha256"] == model["sha256"] and again["tiers"].get("under", 0) == 0
    # Zone b re-makes the second replica of everything from its own peers, never the NAS.
    wait_for(lambda: _check(fleet)["cached_bytes"] == 2 * model["size"], "two copies within zone b",
             timeout=30, step=0.5)
    assert fleet.nas.counters() == before  # not one request, not even a HEAD
    stats = fleet.node_stats(c1)
    assert {n: stats[n]["understore_reads"] for n in ("b1", "b2")} == {n: under_before[n] for n in ("b1", "b2")}
    assert stats["b1"]["peer_fetches"] + stats["b2"]["peer_fetches"] > 0


def test_a_zone_that_comes_back_rejoins_warm(fleet: Fleet, model: dict[str, Any]) -> None:
    c1 = _c1(fleet)
    before = fleet.nas.counters()
    fleet.start_nodes([fleet.nodes["a1"], fleet.nodes["a2"]])  # same pool directories: they survived in /dev/shm
    fleet.wait_live(c1, {"a1", "a2", "b1", "b2"})
    stats = fleet.node_stats(c1)
    assert stats["a1"]["chunks"] + stats["a2"]["chunks"] > 0 and stats["a1"]["zone"] == "a"
    got = _read(fleet)
    assert got["sha256"] == model["sha256"] and got["tiers"].get("under", 0) == 0
    after = fleet.node_stats(c1)
    hits = sum(after[n]["hits"] - stats[n]["hits"] for n in ("a1", "a2"))
    assert hits > 0  # the reader's own zone served it, from the pools they came back with
    assert sum(after[n]["understore_reads"] for n in ("a1", "a2")) == 0
    # The copies zone b made while a was away are trimmed once the fleet is steady again.
    wait_for(lambda: sum(_used(fleet).values()) == 2 * model["size"], "extra copies trimmed", timeout=30, step=0.5)
    assert _check(fleet)["cached_bytes"] == 2 * model["size"]
    assert fleet.nas.counters() == before


def test_a_joining_node_takes_its_share_from_peers(fleet: Fleet, model: dict[str, Any]) -> None:
    c1 = _c1(fleet)
    before = fleet.nas.counters()
    fleet.add_node("a3", "a", capacity=256 << 20)
    fleet.wait_live(c1, {"a1", "a2", "a3", "b1", "b2"})

    def rebalanced() -> bool:
        used = _used(fleet)
        return sum(used.values()) == 2 * model["size"] and used["a3"] > 0
    wait_for(rebalanced, "the newcomer filled and the moved copies trimmed", timeout=40, step=0.5)
    used = _used(fleet)
    assert all(abs(used[n] - model["size"] / 3) <= CHUNK for n in ("a1", "a2", "a3")), used  # over three now
    assert used["b1"] + used["b2"] == model["size"]  # zone b untouched
    assert _check(fleet)["cached_bytes"] == 2 * model["size"]
    stats = fleet.node_stats(c1)
    assert stats["a3"]["understore_reads"] == 0 and stats["a3"]["peer_fetches"] > 0
    assert fleet.nas.counters() == before
    got = _read(fleet)
    assert got["sha256"] == model["sha256"] and got["tiers"].get("under", 0) == 0
