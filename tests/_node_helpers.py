"""What the node tests share: a real metadata service, committed files, a node subprocess, an HTTP under-store.

``tests/test_node_server.py`` (the pool, read-through, eviction, warm-up,
registration) and ``tests/test_node_trust.py`` (the trust boundary) use them.
Everything is real: a metadata service (LocalCluster with no nodes of its
own) that the node registers with and reads committed manifests from, files
committed by the real importer, a ``sdcache node`` subprocess on port 0, and
a local HTTP server that counts (and can hold) the range requests it answers.
Requests carry tokens signed with the test clusters' key (``tests/conftest.py``).

A test module takes the fixtures here by importing them by name.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pytest

from sdcache import auth, errors
from sdcache.chunking import CHUNK_SIZE, ChunkRef
from sdcache.client.importer import import_file
from sdcache.client.metaclient import MetaClient
from sdcache.cluster import LocalCluster

from .conftest import ADMIN_TOKEN, TOKEN_KEY, mint_token, wait_for

KB = 1024
CHUNK = CHUNK_SIZE  # files that are not .safetensors are cut in fixed 4 MiB chunks
NODE_CMD = [sys.executable, "-m", "sdcache", "node"]
DEADLINE = 30.0
HEARTBEAT = 0.2  # seconds, for the test metadata services

READ_TOKEN = mint_token("read", "node-server-test-reader")
NODE_TOKEN = mint_token("node", "node-server-test-node")


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


# --------------------------------------------------------------------------- an HTTP under-store


class CountingRangeServer(http.server.ThreadingHTTPServer):
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
    server: CountingRangeServer
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
def http_store() -> Iterator[Callable[[bytes], CountingRangeServer]]:
    """Start HTTP under-stores serving given bytes; each answers freely until a test calls ``reset()``."""
    made: list[CountingRangeServer] = []

    def make(data: bytes) -> CountingRangeServer:
        s = CountingRangeServer(data)
        s.release.set()  # the importer reads it freely; tests hold answers with reset()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
