"""A node's life in the metadata service: register, heartbeat, follow pins.

The loop registers the node (retrying with capped backoff while the service
is not up yet), heartbeats every ``heartbeat_interval`` seconds with the pool's
fill, registers again when the service says it forgot the node, reloads the
pinned chunk ids whenever the pins generation changes, and reloads the token
keys and revocations (``AuthState``) whenever the auth generation changes, so
a revoked token stops working here within one heartbeat.

Every call carries the node's own token (role ``node``).

*meta* may list several services over one store (``a:7070,b:7070``): the
node talks to one at a time and moves to the next when a call finds no
connection (or the service does not answer), so it stays registered and
reachable for confined reads while any of them is up. The registry, pins and
revocations live in the shared store, so the next service already knows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from sdcache import auth
from sdcache._proto import meta_pb2 as pb
from sdcache._proto import meta_pb2_grpc as pbg
from sdcache.errors import Unavailable
from sdcache.hostport import split_hostports
from sdcache.manifest import Manifest
from sdcache.meta import grpcauth
from sdcache.meta.authstate import AuthFollower
from sdcache.meta.convert import ERROR_TRAILER, error_from_rpc, manifest_from_proto
from sdcache.tls import Credentials

from .pool import ChunkPool

log = logging.getLogger(__name__)

BACKOFF_START = 0.1  # seconds before the first retry of a failed registration
BACKOFF_MAX = 5.0  # cap of the exponential backoff
RPC_TIMEOUT = 10.0  # seconds per RPC
DEFAULT_HEARTBEAT = 5.0  # when the service sends no interval
#: Readiness: the service drops a node after this many missed heartbeats, and so does /readyz
#: (plus READY_GRACE seconds for the round trip).
MISSED_HEARTBEATS = 3
READY_GRACE = 1.0


def _moves_on(e: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call is worth making on the next service: no connection, or no answer in time."""
    named = dict(e.trailing_metadata() or ()).get(ERROR_TRAILER)
    return not named and e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def unpack_ids(blob: bytes) -> list[str]:
    """16-byte xxh3-128 digests, concatenated, to hex chunk ids."""
    return [blob[i : i + 16].hex() for i in range(0, len(blob) - len(blob) % 16, 16)]


class Registration:
    """Keeps one node registered with the metadata service at *meta* (``HOST:PORT``, or a comma list)."""

    def __init__(self, meta: str, node: Callable[[], pb.Node], pool: ChunkPool, *,
                 credentials: Credentials, verifier: auth.TokenVerifier) -> None:
        self.addresses = split_hostports(meta, what="--meta")
        self._current = 0
        self._stubs: list[pbg.MetaStub] = []
        self._node = node
        self._pool = pool
        self._credentials = credentials
        self.verifier = verifier
        self._auth = AuthFollower(verifier, self.meta, open_warning="this node accepts every request")
        self.store_url = ""
        self.registered = asyncio.Event()
        self.registrations = 0
        self.heartbeats = 0
        self.pins_generation: int | None = None
        self.heartbeat_interval = DEFAULT_HEARTBEAT
        self.last_contact: float | None = None  # monotonic time the service last answered a register/heartbeat

    @property
    def meta(self) -> str:
        """The metadata service in use."""
        return self.addresses[self._current]

    @property
    def _stub(self) -> pbg.MetaStub:
        return self._stubs[self._current]

    def _next_service(self) -> None:
        """After a call found no connection: the next address, if there are several."""
        if len(self.addresses) > 1:
            before = self.meta
            self._current = (self._current + 1) % len(self.addresses)
            self._auth.where = self.meta
            log.warning("metadata service %s is unreachable; trying %s", before, self.meta)

    async def run(self) -> None:
        """Run until cancelled."""
        channels = [grpcauth.aio_channel(a, self._credentials) for a in self.addresses]
        self._stubs = [pbg.MetaStub(c) for c in channels]
        try:
            while True:
                await self._register()
                await self._heartbeat_until_forgotten()
        finally:
            self._stubs = []
            for channel in channels:
                await channel.close()

    async def _register(self) -> None:
        delay = BACKOFF_START
        failures = 0
        while True:
            node = self._node()
            stub = self._stub
            try:
                # The token keys first, then the registration: a node clients can list but that cannot
                # check their tokens yet would answer 503 and be avoided for seconds. Reloaded on every
                # registration: the service may have restarted with other keys.
                if not await self._auth.sync(stub):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                resp = await stub.RegisterNode(node, timeout=RPC_TIMEOUT)
                self.last_contact = time.monotonic()
                if await self._auth.sync(stub, resp.auth_generation):  # a revocation in between
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    log.error("metadata service %s refused this node: %s (give it a node token: "
                              "--token-file, $SDCACHE_TOKEN or $SDCACHE_TOKEN_FILE)", self.meta, e.details())
                failures += 1
                level = logging.WARNING if failures in (1, 10) or failures % 100 == 0 else logging.DEBUG
                # gRPC's details carry the reason a TLS handshake failed (wrong CA, a
                # certificate not allowed for client use under mutual TLS).
                log.log(level, "cannot register with metadata service %s (%s: %s), retrying", self.meta,
                        e.code().name, e.details())
                if _moves_on(e):
                    self._next_service()
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        self.registrations += 1
        self.heartbeat_interval = resp.heartbeat_interval if resp.heartbeat_interval > 0 else DEFAULT_HEARTBEAT
        self.store_url = resp.store_url
        log.info(
            "registered node %s (%s) with metadata service %s; heartbeat every %.1fs",
            node.node_id, node.address, self.meta, self.heartbeat_interval,
        )
        self.registered.set()
        await self._sync_pins(stub, resp.pins_generation)

    async def _heartbeat_until_forgotten(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            st = self._pool.stats()
            node_id = self._node().node_id
            stub = self._stub
            # Several services: a silent one must not cost the node its liveness (dropped after
            # MISSED_HEARTBEATS intervals), so wait one interval for it, then try the next.
            timeout = RPC_TIMEOUT if len(self.addresses) == 1 else max(1.0, self.heartbeat_interval)
            try:
                resp = await stub.Heartbeat(
                    pb.HeartbeatRequest(node_id=node_id, used=st.used, chunks=st.chunks), timeout=timeout
                )
            except grpc.aio.AioRpcError as e:
                log.warning("heartbeat to %s failed (%s)", self.meta, e.code().name)
                if _moves_on(e):
                    self._next_service()
                continue
            self.heartbeats += 1
            self.last_contact = time.monotonic()
            if not resp.known:
                log.info("metadata service forgot node %s; registering again", node_id)
                self.registered.clear()
                return
            await self._auth.sync(stub, resp.auth_generation)
            await self._sync_pins(stub, resp.pins_generation)

    def not_ready(self) -> str | None:
        """Why this node is not ready to serve as the service's node (None when it is), for ``/readyz``."""
        if not self.registered.is_set():
            return f"not registered with the metadata service at {self.meta} yet"
        if self.verifier.enabled and not self.verifier.ready:
            return "registered, but the token keys from the metadata service are not loaded yet"
        if self.last_contact is not None:
            silent = time.monotonic() - self.last_contact
            if silent > MISSED_HEARTBEATS * self.heartbeat_interval + READY_GRACE:
                return f"the metadata service at {self.meta} has not answered for {silent:.1f}s"
        return None

    async def get_manifest(self, path: str) -> Manifest:
        """The committed manifest of *path*, asked with this node's token (confined read-through).

        With several services, one that finds no connection is followed by the next.
        """
        if not self._stubs:
            raise Unavailable(f"not connected to the metadata service {self.meta} yet")
        n = len(self._stubs)
        for k in range(n):
            i = (self._current + k) % n
            try:
                reply = await self._stubs[i].GetManifest(pb.PathRequest(path=path), timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                named = dict(e.trailing_metadata() or ()).get(ERROR_TRAILER)
                if k == n - 1 or named or e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise error_from_rpc(e) from None
                continue
            return manifest_from_proto(reply)
        raise AssertionError("unreachable")

    async def list_nodes(self) -> list[pb.Node]:
        """The live nodes, asked with this node's token (where its peers are, node/peers.py)."""
        if not self._stubs:
            raise Unavailable(f"not connected to the metadata service {self.meta} yet")
        try:
            return list((await self._stub.ListNodes(pb.NodesRequest(), timeout=RPC_TIMEOUT)).nodes)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None

    #: Pin changes tolerated while one list is paged in; past that, wait for
    #: the next heartbeat rather than page forever.
    PINS_RESTARTS = 3

    async def _sync_pins(self, stub: pbg.MetaStub, generation: int) -> None:
        """Load and apply the pinned ids unless *generation* is the one applied.

        The pool gets only a complete list of one generation, and
        ``pins_generation`` moves only once it has it: a load that fails is
        logged and tried again at the next heartbeat.
        """
        if generation == self.pins_generation:
            return
        try:
            loaded = await self._load_pins(stub)
        except grpc.aio.AioRpcError as e:
            log.warning("cannot load pinned chunks from %s (%s: %s); will retry at the next heartbeat",
                        self.meta, e.code().name, e.details())
            return
        if loaded is None:
            log.warning("pins on %s changed %d times while loading them; will retry at the next heartbeat",
                        self.meta, self.PINS_RESTARTS + 1)
            return
        new_generation, ids = loaded
        self._pool.set_pinned(ids)
        self.pins_generation = new_generation
        log.info("pins generation %d: %d pinned chunks", new_generation, len(ids))

    async def _load_pins(self, stub: pbg.MetaStub) -> tuple[int, list[str]] | None:
        """Every pinned id of one pins generation, paged (see PinnedChunksRequest
        in meta.proto); None when the pins kept changing under the pager."""
        resp = await stub.PinnedChunks(pb.PinnedChunksRequest(), timeout=RPC_TIMEOUT)
        generation, ids, restarts = resp.generation, unpack_ids(resp.ids), 0
        while resp.next_page_token:
            resp = await stub.PinnedChunks(pb.PinnedChunksRequest(page_token=resp.next_page_token),
                                           timeout=RPC_TIMEOUT)
            if resp.generation != generation:
                # The pins changed: this reply is the first page of the new generation.
                restarts += 1
                if restarts > self.PINS_RESTARTS:
                    return None
                generation, ids = resp.generation, []
            ids.extend(unpack_ids(resp.ids))
        return generation, ids
