"""Prometheus metrics, the shared parts: the on/off switch, metric makers, the answer and ``--metrics-listen``.

Each process layer defines its metrics as module-level objects next to what
they measure: :mod:`sdcache.node.metrics`, :mod:`sdcache.meta.metrics`,
:mod:`sdcache.client.metrics`, :mod:`sdcache.kernels.metrics`. Names follow
the Prometheus naming guide (``sdcache_`` prefix, base units, ``_total``
counters, ``_seconds`` histograms) and labels are bounded: never a chunk id or
a file path.

``SDCACHE_METRICS=0`` in a process's environment (read once, at import) makes
every metric object this module makes a no-op: an ``observe`` or ``inc`` on
the read path is then one call that does nothing. State a server reads only
when scraped (a node's pool figures, the metadata service's registry) is still
served: it costs nothing until asked for.

Where metrics are served:

* a node on its own HTTP port, ``GET /metrics`` (``read`` token, like every
  node route but ``/healthz`` and ``/readyz``);
* the metadata service and the FUSE mount on ``--metrics-listen HOST:PORT``
  (:class:`MetricsServer`): ``GET /metrics`` with ``Authorization: Bearer``
  checked by the caller's *check* (the metadata service: its own verifier,
  role ``read``), and an open ``GET /healthz``.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import prometheus_client
from prometheus_client.registry import Collector

from . import auth, errors
from .hostport import split_hostport

log = logging.getLogger(__name__)

#: False when ``SDCACHE_METRICS=0`` (or ``false``/``no``/``off``) was set when this module was imported.
ENABLED = os.environ.get("SDCACHE_METRICS", "1").strip().lower() not in ("0", "false", "no", "off")

#: Latency buckets (seconds) for requests from well under a millisecond (a pool hit) to tens of seconds.
TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# No ``_created`` series beside every counter and histogram: Prometheus does not use them from the text
# format, and they double what a scrape carries.
prometheus_client.disable_created_metrics()


class _Off:
    """What every metric maker returns with collection off: accepts every call, records nothing."""

    __slots__ = ()

    def labels(self, *values: Any, **kw: Any) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


OFF = _Off()


def counter(name: str, documentation: str, labelnames: Iterable[str] = ()) -> Any:
    """A module-level :class:`prometheus_client.Counter` (``_total`` appended in the exposition), or a no-op."""
    if not ENABLED:
        return OFF
    return prometheus_client.Counter(name, documentation, tuple(labelnames))


def gauge(name: str, documentation: str, labelnames: Iterable[str] = ()) -> Any:
    if not ENABLED:
        return OFF
    return prometheus_client.Gauge(name, documentation, tuple(labelnames))


def histogram(name: str, documentation: str, labelnames: Iterable[str] = (),
              buckets: Iterable[float] = TIME_BUCKETS) -> Any:
    if not ENABLED:
        return OFF
    return prometheus_client.Histogram(name, documentation, tuple(labelnames), buckets=tuple(buckets))


class Exposition:
    """What one ``/metrics`` answer holds: this process's module-level metrics plus a server's own collectors.

    *collectors* read a server's state when scraped (a node's pool, the
    metadata service's registry), so two servers in one process (tests) each
    report their own.
    """

    def __init__(self, *collectors: Collector) -> None:
        self._collectors = (prometheus_client.REGISTRY, *collectors)

    def collect(self) -> Iterator[Any]:
        for c in self._collectors:
            yield from c.collect()

    def render(self) -> bytes:
        """The Prometheus text format."""
        return prometheus_client.generate_latest(self)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- --metrics-listen


def split_listen(listen: str) -> tuple[str, int]:
    """A ``--metrics-listen`` value to (host, port)."""
    return split_hostport(listen, what="--metrics-listen")


def is_loopback(host: str) -> bool:
    """Whether *host* names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_argument(parser: Any, what: str) -> None:
    """``--metrics-listen HOST:PORT`` on a command."""
    parser.add_argument("--metrics-listen", default=None, metavar="HOST:PORT",
                        help=f"serve Prometheus metrics at http://HOST:PORT/metrics ({what}); default: off")


#: Check of a scrape's bearer token: returns, or raises Unauthenticated / PermissionDenied / Unavailable.
Check = Callable[[str | None], object]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a scrape may take to send its request (and TLS handshake)

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # here, in this request's thread, not in the accepting one

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("metrics %s: " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, exc: errors.SdcacheError) -> None:
        headers = {"WWW-Authenticate": 'Bearer realm="sdcache"'} if exc.http_status == 401 else None
        body = json.dumps({"error": errors.error_name(exc), "message": str(exc)}).encode()
        self._send(exc.http_status, body, "application/json", headers)

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        route = self.path.split("?", 1)[0]
        if route == "/healthz":
            self._send(200, b"ok", "text/plain; charset=utf-8")
            return
        if route != "/metrics":
            self._error(errors.NotFound(f"no such route: GET {route[:200]} (try /metrics)"))
            return
        check = self.server.check
        try:
            if check is not None:
                check(auth.bearer(self.headers.get("Authorization")))
            body = self.server.exposition.render()
        except errors.SdcacheError as exc:
            self._error(exc)
            return
        self._send(200, body, CONTENT_TYPE)

    do_HEAD = do_GET


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, addr: tuple[str, int], family: int, exposition: Exposition, check: Check | None) -> None:
        self.address_family = family
        self.exposition = exposition
        self.check = check
        super().__init__(addr, _Handler)


class MetricsServer:
    """``--metrics-listen HOST:PORT``: ``GET /metrics`` and ``GET /healthz`` in a thread of its own.

    *check* is given each scrape's bearer token (None when absent) and raises
    to refuse it; None serves without a token (only for a loopback address, the
    caller's rule to keep). With *ssl_context* it serves HTTPS.
    """

    def __init__(self, listen: str, exposition: Exposition, check: Check | None, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.host, self.port = split_listen(listen)
        self.exposition = exposition
        self.check = check
        self.ssl_context = ssl_context
        self.address = ""
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Bind and serve; returns the HOST:PORT bound. Raises Unavailable when it cannot bind."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            server = _Server(sockaddr[:2], family, self.exposition, self.check)
        except OSError as exc:
            raise errors.Unavailable(f"cannot serve metrics on {self.host}:{self.port}: "
                                     f"{exc.strerror or exc}") from None
        if self.ssl_context is not None:
            server.socket = self.ssl_context.wrap_socket(server.socket, server_side=True,
                                                         do_handshake_on_connect=False)
        self._server = server
        port = server.server_address[1]
        self.address = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
        self._thread = threading.Thread(target=server.serve_forever, name="sdcache-metrics", daemon=True)
        self._thread.start()
        log.info("metrics on %s://%s/metrics (%s)", "https" if self.ssl_context else "http", self.address,
                 "token required" if self.check is not None else "no token: loopback only")
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
