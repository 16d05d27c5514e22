"""What ``serve`` and ``gateway`` share: the A1111 routes, the catalog answers, errors and the process shell.

Both speak the same API: the routes, who may call them
(:data:`sdcache.auth.SERVE_ROLES`), the model listings answered from the
catalog, ``options``, the error shape, the flags that name folders and
limits, and how the process listens, announces itself and stops. Each adds
its own generation, progress, interrupt and readiness handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from sdcache import errors, logs, tls
from sdcache.hostport import join_hostport, split_hostport

from . import a1111, httpauth, metrics
from .catalog import Catalog
from .plan import Limits

log = logging.getLogger(__name__)

API = "/sdapi/v1"
MAX_BODY = 64 << 20  # a request with a few base64 images; more is refused


class Frontend(Protocol):
    """What the shared handlers read: the catalog and the default checkpoint."""

    catalog: Catalog
    default_model: str | None


class CommonHandlers:
    """The routes whose answers do not depend on a runner: listings, options, samplers, health, metrics."""

    def __init__(self, state: Frontend) -> None:
        self.s = state

    async def sd_models(self, request: web.Request) -> web.Response:
        models = await asyncio.to_thread(self.s.catalog.models, "checkpoint")
        return web.json_response([m.a1111() for m in models])

    async def loras(self, request: web.Request) -> web.Response:
        models = await asyncio.to_thread(self.s.catalog.models, "lora")
        return web.json_response([m.a1111() for m in models])

    async def samplers(self, request: web.Request) -> web.Response:
        return web.json_response(a1111.sampler_list())

    async def schedulers(self, request: web.Request) -> web.Response:
        return web.json_response(a1111.scheduler_list())

    async def scripts(self, request: web.Request) -> web.Response:
        return web.json_response({"txt2img": ["controlnet"], "img2img": ["controlnet"]})

    async def get_options(self, request: web.Request) -> web.Response:
        name = self.s.default_model
        model = None
        if name:
            try:
                model = await asyncio.to_thread(self.s.catalog.find, "checkpoint", name)
            except errors.NotFound:
                model = None
        return web.json_response({"sd_model_checkpoint": model.title if model else name,
                                  "sd_checkpoint_hash": model.sha256 if model else None})

    async def set_options(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise errors.InvalidArgument("options: the body must be a JSON object")
        unknown = sorted(set(body) - {"sd_model_checkpoint"})
        if unknown:
            raise errors.InvalidArgument(f"options {', '.join(unknown)} are not supported (supported: "
                                         "sd_model_checkpoint)")
        if "sd_model_checkpoint" in body:
            model = await asyncio.to_thread(self.s.catalog.find, "checkpoint", str(body["sd_model_checkpoint"]))
            self.s.default_model = model.title
        return web.json_response(True)

    async def refresh(self, request: web.Request) -> web.Response:
        await asyncio.to_thread(self.s.catalog.refresh)
        return web.json_response({})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics_page(self, request: web.Request) -> web.Response:
        from sdcache import metrics as sdc_metrics

        body = await asyncio.to_thread(sdc_metrics.Exposition().render)
        return web.Response(body=body, headers={"Content-Type": sdc_metrics.CONTENT_TYPE})


def build_app(h: Any, gate: httpauth.Gate) -> web.Application:
    """The A1111 routes over *h* (a :class:`CommonHandlers` with txt2img, img2img, progress, interrupt, readyz)."""
    app = web.Application(middlewares=[errors_middleware(gate), httpauth.middleware(gate)], client_max_size=MAX_BODY)
    app.router.add_post(API + "/txt2img", h.txt2img)
    app.router.add_post(API + "/img2img", h.img2img)
    for path, fn in (("/sd-models", h.sd_models), ("/loras", h.loras), ("/samplers", h.samplers),
                     ("/schedulers", h.schedulers), ("/scripts", h.scripts), ("/options", h.get_options),
                     ("/progress", h.progress)):
        app.router.add_get(API + path, fn)
    app.router.add_post(API + "/options", h.set_options)
    app.router.add_post(API + "/interrupt", h.interrupt)
    app.router.add_post(API + "/refresh-checkpoints", h.refresh)
    app.router.add_get("/healthz", h.healthz)
    app.router.add_get("/readyz", h.readyz)
    app.router.add_get("/metrics", h.metrics_page)
    return app


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    """(method, route) of every route: tests check each has a role in :data:`sdcache.auth.SERVE_ROLES`."""
    out = set()
    for r in app.router.routes():
        if r.method != "HEAD" and r.resource is not None:
            out.add((r.method, r.resource.canonical))
    return out


async def read_json(request: web.Request) -> Any:
    declared = request.content_length
    if declared is not None and declared > MAX_BODY:
        raise errors.InvalidArgument(f"request body of {declared} bytes is over the {MAX_BODY}-byte limit")
    try:
        return await request.json()
    except ValueError as e:
        raise errors.InvalidArgument(f"request body is not JSON: {e}") from None
    except RecursionError:
        raise errors.InvalidArgument("request body is nested too deeply") from None


def errors_middleware(gate: httpauth.Gate) -> Any:
    @web.middleware
    async def handle(request: web.Request, handler: Any) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "other"
        t0 = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except errors.SdcacheError as exc:
            status = 422 if exc.http_status == 400 else exc.http_status
            resp = httpauth.error_response(exc, gate)
            resp.set_status(status)
            return resp
        except web.HTTPException as exc:
            status = exc.status
            if exc.status < 400:
                raise
            return web.json_response({"error": type(exc).__name__, "detail": exc.text or exc.reason, "body": "",
                                      "errors": exc.reason}, status=exc.status)
        except Exception as exc:  # noqa: BLE001 - the client gets A1111's JSON, not a traceback page
            log.exception("error handling %s %s", request.method, request.path)
            return httpauth.error_response(errors.SdcacheError(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            metrics.REQUESTS.labels(route, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - t0)

    return handle



# --------------------------------------------------------------------------- the process


def add_common_arguments(parser: argparse.ArgumentParser, listen: str) -> None:
    """Flags both commands take: address, metadata service, folders, users, limits, TLS and logs."""
    parser.add_argument("--listen", default=listen, help="HOST:PORT of the API (default %(default)s)")
    parser.add_argument("--meta", default=None, help="metadata service(s) HOST:PORT[,HOST:PORT] "
                        "(default: $SDCACHE_META, else 127.0.0.1:7070)")
    parser.add_argument("--checkpoints", default="/models/checkpoints", help="cache folder of base models")
    parser.add_argument("--loras", default="/models/loras", help="cache folder of LoRAs")
    parser.add_argument("--controlnets", default="/models/controlnet", help="cache folder of ControlNets")
    parser.add_argument("--default-model", default=None, help="checkpoint used when a request names none")
    parser.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS]",
                        help="HTTP Basic users, as A1111's --api-auth (else $SDCACHE_API_AUTH)")
    parser.add_argument("--max-steps", type=int, default=150, help="steps per request at most")
    parser.add_argument("--max-images", type=int, default=16, help="batch_size x n_iter at most")
    parser.add_argument("--max-batch", type=int, default=8, help="batch_size at most")
    parser.add_argument("--max-pixels", type=int, default=2048 * 2048, help="width x height at most")
    parser.add_argument("--ready-file", default=None, help="write HOST:PORT here once listening")
    tls.add_arguments(parser)
    logs.add_argument(parser)


def limits_from(args: argparse.Namespace) -> Limits:
    limits = Limits(args.max_steps, args.max_images, args.max_batch, args.max_pixels)
    for name in ("max_steps", "max_images", "max_batch", "max_pixels"):
        if getattr(limits, name) < 1:
            raise errors.InvalidArgument(f"--{name.replace('_', '-')} must be at least 1")
    return limits


def run_main(name: str, args: argparse.Namespace, run: Callable[[argparse.Namespace, str, int], Awaitable[int]]) -> int:
    """The body of ``sdcache serve`` / ``gateway``: logging, one error line and an exit status."""
    logging.basicConfig(level=logging.INFO, format=logs.TEXT_FORMAT)
    logs.configure(getattr(args, "log_format", "text"))
    try:
        host, port = split_hostport(args.listen, what="--listen")
        return asyncio.run(run(args, host, port))
    except errors.SdcacheError as e:
        print(f"sdcache {name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"sdcache {name}: error: {e.strerror or e} ({args.listen})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def listen(app: web.Application, host: str, port: int, credentials: tls.Credentials) -> tuple[web.AppRunner, str]:
    """Serve *app* on HOST:PORT (HTTPS with a certificate); the runner and the bound ``HOST:PORT``.

    A client that disconnects cancels its handler (``handler_cancellation``), which frees its queue slot.
    """
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    site = web.SockSite(runner, sock, ssl_context=credentials.tls.server_context()
                        if credentials.tls and credentials.tls.cert else None)
    await site.start()
    return runner, join_hostport(host, sock.getsockname()[1])


async def until_signalled() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    t0 = time.monotonic()
    await stop.wait()
    log.info("stopping after %.0fs", time.monotonic() - t0)
