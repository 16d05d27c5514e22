"""The cache node as a process: lifecycle, readiness and the ``sdcache node`` command.

:class:`NodeServer` binds the socket, adopts the pool directory, registers
with the metadata service and serves the chunk API. The node's logic is
:mod:`.service` (:class:`~.service.ChunkService`); the HTTP chunk API and its
contract are :mod:`.http` (:class:`~.http.NodeApp`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from sdcache import DEFAULT_META, auth, logs, tls
from sdcache._proto import meta_pb2 as pb
from sdcache.errors import CapacityExceeded, InvalidArgument, SdcacheError
from sdcache.hostid import host_id
from sdcache.hostport import join_hostport, split_hostport, split_hostports
from sdcache.meta.convert import node_info_from_proto
from sdcache.placement import NodeInfo, check_zone
from sdcache.units import format_size, parse_size

from .http import NodeApp
from .locator import SourceLocator
from .peers import Peers
from .pool import ChunkPool, default_pool_dir
from .registration import Registration
from .service import DEFAULT_MAX_INFLIGHT, ChunkService

log = logging.getLogger(__name__)

ROLES = ("gpu", "memory")
BACKLOG = 2048
KEEPALIVE_S = 75.0


# --------------------------------------------------------------------------- the server


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
        zone: str = "",
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self.zone = check_zone(zone)
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
        if not 0 < keepalive_s <= 3600:
            raise InvalidArgument(f"--keepalive-timeout must be in (0, 3600] seconds, not {keepalive_s:g}")
        self.keepalive_s = keepalive_s
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
        self.peers: Peers | None = None

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
            zone=self.zone,
        )

    def _info(self) -> dict[str, Any]:
        assert self.pool is not None
        return {
            "node_id": self.node_id,
            "role": self.role,
            "zone": self.zone,
            "pool_dir": self.pool.pool_dir,
            "host_id": host_id(),
            "address": self.advertise or self.address,
            "registered": bool(self.registration and self.registration.registered.is_set()),
            # the pins generation applied to the pool; None until registered and loaded
            "pins_generation": self.registration.pins_generation if self.registration else None,
        }

    def not_ready(self) -> str | None:
        """Why the node is not ready (``GET /readyz`` answers 503 with it), or None.

        Ready: the pool is loaded and, unless standalone (``--meta none``), the
        node is registered, holds the token keys and hears from the service.
        """
        if self.pool is None or self.service is None:
            return "the pool is not loaded yet"
        if self.registration is None:
            return None
        return self.registration.not_ready()

    async def start(self) -> str:
        """Bind, load the pool, serve; returns the HOST:PORT listened on."""
        host, port = split_hostport(self.listen, what="--listen")
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

                async def live_nodes() -> list[NodeInfo]:
                    return [node_info_from_proto(n) for n in await reg.list_nodes()]

                self.peers = Peers(lambda: self.node_id, live_nodes, self.credentials)
            else:
                locator = SourceLocator(None)
            self.service = ChunkService(pool, locator=locator, max_inflight=self.max_inflight, peers=self.peers)
            app = NodeApp(self.service, self._info, self.verifier, self.not_ready).make_app()
            self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.keepalive_s)
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
            await self.service.peer_flights.close()
        if self.peers is not None:
            await self.peers.close()
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
                        help="metadata service HOST:PORT, or HOST:PORT,HOST:PORT,... for several over one store "
                        "(default: $SDCACHE_META or %(default)s); "
                        "'none' runs a standalone node that registers nowhere")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to serve chunks on (default %(default)s)")
    parser.add_argument("--advertise", default=None,
                        help="HOST:PORT clients should use (default: the listen address)")
    parser.add_argument("--capacity", default="8GiB", help="pool size in bytes, e.g. 8GiB (default %(default)s)")
    parser.add_argument("--role", choices=ROLES, default="memory", help="gpu or memory (default %(default)s)")
    parser.add_argument("--zone", default=os.environ.get("SDCACHE_ZONE", ""),
                        help="failure domain (rack, room, cloud zone): replicas of a chunk go to distinct zones, "
                        "and readers with the same SDCACHE_ZONE prefer this node (default $SDCACHE_ZONE or none)")
    parser.add_argument("--pool-dir", default=None,
                        help="shared-memory pool directory (default /dev/shm/sdcache/<node-id>)")
    parser.add_argument("--node-id", default=None,
                        help="node id (default: the host name; a second node on one host needs its own)")
    parser.add_argument("--ready-file", default=None, help="write HOST:PORT here once listening")
    parser.add_argument("--max-inflight", default="512MiB",
                        help="chunk bytes held for requests at once; more get 503 + Retry-After "
                        "(default %(default)s)")
    parser.add_argument("--keepalive-timeout", type=float, default=KEEPALIVE_S, metavar="SECONDS",
                        help="close a client's idle HTTP connection after this long; clients reconnect "
                        "transparently (default %(default)g, above a typical load balancer's 60)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="send no token and, with --meta none, accept every request (never on a shared network)")
    parser.add_argument("--allow-source", action="append", default=[], metavar="PREFIX",
                        help="read through only from sources under this URL prefix (repeatable; "
                        "e.g. s3://models/ or file:///nas/); default: any committed source")
    tls.add_server_arguments(parser)
    logs.add_argument(parser)


def main(args: argparse.Namespace) -> int:
    """Run a node from parsed ``add_arguments`` options; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format=logs.TEXT_FORMAT)
    logs.configure(getattr(args, "log_format", "text"))
    try:
        capacity = parse_size(args.capacity)
        check_zone(args.zone)
        split_hostport(args.listen, what="--listen")
        if args.meta not in ("none", ""):
            split_hostports(args.meta, what="--meta")
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
        allow_sources=tuple(args.allow_source), zone=args.zone, keepalive_s=args.keepalive_timeout,
    )
    log.info("node stopped")
    return 0


def _cli(argv: list[str] | None = None) -> int:
    """``python -c 'from sdcache.node.server import _cli; _cli()'`` until ``sdcache node`` is wired."""
    parser = argparse.ArgumentParser(prog="sdcache node", description="Run an sdcache cache node.")
    add_arguments(parser)
    return main(parser.parse_args(argv))
