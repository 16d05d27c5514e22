"""Client behaviour under faults: a failing chunk, a dead metadata service, busy nodes, a busy mount.

Real clusters (``own_cluster``, ``make_cluster``), the real fsspec client, the
real CLI; the busy node is a real HTTP server speaking the node's chunk API.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from aiohttp import web

from sdcache import errors
from sdcache._proto import meta_pb2 as pb
from sdcache.chunking import CHUNK_SIZE
from sdcache.client import metaclient
from sdcache.client.fs import SdcacheFileSystem
from sdcache.client.metaclient import MetaClient
from sdcache.placement import rank

from .conftest import _make_cluster, corrupt_everywhere, run_cli


def _manifest(meta: str, path: str):
    client = MetaClient(meta)
    try:
        return client.manifest(path)
    finally:
        client.close()


# --------------------------------------------------------------------------- one chunk bad, the rest good

# Runs in its own process: on a use-after-free the process dies (SIGSEGV) or its heap is corrupted,
# and the test has to see that rather than die with it.
READER = r"""
import hashlib, sys
from sdcache import errors
from sdcache.client.fs import SdcacheFileSystem

meta, bad, good, good_sha, rounds, short_circuit = sys.argv[1:]
fs = SdcacheFileSystem(meta=meta, skip_instance_cache=True)
fs.fetcher.short_circuit = short_circuit == "1"
kinds = set()
for _ in range(int(rounds)):
    for read in (lambda: fs.cat_file(bad), lambda: fs.open(bad, "rb").read()):
        try:
            read()
        except errors.SdcacheError as exc:
            kinds.add(type(exc).__name__)
        else:
            sys.exit("the file with a bad chunk read without an error")
    if hashlib.sha256(fs.cat_file(good)).hexdigest() != good_sha:
        sys.exit("a good file read after the failure came back wrong")
print(" ".join(sorted(kinds)))
"""


@pytest.mark.parametrize("short_circuit", ["0", "1"], ids=["http", "short-circuit"])
def test_a_failing_chunk_raises_one_error_and_never_writes_into_freed_memory(own_cluster, tmp_path, short_circuit):
    meta = own_cluster.meta_addr
    bad_src, good_src = tmp_path / "bad.bin", tmp_path / "good.bin"
    bad_src.write_bytes(os.urandom(20 * CHUNK_SIZE))
    good = os.urandom(3 * CHUNK_SIZE + 12345)
    good_src.write_bytes(good)
    run_cli("import", str(bad_src), "/faults/bad.bin", "--warm", meta=meta, check=True)
    run_cli("import", str(good_src), "/faults/good.bin", "--warm", meta=meta, check=True)
    m = _manifest(meta, "/faults/bad.bin")
    assert len(m.chunks) == 20
    # The first chunk goes bad everywhere: every pool copy corrupt, the source gone. It fails
    # fast while the other 19 are still being fetched into the same buffer.
    assert corrupt_everywhere(own_cluster, m.chunks[0].id) >= 1
    bad_src.unlink()
    proc = subprocess.run(
        [sys.executable, "-c", READER, meta, "/faults/bad.bin", "/faults/good.bin",
         hashlib.sha256(good).hexdigest(), "15", short_circuit],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"reader exited {proc.returncode}: {proc.stderr[-3000:]}"
    assert proc.stdout.split() == ["StaleSource"], proc.stdout


# --------------------------------------------------------------------------- metadata service down


def test_reads_continue_from_the_nodes_while_the_metadata_service_is_down(own_cluster, tmp_path, monkeypatch):
    meta = own_cluster.meta_addr
    src = tmp_path / "m.bin"
    data = os.urandom(6 * CHUNK_SIZE + 777)
    src.write_bytes(data)
    run_cli("import", str(src), "/faults/m.bin", "--warm", meta=meta, check=True)
    monkeypatch.setattr(metaclient, "NODE_LIST_TTL", 0.0)  # every chunk finds the node list stale
    fs = SdcacheFileSystem(meta=meta, skip_instance_cache=True)
    fs.fetcher.short_circuit = False  # over HTTP, as from another host
    files = [fs.open("/faults/m.bin", "rb") for _ in range(4)]
    assert files[0].read(100) == data[:100]  # the client has seen the node list
    files[0].seek(0)
    src.unlink()  # the under-store cannot serve: only the nodes can

    def read_all() -> tuple[float, list[bytes | BaseException]]:
        out: list[bytes | BaseException] = [b""] * len(files)

        def reader(i: int) -> None:
            try:
                files[i].seek(0)
                out[i] = files[i].read()
            except BaseException as exc:  # reported by the assertion below
                out[i] = exc

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(len(files))]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - t0, out

    # Hung (SIGSTOP): the connection is open but no answer comes, so a node-list refresh waits for
    # its whole timeout. Readers must not wait behind it.
    own_cluster.meta.signal(signal.SIGSTOP)
    try:
        took, got = read_all()
    finally:
        own_cluster.meta.signal(signal.SIGCONT)
    assert all(g == data for g in got), [type(g).__name__ if isinstance(g, BaseException) else len(g) for g in got]
    # A reader blocked behind the refresh would wait its whole timeout (10 s).
    assert took < fs.meta.timeout / 2, f"readers waited {took:.1f}s behind a node-list refresh"

    # Gone (SIGKILL): every refresh fails at once; the last node list still serves.
    own_cluster.meta.signal(signal.SIGKILL)
    own_cluster.meta.proc.wait()
    took, got = read_all()
    assert all(g == data for g in got), [type(g).__name__ if isinstance(g, BaseException) else len(g) for g in got]
    assert took < fs.meta.timeout / 2
    for f in files:
        f.close()


# --------------------------------------------------------------------------- busy nodes (503 Overloaded)


class ChunkServer:
    """A real HTTP server on 127.0.0.1:0 speaking the node's chunk API (``GET /chunks/{id}``).

    While ``busy`` is above zero each request uses one up and gets what a node over its
    in-flight bound answers: 503, ``Retry-After``, ``{"error": "Overloaded", ...}``. Then
    requests get the chunk's bytes.
    """

    def __init__(self, chunks: dict[str, bytes], busy: int = 0, retry_after: str = "0.2") -> None:
        self.chunks, self.busy, self.retry_after = chunks, busy, retry_after
        self.requests = self.served = 0
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ChunkServer":
        self._thread.start()
        assert self._ready.wait(10), "chunk server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/chunks/{id}", self._get)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.address = f"127.0.0.1:{runner.addresses[0][1]}"
        return runner

    async def _get(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.busy > 0:
            self.busy -= 1
            return web.json_response({"error": "Overloaded", "message": "in-flight memory bound reached"},
                                     status=503, headers={"Retry-After": self.retry_after})
        data = self.chunks.get(request.match_info["id"])
        if data is None:
            return web.json_response({"error": "NotFound", "message": "not in this pool"}, status=404)
        self.served += 1
        return web.Response(body=data, content_type="application/octet-stream")


@contextmanager
def registered(meta: str, servers: list[ChunkServer]) -> Iterator[None]:
    """*servers* registered with the metadata service as cache nodes, heartbeating, over HTTP only."""
    client = MetaClient(meta)
    nodes = [pb.Node(node_id=f"fake{i}", address=s.address, capacity=1 << 30, role="memory")
             for i, s in enumerate(servers)]
    for n in nodes:
        client._call("RegisterNode", n)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.1):
            for n in nodes:
                try:
                    client._call("Heartbeat", pb.HeartbeatRequest(node_id=n.node_id), timeout=5)
                except errors.SdcacheError:
                    pass

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        client.close()


def _imported(cluster, tmp_path, size: int = 1 << 20) -> tuple[str, bytes, dict[str, bytes]]:
    src = tmp_path / "busy.bin"
    data = os.urandom(size)
    src.write_bytes(data)
    run_cli("import", str(src), "/busy/x.bin", meta=cluster.meta_addr, check=True)
    m = _manifest(cluster.meta_addr, "/busy/x.bin")
    return str(src), data, {c.id: data[c.offset : c.offset + c.length] for c in m.chunks}


def test_a_busy_node_is_waited_for_rather_than_read_around(make_cluster, tmp_path):
    c = make_cluster(nodes=0)
    src, data, chunks = _imported(c, tmp_path)
    os.unlink(src)  # only the node can serve
    with ChunkServer(chunks, busy=3) as node, registered(c.meta_addr, [node]):
        fs = SdcacheFileSystem(meta=c.meta_addr, skip_instance_cache=True)
        t0 = time.monotonic()
        assert fs.cat_file("/busy/x.bin") == data
        took = time.monotonic() - t0
    assert (node.requests, node.served) == (4, 1)  # three 503s, backed off, then served
    assert took < 3.0


def test_a_busy_owner_sends_the_reader_to_the_next_node_and_is_asked_again_soon(make_cluster, tmp_path):
    c = make_cluster(nodes=0)
    _, data, chunks = _imported(c, tmp_path)
    (chunk_id,) = chunks
    with ChunkServer(chunks) as a, ChunkServer(chunks) as b, registered(c.meta_addr, [a, b]):
        fs = SdcacheFileSystem(meta=c.meta_addr, skip_instance_cache=True)
        by_address = {a.address: a, b.address: b}
        order = [by_address[n.address] for n in rank(chunk_id, fs.meta.nodes(refresh=True))]
        owner, other = order
        owner.busy = 1
        t0 = time.monotonic()
        assert fs.cat_file("/busy/x.bin") == data
        assert time.monotonic() - t0 < 0.5  # the next node at once, no back-off sleep
        assert (owner.requests, owner.served, other.served) == (1, 0, 1)
        time.sleep(0.3)  # the owner's Retry-After (0.2 s) runs out
        assert fs.cat_file("/busy/x.bin") == data
        assert (owner.served, other.served) == (1, 1)  # back to the owner, not shunned for long


def test_when_every_node_stays_busy_the_reader_backs_off_then_reads_the_source(make_cluster, tmp_path):
    c = make_cluster(nodes=0)
    _, data, chunks = _imported(c, tmp_path)
    with ChunkServer(chunks, busy=10**9, retry_after="5") as node, registered(c.meta_addr, [node]):
        fs = SdcacheFileSystem(meta=c.meta_addr, skip_instance_cache=True)
        t0 = time.monotonic()
        assert fs.cat_file("/busy/x.bin") == data
        took = time.monotonic() - t0
    assert node.requests >= 3 and node.served == 0  # asked again, backing off, before the source
    assert took < 5.0  # Retry-After: 5 is capped
    assert fs.fetcher.tiers["under"] >= 1


# --------------------------------------------------------------------------- idle connections


def test_a_connection_the_node_closed_while_idle_is_reopened_not_failed_over(tmp_path, caplog):
    """A reader idle past the node's keep-alive timeout reads from the node again, not from the source."""
    import logging
    import shutil

    c = _make_cluster(str(tmp_path / "c"), 1, 1 << 30)
    c.node_args = ["--keepalive-timeout", "0.3"]
    with c:
        src, data, _ = _imported(c, tmp_path)
        fs = SdcacheFileSystem(meta=c.meta_addr, skip_instance_cache=True)
        fs.fetcher.short_circuit = False  # over HTTP, as from another host
        assert fs.cat_file("/busy/x.bin") == data  # the node reads it through from the source
        os.unlink(src)  # from now on only the node can serve: a fallback to the source fails the read
        served = fs.fetcher.tiers["node"]
        with caplog.at_level(logging.WARNING, logger="sdcache"):
            for _ in range(2):
                time.sleep(0.8)  # the node closes the kept-alive connections meanwhile
                assert fs.cat_file("/busy/x.bin") == data
    assert fs.fetcher.tiers["node"] == 3 * served and fs.fetcher.tiers["under"] == 0
    assert not [r for r in caplog.records if "failed, trying the next" in r.getMessage()]
    shutil.rmtree(c.pool_root, ignore_errors=True)


# --------------------------------------------------------------------------- a busy mount


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


@pytest.mark.fuse
def test_unmounting_a_mount_with_open_files_is_a_busy_error(make_cluster, tmp_path):
    from sdcache.client.fuse import main_umount

    c = make_cluster(nodes=1)
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(1000))
    run_cli("import", str(src), "/m/f.bin", meta=c.meta_addr, check=True)
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = run_cli("mount", str(mp), "--log", str(tmp_path / "mount.log"), meta=c.meta_addr)
    assert proc.returncode == 0, proc.stderr
    try:
        with open(mp / "m" / "f.bin", "rb") as f:
            assert f.read() == src.read_bytes()
            with pytest.raises(errors.Busy) as e:
                main_umount(argparse.Namespace(mountpoint=str(mp), lazy=False))
            assert e.value.errno == errno.EBUSY and isinstance(e.value, OSError)
            assert "--lazy" in str(e.value)
            proc = run_cli("umount", str(mp))
            assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
            assert os.path.ismount(mp)
        proc = run_cli("umount", str(mp))  # closed: now it goes
        assert proc.returncode == 0, proc.stderr
        assert not os.path.ismount(mp)
    finally:
        if _mounted(str(mp)):
            run_cli("umount", "--lazy", str(mp))
