"""The metadata service over gRPC, as a real subprocess on port 0.

Every call carries the test suite's admin token (``conftest``); the service
signs with the suite's key. Warm-up, checks and eviction run against real
``sdcache node`` subprocesses (:class:`~sdcache.cluster.LocalCluster`); a
node that fails is a node killed with SIGKILL or a source file removed, and
a full pool is a node started with a small ``--capacity``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import grpc
import pytest

from sdcache import errors
from sdcache._proto import meta_pb2 as pb
from sdcache._proto import meta_pb2_grpc
from sdcache.chunking import CHUNK_SIZE, ChunkRef
from sdcache.cluster import LocalCluster
from sdcache.hashing import chunk_id
from sdcache.manifest import pack_chunks, unpack_chunks
from sdcache.meta import grpcauth
from sdcache.meta.convert import error_from_rpc
from sdcache.meta.server import serve
from sdcache.placement import NodeInfo, plan_file
from sdcache.units import format_size
from sdcache.tls import Credentials

from ._meta_process import CALL, START, MetaProcess, commit, poll, rpc_error, trailer, wire_manifest
from .conftest import ADMIN_TOKEN, TOKEN_KEY, mint_token


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetaProcess]:
    """One service shared by the namespace tests (each uses its own directory)."""
    m = MetaProcess(tmp_path_factory.mktemp("meta") / "data")
    yield m
    assert m.stop() == 0, m.stderr_path.read_text()


@pytest.fixture
def fresh_meta(tmp_path: Path) -> Iterator[Callable[..., MetaProcess]]:
    """Start services of one's own (node tests: no nodes left over from others)."""
    started: list[MetaProcess] = []

    def start(*args: str, data: Path | None = None) -> MetaProcess:
        started.append(MetaProcess(data or tmp_path / f"data{len(started)}", *args))
        return started[-1]

    yield start
    for m in started:
        if m.proc.poll() is None:
            assert m.stop() == 0, m.stderr_path.read_text()



# -- namespace ---------------------------------------------------------------


def test_commit_then_stat_and_manifest(meta: MetaProcess) -> None:
    m = wire_manifest("/ns1/models/a.safetensors", bytes(range(256)) * 20)
    gen = commit(meta.stub, m)
    got = meta.stub.GetManifest(pb.PathRequest(path="sdcache://ns1/models/a.safetensors"), timeout=CALL)
    assert got.generation == gen > 0
    assert (got.path, got.size, got.chunks, dict(got.metadata)) == (m.path, 5120, m.chunks, {"ss_network_dim": "8"})
    entry = meta.stub.Stat(pb.PathRequest(path="/ns1/models/a.safetensors"), timeout=CALL)
    assert (entry.is_dir, entry.size, entry.chunk_count, entry.generation, entry.kind) == (False, 5120, 6, gen, "lora")
    assert meta.stub.Stat(pb.PathRequest(path="/ns1/models"), timeout=CALL).is_dir
    gen2 = commit(meta.stub, wire_manifest(m.path, b"v2"))
    assert gen2 > gen
    assert meta.stub.Stat(pb.PathRequest(path=m.path), timeout=CALL).size == 2


def test_list_pages_over_2500_entries(meta: MetaProcess) -> None:
    names = [f"lora-{i:04d}.safetensors" for i in range(2500)]
    futures = [
        meta.stub.Commit.future(pb.CommitRequest(manifest=wire_manifest(f"/ns2/{n}", n.encode()))) for n in names
    ]
    assert len({f.result(timeout=60).generation for f in futures}) == 2500
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page = meta.stub.List(pb.ListRequest(path="/ns2", page_token=token, page_size=1000), timeout=CALL)
        seen += [e.path for e in page.entries]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3 and seen == [f"/ns2/{n}" for n in names]
    top = meta.stub.List(pb.ListRequest(path="/"), timeout=CALL)
    assert any(e.path == "/ns2" and e.is_dir for e in top.entries)


def test_delete_and_error_codes(meta: MetaProcess) -> None:
    for p in ("/ns3/d/x", "/ns3/d/y", "/ns3/f"):
        commit(meta.stub, wire_manifest(p, b"abc"))
    assert meta.stub.Delete(pb.DeleteRequest(path="/ns3/f"), timeout=CALL).deleted == 1
    err = rpc_error(lambda: meta.stub.Stat(pb.PathRequest(path="/ns3/f"), timeout=CALL))
    assert err.code() == grpc.StatusCode.NOT_FOUND and trailer(err) == "NotFound"
    assert isinstance(error_from_rpc(err), errors.NotFound) and "/ns3/f" in err.details()
    err = rpc_error(lambda: meta.stub.Delete(pb.DeleteRequest(path="/ns3/d"), timeout=CALL))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(error_from_rpc(err), errors.IsADirectory)
    assert meta.stub.Delete(pb.DeleteRequest(path="/ns3", recursive=True), timeout=CALL).deleted == 2
    err = rpc_error(lambda: meta.stub.List(pb.ListRequest(path="/ns3"), timeout=CALL))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(lambda: meta.stub.GetManifest(pb.PathRequest(path="/ns3/d/x"), timeout=CALL))
    assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("bad", ["../x", "a//b"])
def test_invalid_paths_are_invalid_argument(meta: MetaProcess, bad: str) -> None:
    calls = [
        lambda: meta.stub.Stat(pb.PathRequest(path=bad), timeout=CALL),
        lambda: meta.stub.List(pb.ListRequest(path=bad), timeout=CALL),
        lambda: commit(meta.stub, wire_manifest(bad, b"x")),
        lambda: meta.stub.Delete(pb.DeleteRequest(path=bad), timeout=CALL),
        lambda: meta.stub.Pin(pb.PinRequest(path=bad), timeout=CALL),
    ]
    for call in calls:
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and trailer(err) == "InvalidPath"
        assert isinstance(error_from_rpc(err), errors.InvalidPath)


def test_conflicting_and_invalid_commits_are_refused(meta: MetaProcess) -> None:
    commit(meta.stub, wire_manifest("/ns4/a/b", b"x"))
    err = rpc_error(lambda: commit(meta.stub, wire_manifest("/ns4/a/b/c", b"x")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and trailer(err) == "NotADirectory"
    err = rpc_error(lambda: commit(meta.stub, wire_manifest("/ns4/a", b"x")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and trailer(err) == "IsADirectory"
    too_long = ChunkRef(0, CHUNK_SIZE + 1, "0" * 32)
    huge = pb.Manifest(path="/ns4/huge", size=CHUNK_SIZE + 1, chunks=pack_chunks([too_long]))
    err = rpc_error(lambda: commit(meta.stub, huge))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "4 MiB" in err.details()
    torn = pb.Manifest(path="/ns4/torn", size=10, chunks=b"\x00" * 27)
    err = rpc_error(lambda: commit(meta.stub, torn))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    gap = wire_manifest("/ns4/gap", b"x" * 10, chunk=4)
    gap.size = 11
    err = rpc_error(lambda: commit(meta.stub, gap))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    listing = meta.stub.List(pb.ListRequest(path="/ns4"), timeout=CALL)
    assert [e.path for e in listing.entries] == ["/ns4/a"]


def test_pins_and_pinned_chunks(meta: MetaProcess) -> None:
    shared = b"S" * 1000
    commit(meta.stub, wire_manifest("/ns5/a", shared + b"A" * 1000))
    commit(meta.stub, wire_manifest("/ns5/b", shared + b"B" * 1000))
    g0 = meta.stub.PinnedChunks(pb.PinnedChunksRequest(), timeout=CALL).generation
    err = rpc_error(lambda: meta.stub.Pin(pb.PinRequest(path="/ns5"), timeout=CALL))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert meta.stub.Pin(pb.PinRequest(path="/ns5", recursive=True), timeout=CALL).files == 2
    pinned = meta.stub.PinnedChunks(pb.PinnedChunksRequest(), timeout=CALL)
    ids = {pinned.ids[i : i + 16].hex() for i in range(0, len(pinned.ids), 16)}
    assert pinned.generation > g0
    assert {chunk_id(b"S" * 1000), chunk_id(b"A" * 1000), chunk_id(b"B" * 1000)} <= ids
    assert len(pinned.ids) == 16 * len(ids)  # the shared chunk once
    commit(meta.stub, wire_manifest("/ns5/a", b"C" * 10))
    after_commit = meta.stub.PinnedChunks(pb.PinnedChunksRequest(), timeout=CALL)
    assert after_commit.generation > pinned.generation
    assert chunk_id(b"C" * 10) in {after_commit.ids[i : i + 16].hex() for i in range(0, len(after_commit.ids), 16)}
    assert meta.stub.Unpin(pb.PinRequest(path="/ns5", recursive=True), timeout=CALL).files == 2
    final = meta.stub.PinnedChunks(pb.PinnedChunksRequest(), timeout=CALL)
    assert final.generation > after_commit.generation
    assert chunk_id(b"B" * 1000) not in {final.ids[i : i + 16].hex() for i in range(0, len(final.ids), 16)}


# -- durability and process behaviour ---------------------------------------


def test_acknowledged_commit_survives_kill_9(fresh_meta: Callable[..., MetaProcess], tmp_path: Path) -> None:
    data = tmp_path / "durable"
    first = fresh_meta(data=data)
    gen = commit(first.stub, wire_manifest("/keep/model.safetensors", b"w" * 3000))
    first.kill()  # SIGKILL right after the acknowledgement
    second = fresh_meta(data=data)
    entry = second.stub.Stat(pb.PathRequest(path="/keep/model.safetensors"), timeout=CALL)
    assert (entry.size, entry.generation) == (3000, gen)
    assert commit(second.stub, wire_manifest("/keep/next", b"n")) > gen


def test_sigterm_stops_cleanly_and_ready_file_names_the_port(fresh_meta: Callable[..., MetaProcess]) -> None:
    m = fresh_meta()
    assert m.ready_file.read_text() == m.address + "\n"
    config = m.stub.GetConfig(pb.ConfigRequest(), timeout=CALL)
    assert config.store_url == (m.data.resolve() / "store").as_uri() and (m.data / "store").is_dir()
    assert m.stop() == 0


def test_busy_port_is_one_clear_line(meta: MetaProcess, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from sdcache.meta.server import _cli; sys.exit(_cli())",
         "--data", str(tmp_path / "d"), "--listen", meta.address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    expected = f"sdcache meta: cannot listen on {meta.address}: Address already in use"
    assert proc.stderr.strip().splitlines() == [expected]


def test_serve_runs_in_process_until_cancelled(tmp_path: Path) -> None:
    async def main() -> None:
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(tmp_path / "d", "127.0.0.1:0", heartbeat_interval=0.5, ready=ready.set_result,
                                         token_key=TOKEN_KEY))
        address = await asyncio.wait_for(ready, START)
        node_token = mint_token("node", "in-process-node")
        async with grpcauth.aio_channel(address, Credentials(token=node_token)) as channel:
            stub = meta_pb2_grpc.MetaStub(channel)
            reply = await stub.RegisterNode(pb.Node(node_id="n", address="127.0.0.1:1", capacity=1), timeout=CALL)
            assert reply.heartbeat_interval == 0.5
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert (tmp_path / "d" / "meta.db").is_file() and (tmp_path / "d" / "store").is_dir()


# -- nodes -------------------------------------------------------------------


def test_nodes_register_heartbeat_and_expire(fresh_meta: Callable[..., MetaProcess]) -> None:
    m = fresh_meta("--heartbeat-interval", "0.2")
    node = pb.Node(
        node_id="n1", address="127.0.0.1:1", capacity=1 << 30, role="gpu", host_id="h", pool_dir="/dev/shm/x"
    )
    reply = m.stub.RegisterNode(node, timeout=CALL)
    assert reply.heartbeat_interval == pytest.approx(0.2)
    hb = m.stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", used=4096, chunks=1), timeout=CALL)
    assert hb.known and hb.pins_generation == reply.pins_generation
    assert not m.stub.Heartbeat(pb.HeartbeatRequest(node_id="ghost"), timeout=CALL).known
    live = m.stub.ListNodes(pb.NodesRequest(), timeout=CALL).nodes
    assert [(n.node_id, n.alive, n.used, n.role, n.pool_dir) for n in live] == [("n1", True, 4096, "gpu", "/dev/shm/x")]
    stats = m.stub.Stats(pb.StatsRequest(), timeout=CALL)
    assert (stats.nodes, stats.capacity, stats.used) == (1, 1 << 30, 4096)

    stopped = time.monotonic()  # the node stops heartbeating
    assert poll(lambda: not m.stub.ListNodes(pb.NodesRequest(), timeout=CALL).nodes, 10.0)
    assert time.monotonic() - stopped >= 0.3  # not dropped at the first missed beat
    everyone = m.stub.ListNodes(pb.NodesRequest(include_dead=True), timeout=CALL).nodes
    assert [(n.node_id, n.alive) for n in everyone] == [("n1", False)]
    assert m.stub.Stats(pb.StatsRequest(), timeout=CALL).nodes == 0

    commit(m.stub, wire_manifest("/w/x", b"x" * 10))
    err = rpc_error(lambda: list(m.stub.Warmup(pb.WarmupRequest(paths=["/w/x"]), timeout=CALL)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "no live cache nodes" in err.details()
    (only,) = list(m.stub.Warmup(pb.WarmupRequest(paths=["/w/x"], check=True), timeout=CALL))
    assert only.done and only.pool_capacity == 0 and "no live cache nodes" in only.message

    # a heartbeat brings it back; the service remembers it
    assert m.stub.Heartbeat(pb.HeartbeatRequest(node_id="n1"), timeout=CALL).known
    assert [n.node_id for n in m.stub.ListNodes(pb.NodesRequest(), timeout=CALL).nodes] == ["n1"]


# -- warm-up against real nodes ----------------------------------------------


@pytest.fixture
def nodes_cluster(make_cluster: Callable[..., LocalCluster]) -> Callable[..., LocalCluster]:
    """Start a metadata service with real ``sdcache node`` subprocesses (``node0``, ``node1``, ...).

    ``make_cluster`` (``conftest``) with a 1 s heartbeat unless a test names another.
    """
    return functools.partial(make_cluster, heartbeat=1.0)


class Node:
    """One real node of a cluster, seen through its HTTP API with the admin token."""

    def __init__(self, node_id: str, address: str) -> None:
        self.node_id = node_id
        self.address = address

    def call(self, method: str, route: str, body: Any = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.address}{route}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=CALL) as resp:
            return resp.read()

    def has(self, ids: Any) -> set[str]:
        return set(json.loads(self.call("POST", "/has", {"ids": list(ids)}))["present"])

    def stats(self) -> dict[str, Any]:
        return json.loads(self.call("GET", "/stats"))

    def chunk(self, cid: str) -> bytes:
        """The chunk from the pool (no path: a node never reads through for it)."""
        return self.call("GET", f"/chunks/{cid}")


def _nodes(c: LocalCluster) -> list[Node]:
    return [Node(f"node{i}", child.address) for i, child in enumerate(c.node_children)]


def _admin_stub(c: LocalCluster) -> tuple[grpc.Channel, meta_pb2_grpc.MetaStub]:
    channel = grpcauth.channel(c.meta_addr, Credentials(token=ADMIN_TOKEN))
    return channel, meta_pb2_grpc.MetaStub(channel)


def _placement(stub: meta_pb2_grpc.MetaStub) -> list[NodeInfo]:
    """The live nodes as the service places chunks over them."""
    return [NodeInfo(n.node_id, n.address, n.capacity) for n in stub.ListNodes(pb.NodesRequest(), timeout=CALL).nodes]


def _source_file(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return path.as_uri()


def _pattern(seed: int, n: int) -> bytes:
    return bytes((i * seed + i // 251) % 256 for i in range(n))


def _total(nodes: list[Node], key: str) -> int:
    return sum(n.stats()[key] for n in nodes)


def test_warmup_loads_each_chunk_on_its_owner(nodes_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    c = nodes_cluster(2, 1 << 20)
    channel, stub = _admin_stub(c)
    nodes = _nodes(c)
    a = _pattern(7, 300_000)
    b = a[:100_000] + _pattern(13, 150_000)  # shares 100 chunks with a
    for name, data in (("a.bin", a), ("b.bin", b)):
        commit(stub, wire_manifest(f"/w/{name}", data, source=_source_file(tmp_path, name, data)))
    total = len(a) + len(b)

    progress = list(stub.Warmup(pb.WarmupRequest(paths=["/w"], recursive=True), timeout=60))
    assert progress[-1].done and not any(p.done for p in progress[:-1])
    assert [p.done_bytes for p in progress] == sorted(p.done_bytes for p in progress)
    assert progress[-1].done_bytes == total == progress[0].total_bytes
    assert (progress[0].pool_capacity, progress[0].fits_bytes) == (2 << 20, total)  # all of it fits
    assert len(progress) >= 2 + 550 // 64  # a report after every batch of <= 64 chunks
    assert "needs" not in progress[-1].message and "failed" not in progress[-1].message

    infos = _placement(stub)
    manifests = [stub.GetManifest(pb.PathRequest(path=f"/w/{x}"), timeout=CALL) for x in ("a.bin", "b.bin")]
    refs = {ch.id: ch.length for mf in manifests for ch in unpack_chunks(mf.chunks)}
    # Each file's chunks are dealt over the nodes (sdcache/placement.py); a chunk two files share
    # usually gets the same owner in both, and is then stored once.
    plans = [plan_file(unpack_chunks(mf.chunks), infos, 1) for mf in manifests]
    placed = {(cid, owners[0].node_id) for plan in plans for cid, owners in plan.items()}
    for n in nodes:
        mine = {cid for cid, nid in placed if nid == n.node_id}
        assert n.has(refs) == mine and mine  # each chunk on its owners, only there
    assert _total(nodes, "used") == sum(refs[cid] for cid, _ in placed) < len(a) + len(b)
    reads = _total(nodes, "understore_reads")
    assert reads == len(refs)  # each distinct chunk read from its source once

    check = list(stub.Warmup(pb.WarmupRequest(paths=["/w/a.bin", "/w/b.bin"], check=True), timeout=60))
    assert check[-1].done and check[-1].done_bytes == total
    assert [p.path for p in check[:-1]] == ["/w/a.bin", "/w/b.bin"]
    assert _total(nodes, "understore_reads") == reads  # checking loads nothing
    assert _total(nodes, "used") == sum(refs[cid] for cid, _ in placed)

    b_ids = {ch.id for ch in unpack_chunks(manifests[1].chunks)}
    ev = stub.Evict(pb.EvictRequest(paths=["/w/a.bin"]), timeout=CALL)
    # a's copies go, but not those b's placement keeps on the same node
    a_only = {(cid, o[0].node_id) for cid, o in plans[0].items()} - {(cid, o[0].node_id) for cid, o in plans[1].items()}
    assert ev.chunks == len(a_only) and ev.bytes == sum(refs[i] for i, _ in a_only)
    # a node keeps the chunks another cached file (b) still needs
    assert set().union(*(n.has(refs) for n in nodes)) == b_ids
    check = list(stub.Warmup(pb.WarmupRequest(paths=["/w"], recursive=True, check=True), timeout=60))
    # all of b, and the part of a it shares where both placements chose the same node
    a_kept = sum(refs[cid] for cid, o in plans[0].items() if o[0].node_id == plans[1].get(cid, [o[0]])[0].node_id
                 and cid in b_ids)
    assert 90_000 <= a_kept <= 100_000
    assert check[-1].done_bytes == len(b) + a_kept
    assert [p.message for p in check[:-1]] == [f"{format_size(a_kept)} of 293.0 KiB cached",
                                               "244.1 KiB of 244.1 KiB cached"]

    stats = stub.Stats(pb.StatsRequest(), timeout=CALL)
    assert (stats.files, stats.bytes, stats.unique_bytes, stats.nodes) == (2, total, sum(refs.values()), 2)
    channel.close()


def test_warmup_larger_than_the_pool_says_so(nodes_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    c = nodes_cluster(2, 125_000)  # two small pools: 250,000 bytes in all
    channel, stub = _admin_stub(c)
    nodes = _nodes(c)
    for i in range(3):
        data = _pattern(3 + i, 100_000)
        commit(stub, wire_manifest(f"/big/f{i}", data, source=_source_file(tmp_path, f"f{i}", data)))

    check = list(stub.Warmup(pb.WarmupRequest(paths=["/big"], recursive=True, check=True), timeout=60))
    final = check[-1]
    assert (final.total_bytes, final.pool_capacity, final.fits_bytes) == (300_000, 250_000, 250_000)
    assert final.done_bytes == 0
    assert "warm-up of /big needs 293.0 KiB but the pool holds 244.1 KiB; 244.1 KiB fits" in final.message
    progress = list(stub.Warmup(pb.WarmupRequest(paths=["/big"], recursive=True), timeout=60))
    assert "needs 293.0 KiB" in progress[0].message and "skipped 1 file(s)" in progress[-1].message
    in_pool = _total(nodes, "used")
    assert progress[-1].done_bytes == in_pool <= 250_000  # reports exactly what the nodes hold
    again = list(stub.Warmup(pb.WarmupRequest(paths=["/big"], recursive=True, check=True), timeout=60))
    assert again[-1].done_bytes == in_pool
    channel.close()


def test_warmup_reports_a_dead_node(nodes_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    c = nodes_cluster(2, 1 << 20, heartbeat=1.0)  # a dead node stays listed for 3 s
    channel, stub = _admin_stub(c)
    survivor, victim = _nodes(c)
    data = _pattern(5, 50_000)
    commit(stub, wire_manifest("/d/x", data, source=_source_file(tmp_path, "x", data)))

    child = c.node_children[1]
    child.signal(signal.SIGKILL)  # still registered and listed as live, but gone
    assert child.proc is not None and child.proc.wait(timeout=CALL) == -signal.SIGKILL
    progress = list(stub.Warmup(pb.WarmupRequest(paths=["/d/x"]), timeout=60))
    final = progress[-1]
    assert final.done and 0 < final.done_bytes == survivor.stats()["used"] < 50_000
    assert "failed to load" in final.message and victim.address in final.message
    channel.close()


def test_warmup_reports_a_vanished_source(nodes_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    c = nodes_cluster(1, 1 << 20)
    channel, stub = _admin_stub(c)
    (node,) = _nodes(c)
    data = _pattern(9, 30_000)
    commit(stub, wire_manifest("/gone/x", data, source=_source_file(tmp_path, "x", data)))
    (tmp_path / "x").unlink()

    final = list(stub.Warmup(pb.WarmupRequest(paths=["/gone/x"]), timeout=60))[-1]
    assert final.done and final.done_bytes == 0 and node.stats()["used"] == 0
    assert "30 chunk(s) failed to load" in final.message and node.address in final.message
    assert "StaleSource" in final.message and str(tmp_path / "x") in final.message  # the node's reason
    channel.close()


def test_warmup_reads_files_without_a_source_from_the_cluster_store(
    nodes_cluster: Callable[..., LocalCluster],
) -> None:
    c = nodes_cluster(2, 1 << 20)
    channel, stub = _admin_stub(c)
    nodes = _nodes(c)
    store_dir = Path(unquote(urlparse(stub.GetConfig(pb.ConfigRequest(), timeout=CALL).store_url).path))
    data = _pattern(11, 20_000)
    (store_dir / "put").mkdir()
    (store_dir / "put" / "x.bin").write_bytes(data)  # where `sdcache put` uploads /put/x.bin
    commit(stub, wire_manifest("/put/x.bin", data))

    progress = list(stub.Warmup(pb.WarmupRequest(paths=["/put/x.bin"]), timeout=60))
    assert progress[-1].done_bytes == len(data) and "failed" not in progress[-1].message
    ids = [chunk_id(data[i : i + 1000]) for i in range(0, len(data), 1000)]
    held = [n.chunk(i) for n in nodes for i in n.has(ids)]
    assert sorted(held) == sorted(data[i : i + 1000] for i in range(0, len(data), 1000))
    channel.close()
