"""Client behaviour under faults: a failing chunk, a dead metadata service, busy nodes, a busy mount.

Real clusters (``own_cluster``, ``make_cluster``), the real fsspec client, the
real CLI; the busy node is a real HTTP server speaking the node's chunk API.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from sdcache import errors
from sdcache.chunking import CHUNK_SIZE
from sdcache.client import metaclient
from sdcache.client.fs import SdcacheFileSystem
from sdcache.client.metaclient import MetaClient
from sdcache.pool_layout import chunk_path

from .conftest import run_cli


def _corrupt_everywhere(cluster, chunk_id: str) -> int:
    """Flip the first byte of *chunk_id* in every node pool that holds it; how many copies."""
    flipped = 0
    for i in range(len(cluster.node_children)):
        p = chunk_path(os.path.join(cluster.pool_root, f"node{i}"), chunk_id)
        if os.path.exists(p):
            with open(p, "r+b") as f:
                b = f.read(1)
                f.seek(0)
                f.write(bytes([b[0] ^ 0xFF]))
            flipped += 1
    return flipped


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
    m = MetaClient(meta).manifest("/faults/bad.bin")
    assert len(m.chunks) == 20
    # The first chunk goes bad everywhere: every pool copy corrupt, the source gone. It fails
    # fast while the other 19 are still being fetched into the same buffer.
    assert _corrupt_everywhere(own_cluster, m.chunks[0].id) >= 1
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
    assert took < min(3.0, fs.meta.timeout / 2), f"readers waited {took:.1f}s behind a node-list refresh"

    # Gone (SIGKILL): every refresh fails at once; the last node list still serves.
    own_cluster.meta.signal(signal.SIGKILL)
    own_cluster.meta.proc.wait()
    took, got = read_all()
    assert all(g == data for g in got), [type(g).__name__ if isinstance(g, BaseException) else len(g) for g in got]
    assert took < 3.0
    for f in files:
        f.close()
