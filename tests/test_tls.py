"""TLS and mutual TLS on real servers: a one-host cluster whose metadata service and nodes run
``--tls-cert/--tls-key/--tls-ca``, and clients (fsspec, the CLI, raw HTTP) that do or do not hold the
right CA and client certificate. The certificates are made here, at run time (``tests/_pki.py``).

Every read that must prove HTTPS works runs with ``SDCACHE_SHORT_CIRCUIT=0`` (else the client
reads the same-host pools straight from shared memory) and with the source file deleted after
warm-up, so no fallback to the under-store can hide a broken HTTPS path; the fetcher's ``tiers``
counter and the nodes' ``bytes_served`` say who served.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from sdcache import errors
from sdcache.chunking import CHUNK_SIZE
from sdcache.client.fs import SdcacheFileSystem
from sdcache.client.importer import import_file
from sdcache.client.metaclient import MetaClient
from sdcache.cluster import Child, LocalCluster
from sdcache.tls import Credentials, TlsFiles

from ._pki import Pki, make_pki
from .conftest import ADMIN_TOKEN, TOKEN_KEY, run_cli

FILE_SIZE = 5 * CHUNK_SIZE + 12345  # six chunks, the last one short


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA, which signed nothing the cluster presents."""
    return make_pki(tmp_path_factory.mktemp("stranger"), "stranger CA")


def _server_flags(pki: Pki, *, mutual: bool) -> list[str]:
    flags = ["--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-ca", pki.ca]
    return [*flags, "--tls-require-client-cert"] if mutual else flags


def _start(tmp: Path, pki: Pki, *, mutual: bool) -> Iterator[LocalCluster]:
    env = {"SDCACHE_TLS_CA": pki.ca}
    if mutual:  # the cluster's own calls (tokens, waiting for nodes) present a client certificate
        env.update(SDCACHE_TLS_CERT=pki.client_cert, SDCACHE_TLS_KEY=pki.client_key)
    flags = _server_flags(pki, mutual=mutual)
    c = LocalCluster(str(tmp / "meta"), nodes=2, capacity=256 << 20, heartbeat_interval=0.3,
                     pool_root=tempfile.mkdtemp(prefix="sdcache-test-pool-", dir="/dev/shm"), env=env,
                     token_key=TOKEN_KEY, meta_args=flags, node_args=flags)
    try:
        c.start()
        yield c
    finally:
        c.stop()  # also after a failed start: no child outlives the module
        shutil.rmtree(c.pool_root, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[LocalCluster]:
    """Metadata service and two nodes on TLS; clients need only the CA."""
    yield from _start(tmp_path_factory.mktemp("tls"), pki, mutual=False)


@pytest.fixture(scope="module")
def mtls_cluster(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[LocalCluster]:
    """Metadata service and two nodes that refuse clients without a certificate signed by the CA."""
    yield from _start(tmp_path_factory.mktemp("mtls"), pki, mutual=True)


@pytest.fixture
def network_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks over HTTPS even though the nodes' pools are on this host (here and in CLI subprocesses)."""
    monkeypatch.setenv("SDCACHE_SHORT_CIRCUIT", "0")
    for var in ("SDCACHE_TLS_CA", "SDCACHE_TLS_CERT", "SDCACHE_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)


def _source(tmp_path: Path, name: str) -> tuple[Path, bytes]:
    data = os.urandom(FILE_SIZE)
    src = tmp_path / name
    src.write_bytes(data)
    return src, data


def _https(address: str, ctx: ssl.SSLContext, path: str = "/stats") -> tuple[int, bytes]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=ctx)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _served(cluster: LocalCluster, tls: TlsFiles) -> int:
    """Chunk bytes the cluster's nodes have sent over HTTP(S), asked over HTTPS."""
    total = 0
    for child in cluster.node_children:
        status, body = _https(child.address, tls.client_context())
        assert status == 200, body
        total += json.loads(body)["bytes_served"]
    return total


def _cli_bytes(meta: str, *args: str) -> bytes:
    """stdout of the real ``sdcache`` command line, as bytes (``cat``)."""
    proc = subprocess.run([sys.executable, "-m", "sdcache", "--meta", meta, *args], capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def _one_line_error(proc) -> str:
    assert proc.returncode != 0, proc.stdout[:200]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sdcache: error:"), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- TLS, server certificates only


def test_import_warm_and_read_over_https(tls_cluster, pki, tmp_path, network_reads):
    src, data = _source(tmp_path, "model.bin")
    meta = tls_cluster.meta_addr
    imported = run_cli("--tls-ca", pki.ca, "import", str(src), "/tls/model.bin", "--warm", "-q", meta=meta)
    assert imported.returncode == 0, imported.stderr
    src.unlink()  # from here on only the nodes hold the bytes: a failed HTTPS read cannot fall back

    # stat's "cached" asks each node over HTTPS (POST /has)
    stat = run_cli("--tls-ca", pki.ca, "stat", "--json", "/tls/model.bin", meta=meta, check=True)
    info = json.loads(stat.stdout)
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["cached"] == 1.0

    served = _served(tls_cluster, TlsFiles(ca=pki.ca))
    fs = fsspec.filesystem("sdcache", meta=meta, tls_ca=pki.ca, skip_instance_cache=True)
    before = dict(fs.fetcher.tiers)
    with fs.open("/tls/model.bin", "rb") as f:
        assert f.read() == data
    got = {k: v - before.get(k, 0) for k, v in fs.fetcher.tiers.items()}
    assert got.get("node", 0) >= info["chunks"] and not got.get("local") and not got.get("under"), got
    assert _served(tls_cluster, TlsFiles(ca=pki.ca)) - served >= FILE_SIZE

    assert _cli_bytes(meta, "--tls-ca", pki.ca, "cat", "/tls/model.bin") == data
    assert _served(tls_cluster, TlsFiles(ca=pki.ca)) - served >= 2 * FILE_SIZE  # the CLI read over HTTPS too


def test_plaintext_client_of_a_tls_service_gets_one_clear_error(tls_cluster, network_reads):
    client = MetaClient(tls_cluster.meta_addr, credentials=Credentials(ADMIN_TOKEN, None))
    try:
        with pytest.raises(errors.Unavailable) as info:
            client.stat("/")
    finally:
        client.close()
    assert tls_cluster.meta_addr in str(info.value) and "plaintext" in str(info.value)

    line = _one_line_error(run_cli("ls", "/", meta=tls_cluster.meta_addr))
    assert "unreachable over plaintext" in line


def test_plain_http_to_a_tls_node_fails(tls_cluster, pki):
    host, _, port = tls_cluster.node_children[0].address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/healthz")
            conn.getresponse().read()
    finally:
        conn.close()
    # the same node answers over HTTPS
    assert _https(tls_cluster.node_children[0].address, TlsFiles(ca=pki.ca).client_context(), "/healthz") == (
        200, b"ok")


def test_a_ca_that_did_not_sign_the_server_fails_verification(tls_cluster, stranger, network_reads):
    client = MetaClient(tls_cluster.meta_addr, credentials=Credentials(ADMIN_TOKEN, TlsFiles(ca=stranger.ca)))
    try:
        with pytest.raises(errors.Unavailable) as info:
            client.stat("/")
    finally:
        client.close()
    assert "over TLS" in str(info.value)

    with pytest.raises(ssl.SSLCertVerificationError):
        _https(tls_cluster.node_children[0].address, TlsFiles(ca=stranger.ca).client_context(), "/healthz")

    line = _one_line_error(run_cli("--tls-ca", stranger.ca, "ls", "/", meta=tls_cluster.meta_addr))
    assert "unreachable over TLS" in line


# --------------------------------------------------------------------------- mutual TLS


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_cluster, pki, stranger, network_reads):
    for tls in (TlsFiles(ca=pki.ca), TlsFiles(ca=pki.ca, cert=stranger.client_cert, key=stranger.client_key)):
        client = MetaClient(mtls_cluster.meta_addr, credentials=Credentials(ADMIN_TOKEN, tls))
        try:
            with pytest.raises(errors.Unavailable):
                client.stat("/")
        finally:
            client.close()
        # the nodes refuse the handshake too, token or not
        with pytest.raises((ssl.SSLError, http.client.HTTPException, ConnectionError)):
            _https(mtls_cluster.node_children[0].address, tls.client_context(), "/healthz")

    line = _one_line_error(run_cli("--tls-ca", pki.ca, "ls", "/", meta=mtls_cluster.meta_addr))
    assert "unreachable over TLS" in line


def test_mutual_tls_client_with_a_certificate_works_end_to_end(mtls_cluster, pki, tmp_path, network_reads):
    src, data = _source(tmp_path, "lora.bin")
    mine = TlsFiles(cert=pki.client_cert, key=pki.client_key, ca=pki.ca)
    meta = MetaClient(mtls_cluster.meta_addr, credentials=Credentials(ADMIN_TOKEN, mine))
    try:
        m = import_file(meta, str(src), "/mtls/lora.bin").manifest
        progress = list(meta.warmup(["/mtls/lora.bin"]))
    finally:
        meta.close()
    assert progress[-1].done and progress[-1].done_bytes == FILE_SIZE
    src.unlink()

    served = _served(mtls_cluster, mine)
    fs = SdcacheFileSystem(meta=mtls_cluster.meta_addr, tls_ca=pki.ca, tls_cert=pki.client_cert,
                           tls_key=pki.client_key, skip_instance_cache=True)
    before = dict(fs.fetcher.tiers)
    assert fs.cat_file("/mtls/lora.bin") == data
    got = {k: v - before.get(k, 0) for k, v in fs.fetcher.tiers.items()}
    assert got.get("node", 0) >= len(m.chunks) and not got.get("local") and not got.get("under"), got
    assert _served(mtls_cluster, mine) - served >= FILE_SIZE

    cat = _cli_bytes(mtls_cluster.meta_addr, "--tls-ca", pki.ca, "--tls-cert", pki.client_cert,
                     "--tls-key", pki.client_key, "cat", "/mtls/lora.bin")
    assert cat == data
    assert _served(mtls_cluster, mine) - served >= 2 * FILE_SIZE  # the CLI read over HTTPS too


# --------------------------------------------------------------------------- names


def test_a_certificate_for_another_name_is_refused(pki, tmp_path):
    """Signed by the right CA but for elsewhere.invalid: clients check the name, not only the signature."""
    wrong = ["--tls-cert", pki.elsewhere_cert, "--tls-key", pki.elsewhere_key]
    meta = Child("metadata service", [sys.executable, "-m", "sdcache", "meta", "--data", str(tmp_path / "meta"),
                                      "--listen", "127.0.0.1:0", "--insecure-no-auth", *wrong,
                                      "--ready-file", str(tmp_path / "meta.ready")],
                 str(tmp_path / "meta.ready"), str(tmp_path / "meta.log"))
    node = Child("node", [sys.executable, "-m", "sdcache", "node", "--meta", "none", "--insecure-no-auth",
                          "--capacity", "64MiB", "--pool-dir", str(tmp_path / "pool"), "--node-id", "wrong-name",
                          *wrong, "--ready-file", str(tmp_path / "node.ready")],
                 str(tmp_path / "node.ready"), str(tmp_path / "node.log"))
    try:
        for child in (meta, node):
            child.start(dict(os.environ))
        for child in (meta, node):
            child.wait_ready()
        client = MetaClient(meta.address, credentials=Credentials(None, TlsFiles(ca=pki.ca)))
        try:
            with pytest.raises(errors.Unavailable, match="over TLS"):
                client.stat("/")
        finally:
            client.close()
        with pytest.raises(ssl.SSLCertVerificationError, match="[Hh]ostname|IP address mismatch"):
            _https(node.address, TlsFiles(ca=pki.ca).client_context(), "/healthz")
    finally:
        node.stop()
        meta.stop()


def test_the_dns_name_in_the_certificate_works_too(tls_cluster, pki, network_reads):
    port = tls_cluster.meta_addr.rpartition(":")[2]
    client = MetaClient(f"localhost:{port}", credentials=Credentials(ADMIN_TOKEN, TlsFiles(ca=pki.ca)))
    try:
        assert {n.address for n in client.nodes(refresh=True)} == {c.address for c in tls_cluster.node_children}
    finally:
        client.close()
