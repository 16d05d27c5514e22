"""Starting the metadata service: ``sdcache meta`` and :func:`serve` in-process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from .. import logs, tls
from .. import metrics as sdc_metrics
from ..errors import InvalidArgument, SdcacheError, Unavailable
from ..hostport import join_hostport, split_hostport
from ..placement import check_replicas
from .._proto import meta_pb2_grpc
from ..store import open_store
from . import grpcauth, health
from .fanout import Fanout
from .metrics import MetaCollector
from .nodeclient import NodeClient
from .servicer import MetaServicer
from .tokens import TokenAuthority

log = logging.getLogger(__name__)

DEFAULT_DATA = "./sdcache-data"
DEFAULT_LISTEN = "127.0.0.1:7070"
MAX_MESSAGE = grpcauth.MAX_MESSAGE
MAX_PENDING = 20_000  # calls queued before the loop takes them
STOP_GRACE = 2.0  # seconds in-flight calls get on shutdown
DB_ENV = "SDCACHE_DB"  # the --db URL when the flag is not given (keeps a password off the command line)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``sdcache meta`` to *parser*."""
    parser.add_argument("--data", default=DEFAULT_DATA, metavar="DIR", help="metadata directory (default %(default)s)")
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help="gRPC address (default %(default)s; port 0 picks one)",
    )
    parser.add_argument(
        "--store", default=None, metavar="URL", help="where `put` uploads files (default file://DATA/store)"
    )
    parser.add_argument(
        "--db", default=None, metavar="URL",
        help="metadata database: postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE, shared by several metadata "
        f"processes serving one namespace (default ${DB_ENV}; without either, SQLite DATA/meta.db). "
        "The password may also come from $PGPASSWORD or ~/.pgpass",
    )
    parser.add_argument(
        "--replicas", type=int, default=1, metavar="N",
        help="copies of every chunk, on distinct nodes and, where there are enough, distinct zones "
        "(default %(default)s; per directory: sdcache replicas PATH N)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="node heartbeat interval; a node is dropped after 3 missed (default %(default)s)",
    )
    parser.add_argument("--ready-file", default=None, metavar="PATH", help="write HOST:PORT here once listening")
    parser.add_argument("--token-key", default=None, metavar="FILE",
                        help="Ed25519 key that signs tokens (default DATA/token.key, created 0600); "
                        "share it between services over one store")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="accept every call without a token (warned on every start; never on a shared network)")
    tls.add_server_arguments(parser)
    sdc_metrics.add_argument(parser, "needs a read token; HTTPS with --tls-cert")
    logs.add_argument(parser)


def _check_bindable(host: str, port: int) -> None:
    """Fail with one clear line if *host*:*port* cannot be bound.

    gRPC would also fail, but after logging its own multi-line complaint.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise Unavailable(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise Unavailable(f"cannot listen on {host}:{port}: {exc.strerror}") from None


async def serve(
    data_dir: str | os.PathLike[str],
    listen: str,
    *,
    store_url: str | None = None,
    heartbeat_interval: float = 1.0,
    ready: Callable[[str], None] | None = None,
    auth: bool = True,
    token_key: str | None = None,
    tls_files: tls.TlsFiles | None = None,
    require_client_cert: bool = False,
    metrics_listen: str | None = None,
    db_url: str | None = None,
    replicas: int = 1,
) -> None:
    """Run the metadata service until cancelled, then stop cleanly.

    The database is *db_url* (PostgreSQL; several services may share it),
    else ``data_dir/meta.db`` (SQLite); *store_url* (where ``put``
    uploads) defaults to ``file://data_dir/store``, created. *ready* is called with the bound
    ``HOST:PORT`` once the service accepts calls (useful with port 0).
    Tokens are signed with *token_key* (default ``data_dir/token.key``); on the
    first start an admin token is written to ``data_dir/admin.token``.
    With *metrics_listen* (``HOST:PORT``) Prometheus metrics are served there
    (:mod:`sdcache.meta.metrics`), to ``read`` tokens, over HTTPS when TLS is on.
    """
    host, port = split_hostport(listen, what="--listen", default_host=None)
    if metrics_listen:
        sdc_metrics.split_listen(metrics_listen)
    _check_bindable(host, port)
    if heartbeat_interval <= 0:
        raise InvalidArgument(f"heartbeat interval must be positive, got {heartbeat_interval}")
    check_replicas(replicas)
    data = Path(data_dir).resolve()
    given_store, store_url = store_url, _store_url(data, store_url)
    store = await asyncio.to_thread(open_store, db_url, data / "meta.db")
    if db_url:
        _warn_shared(given_store, token_key)
    try:
        authority = await asyncio.to_thread(TokenAuthority.open, store, data, token_key, enabled=auth)
        if not auth:
            log.warning("AUTH IS OFF (--insecure-no-auth): anyone who can reach %s can read, change and delete "
                        "everything, and register nodes", listen)
        written = await asyncio.to_thread(authority.bootstrap, data)
        if written is not None:  # a warning: the operator must learn where the secret went
            log.warning("wrote an admin token to %s (mode 0600); use it with --token-file %s or "
                     "SDCACHE_TOKEN_FILE=%s", written, written, written)
        client = NodeClient(authority.service_token if auth else None, tls_files)
        try:
            servicer = MetaServicer(
                store, Fanout(client), heartbeat_interval=heartbeat_interval, store_url=store_url,
                authority=authority, replicas=replicas,
            )
            metrics_server = None
            follower = asyncio.create_task(_follow_revocations(authority, heartbeat_interval))
            repairer = asyncio.create_task(servicer.repairer.run())
            try:
                metrics_server = _metrics_server(servicer, metrics_listen, tls_files, require_client_cert)
                await _run_server(servicer, listen, host, ready, tls_files, require_client_cert)
            finally:
                follower.cancel()
                repairer.cancel()
                await asyncio.gather(follower, repairer, return_exceptions=True)
                if metrics_server is not None:
                    await asyncio.to_thread(metrics_server.stop)
                servicer.close()
        finally:
            await client.close()
    finally:
        store.close()


def _warn_shared(store_url: str | None, token_key: str | None) -> None:
    """With a shared database, what every metadata process over it must also share (see docs/SCALING.md)."""
    if store_url is None:
        log.warning("--db without --store: `put` uploads to this host's DATA/store, which other metadata "
                    "processes over the same database and remote nodes cannot read; give each the same --store URL")
    if token_key is None:
        log.warning("--db without --token-key: tokens are signed with this host's DATA/token.key, and the other "
                    "metadata processes over the same database accept them only if they use the same key file")


async def _follow_revocations(authority: TokenAuthority, interval: float) -> None:
    """Pick up revocations another metadata service over the same store made, every *interval* seconds.

    The process-local state that must agree across services over one store is
    the token verifier's revocation list (everything else a call reads comes
    from the store). A revocation through this service applies here at once;
    one through another applies here within *interval*: the store's auth
    generation is polled (one indexed read), and the revocations reloaded
    when it moved. Polling rather than PostgreSQL's LISTEN/NOTIFY: it works
    the same on both stores, needs no extra connection that can silently
    drop, and a second is well inside what revocation promises (nodes learn
    it at their next heartbeat too).
    """
    failing = False
    while True:
        await asyncio.sleep(interval)
        try:
            generation = await asyncio.to_thread(authority.store.auth_generation)
            await asyncio.to_thread(authority.follow, generation)
        except SdcacheError as exc:
            if not failing:
                log.warning("cannot read token revocations from the store: %s", exc)
            failing = True
            continue
        if failing:
            log.info("reading token revocations from the store again")
        failing = False


def _metrics_server(servicer: MetaServicer, listen: str | None, tls_files: tls.TlsFiles | None,
                    require_client_cert: bool) -> sdc_metrics.MetricsServer | None:
    """``--metrics-listen``: scrapes need a ``read`` token this service's verifier accepts."""
    if not listen:
        return None
    verifier = servicer.authority.verifier
    ssl_context = tls_files.server_context(require_client_cert=require_client_cert) if tls_files and tls_files.cert \
        else None
    server = sdc_metrics.MetricsServer(listen, sdc_metrics.Exposition(MetaCollector(servicer)),
                                       lambda token: verifier.check(token, "read"), ssl_context=ssl_context)
    server.start()
    return server


def _store_url(data: Path, store_url: str | None) -> str:
    """The ``--store`` URL: a bare path becomes a file URL; default DATA/store (created)."""
    if store_url is None:
        store_dir = data / "store"
        try:
            store_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SdcacheError(f"cannot create {store_dir}: {exc.strerror}") from None
        return store_dir.as_uri()
    if "://" not in store_url:
        return Path(store_url).resolve().as_uri()
    return store_url


async def _run_server(servicer: MetaServicer, listen: str, host: str, ready: Callable[[str], None] | None,
                      tls_files: tls.TlsFiles | None, require_client_cert: bool) -> None:
    server = grpc.aio.server(
        interceptors=[grpcauth.AuthInterceptor(servicer.authority.verifier)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),  # a second service on a busy port must fail, not share it
            # Calls not yet picked up by the asyncio loop queue here; gRPC's default
            # (1000) answers CANCELLED to a burst of a few thousand concurrent calls.
            ("grpc.server.max_pending_requests", MAX_PENDING),
            ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING),
        ]
    )
    meta_pb2_grpc.add_MetaServicer_to_server(servicer, server)
    health_servicer = health.add_health(server)
    await health.report(health_servicer, health.NOT_SERVING)  # until it listens
    try:
        try:
            port = grpcauth.add_port(server, listen, tls_files, require_client_cert=require_client_cert)
        except RuntimeError as exc:
            raise Unavailable(f"cannot listen on {listen}: {exc}") from None
        if not port:
            raise Unavailable(f"cannot listen on {listen}: address in use or not available")
        await server.start()
        await health.report(health_servicer, health.SERVING)
        address = join_hostport(host, port)
        log.info("metadata service on %s (%s, auth %s), store %s", address, "TLS" if tls_files else "plaintext",
                 "on" if servicer.authority.enabled else "OFF", servicer.store_url)
        if ready is not None:
            ready(address)
        # Not server.wait_for_termination(): cancelling it cancels the server's
        # own shutdown future, and stop() below would then fail.
        await asyncio.Event().wait()
    finally:
        # Watchers and probes see NOT_SERVING before the port closes.
        await health.shutting_down(health_servicer)
        await server.stop(STOP_GRACE)


def _write_ready_file(path: str, address: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(address + "\n")
    os.replace(tmp, path)


async def _serve_until_signal(args: argparse.Namespace) -> None:
    def ready(address: str) -> None:
        if args.ready_file:  # first, so it exists once the line is seen
            _write_ready_file(args.ready_file, address)
        print(f"sdcache meta listening on {address}", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service = asyncio.create_task(
        serve(
            args.data,
            args.listen,
            store_url=args.store,
            heartbeat_interval=args.heartbeat_interval,
            ready=ready,
            auth=not args.insecure_no_auth,
            token_key=args.token_key,
            tls_files=tls.TlsFiles.resolve(args.tls_cert, args.tls_key, args.tls_ca, env={}),
            require_client_cert=args.tls_require_client_cert,
            metrics_listen=getattr(args, "metrics_listen", None),
            db_url=getattr(args, "db", None) or os.environ.get(DB_ENV) or None,
            replicas=getattr(args, "replicas", 1),
        )
    )
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({service, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not service.done():
        log.info("stopping")
        service.cancel()
    try:
        await service
    except asyncio.CancelledError:
        if not stop.is_set():
            raise


def main(args: argparse.Namespace) -> int:
    """Run ``sdcache meta`` until SIGTERM or SIGINT; 0 on a clean stop, 1 with one line on error."""
    logs.configure(getattr(args, "log_format", "text"))
    try:
        asyncio.run(_serve_until_signal(args))
    except (SdcacheError, OSError) as exc:
        print(f"sdcache meta: {exc}", file=sys.stderr)
        return 1
    return 0


def _cli(argv: list[str] | None = None) -> int:
    """Stand-alone entry point until ``sdcache meta`` is wired into the CLI."""
    parser = argparse.ArgumentParser(prog="sdcache meta", description="Run the sdcache metadata service.")
    add_arguments(parser)
    return main(parser.parse_args(argv))
