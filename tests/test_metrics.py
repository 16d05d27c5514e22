"""Prometheus metrics, readiness and JSON logs of every process, checked against the reads the tests make.

A real cluster (metadata service with ``--metrics-listen``, two nodes as
subprocesses); each process's ``/metrics`` is parsed with
``prometheus_client``'s own parser and its counters compared with what the
test read. Client metrics are this process's (``prometheus_client.REGISTRY``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sdcache import metrics
from sdcache.chunking import CHUNK_SIZE
from sdcache.client.fetcher import Fetcher
from sdcache.client.importer import import_file
from sdcache.client.metaclient import MetaClient
from sdcache.cluster import LocalCluster
from sdcache.tls import Credentials

from ._node_helpers import Node
from .conftest import TOKEN_KEY, mint_token, run_cli, wait_for

READ_TOKEN = mint_token("read", "metrics-test-reader")
CHUNKS = 40
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text answer: (sample name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def http_get(address: str, path: str, token: str | None = READ_TOKEN) -> tuple[int, dict[str, str], str]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def scrape(address: str, token: str | None = READ_TOKEN) -> Samples:
    status, headers, body = http_get(address, "/metrics", token)
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain")
    return parse(body)


def local() -> Samples:
    """This process's own metrics (the client's)."""
    return parse(prometheus_client.generate_latest().decode())


def summed(per_node: list[Samples], name: str, **labels: str) -> float:
    return sum(value(s, name, **labels) for s in per_node)


@pytest.fixture(scope="module")
def mc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A metadata service serving metrics on a free port, and two nodes."""
    pool_root = tempfile.mkdtemp(prefix="sdcache-test-pool-", dir="/dev/shm")
    c = LocalCluster(str(tmp_path_factory.mktemp("metrics") / "meta"), nodes=2, capacity=512 << 20,
                     heartbeat_interval=0.3, pool_root=pool_root, token_key=TOKEN_KEY,
                     meta_args=["--metrics-listen", f"127.0.0.1:{free_port()}"])
    with c:
        yield c
    shutil.rmtree(pool_root, ignore_errors=True)


def meta_metrics(c: LocalCluster) -> str:
    assert c.meta is not None
    return c.meta.argv[c.meta.argv.index("--metrics-listen") + 1]


def nodes_of(c: LocalCluster) -> list[str]:
    return [child.address for child in c.node_children]


@pytest.fixture(scope="module")
def big_file(mc: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    """A 40-chunk file committed to the cluster, not read by anyone yet."""
    data = random.Random(40).randbytes((CHUNKS - 1) * CHUNK_SIZE + 12_345)
    src = tmp_path_factory.mktemp("metrics-src") / "forty.bin"
    src.write_bytes(data)
    admin = MetaClient(mc.meta_addr, credentials=mc.credentials)
    try:
        m = import_file(admin, str(src), "/metrics/forty.bin").manifest
    finally:
        admin.close()
    assert len(m.chunks) == CHUNKS
    return m.path, data


# --------------------------------------------------------------------------- counters against reads


def test_cold_then_warm_http_read_moves_each_counter_by_what_was_read(mc: LocalCluster,
                                                                      big_file: tuple[str, bytes]) -> None:
    path, data = big_file
    size = len(data)
    reader = MetaClient(mc.meta_addr, credentials=Credentials(READ_TOKEN))
    fetcher = Fetcher(reader, short_circuit=False)  # chunks over HTTP, never from the same-host pools
    try:
        nodes0, meta0, client0 = [scrape(a) for a in nodes_of(mc)], scrape(meta_metrics(mc)), local()
        m = reader.manifest(path)
        buf = bytearray(size)
        fetcher.read_into(m, 0, memoryview(buf))
        assert buf == data
        nodes1, meta1, client1 = [scrape(a) for a in nodes_of(mc)], scrape(meta_metrics(mc)), local()
        fetcher.read_into(m, 0, memoryview(buf))
        assert hashlib.sha256(buf).digest() == hashlib.sha256(data).digest()
        nodes2, client2 = [scrape(a) for a in nodes_of(mc)], local()
    finally:
        fetcher.close()
        reader.close()

    def moved(a: list[Samples], b: list[Samples], name: str, **labels: str) -> float:
        return summed(b, name, **labels) - summed(a, name, **labels)

    req, served = "sdcache_node_chunk_requests_total", "sdcache_node_served_bytes_total"
    # cold: every chunk missed once on its owner, read through, kept
    assert moved(nodes0, nodes1, req, result="miss") == CHUNKS
    assert moved(nodes0, nodes1, req, result="hit") == 0
    assert moved(nodes0, nodes1, req, result="corrupt") == 0
    assert moved(nodes0, nodes1, "sdcache_node_chunk_request_seconds_count", result="miss") == CHUNKS
    assert moved(nodes0, nodes1, "sdcache_node_understore_bytes_total") == size
    assert moved(nodes0, nodes1, "sdcache_node_understore_request_seconds_count") == CHUNKS
    assert moved(nodes0, nodes1, served, source="understore") == size
    assert moved(nodes0, nodes1, served, source="pool") == 0
    assert moved(nodes0, nodes1, "sdcache_node_pool_chunks") == CHUNKS
    assert moved(nodes0, nodes1, "sdcache_node_pool_bytes") == size
    # warm: 40 hits summed over the nodes, the file's bytes from their pools, nothing from the under-store
    assert moved(nodes1, nodes2, req, result="hit") == CHUNKS
    assert moved(nodes1, nodes2, req, result="miss") == 0
    assert moved(nodes1, nodes2, "sdcache_node_chunk_request_seconds_count", result="hit") == CHUNKS
    assert moved(nodes1, nodes2, served, source="pool") == size
    assert moved(nodes1, nodes2, "sdcache_node_understore_bytes_total") == 0
    assert summed(nodes2, served, source="peer") == 0
    assert summed(nodes2, "sdcache_node_pool_capacity_bytes") == 2 * (512 << 20)
    assert summed(nodes2, "sdcache_node_inflight_bytes") == 0
    # the metadata service: the reader's GetManifest, and the nodes' own (to find the sources)
    get_manifest = "sdcache_meta_rpc_seconds_count"
    assert value(meta1, get_manifest, method="GetManifest") - value(meta0, get_manifest, method="GetManifest") >= 1
    assert value(meta1, "sdcache_meta_live_nodes") == 2
    assert value(meta1, "sdcache_meta_files") >= 1 and value(meta1, "sdcache_meta_logical_bytes") >= size
    ages = {dict(k[1])["node"]: v for k, v in meta1.items() if k[0] == "sdcache_meta_node_heartbeat_age_seconds"}
    assert set(ages) == {"node0", "node1"} and all(0 <= a < 10 for a in ages.values())
    # this process: every chunk from a node, twice
    for before, after in ((client0, client1), (client1, client2)):
        assert value(after, "sdcache_client_fetch_bytes_total", tier="node") - \
            value(before, "sdcache_client_fetch_bytes_total", tier="node") == size
        assert value(after, "sdcache_client_fetch_seconds_count", tier="node") - \
            value(before, "sdcache_client_fetch_seconds_count", tier="node") == CHUNKS
        for tier in ("local", "under"):
            assert value(after, "sdcache_client_fetch_bytes_total", tier=tier) == \
                value(before, "sdcache_client_fetch_bytes_total", tier=tier)


def test_stats_metrics_and_the_cli_read_the_same_numbers(mc: LocalCluster, big_file: tuple[str, bytes]) -> None:
    for address in nodes_of(mc):
        status, _, body = http_get(address, "/stats")
        assert status == 200
        stats = json.loads(body)
        got = scrape(address)
        req = "sdcache_node_chunk_requests_total"
        assert stats["hits"] == value(got, req, result="hit")
        assert stats["misses"] == value(got, req, result="miss") + value(got, req, result="corrupt")
        assert stats["corrupt_reads"] == value(got, req, result="corrupt")
        assert stats["bytes_served"] == sum(value(got, "sdcache_node_served_bytes_total", source=s)
                                            for s in ("pool", "understore", "peer"))
        assert stats["used"] == value(got, "sdcache_node_pool_bytes")
        assert stats["chunks"] == value(got, "sdcache_node_pool_chunks")
        assert stats["capacity"] == value(got, "sdcache_node_pool_capacity_bytes")
        assert stats["evictions"] == value(got, "sdcache_node_pool_evictions_total")
        assert stats["understore_bytes"] == value(got, "sdcache_node_understore_bytes_total")
        assert stats["overloaded"] == value(got, "sdcache_node_overloaded_total")
    # `sdcache nodes` prints what the nodes heartbeat: the same pool figures
    per_node = {child.name.replace(" ", ""): scrape(child.address) for child in mc.node_children}

    def cli_agrees() -> bool:
        rows = json.loads(run_cli("nodes", "--json", meta=mc.meta_addr, check=True).stdout)
        return all(r["used"] == value(per_node[r["node_id"]], "sdcache_node_pool_bytes")
                   and r["chunks"] == value(per_node[r["node_id"]], "sdcache_node_pool_chunks") for r in rows)

    wait_for(cli_agrees, "`sdcache nodes` to show the pool figures /metrics shows", timeout=20, step=0.3)


# --------------------------------------------------------------------------- the trust boundary


def test_metrics_need_a_read_token_and_health_is_open(mc: LocalCluster) -> None:
    for address in [*nodes_of(mc), meta_metrics(mc)]:
        status, headers, body = http_get(address, "/metrics", token=None)
        assert status == 401 and "WWW-Authenticate" in headers, body
        assert json.loads(body)["error"] == "Unauthenticated"
        assert http_get(address, "/metrics", token="sdc1.not.a-token")[0] == 401
        assert http_get(address, "/metrics", token=mint_token("node", "metrics-test-node"))[0] == 200
        assert http_get(address, "/metrics")[0] == 200
        assert http_get(address, "/healthz", token=None)[:3:2] == (200, "ok")
    for address in nodes_of(mc):
        status, _, body = http_get(address, "/readyz", token=None)
        assert (status, json.loads(body)) == (200, {"ready": True})
    status, _, body = http_get(meta_metrics(mc), "/nothing")
    assert status == 404 and json.loads(body)["error"] == "NotFound"


def test_readyz_is_503_until_the_metadata_service_answers(tmp_path: Path) -> None:
    port = free_port()
    node = Node(tmp_path, f"127.0.0.1:{port}", wait_registered=False)  # nobody listens there yet
    try:
        status, _, body = node.request("GET", "/readyz", token=None)
        assert status == 503, body
        doc = json.loads(body)
        assert doc["ready"] is False and "not registered" in doc["reason"] and str(port) in doc["reason"]
        assert node.request("GET", "/healthz", token=None)[0] == 200  # alive all the same
        meta = subprocess.Popen([sys.executable, "-m", "sdcache", "meta", "--data", str(tmp_path / "meta"),
                                 "--listen", f"127.0.0.1:{port}", "--token-key", TOKEN_KEY,
                                 "--heartbeat-interval", "0.2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: node.request("GET", "/readyz", token=None)[0] == 200,
                     f"the node to become ready: {node.stderr()}", timeout=30, step=0.1)
        finally:
            meta.terminate()
            assert meta.wait(timeout=30) == 0, meta.stderr.read() if meta.stderr else ""
    finally:
        node.kill()


# --------------------------------------------------------------------------- a corrupt copy, JSON logs


def test_corrupt_pool_copy_is_counted_and_logged_as_json_with_its_chunk(tmp_path: Path) -> None:
    import xxhash

    data = random.Random(7).randbytes(100_000)
    cid = xxhash.xxh3_128_hexdigest(data)
    pool = tmp_path / "pool"
    (pool / cid[:2]).mkdir(parents=True)
    (pool / cid[:2] / cid).write_bytes(data)  # adopted (and verified) when the node starts
    node = Node(tmp_path, "none", pool_dir=str(pool), token=None,
                extra=["--insecure-no-auth", "--log-format", "json"])
    try:
        assert node.request("GET", "/readyz", token=None)[0] == 200  # standalone: ready once the pool loaded
        with open(pool / cid[:2] / cid, "r+b") as f:
            f.write(bytes([data[0] ^ 0xFF]))
        assert node.get(cid)[0] == 404  # the bad copy is dropped, never served; without a path: not found
        got = scrape(node.address)
        req = "sdcache_node_chunk_requests_total"
        assert (value(got, req, result="corrupt"), value(got, req, result="miss"), value(got, req, result="hit")) \
            == (1, 0, 0)
        assert value(got, "sdcache_node_chunk_request_seconds_count", result="corrupt") == 1
        assert value(got, "sdcache_node_pool_chunks") == 0
    finally:
        assert node.stop() == 0
    lines = [json.loads(line) for line in node.stderr().splitlines() if line.strip()]  # every line is JSON
    dropped = [d for d in lines if d.get("chunk") == cid]
    assert dropped, lines
    assert dropped[0]["level"] == "WARNING" and dropped[0]["logger"] == "sdcache.node.pool"
    assert "corrupt" in dropped[0]["message"] and dropped[0]["time"].endswith("Z")
    assert all({"time", "level", "logger", "message"} <= d.keys() for d in lines)


def test_json_formatter_carries_context_and_tracebacks() -> None:
    import logging

    from sdcache.logs import JsonFormatter

    rec = logging.LogRecord("sdcache.x", logging.ERROR, __file__, 1, "read %s failed", ("a",), None)
    rec.path, rec.method = "/models/a.safetensors", "GetManifest"
    doc = json.loads(JsonFormatter().format(rec))
    assert doc == {"time": doc["time"], "level": "ERROR", "logger": "sdcache.x", "message": "read a failed",
                   "path": "/models/a.safetensors", "method": "GetManifest"}
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("sdcache.x", logging.ERROR, __file__, 1, "oops", (), sys.exc_info())
    doc = json.loads(JsonFormatter().format(rec))
    assert "ValueError: boom" in doc["exc"] and "\n" not in JsonFormatter().format(rec)


# --------------------------------------------------------------------------- the switch, the servers


def test_sdcache_metrics_0_makes_the_instrumentation_no_ops() -> None:
    code = """
import prometheus_client
from sdcache import metrics
from sdcache.client import metrics as client
from sdcache.node import metrics as node
from sdcache.meta import metrics as meta
from sdcache.kernels import metrics as runner
from sdcache.serving import metrics as serving
assert not metrics.ENABLED
for m in (client.FETCH_SECONDS, client.FUSE_OPERATIONS, node.CHUNK_REQUEST_SECONDS, meta.RPC_SECONDS,
          runner.MODEL_LOAD_SECONDS, serving.QUEUE_DEPTH, serving.ROUTED):
    assert m is metrics.OFF, m
client.FETCH_BYTES_BY_TIER["node"].inc(5)
meta.RPC_ERRORS.labels("Stat", "NOT_FOUND").inc()
serving.QUEUE_DEPTH.set(3)
assert b"sdcache_" not in prometheus_client.generate_latest()
print("off")
"""
    env = {**os.environ, "SDCACHE_METRICS": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "off", proc.stderr


def test_metrics_server_serves_metrics_and_health_and_checks_tokens() -> None:
    from sdcache import errors

    seen: list[str | None] = []

    def check(token: str | None) -> None:
        seen.append(token)
        if token != "good":
            raise errors.Unauthenticated("no")

    server = metrics.MetricsServer("127.0.0.1:0", metrics.Exposition(), check)
    address = server.start()
    try:
        assert http_get(address, "/metrics", token=None)[0] == 401
        status, _, body = http_get(address, "/metrics", token="good")
        assert status == 200 and "python_info" in body
        assert http_get(address, "/healthz", token=None)[0] == 200
        assert seen == [None, "good"]
    finally:
        server.stop()
    with pytest.raises(errors.InvalidArgument):
        metrics.MetricsServer("nowhere", metrics.Exposition(), None)
    assert metrics.is_loopback("127.0.0.1") and metrics.is_loopback("::1") and metrics.is_loopback("localhost")
    assert not metrics.is_loopback("0.0.0.0") and not metrics.is_loopback("10.0.0.1")


def test_mount_metrics_are_open_on_loopback_only() -> None:
    from sdcache.client.fuse import MetaTokenCheck, _metrics_server

    class FakeMeta:
        address = "127.0.0.1:1"
        credentials = Credentials()

    for listen, open_ in (("127.0.0.1:0", True), ("0.0.0.0:0", False)):
        server = _metrics_server(listen, FakeMeta())
        assert server is not None
        try:
            assert (server.check is None) == open_
            assert open_ or isinstance(server.check, MetaTokenCheck)
        finally:
            server.stop()


# --------------------------------------------------------------------------- the runner


@pytest.mark.requires("torch", "diffusers")
def test_runner_records_model_loads_lora_switches_and_denoising(tmp_path: Path) -> None:
    import torch

    from sdcache.kernels.request import LoraRef, Request
    from sdcache.kernels.runner import Runner

    from .runner_models import build_tiny, kohya_lora, save_lora, save_single_file

    comps = build_tiny("sd1", 0)
    model = save_single_file("sd1", comps, tmp_path / "sd1.safetensors")
    lora_file = save_lora(kohya_lora("sd1", comps, seed=11), tmp_path / "lora.safetensors")
    req = Request(model=str(model), prompt="a cat", steps=2, size=(64, 64), seed=1,
                  loras=[LoraRef(str(lora_file), 1.0)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = Runner(device="cpu", optimize=False)
        before = local()
        runner.run(req)  # the model and the LoRA from disk, one LoRA switch
        runner.run(req)  # the model built on the device already, the LoRA already applied
        after = local()
    finally:
        torch.set_num_threads(threads)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("sdcache_runner_model_load_seconds_count", tier="disk") == 2
    assert moved("sdcache_runner_model_load_seconds_count", tier="device") == 1
    assert moved("sdcache_runner_model_load_seconds_count", tier="cluster") == 0
    assert moved("sdcache_runner_lora_switch_seconds_count") == 1
    assert moved("sdcache_runner_denoise_seconds_count") == 2
    assert moved("sdcache_runner_denoise_seconds_sum") > 0


# --------------------------------------------------------------------------- the FUSE mount


@pytest.mark.fuse
def test_mount_serves_fuse_and_client_metrics_to_tokens_the_service_accepts(
        mc: LocalCluster, big_file: tuple[str, bytes], tmp_path: Path) -> None:
    from .test_fuse import mounted

    path, data = big_file
    listen = f"0.0.0.0:{free_port()}"  # not loopback: a token is needed, checked by the metadata service
    address = listen.replace("0.0.0.0", "127.0.0.1")
    with mounted(mc.meta_addr, tmp_path / "mnt", "--metrics-listen", listen) as m:
        before = scrape(address)
        with open(m.path / path.lstrip("/"), "rb", buffering=0) as f:
            got = b"".join(iter(lambda: f.read(1 << 20), b""))
        assert got == data
        after = scrape(address)
        assert http_get(address, "/metrics", token=None)[0] == 401
        assert http_get(address, "/metrics", token="sdc1.not.a-token")[0] == 401
    ops = "sdcache_fuse_operations_total"
    assert value(after, ops, op="open") - value(before, ops, op="open") >= 1
    assert value(after, ops, op="read") - value(before, ops, op="read") >= 1
    reads = value(after, "sdcache_fuse_read_size_bytes_count") - value(before, "sdcache_fuse_read_size_bytes_count")
    assert reads == value(after, ops, op="read") - value(before, ops, op="read")
    # Every byte reached the reader through a read request or a push into the kernel page cache.
    pushed = "sdcache_fuse_page_cache_pushed_bytes_total"
    assert value(after, "sdcache_fuse_read_size_bytes_sum") - value(before, "sdcache_fuse_read_size_bytes_sum") \
        + value(after, pushed) - value(before, pushed) >= len(data)
    fetched = sum(value(after, "sdcache_client_fetch_bytes_total", tier=t)
                  - value(before, "sdcache_client_fetch_bytes_total", tier=t) for t in ("local", "node", "under"))
    assert fetched >= len(data)
