"""``sdcache meta`` as a real subprocess on port 0, and small helpers for calling it.

Shared by ``test_meta_service.py`` and ``test_auth.py``. By default the
service signs with the test suite's key (``conftest.TOKEN_KEY``) and the stub
sends the suite's admin token, exactly as any client would.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from sdcache._proto import meta_pb2 as pb
from sdcache._proto import meta_pb2_grpc
from sdcache.chunking import ChunkRef
from sdcache.hashing import chunk_id
from sdcache.manifest import pack_chunks
from sdcache.meta import grpcauth
from sdcache.meta.convert import ERROR_TRAILER
from sdcache.tls import Credentials

from .conftest import ADMIN_TOKEN, TOKEN_KEY

CALL = 10.0  # seconds: deadline of every test RPC
START = 30.0  # seconds: deadline for a service to report it listens

#: Run the service's own entry point (``python -m sdcache meta`` goes through the CLI).
SERVER_ENTRY = ("-c", "import sys; from sdcache.meta.server import _cli; sys.exit(_cli())")


class MetaProcess:
    """``sdcache meta`` running in a subprocess; ``address`` is what it reported.

    *token_key* is passed as ``--token-key`` (None: the service makes
    ``DATA/token.key``); ``stub`` sends *token* (None: no token at all).
    *entry* is the argv after the interpreter that runs the service.
    """

    def __init__(self, data: Path, *args: str, token_key: str | None = TOKEN_KEY,
                 token: str | None = ADMIN_TOKEN, entry: tuple[str, ...] = SERVER_ENTRY) -> None:
        self.data = data
        self._extra_channels: list[grpc.Channel] = []
        self.ready_file = data.parent / f"{data.name}.ready"
        self.stderr_path = data.parent / f"{data.name}.stderr"
        key = ["--token-key", token_key] if token_key else []
        cmd = [sys.executable, *entry, "--data", str(data), "--listen", "127.0.0.1:0",
               "--ready-file", str(self.ready_file), *key, *args]
        self.stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.address = self._wait_ready()
        self.channel = self.open_channel(token)
        self.stub = meta_pb2_grpc.MetaStub(self.channel)

    def open_channel(self, token: str | None) -> grpc.Channel:
        """A channel to this service that sends *token* (None: none)."""
        return grpcauth.channel(self.address, Credentials(token=token))

    def stub_for(self, token: str | None) -> meta_pb2_grpc.MetaStub:
        """A stub sending *token*; its channel closes with the service."""
        channel = self.open_channel(token)
        self._extra_channels.append(channel)
        return meta_pb2_grpc.MetaStub(channel)

    def _wait_ready(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if readable:
                line = self.proc.stdout.readline()
                if not line:
                    break
                assert line.startswith("sdcache meta listening on "), line
                return line.rsplit(" ", 1)[1].strip()
            if self.proc.poll() is not None:
                break
        self.proc.kill()
        self.proc.wait()
        self._close_pipes()
        raise AssertionError(f"meta service did not start: {self.stderr_path.read_text()}")

    def log(self) -> str:
        """What the service wrote to stderr so far."""
        self.stderr.flush()
        return self.stderr_path.read_text()

    def stop(self) -> int:
        """SIGTERM, and the exit status; the service must not have logged a traceback."""
        self._close_channels()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=15)
        finally:
            self._close_pipes()
        log = self.stderr_path.read_text()
        assert "Traceback" not in log and "Unclosed" not in log, log
        return rc

    def kill(self) -> None:
        self._close_channels()
        self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def _close_channels(self) -> None:
        for channel in [self.channel, *self._extra_channels]:
            channel.close()
        self._extra_channels.clear()

    def _close_pipes(self) -> None:
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.stderr.close()


def wire_manifest(path: str, data: bytes, *, chunk: int = 1000, source: str = "") -> pb.Manifest:
    """The wire manifest of *data* cut in *chunk*-byte chunks with real ids."""
    refs = [ChunkRef(o, len(data[o : o + chunk]), chunk_id(data[o : o + chunk])) for o in range(0, len(data), chunk)]
    return pb.Manifest(
        path=path,
        size=len(data),
        mtime=1700000000.0,
        source=source,
        version_tag=f"1700000000.0:{len(data)}",
        sha256="00" * 32,
        chunks=pack_chunks(refs),
        kind="lora",
        metadata={"ss_network_dim": "8"},
    )


def commit(stub: meta_pb2_grpc.MetaStub, manifest: pb.Manifest) -> int:
    return stub.Commit(pb.CommitRequest(manifest=manifest), timeout=CALL).generation


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def trailer(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get(ERROR_TRAILER)


def poll(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Whether *predicate* became true within *timeout* seconds (checked every *step*)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
