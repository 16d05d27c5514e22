"""The node's trust boundary, as users meet it: a real ``sdcache node`` subprocess serving the chunk API.

A reader may get only chunks of committed files, read from exactly the byte
ranges their manifests name: no probing of files the node can read, no
chunk of one file through another's path, no credit to a path that does not
hold a hit. Tokens and roles are checked on every route; bytes held for
requests are bounded; a node without a metadata service runs open only when
told to. The metadata service, files, node and HTTP under-store are those of
``tests/_node_helpers.py``.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import subprocess
import uuid
from urllib.parse import urlencode

import xxhash
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sdcache import auth, errors

from ._node_helpers import (  # noqa: F401 - http_store, meta, nodes and ns are fixtures
    CHUNK,
    DEADLINE,
    KB,
    NODE_CMD,
    NODE_TOKEN,
    READ_TOKEN,
    Node,
    error_of,
    http_store,
    meta,
    nodes,
    ns,
    randbytes,
)
from .conftest import ADMIN_TOKEN, wait_for


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


# --------------------------------------------------------------------------- bytes in flight


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


# --------------------------------------------------------------------------- a node without a metadata service


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
