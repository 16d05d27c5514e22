"""The ``sdcache.v1.Meta`` gRPC servicer: a thin adapter over a :class:`MetaStore`.

Each handler converts the request, runs the blocking store call in a thread
and converts the answer. Reads and writes have a small thread pool each (the
store gives every thread its own connection); concurrent writes share one
fsync through the store's group commit. Errors leave as gRPC
status codes with the ``sdcache-error`` trailer naming the exact class.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from .. import errors, paths
from .._proto import meta_pb2 as pb
from .._proto import meta_pb2_grpc
from ..manifest import Manifest
from ..placement import NodeInfo, ReplicaPolicy, check_replicas, effective_replicas
from ..store.base import MetaStore, NodeRecord
from . import convert, metrics
from .fanout import Fanout, WarmStatus
from .repair import Repairer
from .runners import RunnerRegistry
from .tokens import TokenAuthority

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A node is live while its last heartbeat is this many intervals old or newer.
MISSED_HEARTBEATS = 3
READ_THREADS = 4
WRITE_THREADS = 8  # writes in flight at once: the most one group commit can batch


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if not isinstance(exc, errors.SdcacheError):
        log.error("internal error", exc_info=exc)
        exc = errors.SdcacheError(f"internal error: {type(exc).__name__}: {exc}")
    code, details, trailer = convert.status_of(exc)
    await context.abort(code, details, trailing_metadata=trailer)


def _code_name(exc: BaseException) -> str:
    """The gRPC status name a failure leaves as (what :func:`_abort` sends)."""
    return exc.grpc_code if isinstance(exc, errors.SdcacheError) else "INTERNAL"


def _unary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Send any exception of a unary handler as its status code; time it and count its errors."""
    method = fn.__name__
    seconds = metrics.RPC_SECONDS.labels(method)

    @functools.wraps(fn)
    async def handler(self: MetaServicer, request: Any, context: grpc.aio.ServicerContext) -> T:
        t0 = time.perf_counter()
        try:
            return await fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            metrics.RPC_ERRORS.labels(method, _code_name(exc)).inc()
            await _abort(context, exc)
            raise AssertionError("unreachable: abort raises")
        finally:
            seconds.observe(time.perf_counter() - t0)

    return handler


def _warm_to_proto(s: WarmStatus) -> pb.WarmupProgress:
    return pb.WarmupProgress(
        path=s.path,
        total_bytes=s.total_bytes,
        done_bytes=s.done_bytes,
        pool_capacity=s.pool_capacity,
        fits_bytes=s.fits_bytes,
        message=s.message,
        done=s.done,
    )


class MetaServicer(meta_pb2_grpc.MetaServicer):
    """Serves one :class:`MetaStore`; owns the threads that call it."""

    def __init__(
        self,
        store: MetaStore,
        fanout: Fanout,
        *,
        heartbeat_interval: float = 1.0,
        store_url: str,
        authority: TokenAuthority,
        replicas: int = 1,
    ) -> None:
        self.store = store
        self.fanout = fanout
        self.authority = authority
        self.heartbeat_interval = heartbeat_interval
        self.store_url = store_url
        self.default_replicas = check_replicas(replicas)
        # The overrides, re-read at most once per heartbeat interval (another service over a shared
        # store may change them); a change made here applies at once.
        self._policy = ReplicaPolicy(self.default_replicas)
        self._policy_at = float("-inf")
        self._replicated: tuple[tuple[Any, ...], int] | None = None  # (inputs, replicated bytes)
        #: Re-makes missing replicas from peers after the node set or the policy changed; its
        #: ``run()`` is the service's to start (sdcache/meta/server.py).
        self.repairer = Repairer(fanout.client, self._live_infos, self._all_files, self.policy,
                                 interval=heartbeat_interval)
        self.runners = RunnerRegistry(report_interval=heartbeat_interval)
        self._writer = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="meta-write")
        self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="meta-read")

    def close(self) -> None:
        """Stop the store threads (after the server stopped taking calls)."""
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)

    def read_blocking(self, fn: Callable[..., T], *args: Any, timeout: float) -> T:
        """*fn* on a reader thread, called from a thread other than the event loop's (a metrics scrape)."""
        return self._readers.submit(fn, *args).result(timeout)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def policy(self) -> ReplicaPolicy:
        """The replica policy: ``--replicas`` and the store's per-path overrides."""
        now = time.monotonic()
        if now - self._policy_at >= self.heartbeat_interval:
            overrides = await self._read(self.store.replica_overrides)
            self._policy = ReplicaPolicy(self.default_replicas, overrides)
            self._policy_at = now
        return self._policy

    async def _placed(self, m: Manifest) -> Manifest:
        """*m* with its replica count under the policy (what readers place its chunks with)."""
        m.replicas = (await self.policy()).for_path(m.path)
        return m

    async def _live_infos(self) -> list[NodeInfo]:
        return [n.info() for n in await self._live_nodes()]

    async def _all_files(self) -> list[Manifest]:
        policy = await self.policy()
        files = await self._read(self.store.resolve_files, "/", True)
        for m in files:
            m.replicas = policy.for_path(m.path)
        return files

    async def _live_nodes(self) -> list[NodeRecord]:
        nodes = await self._read(self.store.list_nodes)
        return [n for n in nodes if self._alive(n, time.time())]

    def _alive(self, node: NodeRecord, now: float) -> bool:
        return now - node.last_seen <= MISSED_HEARTBEATS * self.heartbeat_interval

    async def _resolve(self, requested: list[str], recursive: bool) -> list[Manifest]:
        """The files of every requested path, each once, in request order."""
        if not requested:
            raise errors.InvalidArgument("no paths given")
        seen: dict[str, Manifest] = {}
        policy = await self.policy()
        for p in requested:
            for m in await self._read(self.store.resolve_files, p, recursive):
                m.replicas = policy.for_path(m.path)
                seen.setdefault(m.path, m)
        return list(seen.values())

    # -- namespace -----------------------------------------------------------

    @_unary
    async def Stat(self, request: pb.PathRequest, context: grpc.aio.ServicerContext) -> pb.Entry:
        return convert.entry_to_proto(await self._read(self.store.stat, request.path))

    @_unary
    async def GetManifest(self, request: pb.PathRequest, context: grpc.aio.ServicerContext) -> pb.Manifest:
        return convert.manifest_to_proto(await self._placed(await self._read(self.store.get_manifest, request.path)))

    @_unary
    async def List(self, request: pb.ListRequest, context: grpc.aio.ServicerContext) -> pb.ListResponse:
        entries, token = await self._read(self.store.list_dir, request.path, request.page_token, request.page_size)
        reply = pb.ListResponse(next_page_token=token)
        convert.add_entries(reply.entries, entries)
        return reply

    @_unary
    async def Commit(self, request: pb.CommitRequest, context: grpc.aio.ServicerContext) -> pb.CommitResponse:
        manifest = convert.manifest_from_proto(request.manifest)
        return pb.CommitResponse(generation=await self._write(self.store.commit, manifest))

    @_unary
    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        return pb.DeleteResponse(deleted=await self._write(self.store.delete, request.path, request.recursive))

    # -- nodes ---------------------------------------------------------------

    @_unary
    async def RegisterNode(self, request: pb.Node, context: grpc.aio.ServicerContext) -> pb.RegisterResponse:
        node = convert.node_from_proto(request, time.time())
        await self._write(self.store.register_node, node)
        log.info("node %s registered at %s (%d bytes, %s)", node.node_id, node.address, node.capacity, node.role,
                 extra={"node": node.node_id, "method": "RegisterNode"})
        return pb.RegisterResponse(
            heartbeat_interval=self.heartbeat_interval,
            pins_generation=await self._read(self.store.pins_generation),
            auth_generation=await self._read(self.store.auth_generation),
            store_url=self.store_url,
        )

    @_unary
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        known = await self._write(self.store.heartbeat, request.node_id, request.used, request.chunks, time.time())
        auth_generation = await self._read(self.store.auth_generation)
        # Heartbeats arrive every interval: this is also when a service over a
        # shared store picks up revocations another service made.
        await self._read(self.authority.follow, auth_generation)
        return pb.HeartbeatResponse(
            known=known,
            pins_generation=await self._read(self.store.pins_generation),
            auth_generation=auth_generation,
        )

    @_unary
    async def ListNodes(self, request: pb.NodesRequest, context: grpc.aio.ServicerContext) -> pb.NodesResponse:
        now = time.time()
        out = []
        for n in await self._read(self.store.list_nodes):
            alive = self._alive(n, now)
            if alive or request.include_dead:
                out.append(convert.node_to_proto(n, alive))
        return pb.NodesResponse(nodes=out)

    # -- pins ----------------------------------------------------------------

    @_unary
    async def Pin(self, request: pb.PinRequest, context: grpc.aio.ServicerContext) -> pb.PinResponse:
        return pb.PinResponse(files=await self._write(self.store.pin, request.path, request.recursive))

    @_unary
    async def Unpin(self, request: pb.PinRequest, context: grpc.aio.ServicerContext) -> pb.PinResponse:
        return pb.PinResponse(files=await self._write(self.store.unpin, request.path, request.recursive))

    #: ids per PinnedChunks page by default and at most: 1 MiB, well under
    #: gRPC's default 4 MiB receive limit that nodes keep.
    PINS_PAGE_IDS = 65_536
    # The pinned id set of the newest pins generation seen, as the store made
    # it (sorted, each id once), and the one store read that makes it.
    _pins_snapshot: tuple[int, bytes] | None = None
    _pins_loading: asyncio.Future[tuple[int, bytes]] | None = None

    @_unary
    async def PinnedChunks(
        self, request: pb.PinnedChunksRequest, context: grpc.aio.ServicerContext
    ) -> pb.PinnedChunksResponse:
        generation, ids = await self._pinned_snapshot()
        count = len(ids) // 16  # 16-byte digests
        start = 0
        if request.page_token:
            token_generation, start = self._parse_pins_token(request.page_token)
            if token_generation != generation:
                start = 0  # the pins changed: this reply is the new generation's first page
            elif start > count:
                raise errors.InvalidArgument(f"page token {request.page_token!r} is past the end")
        end = min(start + min(request.page_size or self.PINS_PAGE_IDS, self.PINS_PAGE_IDS), count)
        return pb.PinnedChunksResponse(
            generation=generation,
            ids=ids[16 * start : 16 * end],
            next_page_token=f"{generation}:{end}" if end < count else "",
        )

    @staticmethod
    def _parse_pins_token(token: str) -> tuple[int, int]:
        """``"<pins generation>:<index of the page's first id>"`` to its two numbers."""
        generation, sep, index = token.partition(":")
        # ASCII digits only, and short: str.isdigit() takes "²", which int() refuses, and int()
        # refuses over 4,300 digits; either would leave as INTERNAL instead of INVALID_ARGUMENT.
        if not (sep and len(token) <= 64 and token.isascii() and generation.isdigit() and index.isdigit()):
            raise errors.InvalidArgument(f"not a PinnedChunks page token: {token[:80]!r}")
        return int(generation), int(index)

    async def _pinned_snapshot(self) -> tuple[int, bytes]:
        """``(pins generation, ids)`` of the current pins, computed from the store
        once per generation however many pages and nodes ask meanwhile."""
        generation = await self._read(self.store.pins_generation)
        snapshot = self._pins_snapshot
        if snapshot is not None and snapshot[0] == generation:
            return snapshot
        loading = self._pins_loading
        if loading is None or loading.done():
            loading = self._pins_loading = asyncio.ensure_future(self._read(self.store.pinned_chunks))
        snapshot = await asyncio.shield(loading)
        if snapshot[0] < generation:  # that read began before the pins changed
            snapshot = await self._read(self.store.pinned_chunks)
        if self._pins_snapshot is None or snapshot[0] >= self._pins_snapshot[0]:
            self._pins_snapshot = snapshot
        return snapshot

    # -- warm-up, eviction, totals ------------------------------------------

    async def Warmup(
        self, request: pb.WarmupRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WarmupProgress]:
        t0 = time.perf_counter()
        try:
            files = await self._resolve(list(request.paths), request.recursive)
            nodes = [n.info() for n in await self._live_nodes()]
            what = paths.normalize(request.paths[0]) if len(request.paths) == 1 else f"{len(request.paths)} paths"
            run = self.fanout.check if request.check else self.fanout.warm
            async for status in run(what, files, nodes):
                yield _warm_to_proto(status)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            metrics.RPC_ERRORS.labels("Warmup", _code_name(exc)).inc()
            await _abort(context, exc)
        finally:
            metrics.RPC_SECONDS.labels("Warmup").observe(time.perf_counter() - t0)

    @_unary
    async def Evict(self, request: pb.EvictRequest, context: grpc.aio.ServicerContext) -> pb.EvictResponse:
        files = await self._resolve(list(request.paths), request.recursive)
        nodes: list[NodeInfo] = [n.info() for n in await self._live_nodes()]
        chunks, nbytes = await self.fanout.evict(files, nodes)
        return pb.EvictResponse(chunks=chunks, bytes=nbytes)

    @_unary
    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        s = await self._read(self.store.stats)
        live = await self._live_nodes()
        return pb.StatsResponse(
            replicated_bytes=await self._replicated_bytes(s, [n.info() for n in live]),
            replicas=self.default_replicas,
            zones=len({n.zone for n in live}),
            files=s.files,
            bytes=s.bytes,
            unique_chunks=s.unique_chunks,
            unique_bytes=s.unique_bytes,
            nodes=len(live),
            capacity=sum(n.capacity for n in live),
            used=sum(n.used for n in live),
            pinned_files=s.pinned_files,
            store_url=self.store_url,
        )

    async def _replicated_bytes(self, s: Any, live: list[NodeInfo]) -> int:
        """Deduplicated bytes counted once per replica (each chunk at the most replicas a file
        holding it asks for, capped at the live nodes). Without overrides this is one product;
        with them every manifest is read, once per change of the namespace, policy or nodes."""
        policy = await self.policy()
        if not policy.overrides:
            return s.unique_bytes * effective_replicas(policy.default, live)
        key = (s.files, s.bytes, s.unique_bytes, tuple(sorted(policy.overrides.items())), len(live))
        if self._replicated is not None and self._replicated[0] == key:
            return self._replicated[1]

        def scan() -> int:
            most: dict[str, tuple[int, int]] = {}  # chunk id -> (length, replicas)
            for m in self.store.resolve_files("/", True):
                n = effective_replicas(policy.for_path(m.path), live)
                for c in m.chunks:
                    if most.get(c.id, (0, -1))[1] < n:
                        most[c.id] = (c.length, n)
            return sum(length * n for length, n in most.values())

        total = await self._read(scan)
        self._replicated = (key, total)
        return total

    # -- replica policy ------------------------------------------------------

    async def _replicas_reply(self, path: str) -> pb.ReplicasResponse:
        policy = await self.policy()
        live = await self._live_nodes()
        reply = pb.ReplicasResponse(
            default_replicas=policy.default,
            overrides=[pb.ReplicaRule(path=p, replicas=n) for p, n in sorted(policy.overrides.items())],
            live_nodes=len(live),
            live_zones=len({n.zone for n in live}),
        )
        if path:
            reply.path = path
            reply.replicas = policy.for_path(path)
        want = reply.replicas if path else max([policy.default, *policy.overrides.values()])
        if want > len(live):
            reply.warning = (f"{want} replicas wanted but only {len(live)} live node{'s' if len(live) != 1 else ''}:"
                             f" each chunk is kept on {len(live)} until more join")
        return reply

    @_unary
    async def SetReplicas(self, request: pb.ReplicaRule, context: grpc.aio.ServicerContext) -> pb.ReplicasResponse:
        path = paths.normalize(request.path)
        if request.replicas:
            check_replicas(request.replicas, "replicas")
        await self._write(self.store.set_replicas, path, request.replicas)
        self._policy_at = float("-inf")  # applies here at once
        log.info("replicas of %s: %s", path, request.replicas or f"the default ({self.default_replicas})",
                 extra={"path": path, "method": "SetReplicas"})
        self.repairer.poke()
        return await self._replicas_reply(path)

    @_unary
    async def GetReplicas(self, request: pb.ReplicasRequest,
                          context: grpc.aio.ServicerContext) -> pb.ReplicasResponse:
        return await self._replicas_reply(paths.normalize(request.path) if request.path else "")

    @_unary
    async def GetConfig(self, request: pb.ConfigRequest, context: grpc.aio.ServicerContext) -> pb.ConfigResponse:
        return pb.ConfigResponse(store_url=self.store_url)

    # -- tokens (checked by grpcauth.AuthInterceptor before any of these runs) --

    @_unary
    async def CreateToken(
        self, request: pb.CreateTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTokenResponse:
        token, record = await self._write(self.authority.create, request.name, request.role, request.ttl_seconds)
        return pb.CreateTokenResponse(token=token, info=convert.token_to_proto(record))

    @_unary
    async def ListTokens(self, request: pb.ListTokensRequest, context: grpc.aio.ServicerContext) -> pb.ListTokensResponse:
        return pb.ListTokensResponse(tokens=[convert.token_to_proto(t) for t in await self._read(self.store.list_tokens)])

    @_unary
    async def RevokeToken(self, request: pb.RevokeTokenRequest, context: grpc.aio.ServicerContext) -> pb.TokenInfo:
        return convert.token_to_proto(await self._write(self.authority.revoke, request.name))

    @_unary
    async def AuthState(self, request: pb.AuthStateRequest, context: grpc.aio.ServicerContext) -> pb.AuthStateResponse:
        generation = await self._read(self.store.auth_generation)
        revoked = [convert.token_to_proto(t) for t in await self._read(self.store.list_tokens) if t.revoked]
        return pb.AuthStateResponse(enabled=self.authority.enabled, public_keys=self.authority.public_keys(),
                                    revoked=revoked, generation=generation)

    # -- runners (soft state in memory; see runners.py) ------------------------

    @_unary
    async def ReportRunner(self, request: pb.RunnerReport,
                           context: grpc.aio.ServicerContext) -> pb.RunnerReportResponse:
        new = request.runner_id not in {r.runner_id for r, _ in self.runners.live()}
        self.runners.report(request.runner_id, request.address, request.state, request.ttl)
        if new:
            log.info("runner %s reports from %s", request.runner_id, request.address,
                     extra={"method": "ReportRunner"})
        return pb.RunnerReportResponse(report_interval=self.heartbeat_interval,
                                       auth_generation=await self._read(self.store.auth_generation))

    @_unary
    async def ListRunners(self, request: pb.RunnersRequest, context: grpc.aio.ServicerContext) -> pb.RunnersResponse:
        return pb.RunnersResponse(runners=[
            pb.RunnerInfo(runner_id=r.runner_id, address=r.address, state=r.state, age=age)
            for r, age in self.runners.live()
        ])
