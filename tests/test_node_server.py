"""The cache node as users meet it: a real ``sdcache node`` subprocess serving the chunk API.

Its pool, read-through, eviction, warm-up and registration. Everything around
it is real too (``tests/_node_helpers.py``): a metadata service that the node
registers with and reads committed manifests from, files committed by the real
importer, and under-stores that are local files, a local HTTP server that
counts (and can hold) the range requests it answers, and a moto S3 server.
The trust boundary (probes, tokens, bounds) is ``tests/test_node_trust.py``.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import uuid

from sdcache import errors, pool_layout
from sdcache.hostid import host_id

from ._node_helpers import (  # noqa: F401 - http_store, meta, nodes, ns and own_meta are fixtures
    CHUNK,
    DEADLINE,
    KB,
    NODE_CMD,
    NODE_TOKEN,
    Meta,
    error_of,
    http_store,
    meta,
    nodes,
    ns,
    own_meta,
    randbytes,
)
from .conftest import ADMIN_TOKEN, AWS_ENV, wait_for


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


# --------------------------------------------------------------------------- one under-store read per chunk


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
