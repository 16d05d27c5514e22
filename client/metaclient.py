"""A synchronous client of the metadata service (gRPC).

Thin: each method is one RPC, with errors turned back into the sdcache error
hierarchy (``NotFound`` is still a ``FileNotFoundError``), and the proto
messages turned into core types.

Several services over one store: the address may be a list
(``--meta a,b,c``, ``SDCACHE_META=a,b,c``). Calls go to one service at a
time; when gRPC finds no connection to it (not an error the service sent),
the call is made on the next, which then stays in use. A read waits at most
:data:`ATTEMPT_TIMEOUT` on a service that does not answer while others are
left to try (a host that is down drops packets rather than refusing them).
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
from sdcache.hostport import split_hostports
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
#: Calls that are safe to give up on and repeat elsewhere when a service is silent.
IDEMPOTENT_READS = RIDE_OUT_RESTARTS | {"ListNodes", "ListTokens", "AuthState"}
ATTEMPT_TIMEOUT = 3.0  # seconds a read waits on one of several services before trying the next

log = logging.getLogger(__name__)


def resolve_addresses(meta: str | None = None) -> list[str]:
    """``--meta`` value, else ``$SDCACHE_META``, else ``127.0.0.1:7070`` (contract), as a list of ``HOST:PORT``.

    A comma list names several services over one store (in the order tried).
    """
    return split_hostports(meta or os.environ.get("SDCACHE_META") or DEFAULT_META, what="--meta")


def resolve_address(meta: str | None = None) -> str:
    """What :func:`resolve_addresses` finds, joined again: hand it to another client to reach the same services."""
    return ",".join(resolve_addresses(meta))


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
        zone=n.zone,
    )


class MetaClient:
    """Talks to a metadata service, or to the first that answers of several over one store; thread-safe."""

    # Node-list refresh state, guarded by ``_lock`` (the RPC itself runs outside it).
    _nodes_flight: threading.Event | None = None  # set when the refresh in progress ends
    _nodes_failed_at = 0.0  # monotonic time of the last failed refresh; 0 after a success
    _nodes_error: errors.SdcacheError | None = None  # why it failed
    _reached = False  # some call got through: UNAVAILABLE from then on is a restart (see _call)

    def __init__(self, address: str | None = None, *, timeout: float = 10.0,
                 credentials: Credentials | None = None) -> None:
        #: Every service this client may use, in the order tried.
        self.addresses = resolve_addresses(address)
        #: The same, as one ``--meta`` value (what another client is given to reach these services).
        self.address = ",".join(self.addresses)
        self.timeout = timeout
        #: The token and TLS files every call presents (and the fetcher reuses for nodes).
        self.credentials = credentials if credentials is not None else Credentials.resolve()
        self._channels = [grpcauth.channel(a, self.credentials) for a in self.addresses]
        self._stubs = [pbg.MetaStub(c) for c in self._channels]
        self._current = 0  # index of the service in use
        self._nodes: list[NodeInfo] = []
        self._nodes_at = 0.0
        self._lock = threading.Lock()

    @property
    def current_address(self) -> str:
        """The service calls go to now."""
        return self.addresses[self._current]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def _use(self, index: int) -> None:
        """Make service *index* the one calls go to (after it answered)."""
        if index != self._current:
            log.warning("metadata service %s is unreachable; using %s", self.addresses[self._current],
                        self.addresses[index])
            self._current = index

    def _translate(self, exc: grpc.RpcError, index: int) -> errors.SdcacheError:
        return translate(exc, self.addresses[index], tls=self.credentials.tls is not None)

    def _call(self, name: str, request: Any, *, timeout: float | None = None) -> Any:
        """One RPC, on the service in use, else on the next that answers; reads ride out restarts.

        A call that finds no connection to a service (refused, reset, no
        route: not an error the service sent) is made on the next address of
        the list, starting from the one in use. A read in
        :data:`IDEMPOTENT_READS` also moves on after :data:`ATTEMPT_TIMEOUT`
        of silence while others are left; a write waits its whole *timeout*
        on the service it went to (moving a write that may have landed would
        make it twice).

        gRPC fails a call at once while a connection is down. For the reads
        in :data:`RIDE_OUT_RESTARTS`, once this client has reached a service,
        every service being down is taken for a restart (``kill -9`` and back
        in a second or two): the call is made again, waiting for any of them
        to come back within what is left of *timeout*. A client that never
        reached one fails at once (a wrong address or TLS setting is one
        clear error, not a wait).
        """
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        n = len(self._stubs)
        start = self._current
        read = name in IDEMPOTENT_READS
        last: tuple[grpc.RpcError, int] | None = None
        for k in range(n):
            i = (start + k) % n
            left = deadline - time.monotonic()
            if left <= 0:
                break
            attempt = min(left, ATTEMPT_TIMEOUT) if read and k < n - 1 else left
            try:
                resp = getattr(self._stubs[i], name)(request, timeout=attempt)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                down = _connection_down(exc)
                silent = code == grpc.StatusCode.DEADLINE_EXCEEDED and attempt < left
                if not down and code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._reached = True  # the service itself answered, with an error
                if not (down or silent):
                    raise self._translate(exc, i) from None
                last = (exc, i)
                continue
            self._use(i)
            self._reached = True
            return resp
        assert last is not None
        exc, i = last
        if not (_connection_down(exc) and self._reached and name in RIDE_OUT_RESTARTS):
            raise self._unreachable(exc, i) from None
        return self._ride_out(name, request, deadline)

    def _ride_out(self, name: str, request: Any, deadline: float) -> Any:
        """Wait for any service to come back (see :meth:`_call`), until *deadline*."""
        n = len(self._stubs)
        while True:
            for k in range(n):
                i = (self._current + k) % n
                left = deadline - time.monotonic()
                # One address: wait for it all the time left. Several: a slice each, in turn.
                wait = max(0.05, left if n == 1 else min(left, 0.25))
                try:
                    resp = getattr(self._stubs[i], name)(request, timeout=wait, wait_for_ready=True)
                except grpc.RpcError as exc:
                    if time.monotonic() >= deadline or not (_connection_down(exc) or (
                            exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED)):  # type: ignore[attr-defined]
                        raise (self._translate(exc, i) if n == 1 else self._unreachable(exc, i)) from None
                    continue
                self._use(i)
                return resp

    def _unreachable(self, exc: grpc.RpcError, index: int) -> errors.SdcacheError:
        """The error when no service answered: the one address's, or every address named, one line."""
        err = self._translate(exc, index)
        if len(self.addresses) == 1 or not isinstance(err, errors.Unavailable):
            return err
        return errors.Unavailable(f"none of the metadata services {self.address} answered; the last, {err}")

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
                    f"metadata service at {self.current_address}: {exc}")
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
                    log.info("node list refreshed again from %s", self.current_address)
                self._nodes, self._nodes_at = nodes, time.monotonic()
                self._nodes_failed_at, self._nodes_error = 0.0, None
            return nodes
        finally:
            with self._lock:
                self._nodes_flight = None
            flight.set()

    def nodes_now(self) -> list[NodeInfo] | None:
        """The live nodes as :meth:`nodes` gives them, or None while no list was fetched yet: never waits."""
        with self._lock:
            if self._nodes_at <= 0:
                return None
        return self.nodes()

    def nodes_raw(self, *, include_dead: bool = False) -> list[pb.Node]:
        return list(self._call("ListNodes", pb.NodesRequest(include_dead=include_dead)).nodes)

    # -- pins, warm-up, eviction, stats ---------------------------------------
    def pin(self, path: str, *, recursive: bool = False) -> int:
        return self._call("Pin", pb.PinRequest(path=path, recursive=recursive)).files

    def unpin(self, path: str, *, recursive: bool = False) -> int:
        return self._call("Unpin", pb.PinRequest(path=path, recursive=recursive)).files

    def warmup(self, paths: list[str], *, recursive: bool = False, check: bool = False) -> Iterator[pb.WarmupProgress]:
        """Progress of a warm-up; one that found no connection before its first report moves to the next service."""
        request = pb.WarmupRequest(paths=paths, recursive=recursive, check=check)
        n = len(self._stubs)
        start = self._current
        for k in range(n):
            i = (start + k) % n
            started = False
            try:
                for progress in self._stubs[i].Warmup(request, timeout=3600):
                    if not started:
                        self._use(i)
                        started = True
                    yield progress
                return
            except grpc.RpcError as exc:
                if started or not _connection_down(exc) or k == n - 1:
                    raise (self._translate(exc, i) if started or n == 1 else self._unreachable(exc, i)) from None

    def evict(self, paths: list[str], *, recursive: bool = False) -> pb.EvictResponse:
        return self._call("Evict", pb.EvictRequest(paths=paths, recursive=recursive), timeout=600)

    def stats(self) -> pb.StatsResponse:
        return self._call("Stats", pb.StatsRequest())

    def store_url(self) -> str:
        return self._call("GetConfig", pb.ConfigRequest()).store_url

    def replicas(self, path: str = "") -> pb.ReplicasResponse:
        """The replica policy, and *path*'s replica count under it."""
        return self._call("GetReplicas", pb.ReplicasRequest(path=path))

    def set_replicas(self, path: str, replicas: int) -> pb.ReplicasResponse:
        """Override the replica count of *path* (a directory or file); 0 drops the override (admin)."""
        return self._call("SetReplicas", pb.ReplicaRule(path=path, replicas=replicas))

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
