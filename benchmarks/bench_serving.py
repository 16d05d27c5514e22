"""Serving (issue 9): ``serve``'s per-request overhead, and gateway routing policies on one Zipf trace.

1. **Overhead.** One ``sdcache serve`` process against a ``Runner`` in this
   process, built with the same options, on the same request (same model, size,
   steps, seed, sampler): rounds interleaved, medians, and the per-round
   difference. ``serve`` is timed as its client sees it (HTTP, JSON, the queue,
   PNG + base64 of the image, the A1111 ``info``); the runner as
   ``Runner.run``. The two images are checked to be the same pixels.
2. **Routing.** A Zipf trace over the bases and LoRAs (open loop: Poisson
   arrivals from a fixed seed, the same schedule for every policy) sent to
   ``sdcache gateway --policy P`` in front of two ``serve`` processes, for P in
   ``finish`` (ours), ``round-robin`` and ``multiplex`` (Ray Serve's rule). Open
   loop because a closed loop slows its own arrivals when the fleet is slow,
   which hides exactly the queueing that switches cause (and the simulator
   models arrivals by time). Before each policy the pool is emptied, the
   under-store files are dropped from the page cache and fresh ``serve`` and
   gateway processes start. A *base load* is a request whose
   ``info.sdcache.tiers`` shows the UNet not from the ``device`` tier.
   Statistics leave out the first ``--warmup`` share of requests, as the
   simulator does.
3. **Prediction.** ``sdcache simulate``'s engine (``sdcache.simulate.simulate``)
   on the same trace, two runners, the same tier and pool sizes, with the
   costs measured here: the pool's and the under-store's read rates from a
   probe before the runs, build, LoRA and denoise rates from the runs'
   own timings (medians over all three policies).

The full configuration (the default) writes 8 SD1.5-sized checkpoints (the
shipped SD1.5 configs, random weights, fp16, original single-file layout,
~2.13 GB each) that share one VAE and text encoder (those chunks dedup in the
pool) and 16 rank-32 kohya LoRAs (UNet and text encoder, fp16); ``--quick``
uses tiny models of the same structure, to debug the harness in a minute.
Memory is the constraint on the 2-vCPU, 24 GiB VM: see ``--help`` for the
sizes and RESULTS.md for why each is what it is. A sampler thread records the
peak of the processes' memory and the pool's bytes.

Run: ``python benchmarks/bench_serving.py [--quick] [--requests 100] [--rate 0.12]``
(``--json FILE`` writes every measured request and figure).
"""

from __future__ import annotations

import argparse
import base64
import bisect
import gc
import io
import itertools
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import requests  # noqa: E402
from _common import load_average, machine, table  # noqa: E402
from _serving_fleet import AUTH, Bench, Config, MemorySampler, write_models  # noqa: E402

POLICIES = ("finish", "round-robin", "multiplex")
PROMPT = "a photo of a lighthouse at dusk"


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    from sdcache.units import parse_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, a short trace: check the harness")
    ap.add_argument("--workdir", default="/tmp/sdcache-bench-serving",
                    help="models (kept between runs), cluster data, logs; local disk (default %(default)s)")
    ap.add_argument("--bases", type=int, default=8)
    ap.add_argument("--loras", type=int, default=16)
    ap.add_argument("--size", type=int, help="image side (default 128; 64 with --quick)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", help="runner dtype (default bf16; fp32 with --quick)")
    ap.add_argument("--optimize", action="store_true",
                    help="the optimized pipeline (pre-packs every conv/linear weight: a second copy of the UNet)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per runner (default 1: 2 runners, 2 vCPUs)")
    ap.add_argument("--pool", help="cache pool capacity (default 3GiB; 64MiB with --quick)")
    ap.add_argument("--host-budget", help="runner host-RAM tier (default 256MiB: a few LoRAs, never a base file; "
                    "4MiB with --quick)")
    ap.add_argument("--device-budget", help="runner device tier (default 5.2GB: two SD1.5 bases and a merged "
                    "LoRA's backups, what two runners fit in 24 GiB beside a 3 GiB pool; 0 with --quick: the "
                    "model in use)")
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--requests", type=int, help="trace length (default 100; 40 with --quick)")
    ap.add_argument("--rate", type=float, help="arrivals per second (default: round-robin's runners ~60%% busy, "
                    "from the first-load and warm costs of the overhead part; 0.1 without it)")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of popularity (default 1.0)")
    ap.add_argument("--seed", type=int, default=9, help="seed of the trace (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=0.1, help="leading share of requests left out of the statistics")
    ap.add_argument("--overhead-rounds", type=int, help="interleaved rounds for the overhead (default 15; 8 --quick)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-trace", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="write every request and figure as JSON")
    a = ap.parse_args(argv)
    q = a.quick
    cfg = Config(
        quick=q, workdir=Path(a.workdir) / ("quick" if q else "full"), bases=a.bases, loras=a.loras,
        size=a.size or (64 if q else 128), steps=a.steps, dtype=a.dtype or ("fp32" if q else "bf16"),
        optimize=a.optimize, threads=a.threads, pool=parse_size(a.pool or ("64MiB" if q else "3GiB")),
        host_budget=parse_size(a.host_budget or ("4MiB" if q else "256MiB")),
        device_budget=parse_size(a.device_budget or ("0" if q else "5.2GB")), max_queue=a.max_queue,
        requests=a.requests or (40 if q else 100), rate=a.rate or 0.0, zipf=a.zipf, seed=a.seed,
        warmup=a.warmup, overhead_rounds=a.overhead_rounds or (8 if q else 15),
        policies=tuple(p for p in a.policies.split(",") if p),
    )
    return cfg, a


# --------------------------------------------------------------------------- requests


def body(cfg: Config, base: str, loras: list[tuple[str, float]], seed: int) -> dict[str, Any]:
    tags = "".join(f" <lora:{n}:{w:g}>" for n, w in loras)
    return {"prompt": PROMPT + tags, "negative_prompt": "", "steps": cfg.steps, "width": cfg.size,
            "height": cfg.size, "seed": seed, "cfg_scale": 7.0, "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": base}}


def post(url: str, b: dict[str, Any], timeout: float = 1800) -> requests.Response:
    return requests.post(url + "/sdapi/v1/txt2img", json=b, auth=AUTH, timeout=timeout)


def sdcache_info(r: requests.Response) -> dict[str, Any]:
    return json.loads(r.json()["info"])["sdcache"]


def unet_tier(info: dict[str, Any]) -> str:
    return next(t["tier"] for t in info["tiers"] if t["component"] == "unet")


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    """The simulator's percentile rule (nearest rank), so measured and predicted figures compare."""
    from sdcache.simulate import _percentile

    return _percentile(sorted(xs), q)


# --------------------------------------------------------------------------- 1. overhead


def measure_overhead(bench: Bench) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image

    from sdcache.kernels.request import Request
    from sdcache.kernels.runner import Runner

    cfg = bench.cfg
    base = bench.models.bases[0].stem
    solo = bench.serve("solo")
    torch.set_num_threads(cfg.threads)
    runner = Runner(device="cpu", dtype=cfg.dtype, optimize=cfg.optimize, host_budget=cfg.host_budget,
                    device_budget=cfg.device_budget, meta=bench.meta)
    solo.wait_ready()
    url = f"sdcache://models/checkpoints/{base}.safetensors"
    req = Request(model=url, prompt=PROMPT, negative_prompt="", steps=cfg.steps, guidance=7.0,
                  size=(cfg.size, cfg.size), seed=1234, scheduler="euler")
    b = body(cfg, base, [], 1234)
    serve_s: list[float] = []
    local_s: list[float] = []
    serve_denoise: list[float] = []
    local_denoise: list[float] = []
    outside: list[float] = []  # wall time not spent in Runner.run's three timed stages, same request
    local_outside: list[float] = []
    same = True

    def one_serve(record: bool) -> None:
        nonlocal same
        t = time.perf_counter()
        r = post(solo.url, b)
        dt = time.perf_counter() - t
        r.raise_for_status()
        info = sdcache_info(r)
        if record:
            serve_s.append(dt)
            serve_denoise.append(info["denoise_s"])
            outside.append(dt - info["fetch_s"] - info["switch_s"] - info["denoise_s"])
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        same = same and bool(np.array_equal(img, ref))

    def one_local(record: bool) -> None:
        t = time.perf_counter()
        res = runner.run(req)
        dt = time.perf_counter() - t
        if record:
            local_s.append(dt)
            local_denoise.append(res.denoise_s)
            local_outside.append(dt - res.fetch_s - res.switch_s - res.denoise_s)

    first = runner.run(req)  # a base load: what a switch costs, for the trace's arrival rate
    ref = np.asarray(first.image.convert("RGB"))
    one_local(False)
    for _ in range(2):
        one_serve(False)
    for i in range(cfg.overhead_rounds):  # interleaved, the order alternating: drift hits both alike
        for fn in ((one_serve, one_local) if i % 2 == 0 else (one_local, one_serve)):
            fn(True)
    solo.stop()
    bench.procs.remove(solo)
    runner = None  # the model goes with it
    gc.collect()
    try:  # hand the freed model back to the OS: the trace's runners need the room
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    diffs = [s - lo for s, lo in zip(serve_s, local_s)]
    return {"first_load_s": first.fetch_s + first.switch_s, "serve_s": serve_s, "local_s": local_s,
            "serve_denoise_s": serve_denoise,
            "local_denoise_s": local_denoise, "paired_diff_s": diffs, "outside_runner_s": outside,
            "local_outside_runner_s": local_outside, "same_image": same, "model": base}


def report_overhead(cfg: Config, o: dict[str, Any]) -> str:
    s, lo = med(o["serve_s"]), med(o["local_s"])
    d = s - lo
    pd = med(o["paired_diff_s"])
    ok = d <= 0.05 * lo or d <= 0.020
    rows = [
        ("request, wall (median)", f"{s * 1e3:.1f} ms", f"{lo * 1e3:.1f} ms", f"{d * 1e3:+.1f} ms ({100 * d / lo:+.1f}%)"),
        ("per-round difference (median)", "", "", f"{pd * 1e3:+.1f} ms ({100 * pd / lo:+.1f}%)"),
        ("wall minus the runner's fetch+switch+denoise (median)", f"{med(o['outside_runner_s']) * 1e3:.1f} ms",
         f"{med(o['local_outside_runner_s']) * 1e3:.1f} ms",
         f"{(med(o['outside_runner_s']) - med(o['local_outside_runner_s'])) * 1e3:+.1f} ms"),
        ("denoise inside (median)", f"{med(o['serve_denoise_s']) * 1e3:.1f} ms",
         f"{med(o['local_denoise_s']) * 1e3:.1f} ms",
         f"{(med(o['serve_denoise_s']) - med(o['local_denoise_s'])) * 1e3:+.1f} ms"),
    ]
    out = table(f"serve overhead: {o['model']}, {cfg.size}x{cfg.size}, {cfg.steps} steps, seed 1234, Euler, "
                f"{cfg.dtype}, device tier hit, {len(o['serve_s'])} interleaved rounds",
                rows, ("measure", "sdcache serve (HTTP)", "Runner.run in-process", "serve - in-process"))
    out += (f"\nsame image from both: {o['same_image']}; target: at most 5% or 20 ms: "
            f"{'met' if ok else 'NOT met'} (median difference {d * 1e3:.1f} ms = {100 * d / lo:.1f}%)")
    return out


# --------------------------------------------------------------------------- 2. the trace


@dataclass
class TraceRequest:
    t: float
    base: str
    loras: list[tuple[str, float]]
    seed: int


class _Zipf:
    def __init__(self, items: list[str], s: float, rng: random.Random) -> None:
        self.items = list(items)
        rng.shuffle(self.items)  # popularity rank independent of the name
        self.cum = list(itertools.accumulate(1.0 / r**s for r in range(1, len(self.items) + 1)))

    def draw(self, rng: random.Random) -> str:
        return self.items[bisect.bisect_right(self.cum, rng.random() * self.cum[-1])]


def make_trace(cfg: Config, bases: list[str], loras: list[str]) -> list[TraceRequest]:
    """Zipf over bases and LoRAs (0, 1 or 2 LoRAs with p 0.4/0.4/0.2, as ``simulate``), Poisson arrivals."""
    rng = random.Random(cfg.seed)
    pick_base, pick_lora = _Zipf(bases, cfg.zipf, rng), _Zipf(loras, cfg.zipf, rng)
    out, t = [], 0.0
    for _ in range(cfg.requests):
        t += rng.expovariate(cfg.rate)
        n = rng.choices((0, 1, 2), (0.4, 0.4, 0.2))[0]
        chosen = list(dict.fromkeys(pick_lora.draw(rng) for _ in range(n)))
        out.append(TraceRequest(round(t, 3), pick_base.draw(rng), [(lo, 0.8) for lo in chosen],
                                rng.randrange(1 << 31)))
    return out


@dataclass
class Outcome:
    i: int
    status: int
    latency_s: float
    runner: str = ""
    unet_tier: str = ""
    fetch_s: float = 0.0
    switch_s: float = 0.0
    denoise_s: float = 0.0
    queue_s: float = 0.0
    lora_tiers: list[str] = field(default_factory=list)
    error: str = ""


def replay(bench: Bench, policy: str, trace: list[TraceRequest],
           stopped: Any = lambda: False) -> tuple[list[Outcome], float]:
    """Send *trace* through a fresh gateway + two fresh runners, on schedule; (outcomes, wall seconds)."""
    cfg = bench.cfg
    bench.reset_pool()
    print(f"#   {policy}: pool emptied ({bench.pool_bytes() / 2**20:.0f} MiB left), page cache dropped", flush=True)
    runners = [bench.serve(f"runner-{k}") for k in (1, 2)]
    gw = bench.gateway(policy)
    for p in (*runners, gw):
        p.wait_ready()
    end = time.monotonic() + 60
    while requests.get(gw.url + "/sdapi/v1/progress", auth=AUTH, timeout=10).json()["sdcache"]["available"] < 2:
        if time.monotonic() > end:
            raise RuntimeError("the gateway never saw both runners")
        time.sleep(0.2)
    out: list[Outcome | None] = [None] * len(trace)

    def send(i: int, tr: TraceRequest, due: float) -> None:
        try:
            r = post(gw.url, body(cfg, tr.base, tr.loras, tr.seed))
            lat = time.monotonic() - due  # from the scheduled arrival: a late send is the client's delay too
            if r.status_code != 200:
                out[i] = Outcome(i, r.status_code, lat, error=r.text[:200])
                return
            info = sdcache_info(r)
            out[i] = Outcome(i, 200, lat, r.headers.get("X-Sdcache-Runner", ""), unet_tier(info),
                             info["fetch_s"], info["switch_s"], info["denoise_s"], info["queue_s"],
                             [t["tier"] for t in info["tiers"] if t["component"] == "lora"])
        except requests.RequestException as exc:
            out[i] = Outcome(i, 0, time.monotonic() - due, error=f"{type(exc).__name__}: {exc}")

    start = time.monotonic() + 1.0
    with ThreadPoolExecutor(max_workers=2 * (cfg.max_queue + 2) + 8) as pool:
        for i, tr in enumerate(trace):
            if stopped():
                break
            due = start + tr.t
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, i, tr, due)
            if (i + 1) % 10 == 0:
                print(f"#   {policy}: sent {i + 1}/{len(trace)}, load {load_average()}", flush=True)
    wall = time.monotonic() - start
    bench.stop_procs()
    return [o for o in out if o is not None], wall


@dataclass
class PolicyResult:
    policy: str
    measured: int
    failed: int
    loads: int
    p50_s: float
    p99_s: float
    mean_s: float
    wall_s: float
    tiers: dict[str, int]
    peak_ours: int = 0
    peak_used: int = 0

    @property
    def loads_per_100(self) -> float:
        return 100 * self.loads / self.measured if self.measured else float("nan")


def summarize(policy: str, outcomes: list[Outcome], first: int, wall: float) -> PolicyResult:
    kept = [o for o in outcomes if o.i >= first]
    ok = [o for o in kept if o.status == 200]
    lat = [o.latency_s for o in ok]
    tiers: dict[str, int] = {}
    for o in ok:
        tiers[o.unet_tier] = tiers.get(o.unet_tier, 0) + 1
    return PolicyResult(policy, len(ok), len(kept) - len(ok), sum(o.unet_tier != "device" for o in ok),
                        pct(lat, 0.5), pct(lat, 0.99), sum(lat) / len(lat) if lat else float("nan"), wall, tiers)


# --------------------------------------------------------------------------- 3. the simulator


def probe_bandwidths(bench: Bench, names: list[str]) -> dict[str, float]:
    """Bytes/s of a base into a runner's RAM: from the under-store (cold pool, cold page cache) and from the pool."""
    from sdcache.client import load_safetensors

    cold, warm = [], []
    for name in names:
        url = f"sdcache://models/checkpoints/{name}.safetensors"
        size = bench.sizes[name]
        bench.reset_pool()
        for out in (cold, warm):
            t = time.perf_counter()
            sd = load_safetensors(url, meta=bench.meta)
            out.append(size / (time.perf_counter() - t))
            del sd
            gc.collect()
    bench.reset_pool()
    return {"store_bps": med(cold), "cluster_bps": med(warm)}


def measured_costs(cfg: Config, runs: dict[str, list[Outcome]], trace: list[TraceRequest],
                   sizes: dict[str, int]) -> dict[str, float]:
    """Build, LoRA-switch and denoise rates from the requests' own timings (all policies pooled)."""
    work = cfg.steps * cfg.size * cfg.size / 1e6
    denoise, build, lora_s, fetch = [], [], [], []
    for outs in runs.values():
        for o in outs:
            if o.status != 200:
                continue
            denoise.append(o.denoise_s / work)
            tr = trace[o.i]
            if o.unet_tier != "device":
                fetch.append(o.fetch_s)
            if o.unet_tier != "device" and not tr.loras and o.switch_s > 0:
                build.append(sizes[tr.base] / o.switch_s)
            elif o.unet_tier == "device" and tr.loras and any(t != "device" for t in o.lora_tiers):
                lora_s.append(o.switch_s / len(tr.loras))
    return {"denoise_s_per_step_mp": med(denoise), "build_bps": med(build),
            "lora_switch_s": med(lora_s) if lora_s else 0.01, "load_fetch_s": med(fetch)}


def predict(cfg: Config, trace: list[TraceRequest], sizes: dict[str, int], costs: dict[str, float],
            bandwidths: dict[str, float], device_bytes: int | None = None) -> dict[str, Any]:
    from sdcache.routing import Component, Demand
    from sdcache.simulate import Arrival, Fleet, simulate

    device_bytes = cfg.device_budget if device_bytes is None else device_bytes
    arrivals = [Arrival(tr.t, Demand(
        Component(f"/models/checkpoints/{tr.base}.safetensors", "base", sizes[tr.base]),
        loras=tuple(Component(f"/models/loras/{n}.safetensors", "lora", sizes[n]) for n, _ in tr.loras),
        steps=cfg.steps, width=cfg.size, height=cfg.size)) for tr in trace]
    fleet = Fleet(runners=2, device_bytes=device_bytes, host_bytes=cfg.host_budget, pool_bytes=cfg.pool,
                  link_bps=bandwidths["cluster_bps"], store_bps=bandwidths["store_bps"], build_bps=costs["build_bps"],
                  denoise_s_per_step_mp=costs["denoise_s_per_step_mp"], lora_switch_s=costs["lora_switch_s"],
                  max_queue=cfg.max_queue, warmup=cfg.warmup)
    return {p: simulate(arrivals, fleet, p) for p in cfg.policies}


def device_sweep(cfg: Config, trace: list[TraceRequest], sizes: dict[str, int], costs: dict[str, float],
                 bandwidths: dict[str, float]) -> str:
    """Simulated only: the same trace and costs with device tiers that hold 1, 2 and 4 bases per runner."""
    biggest = max(sizes[n] for n in {tr.base for tr in trace})
    rows = []
    for k in (1, 2, 3, 4):
        sims = predict(cfg, trace, sizes, costs, bandwidths, device_bytes=int(k * biggest * 1.02) if k > 1 else 0)
        f, rr = sims.get("finish"), sims.get("round-robin")
        if f is None or rr is None:
            return ""
        m = sims.get("multiplex")
        rows.append((str(k), f"{100 * f.loads_per_request:.1f}", f"{100 * rr.loads_per_request:.1f}",
                     f"{100 * m.loads_per_request:.1f}" if m else "-",
                     f"{f.loads_per_request / rr.loads_per_request:.2f}" if rr.loads_per_request else "-",
                     f"{f.p99_s:.1f}", f"{rr.p99_s:.1f}", f"{m.p99_s:.1f}" if m else "-",
                     f"{f.p99_s / rr.p99_s:.2f}" if rr.p99_s else "-"))
    held = max(1, int(cfg.device_budget // biggest))
    return table("simulated only: the same trace and measured costs, device tier holding k bases per runner "
                 f"(the measured configuration holds {held})", rows,
                 ("k", "finish loads/100", "RR loads/100", "multiplex loads/100", "loads vs RR",
                  "finish p99 s", "RR p99 s", "multiplex p99 s", "p99 vs RR"))


# --------------------------------------------------------------------------- main


def wait_for_memory(nbytes: int, timeout: float) -> None:
    from _serving_fleet import _host_total, _host_used

    end = time.monotonic() + timeout
    while _host_total() - _host_used() < nbytes and time.monotonic() < end:
        time.sleep(15)


def report_trace(cfg: Config, results: dict[str, PolicyResult], sims: dict[str, Any] | None) -> str:
    rr = results.get("round-robin")
    rows = []
    for p, r in results.items():
        s = sims.get(p) if sims else None
        rows.append((
            p, str(r.measured), str(r.failed),
            f"{r.loads_per_100:.1f}", f"{100 * s.loads_per_request:.1f}" if s else "-",
            f"{r.p50_s:.2f}", f"{s.p50_s:.2f}" if s else "-",
            f"{r.p99_s:.2f}", f"{s.p99_s:.2f}" if s else "-",
            f"{r.loads_per_100 / rr.loads_per_100:.2f}" if rr and rr.loads_per_100 else "-",
            f"{r.p99_s / rr.p99_s:.2f}" if rr and rr.p99_s else "-",
            " ".join(f"{k}:{v}" for k, v in sorted(r.tiers.items())),
            f"{r.peak_ours / 2**30:.1f}",
        ))
    out = table(f"gateway routing, {cfg.requests} requests (first {int(cfg.requests * cfg.warmup)} left out), "
                f"Poisson {cfg.rate:g}/s, Zipf {cfg.zipf:g} over {cfg.bases} bases and {cfg.loras} LoRAs, "
                "2 runners; measured beside simulated",
                rows, ("policy", "requests", "failed", "loads/100", "sim loads/100", "p50 s", "sim p50 s",
                       "p99 s", "sim p99 s", "loads vs RR", "p99 vs RR", "unet tiers", "peak GiB"))
    f = results.get("finish")
    if f and rr:
        out += (f"\ntarget loads <= 1/3 of round-robin's: {f.loads_per_100 / rr.loads_per_100:.2f} -> "
                f"{'met' if f.loads_per_100 <= rr.loads_per_100 / 3 else 'NOT met'}; "
                f"target p99 <= 1/2 of round-robin's: {f.p99_s / rr.p99_s:.2f} -> "
                f"{'met' if f.p99_s <= rr.p99_s / 2 else 'NOT met'}")
    return out


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    started = datetime.now(timezone.utc)
    print(f"# {machine()}; load {load_average()}; {started:%Y-%m-%d %H:%M} UTC", flush=True)
    print(f"# config: {json.dumps({k: str(v) for k, v in asdict(cfg).items()})}", flush=True)
    models = write_models(cfg)
    bench = Bench(cfg, models)
    doc: dict[str, Any] = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "machine": machine(),
                           "started": started.isoformat()}
    sections: list[str] = []
    try:
        bench.start()
        print(f"# cluster up, {len(bench.sizes)} files imported; load {load_average()}", flush=True)
        if not args.skip_overhead:
            with MemorySampler(bench) as mem:
                o = measure_overhead(bench)
            o["peak_ours"], o["peak_used"] = mem.peak_ours, mem.peak_used
            doc["overhead"] = o
            if not cfg.rate:  # round-robin loads a base for ~80% of requests on 8 Zipf bases (simulate: 77)
                cfg.rate = round(0.6 * 2 / (med(o["local_s"]) + 0.8 * o["first_load_s"]), 3)
                print(f"# rate: {cfg.rate}/s (warm request {med(o['local_s']):.2f} s, first load "
                      f"{o['first_load_s']:.2f} s)", flush=True)
            sections.append(report_overhead(cfg, o) + f"\npeak memory (our processes + pool): "
                            f"{mem.peak_ours / 2**30:.1f} GiB; load {load_average()}")
            print(sections[-1], flush=True)
        if not args.skip_trace:
            cfg.rate = cfg.rate or 0.1
            base_names, lora_names = models.names
            trace = make_trace(cfg, base_names, lora_names)
            bw = probe_bandwidths(bench, base_names[:2])
            print(f"# probe: under-store -> runner {bw['store_bps'] / 1e9:.2f} GB/s, pool -> runner "
                  f"{bw['cluster_bps'] / 1e9:.2f} GB/s; load {load_average()}", flush=True)
            runs: dict[str, list[Outcome]] = {}
            results: dict[str, PolicyResult] = {}
            first = int(len(trace) * cfg.warmup)
            loads: dict[str, str] = {}
            peaks: dict[str, dict[str, int]] = {}
            for policy in cfg.policies:
                for attempt in range(3):  # the host is shared: a run the memory guard stopped is run again
                    before = load_average()
                    with MemorySampler(bench) as mem:
                        outs, wall = replay(bench, policy, trace, lambda: mem.tripped)
                    if not mem.tripped:
                        break
                    print(f"# {policy}: stopped by the memory guard (attempt {attempt + 1}); waiting for "
                          "12 GiB available", flush=True)
                    wait_for_memory(12 << 30, 1200)
                runs[policy] = outs
                r = summarize(policy, outs, first, wall)
                r.peak_ours, r.peak_used = mem.peak_ours, mem.peak_used
                results[policy] = r
                loads[policy] = f"{before} -> {load_average()}"
                print(f"# {policy}: {r.measured} ok, {r.failed} failed, {r.loads_per_100:.1f} loads/100, p50 "
                      f"{r.p50_s:.2f} s, p99 {r.p99_s:.2f} s, {wall:.0f} s, peak {r.peak_ours / 2**30:.1f} GiB "
                      f"(host used {r.peak_used / 2**30:.1f} GiB); load {loads[policy]}", flush=True)
                print("#   peak private memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in mem.peaks.items()),
                      flush=True)
                peaks[policy] = dict(mem.peaks)
            costs = measured_costs(cfg, runs, trace, bench.sizes)
            sims = predict(cfg, trace, bench.sizes, costs, bw)
            traced = [report_trace(cfg, results, sims)]
            traced.append(
                "simulator inputs (measured in this run): "
                f"pool -> runner {bw['cluster_bps'] / 1e9:.2f} GB/s, under-store -> runner "
                f"{bw['store_bps'] / 1e9:.2f} GB/s, build {costs['build_bps'] / 1e9:.2f} GB/s, "
                f"LoRA switch {costs['lora_switch_s'] * 1e3:.0f} ms, fetch per base load {costs['load_fetch_s']:.2f} s "
                f"(median of the runs), denoise "
                f"{costs['denoise_s_per_step_mp']:.1f} s/step/MP ({costs['denoise_s_per_step_mp'] * cfg.steps * cfg.size**2 / 1e6:.2f} s "
                f"per request); pool {cfg.pool / 2**30:.2f} GiB, host tier {cfg.host_budget / 2**30:.2f} GiB, "
                f"device tier {cfg.device_budget} B; load per policy: "
                + ", ".join(f"{p} {v}" for p, v in loads.items()))
            sweep = device_sweep(cfg, trace, bench.sizes, costs, bw)
            if sweep:
                traced.append(sweep)
            sections += traced
            print("\n".join(traced), flush=True)
            doc.update(trace=[asdict(t) for t in trace], runs={p: [asdict(o) for o in v] for p, v in runs.items()},
                       results={p: asdict(r) for p, r in results.items()},
                       sim={p: s.to_dict() for p, s in sims.items()}, costs=costs, bandwidths=bw,
                       memory_peaks=peaks)
    finally:
        bench.close()
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    print(f"\n# done {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load {load_average()}")
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
