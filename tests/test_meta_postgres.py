"""Several metadata services over one PostgreSQL: one namespace, durability, failover, clear errors.

Everything is real: a PostgreSQL server the tests start (``tests/_postgres.py``),
``sdcache meta --db ...`` subprocesses on port 0 (``tests/_meta_process.py``),
a ``sdcache node`` subprocess given both addresses, the fsspec client and the CLI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sdcache import errors
from sdcache._proto import meta_pb2 as pb
from sdcache.client.fs import SdcacheFileSystem
from sdcache.client.importer import import_file
from sdcache.client.metaclient import MetaClient
from sdcache.cluster import Child

from ._meta_process import CALL, MetaProcess, commit, poll, rpc_error, wire_manifest
from ._postgres import USER, PostgresServer, pg_url, postgres_server  # noqa: F401 - fixtures
from .conftest import mint_token, run_cli

HEARTBEAT = "0.3"  # seconds, --heartbeat-interval of the test services
NODE_TOKEN = mint_token("node", "pg-test-node")


def _start(tmp_path: Path, name: str, url: str, *args: str) -> MetaProcess:
    return MetaProcess(tmp_path / name, "--db", url, "--heartbeat-interval", HEARTBEAT, *args)


@pytest.fixture
def pair(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[MetaProcess, MetaProcess]]:
    """Two services over one fresh database: *a* told by ``--db``, *b* by ``$SDCACHE_DB``."""
    a = _start(tmp_path, "a", pg_url)
    monkeypatch.setenv("SDCACHE_DB", pg_url)
    try:
        b = MetaProcess(tmp_path / "b", "--heartbeat-interval", HEARTBEAT)
    except BaseException:
        a.kill()
        raise
    monkeypatch.delenv("SDCACHE_DB")
    yield a, b
    for service in (a, b):
        if service.proc.poll() is None:
            assert service.stop() == 0


def _names(stub, path: str) -> list[str]:
    return [e.path for e in stub.List(pb.ListRequest(path=path, page_size=10_000), timeout=CALL).entries]


def test_two_services_over_one_database_serve_one_namespace(pair, tmp_path):
    a, b = pair
    # One admin token bootstrap for the shared store: the first service wrote it, the second found it issued.
    assert (tmp_path / "a" / "admin.token").exists() and not (tmp_path / "b" / "admin.token").exists()

    g1 = commit(a.stub, wire_manifest("/ns/one.bin", os.urandom(3000)))  # three distinct chunks
    entry = b.stub.Stat(pb.PathRequest(path="/ns/one.bin"), timeout=CALL)
    assert (entry.size, entry.generation) == (3000, g1)
    g2 = commit(b.stub, wire_manifest("/ns/two.bin", b"2" * 10))
    assert g2 > g1 and _names(a.stub, "/ns") == ["/ns/one.bin", "/ns/two.bin"]
    assert b.stub.Delete(pb.DeleteRequest(path="/ns/two.bin"), timeout=CALL).deleted == 1
    assert rpc_error(lambda: a.stub.Stat(pb.PathRequest(path="/ns/two.bin"), timeout=CALL)).code() == \
        grpc.StatusCode.NOT_FOUND

    # pins: pinned through one, the other serves the same generation and ids
    assert a.stub.Pin(pb.PinRequest(path="/ns/one.bin"), timeout=CALL).files == 1
    from_a = a.stub.PinnedChunks(pb.PinnedChunksRequest(), timeout=CALL)
    from_b = b.stub.PinnedChunks(pb.PinnedChunksRequest(), timeout=CALL)
    assert (from_a.generation, from_a.ids) == (from_b.generation, from_b.ids) and len(from_b.ids) == 3 * 16

    # the node registry: registered through one, live and heartbeating through the other
    node = a.stub_for(NODE_TOKEN)
    node.RegisterNode(pb.Node(node_id="n1", address="127.0.0.1:9", capacity=1 << 20), timeout=CALL)
    assert b.stub_for(NODE_TOKEN).Heartbeat(pb.HeartbeatRequest(node_id="n1", used=5), timeout=CALL).known
    listed = b.stub.ListNodes(pb.NodesRequest(), timeout=CALL).nodes
    assert [(n.node_id, n.alive, n.used) for n in listed] == [("n1", True, 5)]

    # tokens: issued through one, good at the other; revoked through one, refused by the other soon after
    reader = a.stub.CreateToken(pb.CreateTokenRequest(name="pg-reader", role="read"), timeout=CALL).token
    b.stub_for(reader).Stat(pb.PathRequest(path="/ns"), timeout=CALL)
    a.stub.RevokeToken(pb.RevokeTokenRequest(name="pg-reader"), timeout=CALL)
    assert rpc_error(lambda: a.stub_for(reader).Stat(pb.PathRequest(path="/ns"), timeout=CALL)).code() == \
        grpc.StatusCode.UNAUTHENTICATED  # at once where it was revoked
    t0 = time.monotonic()
    stub = b.stub_for(reader)

    def refused() -> bool:
        try:
            stub.Stat(pb.PathRequest(path="/ns"), timeout=CALL)
            return False
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
            return True

    assert poll(refused, 10.0), "the other service kept accepting a revoked token"
    assert time.monotonic() - t0 < 10 * float(HEARTBEAT)  # within a few of its poll intervals


def test_acknowledged_commits_survive_kill_9_of_both_services_and_the_database(tmp_path, postgres_server, pg_url):
    a, b = _start(tmp_path, "a", pg_url), _start(tmp_path, "b", pg_url)
    acked: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    enough = threading.Semaphore(0)

    def writer(service: MetaProcess, name: str) -> None:
        stub = service.stub
        for i in range(10_000):
            if stop.is_set():
                return
            path = f"/durable/{name}/{i:05d}.bin"
            try:
                generation = commit(stub, wire_manifest(path, f"{name}{i}".encode() * 50))
            except grpc.RpcError:
                return  # the service or the database died: this commit was never acknowledged
            with lock:
                acked[path] = generation
            if i == 25:
                enough.release()

    threads = [threading.Thread(target=writer, args=(s, n)) for s, n in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    try:
        assert enough.acquire(timeout=60) and enough.acquire(timeout=60), "the writers did not get going"
        b.stub.Pin(pb.PinRequest(path="/durable/a/00000.bin"), timeout=CALL)
        # The crash, while both writers still commit: the database first, then both services.
        postgres_server.kill()
        a.proc.send_signal(signal.SIGKILL)
        b.proc.send_signal(signal.SIGKILL)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        a.kill()
        b.kill()
    assert len(acked) >= 52

    postgres_server.start()
    a2, b2 = _start(tmp_path, "a2", pg_url), _start(tmp_path, "b2", pg_url)
    try:
        for service in (a2, b2):
            present = {}
            for name in ("a", "b"):
                reply = service.stub.List(pb.ListRequest(path=f"/durable/{name}", page_size=10_000), timeout=CALL)
                present.update({e.path: e.generation for e in reply.entries})
            lost = {p: g for p, g in acked.items() if present.get(p) != g}
            assert not lost, f"{len(lost)} acknowledged commits lost or changed, e.g. {sorted(lost)[:3]}"
            assert service.stub.Stats(pb.StatsRequest(), timeout=CALL).pinned_files == 1
        assert commit(a2.stub, wire_manifest("/durable/after.bin", b"x")) > max(acked.values())
    finally:
        for service in (a2, b2):
            assert service.stop() == 0


def test_a_client_given_both_addresses_keeps_reading_when_one_is_killed(tmp_path, pg_url):
    a, b = _start(tmp_path, "a", pg_url), _start(tmp_path, "b", pg_url)
    both = f"{a.address},{b.address}"
    pool = tempfile.mkdtemp(prefix="sdcache-test-pg-pool-", dir="/dev/shm")
    node = Child("node", [sys.executable, "-m", "sdcache", "node", "--meta", both, "--listen", "127.0.0.1:0",
                          "--capacity", "64MiB", "--pool-dir", pool, "--node-id", "n1",
                          "--ready-file", str(tmp_path / "node.ready")],
                 str(tmp_path / "node.ready"), str(tmp_path / "node.log"))
    client = None
    try:
        node.start({**os.environ, "SDCACHE_TOKEN": NODE_TOKEN})
        node.wait_ready()
        client = MetaClient(both)
        assert poll(lambda: len(client.nodes(refresh=True)) == 1, 30), node.log_tail()
        sources = {}
        for name in ("one", "two"):
            data = os.urandom(5 << 20)  # two chunks each
            (tmp_path / f"{name}.bin").write_bytes(data)
            import_file(client, str(tmp_path / f"{name}.bin"), f"/ha/{name}.bin")
            sources[name] = hashlib.sha256(data).hexdigest()
        fs = SdcacheFileSystem(meta=both, skip_instance_cache=True)
        fs.fetcher.short_circuit = False  # through the node's HTTP API
        assert hashlib.sha256(fs.cat_file("/ha/one.bin")).hexdigest() == sources["one"]

        killed_at = time.time()
        a.kill()
        # A file nobody read yet: the client's manifest and the node's confined read-through
        # (GetManifest with its own token) both have to reach the surviving service.
        assert hashlib.sha256(fs.cat_file("/ha/two.bin")).hexdigest() == sources["two"]
        assert fs.info("/ha/one.bin")["size"] == 5 << 20 and len(fs.ls("/ha")) == 2
        proc = run_cli("stat", "/ha/two.bin", env={"SDCACHE_META": both})
        assert proc.returncode == 0 and "two.bin" in proc.stdout, proc.stderr
        # The node moved its heartbeats to the survivor, so it stays live there.
        assert poll(lambda: any(n.last_seen > killed_at + 3 * float(HEARTBEAT) and n.alive
                                for n in b.stub.ListNodes(pb.NodesRequest(), timeout=CALL).nodes), 15), \
            node.log_tail()
    finally:
        if client is not None:
            client.close()
        node.stop()
        shutil.rmtree(pool, ignore_errors=True)
        a.kill()
        assert b.stop() == 0


# --------------------------------------------------------------------------- clear errors


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_misconfigured_database_url_is_one_line_naming_the_wrong_part(postgres_server, pg_url, tmp_path):
    from sdcache.store import open_store
    from sdcache.store.postgres import PostgresStore

    db = pg_url.rsplit("/", 1)[1]
    port = _free_port()
    cases = [
        (postgres_server.url(db, port=port), errors.Unavailable, [f"127.0.0.1:{port}", "connection refused"]),
        (f"postgresql://{USER}:pw@no-such-host.invalid:5432/{db}", errors.Unavailable,
         ["no-such-host.invalid", "does not resolve"]),
        (postgres_server.url(db, password="wrong-secret"), errors.Unauthenticated, [f"user '{USER}'", "password"]),
        (postgres_server.url("no_such_db"), errors.NotFound, ["'no_such_db'", "createdb"]),
    ]
    for url, kind, words in cases:
        with pytest.raises(kind) as info:
            PostgresStore(url)
        message = str(info.value)
        assert "\n" not in message and all(w in message for w in words), message
        assert postgres_server.password not in message and "wrong-secret" not in message
    with pytest.raises(errors.InvalidArgument) as info:
        open_store("mysql://root:hunter2@db/x", "unused.db")
    assert "postgresql://" in str(info.value) and "hunter2" not in str(info.value)

    # The command: one line on stderr, exit status 1, no traceback, no password.
    proc = run_cli("meta", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0",
                   "--db", postgres_server.url(db, password="wrong-secret"))
    assert proc.returncode == 1 and proc.stderr.startswith("sdcache meta: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "wrong-secret" not in proc.stderr, proc.stderr
