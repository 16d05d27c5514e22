"""``sdcache serve``: one runner behind AUTOMATIC1111's ``/sdapi/v1`` API.

One process, one :class:`~sdcache.kernels.runner.Runner` on one worker thread,
a bounded queue in front of it (:mod:`.jobs`), the models named as A1111 names
them (:mod:`.catalog`), and a report to the metadata service's runner registry
every interval so a gateway can route by what this runner holds
(:mod:`.registry`). An existing A1111 client only changes its base URL.

Routes: ``txt2img``, ``img2img``, ``sd-models``, ``loras``, ``samplers``,
``schedulers``, ``scripts``, ``options`` (GET, POST), ``progress``,
``interrupt``, ``refresh-checkpoints`` under ``/sdapi/v1``; ``/healthz``,
``/readyz`` and ``/metrics``. Who may call which: :data:`sdcache.auth.SERVE_ROLES`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import posixpath
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from sdcache import __version__, auth, errors, routing, tls
from sdcache.hostport import write_ready_file
from sdcache.units import parse_size

from . import a1111, api, httpauth
from .catalog import Catalog
from .jobs import Job, JobQueue
from .plan import Limits, Plan, make_plan
from .registry import Reporter, meta_addresses

log = logging.getLogger(__name__)



class ServeApp:
    """The state of one ``serve`` process: catalog, options, queue, runner and its routing view."""

    def __init__(self, *, catalog: Catalog, limits: Limits, queue: JobQueue, runner_factory: Any,
                 runner_id: str, gate: httpauth.Gate, default_model: str | None = None) -> None:
        self.catalog = catalog
        self.limits = limits
        self.queue = queue
        self.runner_id = runner_id
        self.address = ""
        self.gate = gate
        self.default_model = default_model
        self.costs = routing.Costs()
        self._runner_factory = runner_factory
        self._runner: Any = None
        self._runner_error: BaseException | None = None
        self._runner_ready = threading.Event()
        self.reporter: Reporter | None = None
        self.interrupted = False
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="sdcache-prefetch")
        self._prefetching = 0

    # -- the runner (built on the worker thread: torch work stays there) --------------------
    def build_runner(self) -> None:
        try:
            self._runner = self._runner_factory()
        except BaseException as exc:  # noqa: BLE001 - reported by /readyz and every request
            log.error("the runner did not start: %s", exc)
            self._runner_error = exc
        finally:
            self._runner_ready.set()

    @property
    def runner(self) -> Any:
        self._runner_ready.wait()
        if self._runner is None:
            raise errors.Unavailable(f"the runner did not start: {self._runner_error}")
        return self._runner

    def not_ready(self) -> str | None:
        if not self._runner_ready.is_set():
            return "the runner is starting (importing torch and diffusers)"
        if self._runner is None:
            return f"the runner did not start: {self._runner_error}"
        if self.reporter is not None:
            return self.reporter.not_ready()
        return None

    # -- routing state, for the registry --------------------------------------------------
    def view(self) -> routing.RunnerView:
        """This runner as the gateway should see it: tiers, queue and measured costs."""
        r = self._runner
        device = routing.Tier(0)
        host = routing.Tier(0)
        applied: dict[str, tuple[str, ...]] = {}
        if r is not None:
            dev_entries = [(k[1], n) for k, n in r.cache.device.entries() if isinstance(k, tuple) and len(k) > 1]
            device = routing.Tier(max(r.cache.device.budget, sum(n for _, n in dev_entries)), dev_entries)
            host = routing.Tier(r.cache.host.budget, [(k[1], n) for k, n in r.cache.host.entries()
                                                       if isinstance(k, tuple) and len(k) > 1])
            for key, _ in r.cache.device.entries():
                bundle = r.cache.device.get(key) if key[0] == "base" else None
                if bundle is not None:
                    applied[key[1]] = tuple(u for u, _ in bundle.patcher.applied)
        running, waiting = self.queue.snapshot()
        running_s = 0.0
        if running is not None and running.started is not None:
            running_s = max(0.0, running.estimate_s - (time.monotonic() - running.started))
        view = routing.RunnerView(
            self.runner_id, self.address, device=device, host=host, queue_s=[j.estimate_s for j in waiting],
            running_s=running_s, max_queue=self.queue.max_queue, costs=self.costs,
            healthy=self._runner is not None, applied=applied,
        )
        # The tiers as they will be once the running and queued requests have run (what they bring is
        # on its way: a request still fetching its model has not put it in the device tier yet).
        for job in ([running] if running is not None else []) + waiting:
            if job.demand is not None:
                view.hold(job.demand)
        return view

    # -- prefetch: a waiting request's files come into host RAM while it waits ----------------
    def prefetch(self, plan: Plan) -> None:
        if self._runner is None or self._prefetching >= 2 * self.queue.max_queue + 1:
            return
        if plan.checkpoint.size > self._runner.cache.host.budget and self._runner.loaded(plan.checkpoint.url) is None:
            return  # the host tier could not keep the base: loading it now would be thrown away, then loaded again
        self._prefetching += 1
        req = self._request(plan, 0)

        def run() -> None:
            try:
                loaded = self._runner.prefetch(req)
                if loaded:
                    log.info("prefetched %d file(s) for a waiting request", len(loaded))
            except Exception as exc:  # noqa: BLE001 - the request itself will report the error
                log.debug("prefetch failed: %s", exc)
            finally:
                self._prefetching -= 1

        self._prefetcher.submit(run)

    def _request(self, plan: Plan, i: int) -> Any:
        from sdcache.kernels.request import LoraRef, Request

        unit = plan.controlnet[1] if plan.controlnet else None
        return Request(
            model=plan.checkpoint.url, prompt=plan.prompt, negative_prompt=plan.negative_prompt,
            loras=[LoraRef(m.url, w) for m, w in plan.loras],
            controlnet=plan.controlnet[0].url if plan.controlnet else None,
            control_image=unit.image if unit else None, controlnet_scale=unit.weight if unit else 1.0,
            steps=plan.steps, guidance=plan.body.cfg_scale, size=(plan.width, plan.height),
            seed=plan.seed + i * plan.batch_size, scheduler=plan.scheduler, init_image=plan.init_image,
            strength=plan.strength if plan.strength is not None else 0.75, batch_size=plan.batch_size,
        )

    # -- one request, on the worker thread -------------------------------------------------
    def execute(self, plan: Plan, job: Job) -> dict[str, Any]:
        runner = self.runner
        images: list[Any] = []
        seeds: list[int] = []
        totals = {"fetch_s": 0.0, "switch_s": 0.0, "denoise_s": 0.0}
        tiers: list[dict[str, str]] = []
        self.interrupted = False
        for i in range(plan.n_iter):
            req = self._request(plan, i)
            job.iteration, job.iterations = i, plan.n_iter
            res = runner.run(req, on_step=job.on_step)
            images += res.images
            seeds += res.seeds
            for k in totals:
                totals[k] += getattr(res, k)
            if i == 0:
                tiers = [{"component": t.component, "url": t.url, "tier": t.tier, "note": t.note} for t in res.tiers]
            self._learn(plan, res)
            if job.stop.is_set():
                self.interrupted = job.stop_reason == "interrupted"
                break
        return self._response(plan, images, seeds, totals, tiers, job)

    def _learn(self, plan: Plan, res: Any) -> None:
        """Feed the routing costs from what this request measured."""
        base_tier = next((t.tier for t in res.tiers if t.component == "unet"), "device")
        if base_tier in ("cluster", "store") and res.fetch_s > 0:
            self.costs.observe_fetch(plan.checkpoint.size, res.fetch_s, base_tier)
        if base_tier != "device" and res.switch_s > 0:
            self.costs.observe_build(plan.checkpoint.size, res.switch_s)
        elif plan.loras and res.switch_s > 0:
            self.costs.observe_lora_switch(res.switch_s, changed=len(plan.loras))
        self.costs.observe_denoise(plan.demand().steps, plan.width, plan.height, plan.batch_size, res.denoise_s)

    def _response(self, plan: Plan, images: list[Any], seeds: list[int], totals: dict[str, float],
                  tiers: list[dict[str, str]], job: Job) -> dict[str, Any]:
        lora_hashes = {posixpath.basename(m.name): m.short_hash for m, _ in plan.loras}
        infos = [a1111.Infotext(
            plan.body.prompt, plan.body.negative_prompt, plan.steps, plan.sampler, plan.schedule,
            plan.body.cfg_scale, s, plan.width, plan.height, plan.checkpoint.sha256[:10], plan.checkpoint.model_name,
            plan.strength if plan.kind == "img2img" else None, lora_hashes, f"sdcache {__version__}",
        ) for s in seeds]
        texts = [i.text() for i in infos]
        encoded = [a1111.encode_png(img, t) for img, t in zip(images, texts)] if plan.body.send_images else []
        queue_s = (job.started or job.submitted) - job.submitted
        info = {
            "prompt": plan.body.prompt, "all_prompts": [plan.body.prompt] * len(seeds),
            "negative_prompt": plan.body.negative_prompt,
            "all_negative_prompts": [plan.body.negative_prompt] * len(seeds),
            "seed": plan.seed, "all_seeds": seeds, "subseed": plan.body.subseed, "all_subseeds": seeds,
            "subseed_strength": plan.body.subseed_strength, "width": plan.width, "height": plan.height,
            "sampler_name": plan.sampler, "cfg_scale": plan.body.cfg_scale, "steps": plan.steps,
            "batch_size": plan.batch_size, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": plan.checkpoint.model_name, "sd_model_hash": plan.checkpoint.sha256[:10],
            "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": plan.strength if plan.kind == "img2img" else 0,
            "extra_generation_params": {"Schedule type": plan.schedule, **(
                {"Lora hashes": ", ".join(f"{n}: {h}" for n, h in lora_hashes.items())} if lora_hashes else {})},
            "index_of_first_image": 0, "infotexts": texts, "styles": [], "job_timestamp":
                time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1, "is_using_inpainting_conditioning": False,
            "version": f"sdcache {__version__}",
            "sdcache": {
                "runner": self.runner_id, "queue_s": round(queue_s, 4),
                **{k: round(v, 4) for k, v in totals.items()}, "tiers": tiers,
                "interrupted": self.interrupted, "ignored_fields": plan.ignored,
            },
        }
        params = plan.body.model_dump(exclude={"init_images", "mask"}) | {"init_images": None} \
            if plan.kind == "img2img" else plan.body.model_dump()
        return {"images": encoded, "parameters": params, "info": json.dumps(info)}

    def estimate(self, plan: Plan) -> float:
        """Seconds the router expects *plan* to take on this runner once it starts."""
        return routing.estimate(plan.demand(), self.view()).total_s - self.view().wait_s


# --------------------------------------------------------------------------- HTTP


class Handlers(api.CommonHandlers):
    """The runner's own routes: generation, progress, interrupt, readiness."""

    s: ServeApp

    async def txt2img(self, request: web.Request) -> web.Response:
        return await self.generate(request, "txt2img")

    async def img2img(self, request: web.Request) -> web.Response:
        return await self.generate(request, "img2img")

    async def generate(self, request: web.Request, kind: str) -> web.Response:
        body = await api.read_json(request)
        plan = await asyncio.to_thread(make_plan, kind, body, self.s.catalog, self.s.default_model, self.s.limits)
        job = Job(kind, lambda j: self.s.execute(plan, j), demand=plan.demand())
        job.estimate_s = await asyncio.to_thread(self.s.estimate, plan)
        running, waiting = self.s.queue.snapshot()
        if running is not None:  # it will wait: fetch what it lacks meanwhile
            self.s.prefetch(plan)
        result = await self.s.queue.submit(job)
        return web.json_response(result, headers={"X-Sdcache-Runner": self.s.runner_id})

    async def progress(self, request: web.Request) -> web.Response:
        running, waiting = self.s.queue.snapshot()
        return web.json_response(progress_body(running, waiting, self.s.queue))

    async def interrupt(self, request: web.Request) -> web.Response:
        self.s.queue.interrupt()
        return web.json_response({})

    async def readyz(self, request: web.Request) -> web.Response:
        why = self.s.not_ready()
        if why:
            return web.json_response({"status": "not ready", "reason": why}, status=503)
        return web.json_response({"status": "ready"})


def progress_body(running: Job | None, waiting: list[Job], queue: JobQueue) -> dict[str, Any]:
    """A1111's ``ProgressResponse``, from the running job's step and the queue."""
    frac = 0.0
    eta = 0.0
    steps = step = 0
    if running is not None and running.steps:
        iters = max(1, getattr(running, "iterations", 1))
        frac = min(1.0, (running.iteration + running.step / running.steps) / iters)
        elapsed = time.monotonic() - (running.started or time.monotonic())
        eta = elapsed / frac - elapsed if frac > 0 else queue.mean_service_s
        steps, step = running.steps, running.step
    return {
        "progress": round(frac, 4), "eta_relative": round(eta, 3),
        "state": {"skipped": False, "interrupted": bool(running and running.stop_reason == "interrupted"),
                  "stopping_generation": False, "job": f"task({running.job_id})" if running else "",
                  "job_count": len(waiting) + (1 if running else 0), "job_timestamp": "0", "job_no": 0,
                  "sampling_step": step, "sampling_steps": steps},
        "current_image": None, "textinfo": None, "current_task": f"task({running.job_id})" if running else None,
        "sdcache": {"queue_depth": len(waiting), "max_queue": queue.max_queue,
                    "oldest_wait_s": round(time.monotonic() - waiting[0].submitted, 3) if waiting else 0.0},
    }


def build_app(s: ServeApp) -> web.Application:
    return api.build_app(Handlers(s), s.gate)


# --------------------------------------------------------------------------- entry point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sdcache serve`` options."""
    api.add_common_arguments(parser, "127.0.0.1:7860")
    parser.add_argument("--advertise", default=None, help="HOST:PORT the gateway should use (default: --listen)")
    parser.add_argument("--runner-id", default=None, help="name in the runner registry (default: HOST:PORT)")
    parser.add_argument("--no-register", action="store_true",
                        help="do not report to the runner registry (then only --api-auth users get in)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="with --no-register and no --api-auth: accept every request (never on a shared network)")
    parser.add_argument("--max-queue", type=int, default=16, help="requests waiting at most (default %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds from arrival to answer (default %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    parser.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32 (default %(default)s)")
    parser.add_argument("--no-optimize", action="store_true", help="run the stock diffusers pipeline")
    parser.add_argument("--host-budget", default=None,
                        help="host-RAM tier size (default: half the RAM, or of the container's memory limit)")
    parser.add_argument("--device-budget", default=None, help="device tier size (default: 60%% of the GPU, "
                        "0 on a CPU: only the model in use)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")


def main(args: argparse.Namespace) -> int:
    tls.export_to_env(args)
    return api.run_main("serve", args, _run)


def runner_factory(args: argparse.Namespace, meta: str) -> Any:
    def make() -> Any:
        import torch

        from sdcache.kernels.runner import Runner

        if args.threads:
            torch.set_num_threads(args.threads)
        return Runner(device=args.device, dtype=args.dtype, optimize=not args.no_optimize,
                      host_budget=parse_size(args.host_budget) if args.host_budget else None,
                      device_budget=parse_size(args.device_budget) if args.device_budget is not None else None,
                      meta=meta)

    return make


async def _run(args: argparse.Namespace, host: str, port: int) -> int:
    from sdcache.client.metaclient import MetaClient

    metas = meta_addresses(args.meta)
    credentials = tls.Credentials.from_args(args)
    limits = api.limits_from(args)
    if args.request_timeout <= 0:
        raise errors.InvalidArgument("--request-timeout must be positive")
    verifier = auth.TokenVerifier()
    gate = httpauth.Gate(verifier, httpauth.parse_api_auth(args.api_auth))
    meta_client = MetaClient(",".join(metas), credentials=credentials)
    catalog = Catalog(meta_client, args.checkpoints, args.loras, args.controlnets)
    if args.no_register and not gate.users and not args.insecure_no_auth:
        raise errors.InvalidArgument("--no-register leaves no token keys to check bearer tokens with: "
                                     "give --api-auth USER:PASS (or --insecure-no-auth on a private host)")
    s = ServeApp(catalog=catalog, limits=limits, queue=None, runner_factory=runner_factory(args, ",".join(metas)),  # type: ignore[arg-type]
                 runner_id="", gate=gate, default_model=args.default_model)
    # The runner is built on the queue's worker thread, first: torch work stays on that one thread.
    s.queue = queue = JobQueue(max_queue=args.max_queue, timeout=args.request_timeout, on_start=s.build_runner)

    runner, bound = await api.listen(build_app(s), host, port, credentials)
    address = args.advertise or bound
    s.address = address
    s.runner_id = args.runner_id or address
    tasks: list[asyncio.Task[Any]] = []
    if not args.no_register:
        s.reporter = Reporter(metas, s.runner_id, address, lambda: {"at": time.time(), **s.view().to_dict()},
                              credentials=credentials,
                              verifier=verifier)
        tasks.append(asyncio.create_task(s.reporter.run(), name="runner-report"))
    else:
        verifier.update([], {}, enabled=False)  # no registry, no keys: --api-auth guards it
        if not gate.users:
            log.warning("--insecure-no-auth: every request is accepted")
    if args.ready_file:
        write_ready_file(args.ready_file, bound)  # where it listens (the advertised name may not resolve here)
    print(f"sdcache serve listening on {address} (runner {s.runner_id})", flush=True)
    try:
        await api.until_signalled()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        await asyncio.to_thread(queue.close)
        meta_client.close()
    return 0

