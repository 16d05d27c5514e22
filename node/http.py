"""The node's HTTP chunk API: its contract, and the aiohttp adapter over a ChunkService.

This is the one description of the contract; the client (``client/``) and the
metadata service (:mod:`sdcache.meta.nodeclient`) speak it. Every request but
``/healthz`` and ``/readyz`` carries ``Authorization: Bearer TOKEN``; the role each route
needs is :data:`sdcache.auth.HTTP_ROLES` (``read`` for chunks, ``/has``,
``/stats`` and ``/metrics``; ``admin`` for ``/warm`` and ``/evict``). Tokens are checked here,
by a middleware before any handler runs, against the keys and revocations the
metadata service hands the node (:mod:`node.registration`), with no call per
request.

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
``POST /warm`` ``{"path", "ids": [...], "peers"?: [node ids], "peers_only"?: bool}`` ->
    ``{"loaded", "bytes", "present", "failed": [{"id", "error", "message"}], "no_space"}``.
    Each chunk comes from a peer node holding it when there is one (the nodes
    named in ``peers`` first; see :mod:`.peers`), else the under-store; with
    ``peers_only`` (re-replication) never the under-store.
``POST /evict`` ``{"path"?, "ids"?}`` (at least one) -> ``{"chunks", "bytes"}``
``GET /stats``: the node's counters as JSON.
``GET /metrics``: the same counters, and latency histograms, for Prometheus (:mod:`.metrics`).
``GET /healthz``: 200 ``ok`` while the process serves (open).
``GET /readyz``: 200 ``{"ready": true}`` once the pool is loaded, the node is
    registered and holds the token keys (or runs standalone) and the metadata
    service answered within three heartbeat intervals; else 503
    ``{"ready": false, "reason": ...}`` (open).

A chunk id is 32 lowercase hex digits. A POST body is a JSON object of at
most :data:`MAX_BODY` bytes (413 beyond, refused on its ``Content-Length``)
naming at most :data:`MAX_IDS` ids.

Errors are JSON ``{"error": ClassName, "message": ...}`` with the class's
HTTP status (401 no or bad token, 403 wrong role);
:func:`sdcache.errors.from_wire` rebuilds them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from sdcache import auth
from sdcache import metrics as sdc_metrics
from sdcache import paths as cache_paths
from sdcache.chunking import CHUNK_SIZE
from sdcache.errors import InvalidArgument, NotFound, SdcacheError, Unavailable, error_name
from sdcache.hashing import is_chunk_id

from .metrics import NodeCollector
from .service import RETRY_AFTER_S, ChunkService

log = logging.getLogger(__name__)

MAX_BODY = 8 << 20  # /warm, /has and /evict list up to ~100,000 ids
MAX_IDS = 100_000  # ids one request may name
MAX_PEERS = 256  # node ids one /warm may name as peers
HIT_HEADER = "X-Sdcache-Hit"
_OCTETS = "application/octet-stream"


def _check_ids(ids: Any, what: str) -> list[str]:
    if not isinstance(ids, list):
        raise InvalidArgument(f'{what}: "ids" must be a list of chunk ids')
    if len(ids) > MAX_IDS:
        raise InvalidArgument(f"{what}: at most {MAX_IDS} ids per request, got {len(ids)}")
    return [_check_id(i) for i in ids]


def _check_id(chunk_id: Any) -> str:
    if not isinstance(chunk_id, str) or not is_chunk_id(chunk_id):
        raise InvalidArgument(f"not a chunk id (32 lowercase hex digits): {chunk_id!r}")
    return chunk_id


def _opt_path(path: Any) -> str | None:
    if path is None or path == "":
        return None
    return cache_paths.normalize(path)


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
        # A route missing from the table is admin-only.
        need = auth.HTTP_ROLES.get((request.method, resource.canonical), "admin")
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
        resource = request.match_info.route.resource
        log.exception("error handling %s %s", request.method, request.path,
                      extra={"method": f"{request.method} {resource.canonical if resource else request.path}",
                             "chunk": request.match_info.get("id"), "path": request.query.get("path")})
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
                 verifier: auth.TokenVerifier, not_ready: Callable[[], str | None] | None = None) -> None:
        self.service = service
        self._info = info
        self.verifier = verifier
        self._not_ready = not_ready or (lambda: None)
        self.exposition = sdc_metrics.Exposition(NodeCollector(service))

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[_errors, _auth(self.verifier)], client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/chunks/{id}", self.get_chunk, allow_head=False)
        r.add_route("HEAD", "/chunks/{id}", self.head_chunk)
        r.add_post("/has", self.has)
        r.add_post("/warm", self.warm)
        r.add_post("/evict", self.evict)
        r.add_get("/stats", self.stats)
        r.add_get("/metrics", self.metrics)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
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
            self.service.pool.record_served(len(data), hit, peer=not hit and self.service.came_from_peer(chunk_id))
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
        peers = body.get("peers", [])
        if not isinstance(peers, list) or len(peers) > MAX_PEERS or not all(
                isinstance(p, str) and 0 < len(p) <= 128 for p in peers):
            raise InvalidArgument(f'warm: "peers" must be a list of at most {MAX_PEERS} node ids')
        peers_only = body.get("peers_only", False)
        if not isinstance(peers_only, bool):
            raise InvalidArgument('warm: "peers_only" must be true or false')
        return web.json_response(await self.service.warm(path, _check_ids(body.get("ids"), "warm"),
                                                         peers=peers, peers_only=peers_only))

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
        if self.service.peers is not None:
            s.update(self.service.peers.stats.as_dict())
        s.update(self._info())
        return web.json_response(s)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        body = self.exposition.render()
        return web.Response(body=body, headers={"Content-Type": sdc_metrics.CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        reason = self._not_ready()
        if reason is None:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reason": reason}, status=503)
