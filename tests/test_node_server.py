"""The cache node as users meet it: a real ``sdcache node`` subprocess serving the chunk API.

Everything around it is real too: a metadata service (LocalCluster with no
nodes of its own) that the node registers with and reads committed manifests
from, files committed by the real importer, and under-stores that are local
files, a local HTTP server that counts (and can hold) the range requests it
answers, and a moto S3 server. Requests carry tokens signed with the test
clusters' key (``tests/conftest.py``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import http.server
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pytest
import xxhash
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sdcache import auth, errors, pool_layout
from sdcache.chunking import CHUNK_SIZE, ChunkRef
from sdcache.client.importer import import_file
from sdcache.client.metaclient import MetaClient
from sdcache.cluster import LocalCluster
from sdcache.hostid import host_id

from .conftest import ADMIN_TOKEN, AWS_ENV, TOKEN_KEY, mint_token

KB = 1024
MB = 1 << 20
CHUNK = CHUNK_SIZE  # files that are not .safetensors are cut in fixed 4 MiB chunks
NODE_CMD = [sys.executable, "-m", "sdcache", "node"]
DEADLINE = 30.0
HEARTBEAT = 0.2  # seconds, for the test metadata services

READ_TOKEN = mint_token("read", "node-server-test-reader")
NODE_TOKEN = mint_token("node", "node-server-test-node")


def wait_for(cond: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def error_of(body: bytes) -> errors.SdcacheError:
    doc = json.loads(body)
    return errors.from_wire(doc["error"], doc["message"])


# --------------------------------------------------------------------------- a metadata service, committed files


@dataclass
class File:
    """A file committed to the metadata service: cache path, its bytes, its manifest's chunks."""

    path: str
    source: str
    data: bytes
    chunks: list[ChunkRef]

    def id(self, i: int) -> str:
        return self.chunks[i].id

    def size(self, i: int) -> int:
        return self.chunks[i].length

    def bytes(self, i: int) -> bytes:
        c = self.chunks[i]
        return self.data[c.offset:c.offset + c.length]

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.chunks]


class Meta:
    """A real metadata service (a LocalCluster with no nodes) and an admin client of it."""

    def __init__(self, data_dir: str, listen: str = "127.0.0.1:0") -> None:
        self.pool_root = tempfile.mkdtemp(prefix="sdcache-test-nopool-")  # no nodes of its own
        self.cluster = LocalCluster(data_dir, nodes=0, meta_listen=listen, heartbeat_interval=HEARTBEAT,
                                    pool_root=self.pool_root, token_key=TOKEN_KEY)
        self.cluster.start()
        self.client = MetaClient(self.address, credentials=self.cluster.credentials)

    @property
    def address(self) -> str:
        return self.cluster.meta_addr

    def commit(self, dest: str, data: bytes, local: str | None = None, *, url: str | None = None) -> File:
        """Commit *data* at cache path *dest* with the real importer, from *url* or local file *local*."""
        if url is None:
            assert local is not None
            with open(local, "wb") as f:
                f.write(data)
        m = import_file(self.client, url or str(local), dest).manifest
        assert sum(c.length for c in m.chunks) == len(data)
        return File(m.path, m.source, data, list(m.chunks))

    def node(self, node_id: str = "test-node") -> Any:
        return next((n for n in self.client.nodes_raw(include_dead=True) if n.node_id == node_id), None)

    def forget_everything(self) -> None:
        """Kill the service, lose its database (registry, namespace), start it again on the same address."""
        c = self.cluster
        assert c.meta is not None and c.meta.proc is not None
        c.meta.signal(signal.SIGKILL)
        c.meta.proc.wait()
        for name in os.listdir(c.data_dir):
            if name.startswith("meta.db"):
                os.unlink(os.path.join(c.data_dir, name))
        c.restart_meta()

    def close(self) -> None:
        self.client.close()
        self.cluster.stop()
        shutil.rmtree(self.pool_root, ignore_errors=True)


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Meta]:
    """One metadata service for the module; each test commits under its own directory (``ns``)."""
    m = Meta(str(tmp_path_factory.mktemp("meta")))
    yield m
    m.close()


@pytest.fixture
def own_meta(tmp_path) -> Iterator[Meta]:
    """A private metadata service, for tests that pin or wipe it."""
    m = Meta(str(tmp_path / "own-meta"))
    yield m
    m.close()


@pytest.fixture
def ns(request: pytest.FixtureRequest) -> str:
    """A cache directory of this test's own."""
    return f"/t/{request.node.name}"


def randbytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# --------------------------------------------------------------------------- a node subprocess


class Node:
    """``sdcache node`` in a subprocess on 127.0.0.1 port 0, registered with *meta* (a node token)."""

    def __init__(self, tmp_path, meta: str, *, capacity: str = "64MiB", pool_dir: str | None = None,
                 env: dict[str, str] | None = None, extra: list[str] | None = None,
                 token: str | None = NODE_TOKEN, token_in_env: bool = False, wait_registered: bool = True) -> None:
        self.pool_dir = pool_dir or str(tmp_path / "pool")
        self.stderr_path = tmp_path / f"node-{time.monotonic_ns()}.err"
        self.ready_file = str(tmp_path / "node.ready")
        if os.path.exists(self.ready_file):
            os.unlink(self.ready_file)
        env = {**os.environ, **(env or {})}
        env.pop("SDCACHE_TOKEN", None)  # the tests' admin token: a node gets its own
        args = []
        if token is not None and token_in_env:
            env["SDCACHE_TOKEN"] = token
        elif token is not None:
            token_file = str(tmp_path / "node.token")
            auth.write_secret(token_file, (token + "\n").encode())
            args = ["--token-file", token_file]
        cmd = [*NODE_CMD, "--listen", "127.0.0.1:0", "--capacity", capacity, "--pool-dir", self.pool_dir,
               "--meta", meta, "--node-id", "test-node", "--ready-file", self.ready_file, *args, *(extra or [])]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        self.address = self._await_ready()
        if wait_registered:
            # Until it has the token keys from the metadata service, a node answers 503.
            wait_for(lambda: self.request("GET", "/stats")[0] == 200, f"the node to register: {self.stderr()}")

    def _await_ready(self) -> str:
        assert self.proc.stdout is not None
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

    def connection(self) -> http.client.HTTPConnection:
        host, port = self.address.rsplit(":", 1)
        return http.client.HTTPConnection(host, int(port), timeout=DEADLINE)

    def request(self, method: str, target: str, body: Any = None, *, token: str | None = READ_TOKEN,
                conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], bytes]:
        c = conn or self.connection()
        try:
            payload = (body if isinstance(body, bytes) else json.dumps(body).encode()) if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            c.request(method, target, body=payload, headers=headers)
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            if conn is None:
                c.close()

    def get(self, chunk: str, *, token: str | None = READ_TOKEN, **params: Any) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", f"/chunks/{chunk}" + ("?" + urlencode(params) if params else ""), token=token)

    def read(self, f: File, i: int) -> tuple[int, dict[str, str], bytes]:
        """GET chunk *i* of *f*, naming its cache path, as a client does."""
        return self.get(f.id(i), path=f.path)

    def head(self, chunk: str) -> int:
        return self.request("HEAD", f"/chunks/{chunk}")[0]

    def post(self, what: str, body: Any, *, token: str = ADMIN_TOKEN) -> Any:
        status, _, data = self.request("POST", what, body, token=token)
        assert status == 200, data
        return json.loads(data)

    def stats(self) -> dict[str, Any]:
        status, _, data = self.request("GET", "/stats")
        assert status == 200, data
        return json.loads(data)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=DEADLINE)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def nodes(tmp_path, meta) -> Iterator[Callable[..., Node]]:
    """Start nodes (registered with the module's metadata service unless ``meta=`` says otherwise)."""
    started: list[Node] = []

    def start(**kw: Any) -> Node:
        kw.setdefault("meta", meta.address)
        n = Node(tmp_path, **kw)
        started.append(n)
        return n

    yield start
    for n in started:
        n.kill()


# --------------------------------------------------------------------------- read-through


def test_read_through_then_hit_from_pool(nodes, meta, ns, tmp_path):
    f = meta.commit(f"{ns}/model.bin", randbytes(CHUNK + 12345, 1), tmp_path / "model.bin")
    assert [c.length for c in f.chunks] == [CHUNK, 12345]
    node = nodes()
    for expect_hit in ("0", "1"):
        status, headers, body = node.read(f, 0)
        assert status == 200
        assert body == f.bytes(0)
        assert headers["X-Sdcache-Hit"] == expect_hit
        assert headers["Content-Type"] == "application/octet-stream"
        assert int(headers["Content-Length"]) == CHUNK
    # a short last chunk, and nothing partial left visible in the pool
    status, headers, body = node.read(f, 1)
    assert (status, headers["X-Sdcache-Hit"], body) == (200, "0", f.bytes(1))
    assert node.head(f.id(0)) == node.head(f.id(1)) == 200
    with open(pool_layout.chunk_path(node.pool_dir, f.id(0)), "rb") as fh:
        assert fh.read() == f.bytes(0)
    assert os.listdir(os.path.join(node.pool_dir, pool_layout.TMP_DIR)) == []
    st = node.stats()
    assert (st["understore_reads"], st["hits"], st["chunks"]) == (2, 1, 2)
    assert st["manifest_lookups"] == 1  # one manifest read for both chunks of the file
    assert st["bytes_served"] == 2 * CHUNK + f.size(1)
    assert st["node_id"] == "test-node" and st["role"] == "memory" and st["host_id"] == host_id()
    # a pool hit needs no path; a miss without one is 404 NotFound
    assert node.get(f.id(0))[1]["X-Sdcache-Hit"] == "1"
    status, _, body = node.get("0" * 32)
    assert status == 404 and isinstance(error_of(body), errors.NotFound)
    assert node.request("GET", "/healthz", token=None)[2] == b"ok"


def test_changed_source_is_410_and_nothing_is_kept(nodes, meta, ns, tmp_path):
    f = meta.commit(f"{ns}/lora.bin", randbytes(CHUNK + 256 * KB, 2), tmp_path / "lora.bin")
    node = nodes()
    with open(f.source, "r+b") as fh:  # the source is rewritten after import
        fh.seek(1000)
        fh.write(b"changed!")
    status, _, body = node.read(f, 0)
    assert status == 410
    err = error_of(body)
    assert isinstance(err, errors.StaleSource) and "source changed since import" in str(err)
    assert node.head(f.id(0)) == 404
    assert node.stats()["chunks"] == 0
    # the untouched second chunk still reads through fine
    assert node.read(f, 1)[2] == f.bytes(1)


def test_vanished_source_is_410(nodes, meta, ns, tmp_path):
    f = meta.commit(f"{ns}/gone.bin", randbytes(64 * KB, 3), tmp_path / "gone.bin")
    os.unlink(f.source)
    node = nodes()
    status, _, body = node.read(f, 0)
    assert status == 410
    err = error_of(body)
    assert isinstance(err, errors.StaleSource) and "source vanished" in str(err)
    assert node.head(f.id(0)) == 404


def test_bad_requests_are_400(nodes, meta, ns, tmp_path):
    f = meta.commit(f"{ns}/m.bin", randbytes(64 * KB, 4), tmp_path / "m.bin")
    node = nodes()
    for bad in ("XYZ", "A" * 32, "0" * 31, "0" * 32 + "%0A"):
        status, _, body = node.get(bad, path=f.path)
        assert status == 400 and isinstance(error_of(body), errors.InvalidArgument), bad
    # a request never names a source or a range, with or without a path
    for params in ({"src": f.source}, {"src": f.source, "off": 0, "len": f.size(0)}, {"off": 0},
                   {"len": 1}, {"path": f.path, "src": f.source, "off": 0, "len": f.size(0)}):
        status, _, body = node.get(f.id(0), **params)
        assert status == 400 and isinstance(error_of(body), errors.InvalidArgument), params
        assert "path=CACHEPATH" in str(error_of(body))
    status, _, body = node.get(f.id(0), path="/a/../b")
    assert status == 400 and isinstance(error_of(body), errors.InvalidPath)
    # /warm takes a path and ids, never chunks with sources
    spec = [{"id": f.id(0), "src": f.source, "off": 0, "len": f.size(0)}]
    for body_, kind in (({"path": f.path, "chunks": spec}, errors.InvalidArgument),
                        ({"path": "/a/../b", "ids": []}, errors.InvalidPath),
                        ({"ids": [f.id(0)]}, errors.InvalidArgument),
                        ({"path": f.path, "ids": "nope"}, errors.InvalidArgument),
                        (b"not json", errors.InvalidArgument)):
        status, _, body = node.request("POST", "/warm", body_, token=ADMIN_TOKEN)
        assert status == 400 and isinstance(error_of(body), kind), body_
    st = node.stats()
    assert (st["understore_reads"], st["chunks"]) == (0, 0)


# --------------------------------------------------------------------------- confined read-through (new contract)


def test_probing_bytes_of_a_local_file_gets_nothing(nodes, meta, ns, tmp_path):
    """The attack the old ``src=&off=&len=`` API allowed: guess one byte of any file the node can read,
    name the guess's chunk id, and see which guess the node serves. None may succeed, whatever the token."""
    f = meta.commit(f"{ns}/m.bin", randbytes(64 * KB, 5), tmp_path / "m.bin")
    node = nodes()
    assert node.read(f, 0)[0] == 200  # the node holds real chunks and reads through for real
    target = "/etc/hostname"
    if not os.path.isfile(target) or os.path.getsize(target) == 0:
        target = str(tmp_path / "secret")
        with open(target, "wb") as fh:
            fh.write(b"s3cret")
    with open(target, "rb") as fh:
        first = fh.read(1)
    before = node.stats()
    conn = node.connection()
    answers: dict[str, set[int]] = {"read": set(), "admin": set(), "path": set()}
    try:
        for b in range(256):
            guess = xxhash.xxh3_128_hexdigest(bytes([b]))
            probe = f"/chunks/{guess}?" + urlencode({"src": f"file://{target}", "off": 0, "len": 1})
            answers["read"].add(node.request("GET", probe, token=READ_TOKEN, conn=conn)[0])
            answers["admin"].add(node.request("GET", probe, token=ADMIN_TOKEN, conn=conn)[0])
            status, _, body = node.request("GET", f"/chunks/{guess}?" + urlencode({"path": target}), conn=conn)
            answers["path"].add(status)
            if bytes([b]) == first:  # the right guess is refused like every other
                assert isinstance(error_of(body), errors.NotFound)
    finally:
        conn.close()
    assert answers == {"read": {400}, "admin": {400}, "path": {404}}
    after = node.stats()
    assert after["understore_reads"] == before["understore_reads"] == 1
    assert after["chunks"] == 1 and after["understore_bytes"] == before["understore_bytes"]


def test_real_chunk_of_another_file_is_404_and_nothing_is_read(nodes, meta, ns, tmp_path):
    a = meta.commit(f"{ns}/a.bin", randbytes(64 * KB, 6), tmp_path / "a.bin")
    b = meta.commit(f"{ns}/b.bin", randbytes(64 * KB, 7), tmp_path / "b.bin")
    node = nodes()
    assert node.read(b, 0)[0] == 200
    reads = node.stats()["understore_reads"]
    status, _, body = node.get(a.id(0), path=b.path)  # a real chunk, but not of b
    assert status == 404
    err = error_of(body)
    assert isinstance(err, errors.NotFound) and b.path in str(err)
    status, _, body = node.get(a.id(0), path=f"{ns}/never-committed.bin")
    assert status == 404 and isinstance(error_of(body), errors.NotFound)
    st = node.stats()
    assert st["understore_reads"] == reads and node.head(a.id(0)) == 404
    # named with its own file it reads through
    assert node.read(a, 0)[2] == a.bytes(0)


def test_hit_named_with_a_foreign_path_does_not_claim_the_chunk(nodes, meta, ns, tmp_path):
    """A pool hit is served whatever path a reader names, but only a path whose manifest holds the
    chunk is credited with it: readers cannot grow the pool's file index or keep a chunk from an
    admin's evict by naming other paths."""
    f = meta.commit(f"{ns}/m.bin", randbytes(64 * KB, 12), tmp_path / "m.bin")
    node = nodes()
    assert node.read(f, 0)[0] == 200
    files = node.stats()["files"]
    conn = node.connection()
    try:
        for i in range(200):
            status, headers, _ = node.request("GET", f"/chunks/{f.id(0)}?path={ns}/bogus/{i}", conn=conn)
            assert (status, headers["X-Sdcache-Hit"]) == (200, "1")
    finally:
        conn.close()
    assert node.stats()["files"] == files
    assert node.post("/evict", {"path": f.path}) == {"chunks": 1, "bytes": f.size(0)}
    assert node.head(f.id(0)) == 404


# --------------------------------------------------------------------------- tokens


def _tampered(token: str) -> str:
    """*token* with its role rewritten to admin, its signature left as it was."""
    prefix, payload, sig = token.split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    doc["r"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())
    return f"{prefix}.{forged.rstrip(b'=').decode()}.{sig}"


def test_tokens_and_roles(nodes, meta, ns, tmp_path):
    f = meta.commit(f"{ns}/m.bin", randbytes(64 * KB, 8), tmp_path / "m.bin")
    node = nodes()
    chunk = f"/chunks/{f.id(0)}?path={f.path}"
    # no token: 401 with a challenge, on every route but /healthz
    for method, target in (("GET", chunk), ("HEAD", chunk), ("GET", "/stats"), ("POST", "/has"),
                           ("POST", "/warm"), ("POST", "/evict")):
        status, headers, body = node.request(method, target, {"ids": []} if method == "POST" else None, token=None)
        assert status == 401, (method, target)
        assert headers["WWW-Authenticate"].startswith("Bearer"), (method, target)
        if method != "HEAD":
            assert isinstance(error_of(body), errors.Unauthenticated)
    assert node.request("GET", "/healthz", token=None)[:3:2] == (200, b"ok")
    # garbage, tampered, or signed by another cluster's key: 401
    other_cluster = auth.mint(Ed25519PrivateKey.generate(), "intruder", "admin")
    for bad in ("garbage", "sdc1.x.y", _tampered(READ_TOKEN), READ_TOKEN[:-2], other_cluster):
        status, headers, body = node.request("GET", chunk, token=bad)
        assert status == 401 and "WWW-Authenticate" in headers, bad
        assert isinstance(error_of(body), errors.Unauthenticated)
    status, _, body = node.request("POST", "/evict", {"path": f.path}, token=_tampered(READ_TOKEN))
    assert status == 401
    # a read token reads but may not warm or evict; neither may a node token
    for token in (READ_TOKEN, NODE_TOKEN):
        for route, body_ in (("/warm", {"path": f.path, "ids": f.ids}), ("/evict", {"path": f.path})):
            status, _, body = node.request("POST", route, body_, token=token)
            assert status == 403 and isinstance(error_of(body), errors.PermissionDenied), (route, token)
    assert node.stats()["chunks"] == 0  # nothing was warmed
    status, _, body = node.request("GET", chunk, token=NODE_TOKEN)
    assert (status, body) == (200, f.bytes(0))
    assert node.request("GET", chunk, token=READ_TOKEN)[0] == 200
    assert node.post("/has", {"ids": f.ids}, token=READ_TOKEN) == {"present": f.ids}
    assert node.post("/evict", {"path": f.path}) == {"chunks": 1, "bytes": f.size(0)}
    # a token revoked at the metadata service stops working here within a heartbeat
    name = f"revoked-{uuid.uuid4().hex[:8]}"
    issued = meta.client.create_token("read", name=name).token
    assert node.request("GET", "/stats", token=issued)[0] == 200
    meta.client.revoke_token(name)
    wait_for(lambda: node.request("GET", "/stats", token=issued)[0] == 401, "the node to refuse the revoked token")
    assert node.request("GET", "/stats", token=READ_TOKEN)[0] == 200


# --------------------------------------------------------------------------- an HTTP under-store


class _CountingRangeServer(http.server.ThreadingHTTPServer):
    """An HTTP under-store that counts GETs and holds answers until released."""

    daemon_threads = True

    def __init__(self, data: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.data = data
        self.gets = 0
        self.release = threading.Event()
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"

    def reset(self) -> None:
        """Forget the GETs so far and hold answers from now on."""
        with self.lock:
            self.gets = 0
        self.release.clear()

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


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


@pytest.fixture
def http_store() -> Iterator[Callable[[bytes], _CountingRangeServer]]:
    made: list[_CountingRangeServer] = []

    def make(data: bytes) -> _CountingRangeServer:
        s = _CountingRangeServer(data)
        s.release.set()  # the importer reads it freely; tests hold answers with reset()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_twenty_concurrent_misses_make_one_understore_read(nodes, meta, ns, http_store):
    data = randbytes(3 * CHUNK, 9)
    httpd = http_store(data)
    f = meta.commit(f"{ns}/ckpt.bin", data, url=httpd.url("ckpt.bin"))
    assert f.source == httpd.url("ckpt.bin") and len(f.chunks) == 3
    node = nodes()
    httpd.reset()
    with concurrent.futures.ThreadPoolExecutor(20) as ex:
        futures = [ex.submit(node.read, f, 1) for _ in range(20)]
        # the under-store holds its answer until all 20 are waiting on the node
        wait_for(lambda: node.stats()["singleflight_joined"] >= 19, "19 requests to join the first fetch")
        httpd.release.set()
        results = [fut.result() for fut in futures]
    assert all(status == 200 and body == f.bytes(1) for status, _, body in results)
    assert [h["X-Sdcache-Hit"] for _, h, _ in results] == ["0"] * 20
    assert httpd.gets == 1
    st = node.stats()
    assert st["understore_reads"] == 1 and st["chunks"] == 1 and st["manifest_lookups"] == 1
    assert node.read(f, 1)[1]["X-Sdcache-Hit"] == "1"


def test_bytes_in_flight_are_bounded(nodes, meta, ns, http_store):
    """Over ``--max-inflight`` a GET is refused at once (503 Overloaded + Retry-After), not queued."""
    data = randbytes(16 * CHUNK, 10)
    httpd = http_store(data)
    f = meta.commit(f"{ns}/big.bin", data, url=httpd.url("big.bin"))
    node = nodes(capacity="128MiB", extra=["--max-inflight", "4MiB"])
    assert node.stats()["inflight_limit"] == CHUNK
    httpd.reset()  # a slow under-store: the first read holds the whole budget until released
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        futures = [ex.submit(node.read, f, i) for i in range(16)]
        wait_for(lambda: node.stats()["overloaded"] >= 15, "15 of 16 reads to be refused")
        httpd.release.set()
        results = [fut.result() for fut in futures]
    ok = [i for i, (status, _, _) in enumerate(results) if status == 200]
    assert len(ok) == 1 and results[ok[0]][2] == f.bytes(ok[0])
    for i, (status, headers, body) in enumerate(results):
        if i in ok:
            continue
        assert status == 503 and headers["Retry-After"] == "1", (i, status, body[:200])
        err = error_of(body)
        assert isinstance(err, errors.Overloaded) and json.loads(body)["error"] == "Overloaded"
    assert httpd.gets == 1  # refused reads never touched the under-store
    # the node keeps serving: each refused chunk, read once the node is idle again
    for i in range(16):
        wait_for(lambda: node.stats()["inflight_bytes"] == 0, "the node to be idle")
        status, headers, body = node.read(f, i)
        assert (status, headers["X-Sdcache-Hit"], body) == (200, "1" if i in ok else "0", f.bytes(i))
    st = node.stats()
    assert st["overloaded"] == 15 and st["inflight_bytes"] == 0 and st["chunks"] == 16


# --------------------------------------------------------------------------- capacity and eviction


def _pool_disk_bytes(pool_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(pool_dir) for f in fs)


def test_capacity_never_exceeded_while_streaming(nodes, meta, ns, tmp_path):
    files = [meta.commit(f"{ns}/f{j}.bin", randbytes(2 * CHUNK + (j + 1) * 64 * KB, 20 + j), tmp_path / f"f{j}.bin")
             for j in range(4)]
    cap = 5 * CHUNK
    node = nodes(capacity=str(cap))
    for i in range(3):
        for f in files:
            status, _, body = node.read(f, i)
            assert status == 200 and body == f.bytes(i)
            assert node.stats()["used"] <= cap
            assert _pool_disk_bytes(node.pool_dir) <= cap
    st = node.stats()
    assert st["chunks"] >= 4 and st["evictions"] > 0


def test_least_recently_used_file_is_evicted_first(nodes, meta, ns, tmp_path):
    a = meta.commit(f"{ns}/a.bin", randbytes(2 * CHUNK, 31), tmp_path / "a.bin")
    b = meta.commit(f"{ns}/b.bin", randbytes(2 * CHUNK, 32), tmp_path / "b.bin")
    c = meta.commit(f"{ns}/c.bin", randbytes(CHUNK, 33), tmp_path / "c.bin")
    node = nodes(capacity=str(4 * CHUNK))
    for f in (a, b):
        for i in range(2):
            assert node.read(f, i)[0] == 200
    assert node.read(a, 1)[1]["X-Sdcache-Hit"] == "1"  # A used again
    assert node.read(c, 0)[0] == 200
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


def test_flipped_byte_in_pool_is_never_served(nodes, meta, ns, tmp_path):
    f = meta.commit(f"{ns}/m.bin", randbytes(CHUNK + 128 * KB, 40), tmp_path / "m.bin")
    node = nodes()
    for i in range(2):
        assert node.read(f, i)[0] == 200
    for i in range(2):
        _flip_byte(pool_layout.chunk_path(node.pool_dir, f.id(i)))
    # without a path: 404, and the bad file is gone
    status, _, _ = node.get(f.id(0))
    assert status == 404
    assert node.head(f.id(0)) == 404
    assert not os.path.exists(pool_layout.chunk_path(node.pool_dir, f.id(0)))
    # with its path: fetched again from the under-store, good bytes, good file
    status, headers, body = node.read(f, 1)
    assert (status, headers["X-Sdcache-Hit"], body) == (200, "0", f.bytes(1))
    with open(pool_layout.chunk_path(node.pool_dir, f.id(1)), "rb") as fh:
        assert fh.read() == f.bytes(1)
    assert node.stats()["corrupt_dropped"] == 2


def test_restart_on_same_pool_comes_back_warm(nodes, meta, ns, tmp_path):
    f = meta.commit(f"{ns}/m.bin", randbytes(2 * CHUNK + 128 * KB, 41), tmp_path / "m.bin")
    node = nodes()
    for i in range(3):
        assert node.read(f, i)[0] == 200
    # a second node on the same pool directory is refused while the first runs
    proc = subprocess.run([*NODE_CMD, "--meta", "none", "--insecure-no-auth", "--capacity", "64MiB",
                           "--pool-dir", node.pool_dir], capture_output=True, text=True, timeout=DEADLINE)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and node.pool_dir in proc.stderr
    assert node.stop() == 0
    _flip_byte(pool_layout.chunk_path(node.pool_dir, f.id(2)))
    with open(os.path.join(node.pool_dir, pool_layout.TMP_DIR, "partial"), "wb") as fh:
        fh.write(b"half")
    os.unlink(f.source)  # only the pool can serve these now

    node = nodes(pool_dir=node.pool_dir)
    assert [node.head(f.id(i)) for i in range(3)] == [200, 200, 404]
    status, headers, body = node.read(f, 0)
    assert (status, headers["X-Sdcache-Hit"], body) == (200, "1", f.bytes(0))
    assert not os.path.exists(pool_layout.chunk_path(node.pool_dir, f.id(2)))
    assert os.listdir(os.path.join(node.pool_dir, pool_layout.TMP_DIR)) == []
    assert node.stats()["used"] == 2 * CHUNK
    status, _, body = node.read(f, 2)  # the dropped chunk's source is gone
    assert status == 410 and isinstance(error_of(body), errors.StaleSource)


def test_capacity_beyond_tmpfs_is_one_clear_error(meta, tmp_path):
    for extra in (["--meta", "none", "--insecure-no-auth"], ["--meta", meta.address]):
        proc = subprocess.run(
            [*NODE_CMD, *extra, "--capacity", "1000TiB", "--pool-dir", str(tmp_path / "pool")],
            capture_output=True, text=True, timeout=DEADLINE,
            env={**os.environ, "SDCACHE_TOKEN": NODE_TOKEN},
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "capacity" in lines[0] and "Traceback" not in proc.stderr
        assert proc.stdout == ""


def test_standalone_node_needs_insecure_no_auth_and_cannot_read_through(tmp_path):
    proc = subprocess.run([*NODE_CMD, "--meta", "none", "--capacity", "64MiB", "--pool-dir", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--insecure-no-auth" in proc.stderr and proc.stdout == ""
    node = Node(tmp_path, "none", extra=["--insecure-no-auth"], token=None, wait_registered=False)
    try:
        assert node.stats()["registered"] is False  # open: no token needed
        status, _, body = node.get("0" * 32, token=None, path="/any/file")
        assert status == 404 and "standalone" in str(error_of(body))
    finally:
        node.kill()


# --------------------------------------------------------------------------- /warm, /has, /evict


def test_warm_has_and_evict(nodes, meta, ns, tmp_path):
    f = meta.commit(f"{ns}/m.bin", randbytes(3 * CHUNK + 64 * KB, 50), tmp_path / "m.bin")
    other = meta.commit(f"{ns}/o.bin", randbytes(64 * KB, 51), tmp_path / "o.bin")
    os.unlink(other.source)
    node = nodes()
    assert node.read(f, 0)[0] == 200
    out = node.post("/warm", {"path": f.path, "ids": [*f.ids, other.id(0)]})
    assert (out["loaded"], out["bytes"], out["present"], out["no_space"]) == (
        3, sum(f.size(i) for i in (1, 2, 3)), 1, 0)
    # a chunk the named file does not hold is refused, not read
    assert out["failed"] == [{"id": other.id(0), "error": "NotFound", "message": out["failed"][0]["message"]}]
    out = node.post("/warm", {"path": other.path, "ids": other.ids})
    assert out["loaded"] == 0
    assert out["failed"] == [{"id": other.id(0), "error": "StaleSource", "message": out["failed"][0]["message"]}]
    assert sorted(node.post("/has", {"ids": [*f.ids, other.id(0)]})["present"]) == sorted(f.ids)
    status, _, body = node.request("POST", "/has", {"ids": [*f.ids, "junk"]})
    assert status == 400 and isinstance(error_of(body), errors.InvalidArgument)
    assert node.post("/warm", {"path": f.path, "ids": f.ids})["present"] == 4
    assert node.post("/evict", {"path": f.path, "ids": f.ids[:1]}) == {"chunks": 1, "bytes": CHUNK}
    rest = sum(f.size(i) for i in (1, 2, 3))
    assert node.post("/evict", {"path": f.path}) == {"chunks": 3, "bytes": rest}
    assert node.post("/has", {"ids": f.ids})["present"] == []
    assert node.stats()["used"] == 0
    assert node.stats()["understore_reads"] == 5  # 1 GET + 3 warmed + 1 vanished


def test_warm_reports_what_does_not_fit(nodes, meta, ns, tmp_path):
    f = meta.commit(f"{ns}/big.bin", randbytes(6 * CHUNK, 52), tmp_path / "big.bin")
    node = nodes(capacity=str(4 * CHUNK))
    out = node.post("/warm", {"path": f.path, "ids": f.ids})
    assert out["loaded"] == 4 and out["no_space"] == 2 and out["failed"] == []
    assert node.stats()["used"] == 4 * CHUNK


# --------------------------------------------------------------------------- registration, heartbeat, pins


def test_registers_heartbeats_and_registers_again_when_forgotten(nodes, own_meta, ns, tmp_path):
    f = own_meta.commit(f"{ns}/m.bin", randbytes(64 * KB, 60), tmp_path / "m.bin")
    node = nodes(meta=own_meta.address, capacity="32MiB", extra=["--role", "gpu"], token_in_env=True)
    reg = wait_for(lambda: own_meta.node("test-node"), "the node to register")
    assert reg.address == node.address  # the port it really listens on
    assert (reg.capacity, reg.role, reg.host_id, reg.alive) == (32 << 20, "gpu", host_id(), True)
    assert reg.pool_dir == os.path.abspath(node.pool_dir)
    assert node.read(f, 0)[0] == 200
    wait_for(lambda: (lambda n: n.used == 64 * KB and n.chunks == 1)(own_meta.node("test-node")),
             "a heartbeat reporting the pool's fill")
    own_meta.forget_everything()  # the metadata service lost its registry (and namespace)
    reg = wait_for(lambda: own_meta.node("test-node"), "the node to register again")
    assert reg.address == node.address and reg.chunks == 1
    # the service lists it once RegisterNode is done; the node says so once it has the keys too
    st = wait_for(lambda: (lambda s: s["registered"] and s)(node.stats()), "the node to report it is registered")
    assert st["chunks"] == 1
    assert node.get(f.id(0))[1]["X-Sdcache-Hit"] == "1"  # the pool survived, tokens still good


def test_node_waits_for_metadata_service_to_come_up(nodes, tmp_path, ns):
    with socket.socket() as s:  # a port nobody listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = nodes(meta=f"127.0.0.1:{port}", wait_registered=False)
    # it is up, but cannot check tokens before the service hands it the keys
    assert node.request("GET", "/healthz", token=None)[0] == 200
    status, headers, body = node.request("GET", "/stats")
    assert status == 503 and headers["Retry-After"] == "1"
    assert isinstance(error_of(body), errors.Unavailable)
    late = Meta(str(tmp_path / "late-meta"), listen=f"127.0.0.1:{port}")
    try:
        wait_for(lambda: late.node("test-node"), "registration once the service is up")
        wait_for(lambda: node.request("GET", "/stats")[0] == 200, "the node to load the token keys")
        wait_for(lambda: node.stats()["registered"], "the node to report it is registered")
        f = late.commit(f"{ns}/m.bin", randbytes(64 * KB, 61), tmp_path / "m.bin")
        assert node.read(f, 0)[2] == f.bytes(0)
    finally:
        late.close()


def test_pinned_chunks_are_never_evicted(nodes, own_meta, ns, tmp_path):
    a, b, c = (own_meta.commit(f"{ns}/{x}.bin", randbytes(2 * CHUNK, 70 + k), tmp_path / f"{x}.bin")
               for k, x in enumerate("abc"))
    d = own_meta.commit(f"{ns}/d.bin", randbytes(CHUNK, 73), tmp_path / "d.bin")
    node = nodes(meta=own_meta.address, capacity=str(4 * CHUNK))
    gen0 = wait_for(lambda: node.stats()["pins_generation"] is not None and node.stats(), "the first pins")
    assert gen0["pinned_ids"] == 0 and gen0["pinned"] == 0
    for f in (b, a):  # B is the least recently used file
        for i in range(2):
            assert node.read(f, i)[0] == 200
    own_meta.client.pin(b.path)
    st = wait_for(lambda: (lambda s: s["pinned"] == 2 and s)(node.stats()), "the node to load the pins")
    assert st["pinned_ids"] == 2 and st["pins_generation"] > gen0["pins_generation"]
    for i in range(2):
        assert node.read(c, i)[0] == 200
    assert [node.head(b.id(i)) for i in range(2)] == [200, 200]  # pinned B stays
    assert [node.head(a.id(i)) for i in range(2)] == [404, 404]  # A goes instead
    # everything in the pool pinned: a new chunk is still served, but not kept
    own_meta.client.pin(c.path)
    wait_for(lambda: node.stats()["pinned"] == 4, "the new pins")
    status, headers, body = node.read(d, 0)
    assert (status, headers["X-Sdcache-Hit"], body) == (200, "0", d.bytes(0))
    assert node.head(d.id(0)) == 404
    assert [node.head(i) for i in (*b.ids, *c.ids)] == [200] * 4
    st = node.stats()
    assert st["rejected"] == 1 and st["pinned_ids"] == 4
    # a pinned file that is not in the pool counts in pinned_ids, not in pinned
    own_meta.client.pin(a.path)
    st = wait_for(lambda: (lambda s: s["pinned_ids"] == 6 and s)(node.stats()), "pins of a file not held")
    assert st["pinned"] == 4


# --------------------------------------------------------------------------- S3 under-store


def test_s3_read_through(nodes, meta, ns, s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"], region_name=AWS_ENV["AWS_DEFAULT_REGION"])
    bucket = f"node-server-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    data, gone = randbytes(CHUNK + 256 * KB, 80), randbytes(64 * KB, 81)
    s3.put_object(Bucket=bucket, Key="sd/m.bin", Body=data)
    s3.put_object(Bucket=bucket, Key="sd/gone.bin", Body=gone)
    f = meta.commit(f"{ns}/m.bin", data, url=f"s3://{bucket}/sd/m.bin")
    g = meta.commit(f"{ns}/gone.bin", gone, url=f"s3://{bucket}/sd/gone.bin")
    assert f.source == f"s3://{bucket}/sd/m.bin"
    node = nodes(env={**AWS_ENV, "AWS_ENDPOINT_URL": s3_server})
    for hit in ("0", "1"):
        status, headers, body = node.read(f, 1)
        assert (status, headers.get("X-Sdcache-Hit"), body) == (200, hit, f.bytes(1)), body[:200]
    # the object is replaced: a chunk not yet cached is refused, not served from the new version
    s3.put_object(Bucket=bucket, Key="sd/m.bin", Body=bytes(len(data)))
    status, _, body = node.read(f, 0)
    assert status == 410 and isinstance(error_of(body), errors.StaleSource)
    s3.delete_object(Bucket=bucket, Key="sd/gone.bin")
    status, _, body = node.read(g, 0)
    assert status == 410 and "vanished" in str(error_of(body))
