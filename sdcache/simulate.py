"""``sdcache simulate``: a discrete-event simulation of a serving fleet under a routing policy.

It answers sizing questions before buying hardware ("how big must the cache
pool be for p99 under 10 s?") and compares routing policies, with the very
policy objects the gateway uses (:mod:`sdcache.policies`, over the fleet model of
:mod:`sdcache.routing`). See
``docs/SIMULATE.md`` for what it models and what it does not.

The world: *G* runners, each serving one request at a time from a FIFO queue,
with a device tier and a host-RAM tier (:class:`sdcache.routing.Tier`, the
runner's own LRU rule); one cache pool (an LRU over whole files) in front of
an under-store whose bandwidth is shared, max-min fairly, among concurrent
misses; a miss is read once (concurrent requests for the same file wait for
that read) and then the pool holds it. Each runner's link caps its fetches.

The gateway's side: one :class:`~sdcache.routing.RunnerView` per runner, kept
as the gateway keeps it (its queue from the runner's reports, its tiers as
:meth:`~sdcache.routing.RunnerView.assign` leaves them), and
:class:`~sdcache.routing.Costs` learned from the timings of finished requests,
as a runner's heartbeat would carry them.

This module is pure core: matplotlib is imported only to draw ``--plot``, and
tqdm only for the progress bar.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import json
import math
import random
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from .errors import InvalidArgument
from .policies import POLICIES, Policy, make_policy
from .routing import (
    TIER_CLUSTER,
    TIER_DEVICE,
    TIER_STORE,
    TIERS,
    Component,
    Costs,
    Demand,
    RunnerView,
    Tier,
    estimate,
)
from .units import format_size, parse_size

GB = 10**9
MB = 10**6


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of a trace: when it arrives (seconds from the start) and what it needs."""

    t: float
    demand: Demand


@dataclass(frozen=True)
class Workload:
    """A synthetic trace: Zipf popularity over a catalogue of the product's real sizes.

    Bases are SD1.5-class (2.0-2.4 GB, 512x512, 25 steps) or, with
    probability *xl_share*, SDXL-class (6.0-7.0 GB, 1024x1024, 30 steps);
    LoRAs around 100 MB (log-normal, 10-400 MB) and ControlNets (0.7 GB or
    2.5 GB) belong to one family and are drawn among those of the base's
    family. Popularity ranks are a seeded shuffle, so size and rank are
    independent. Arrivals are Poisson at *rate* per second.
    """

    requests: int = 20_000
    rate: float = 2.0
    bases: int = 8_000
    loras: int = 10_000
    controlnets: int = 16
    zipf: float = 1.0
    xl_share: float = 0.4
    lora_counts: tuple[float, ...] = (0.4, 0.4, 0.2)  # P(0 LoRAs), P(1), P(2)
    controlnet_share: float = 0.15
    seed: int = 0

    def validate(self) -> None:
        if self.requests < 1:
            raise InvalidArgument(f"--requests must be >= 1, not {self.requests}")
        if not self.rate > 0:
            raise InvalidArgument(f"--rate must be > 0 requests per second, not {self.rate}")
        if self.bases < 1 or self.loras < 0 or self.controlnets < 0:
            raise InvalidArgument("--bases must be >= 1, --loras and --controlnets >= 0")
        if self.zipf < 0:
            raise InvalidArgument(f"--zipf must be >= 0, not {self.zipf}")


class _Zipf:
    """Draws items with probability proportional to 1 / rank**s, ranks a seeded shuffle of *items*."""

    def __init__(self, items: Sequence[Any], s: float, rng: random.Random) -> None:
        self.items = list(items)
        rng.shuffle(self.items)
        self.cum = list(itertools.accumulate(1.0 / (r**s) for r in range(1, len(self.items) + 1)))

    def draw(self, rng: random.Random) -> Any:
        return self.items[bisect.bisect_right(self.cum, rng.random() * self.cum[-1]) if len(self.items) > 1 else 0]


def synthetic_trace(w: Workload) -> list[Arrival]:
    """The trace *w* describes; the same *w* (seed included) gives the same trace."""
    w.validate()
    rng = random.Random(w.seed)
    families = ("sd15", "sdxl")
    fam_of = lambda: "sdxl" if rng.random() < w.xl_share else "sd15"  # noqa: E731
    bases: dict[str, list[Component]] = {f: [] for f in families}
    for i in range(w.bases):
        f = fam_of()
        size = rng.uniform(6.0, 7.0) if f == "sdxl" else rng.uniform(2.0, 2.4)
        bases[f].append(Component(f"/models/checkpoints/{f}-{i:05d}.safetensors", "base", int(size * GB)))
    loras: dict[str, list[Component]] = {f: [] for f in families}
    for i in range(w.loras):
        f = fam_of()
        size = min(max(rng.lognormvariate(math.log(100 * MB), 0.5), 10 * MB), 400 * MB)
        loras[f].append(Component(f"/models/loras/{f}-{i:05d}.safetensors", "lora", int(size)))
    cns: dict[str, list[Component]] = {f: [] for f in families}
    for i in range(w.controlnets):
        f = families[i % 2]
        cns[f].append(Component(f"/models/controlnet/{f}-{i:02d}.safetensors", "controlnet",
                                int((2.5 if f == "sdxl" else 0.72) * GB)))
    base_pick = _Zipf([b for f in families for b in bases[f]], w.zipf, rng)
    lora_pick = {f: _Zipf(loras[f], w.zipf, rng) for f in families if loras[f]}
    cn_pick = {f: _Zipf(cns[f], w.zipf, rng) for f in families if cns[f]}
    count_cum = list(itertools.accumulate(w.lora_counts))
    out: list[Arrival] = []
    t = 0.0
    for _ in range(w.requests):
        t += rng.expovariate(w.rate)
        base = base_pick.draw(rng)
        f = "sdxl" if "/sdxl-" in base.key else "sd15"
        n = min(bisect.bisect_right(count_cum, rng.random() * count_cum[-1]), len(w.lora_counts) - 1)
        chosen: dict[str, Component] = {}
        if f in lora_pick:
            for _ in range(n):
                lo = lora_pick[f].draw(rng)
                chosen[lo.key] = lo
        cn = cn_pick[f].draw(rng) if f in cn_pick and rng.random() < w.controlnet_share else None
        side = 1024 if f == "sdxl" else 512
        out.append(Arrival(t, Demand(base, loras=tuple(chosen.values()), controlnet=cn,
                                     steps=30 if f == "sdxl" else 25, width=side, height=side)))
    return out


# --------------------------------------------------------------------------- trace files


def _component(obj: Any, kind: str, where: str) -> Component:
    if not isinstance(obj, dict) or "key" not in obj or "nbytes" not in obj:
        raise InvalidArgument(f"{where}: {kind} must be an object with 'key' and 'nbytes'")
    try:
        nbytes = parse_size(obj["nbytes"]) if isinstance(obj["nbytes"], str) else int(obj["nbytes"])
    except (TypeError, ValueError):
        raise InvalidArgument(f"{where}: {kind} nbytes is not a size: {obj['nbytes']!r}") from None
    return Component(str(obj["key"]), kind, nbytes)  # type: ignore[arg-type]


def read_trace(path: str) -> list[Arrival]:
    """Arrivals from a JSONL trace file (fields in ``docs/SIMULATE.md``), sorted by time."""
    out: list[Arrival] = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read trace {path}: {exc.strerror or exc}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{where}: not JSON: {exc.msg}") from None
            if not isinstance(d, dict) or "t" not in d or "base" not in d:
                raise InvalidArgument(f"{where}: a request needs at least 't' and 'base'")
            try:
                t = float(d["t"])
                demand = Demand(
                    _component(d["base"], "base", where),
                    loras=tuple(_component(x, "lora", where) for x in d.get("loras") or ()),
                    controlnet=_component(d["controlnet"], "controlnet", where) if d.get("controlnet") else None,
                    steps=int(d.get("steps", 25)), width=int(d.get("width", 512)), height=int(d.get("height", 512)),
                    batch=int(d.get("batch", 1)),
                )
            except InvalidArgument as exc:
                raise InvalidArgument(f"{where}: {exc}" if not str(exc).startswith(where) else str(exc)) from None
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"{where}: {exc}") from None
            if not (t >= 0 and math.isfinite(t)):
                raise InvalidArgument(f"{where}: 't' must be seconds >= 0, not {d['t']!r}")
            out.append(Arrival(t, demand))
    if not out:
        raise InvalidArgument(f"trace {path} holds no requests")
    out.sort(key=lambda a: a.t)
    return out


def write_trace(path: str, arrivals: Iterable[Arrival]) -> None:
    """Write *arrivals* as a JSONL trace :func:`read_trace` reads back."""
    with open(path, "w", encoding="utf-8") as f:
        for a in arrivals:
            d = a.demand
            row = {
                "t": a.t, "base": {"key": d.base.key, "nbytes": d.base.nbytes},
                "loras": [{"key": lo.key, "nbytes": lo.nbytes} for lo in d.loras],
                "controlnet": {"key": d.controlnet.key, "nbytes": d.controlnet.nbytes} if d.controlnet else None,
                "steps": d.steps, "width": d.width, "height": d.height, "batch": d.batch,
            }
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


# --------------------------------------------------------------------------- the fleet


@dataclass(frozen=True)
class Fleet:
    """The hardware being sized: *runners* GPU hosts, one cache pool, one under-store (bytes, bytes/s, s)."""

    runners: int = 16
    device_bytes: int = 48 << 30
    host_bytes: int = 128 << 30
    pool_bytes: int = 2 << 40
    link_bps: float = 1.25e9
    store_bps: float = 4.0e9
    build_bps: float = 2.0e9
    denoise_s_per_step_mp: float = 0.1
    lora_switch_s: float = 0.2
    max_queue: int = 16
    warmup: float = 0.1  # leading share of requests simulated but left out of the statistics

    def validate(self) -> None:
        if self.runners < 1:
            raise InvalidArgument(f"--runners must be >= 1, not {self.runners}")
        for name in ("link_bps", "store_bps", "build_bps", "denoise_s_per_step_mp"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"{name.replace('_', '-')} must be > 0")
        if self.lora_switch_s < 0 or self.max_queue < 1:
            raise InvalidArgument("--lora-switch must be >= 0 and --max-queue >= 1")
        if not 0 <= self.warmup < 1:
            raise InvalidArgument(f"--warmup must be a fraction in [0, 1), not {self.warmup}")


@dataclass
class Result:
    """What one simulation measured (over the requests after the warm-up)."""

    policy: str
    pool_bytes: int
    requests: int
    rejected: int
    p50_s: float
    p99_s: float
    mean_s: float
    base_loads: int
    tier_hits: dict[str, float]  # share of model components served by each tier
    store_bytes: int
    store_bps: float
    duration_s: float
    latencies: list[float] = field(default_factory=list, repr=False)

    @property
    def loads_per_request(self) -> float:
        return self.base_loads / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("latencies")
        d["loads_per_request"] = self.loads_per_request
        d["loads_per_100"] = 100 * self.loads_per_request
        return d


class _StoreLink:
    """The under-store's bandwidth, shared max-min fairly by concurrent reads, each capped by its runner's link."""

    def __init__(self, bps: float) -> None:
        self.bps = bps
        self.flows: dict[int, list[Any]] = {}  # id -> [remaining bytes, cap, rate, on_done]
        self.now = 0.0
        self.version = 0
        self._ids = itertools.count()

    def _advance(self, now: float) -> None:
        dt = now - self.now
        if dt > 0:
            for f in self.flows.values():
                f[0] -= f[2] * dt
        self.now = now

    def _rates(self) -> float | None:
        """Recompute rates; the time of the next completion (None when idle)."""
        left, n = self.bps, len(self.flows)
        nxt = None
        for i, f in enumerate(sorted(self.flows.values(), key=lambda f: f[1])):
            f[2] = min(f[1], left / (n - i))
            left -= f[2]
            done = self.now + max(f[0], 0.0) / f[2]
            nxt = done if nxt is None or done < nxt else nxt
        self.version += 1
        return nxt

    def start(self, now: float, nbytes: int, cap: float, on_done: Callable[[float], None]) -> float | None:
        self._advance(now)
        self.flows[next(self._ids)] = [float(nbytes), cap, 0.0, on_done]
        return self._rates()

    def finish_due(self, now: float) -> tuple[list[Callable[[float], None]], float | None]:
        """Complete the reads done by *now*; their callbacks and the next completion time."""
        self._advance(now)
        done = [k for k, f in self.flows.items() if f[0] <= max(1.0, f[2] * 1e-9)]
        calls = [self.flows.pop(k)[3] for k in done]
        return calls, self._rates()


class _Job:
    __slots__ = ("idx", "arrival", "demand", "work_est", "start", "end", "pending", "measured",
                 "pool_bytes", "store_bytes", "build_bytes", "switch_s", "denoise_s", "lora_changes", "lora_s")

    def __init__(self, idx: int, arrival: Arrival, work_est: float) -> None:
        self.idx, self.arrival, self.demand, self.work_est = idx, arrival, arrival.demand, work_est
        self.start = self.end = 0.0
        self.pending = 0
        self.measured = False
        self.pool_bytes = self.store_bytes = self.build_bytes = self.lora_changes = 0
        self.switch_s = self.denoise_s = self.lora_s = 0.0


class _Runner:
    """One simulated runner: its true tiers (a RunnerView with the true costs), queue and current job."""

    __slots__ = ("truth", "view", "queue", "job", "store_start")

    def __init__(self, rid: str, fleet: Fleet) -> None:
        true_costs = Costs(ram_to_device_bps=fleet.build_bps, cluster_bps=fleet.link_bps,
                           store_bps=min(fleet.link_bps, fleet.store_bps),
                           denoise_s_per_step_mp=fleet.denoise_s_per_step_mp,
                           lora_switch_s=max(fleet.lora_switch_s, 1e-9))
        self.truth = RunnerView(rid, device=Tier(fleet.device_bytes), host=Tier(fleet.host_bytes), costs=true_costs)
        self.view = RunnerView(rid, f"sim-{rid}", Tier(fleet.device_bytes), Tier(fleet.host_bytes),
                               max_queue=fleet.max_queue)
        self.queue: deque[_Job] = deque()
        self.job: _Job | None = None
        self.store_start = 0.0


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    if not sorted_xs:
        return 0.0
    i = min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))
    return sorted_xs[i]


def simulate(arrivals: Sequence[Arrival], fleet: Fleet, policy: Policy | str,
             progress: Callable[[int], None] | None = None) -> Result:
    """Run *arrivals* through *fleet* routed by *policy*; what a user of the fleet would measure.

    *progress* hears the number of arrivals handled, every few thousand.
    """
    fleet.validate()
    pol = make_policy(policy) if isinstance(policy, str) else policy
    runners = [_Runner(f"r{i:02d}", fleet) for i in range(fleet.runners)]
    by_id = {r.view.runner_id: r for r in runners}
    views = [r.view for r in runners]
    pool: OrderedDict[str, int] = OrderedDict()
    pool_used = 0
    inflight: dict[str, list[Callable[[float], None]]] = {}
    store = _StoreLink(fleet.store_bps)
    events: list[tuple[float, int, int, Any]] = []  # (time, seq, kind, payload)
    seq = itertools.count()
    DONE, STORE = 0, 1
    first_measured = int(len(arrivals) * fleet.warmup)
    lat: list[float] = []
    tier_counts = dict.fromkeys(TIERS, 0)
    base_loads = rejected = store_bytes = 0

    def pool_has(key: str) -> bool:
        return key in pool

    def pool_admit(key: str, nbytes: int) -> None:
        nonlocal pool_used
        if key in pool:
            pool.move_to_end(key)
            return
        if nbytes > fleet.pool_bytes:
            return
        pool[key] = nbytes
        pool_used += nbytes
        while pool_used > fleet.pool_bytes:
            _, n = pool.popitem(last=False)
            pool_used -= n

    def schedule_store(t: float | None) -> None:
        if t is not None:
            heapq.heappush(events, (t, next(seq), STORE, store.version))

    def fetched(r: _Runner, job: _Job) -> Callable[[float], None]:
        def done(now: float) -> None:
            job.pending -= 1
            if job.pending == 0:
                store_s = now - r.store_start
                if job.store_bytes and store_s > 0:
                    r.view.costs.observe_store_fetch(job.store_bytes, store_s)
                finish_fetch(r, job, now)
        return done

    def finish_fetch(r: _Runner, job: _Job, now: float) -> None:
        pool_s = job.pool_bytes / fleet.link_bps
        job.end = now + pool_s + job.switch_s + job.denoise_s
        heapq.heappush(events, (job.end, next(seq), DONE, r))

    def start(r: _Runner, job: _Job, now: float) -> None:
        nonlocal base_loads, store_bytes
        r.job, job.start = job, now
        d = job.demand
        e = estimate(d, r.truth, pool_has)  # the truth: tiers, switch and denoise at the true rates
        job.switch_s, job.denoise_s = e.switch_s, e.denoise_s
        want = tuple(lo.key for lo in d.loras)
        applied = r.truth.applied.get(d.base.key, ()) if e.tiers[d.base.key] == TIER_DEVICE else ()
        if want != applied:
            job.lora_changes = len(set(want).symmetric_difference(applied)) or len(want)
            job.lora_s = job.lora_changes * fleet.lora_switch_s
        r.truth.hold(d)
        if job.idx >= first_measured:
            job.measured = True
            for t in e.tiers.values():
                tier_counts[t] += 1
            base_loads += e.tiers[d.base.key] != TIER_DEVICE
        r.store_start = now
        comps = d.components()
        reads = sum(1 for c in comps if e.tiers[c.key] == TIER_STORE and c.key not in inflight)
        for c in comps:
            tier = e.tiers[c.key]
            if tier == TIER_CLUSTER:
                job.pool_bytes += c.nbytes
                pool.move_to_end(c.key)
            elif tier == TIER_STORE:
                job.pending += 1
                waiters = inflight.get(c.key)
                cb = fetched(r, job)
                if waiters is not None:  # another runner is reading it: one read, then from the pool
                    job.pool_bytes += c.nbytes
                    waiters.append(cb)
                    continue
                job.store_bytes += c.nbytes
                if job.measured:
                    store_bytes += c.nbytes
                inflight[c.key] = [cb]

                def landed(now: float, key: str = c.key, nbytes: int = c.nbytes) -> None:
                    pool_admit(key, nbytes)
                    for w in inflight.pop(key):
                        w(now)

                schedule_store(store.start(now, c.nbytes, fleet.link_bps / reads, landed))  # one link, shared
            if tier != TIER_DEVICE and c.kind != "lora":
                job.build_bytes += c.nbytes
        if job.pending == 0:
            finish_fetch(r, job, now)

    def done(r: _Runner, now: float) -> None:
        job = r.job
        assert job is not None
        c = r.view.costs
        if job.pool_bytes:
            c.observe_cluster_fetch(job.pool_bytes, job.pool_bytes / fleet.link_bps)
        if job.build_bytes:
            c.observe_build(job.build_bytes, job.build_bytes / fleet.build_bps)
        if job.lora_changes:
            c.observe_lora_switch(job.lora_s, job.lora_changes)
        d = job.demand
        c.observe_denoise(d.steps, d.width, d.height, d.batch, job.denoise_s)
        if job.measured:
            lat.append(now - job.arrival.t)
        r.job = None
        r.view.running_s = 0.0
        if r.queue:  # the view's queue_s entries are the queued jobs' estimates, in order
            r.view.running_s = r.view.queue_s.pop(0)
            start(r, r.queue.popleft(), now)

    def run_events(until: float) -> None:
        while events and events[0][0] <= until:
            t, _, kind, payload = heapq.heappop(events)
            if kind == DONE:
                done(payload, t)
            elif payload == store.version:
                calls, nxt = store.finish_due(t)
                for cb in calls:
                    cb(t)
                schedule_store(nxt)

    for i, a in enumerate(arrivals):
        run_events(a.t)
        now = a.t
        for r in runners:  # what is left of each running request, as its runner reports it
            job = r.job
            if job is not None:
                end = job.end if job.end > 0 else job.start + job.work_est
                r.view.running_s = max(end - now, 1e-3)
        pol.observe(a.demand)
        best = pol.choose(a.demand, views, pool_has)
        if best is None:
            rejected += i >= first_measured
        else:
            work = best.fetch_s + best.switch_s + best.denoise_s
            best.runner.assign(a.demand, best)
            r = by_id[best.runner.runner_id]
            job = _Job(i, a, work)
            if r.job is None:
                start(r, job, now)
            else:
                r.queue.append(job)
        if progress is not None and (i + 1) % 2048 == 0:
            progress(i + 1)
    run_events(math.inf)
    if progress is not None:
        progress(len(arrivals))

    lat.sort()
    measured = arrivals[first_measured:]
    span = (measured[-1].t - measured[0].t) if len(measured) > 1 else 0.0
    total = sum(tier_counts.values()) or 1
    return Result(
        policy=pol.name, pool_bytes=fleet.pool_bytes, requests=len(lat), rejected=rejected,
        p50_s=_percentile(lat, 0.50), p99_s=_percentile(lat, 0.99), mean_s=sum(lat) / len(lat) if lat else 0.0,
        base_loads=base_loads, tier_hits={t: tier_counts[t] / total for t in TIERS},
        store_bytes=store_bytes, store_bps=store_bytes / span if span > 0 else 0.0, duration_s=span,
        latencies=lat,
    )


# --------------------------------------------------------------------------- sweeps


def smallest_meeting(results: Sequence[Result], target_p99: float) -> dict[str, int | None]:
    """Per policy, the smallest pool size whose p99 is at most *target_p99* (None: no size did)."""
    out: dict[str, int | None] = {}
    for r in sorted(results, key=lambda r: r.pool_bytes):
        out.setdefault(r.policy, None)
        if out[r.policy] is None and r.p99_s <= target_p99:
            out[r.policy] = r.pool_bytes
    return out


# --------------------------------------------------------------------------- command line


def _opt_size(option: str, text: str) -> int:
    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{option}: {exc}") from None


def _sizes(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise InvalidArgument(f"--sweep-pool wants sizes separated by commas, e.g. 1TiB,2TiB,4TiB; got {text!r}")
    return sorted({_opt_size("--sweep-pool", p) for p in parts})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``sdcache simulate`` options."""
    w, f = Workload(), Fleet()
    g = p.add_argument_group("requests (a JSONL --trace, else a synthetic Zipf trace)")
    g.add_argument("--trace", metavar="FILE", help="JSONL trace: one request per line (see docs/SIMULATE.md)")
    g.add_argument("--requests", type=int, default=w.requests, help=f"synthetic requests (default {w.requests})")
    g.add_argument("--rate", type=float, default=w.rate, help=f"arrivals per second (default {w.rate:g})")
    g.add_argument("--bases", type=int, default=w.bases, help=f"base models in the catalogue (default {w.bases})")
    g.add_argument("--loras", type=int, default=w.loras, help=f"LoRAs in the catalogue (default {w.loras})")
    g.add_argument("--controlnets", type=int, default=w.controlnets, help=f"ControlNets (default {w.controlnets})")
    g.add_argument("--zipf", type=float, default=w.zipf, help=f"Zipf exponent of popularity (default {w.zipf:g})")
    g.add_argument("--xl-share", type=float, default=w.xl_share,
                   help=f"share of SDXL-class (6-7 GB) bases, the rest SD1.5-class (default {w.xl_share:g})")
    g.add_argument("--seed", type=int, default=w.seed, help="seed of the synthetic trace (default 0)")
    g.add_argument("--write-trace", metavar="FILE", help="also write the requests as a JSONL trace")
    g = p.add_argument_group("fleet")
    g.add_argument("--runners", type=int, default=f.runners, help=f"GPU runners (default {f.runners})")
    g.add_argument("--device-mem", default="48GiB", metavar="SIZE",
                   help="device tier per runner (default 48GiB)")
    g.add_argument("--host-mem", default="128GiB", metavar="SIZE",
                   help="host-RAM tier per runner (default 128GiB)")
    g.add_argument("--pool", default="2TiB", metavar="SIZE", help="cache pool (default 2TiB)")
    g.add_argument("--link", default="1.25GB", metavar="BYTES/S",
                   help="each runner's network link, bytes per second (default 1.25GB: 10 GbE)")
    g.add_argument("--store-bw", default="4GB", metavar="BYTES/S",
                   help="under-store bandwidth, shared by concurrent misses (default 4GB)")
    g.add_argument("--build-bw", default="2GB", metavar="BYTES/S",
                   help="building a model on the device from host RAM (default 2GB)")
    g.add_argument("--denoise", type=float, default=f.denoise_s_per_step_mp, metavar="SECONDS",
                   help=f"denoise seconds per step per megapixel per image (default {f.denoise_s_per_step_mp:g})")
    g.add_argument("--lora-switch", type=float, default=f.lora_switch_s, metavar="SECONDS",
                   help=f"applying or removing one LoRA (default {f.lora_switch_s:g})")
    g.add_argument("--max-queue", type=int, default=f.max_queue, help=f"queue bound per runner (default {f.max_queue})")
    g = p.add_argument_group("what to run and report")
    g.add_argument("--policy", default="all", metavar="|".join([*POLICIES, "all"]),
                   help="routing policy, or all three to compare (default all)")
    g.add_argument("--sweep-pool", metavar="SIZES",
                   help="run once per pool size, e.g. 1TiB,2TiB,4TiB (replaces --pool)")
    g.add_argument("--target-p99", type=float, metavar="SECONDS",
                   help="report the smallest pool whose p99 latency is at most this")
    g.add_argument("--warmup", type=float, default=f.warmup,
                   help=f"leading share of requests left out of the statistics (default {f.warmup:g})")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.add_argument("--plot", metavar="FILE.png",
                   help="PNG: latency CDF per policy, or p99 against pool size with --sweep-pool")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _fmt_row(r: Result) -> list[str]:
    h = r.tier_hits
    return [r.policy, format_size(r.pool_bytes), f"{r.p50_s:.2f}", f"{r.p99_s:.2f}", f"{r.mean_s:.2f}",
            f"{r.loads_per_request:.3f}", f"{100 * r.loads_per_request:.1f}",
            *(f"{100 * h[t]:.1f}" for t in TIERS), f"{r.store_bps / MB:.1f}", str(r.rejected)]


_HEADER = ["policy", "pool", "p50 s", "p99 s", "mean s", "loads/req", "loads/100",
           "device %", "ram %", "pool %", "store %", "store MB/s", "rejected"]


def format_table(results: Sequence[Result]) -> str:
    """The results as an aligned text table, one row per run."""
    rows = [_HEADER, *(_fmt_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def plot(path: str, results: Sequence[Result], sweep: bool, target_p99: float | None = None) -> None:
    """Write a PNG: p99 against pool size per policy (*sweep*), else the latency CDF per policy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InvalidArgument(f"--plot needs matplotlib ({exc})") from None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        policies = list(dict.fromkeys(r.policy for r in results))
        if sweep:
            for pol in policies:
                rs = sorted((r for r in results if r.policy == pol), key=lambda r: r.pool_bytes)
                ax.plot([r.pool_bytes / 2**40 for r in rs], [r.p99_s for r in rs], marker="o", label=pol)
            if target_p99 is not None:
                ax.axhline(target_p99, color="grey", linestyle="--", label=f"target {target_p99:g} s")
            ax.set_xlabel("cache pool (TiB)")
            ax.set_ylabel("p99 latency (s)")
            ax.set_title("p99 latency against pool size")
        else:
            for r in results:
                n = len(r.latencies)
                if n:
                    ax.plot(r.latencies, [(i + 1) / n for i in range(n)], label=f"{r.policy} (p99 {r.p99_s:.1f} s)")
            ax.set_xscale("log")
            ax.set_xlabel("latency (s)")
            ax.set_ylabel("share of requests")
            ax.set_title(f"latency CDF, pool {format_size(results[0].pool_bytes) if results else ''}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            fig.savefig(path, format="png")
        except OSError as exc:
            raise InvalidArgument(f"cannot write plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def _arrivals(args: argparse.Namespace) -> list[Arrival]:
    if args.trace:
        return read_trace(args.trace)
    if not 0 <= args.xl_share <= 1:
        raise InvalidArgument(f"--xl-share must be in [0, 1], not {args.xl_share}")
    return synthetic_trace(Workload(requests=args.requests, rate=args.rate, bases=args.bases, loras=args.loras,
                                    controlnets=args.controlnets, zipf=args.zipf, xl_share=args.xl_share,
                                    seed=args.seed))


def main(args: argparse.Namespace) -> int:
    """Run the simulation(s) *args* ask for; print a table (or JSON); 0 when done."""
    pools = _sizes(args.sweep_pool) if args.sweep_pool is not None else [_opt_size("--pool", args.pool)]
    if args.policy != "all" and args.policy not in POLICIES:
        raise InvalidArgument(f"unknown routing policy {args.policy!r}; known: {', '.join(POLICIES)}, all")
    policies = list(POLICIES) if args.policy == "all" else [args.policy]
    fleet = Fleet(runners=args.runners, device_bytes=_opt_size("--device-mem", args.device_mem),
                  host_bytes=_opt_size("--host-mem", args.host_mem), pool_bytes=pools[0],
                  link_bps=float(_opt_size("--link", args.link)),
                  store_bps=float(_opt_size("--store-bw", args.store_bw)),
                  build_bps=float(_opt_size("--build-bw", args.build_bw)),
                  denoise_s_per_step_mp=args.denoise, lora_switch_s=args.lora_switch, max_queue=args.max_queue,
                  warmup=args.warmup)
    fleet.validate()
    if args.target_p99 is not None and not args.target_p99 > 0:
        raise InvalidArgument(f"--target-p99 must be > 0 seconds, not {args.target_p99}")
    arrivals = _arrivals(args)
    if args.write_trace:
        write_trace(args.write_trace, arrivals)
    results: list[Result] = []
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(arrivals) * len(pools) * len(policies), unit="req", desc="simulate",
                   file=sys.stderr, leave=False, disable=None)
    try:
        for pool in pools:
            for name in policies:
                seen = 0

                def progress(n: int) -> None:
                    nonlocal seen
                    if bar is not None:
                        bar.update(n - seen)
                    seen = n

                results.append(simulate(arrivals, Fleet(**{**asdict(fleet), "pool_bytes": pool}), name, progress))
    finally:
        if bar is not None:
            bar.close()
    best = smallest_meeting(results, args.target_p99) if args.target_p99 is not None else None
    if args.plot:
        plot(args.plot, results, sweep=len(pools) > 1, target_p99=args.target_p99)
    _report(sys.stdout, args, results, best, len(arrivals))
    return 0


def _report(out: IO[str], args: argparse.Namespace, results: Sequence[Result], best: dict[str, int | None] | None,
            n: int) -> None:
    if args.json:
        doc: dict[str, Any] = {"requests": n, "runs": [r.to_dict() for r in results]}
        if best is not None:
            doc["target_p99_s"] = args.target_p99
            doc["smallest_pool"] = best
        json.dump(doc, out, indent=2)
        out.write("\n")
        return
    out.write(format_table(results) + "\n")
    if best is not None:
        for pol, size in best.items():
            if size is None:
                out.write(f"{pol}: no pool size tried meets p99 <= {args.target_p99:g} s\n")
            else:
                out.write(f"{pol}: smallest pool with p99 <= {args.target_p99:g} s: {format_size(size)}\n")
    if args.plot:
        out.write(f"plot: {args.plot}\n")


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m sdcache.simulate``: the same command outside ``sdcache``'s CLI, with its error handling."""
    p = argparse.ArgumentParser(prog="sdcache simulate", description=__doc__.splitlines()[0])
    add_arguments(p)
    try:
        return main(p.parse_args(argv))
    except (InvalidArgument, OSError) as exc:
        print(f"sdcache: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
