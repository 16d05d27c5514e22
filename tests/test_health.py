"""grpc.health.v1 on the metadata service: what a Kubernetes probe or a load balancer sees.

A real ``sdcache meta`` subprocess, asked by the standard health stub with no token.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdcache._proto import meta_pb2 as pb
from sdcache._proto import meta_pb2_grpc
from sdcache.meta import health
from sdcache.tls import TlsFiles

from ._meta_process import CALL, MetaProcess, rpc_error
from ._pki import Pki, make_pki

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROBE = (sys.executable, "-m", "sdcache.meta.health")


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetaProcess]:
    m = MetaProcess(tmp_path_factory.mktemp("health") / "data")
    yield m
    assert m.stop() == 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_meta(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[MetaProcess]:
    m = MetaProcess(tmp_path_factory.mktemp("health-tls") / "data", "--tls-cert", pki.server_cert,
                    "--tls-key", pki.server_key, "--tls-ca", pki.ca, token=None)
    yield m
    assert m.stop() == 0


def health_stub(address: str) -> tuple[grpc.Channel, health_pb2_grpc.HealthStub]:
    """A plain channel with no token at all, as a kubelet's probe has."""
    channel = grpc.insecure_channel(address)
    return channel, health_pb2_grpc.HealthStub(channel)


@pytest.mark.parametrize("service", ["", "sdcache.v1.Meta"])
def test_serving_without_a_token(meta: MetaProcess, service: str) -> None:
    channel, stub = health_stub(meta.address)
    with channel:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL)
    assert reply.status == SERVING


def test_health_is_open_but_nothing_else_is(meta: MetaProcess) -> None:
    """The open prefix lets probes in; the same token-less channel still cannot list a directory."""
    channel, stub = health_stub(meta.address)
    with channel:
        err = rpc_error(lambda: stub.Check(health_pb2.HealthCheckRequest(service="sdcache.v1.Nope"), timeout=CALL))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        meta_stub = meta_pb2_grpc.MetaStub(channel)
        err = rpc_error(lambda: meta_stub.List(pb.ListRequest(path="/"), timeout=CALL))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_probe_command(meta: MetaProcess) -> None:
    """``python -m sdcache.meta.health`` is what an exec probe runs: 0 when SERVING, else 1 and one line."""
    ok = subprocess.run([*PROBE, "--service", "sdcache.v1.Meta", meta.address], capture_output=True, text=True,
                        timeout=30)
    assert ok.returncode == 0, ok.stderr
    unknown = subprocess.run([*PROBE, "--service", "sdcache.v1.Nope", meta.address], capture_output=True,
                             text=True, timeout=30)
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr


def test_probe_fails_when_nothing_listens() -> None:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = subprocess.run([*PROBE, "--timeout", "2", f"127.0.0.1:{port}"], capture_output=True, text=True,
                          timeout=30)
    assert down.returncode == 1
    assert "UNAVAILABLE" in down.stderr or "DEADLINE_EXCEEDED" in down.stderr


def test_check_through_tls(tls_meta: MetaProcess, pki: Pki) -> None:
    files = TlsFiles(ca=pki.ca)
    assert health.check(tls_meta.address, tls_files=files) == "SERVING"
    assert health.check(tls_meta.address, service="sdcache.v1.Meta", tls_files=files) == "SERVING"
    # A probe dials the pod's own address and checks the certificate for another name.
    port = tls_meta.address.rsplit(":", 1)[1]
    assert health.check(f"127.0.0.1:{port}", tls_files=files, server_name="localhost") == "SERVING"
    ok = subprocess.run([*PROBE, "--tls-ca", pki.ca, "--server-name", "localhost", f"127.0.0.1:{port}"],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    # A certificate that does not carry the name is refused: the probe checks who answers.
    wrong = subprocess.run([*PROBE, "--tls-ca", pki.ca, "--server-name", "sdcache-meta", "--timeout", "3",
                            f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 1


def test_not_serving_on_shutdown(tmp_path: Path) -> None:
    """A Watch open when SIGTERM arrives sees NOT_SERVING before the stream ends."""
    m = MetaProcess(tmp_path / "data")
    channel, stub = health_stub(m.address)
    try:
        stream = stub.Watch(health_pb2.HealthCheckRequest(service="sdcache.v1.Meta"), timeout=30)
        seen = [next(stream).status]
        assert seen == [SERVING]
        m.proc.send_signal(signal.SIGTERM)
        try:
            for reply in stream:
                seen.append(reply.status)
        except grpc.RpcError:
            pass  # the stream ends when the server stops
        assert seen[-1] == NOT_SERVING, seen
    finally:
        channel.close()
        assert m.stop() == 0
