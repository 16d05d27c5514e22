"""The cache node: aiohttp chunk API over a ChunkPool, registration, entry point.

HTTP chunk API (contract; the client and the metadata service speak it).
Every request but ``/healthz`` carries ``Authorization: Bearer TOKEN``; the
role each route needs is :data:`sdcache.auth.HTTP_ROLES` (``read`` for chunks,
``/has`` and ``/stats``; ``admin`` for ``/warm`` and ``/evict``). Tokens are
checked here, against the keys and revocations the metadata service hands
the node (:mod:`node.registration`), with no call per request.

``GET /chunks/{id}?path=CACHEPATH``
    200 with exactly the chunk's bytes; ``X-Sdcache-Hit: 1`` from the pool,
    ``0`` read through. On a miss the node reads *path*'s committed manifest
    and, if it holds the chunk, that entry's byte range of its source; a
    request never names a URL or range (``src``/``off``/``len`` are 400).
    Without *path* a pool miss is 404. Every chunk is verified before it is
    served. 503 ``Overloaded`` with ``Retry-After`` when the bytes in flight
    would pass ``--max-inflight``.
``HEAD /chunks/{id}``
    200 if the pool holds it, else 404.
``POST /has`` ``{"ids": [...]}`` -> ``{"present": [...]}``
``POST /warm`` ``{"path", "ids": [...]}`` ->
    ``{"loaded", "bytes", "present", "failed": [{"id", "error", "message"}], "no_space"}``
``POST /evict`` ``{"path", "ids"?}`` -> ``{"chunks", "bytes"}``
``GET /stats``, ``GET /healthz``

Errors are JSON ``{"error": ClassName, "message": ...}`` with the class's
HTTP status (401 no or bad token, 403 wrong role);
:func:`sdcache.errors.from_wire` rebuilds them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from sdcache import DEFAULT_META, auth, tls
from sdcache import paths as cache_paths
from sdcache._proto import meta_pb2 as pb
from sdcache.chunking import CHUNK_SIZE
from sdcache.errors import (
    CapacityExceeded,
    InvalidArgument,
    NotFound,
    Overloaded,
    SdcacheError,
    StaleSource,
    Unavailable,
    error_name,
)
from sdcache.hostid import host_id
from sdcache.units import format_size, parse_size

from .locator import SourceLocator, SourceRange
from .pool import ChunkPool, default_pool_dir
from .registration import Registration
from .singleflight import SingleFlight
from .underfs import UnderStore

log = logging.getLogger(__name__)

ROLES = ("gpu", "memory")
WARM_CONCURRENCY = 8  # chunks one /warm request loads at a time
MAX_BODY = 8 << 20  # /warm, /has and /evict list up to ~100,000 ids
MAX_IDS = 100_000  # ids one request may name
DEFAULT_MAX_INFLIGHT = 512 << 20  # chunk bytes held for requests at once
RETRY_AFTER_S = 1
BACKLOG = 2048
KEEPALIVE_S = 75.0
HIT_HEADER = "X-Sdcache-Hit"
_OCTETS = "application/octet-stream"
_HEX = re.compile(r"[0-9a-f]{32}")


# --------------------------------------------------------------------------- the node's logic


class InflightBudget:
    """Bytes of chunk data the node holds for requests at once, bounded.

    Reads take their chunk's size before touching the pool and give it back
    when the response is written; over the bound a read is refused
    (:class:`Overloaded`, 503 + ``Retry-After``) rather than queued, so a
    client tries another node. Warm-ups wait for room instead.
    """

    def __init__(self, limit: int) -> None:
        if limit < CHUNK_SIZE:
            raise InvalidArgument(f"--max-inflight must be at least one chunk ({format_size(CHUNK_SIZE)})")
        self.limit = limit
        self.used = 0
        self.refused = 0
        self._freed = asyncio.Condition()

    def try_take(self, n: int) -> None:
        if self.used + n > self.limit:
            self.refused += 1
            raise Overloaded(f"node busy: {format_size(self.used)} of {format_size(self.limit)} in flight; "
                             f"retry in {RETRY_AFTER_S}s or ask another node")
        self.used += n

    async def take(self, n: int) -> None:
        async with self._freed:
            await self._freed.wait_for(lambda: self.used + n <= self.limit)
            self.used += n

    async def give(self, n: int) -> None:
        self.used -= n
        async with self._freed:
            self._freed.notify_all()


class ChunkService:
    """Serve chunks from the pool, reading through from the under-store on a miss.

    Read-through reads only ranges that *locator* finds in committed manifests.
    """

    def __init__(self, pool: ChunkPool, under: UnderStore | None = None, *,
                 locator: SourceLocator | None = None, max_inflight: int = DEFAULT_MAX_INFLIGHT) -> None:
        self.pool = pool
        self.under = under or UnderStore()
        self.locator = locator or SourceLocator(None)
        self.budget = InflightBudget(max_inflight)
        self.flights: SingleFlight[str, tuple[bytes, bool]] = SingleFlight()
        self._flight_src: dict[str, str] = {}

    async def read_pool(self, chunk_id: str, path: str | None) -> bytes | None:
        """Verified bytes from the pool, or None."""
        if chunk_id not in self.pool:
            return self.pool.get(chunk_id, path)  # counts the miss; touches no file
        return await asyncio.to_thread(self.pool.get, chunk_id, path)

    async def read_through(self, chunk_id: str, where: SourceRange, path: str | None) -> tuple[bytes, bool]:
        """Fetch a chunk from the under-store (one fetch per id at a time) and keep it if it fits.

        *where* comes from a committed manifest (:class:`SourceLocator`), never
        from a request. Returns (bytes, kept). Raises StaleSource or Unavailable.
        """
        src = where.url

        async def flight() -> tuple[bytes, bool]:
            data = await self.under.read(src, where.offset, where.length, chunk_id)
            try:
                await asyncio.to_thread(self.pool.put, chunk_id, data, path)
            except CapacityExceeded as e:
                log.debug("not keeping chunk %s: %s", chunk_id, e)
                return data, False
            except OSError as e:
                log.warning("cannot write chunk %s to the pool: %s", chunk_id, e)
                return data, False
            return data, True

        flight_src = self._flight_src.get(chunk_id) if self.flights.in_flight(chunk_id) else None
        if flight_src is None:
            self._flight_src[chunk_id] = src
        try:
            (data, kept), joined = await self.flights.do(chunk_id, flight)
        except StaleSource:
            # A flight we joined read another file that holds this chunk and
            # found it changed; our own source may still be good.
            if flight_src is None or flight_src == src:
                raise
            return await self.read_through(chunk_id, where, path)
        finally:
            if not self.flights.in_flight(chunk_id):
                self._flight_src.pop(chunk_id, None)
        if joined and kept and path is not None:
            self.pool.touch(chunk_id, path)
        return data, kept

    async def get(self, chunk_id: str, path: str | None) -> tuple[bytes, bool]:
        """(bytes, hit): from the pool if it holds a good copy, else read through from *path*'s manifest."""
        credited = path if path is not None and self.locator.known(path, chunk_id) else None
        data = await self.read_pool(chunk_id, credited)
        if data is not None:
            return data, True
        if path is None:
            raise NotFound(f"chunk {chunk_id} is not in this node's pool")
        where = await self.locator.locate(path, chunk_id)
        data, _ = await self.read_through(chunk_id, where, path)
        return data, False

    async def warm(self, path: str, ids: list[str]) -> dict[str, Any]:
        """Load chunks *ids* of file *path* into the pool, up to WARM_CONCURRENCY at a time."""
        result: dict[str, Any] = {"loaded": 0, "bytes": 0, "present": 0, "failed": [], "no_space": 0}
        sem = asyncio.Semaphore(WARM_CONCURRENCY)

        async def one(chunk_id: str) -> None:
            async with sem:
                if self.pool.touch(chunk_id, path):
                    result["present"] += 1
                    return
                try:
                    where = await self.locator.locate(path, chunk_id)
                    if not self.pool.can_admit(where.length, path):
                        result["no_space"] += 1
                        return
                    await self.budget.take(where.length)
                    try:
                        _, kept = await self.read_through(chunk_id, where, path)
                    finally:
                        await self.budget.give(where.length)
                except SdcacheError as e:
                    result["failed"].append({"id": chunk_id, "error": error_name(e), "message": str(e)})
                    return
                if kept:
                    result["loaded"] += 1
                    result["bytes"] += where.length
                else:
                    result["no_space"] += 1

        async with asyncio.TaskGroup() as tg:
            for chunk_id in dict.fromkeys(ids):  # each id once
                tg.create_task(one(chunk_id))
        return result


def _check_ids(ids: Any, what: str) -> list[str]:
    if not isinstance(ids, list):
        raise InvalidArgument(f'{what}: "ids" must be a list of chunk ids')
    if len(ids) > MAX_IDS:
        raise InvalidArgument(f"{what}: at most {MAX_IDS} ids per request, got {len(ids)}")
    return [_check_id(i) for i in ids]


def _check_id(chunk_id: Any) -> str:
    if not isinstance(chunk_id, str) or not _HEX.fullmatch(chunk_id):
        raise InvalidArgument(f"not a chunk id (32 lowercase hex digits): {chunk_id!r}")
    return chunk_id


def _opt_path(path: Any) -> str | None:
    if path is None or path == "":
        return None
    return cache_paths.normalize(path)


# --------------------------------------------------------------------------- HTTP adapter


def _error_response(exc: SdcacheError) -> web.Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.http_status == 503 else None
    if exc.http_status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="sdcache"'}
    return web.json_response({"error": error_name(exc), "message": str(exc)}, status=exc.http_status,
                             headers=headers)


def _refusal_response(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no such route, wrong method, body over MAX_BODY) as contract JSON.

    The status stays aiohttp's (404, 405, 413); the error is NotFound for 404 and
    InvalidArgument for any other refused request, so clients rebuild it like ours.
    """
    kind = NotFound if exc.status == 404 else InvalidArgument
    message = exc.text or exc.reason
    if exc.status in (404, 405):
        message = f"{message}: {request.method} {request.path[:200]}"
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
    return web.json_response({"error": kind.__name__, "message": message}, status=exc.status, headers=headers)


def _auth(verifier: auth.TokenVerifier) -> Callable[..., Any]:
    """Checks every request's bearer token and role before its handler runs."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if resource is None:  # 404/405: aiohttp answers, nothing is read
            return await handler(request)
        need = auth.HTTP_ROLES.get((request.method, resource.canonical), "admin")  # a route missing from the table is admin-only
        if need is not None and verifier.enabled and not verifier.ready:
            raise Unavailable("this node has not loaded its token keys from the metadata service yet")
        verifier.check(auth.bearer(request.headers.get("Authorization")), need)
        return await handler(request)

    return middleware


@web.middleware
async def _errors(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    try:
        return await handler(request)
    except SdcacheError as e:
        return _error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _refusal_response(request, e)
    except ConnectionError:
        raise  # a client that hung up mid-body is aiohttp's to handle
    except Exception as e:  # noqa: BLE001 - the client must get JSON, not a traceback page
        log.exception("error handling %s %s", request.method, request.path)
        return web.json_response({"error": "SdcacheError", "message": f"{type(e).__name__}: {e}"}, status=500)


async def _json(request: web.Request) -> dict[str, Any]:
    declared = request.content_length
    if declared is not None and declared > MAX_BODY:
        # Refused on the header alone: aiohttp would read MAX_BODY bytes first, or wait for them.
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=declared)
    try:
        body = await request.json()
    except ValueError as e:
        raise InvalidArgument(f"request body is not JSON: {e}") from None
    except RecursionError:  # json's decoder recurses per [ or {: a body of 100,000 of them is a 500 otherwise
        raise InvalidArgument("request body is nested too deeply to be a request") from None
    if not isinstance(body, dict):
        raise InvalidArgument("request body must be a JSON object")
    return body


_REFUSED_PARAMS = ("src", "off", "len")


class NodeApp:
    """The aiohttp handlers of one node."""

    def __init__(self, service: ChunkService, info: Callable[[], dict[str, Any]],
                 verifier: auth.TokenVerifier) -> None:
        self.service = service
        self._info = info
        self.verifier = verifier

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[_errors, _auth(self.verifier)], client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/chunks/{id}", self.get_chunk, allow_head=False)
        r.add_route("HEAD", "/chunks/{id}", self.head_chunk)
        r.add_post("/has", self.has)
        r.add_post("/warm", self.warm)
        r.add_post("/evict", self.evict)
        r.add_get("/stats", self.stats)
        r.add_get("/healthz", self.healthz)
        return app

    async def get_chunk(self, request: web.Request) -> web.StreamResponse:
        chunk_id = _check_id(request.match_info["id"])
        q = request.query
        refused = [p for p in _REFUSED_PARAMS if p in q]
        if refused:
            raise InvalidArgument(f"{', '.join(refused)} not accepted: a node reads only byte ranges of "
                                  "committed manifests; send path=CACHEPATH")
        path = _opt_path(q.get("path"))
        budget = self.service.budget
        reserved = self.service.pool.size_of(chunk_id) or CHUNK_SIZE
        budget.try_take(reserved)
        try:
            data, hit = await self.service.get(chunk_id, path)
            self.service.pool.record_served(len(data))
            # StreamResponse with the headers sent on their own: aiohttp would
            # otherwise join them with the body, one more 4 MiB copy per GET on
            # Python 3.11 (see benchmarks/bench_node.py).
            resp = web.StreamResponse(headers={HIT_HEADER: "1" if hit else "0", "Content-Type": _OCTETS})
            resp.content_length = len(data)
            await resp.prepare(request)
            request.writer.send_headers()
            await resp.write(data)
            del data
            await resp.write_eof()
        finally:
            await budget.give(reserved)
        return resp

    async def head_chunk(self, request: web.Request) -> web.StreamResponse:
        chunk_id = _check_id(request.match_info["id"])
        size = self.service.pool.size_of(chunk_id)
        if size is None:
            return web.Response(status=404)
        return web.Response(status=200, headers={"Content-Length": str(size)})

    async def has(self, request: web.Request) -> web.StreamResponse:
        ids = _check_ids((await _json(request)).get("ids"), "has")
        return web.json_response({"present": self.service.pool.present(ids)})

    async def warm(self, request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        if "chunks" in body:
            raise InvalidArgument('warm takes {"path": p, "ids": [...]}: a node reads only committed manifests')
        path = _opt_path(body.get("path"))
        if path is None:
            raise InvalidArgument('warm needs the file\'s "path"')
        return web.json_response(await self.service.warm(path, _check_ids(body.get("ids"), "warm")))

    async def evict(self, request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        path = _opt_path(body.get("path"))
        ids = body.get("ids")
        if ids is not None:
            ids = _check_ids(ids, "evict")
        if path is None and ids is None:
            raise InvalidArgument("evict needs a path, ids or both")
        n, nbytes = await asyncio.to_thread(self.service.pool.evict, path, ids)
        return web.json_response({"chunks": n, "bytes": nbytes})

    async def stats(self, request: web.Request) -> web.StreamResponse:
        s: dict[str, Any] = self.service.pool.stats().as_dict()
        s.update(self.service.under.stats.as_dict())
        s["singleflight_joined"] = self.service.flights.joined
        s["inflight_bytes"] = self.service.budget.used
        s["inflight_limit"] = self.service.budget.limit
        s["overloaded"] = self.service.budget.refused
        s["manifest_lookups"] = self.service.locator.lookups
        s["pinned_ids"] = len(self.service.pool.pinned)  # pinned by the service; "pinned" = of those, held here
        s.update(self._info())
        return web.json_response(s)

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")


# --------------------------------------------------------------------------- the server


def split_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) to (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"not HOST:PORT: {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _write_ready_file(path: str, address: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(address + "\n")
    os.replace(tmp, path)


class NodeServer:
    """One cache node: pool, chunk API and (with *meta*) registration.

    ``await start()`` binds, adopts the pool directory and starts serving;
    ``await stop()`` shuts down. Usable in-process (tests, ``sdcache up``).
    """

    def __init__(
        self,
        *,
        capacity: int,
        listen: str = "127.0.0.1:0",
        meta: str | None = None,
        role: str = "memory",
        pool_dir: str | None = None,
        node_id: str | None = None,
        advertise: str | None = None,
        credentials: tls.Credentials | None = None,
        insecure_no_auth: bool = False,
        require_client_cert: bool = False,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        allow_sources: tuple[str, ...] = (),
    ) -> None:
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if capacity <= 0:
            raise InvalidArgument("capacity must be positive")
        self.capacity = capacity
        self.listen = listen
        self.meta = meta
        self.role = role
        self.node_id = node_id
        self.pool_dir = pool_dir
        self.advertise = advertise
        self.credentials = credentials or tls.Credentials()
        self.require_client_cert = require_client_cert
        self.max_inflight = max_inflight
        self.allow_sources = allow_sources
        if meta is None and not insecure_no_auth:
            raise InvalidArgument("a node without a metadata service (--meta none) cannot check tokens: "
                                  "pass --insecure-no-auth to run it open")
        if meta is not None and not self.credentials.token and not insecure_no_auth:
            raise InvalidArgument("a node needs a node token: --token-file FILE, $SDCACHE_TOKEN or "
                                  "$SDCACHE_TOKEN_FILE (create one with `sdcache token create --role node`)")
        # Until the metadata service hands over its keys, requests get 503.
        self.verifier = auth.TokenVerifier(enabled=not insecure_no_auth)
        self.address = ""  # host:port bound, once started
        self.pool: ChunkPool | None = None
        self.service: ChunkService | None = None
        self.registration: Registration | None = None
        self._runner: web.AppRunner | None = None
        self._reg_task: asyncio.Task[None] | None = None

    def _node_pb(self) -> pb.Node:
        assert self.pool is not None
        st = self.pool.stats()
        return pb.Node(
            node_id=self.node_id or "",
            address=self.advertise or self.address,
            capacity=self.capacity,
            role=self.role,
            host_id=host_id(),
            pool_dir=self.pool.pool_dir,
            used=st.used,
            chunks=st.chunks,
        )

    def _info(self) -> dict[str, Any]:
        assert self.pool is not None
        return {
            "node_id": self.node_id,
            "role": self.role,
            "pool_dir": self.pool.pool_dir,
            "host_id": host_id(),
            "address": self.advertise or self.address,
            "registered": bool(self.registration and self.registration.registered.is_set()),
            # the pins generation applied to the pool; None until registered and loaded
            "pins_generation": self.registration.pins_generation if self.registration else None,
        }

    async def start(self) -> str:
        """Bind, load the pool, serve; returns the HOST:PORT listened on."""
        host, port = split_hostport(self.listen)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            bound_host, bound_port = sock.getsockname()[:2]
            self.address = join_hostport(host if host else bound_host, bound_port)
            if self.node_id is None:
                # Stable across restarts, so the default pool directory is too;
                # a second node on this host needs its own --node-id (the pool
                # lock says so).
                self.node_id = socket.gethostname()
            if self.advertise is None and host in ("0.0.0.0", "::", ""):
                self.advertise = join_hostport(socket.gethostname(), bound_port)
            pool_dir = self.pool_dir or default_pool_dir(self.node_id)
            os.makedirs(pool_dir, exist_ok=True)
            free = _free_bytes(pool_dir) + await asyncio.to_thread(ChunkPool.bytes_on_disk, pool_dir)
            if self.capacity > free:
                raise CapacityExceeded(
                    f"--capacity {format_size(self.capacity)} is more than {pool_dir} can hold "
                    f"({format_size(free)} free)"
                )
            ssl_context = None
            if self.credentials.tls:
                ssl_context = self.credentials.tls.server_context(require_client_cert=self.require_client_cert)
            pool = self.pool = ChunkPool(pool_dir, self.capacity)
            await asyncio.to_thread(pool.load, workers=min(8, os.cpu_count() or 1))
            if self.meta:
                self.registration = Registration(self.meta, self._node_pb, pool, credentials=self.credentials,
                                                 verifier=self.verifier)
                reg = self.registration
                locator = SourceLocator(reg.get_manifest, lambda: reg.store_url, self.allow_sources)
            else:
                locator = SourceLocator(None)
            self.service = ChunkService(pool, locator=locator, max_inflight=self.max_inflight)
            app = NodeApp(self.service, self._info, self.verifier).make_app()
            self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_S)
            await self._runner.setup()
            site = web.SockSite(self._runner, sock, backlog=BACKLOG, ssl_context=ssl_context)
            await site.start()
        except BaseException:
            sock.close()
            if self._runner is not None:
                await self._runner.cleanup()
            if self.pool is not None:
                self.pool.close()
                self.pool = None
            raise
        if self.registration is not None:
            self._reg_task = asyncio.get_running_loop().create_task(self.registration.run())
        log.info("node %s serving %s (pool %s, capacity %s)", self.node_id, self.address, pool.pool_dir,
                 format_size(self.capacity))
        return self.address

    async def stop(self) -> None:
        if self._reg_task is not None:
            self._reg_task.cancel()
            try:
                await self._reg_task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001
                log.exception("registration loop failed")
            self._reg_task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.service is not None:
            await self.service.flights.close()
        if self.pool is not None:
            self.pool.close()


async def serve(
    *,
    capacity: int,
    listen: str = "127.0.0.1:0",
    meta: str | None = None,
    role: str = "memory",
    pool_dir: str | None = None,
    node_id: str | None = None,
    advertise: str | None = None,
    ready_file: str | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[NodeServer], None] | None = None,
    **options: Any,
) -> None:
    """Run a node until *stop* is set (or forever); prints the readiness line.

    *options* are :class:`NodeServer`'s auth, TLS and bound keywords.
    """
    server = NodeServer(
        capacity=capacity, listen=listen, meta=meta, role=role, pool_dir=pool_dir,
        node_id=node_id, advertise=advertise, **options,
    )
    address = await server.start()
    try:
        if ready_file:
            _write_ready_file(ready_file, address)
        print(f"sdcache node listening on {address}", flush=True)
        if on_ready is not None:
            on_ready(server)
        await (stop or asyncio.Event()).wait()
    finally:
        await server.stop()


# --------------------------------------------------------------------------- entry point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sdcache node`` options."""
    parser.add_argument("--meta", default=os.environ.get("SDCACHE_META") or DEFAULT_META,
                        help="metadata service HOST:PORT (default: $SDCACHE_META or %(default)s); "
                        "'none' runs a standalone node that registers nowhere")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to serve chunks on (default %(default)s)")
    parser.add_argument("--advertise", default=None,
                        help="HOST:PORT clients should use (default: the listen address)")
    parser.add_argument("--capacity", default="8GiB", help="pool size in bytes, e.g. 8GiB (default %(default)s)")
    parser.add_argument("--role", choices=ROLES, default="memory", help="gpu or memory (default %(default)s)")
    parser.add_argument("--pool-dir", default=None,
                        help="shared-memory pool directory (default /dev/shm/sdcache/<node-id>)")
    parser.add_argument("--node-id", default=None,
                        help="node id (default: the host name; a second node on one host needs its own)")
    parser.add_argument("--ready-file", default=None, help="write HOST:PORT here once listening")
    parser.add_argument("--max-inflight", default="512MiB",
                        help="chunk bytes held for requests at once; more get 503 + Retry-After "
                        "(default %(default)s)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="send no token and, with --meta none, accept every request (never on a shared network)")
    parser.add_argument("--allow-source", action="append", default=[], metavar="PREFIX",
                        help="read through only from sources under this URL prefix (repeatable; "
                        "e.g. s3://models/ or file:///nas/); default: any committed source")
    tls.add_server_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run a node from parsed ``add_arguments`` options; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        capacity = parse_size(args.capacity)
        split_hostport(args.listen)
        credentials = tls.Credentials(
            None if args.insecure_no_auth else auth.resolve_token(args.token_file),
            tls.TlsFiles.resolve(args.tls_cert, args.tls_key, args.tls_ca, env={}),
        )
        return asyncio.run(_run(args, capacity, credentials))
    except SdcacheError as e:
        print(f"sdcache node: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"sdcache node: error: {e.strerror or e} ({args.listen})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace, capacity: int, credentials: tls.Credentials) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    meta = None if args.meta in ("none", "") else args.meta
    await serve(
        capacity=capacity, listen=args.listen, meta=meta, role=args.role, pool_dir=args.pool_dir,
        node_id=args.node_id, advertise=getattr(args, "advertise", None), ready_file=args.ready_file, stop=stop,
        credentials=credentials, insecure_no_auth=args.insecure_no_auth,
        require_client_cert=args.tls_require_client_cert, max_inflight=parse_size(args.max_inflight),
        allow_sources=tuple(args.allow_source),
    )
    log.info("node stopped")
    return 0


def _cli(argv: list[str] | None = None) -> int:
    """``python -c 'from sdcache.node.server import _cli; _cli()'`` until ``sdcache node`` is wired."""
    parser = argparse.ArgumentParser(prog="sdcache node", description="Run an sdcache cache node.")
    add_arguments(parser)
    return main(parser.parse_args(argv))
