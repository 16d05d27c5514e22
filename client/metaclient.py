"""A synchronous client of the metadata service (gRPC).

Thin: each method is one RPC, with errors turned back into the sdcache error
hierarchy (``NotFound`` is still a ``FileNotFoundError``), and the proto
messages turned into core types.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from sdcache import DEFAULT_META, errors
from sdcache._proto import meta_pb2 as pb
from sdcache._proto import meta_pb2_grpc as pbg
from sdcache.manifest import Entry, Manifest
from sdcache.meta import grpcauth
from sdcache.meta.convert import ERROR_TRAILER, error_from_rpc
from sdcache.meta.convert import entry_from_proto as entry_from_pb
from sdcache.meta.convert import manifest_from_proto as manifest_from_pb
from sdcache.meta.convert import manifest_to_proto as manifest_to_pb
from sdcache.placement import NodeInfo
from sdcache.tls import Credentials

NODE_LIST_TTL = 2.0  # seconds a node list is trusted before asking again


def resolve_address(meta: str | None = None) -> str:
    """``--meta`` value, else ``$SDCACHE_META``, else ``127.0.0.1:7070`` (contract)."""
    return meta or os.environ.get("SDCACHE_META") or DEFAULT_META


def translate(exc: grpc.RpcError, address: str) -> errors.SdcacheError:
    """The sdcache error a servicer raised; an unreachable service says where it looked."""
    code = exc.code()  # type: ignore[attr-defined]
    named = dict(exc.trailing_metadata() or ()).get(ERROR_TRAILER)  # type: ignore[attr-defined]
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not named:
        return errors.Unavailable(f"metadata service at {address} is unreachable ({code.name.lower()})")
    return error_from_rpc(exc)


def node_from_pb(n: pb.Node) -> NodeInfo:
    return NodeInfo(
        node_id=n.node_id,
        address=n.address,
        capacity=n.capacity,
        role=n.role,
        host_id=n.host_id,
        pool_dir=n.pool_dir,
        used=n.used,
    )


class MetaClient:
    """Talks to one metadata service; safe to share between threads."""

    def __init__(self, address: str | None = None, *, timeout: float = 10.0,
                 credentials: Credentials | None = None) -> None:
        self.address = resolve_address(address)
        self.timeout = timeout
        #: The token and TLS files every call presents (and the fetcher reuses for nodes).
        self.credentials = credentials if credentials is not None else Credentials.resolve()
        self._channel = grpcauth.channel(self.address, self.credentials)
        self._stub = pbg.MetaStub(self._channel)
        self._nodes: list[NodeInfo] = []
        self._nodes_at = 0.0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._channel.close()

    def _call(self, name: str, request: Any, *, timeout: float | None = None) -> Any:
        try:
            return getattr(self._stub, name)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise translate(exc, self.address) from None

    # -- namespace -----------------------------------------------------------
    def stat(self, path: str) -> Entry:
        return entry_from_pb(self._call("Stat", pb.PathRequest(path=path)))

    def manifest(self, path: str) -> Manifest:
        return manifest_from_pb(self._call("GetManifest", pb.PathRequest(path=path)))

    def list(self, path: str, *, page_size: int = 0) -> Iterator[Entry]:
        """Every entry of directory *path*, fetched page by page."""
        token = ""
        while True:
            resp = self._call("List", pb.ListRequest(path=path, page_token=token, page_size=page_size))
            for e in resp.entries:
                yield entry_from_pb(e)
            token = resp.next_page_token
            if not token:
                return

    def commit(self, manifest: Manifest) -> int:
        """Commit *manifest*; returns its generation."""
        return self._call("Commit", pb.CommitRequest(manifest=manifest_to_pb(manifest))).generation

    def delete(self, path: str, *, recursive: bool = False) -> int:
        return self._call("Delete", pb.DeleteRequest(path=path, recursive=recursive)).deleted

    # -- nodes ---------------------------------------------------------------
    def nodes(self, *, refresh: bool = False, include_dead: bool = False) -> list[NodeInfo]:
        """Live nodes; cached for :data:`NODE_LIST_TTL` seconds (placement input)."""
        if include_dead:
            return [node_from_pb(n) for n in self._call("ListNodes", pb.NodesRequest(include_dead=True)).nodes]
        with self._lock:
            if refresh or time.monotonic() - self._nodes_at > NODE_LIST_TTL:
                resp = self._call("ListNodes", pb.NodesRequest())
                self._nodes = [node_from_pb(n) for n in resp.nodes]
                self._nodes_at = time.monotonic()
            return self._nodes

    def nodes_raw(self, *, include_dead: bool = False) -> list[pb.Node]:
        return list(self._call("ListNodes", pb.NodesRequest(include_dead=include_dead)).nodes)

    # -- pins, warm-up, eviction, stats ---------------------------------------
    def pin(self, path: str, *, recursive: bool = False) -> int:
        return self._call("Pin", pb.PinRequest(path=path, recursive=recursive)).files

    def unpin(self, path: str, *, recursive: bool = False) -> int:
        return self._call("Unpin", pb.PinRequest(path=path, recursive=recursive)).files

    def warmup(self, paths: list[str], *, recursive: bool = False, check: bool = False) -> Iterator[pb.WarmupProgress]:
        try:
            yield from self._stub.Warmup(pb.WarmupRequest(paths=paths, recursive=recursive, check=check), timeout=3600)
        except grpc.RpcError as exc:
            raise translate(exc, self.address) from None

    def evict(self, paths: list[str], *, recursive: bool = False) -> pb.EvictResponse:
        return self._call("Evict", pb.EvictRequest(paths=paths, recursive=recursive), timeout=600)

    def stats(self) -> pb.StatsResponse:
        return self._call("Stats", pb.StatsRequest())

    def store_url(self) -> str:
        return self._call("GetConfig", pb.ConfigRequest()).store_url

    # -- tokens (admin) --------------------------------------------------------
    def create_token(self, role: str, *, name: str = "", ttl: float = 0.0) -> pb.CreateTokenResponse:
        return self._call("CreateToken", pb.CreateTokenRequest(name=name, role=role, ttl_seconds=ttl))

    def list_tokens(self) -> list[pb.TokenInfo]:
        return list(self._call("ListTokens", pb.ListTokensRequest()).tokens)

    def revoke_token(self, name: str) -> pb.TokenInfo:
        return self._call("RevokeToken", pb.RevokeTokenRequest(name=name))


_clients: dict[tuple[str, Credentials], MetaClient] = {}
_clients_lock = threading.Lock()


def shared_client(address: str | None = None, credentials: Credentials | None = None) -> MetaClient:
    """One :class:`MetaClient` per address and credentials per process."""
    addr = resolve_address(address)
    creds = credentials if credentials is not None else Credentials.resolve()
    with _clients_lock:
        client = _clients.get((addr, creds))
        if client is None:
            client = _clients[(addr, creds)] = MetaClient(addr, credentials=creds)
        return client
