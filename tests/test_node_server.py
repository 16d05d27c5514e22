"""The cache node as users meet it: a real subprocess serving the chunk API.

The under-store is real too: local files, a local HTTP server that counts the
range requests it answers, and a moto S3 server. Registration runs against a
small grpc.aio metadata server implementing RegisterNode, Heartbeat and
PinnedChunks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import http.server
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from sdcache import errors, pool_layout
from sdcache._proto import meta_pb2 as pb
from sdcache._proto import meta_pb2_grpc as pbg
from sdcache.hashing import chunk_id
from sdcache.hostid import host_id

KB = 1024
NODE_CMD = [sys.executable, "-c", "import sys; from sdcache.node.server import _cli; sys.exit(_cli())"]
DEADLINE = 20.0


def wait_for(cond: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- a node subprocess


class Node:
    """``sdcache node`` in a subprocess, on 127.0.0.1 port 0."""

    def __init__(self, tmp_path, *, capacity: str = "64MiB", pool_dir: str | None = None,
                 meta: str = "none", env: dict[str, str] | None = None, extra: list[str] | None = None) -> None:
        self.pool_dir = pool_dir or str(tmp_path / "pool")
        self.stderr_path = tmp_path / f"node-{time.monotonic_ns()}.err"
        self.ready_file = str(tmp_path / "node.ready")
        if os.path.exists(self.ready_file):
            os.unlink(self.ready_file)
        cmd = [*NODE_CMD, "--listen", "127.0.0.1:0", "--capacity", capacity, "--pool-dir", self.pool_dir,
               "--meta", meta, "--node-id", "test-node", "--ready-file", self.ready_file, *(extra or [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.stderr_path, "wb"),
                                     env={**os.environ, **(env or {})})
        self.address = self._await_ready()

    def _await_ready(self) -> str:
        end = time.monotonic() + DEADLINE
        line = b""
        while not line.endswith(b"\n"):
            left = end - time.monotonic()
            r, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not r:
                self.kill()
                raise AssertionError(f"node not ready in time: {self.stderr()}")
            b = os.read(self.proc.stdout.fileno(), 1)
            if not b:
                raise AssertionError(f"node exited {self.proc.wait()}: {self.stderr()}")
            line += b
        text = line.decode().strip()
        assert text.startswith("sdcache node listening on "), text
        address = text.rsplit(" ", 1)[1]
        with open(self.ready_file) as f:
            assert f.read() == address + "\n"
        return address

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def url(self, chunk: str, **params: Any) -> str:
        from urllib.parse import urlencode
        return f"/chunks/{chunk}" + ("?" + urlencode(params) if params else "")

    def request(self, method: str, target: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
        host, port = self.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(method, target, body=payload,
                         headers={"Content-Type": "application/json"} if payload else {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def get(self, chunk: str, **params: Any) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", self.url(chunk, **params))

    def head(self, chunk: str) -> int:
        return self.request("HEAD", f"/chunks/{chunk}")[0]

    def post(self, what: str, body: Any) -> Any:
        status, _, data = self.request("POST", what, body)
        assert status == 200, data
        return json.loads(data)

    def stats(self) -> dict[str, Any]:
        status, _, data = self.request("GET", "/stats")
        assert status == 200
        return json.loads(data)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=DEADLINE)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def nodes(tmp_path) -> Iterator[Callable[..., Node]]:
    started: list[Node] = []

    def start(**kw: Any) -> Node:
        n = Node(tmp_path, **kw)
        started.append(n)
        return n

    yield start
    for n in started:
        n.kill()


class Source:
    """A file in the under-store, cut into fixed-size chunks."""

    def __init__(self, path, size: int, chunk: int, seed: int = 0) -> None:
        self.path = str(path)
        self.data = random.Random(seed).randbytes(size)
        with open(self.path, "wb") as f:
            f.write(self.data)
        self.chunks = [(off, min(chunk, size - off), chunk_id(self.data[off:off + chunk]))
                       for off in range(0, size, chunk)]

    def params(self, i: int, path: str | None = None, src: str | None = None) -> dict[str, Any]:
        off, n, _ = self.chunks[i]
        p: dict[str, Any] = {"src": src or self.path, "off": off, "len": n}
        if path:
            p["path"] = path
        return p

    def id(self, i: int) -> str:
        return self.chunks[i][2]

    def bytes(self, i: int) -> bytes:
        off, n, _ = self.chunks[i]
        return self.data[off:off + n]


def error_of(body: bytes) -> errors.SdcacheError:
    doc = json.loads(body)
    return errors.from_wire(doc["error"], doc["message"])


# --------------------------------------------------------------------------- read-through


def test_read_through_then_hit_from_pool(nodes, tmp_path):
    src = Source(tmp_path / "model.safetensors", 4 << 20 | 12345, 4 << 20)
    node = nodes()
    for expect_hit in ("0", "1"):
        status, headers, body = node.get(src.id(0), **src.params(0, "/models/m.safetensors"))
        assert status == 200
        assert body == src.bytes(0)
        assert headers["X-Sdcache-Hit"] == expect_hit
        assert headers["Content-Type"] == "application/octet-stream"
        assert int(headers["Content-Length"]) == 4 << 20
    # a short last chunk, via file://, and nothing partial left visible in the pool
    status, headers, body = node.get(src.id(1), **src.params(1, src="file://" + src.path))
    assert (status, body) == (200, src.bytes(1))
    assert node.head(src.id(0)) == node.head(src.id(1)) == 200
    with open(pool_layout.chunk_path(node.pool_dir, src.id(0)), "rb") as f:
        assert f.read() == src.bytes(0)
    assert os.listdir(os.path.join(node.pool_dir, pool_layout.TMP_DIR)) == []
    st = node.stats()
    assert (st["understore_reads"], st["hits"], st["chunks"]) == (2, 1, 2)
    assert st["bytes_served"] == 2 * (4 << 20) + len(src.bytes(1))
    assert st["node_id"] == "test-node" and st["role"] == "memory" and st["host_id"] == host_id()
    # without src a miss is a 404 NotFound
    status, _, body = node.get("0" * 32)
    assert status == 404 and isinstance(error_of(body), errors.NotFound)
    assert node.request("GET", "/healthz")[2] == b"ok"


def test_changed_source_is_410_and_nothing_is_kept(nodes, tmp_path):
    src = Source(tmp_path / "lora.safetensors", 256 * KB, 128 * KB)
    node = nodes()
    with open(src.path, "r+b") as f:  # the source is rewritten after import
        f.seek(1000)
        f.write(b"changed!")
    status, _, body = node.get(src.id(0), **src.params(0, "/l/lora.safetensors"))
    assert status == 410
    err = error_of(body)
    assert isinstance(err, errors.StaleSource) and "source changed since import" in str(err)
    assert node.head(src.id(0)) == 404
    assert node.stats()["chunks"] == 0
    # the untouched second chunk still reads through fine
    assert node.get(src.id(1), **src.params(1))[2] == src.bytes(1)


def test_vanished_source_is_410(nodes, tmp_path):
    src = Source(tmp_path / "gone.bin", 64 * KB, 64 * KB)
    os.unlink(src.path)
    node = nodes()
    status, _, body = node.get(src.id(0), **src.params(0))
    assert status == 410
    err = error_of(body)
    assert isinstance(err, errors.StaleSource) and "source vanished" in str(err)
    assert node.head(src.id(0)) == 404


def test_bad_requests_are_400(nodes):
    node = nodes()
    for bad in ("XYZ", "A" * 32, "0" * 31, "0" * 32 + "%0A"):
        status, _, body = node.get(bad)
        assert status == 400 and isinstance(error_of(body), errors.InvalidArgument), bad
    status, _, body = node.get("0" * 32, src="/x")  # src without off/len
    assert status == 400 and isinstance(error_of(body), errors.InvalidArgument)
    status, _, body = node.get("0" * 32, src="/x", off=0, len=(4 << 20) + 1)
    assert status == 400
    status, _, body = node.request("POST", "/warm", {"path": "/a/../b", "chunks": []})
    assert status == 400 and isinstance(error_of(body), errors.InvalidPath)


# --------------------------------------------------------------------------- singleflight over HTTP


class _CountingRangeServer(http.server.ThreadingHTTPServer):
    """An HTTP under-store that counts GETs and holds answers until released."""

    daemon_threads = True

    def __init__(self, data: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.data = data
        self.gets = 0
        self.release = threading.Event()
        self.lock = threading.Lock()


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    server: _CountingRangeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.gets += 1
        self.server.release.wait(DEADLINE)
        data = self.server.data
        rng = self.headers.get("Range")
        if rng:
            start, end = rng.split("=", 1)[1].split("-")
            start, stop = int(start), min(int(end) + 1, len(data))
            body = data[start:stop]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_twenty_concurrent_misses_make_one_understore_read(nodes, tmp_path):
    src = Source(tmp_path / "ckpt.bin", 3 << 20, 1 << 20)
    httpd = _CountingRangeServer(src.data)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        node = nodes()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/ckpt.bin"
        params = src.params(1, "/models/ckpt.bin", src=url)
        with concurrent.futures.ThreadPoolExecutor(20) as ex:
            futures = [ex.submit(node.get, src.id(1), **params) for _ in range(20)]
            # the under-store holds its answer until all 20 are waiting on the node
            wait_for(lambda: node.stats()["singleflight_joined"] >= 19, "19 requests to join the first fetch")
            httpd.release.set()
            results = [f.result() for f in futures]
        assert all(status == 200 and body == src.bytes(1) for status, _, body in results)
        assert [h["X-Sdcache-Hit"] for _, h, _ in results] == ["0"] * 20
        assert httpd.gets == 1
        st = node.stats()
        assert st["understore_reads"] == 1 and st["chunks"] == 1
        assert node.get(src.id(1))[1]["X-Sdcache-Hit"] == "1"
    finally:
        httpd.shutdown()
        httpd.server_close()


# --------------------------------------------------------------------------- capacity and eviction


def _pool_disk_bytes(pool_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(pool_dir) for f in fs)


def test_capacity_never_exceeded_while_streaming(nodes, tmp_path):
    chunk = 64 * KB
    srcs = [Source(tmp_path / f"f{i}.bin", 8 * chunk, chunk, seed=i) for i in range(4)]
    cap = 5 * chunk
    node = nodes(capacity=str(cap))
    for i in range(8):
        for j, s in enumerate(srcs):
            status, _, body = node.get(s.id(i), **s.params(i, f"/m/f{j}"))
            assert status == 200 and body == s.bytes(i)
            assert node.stats()["used"] <= cap
            assert _pool_disk_bytes(node.pool_dir) <= cap
    st = node.stats()
    assert st["chunks"] >= 4 and st["evictions"] > 0


def test_least_recently_used_file_is_evicted_first(nodes, tmp_path):
    chunk = 64 * KB
    a = Source(tmp_path / "a.bin", 2 * chunk, chunk, seed=1)
    b = Source(tmp_path / "b.bin", 2 * chunk, chunk, seed=2)
    c = Source(tmp_path / "c.bin", chunk, chunk, seed=3)
    node = nodes(capacity=str(4 * chunk))
    for s, p in ((a, "/a"), (b, "/b")):
        for i in range(2):
            node.get(s.id(i), **s.params(i, p))
    assert node.get(a.id(1), path="/a")[1]["X-Sdcache-Hit"] == "1"  # A used again
    node.get(c.id(0), **c.params(0, "/c"))
    assert [node.head(a.id(i)) for i in range(2)] == [200, 200]
    assert [node.head(b.id(i)) for i in range(2)] == [404, 404]  # all of B, together
    assert node.stats()["evictions"] == 2


# --------------------------------------------------------------------------- corruption and restart


def _flip_byte(path: str, at: int = 17) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))


def test_flipped_byte_in_pool_is_never_served(nodes, tmp_path):
    src = Source(tmp_path / "m.bin", 2 * 128 * KB, 128 * KB)
    node = nodes()
    for i in range(2):
        node.get(src.id(i), **src.params(i, "/m"))
    for i in range(2):
        _flip_byte(pool_layout.chunk_path(node.pool_dir, src.id(i)))
    # without src: 404, and the bad file is gone
    status, _, _ = node.get(src.id(0))
    assert status == 404
    assert node.head(src.id(0)) == 404
    assert not os.path.exists(pool_layout.chunk_path(node.pool_dir, src.id(0)))
    # with src: fetched again from the under-store, good bytes, good file
    status, headers, body = node.get(src.id(1), **src.params(1, "/m"))
    assert (status, headers["X-Sdcache-Hit"], body) == (200, "0", src.bytes(1))
    with open(pool_layout.chunk_path(node.pool_dir, src.id(1)), "rb") as f:
        assert f.read() == src.bytes(1)
    assert node.stats()["corrupt_dropped"] == 2


def test_restart_on_same_pool_comes_back_warm(nodes, tmp_path):
    src = Source(tmp_path / "m.bin", 3 * 128 * KB, 128 * KB)
    node = nodes()
    for i in range(3):
        node.get(src.id(i), **src.params(i, "/m"))
    assert node.stop() == 0
    _flip_byte(pool_layout.chunk_path(node.pool_dir, src.id(2)))
    with open(os.path.join(node.pool_dir, pool_layout.TMP_DIR, "partial"), "wb") as f:
        f.write(b"half")
    os.unlink(src.path)  # only the pool can serve these now

    node = nodes(pool_dir=node.pool_dir)
    assert [node.head(src.id(i)) for i in range(3)] == [200, 200, 404]
    status, headers, body = node.get(src.id(0))
    assert (status, headers["X-Sdcache-Hit"], body) == (200, "1", src.bytes(0))
    assert not os.path.exists(pool_layout.chunk_path(node.pool_dir, src.id(2)))
    assert os.listdir(os.path.join(node.pool_dir, pool_layout.TMP_DIR)) == []
    assert node.stats()["used"] == 2 * 128 * KB


def test_capacity_beyond_tmpfs_is_one_clear_error(tmp_path):
    proc = subprocess.run(
        [*NODE_CMD, "--meta", "none", "--capacity", "1000TiB", "--pool-dir", str(tmp_path / "pool")],
        capture_output=True, text=True, timeout=DEADLINE,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "capacity" in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""


# --------------------------------------------------------------------------- /warm, /has, /evict


def test_warm_has_and_evict(nodes, tmp_path):
    src = Source(tmp_path / "m.bin", 4 * 64 * KB, 64 * KB)
    other = Source(tmp_path / "o.bin", 64 * KB, 64 * KB, seed=9)
    os.unlink(other.path)
    node = nodes()
    node.get(src.id(0), **src.params(0))
    spec = [{"id": src.id(i), "src": src.path, "off": src.chunks[i][0], "len": src.chunks[i][1]} for i in range(4)]
    spec.append({"id": other.id(0), "src": other.path, "off": 0, "len": 64 * KB})
    out = node.post("/warm", {"path": "/m", "chunks": spec})
    assert (out["loaded"], out["bytes"], out["present"], out["no_space"]) == (3, 3 * 64 * KB, 1, 0)
    assert out["failed"] == [{"id": other.id(0), "error": "StaleSource", "message": out["failed"][0]["message"]}]
    ids = [src.id(i) for i in range(4)]
    assert sorted(node.post("/has", {"ids": [*ids, other.id(0), "junk"]})["present"]) == sorted(ids)
    assert node.post("/warm", {"path": "/m", "chunks": spec[:4]})["present"] == 4
    assert node.post("/evict", {"path": "/m", "ids": ids[:1]}) == {"chunks": 1, "bytes": 64 * KB}
    assert node.post("/evict", {"path": "/m"}) == {"chunks": 3, "bytes": 3 * 64 * KB}
    assert node.post("/has", {"ids": ids})["present"] == []
    assert node.stats()["used"] == 0


def test_warm_reports_what_does_not_fit(nodes, tmp_path):
    src = Source(tmp_path / "big.bin", 6 * 64 * KB, 64 * KB)
    node = nodes(capacity=str(4 * 64 * KB))
    spec = [{"id": c[2], "src": src.path, "off": c[0], "len": c[1]} for c in src.chunks]
    out = node.post("/warm", {"path": "/big", "chunks": spec})
    assert out["loaded"] == 4 and out["no_space"] == 2 and out["failed"] == []
    assert node.stats()["used"] == 4 * 64 * KB


# --------------------------------------------------------------------------- registration, heartbeat, pins


class FakeMeta(pbg.MetaServicer):
    """The three node-facing RPCs of the metadata service, on a real grpc.aio server."""

    def __init__(self, port: int = 0) -> None:
        self.lock = threading.Lock()
        self.nodes: dict[str, pb.Node] = {}
        self.registrations = 0
        self.heartbeats: list[pb.HeartbeatRequest] = []
        self.pins_generation = 0
        self.pinned: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.port = port
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(DEADLINE)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._started.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.server = grpc.aio.server()
        pbg.add_MetaServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(DEADLINE)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(DEADLINE)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def RegisterNode(self, request: pb.Node, context: Any) -> pb.RegisterResponse:
        with self.lock:
            self.nodes[request.node_id] = request
            self.registrations += 1
            return pb.RegisterResponse(heartbeat_interval=0.05, pins_generation=self.pins_generation)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        with self.lock:
            self.heartbeats.append(request)
            return pb.HeartbeatResponse(known=request.node_id in self.nodes,
                                        pins_generation=self.pins_generation)

    async def PinnedChunks(self, request: pb.PinnedChunksRequest, context: Any) -> pb.PinnedChunksResponse:
        with self.lock:
            return pb.PinnedChunksResponse(generation=self.pins_generation,
                                           ids=b"".join(bytes.fromhex(i) for i in self.pinned))

    def pin(self, ids: list[str]) -> None:
        with self.lock:
            self.pinned = list(ids)
            self.pins_generation += 1

    def forget(self) -> None:
        with self.lock:
            self.nodes.clear()


@pytest.fixture
def meta() -> Iterator[FakeMeta]:
    m = FakeMeta()
    yield m
    m.close()


def test_registers_heartbeats_and_registers_again_when_forgotten(nodes, meta, tmp_path):
    node = nodes(meta=meta.address, capacity="32MiB", extra=["--role", "gpu"])
    reg = wait_for(lambda: meta.nodes.get("test-node"), "the node to register")
    assert reg.address == node.address  # the port it really listens on
    assert (reg.capacity, reg.role, reg.host_id) == (32 << 20, "gpu", host_id())
    assert reg.pool_dir == os.path.abspath(node.pool_dir)
    src = Source(tmp_path / "m.bin", 64 * KB, 64 * KB)
    node.get(src.id(0), **src.params(0))
    wait_for(lambda: any(h.used == 64 * KB and h.chunks == 1 for h in list(meta.heartbeats)),
             "a heartbeat reporting the pool's fill")
    meta.forget()  # e.g. the metadata service lost its registry
    wait_for(lambda: meta.registrations >= 2 and "test-node" in meta.nodes, "the node to register again")
    assert node.stats()["registered"] is True


def test_node_waits_for_metadata_service_to_come_up(nodes, tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = nodes(meta=f"127.0.0.1:{port}")
    assert node.stats()["registered"] is False  # it serves while it waits
    m = FakeMeta(port)
    try:
        wait_for(lambda: "test-node" in m.nodes, "registration once the service is up")
        wait_for(lambda: node.stats()["registered"], "the node to report it is registered")
    finally:
        m.close()


def test_pinned_chunks_are_never_evicted(nodes, meta, tmp_path):
    chunk = 64 * KB
    a = Source(tmp_path / "a.bin", 2 * chunk, chunk, seed=1)
    b = Source(tmp_path / "b.bin", 2 * chunk, chunk, seed=2)
    c = Source(tmp_path / "c.bin", 2 * chunk, chunk, seed=3)
    d = Source(tmp_path / "d.bin", chunk, chunk, seed=4)
    node = nodes(meta=meta.address, capacity=str(4 * chunk))
    wait_for(lambda: node.stats()["registered"], "registration")
    for s, p in ((b, "/b"), (a, "/a")):  # B is the least recently used file
        for i in range(2):
            node.get(s.id(i), **s.params(i, p))
    meta.pin([b.id(0), b.id(1)])
    wait_for(lambda: node.stats()["pinned"] == 2, "the node to load the pins")
    for i in range(2):
        node.get(c.id(i), **c.params(i, "/c"))
    assert [node.head(b.id(i)) for i in range(2)] == [200, 200]  # pinned B stays
    assert [node.head(a.id(i)) for i in range(2)] == [404, 404]  # A goes instead
    # everything in the pool pinned: a new chunk is still served, but not kept
    meta.pin([b.id(0), b.id(1), c.id(0), c.id(1)])
    wait_for(lambda: node.stats()["pinned"] == 4, "the new pins")
    status, headers, body = node.get(d.id(0), **d.params(0, "/d"))
    assert (status, headers["X-Sdcache-Hit"], body) == (200, "0", d.bytes(0))
    assert node.head(d.id(0)) == 404
    assert [node.head(i) for i in (b.id(0), b.id(1), c.id(0), c.id(1))] == [200] * 4
    assert node.stats()["rejected"] == 1


# --------------------------------------------------------------------------- S3 under-store


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._server.server_port}"
    finally:
        server.stop()


def test_s3_read_through(nodes, tmp_path, s3_server):
    import boto3

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_server}
    s3 = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    s3.create_bucket(Bucket="models")
    src = Source(tmp_path / "local-copy.bin", 2 * 256 * KB, 256 * KB, seed=5)
    s3.put_object(Bucket="models", Key="sd/m.safetensors", Body=src.data)
    node = nodes(env=env)
    url = "s3://models/sd/m.safetensors"
    for hit in ("0", "1"):
        status, headers, body = node.get(src.id(1), **src.params(1, "/sd/m.safetensors", src=url))
        assert (status, headers.get("X-Sdcache-Hit"), body) == (200, hit, src.bytes(1)), body[:200]
    # the object is replaced: a chunk not yet cached is refused, not served from the new version
    s3.put_object(Bucket="models", Key="sd/m.safetensors", Body=bytes(len(src.data)))
    status, _, body = node.get(src.id(0), **src.params(0, src=url))
    assert status == 410 and isinstance(error_of(body), errors.StaleSource)
    status, _, body = node.get(src.id(0), **src.params(0, src="s3://models/sd/missing"))
    assert status == 410 and "vanished" in str(error_of(body))
