"""The cache node: aiohttp chunk API over a ChunkPool, registration, entry point.

HTTP chunk API (contract; the client and the metadata service speak it):

``GET /chunks/{id}?src=URL&off=INT&len=INT&path=CACHEPATH``
    200 with exactly the chunk's bytes; ``X-Sdcache-Hit: 1`` from the pool,
    ``0`` read through from *src*. Without src/off/len a pool miss is 404.
    Every chunk is verified before it is served.
``HEAD /chunks/{id}``
    200 if the pool holds it, else 404.
``POST /has`` ``{"ids": [...]}`` -> ``{"present": [...]}``
``POST /warm`` ``{"path", "chunks": [{"id", "src", "off", "len"}]}`` ->
    ``{"loaded", "bytes", "present", "failed": [{"id", "error", "message"}], "no_space"}``
``POST /evict`` ``{"path", "ids"?}`` -> ``{"chunks", "bytes"}``
``GET /stats``, ``GET /healthz``

Errors are JSON ``{"error": ClassName, "message": ...}`` with the class's
HTTP status; :func:`sdcache.errors.from_wire` rebuilds them.
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
import tempfile
from collections.abc import Callable
from typing import Any

from aiohttp import web

from sdcache import DEFAULT_META
from sdcache import paths as cache_paths
from sdcache._proto import meta_pb2 as pb
from sdcache.chunking import CHUNK_SIZE
from sdcache.errors import (
    CapacityExceeded,
    InvalidArgument,
    NotFound,
    SdcacheError,
    StaleSource,
    error_name,
)
from sdcache.hostid import host_id
from sdcache.units import format_size, parse_size

from .pool import ChunkPool
from .registration import Registration
from .singleflight import SingleFlight
from .underfs import UnderStore

log = logging.getLogger(__name__)

ROLES = ("gpu", "memory")
WARM_CONCURRENCY = 8  # chunks one /warm request loads at a time
MAX_BODY = 64 << 20  # /warm and /has bodies list thousands of chunks
BACKLOG = 2048
KEEPALIVE_S = 75.0
HIT_HEADER = "X-Sdcache-Hit"
_OCTETS = "application/octet-stream"
_HEX = re.compile(r"[0-9a-f]{32}")


# --------------------------------------------------------------------------- the node's logic


class ChunkService:
    """Serve chunks from the pool, reading through from the under-store on a miss."""

    def __init__(self, pool: ChunkPool, under: UnderStore | None = None) -> None:
        self.pool = pool
        self.under = under or UnderStore()
        self.flights: SingleFlight[str, tuple[bytes, bool]] = SingleFlight()
        self._flight_src: dict[str, str] = {}

    async def read_pool(self, chunk_id: str, path: str | None) -> bytes | None:
        """Verified bytes from the pool, or None."""
        if chunk_id not in self.pool:
            return self.pool.get(chunk_id, path)  # counts the miss; touches no file
        return await asyncio.to_thread(self.pool.get, chunk_id, path)

    async def read_through(self, chunk_id: str, src: str, off: int, length: int, path: str | None) -> tuple[bytes, bool]:
        """Fetch a chunk from the under-store (one fetch per id at a time) and keep it if it fits.

        Returns (bytes, kept). Raises StaleSource or Unavailable.
        """

        async def flight() -> tuple[bytes, bool]:
            data = await self.under.read(src, off, length, chunk_id)
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
            return await self.read_through(chunk_id, src, off, length, path)
        finally:
            if not self.flights.in_flight(chunk_id):
                self._flight_src.pop(chunk_id, None)
        if joined and kept and path is not None:
            self.pool.touch(chunk_id, path)
        return data, kept

    async def get(
        self, chunk_id: str, src: str | None, off: int, length: int, path: str | None
    ) -> tuple[bytes, bool]:
        """(bytes, hit): from the pool if it holds a good copy, else read through."""
        data = await self.read_pool(chunk_id, path)
        if data is not None:
            return data, True
        if src is None:
            raise NotFound(f"chunk {chunk_id} is not in this node's pool")
        data, _ = await self.read_through(chunk_id, src, off, length, path)
        return data, False

    async def warm(self, path: str | None, chunks: list[dict[str, Any]]) -> dict[str, Any]:
        """Load *chunks* of *path* into the pool, up to WARM_CONCURRENCY at a time."""
        result: dict[str, Any] = {"loaded": 0, "bytes": 0, "present": 0, "failed": [], "no_space": 0}
        sem = asyncio.Semaphore(WARM_CONCURRENCY)

        async def one(chunk_id: str, src: str, off: int, length: int) -> None:
            async with sem:
                if self.pool.touch(chunk_id, path):
                    result["present"] += 1
                    return
                if not self.pool.can_admit(length, path):
                    result["no_space"] += 1
                    return
                try:
                    _, kept = await self.read_through(chunk_id, src, off, length, path)
                except SdcacheError as e:
                    result["failed"].append({"id": chunk_id, "error": error_name(e), "message": str(e)})
                    return
                if kept:
                    result["loaded"] += 1
                    result["bytes"] += length
                else:
                    result["no_space"] += 1

        parsed = list({c[0]: c for c in map(_parse_warm_chunk, chunks)}.values())  # each id once
        async with asyncio.TaskGroup() as tg:
            for c in parsed:
                tg.create_task(one(*c))
        return result


def _parse_warm_chunk(c: Any) -> tuple[str, str, int, int]:
    if not isinstance(c, dict):
        raise InvalidArgument("each chunk must be an object with id, src, off, len")
    chunk_id, src, off, length = c.get("id"), c.get("src"), c.get("off"), c.get("len")
    _check_id(chunk_id)
    if not isinstance(src, str) or not src:
        raise InvalidArgument(f"chunk {chunk_id}: src must be a non-empty string")
    if not isinstance(off, int) or not isinstance(length, int) or off < 0 or not 0 <= length <= CHUNK_SIZE:
        raise InvalidArgument(f"chunk {chunk_id}: off/len must be integers, 0 <= len <= {CHUNK_SIZE}")
    return chunk_id, src, off, length


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
    return web.json_response({"error": error_name(exc), "message": str(exc)}, status=exc.http_status)


@web.middleware
async def _errors(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    try:
        return await handler(request)
    except SdcacheError as e:
        return _error_response(e)
    except (web.HTTPException, ConnectionError):
        raise  # a client that hung up mid-body is aiohttp's to handle
    except Exception as e:  # noqa: BLE001 - the client must get JSON, not a traceback page
        log.exception("error handling %s %s", request.method, request.path)
        return web.json_response({"error": "SdcacheError", "message": f"{type(e).__name__}: {e}"}, status=500)


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as e:
        raise InvalidArgument(f"request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("request body must be a JSON object")
    return body


def _int_param(q: Any, name: str) -> int:
    raw = q.get(name)
    if raw is None:
        raise InvalidArgument(f"{name} is required with src")
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgument(f"{name} must be an integer, not {raw!r}") from None


class NodeApp:
    """The aiohttp handlers of one node."""

    def __init__(self, service: ChunkService, info: Callable[[], dict[str, Any]]) -> None:
        self.service = service
        self._info = info

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
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
        src = q.get("src") or None
        off = length = 0
        if src is not None:
            off, length = _int_param(q, "off"), _int_param(q, "len")
            if off < 0 or not 0 <= length <= CHUNK_SIZE:
                raise InvalidArgument(f"need off >= 0 and 0 <= len <= {CHUNK_SIZE}")
        path = _opt_path(q.get("path"))
        data, hit = await self.service.get(chunk_id, src, off, length, path)
        self.service.pool.record_served(len(data))
        # StreamResponse with the headers sent on their own: aiohttp would
        # otherwise join them with the body, one more 4 MiB copy per GET on
        # Python 3.11 (see benchmarks/bench_node.py).
        resp = web.StreamResponse(headers={HIT_HEADER: "1" if hit else "0", "Content-Type": _OCTETS})
        resp.content_length = len(data)
        await resp.prepare(request)
        request.writer.send_headers()
        await resp.write(data)
        await resp.write_eof()
        return resp

    async def head_chunk(self, request: web.Request) -> web.StreamResponse:
        chunk_id = _check_id(request.match_info["id"])
        size = self.service.pool.size_of(chunk_id)
        if size is None:
            return web.Response(status=404)
        return web.Response(status=200, headers={"Content-Length": str(size)})

    async def has(self, request: web.Request) -> web.StreamResponse:
        ids = (await _json(request)).get("ids")
        if not isinstance(ids, list):
            raise InvalidArgument('body must be {"ids": [chunk ids]}')
        return web.json_response({"present": self.service.pool.present(i for i in ids if isinstance(i, str))})

    async def warm(self, request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        chunks = body.get("chunks")
        if not isinstance(chunks, list):
            raise InvalidArgument('body must be {"path": p, "chunks": [{"id", "src", "off", "len"}]}')
        return web.json_response(await self.service.warm(_opt_path(body.get("path")), chunks))

    async def evict(self, request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        path = _opt_path(body.get("path"))
        ids = body.get("ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
            raise InvalidArgument("ids must be a list of chunk ids")
        if path is None and ids is None:
            raise InvalidArgument("evict needs a path, ids or both")
        n, nbytes = await asyncio.to_thread(self.service.pool.evict, path, ids)
        return web.json_response({"chunks": n, "bytes": nbytes})

    async def stats(self, request: web.Request) -> web.StreamResponse:
        s: dict[str, Any] = self.service.pool.stats().as_dict()
        s.update(self.service.under.stats.as_dict())
        s["singleflight_joined"] = self.service.flights.joined
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


def default_pool_dir(node_id: str) -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, "sdcache", re.sub(r"[^A-Za-z0-9._-]", "_", node_id))


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
                self.node_id = f"{socket.gethostname()}-{bound_port}"
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
            pool = ChunkPool(pool_dir, self.capacity)
            await asyncio.to_thread(pool.load, workers=min(8, os.cpu_count() or 1))
            self.pool = pool
            self.service = ChunkService(pool)
            app = NodeApp(self.service, self._info).make_app()
            self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_S)
            await self._runner.setup()
            site = web.SockSite(self._runner, sock, backlog=BACKLOG)
            await site.start()
        except BaseException:
            sock.close()
            if self._runner is not None:
                await self._runner.cleanup()
            raise
        if self.meta:
            self.registration = Registration(self.meta, self._node_pb, pool)
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
) -> None:
    """Run a node until *stop* is set (or forever); prints the readiness line."""
    server = NodeServer(
        capacity=capacity, listen=listen, meta=meta, role=role, pool_dir=pool_dir,
        node_id=node_id, advertise=advertise,
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
    parser.add_argument("--node-id", default=None, help="node id (default <hostname>-<port>)")
    parser.add_argument("--ready-file", default=None, help="write HOST:PORT here once listening")


def main(args: argparse.Namespace) -> int:
    """Run a node from parsed ``add_arguments`` options; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        capacity = parse_size(args.capacity)
        split_hostport(args.listen)
        return asyncio.run(_run(args, capacity))
    except SdcacheError as e:
        print(f"sdcache node: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"sdcache node: error: {e.strerror or e} ({args.listen})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace, capacity: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    meta = None if args.meta in ("none", "") else args.meta
    await serve(
        capacity=capacity, listen=args.listen, meta=meta, role=args.role, pool_dir=args.pool_dir,
        node_id=args.node_id, advertise=getattr(args, "advertise", None), ready_file=args.ready_file, stop=stop,
    )
    log.info("node stopped")
    return 0


def _cli(argv: list[str] | None = None) -> int:
    """``python -c 'from sdcache.node.server import _cli; _cli()'`` until ``sdcache node`` is wired."""
    parser = argparse.ArgumentParser(prog="sdcache node", description="Run an sdcache cache node.")
    add_arguments(parser)
    return main(parser.parse_args(argv))
