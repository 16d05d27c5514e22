"""``sdcache gateway``: A1111's API in front of many ``serve`` processes, routed by what each one holds.

Each request is planned as ``serve`` plans it (:mod:`.plan`: the base model,
LoRAs and ControlNet it names, its size and steps), then ranked over the
runners of the registry by the routing policy (:mod:`sdcache.policies`; by
default the earliest estimated finish: queue wait + the switch cost of what
that runner lacks, from the tier it would come from + denoise time, with
costs each runner measures and reports). The request goes to the best runner;
one that fails (dies mid-request, is full, is gone) hands it to the next. The
gateway then counts the request into that runner's view at once, so a burst
for a new model does not all land on one runner before its next report.

Every response carries ``X-Sdcache-Runner``. The gateway never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
from typing import Any

import aiohttp
from aiohttp import web

from sdcache import auth, errors, policies, routing, tls
from sdcache.hostport import write_ready_file

from . import api, httpauth, metrics
from .catalog import Catalog
from .plan import Limits, make_plan
from .registry import RunnerDirectory, meta_addresses
from .api import API
from .serve import progress_body

log = logging.getLogger(__name__)

RUNNER_HEADER = "X-Sdcache-Runner"
CONNECT_TIMEOUT = 5.0


class Gateway:
    """Routing state: the runner directory, the policy, the gateway's default model."""

    def __init__(self, *, directory: RunnerDirectory, policy: policies.Policy, catalog: Catalog, limits: Limits,
                 gate: httpauth.Gate, credentials: tls.Credentials, request_timeout: float,
                 default_model: str | None = None, max_attempts: int = 3) -> None:
        self.directory = directory
        self.policy = policy
        self.catalog = catalog
        self.limits = limits
        self.gate = gate
        self.credentials = credentials
        self.request_timeout = request_timeout
        self.default_model = default_model
        self.max_attempts = max_attempts
        self.session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    @property
    def scheme(self) -> str:
        return "https" if self.credentials.tls and self.credentials.tls.ca else "http"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credentials.token}"} if self.credentials.token else {}

    async def route(self, kind: str, body: Any) -> web.Response:
        plan = await asyncio.to_thread(make_plan, kind, body, self.catalog, self.default_model, self.limits,
                                       decode=False)
        demand = plan.demand()
        forward = copy.copy(body)
        forward["override_settings"] = {**(body.get("override_settings") or {}),
                                        "sd_model_checkpoint": plan.checkpoint.title}
        self.policy.observe(demand)  # once per request: retries rank again, not count again
        tried: list[str] = []
        last_error: BaseException | None = None
        for _ in range(self.max_attempts):
            async with self._lock:  # rank and count in, atomically: the next request sees this one
                views = [v for v in self.directory.views.values() if v.runner_id not in tried]
                ranked = self.policy.rank(demand, views)
                if not ranked:
                    break
                choice = ranked[0]
                view = choice.runner
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("route %s: %s", demand.base.key, "; ".join(
                        f"{e.runner_id} {e.total_s:.3f}s (wait {e.wait_s:.3f} fetch {e.fetch_s:.3f} switch "
                        f"{e.switch_s:.3f} denoise {e.denoise_s:.3f}; device {[k.rsplit('/', 1)[-1] for k in e.runner.device.keys()]})"
                        for e in ranked))
                if demand.base.key not in view.device:
                    metrics.BASE_SWITCHES.inc()
                ticket = self.directory.sent(view, demand, choice)
            tried.append(view.runner_id)
            ran = False
            try:
                resp = await self._send(view, kind, forward)
                ran = resp.status not in (429, 502, 503)
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                log.warning("runner %s failed (%s: %s); trying another", view.runner_id, type(exc).__name__, exc)
                self.directory.unhealthy(view.runner_id)  # until its next report says otherwise
                last_error = exc
                continue
            finally:
                self.directory.answered(view.runner_id, ticket, ran=ran)
            if not ran:  # full or going away: another runner may take it
                last_error = errors.Overloaded(f"runner {view.runner_id} answered {resp.status}")
                continue
            metrics.ROUTED.labels(self.policy.name, "ok" if len(tried) == 1 else "retried").inc()
            resp.headers[RUNNER_HEADER] = view.runner_id
            return resp
        metrics.ROUTED.labels(self.policy.name, "failed").inc()
        if not tried:
            raise errors.Unavailable(f"no runner can take the request ({len(self.directory.views)} registered, "
                                     "none available)")
        raise errors.Unavailable(f"every runner tried failed ({', '.join(tried)}): {last_error}")

    async def _send(self, view: routing.RunnerView, kind: str, body: Any) -> web.Response:
        assert self.session is not None
        url = f"{self.scheme}://{view.address}{API}/{kind}"
        ssl_ctx = self.credentials.tls.client_context() if self.scheme == "https" and self.credentials.tls else None
        async with self.session.post(url, json=body, headers=self._headers(), ssl=ssl_ctx,
                                     timeout=aiohttp.ClientTimeout(total=self.request_timeout,
                                                                   sock_connect=CONNECT_TIMEOUT)) as r:
            payload = await r.read()
            headers = {k: v for k, v in r.headers.items() if k.lower() in ("content-type", "retry-after")}
            return web.Response(body=payload, status=r.status, headers=headers)

    async def broadcast(self, path: str) -> None:
        """POST *path* to every runner (``interrupt``), ignoring the ones that do not answer."""
        assert self.session is not None

        async def one(view: routing.RunnerView) -> None:
            try:
                async with self.session.post(f"{self.scheme}://{view.address}{API}{path}", headers=self._headers(),
                                             timeout=aiohttp.ClientTimeout(total=10)) as r:
                    await r.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass

        await asyncio.gather(*(one(v) for v in list(self.directory.views.values())))


class Handlers(api.CommonHandlers):
    """The gateway's own routes: generation routed to a runner, fleet progress, interrupt, readiness."""

    s: Gateway

    async def txt2img(self, request: web.Request) -> web.Response:
        return await self.s.route("txt2img", await api.read_json(request))

    async def img2img(self, request: web.Request) -> web.Response:
        return await self.s.route("img2img", await api.read_json(request))

    async def progress(self, request: web.Request) -> web.Response:
        body = progress_body(None, [], _NoQueue())
        views = list(self.s.directory.views.values())
        body["state"]["job_count"] = sum(v.busy for v in views)
        body["sdcache"] = {"runners": len(views), "available": sum(v.available for v in views),
                           "policy": self.s.policy.name}
        return web.json_response(body)

    async def interrupt(self, request: web.Request) -> web.Response:
        await self.s.broadcast("/interrupt")
        return web.json_response({})

    async def readyz(self, request: web.Request) -> web.Response:
        d = self.s.directory
        if d.last_contact is None:
            why = "the runner registry has not answered yet"
        elif not any(v.healthy for v in d.views.values()):
            # Healthy, not "available": when every queue is full the gateway stays ready and answers 429
            # with Retry-After; unready, the Service would drop it and clients would see refused connections.
            why = f"no healthy runner ({len(d.views)} registered)"
        else:
            return web.json_response({"status": "ready", "runners": len(d.views)})
        return web.json_response({"status": "not ready", "reason": why}, status=503)


class _NoQueue:
    max_queue = 0
    mean_service_s = 0.0


def build_app(g: Gateway) -> web.Application:
    return api.build_app(Handlers(g), g.gate)


# --------------------------------------------------------------------------- entry point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sdcache gateway`` options."""
    api.add_common_arguments(parser, "127.0.0.1:7861")
    parser.add_argument("--policy", default="finish", choices=sorted(policies.POLICIES),
                        help="routing policy: finish (earliest estimated finish), multiplex (Ray Serve's rule), "
                        "round-robin (default %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=900.0,
                        help="seconds a runner may take to answer (default %(default)s)")
    parser.add_argument("--max-attempts", type=int, default=3, help="runners tried per request (default %(default)s)")
    parser.add_argument("--refresh-interval", type=float, default=0.5,
                        help="seconds between runner-registry reads (default %(default)s)")


def main(args: argparse.Namespace) -> int:
    return api.run_main("gateway", args, _run)


async def _run(args: argparse.Namespace, host: str, port: int) -> int:
    from sdcache.client.metaclient import MetaClient

    if args.max_attempts < 1 or args.request_timeout <= 0 or args.refresh_interval <= 0:
        raise errors.InvalidArgument("--max-attempts, --request-timeout and --refresh-interval must be positive")
    metas = meta_addresses(args.meta)
    credentials = tls.Credentials.from_args(args)
    verifier = auth.TokenVerifier()
    gate = httpauth.Gate(verifier, httpauth.parse_api_auth(args.api_auth))
    directory = RunnerDirectory(metas, credentials=credentials, verifier=verifier, interval=args.refresh_interval)
    meta_client = MetaClient(",".join(metas), credentials=credentials)
    catalog = Catalog(meta_client, args.checkpoints, args.loras, args.controlnets)
    g = Gateway(directory=directory, policy=policies.make_policy(args.policy), catalog=catalog,
                limits=api.limits_from(args), gate=gate,
                credentials=credentials, request_timeout=args.request_timeout, default_model=args.default_model,
                max_attempts=args.max_attempts)
    g.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    runner, address = await api.listen(build_app(g), host, port, credentials)
    task = asyncio.create_task(directory.run(), name="runner-directory")
    if args.ready_file:
        write_ready_file(args.ready_file, address)
    print(f"sdcache gateway listening on {address} (policy {args.policy})", flush=True)
    try:
        await api.until_signalled()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()
        await g.session.close()
        meta_client.close()
    return 0
