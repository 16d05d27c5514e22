"""The metadata service over gRPC, as a real subprocess on port 0.

Warm-up is tested against small real aiohttp servers that implement the node
control endpoints (/warm, /has, /evict) honestly: they read the byte ranges
from the source files, check the chunk hash and keep the bytes in a dict.
"""

from __future__ import annotations

import asyncio
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import grpc
import pytest
from aiohttp import web

from sdcache import errors
from sdcache._proto import meta_pb2 as pb
from sdcache._proto import meta_pb2_grpc
from sdcache.chunking import CHUNK_SIZE, ChunkRef
from sdcache.hashing import chunk_id
from sdcache.manifest import pack_chunks, unpack_chunks
from sdcache.meta.convert import ERROR_TRAILER, error_from_rpc
from sdcache.meta.server import serve
from sdcache.placement import NodeInfo, owner

CALL = 10.0  # seconds: deadline of every test RPC
START = 30.0  # seconds: deadline for a service to report it listens


# -- the service as a subprocess ---------------------------------------------


class MetaProcess:
    """``sdcache meta`` running in a subprocess; ``address`` is what it reported."""

    def __init__(self, data: Path, *args: str) -> None:
        self.data = data
        self.ready_file = data.parent / f"{data.name}.ready"
        self.stderr_path = data.parent / f"{data.name}.stderr"
        cmd = [
            sys.executable,
            "-c",
            "import sys; from sdcache.meta.server import _cli; sys.exit(_cli())",
            "--data",
            str(data),
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(self.ready_file),
            *args,
        ]
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.address = self._wait_ready()
        self.channel = grpc.insecure_channel(self.address)
        self.stub = meta_pb2_grpc.MetaStub(self.channel)

    def _wait_ready(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if readable:
                line = self.proc.stdout.readline()
                if not line:
                    break
                assert line.startswith("sdcache meta listening on "), line
                return line.rsplit(" ", 1)[1].strip()
            if self.proc.poll() is not None:
                break
        self.proc.kill()
        self.proc.wait()
        self._close_pipes()
        raise AssertionError(f"meta service did not start: {self.stderr_path.read_text()}")

    def stop(self) -> int:
        """SIGTERM, and the exit status; the service must not have logged a traceback."""
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=15)
        finally:
            self._close_pipes()
        log = self.stderr_path.read_text()
        assert "Traceback" not in log and "Unclosed" not in log, log
        return rc

    def kill(self) -> None:
        self.channel.close()
        self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.stderr.close()


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


def wire_manifest(path: str, data: bytes, *, chunk: int = 1000, source: str = "") -> pb.Manifest:
    """The wire manifest of *data* cut in *chunk*-byte chunks with real ids."""
    refs = [ChunkRef(o, len(data[o : o + chunk]), chunk_id(data[o : o + chunk])) for o in range(0, len(data), chunk)]
    return pb.Manifest(
        path=path,
        size=len(data),
        mtime=1700000000.0,
        source=source,
        version_tag=f"1700000000.0:{len(data)}",
        sha256="00" * 32,
        chunks=pack_chunks(refs),
        kind="lora",
        metadata={"ss_network_dim": "8"},
    )


def commit(stub: meta_pb2_grpc.MetaStub, manifest: pb.Manifest) -> int:
    return stub.Commit(pb.CommitRequest(manifest=manifest), timeout=CALL).generation


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def trailer(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get(ERROR_TRAILER)


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
        task = asyncio.create_task(serve(tmp_path / "d", "127.0.0.1:0", heartbeat_interval=0.5, ready=ready.set_result))
        address = await asyncio.wait_for(ready, START)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = meta_pb2_grpc.MetaStub(channel)
            reply = await stub.RegisterNode(pb.Node(node_id="n", address="127.0.0.1:1", capacity=1), timeout=CALL)
            assert reply.heartbeat_interval == 0.5
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert (tmp_path / "d" / "meta.db").is_file() and (tmp_path / "d" / "store").is_dir()


# -- nodes -------------------------------------------------------------------


def _poll(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


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
    assert _poll(lambda: not m.stub.ListNodes(pb.NodesRequest(), timeout=CALL).nodes, 10.0)
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


# -- warm-up against real HTTP nodes ----------------------------------------


class PoolNode:
    """A real aiohttp server with the node control API over a dict of chunks."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.chunks: dict[str, bytes] = {}
        self.warm_calls = 0
        app = web.Application()
        app.router.add_post("/warm", self.warm)
        app.router.add_post("/has", self.has)
        app.router.add_post("/evict", self.evict)
        self.runner = web.AppRunner(app)
        self.address = ""

    async def start(self) -> PoolNode:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        host, port = self.runner.addresses[0][:2]
        self.address = f"{host}:{port}"
        return self

    @property
    def used(self) -> int:
        return sum(map(len, self.chunks.values()))

    async def warm(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.warm_calls += 1
        out: dict[str, Any] = {"loaded": 0, "bytes": 0, "present": 0, "failed": [], "no_space": 0}
        for c in body["chunks"]:
            if c["id"] in self.chunks:
                out["present"] += 1
                continue
            with open(unquote(urlparse(c["src"]).path), "rb") as f:
                f.seek(c["off"])
                data = f.read(c["len"])
            if chunk_id(data) != c["id"]:
                out["failed"].append({"id": c["id"], "error": "hash mismatch"})
            elif self.used + len(data) > self.capacity:
                out["no_space"] += 1
            else:
                self.chunks[c["id"]] = data
                out["loaded"] += 1
                out["bytes"] += len(data)
        return web.json_response(out)

    async def has(self, request: web.Request) -> web.Response:
        ids = (await request.json())["ids"]
        return web.json_response({"present": [i for i in ids if i in self.chunks]})

    async def evict(self, request: web.Request) -> web.Response:
        gone = [self.chunks.pop(i) for i in (await request.json())["ids"] if i in self.chunks]
        return web.json_response({"chunks": len(gone), "bytes": sum(map(len, gone))})


async def _with_nodes(address: str, capacities: list[int], body: Callable[..., Any]) -> None:
    """Run *body(stub, nodes)* with live, registered, heartbeating PoolNodes."""
    nodes = [await PoolNode(c).start() for c in capacities]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = meta_pb2_grpc.MetaStub(channel)
        for i, n in enumerate(nodes):
            await stub.RegisterNode(pb.Node(node_id=f"node{i}", address=n.address, capacity=n.capacity), timeout=CALL)

        async def beat() -> None:
            while True:
                for i, n in enumerate(nodes):
                    await stub.Heartbeat(pb.HeartbeatRequest(node_id=f"node{i}", used=n.used), timeout=CALL)
                await asyncio.sleep(0.3)

        beating = asyncio.create_task(beat())
        try:
            await body(stub, nodes)
        finally:
            beating.cancel()
            for n in nodes:
                await n.runner.cleanup()


def _source_file(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return path.as_uri()


def _pattern(seed: int, n: int) -> bytes:
    return bytes((i * seed + i // 251) % 256 for i in range(n))


def test_warmup_loads_each_chunk_on_its_owner(fresh_meta: Callable[..., MetaProcess], tmp_path: Path) -> None:
    m = fresh_meta()
    a = _pattern(7, 300_000)
    b = a[:100_000] + _pattern(13, 150_000)  # shares 100 chunks with a
    for name, data in (("a.bin", a), ("b.bin", b)):
        src = _source_file(tmp_path, name, data)
        commit(m.stub, wire_manifest(f"/w/{name}", data, source=src))
    total = len(a) + len(b)

    async def body(stub: meta_pb2_grpc.MetaStub, nodes: list[PoolNode]) -> None:
        progress = [p async for p in stub.Warmup(pb.WarmupRequest(paths=["/w"], recursive=True), timeout=60)]
        assert progress[-1].done and not any(p.done for p in progress[:-1])
        assert [p.done_bytes for p in progress] == sorted(p.done_bytes for p in progress)
        assert progress[-1].done_bytes == total == progress[0].total_bytes
        assert (progress[0].pool_capacity, progress[0].fits_bytes) == (2 << 20, total)  # all of it fits
        assert len(progress) >= 2 + 550 // 64  # a report after every batch of <= 64 chunks
        assert "needs" not in progress[-1].message

        infos = [NodeInfo(f"node{i}", n.address, n.capacity) for i, n in enumerate(nodes)]
        manifests = [await stub.GetManifest(pb.PathRequest(path=f"/w/{x}"), timeout=CALL) for x in ("a.bin", "b.bin")]
        refs = {c.id: c.length for mf in manifests for c in unpack_chunks(mf.chunks)}
        for i, n in enumerate(nodes):
            mine = {cid for cid in refs if owner(cid, infos).node_id == f"node{i}"}
            assert set(n.chunks) == mine and mine  # each chunk on its owner, only there
        assert sum(n.used for n in nodes) == sum(refs.values())  # shared chunks stored once

        check = [p async for p in stub.Warmup(pb.WarmupRequest(paths=["/w/a.bin", "/w/b.bin"], check=True), timeout=60)]
        assert check[-1].done and check[-1].done_bytes == total
        assert [p.path for p in check[:-1]] == ["/w/a.bin", "/w/b.bin"]
        assert sum(n.warm_calls for n in nodes) == len(progress) - 2  # checking loads nothing

        ev = await stub.Evict(pb.EvictRequest(paths=["/w/a.bin"]), timeout=CALL)
        a_only = {c.id for c in unpack_chunks(manifests[0].chunks)}
        assert ev.chunks == len(a_only) and ev.bytes == sum(refs[i] for i in a_only)
        assert not any(set(n.chunks) & a_only for n in nodes)
        check = [p async for p in stub.Warmup(pb.WarmupRequest(paths=["/w"], recursive=True, check=True), timeout=60)]
        assert check[-1].done_bytes == len(b) - 100_000  # b's shared chunks went with a

        stats = await stub.Stats(pb.StatsRequest(), timeout=CALL)
        assert (stats.files, stats.bytes, stats.unique_bytes, stats.nodes) == (2, total, sum(refs.values()), 2)

    asyncio.run(_with_nodes(m.address, [1 << 20, 1 << 20], body))


def test_warmup_larger_than_the_pool_says_so(fresh_meta: Callable[..., MetaProcess], tmp_path: Path) -> None:
    m = fresh_meta()
    for i in range(3):
        data = _pattern(3 + i, 100_000)
        src = _source_file(tmp_path, f"f{i}", data)
        commit(m.stub, wire_manifest(f"/big/f{i}", data, source=src))

    async def body(stub: meta_pb2_grpc.MetaStub, nodes: list[PoolNode]) -> None:
        check = [p async for p in stub.Warmup(pb.WarmupRequest(paths=["/big"], recursive=True, check=True), timeout=60)]
        final = check[-1]
        assert (final.total_bytes, final.pool_capacity, final.fits_bytes) == (300_000, 250_000, 250_000)
        assert final.done_bytes == 0
        assert "warm-up of /big needs 293.0 KiB but the pool holds 244.1 KiB; 244.1 KiB fits" in final.message
        progress = [p async for p in stub.Warmup(pb.WarmupRequest(paths=["/big"], recursive=True), timeout=60)]
        assert "needs 293.0 KiB" in progress[0].message and "skipped 1 file(s)" in progress[-1].message
        in_pool = sum(n.used for n in nodes)
        assert progress[-1].done_bytes == in_pool <= 250_000  # reports exactly what the nodes hold
        again = [p async for p in stub.Warmup(pb.WarmupRequest(paths=["/big"], recursive=True, check=True), timeout=60)]
        assert again[-1].done_bytes == in_pool

    asyncio.run(_with_nodes(m.address, [125_000, 125_000], body))


def test_warmup_reports_a_dead_node(fresh_meta: Callable[..., MetaProcess], tmp_path: Path) -> None:
    m = fresh_meta()
    data = _pattern(5, 50_000)
    src = _source_file(tmp_path, "x", data)
    commit(m.stub, wire_manifest("/d/x", data, source=src))

    async def body(stub: meta_pb2_grpc.MetaStub, nodes: list[PoolNode]) -> None:
        await nodes[1].runner.cleanup()  # registered and heartbeating, but its HTTP server is gone
        progress = [p async for p in stub.Warmup(pb.WarmupRequest(paths=["/d/x"]), timeout=60)]
        final = progress[-1]
        assert final.done and final.done_bytes == nodes[0].used < 50_000
        assert "failed to load" in final.message and nodes[1].address in final.message

    asyncio.run(_with_nodes(m.address, [1 << 20, 1 << 20], body))


def test_warmup_reads_files_without_a_source_from_the_cluster_store(
    fresh_meta: Callable[..., MetaProcess],
) -> None:
    m = fresh_meta()
    store_dir = Path(unquote(urlparse(m.stub.GetConfig(pb.ConfigRequest(), timeout=CALL).store_url).path))
    data = _pattern(11, 20_000)
    (store_dir / "put").mkdir()
    (store_dir / "put" / "x.bin").write_bytes(data)  # where `sdcache put` uploads /put/x.bin
    commit(m.stub, wire_manifest("/put/x.bin", data))

    async def body(stub: meta_pb2_grpc.MetaStub, nodes: list[PoolNode]) -> None:
        progress = [p async for p in stub.Warmup(pb.WarmupRequest(paths=["/put/x.bin"]), timeout=60)]
        assert progress[-1].done_bytes == len(data) and "failed" not in progress[-1].message
        assert b"".join(sorted(c for n in nodes for c in n.chunks.values())) == b"".join(
            sorted(data[i : i + 1000] for i in range(0, len(data), 1000))
        )

    asyncio.run(_with_nodes(m.address, [1 << 20, 1 << 20], body))
