"""The trust boundary at the metadata service, against real servers.

Tokens, roles, revocation (at the service and at a node), the admin token a
fresh service writes, ``sdcache token``, ``--insecure-no-auth``, and hostile
gRPC messages. Every service here is a real ``sdcache meta`` subprocess; the
nodes are real ``sdcache node`` subprocesses (``conftest.make_cluster``).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sdcache import auth
from sdcache._proto import meta_pb2 as pb
from sdcache._proto import meta_pb2_grpc
from sdcache.cluster import LocalCluster
from sdcache.hashing import chunk_id
from sdcache.meta import grpcauth
from sdcache.meta.grpcauth import SERVICE
from sdcache.tls import Credentials

from ._meta_process import CALL, MetaProcess, commit, poll, rpc_error, trailer, wire_manifest
from .conftest import ADMIN_TOKEN, mint_token, run_cli

HEARTBEAT = 0.3  # conftest's clusters
AS_ADMIN: dict[str, str | None] = {"SDCACHE_TOKEN": ADMIN_TOKEN, "SDCACHE_TOKEN_FILE": None}
REVOKE_BOUND = 2 * HEARTBEAT + 1.0  # seconds until a node refuses a revoked token (docs/SECURITY.md)


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetaProcess]:
    """One service (the suite's signing key) for the token and role tests."""
    m = MetaProcess(tmp_path_factory.mktemp("auth") / "data")
    commit(m.stub, wire_manifest("/auth/f", b"f" * 2500))
    yield m
    assert m.stop() == 0, m.log()


@pytest.fixture
def start_meta() -> Iterator[Callable[..., MetaProcess]]:
    """Start services of one's own (``MetaProcess`` arguments); all stopped at the end."""
    started: list[MetaProcess] = []

    def start(data: Path, *args: str, **kwargs: Any) -> MetaProcess:
        started.append(MetaProcess(data, *args, **kwargs))
        return started[-1]

    yield start
    for m in started:
        if m.proc.poll() is None:
            assert m.stop() == 0, m.log()


def _stat(stub: meta_pb2_grpc.MetaStub) -> pb.Entry:
    return stub.Stat(pb.PathRequest(path="/auth/f"), timeout=CALL)


def _refusal(stub: meta_pb2_grpc.MetaStub) -> grpc.RpcError:
    return rpc_error(lambda: _stat(stub))


def _flip(token: str, at: int) -> str:
    """*token* with the character at *at* changed (to another base64url one)."""
    return token[:at] + ("A" if token[at] != "A" else "B") + token[at + 1 :]


# -- the admin token of a fresh service ------------------------------------------


def test_first_start_writes_an_admin_token_and_key_once(start_meta: Callable[..., MetaProcess],
                                                       tmp_path: Path) -> None:
    data = tmp_path / "fresh"
    first = start_meta(data, token_key=None, token=None, entry=("-m", "sdcache", "meta"))
    token_file, key_file = data / "admin.token", data / "token.key"
    for f in (token_file, key_file):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    log = first.log()
    assert f"wrote an admin token to {token_file} (mode 0600)" in log
    assert f"created token signing key {key_file}" in log
    token = token_file.read_text().strip()
    assert token.startswith(f"{auth.PREFIX}.") and token_file.read_text() == token + "\n"

    admin = first.stub_for(token)
    commit(admin, wire_manifest("/x", b"x"))
    made = admin.CreateToken(pb.CreateTokenRequest(name="reader", role="read"), timeout=CALL)
    names = {t.name: t.role for t in admin.ListTokens(pb.ListTokensRequest(), timeout=CALL).tokens}
    assert names == {"admin": "admin", "reader": "read"}
    assert first.stop() == 0
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in (token_file, key_file)}

    second = start_meta(data, token_key=None, token=token, entry=("-m", "sdcache", "meta"))
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in (token_file, key_file)} == before
    assert second.log().count("wrote an admin token") == 1  # the first start's line only
    assert second.stub.Stat(pb.PathRequest(path="/x"), timeout=CALL).size == 1  # same key: still good
    assert second.stub_for(made.token).Stat(pb.PathRequest(path="/x"), timeout=CALL).size == 1
    assert second.stop() == 0


# -- tokens that are refused ------------------------------------------------------


def test_no_token_is_unauthenticated(meta: MetaProcess) -> None:
    for stub in (meta.stub_for(None), meta.stub_for("")):
        err = _refusal(stub)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and trailer(err) == "Unauthenticated"
        assert "no token" in err.details() and "Authorization: Bearer" in err.details()
    # another scheme is no bearer token either
    err = rpc_error(lambda: meta.stub_for(None).Stat(pb.PathRequest(path="/auth/f"), timeout=CALL,
                                                     metadata=(("authorization", f"Basic {ADMIN_TOKEN}"),)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "no token" in err.details()


def test_a_tampered_token_is_unauthenticated(meta: MetaProcess) -> None:
    good = mint_token("read", "tamper-me")
    assert _stat(meta.stub_for(good)).size == 2500
    prefix, payload, signature = good.split(".")
    in_signature = _flip(good, len(prefix) + len(payload) + 2 + len(signature) // 2)
    in_payload = _flip(good, len(prefix) + 1 + len(payload) // 2)
    doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    doc["r"] = "admin"  # a read token that says it is admin: the signature no longer matches
    raised = base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).rstrip(b"=").decode()
    for bad in (in_signature, in_payload, f"{prefix}.{raised}.{signature}", good[:-10], "sdc1.x.y", "x" * 2000):
        err = _refusal(meta.stub_for(bad))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (bad, err.details())
    err = _refusal(meta.stub_for(in_signature))
    assert "signature does not verify" in err.details()
    err = _refusal(meta.stub_for(f"{prefix}.{raised}.{signature}"))
    assert "signature does not verify" in err.details()
    assert _stat(meta.stub_for(good)).size == 2500  # the original is still good


def test_an_expired_token_is_unauthenticated(meta: MetaProcess) -> None:
    # mint early in a second, so the 1 s token lives long enough to be used once
    assert poll(lambda: time.time() % 1 < 0.3, 2.0, step=0.01)
    token = mint_token("read", "short-lived", ttl=1)
    stub = meta.stub_for(token)
    assert _stat(stub).size == 2500
    errors: list[grpc.RpcError] = []

    def expired() -> bool:
        try:
            _stat(stub)
        except grpc.RpcError as exc:
            errors.append(exc)
            return True
        return False

    assert poll(expired, 5.0)
    assert errors[-1].code() == grpc.StatusCode.UNAUTHENTICATED
    assert "'short-lived' expired at" in errors[-1].details()


def test_a_token_of_another_key_is_unauthenticated(meta: MetaProcess) -> None:
    stranger = auth.mint(Ed25519PrivateKey.generate(), "stranger", "admin")
    err = _refusal(meta.stub_for(stranger))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown key" in err.details()


# -- roles ------------------------------------------------------------------------

Call = Callable[[meta_pb2_grpc.MetaStub], Any]

#: One harmless call of every method; ordered so that registering a fake node
#: (RegisterNode) comes after the calls that would try to reach it.
CALLS: dict[str, Call] = {
    "Stat": _stat,
    "GetManifest": lambda s: s.GetManifest(pb.PathRequest(path="/auth/f"), timeout=CALL),
    "List": lambda s: s.List(pb.ListRequest(path="/auth"), timeout=CALL),
    "ListNodes": lambda s: s.ListNodes(pb.NodesRequest(), timeout=CALL),
    "Stats": lambda s: s.Stats(pb.StatsRequest(), timeout=CALL),
    "GetConfig": lambda s: s.GetConfig(pb.ConfigRequest(), timeout=CALL),
    "GetReplicas": lambda s: s.GetReplicas(pb.ReplicasRequest(path="/auth"), timeout=CALL),
    "SetReplicas": lambda s: s.SetReplicas(pb.ReplicaRule(path="/auth/admin", replicas=1), timeout=CALL),
    "Commit": lambda s: commit(s, wire_manifest("/auth/admin/c", b"c")),
    "Pin": lambda s: s.Pin(pb.PinRequest(path="/auth/f"), timeout=CALL),
    "Unpin": lambda s: s.Unpin(pb.PinRequest(path="/auth/f"), timeout=CALL),
    "Warmup": lambda s: list(s.Warmup(pb.WarmupRequest(paths=["/auth/f"], check=True), timeout=CALL)),
    "Evict": lambda s: s.Evict(pb.EvictRequest(paths=["/auth/f"]), timeout=CALL),
    "Delete": lambda s: s.Delete(pb.DeleteRequest(path="/auth/admin/c"), timeout=CALL),
    "CreateToken": lambda s: s.CreateToken(pb.CreateTokenRequest(role="read"), timeout=CALL),
    "ListTokens": lambda s: s.ListTokens(pb.ListTokensRequest(), timeout=CALL),
    "RevokeToken": lambda s: s.RevokeToken(pb.RevokeTokenRequest(name="never-issued"), timeout=CALL),
    "RegisterNode": lambda s: s.RegisterNode(pb.Node(node_id="fake", address="127.0.0.1:1", capacity=1), timeout=CALL),
    "Heartbeat": lambda s: s.Heartbeat(pb.HeartbeatRequest(node_id="fake"), timeout=CALL),
    "PinnedChunks": lambda s: s.PinnedChunks(pb.PinnedChunksRequest(), timeout=CALL),
    "AuthState": lambda s: s.AuthState(pb.AuthStateRequest(), timeout=CALL),
    "ReportRunner": lambda s: s.ReportRunner(pb.RunnerReport(runner_id="r1", address="127.0.0.1:9", state=b"{}"),
                                             timeout=CALL),
    "ListRunners": lambda s: s.ListRunners(pb.RunnersRequest(), timeout=CALL),
}


def test_every_method_is_covered_here() -> None:
    assert set(CALLS) == set(auth.METHOD_ROLES) == set(pb.DESCRIPTOR.services_by_name["Meta"].methods_by_name)


def _denied(stub: meta_pb2_grpc.MetaStub, method: str) -> grpc.RpcError:
    err = rpc_error(lambda: CALLS[method](stub))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (method, err.code(), err.details())
    assert trailer(err) == "PermissionDenied"
    return err


def test_a_read_token_reads_and_nothing_else(meta: MetaProcess) -> None:
    stub = meta.stub_for(mint_token("read", "reader"))
    assert _stat(stub).size == 2500
    assert stub.GetManifest(pb.PathRequest(path="/auth/f"), timeout=CALL).size == 2500
    assert [e.path for e in stub.List(pb.ListRequest(path="/auth"), timeout=CALL).entries] == ["/auth/f"]
    stub.ListNodes(pb.NodesRequest(), timeout=CALL)
    stub.ListRunners(pb.RunnersRequest(), timeout=CALL)
    for method in ("Commit", "Delete", "Pin", "Unpin", "Warmup", "Evict", "CreateToken", "RevokeToken",
                   "ListTokens"):
        err = _denied(stub, method)
        assert "token 'reader' has role 'read'; this needs 'admin'" in err.details(), method
    for method in ("RegisterNode", "Heartbeat", "PinnedChunks", "AuthState", "ReportRunner"):
        assert "needs 'node'" in _denied(stub, method).details(), method
    assert [e.path for e in meta.stub.List(pb.ListRequest(path="/auth"), timeout=CALL).entries] == ["/auth/f"]


def test_a_node_token_registers_but_does_not_commit(meta: MetaProcess) -> None:
    stub = meta.stub_for(mint_token("node", "a-node"))
    for method in ("RegisterNode", "Heartbeat", "PinnedChunks", "AuthState", "Stat", "ListNodes"):
        CALLS[method](stub)
    assert stub.Heartbeat(pb.HeartbeatRequest(node_id="fake"), timeout=CALL).known
    state = stub.AuthState(pb.AuthStateRequest(), timeout=CALL)
    assert state.enabled and len(state.public_keys) == 1
    for method in ("Commit", "Delete", "Pin", "Warmup", "Evict", "CreateToken", "ListTokens", "RevokeToken"):
        assert "token 'a-node' has role 'node'; this needs 'admin'" in _denied(stub, method).details()


def test_an_admin_token_may_call_every_method(start_meta: Callable[..., MetaProcess], tmp_path: Path) -> None:
    m = start_meta(tmp_path / "data")  # its own: RegisterNode adds a node nobody can reach
    commit(m.stub, wire_manifest("/auth/f", b"f" * 2500))
    admin = m.stub_for(mint_token("admin", "an-admin"))
    for call in CALLS.values():
        call(admin)  # raises on any refusal
    assert m.stop() == 0


# -- sdcache token ----------------------------------------------------------------


def test_token_cli_create_list_revoke(meta: MetaProcess) -> None:
    def cli(*args: str, check: bool = True) -> Any:
        return run_cli("token", *args, meta=meta.address, check=check, env=AS_ADMIN)

    made = cli("create", "--role", "read", "--name", "cli-x")
    assert made.stdout.endswith("\n") and len(made.stdout.splitlines()) == 1
    token = made.stdout.strip()
    assert token.startswith(f"{auth.PREFIX}.") and token.count(".") == 2
    assert _stat(meta.stub_for(token)).size == 2500
    _denied(meta.stub_for(token), "Commit")

    doc = json.loads(cli("create", "--role", "node", "--name", "cli-y", "--json").stdout)
    assert (doc["name"], doc["role"]) == ("cli-y", "node") and doc["token"].startswith(f"{auth.PREFIX}.")
    meta.stub_for(doc["token"]).AuthState(pb.AuthStateRequest(), timeout=CALL)

    listed = cli("list", "--json").stdout
    rows = {r["name"]: r for r in json.loads(listed)}
    assert (rows["cli-x"]["role"], rows["cli-y"]["role"]) == ("read", "node")
    assert rows["cli-x"]["revoked"] is None and rows["cli-x"]["expires"] is None
    assert token not in listed and doc["token"] not in listed and all("token" not in r for r in rows.values())

    again = cli("create", "--role", "admin", "--name", "cli-x", check=False)
    assert again.returncode != 0 and again.stdout == ""
    assert again.stderr.splitlines() == [again.stderr.strip()]  # one line
    assert again.stderr.startswith("sdcache: error: ") and "'cli-x' exists already" in again.stderr

    cli("revoke", "cli-x")
    err = _refusal(meta.stub_for(token))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "'cli-x' was revoked" in err.details()
    rows = {r["name"]: r for r in json.loads(cli("list", "--json").stdout)}
    assert rows["cli-x"]["revoked"] and not rows["cli-y"]["revoked"]
    meta.stub_for(doc["token"]).AuthState(pb.AuthStateRequest(), timeout=CALL)  # other names keep working

    anonymous = run_cli("token", "list", meta=meta.address, env={"SDCACHE_TOKEN": None, "SDCACHE_TOKEN_FILE": None})
    assert anonymous.returncode != 0 and anonymous.stdout == "" and len(anonymous.stderr.splitlines()) == 1
    assert "no token" in anonymous.stderr


# -- revocation reaches the nodes ---------------------------------------------------


def _http(address: str, route: str, token: str | None) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of GET *route* on a node, with *token* (None: no Authorization)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"http://{address}{route}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=CALL) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_revoked_token_stops_at_the_service_at_once_and_at_nodes_soon(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path,
) -> None:
    c = make_cluster(nodes=1)
    node = c.node_children[0].address
    channels: list[grpc.Channel] = []

    def stub(token: str) -> meta_pb2_grpc.MetaStub:
        channels.append(grpcauth.channel(c.meta_addr, Credentials(token=token)))
        return meta_pb2_grpc.MetaStub(channels[-1])

    admin = stub(ADMIN_TOKEN)
    doomed = admin.CreateToken(pb.CreateTokenRequest(name="doomed", role="read"), timeout=CALL).token
    spared = admin.CreateToken(pb.CreateTokenRequest(name="spared", role="read"), timeout=CALL).token
    for token in (doomed, spared):
        assert _http(node, "/stats", token)[0] == 200
    assert _http(node, "/stats", None)[0] == 401

    admin.RevokeToken(pb.RevokeTokenRequest(name="doomed"), timeout=CALL)
    revoked_at = time.monotonic()
    err = rpc_error(lambda: stub(doomed).ListNodes(pb.NodesRequest(), timeout=CALL))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "'doomed' was revoked" in err.details()  # at once

    assert poll(lambda: _http(node, "/stats", doomed)[0] == 401, REVOKE_BOUND + 5, step=0.02)
    took = time.monotonic() - revoked_at
    assert took <= REVOKE_BOUND, f"the node refused the revoked token only after {took:.2f}s"
    status, body = _http(node, "/stats", doomed)
    assert (status, body["error"]) == (401, "Unauthenticated") and "'doomed' was revoked" in body["message"]

    # other names keep working: at the node, at the service, and the node's own token
    assert _http(node, "/stats", spared)[0] == 200
    nodes = stub(spared).ListNodes(pb.NodesRequest(), timeout=CALL).nodes
    assert [(n.node_id, n.alive) for n in nodes] == [("node0", True)]

    # the service's own token for its calls to nodes cannot be revoked by mistake
    err = rpc_error(lambda: admin.RevokeToken(pb.RevokeTokenRequest(name=auth.SERVICE_NAME), timeout=CALL))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot be revoked" in err.details()
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(2000))
    commit(admin, wire_manifest("/w.bin", src.read_bytes(), source=src.as_uri()))
    final = list(admin.Warmup(pb.WarmupRequest(paths=["/w.bin"]), timeout=60))[-1]
    assert final.done_bytes == 2000, final.message  # the service still reaches its nodes
    for ch in channels:
        ch.close()


# -- auth off ---------------------------------------------------------------------


def test_insecure_no_auth_warns_and_serves_without_tokens(tmp_path: Path) -> None:
    pool_root = tempfile.mkdtemp(prefix="sdcache-test-pool-", dir="/dev/shm")
    c = LocalCluster(str(tmp_path / "open"), nodes=1, capacity=1 << 20, heartbeat_interval=HEARTBEAT,
                     pool_root=pool_root, meta_args=["--insecure-no-auth"])
    try:
        c.start()
        log = Path(c.data_dir, "meta.log").read_text()
        assert "AUTH IS OFF (--insecure-no-auth)" in log and "WARNING" in log
        assert not Path(c.data_dir, "admin.token").exists()  # nothing to bootstrap
        channel = grpc.insecure_channel(c.meta_addr)  # no token on any call
        stub = meta_pb2_grpc.MetaStub(channel)
        src = tmp_path / "open.bin"
        src.write_bytes(os.urandom(3000))  # three distinct 1000-byte chunks
        commit(stub, wire_manifest("/open/x", src.read_bytes(), source=src.as_uri()))
        assert stub.Stat(pb.PathRequest(path="/open/x"), timeout=CALL).size == 3000
        assert [n.node_id for n in stub.ListNodes(pb.NodesRequest(), timeout=CALL).nodes] == ["node0"]
        final = list(stub.Warmup(pb.WarmupRequest(paths=["/open/x"]), timeout=60))[-1]
        assert final.done_bytes == 3000, final.message  # the service reached the node without a token
        node = c.node_children[0].address
        status, stats = _http(node, "/stats", None)
        assert status == 200 and stats["chunks"] == 3
        first = src.read_bytes()[:1000]
        req = urllib.request.Request(f"http://{node}/chunks/{chunk_id(first)}?path=/open/x")  # no Authorization
        with urllib.request.urlopen(req, timeout=CALL) as resp:
            assert resp.read() == first
        node_log = Path(c.data_dir, "node0.log").read_text()
        assert "accepts every request" in node_log
        channel.close()
    finally:
        c.stop()
        shutil.rmtree(pool_root, ignore_errors=True)


# -- hostile messages -------------------------------------------------------------


def test_malformed_and_oversized_messages_get_a_clear_status(meta: MetaProcess) -> None:
    garbage = [b"\xff\xff\xff\xff\x0f", b"\x0a\x05abc", bytes(range(256)) * 4]
    raw_commit = meta.channel.unary_unary(f"{SERVICE}Commit")
    raw_warmup = meta.channel.unary_stream(f"{SERVICE}Warmup")
    for blob in garbage:
        err = rpc_error(lambda: raw_commit(blob, timeout=CALL))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "malformed request" in err.details() and trailer(err) == "InvalidArgument"
        err = rpc_error(lambda: list(raw_warmup(blob, timeout=CALL)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed request" in err.details()
    # without a token the bytes are not even decoded
    anonymous = meta.open_channel(None)
    err = rpc_error(lambda: anonymous.unary_unary(f"{SERVICE}Commit")(garbage[0], timeout=CALL))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    anonymous.close()

    huge = pb.CommitRequest(manifest=pb.Manifest(path="/auth/huge", size=1, chunks=b"\0" * 70_000_000))
    err = rpc_error(lambda: meta.stub.Commit(huge, timeout=60))  # our client refuses to send it
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.details()
    wide = grpc.insecure_channel(meta.address, options=[("grpc.max_send_message_length", 128 << 20)])
    err = rpc_error(lambda: meta_pb2_grpc.MetaStub(wide).Commit(
        huge, timeout=60, metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the service refuses to take it
    assert "larger than max" in err.details() and "70000" in err.details()
    wide.close()

    # and it keeps serving
    assert _stat(meta.stub).size == 2500
    assert commit(meta.stub, wire_manifest("/auth/after", b"a" * 10)) > 0
    log = meta.log()
    assert "Traceback" not in log and "DecodeError" not in log, log
