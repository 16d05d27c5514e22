"""Replicas and zones from the command line, on one host: the policy, overrides, warnings, clear errors.

The multi-host behaviour (zone loss, re-replication from peers, rejoin) is tests/test_fleet.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdcache.client.importer import import_file
from sdcache.client.metaclient import MetaClient
from sdcache.cluster import LocalCluster

from .conftest import TOKEN_KEY, run_cli, wait_for


@pytest.fixture
def three_wanted(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster whose service wants 3 replicas, with 2 nodes in zones a and b."""
    pool_root = tempfile.mkdtemp(prefix="sdcache-test-pool-", dir="/dev/shm")
    c = LocalCluster(str(tmp_path / "meta"), nodes=0, heartbeat_interval=0.3, pool_root=pool_root,
                     token_key=TOKEN_KEY, meta_args=["--replicas", "3"])
    try:
        c.start()
        for i, zone in enumerate(("a", "b")):
            c.add_node(i, capacity=64 << 20, zone=zone).wait_ready()
        c.wait_nodes(2)
        yield c
    finally:
        c.stop()
        shutil.rmtree(pool_root, ignore_errors=True)


def test_odd_zone_names_and_replica_counts_are_one_clear_line(tmp_path: Path) -> None:
    bad = run_cli("node", "--meta", "none", "--insecure-no-auth", "--zone", "zone a/1", "--capacity", "1MiB")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert "zone name 'zone a/1' is not allowed" in bad.stderr and "Traceback" not in bad.stderr
    meta = run_cli("meta", "--data", str(tmp_path / "m"), "--listen", "127.0.0.1:0", "--replicas", "0")
    assert meta.returncode != 0 and "--replicas must be a whole number from 1 to 16" in meta.stderr
    assert "Traceback" not in meta.stderr


def test_replicas_policy_overrides_and_the_warning_naming_how_many(three_wanted: LocalCluster,
                                                                   tmp_path: Path) -> None:
    c = three_wanted
    shown = run_cli("replicas", "--json", meta=c.meta_addr, check=True)
    doc = json.loads(shown.stdout)
    assert (doc["default"], doc["overrides"], doc["live_nodes"], doc["live_zones"]) == (3, {}, 2, 2)
    assert "warning: 3 replicas wanted but only 2 live nodes: each chunk is kept on 2" in shown.stderr

    set_ = run_cli("replicas", "/models/loras", "1", meta=c.meta_addr, check=True)
    assert set_.stdout.strip() == "/models/loras: 1 replica" and "warning" not in set_.stderr
    meta = MetaClient(c.meta_addr, credentials=c.credentials)
    try:
        assert meta.replicas("/models/loras/x/y.safetensors").replicas == 1
        assert meta.replicas("/models/sd15.safetensors").replicas == 3

        src = tmp_path / "lora.bin"
        src.write_bytes(os.urandom(3 << 20))
        import_file(meta, str(src), "/models/loras/x/y.bin")
        import_file(meta, str(src), "/models/same.bin")
        assert meta.manifest("/models/loras/x/y.bin").replicas == 1  # what readers place it with
        assert meta.manifest("/models/same.bin").replicas == 3
        final = list(meta.warmup(["/models/same.bin"]))[-1]
        assert "3 replicas wanted but only 2 live nodes: each chunk is kept on 2" in final.message
        assert final.done_bytes == final.total_bytes == 2 * (3 << 20)  # replicated bytes, capped at the nodes
        stats = meta.stats()
        # one chunk set, kept twice (the /models/same.bin copies) at most: replicated counts the most asked
        assert stats.unique_bytes == 3 << 20 and stats.replicated_bytes == 2 * (3 << 20)
        assert (stats.replicas, stats.zones) == (3, 2)
        wait_for(lambda: meta.stats().used == 2 * (3 << 20), "heartbeats to report the copies", timeout=10)

        dropped = run_cli("replicas", "/models/loras", "default", meta=c.meta_addr, check=True)
        assert "/models/loras: 3 replicas" in dropped.stdout
        assert meta.replicas("").overrides == []
        bad = run_cli("replicas", "/models", "seven", meta=c.meta_addr)
        assert bad.returncode != 0 and "replicas must be a whole number from 1 to 16 or 'default'" in bad.stderr
        nodes = json.loads(run_cli("nodes", "--json", meta=c.meta_addr, check=True).stdout)
        assert sorted((n["node_id"], n["zone"]) for n in nodes) == [("node0", "a"), ("node1", "b")]
    finally:
        meta.close()
