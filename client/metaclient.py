"""A synchronous client of the metadata service (gRPC).

Thin: each method is one RPC, with errors turned back into the sdcache error
hierarchy (``NotFound`` is still a ``FileNotFoundError``), and the proto
messages turned into core types.
"""

from __future__ import annotations

import logging
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
NODE_LIST_TIMEOUT = 2.0  # seconds a refresh of a node list already held may take
NODE_LIST_RETRY = 1.0  # seconds after a failed refresh before the next try
#: Reads that wait out a restart of the service (see ``MetaClient._call``); ListNodes
#: is not among them: a failed node-list refresh keeps the last list instead.
RIDE_OUT_RESTARTS = frozenset({"Stat", "GetManifest", "List", "GetConfig", "Stats"})

log = logging.getLogger(__name__)


def resolve_address(meta: str | None = None) -> str:
    """``--meta`` value, else ``$SDCACHE_META``, else ``127.0.0.1:7070`` (contract)."""
    return meta or os.environ.get("SDCACHE_META") or DEFAULT_META


_CONNECT_PREFIX = "failed to connect to all addresses; last error: "


def translate(exc: grpc.RpcError, address: str, *, tls: bool | None = None) -> errors.SdcacheError:
    """The sdcache error a servicer raised; an unreachable service says where it looked, how, and gRPC's reason.

    A plaintext client of a TLS service sees only "Socket closed" and a TLS
    client with the wrong CA a handshake failure: naming the transport
    (*tls*) and keeping gRPC's last error makes either one line a user can act on.
    """
    code = exc.code()  # type: ignore[attr-defined]
    named = dict(exc.trailing_metadata() or ()).get(ERROR_TRAILER)  # type: ignore[attr-defined]
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not named:
        how = "" if tls is None else (" over TLS" if tls else " over plaintext gRPC")
        reason = (exc.details() or "").removeprefix(_CONNECT_PREFIX).strip()  # type: ignore[attr-defined]
        reason = f": {reason[:300]}" if reason else ""
        return errors.Unavailable(f"metadata service at {address} is unreachable{how} ({code.name.lower()}){reason}")
    return error_from_rpc(exc)


def _connection_down(exc: grpc.RpcError) -> bool:
    """Whether *exc* is gRPC finding no connection (not an error the service itself sent)."""
    named = dict(exc.trailing_metadata() or ()).get(ERROR_TRAILER)  # type: ignore[attr-defined]
    return exc.code() == grpc.StatusCode.UNAVAILABLE and not named  # type: ignore[attr-defined]


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

    # Node-list refresh state, guarded by ``_lock`` (the RPC itself runs outside it).
    _nodes_flight: threading.Event | None = None  # set when the refresh in progress ends
    _nodes_failed_at = 0.0  # monotonic time of the last failed refresh; 0 after a success
    _nodes_error: errors.SdcacheError | None = None  # why it failed
    _reached = False  # some call got through: UNAVAILABLE from then on is a restart (see _call)

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
        """One RPC; a read the service would answer again rides out a restart of the service.

        gRPC fails a call at once while the connection is down. For the reads
        in :data:`RIDE_OUT_RESTARTS`, once this client has reached the service,
        that is taken for a restart (``kill -9`` and back in a second or two):
        the call is made again, waiting for the service to come back within
        what is left of *timeout*. A client that never reached it fails at once
        (a wrong address or TLS setting is one clear error, not a wait).
        """
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        try:
            resp = getattr(self._stub, name)(request, timeout=timeout)
        except grpc.RpcError as exc:
            down = _connection_down(exc)
            if not down and exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                self._reached = True  # the service itself answered, with an error
            if not (down and self._reached and name in RIDE_OUT_RESTARTS):
                raise translate(exc, self.address, tls=self.credentials.tls is not None) from None
            try:
                resp = getattr(self._stub, name)(request, timeout=max(0.05, deadline - time.monotonic()),
                                                 wait_for_ready=True)
            except grpc.RpcError as again:
                raise translate(again, self.address, tls=self.credentials.tls is not None) from None
        self._reached = True
        return resp

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
        """Live nodes (placement input): the last list fetched, refreshed in the background when stale.

        A list older than :data:`NODE_LIST_TTL` is still handed out at once
        while one background thread asks again (within :data:`NODE_LIST_TIMEOUT`):
        no caller waits behind a slow or hung metadata service. A failed refresh
        keeps the last list, so reads keep reaching the nodes while the service
        is down, and is tried again after :data:`NODE_LIST_RETRY`. Only a caller
        with no list yet, or one asking for ``refresh``, waits for the RPC, and
        gets its error (:class:`~sdcache.errors.Unavailable`) when it fails.
        """
        if include_dead:
            return [node_from_pb(n) for n in self._call("ListNodes", pb.NodesRequest(include_dead=True)).nodes]
        while True:
            now = time.monotonic()
            with self._lock:
                have = self._nodes_at > 0
                failed = self._nodes_error if self._nodes_failed_at else None
                due = refresh or (now - self._nodes_at > NODE_LIST_TTL
                                  and now - self._nodes_failed_at >= NODE_LIST_RETRY)
                flight, mine = self._nodes_flight, False
                if due and flight is None:
                    flight = self._nodes_flight = threading.Event()
                    mine = True
                nodes = self._nodes
            if have and not refresh:
                if mine:
                    threading.Thread(target=self._refresh_nodes, args=(flight, NODE_LIST_TIMEOUT),
                                     name="sdcache-node-list", daemon=True).start()
                return nodes
            if mine:
                # No list yet (or refresh asked for): this caller needs the answer. After a failure,
                # ask with the short timeout: most callers will have given up on the service.
                timeout = self.timeout if refresh or failed is None else min(self.timeout, NODE_LIST_TIMEOUT)
                return self._refresh_nodes(flight, timeout, raise_errors=True)
            if failed is not None and not refresh:
                raise type(failed)(str(failed))  # down moments ago: do not wait for it again
            if flight is not None:
                flight.wait(self.timeout)  # the first list (or a refresh) is on its way

    def _refresh_nodes(self, flight: threading.Event, timeout: float, *, raise_errors: bool = False) -> list[NodeInfo]:
        """Ask for the node list; on failure keep the last one (and raise if *raise_errors*)."""
        try:
            try:
                resp = self._call("ListNodes", pb.NodesRequest(), timeout=timeout)
                nodes = [node_from_pb(n) for n in resp.nodes]
            except Exception as exc:  # a closed channel raises ValueError
                err = exc if isinstance(exc, errors.SdcacheError) else errors.Unavailable(
                    f"metadata service at {self.address}: {exc}")
                with self._lock:
                    first = not self._nodes_failed_at
                    self._nodes_failed_at = time.monotonic()
                    self._nodes_error = err
                    age = time.monotonic() - self._nodes_at if self._nodes_at else 0.0
                    nodes = self._nodes
                if raise_errors:
                    raise err from None
                log.log(logging.WARNING if first else logging.DEBUG,
                        "cannot refresh the node list (%s); using the one from %.0fs ago", err, age)
                return nodes
            with self._lock:
                if self._nodes_failed_at:
                    log.info("node list refreshed again from %s", self.address)
                self._nodes, self._nodes_at = nodes, time.monotonic()
                self._nodes_failed_at, self._nodes_error = 0.0, None
            return nodes
        finally:
            with self._lock:
                self._nodes_flight = None
            flight.set()

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
            raise translate(exc, self.address, tls=self.credentials.tls is not None) from None

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
