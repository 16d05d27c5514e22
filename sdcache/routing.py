"""Where a generation request should run: estimated finish time over a snapshot of runners.

The gateway (``sdcache gateway``) and the simulator (``sdcache simulate``) both
route with the objects in this module, so what the simulator predicts is what
the gateway does. It is pure: no I/O, no clock, stdlib only.

A request (:class:`Demand`) needs a base model, LoRAs and maybe a ControlNet
(:class:`Component`). A runner (:class:`RunnerView`) holds some of them in its
two tiers, the same two the runner's ``ModelCache`` keeps:

* ``device``: built modules (bases, ControlNets) on the accelerator; a hit costs nothing;
* ``ram``: loaded files (and parsed LoRAs) in host memory; a hit costs a build on the device;

below those a file comes from the cache cluster's pool (``cluster``) or, where
the pool lacks it, from the under-store (``store``). These are the tier names
the runner's ``TierRow`` reports.

A runner's finish time for a demand is
``wait (queue) + fetch (into RAM) + switch (onto the device, LoRAs) + denoise``,
each from that runner's measured :class:`Costs`. :class:`EarliestFinish` ranks
runners by it; :class:`RoundRobin` (the baseline) and :class:`Multiplex` (Ray
Serve's multiplexed-model router: prefer replicas holding the model, else those
holding the fewest models) are there to compare against. All three share one
signature, :meth:`Policy.rank`.

Between heartbeats the gateway calls :meth:`RunnerView.assign` after each
decision, so the view already counts the queued work and the models the runner
will hold once it has run it: two requests for a new model in a row do not both
go to a runner that lacks it, nor both pay for it.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal

from .errors import InvalidArgument

Kind = Literal["base", "lora", "controlnet"]
KINDS: tuple[str, ...] = ("base", "lora", "controlnet")

#: Tier names, fastest first (as the runner's ``TierRow.tier`` spells them).
TIER_DEVICE = "device"
TIER_RAM = "ram"
TIER_CLUSTER = "cluster"
TIER_STORE = "store"
TIERS: tuple[str, ...] = (TIER_DEVICE, TIER_RAM, TIER_CLUSTER, TIER_STORE)

#: Whether the cluster pool holds a file, by component key; None: assume it does.
PoolHas = Callable[[str], bool] | None


# --------------------------------------------------------------------------- demand


@dataclass(frozen=True, slots=True)
class Component:
    """One model file a request needs: its key (the cache path both sides agree on), kind and size."""

    key: str
    kind: Kind
    nbytes: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(f"component kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not self.key:
            raise InvalidArgument("component key must not be empty")
        if self.nbytes < 0:
            raise InvalidArgument(f"component {self.key!r}: nbytes must be >= 0, not {self.nbytes}")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Component:
        return cls(str(d["key"]), d["kind"], int(d["nbytes"]))


@dataclass(frozen=True, slots=True)
class Demand:
    """What one generation request needs: models and amount of denoising.

    *batch* is the number of images (A1111's ``batch_size * n_iter``).
    """

    base: Component
    _: KW_ONLY
    loras: tuple[Component, ...] = ()
    controlnet: Component | None = None
    steps: int
    width: int
    height: int
    batch: int = 1

    def __post_init__(self) -> None:
        if self.base.kind != "base":
            raise InvalidArgument(f"demand base {self.base.key!r} is a {self.base.kind}, not a base")
        if any(lo.kind != "lora" for lo in self.loras):
            raise InvalidArgument("every demand LoRA must be of kind 'lora'")
        if self.controlnet is not None and self.controlnet.kind != "controlnet":
            raise InvalidArgument(f"demand controlnet {self.controlnet.key!r} is a {self.controlnet.kind}")
        if self.steps < 1 or self.width < 1 or self.height < 1 or self.batch < 1:
            raise InvalidArgument("steps, width, height and batch must be >= 1")
        object.__setattr__(self, "loras", tuple(self.loras))

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    def components(self) -> list[Component]:
        """Every model file, base first."""
        out = [self.base, *self.loras]
        if self.controlnet is not None:
            out.append(self.controlnet)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.to_dict(), "loras": [lo.to_dict() for lo in self.loras],
            "controlnet": self.controlnet.to_dict() if self.controlnet else None,
            "steps": self.steps, "width": self.width, "height": self.height, "batch": self.batch,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Demand:
        cn = d.get("controlnet")
        return cls(
            Component.from_dict(d["base"]), loras=tuple(Component.from_dict(x) for x in d.get("loras", ())),
            controlnet=Component.from_dict(cn) if cn else None, steps=int(d["steps"]), width=int(d["width"]),
            height=int(d["height"]), batch=int(d.get("batch", 1)),
        )


# --------------------------------------------------------------------------- costs


@dataclass(slots=True)
class Ewma:
    """An exponentially weighted moving average that starts at a prior.

    The first observation replaces the prior; later ones move the value by
    *alpha* of the difference. *n* counts observations (0: still the prior).
    """

    value: float
    n: int = 0
    alpha: float = 0.2

    def observe(self, x: float) -> None:
        self.value = x if self.n == 0 else self.value + self.alpha * (x - self.value)
        self.n += 1


#: Priors for a runner nobody has measured yet: an H100-class GPU host on a 10 GbE link.
PRIORS: dict[str, float] = {
    "ram_to_device_bps": 2.0e9,    # build modules on the device from files in host RAM
    "cluster_bps": 1.0e9,          # fetch from the sdcache pool into host RAM
    "store_bps": 2.0e8,            # fetch from the under-store into host RAM
    "denoise_s_per_step_mp": 0.1,  # seconds per step per megapixel per image
    "lora_switch_s": 0.01,         # fixed cost per LoRA applied or removed (side paths: a few ms)
}


class Costs:
    """The measured rates of one runner, each an :class:`Ewma` with a prior until measured.

    The runner calls the ``observe_*`` methods with real timings and sends
    :meth:`to_dict` in its heartbeat; the gateway rebuilds it with
    :meth:`from_dict`. Non-positive observations (a device hit that took no
    time, an empty transfer) carry no rate and are ignored.
    """

    __slots__ = ("rates",)

    def __init__(self, alpha: float = 0.2, **values: float) -> None:
        unknown = set(values) - set(PRIORS)
        if unknown:
            raise InvalidArgument(f"unknown cost {sorted(unknown)[0]!r}; known: {', '.join(PRIORS)}")
        self.rates: dict[str, Ewma] = {}
        for name, prior in PRIORS.items():
            v = float(values.get(name, prior))
            if v <= 0:
                raise InvalidArgument(f"cost {name} must be > 0, not {v}")
            self.rates[name] = Ewma(v, alpha=alpha)

    # -- the current rates
    @property
    def ram_to_device_bps(self) -> float:
        return self.rates["ram_to_device_bps"].value

    @property
    def cluster_bps(self) -> float:
        return self.rates["cluster_bps"].value

    @property
    def store_bps(self) -> float:
        return self.rates["store_bps"].value

    @property
    def denoise_s_per_step_mp(self) -> float:
        return self.rates["denoise_s_per_step_mp"].value

    @property
    def lora_switch_s(self) -> float:
        return self.rates["lora_switch_s"].value

    # -- what things cost
    def fetch_s(self, nbytes: int, tier: str) -> float:
        """Seconds to bring *nbytes* into host RAM from *tier* (0 from ``device`` or ``ram``)."""
        if tier == TIER_CLUSTER:
            return nbytes / self.cluster_bps
        if tier == TIER_STORE:
            return nbytes / self.store_bps
        return 0.0

    def build_s(self, nbytes: int) -> float:
        """Seconds to build a model of *nbytes* on the device from host RAM."""
        return nbytes / self.ram_to_device_bps

    def denoise_s(self, demand: Demand) -> float:
        return self.denoise_s_per_step_mp * demand.steps * demand.megapixels * demand.batch

    # -- learning from real timings
    def _observe(self, name: str, value: float) -> None:
        if value > 0 and value != float("inf"):
            self.rates[name].observe(value)

    def observe_build(self, nbytes: int, seconds: float) -> None:
        """A model of *nbytes* was built on the device from host RAM in *seconds*."""
        if seconds > 0:
            self._observe("ram_to_device_bps", nbytes / seconds)

    def observe_cluster_fetch(self, nbytes: int, seconds: float) -> None:
        """*nbytes* came from the cluster pool into host RAM in *seconds*."""
        if seconds > 0:
            self._observe("cluster_bps", nbytes / seconds)

    def observe_store_fetch(self, nbytes: int, seconds: float) -> None:
        """*nbytes* came from the under-store (a pool miss) into host RAM in *seconds*."""
        if seconds > 0:
            self._observe("store_bps", nbytes / seconds)

    def observe_fetch(self, nbytes: int, seconds: float, tier: str) -> None:
        """:meth:`observe_cluster_fetch` or :meth:`observe_store_fetch` by *tier*; others ignored."""
        if tier == TIER_CLUSTER:
            self.observe_cluster_fetch(nbytes, seconds)
        elif tier == TIER_STORE:
            self.observe_store_fetch(nbytes, seconds)

    def observe_denoise(self, steps: int, width: int, height: int, images: int, seconds: float) -> None:
        """A denoise of *images* images of *width* x *height* in *steps* steps took *seconds*."""
        work = steps * (width * height / 1e6) * images
        if work > 0:
            self._observe("denoise_s_per_step_mp", seconds / work)

    def observe_lora_switch(self, seconds: float, changed: int = 1) -> None:
        """Applying/removing *changed* LoRAs took *seconds* (fetching their files not included)."""
        if changed > 0:
            self._observe("lora_switch_s", seconds / changed)

    # -- the heartbeat form
    def to_dict(self) -> dict[str, Any]:
        """``{name: {"value": v, "n": observations}}``, plain JSON."""
        return {name: {"value": e.value, "n": e.n} for name, e in self.rates.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Costs:
        """Rebuild from :meth:`to_dict` (a bare number per name is accepted too; missing names keep priors)."""
        c = cls()
        for name, v in (d or {}).items():
            if name not in c.rates:
                continue  # a newer runner's extra rate: ignore rather than refuse the heartbeat
            value, n = (v.get("value"), v.get("n", 1)) if isinstance(v, Mapping) else (v, 1)
            try:
                value, n = float(value), int(n)
            except (TypeError, ValueError):
                raise InvalidArgument(f"cost {name}: not a number: {v!r}") from None
            if value > 0:
                c.rates[name].value, c.rates[name].n = value, max(n, 0)
        return c

    def copy(self) -> Costs:
        return Costs.from_dict(self.to_dict())

    def __repr__(self) -> str:
        return "Costs(" + ", ".join(f"{k}={e.value:.4g}" for k, e in self.rates.items()) + ")"


# --------------------------------------------------------------------------- tiers


class Tier:
    """A byte-bounded LRU of model keys, evicting as the runner's ``ByteLRU`` does.

    Keys admitted together as one request's models are pinned while admitted:
    they are kept even over capacity (the runner keeps models in use whatever
    their size) and the excess goes at the next admission. An unpinned entry
    larger than the whole capacity is not kept.
    """

    __slots__ = ("capacity", "items", "used")

    def __init__(self, capacity: int, items: Iterable[tuple[str, int]] = ()) -> None:
        if capacity < 0:
            raise InvalidArgument(f"tier capacity must be >= 0, not {capacity}")
        self.capacity = int(capacity)
        self.items: OrderedDict[str, int] = OrderedDict()  # oldest first
        self.used = 0
        for k, n in items:
            self.items[k] = int(n)
            self.used += int(n)

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def __len__(self) -> int:
        return len(self.items)

    def keys(self) -> list[str]:
        """Keys, least recently used first."""
        return list(self.items)

    def touch(self, key: str) -> None:
        if key in self.items:
            self.items.move_to_end(key)

    def admit(self, entries: Sequence[tuple[str, int]], pin: bool = False) -> list[str]:
        """Insert (or refresh) *entries*, then evict the oldest others until the total fits; the evicted keys."""
        keep = {k for k, _ in entries} if pin else set()
        for key, nbytes in entries:
            old = self.items.pop(key, None)
            if old is not None:
                self.used -= old
            if not pin and nbytes > self.capacity:
                continue
            self.items[key] = nbytes
            self.used += nbytes
        evicted: list[str] = []
        if self.used > self.capacity:
            kept: list[tuple[str, int]] = []  # pinned entries met while evicting from the old end
            while self.used > self.capacity and self.items:
                k, n = self.items.popitem(last=False)
                if k in keep:
                    kept.append((k, n))
                    continue
                self.used -= n
                evicted.append(k)
            for k, n in reversed(kept):
                self.items[k] = n
                self.items.move_to_end(k, last=False)
        return evicted

    def discard(self, key: str) -> None:
        n = self.items.pop(key, None)
        if n is not None:
            self.used -= n

    def to_dict(self) -> dict[str, Any]:
        """``{"capacity": bytes, "items": [[key, nbytes], ...]}``, least recently used first."""
        return {"capacity": self.capacity, "items": [[k, n] for k, n in self.items.items()]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tier:
        try:
            return cls(int(d["capacity"]), ((str(k), int(n)) for k, n in d.get("items", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"bad tier in heartbeat: {exc}") from None

    def copy(self) -> Tier:
        t = Tier(self.capacity)
        t.items = OrderedDict(self.items)
        t.used = self.used
        return t


# --------------------------------------------------------------------------- runners


@dataclass(eq=False)
class RunnerView:
    """One runner as the gateway sees it, from its last heartbeat plus what was sent since.

    *queue_s* holds the estimated seconds of each queued request (FIFO) and
    *running_s* what is left of the one running. *applied* maps a base on the
    device to the LoRAs applied to it (the runner's ``LoraPatcher.applied``).
    A runner is *full* when *max_queue* requests are waiting.
    """

    runner_id: str
    address: str = ""
    device: Tier = field(default_factory=lambda: Tier(0))
    host: Tier = field(default_factory=lambda: Tier(0))
    queue_s: list[float] = field(default_factory=list)
    running_s: float = 0.0
    max_queue: int = 16
    costs: Costs = field(default_factory=Costs)
    healthy: bool = True
    applied: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def wait_s(self) -> float:
        """Seconds until this runner could start a request sent now."""
        return self.running_s + sum(self.queue_s)

    @property
    def busy(self) -> int:
        """Requests running or waiting."""
        return len(self.queue_s) + (1 if self.running_s > 0 else 0)

    @property
    def full(self) -> bool:
        return len(self.queue_s) >= self.max_queue

    @property
    def available(self) -> bool:
        """Healthy and not full: a candidate for a new request."""
        return self.healthy and not self.full

    def tier_of(self, c: Component, pool_has: PoolHas = None) -> str:
        """The tier *c* would come from on this runner."""
        if c.kind == "lora":
            # A LoRA is "on the device" only while applied: see estimate(); its file lives in RAM.
            if c.key in self.host:
                return TIER_RAM
        elif c.key in self.device:
            return TIER_DEVICE
        elif c.key in self.host:
            return TIER_RAM
        return TIER_CLUSTER if pool_has is None or pool_has(c.key) else TIER_STORE

    def assign(self, demand: Demand, est: Estimate | None = None, pool_has: PoolHas = None) -> Estimate:
        """Account for *demand* just sent here: queue its work and hold its models from now on.

        *est* is this runner's estimate for it (computed when not given);
        returned either way.
        """
        if est is None:
            est = estimate(demand, self, pool_has)
        work = est.fetch_s + est.switch_s + est.denoise_s
        if self.running_s <= 0 and not self.queue_s:
            self.running_s = work
        else:
            self.queue_s.append(work)
        self.hold(demand)
        return est

    def hold(self, demand: Demand) -> None:
        """Update the tiers as the runner's would be once it has run *demand*."""
        want = tuple(lo.key for lo in demand.loras)
        files = [(c.key, c.nbytes) for c in (demand.base, demand.controlnet)
                 if c is not None and c.key not in self.device]
        if want != self.applied.get(demand.base.key, ()) or demand.base.key not in self.device:
            files += [(lo.key, lo.nbytes) for lo in demand.loras]
        self.host.admit(files)
        built = [(demand.base.key, demand.base.nbytes)]
        if demand.controlnet is not None:
            built.append((demand.controlnet.key, demand.controlnet.nbytes))
        for k in self.device.admit(built, pin=True):
            self.applied.pop(k, None)
        self.applied[demand.base.key] = want

    def advance(self, seconds: float) -> None:
        """Let *seconds* of work pass (between heartbeats): the running and queued requests progress."""
        left = seconds
        while left > 0 and (self.running_s > 0 or self.queue_s):
            if self.running_s > left:
                self.running_s -= left
                return
            left -= self.running_s
            self.running_s = self.queue_s.pop(0) if self.queue_s else 0.0

    # -- the heartbeat form
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for the runner's heartbeat."""
        return {
            "runner_id": self.runner_id, "address": self.address, "device": self.device.to_dict(),
            "host": self.host.to_dict(), "queue_s": list(self.queue_s), "running_s": self.running_s,
            "max_queue": self.max_queue, "costs": self.costs.to_dict(), "healthy": self.healthy,
            "applied": {k: list(v) for k, v in self.applied.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunnerView:
        try:
            return cls(
                runner_id=str(d["runner_id"]), address=str(d.get("address", "")),
                device=Tier.from_dict(d.get("device", {"capacity": 0})),
                host=Tier.from_dict(d.get("host", {"capacity": 0})),
                queue_s=[float(x) for x in d.get("queue_s", ())], running_s=float(d.get("running_s", 0.0)),
                max_queue=int(d.get("max_queue", 16)), costs=Costs.from_dict(d.get("costs")),
                healthy=bool(d.get("healthy", True)),
                applied={str(k): tuple(v) for k, v in (d.get("applied") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"bad runner view: {exc!r}") from None

    def copy(self) -> RunnerView:
        return RunnerView(
            self.runner_id, self.address, self.device.copy(), self.host.copy(), list(self.queue_s),
            self.running_s, self.max_queue, self.costs.copy(), self.healthy, dict(self.applied),
        )


def share_costs(views: Sequence[RunnerView]) -> None:
    """Give each runner's unmeasured rates the fleet's measured mean, in place (its own ``n`` stays 0).

    A runner that has never built or denoised anything still carries the
    priors; beside runners whose rates were measured on the same kind of
    host, those priors would make it look far faster or slower than it is,
    and the router would switch models onto it for nothing. Its own first
    observation replaces the borrowed value, as it replaces a prior.
    """
    for name in PRIORS:
        measured = [v.costs.rates[name].value for v in views if v.costs.rates[name].n > 0]
        if not measured:
            continue
        mean = sum(measured) / len(measured)
        for v in views:
            if v.costs.rates[name].n == 0:
                v.costs.rates[name].value = mean


# --------------------------------------------------------------------------- estimates


@dataclass(slots=True, eq=False)
class Estimate:
    """One runner's estimated seconds for one demand, and where each model would come from.

    ``total_s = wait_s + fetch_s + switch_s + denoise_s``; *fetch_s* brings
    files into host RAM, *switch_s* builds models on the device and applies
    LoRAs. *tiers* maps each component key to its tier name.
    """

    runner: RunnerView
    wait_s: float
    fetch_s: float
    switch_s: float
    denoise_s: float
    total_s: float
    tiers: dict[str, str]

    @property
    def runner_id(self) -> str:
        return self.runner.runner_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "runner": self.runner.runner_id, "wait_s": self.wait_s, "fetch_s": self.fetch_s,
            "switch_s": self.switch_s, "denoise_s": self.denoise_s, "total_s": self.total_s,
            "tiers": dict(self.tiers),
        }


def estimate(demand: Demand, view: RunnerView, pool_has: PoolHas = None) -> Estimate:
    """When *demand* would finish on *view*, from its queue, tier contents and measured costs."""
    # Written out (rather than through tier_of / Costs.fetch_s) because the simulator calls it
    # once per runner per request; test_routing pins it to those definitions.
    rates = view.costs.rates
    cluster_bps, store_bps = rates["cluster_bps"].value, rates["store_bps"].value
    build_bps = rates["ram_to_device_bps"].value
    device, host = view.device.items, view.host.items
    tiers: dict[str, str] = {}
    fetch = switch = 0.0
    base, cn = demand.base, demand.controlnet
    for c in (base,) if cn is None else (base, cn):
        k = c.key
        if k in device:
            tiers[k] = TIER_DEVICE
            continue
        if k in host:
            tiers[k] = TIER_RAM
        elif pool_has is None or pool_has(k):
            tiers[k] = TIER_CLUSTER
            fetch += c.nbytes / cluster_bps
        else:
            tiers[k] = TIER_STORE
            fetch += c.nbytes / store_bps
        switch += c.nbytes / build_bps
    loras = demand.loras
    if loras or view.applied:
        want = tuple(lo.key for lo in loras)
        applied = view.applied.get(base.key, ()) if tiers[base.key] == TIER_DEVICE else ()
        if want == applied:  # already applied to this base on the device: nothing to do
            for k in want:
                tiers[k] = TIER_DEVICE
        else:
            switch += rates["lora_switch_s"].value * (len(set(want).symmetric_difference(applied)) or len(want))
            for lo in loras:
                k = lo.key
                if k in host:
                    tiers[k] = TIER_RAM
                elif pool_has is None or pool_has(k):
                    tiers[k] = TIER_CLUSTER
                    fetch += lo.nbytes / cluster_bps
                else:
                    tiers[k] = TIER_STORE
                    fetch += lo.nbytes / store_bps
    denoise = rates["denoise_s_per_step_mp"].value * demand.steps * demand.width * demand.height * demand.batch / 1e6
    wait = view.running_s + sum(view.queue_s)
    return Estimate(view, wait, fetch, switch, denoise, wait + fetch + switch + denoise, tiers)


def _memo(pool_has: PoolHas) -> PoolHas:
    """*pool_has* asked once per key during one ranking (it does not depend on the runner)."""
    if pool_has is None:
        return None
    seen: dict[str, bool] = {}

    def has(key: str) -> bool:
        v = seen.get(key)
        if v is None:
            v = seen[key] = bool(pool_has(key))
        return v

    return has


@functools.lru_cache(maxsize=1 << 16)
def affinity(key: str, runner_id: str) -> int:
    """Rendezvous score of *runner_id* for *key*: a stable, uniform tie-breaker (higher wins)."""
    h = hashlib.blake2b(f"{key}\x00{runner_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


def displaced(demand: Demand, view: RunnerView) -> int:
    """Device bytes *view* would have to evict to build *demand*'s models (0 when they fit or are there)."""
    new = sum(c.nbytes for c in (demand.base, demand.controlnet) if c is not None and c.key not in view.device)
    return max(0, min(view.device.used, view.device.used + new - view.device.capacity)) if new else 0


# --------------------------------------------------------------------------- policies


class Popularity:
    """Each base model's share of recent requests: counts decayed by *decay* per request, updated in O(1).

    A key's count is brought up to date lazily when it is read or bumped, so a
    catalogue of thousands of models costs nothing per request for the ones
    not asked for.
    """

    __slots__ = ("decay", "_log_d", "_n", "_total", "_counts")

    def __init__(self, window: int = 256) -> None:
        if window < 1:
            raise InvalidArgument(f"popularity window must be >= 1 request, not {window}")
        self.decay = 1.0 - 1.0 / window
        self._log_d = math.log(self.decay) if self.decay > 0 else -math.inf
        self._n = 0
        self._total = 0.0
        self._counts: dict[str, tuple[float, int]] = {}  # key -> (count at request n, n)

    def observe(self, key: str) -> None:
        self._n += 1
        self._total = self._total * self.decay + 1.0
        c, at = self._counts.get(key, (0.0, self._n))
        self._counts[key] = (c * self._factor(self._n - at) + 1.0, self._n)
        if len(self._counts) > 8 * 4096:  # forget the long tail: its shares are ~0 anyway
            for k in sorted(self._counts, key=self.share)[: len(self._counts) // 2]:
                del self._counts[k]

    def share(self, key: str) -> float:
        """The decayed fraction of recent requests that asked for *key* (0 when never seen)."""
        entry = self._counts.get(key)
        if entry is None or self._total <= 0:
            return 0.0
        c, at = entry
        return c * self._factor(self._n - at) / self._total

    def _factor(self, k: int) -> float:
        return math.exp(self._log_d * k) if k else 1.0


class Policy:
    """A routing policy: rank the available runners for a demand, best first.

    Unhealthy and full runners are left out; an empty list means none can
    take it (answer 429/503). The gateway sends to the first and, where that
    fails, tries the next; then it calls :meth:`RunnerView.assign` on the one
    that took it. :meth:`observe` is called once per request before ranking
    (retries rank again without observing again).
    """

    name = "policy"

    def observe(self, demand: Demand) -> None:
        """Note that *demand* arrived (a policy that learns from the traffic overrides this)."""

    def rank(self, demand: Demand, views: Sequence[RunnerView], pool_has: PoolHas = None) -> list[Estimate]:
        raise NotImplementedError

    def choose(self, demand: Demand, views: Sequence[RunnerView], pool_has: PoolHas = None) -> Estimate | None:
        """The best runner's estimate, or None when no runner can take *demand*."""
        ranked = self.rank(demand, views, pool_has)
        return ranked[0] if ranked else None


def evicted(demand: Demand, view: RunnerView) -> list[tuple[str, int]]:
    """The device entries *view* would evict, oldest first, to build *demand*'s models there."""
    own = {c.key for c in (demand.base, demand.controlnet) if c is not None}
    new = sum(c.nbytes for c in (demand.base, demand.controlnet) if c is not None and c.key not in view.device)
    if not new:
        return []
    over = view.device.used + new - view.device.capacity
    out: list[tuple[str, int]] = []
    for k, n in view.device.items.items():
        if over <= 0:
            break
        if k not in own:
            out.append((k, n))
            over -= n
    return out


class EarliestFinish(Policy):
    """The runner that would finish *demand* first, by :func:`estimate`, counting what its switch evicts.

    A runner's score is its estimated finish plus the *regret* of the models
    the request would evict there (:func:`evicted`): for each one that no other
    runner holds on its device, the cost of loading it again (fetch from the
    pool, build) times the chance that it is wanted again soon, its share of
    recent requests (:class:`Popularity`) times *horizon* (default: the number
    of runners, as a fleet of G runners serves about G requests in the time
    one request runs), capped at 1. So a rare model does not evict the model
    a third of the traffic wants when a runner holding a rarer one could take
    it nearly as soon; with one runner per model, regret is 0 and the rule is
    plain earliest finish.

    Runners whose scores are within *tie_s* of the best are ordered by the
    device bytes the request would evict there (:func:`displaced`), then by
    the rendezvous hash of the base model's key, so equal runners send each
    model to the same runner rather than spread it around.
    """

    name = "finish"

    def __init__(self, tie_s: float = 0.05, window: int = 256, horizon: float | None = None) -> None:
        self.tie_s = tie_s
        self.horizon = horizon
        self.popularity = Popularity(window)

    def observe(self, demand: Demand) -> None:
        self.popularity.observe(demand.base.key)

    def regret_s(self, demand: Demand, view: RunnerView, views: Sequence[RunnerView],
                 pool_has: PoolHas = None) -> float:
        """Expected seconds other requests lose because *demand* evicts models from *view* (see the class)."""
        gone = evicted(demand, view)
        if not gone:
            return 0.0
        horizon = self.horizon if self.horizon is not None else max(1, len(views))
        costs = view.costs
        regret = 0.0
        for key, nbytes in gone:
            if any(key in v.device for v in views if v is not view and v.healthy):
                continue  # another runner still has it
            p = min(1.0, self.popularity.share(key) * horizon)
            if p > 0:
                tier = TIER_CLUSTER if pool_has is None or pool_has(key) else TIER_STORE
                regret += p * (costs.fetch_s(nbytes, tier) + costs.build_s(nbytes))
        return regret

    def rank(self, demand: Demand, views: Sequence[RunnerView], pool_has: PoolHas = None) -> list[Estimate]:
        pool_has = _memo(pool_has)
        ests = [estimate(demand, v, pool_has) for v in views if v.available]
        return self._order(demand, ests, [e.total_s + self.regret_s(demand, e.runner, views, pool_has) for e in ests])

    def choose(self, demand: Demand, views: Sequence[RunnerView], pool_has: PoolHas = None) -> Estimate | None:
        """``rank(...)[0]`` without estimating runners that cannot win (their queue and denoise alone lose)."""
        pool_has = _memo(pool_has)
        work = demand.steps * demand.width * demand.height * demand.batch / 1e6
        bounds = sorted(
            ((v.running_s + sum(v.queue_s) + v.costs.rates["denoise_s_per_step_mp"].value * work, i, v)
             for i, v in enumerate(views) if v.healthy and len(v.queue_s) < v.max_queue),
            key=lambda b: (b[0], b[1]))
        ests: list[Estimate] = []
        scores: list[float] = []
        best = math.inf
        for lower, _, v in bounds:
            if lower > best + self.tie_s:  # a lower bound of its score: regret only adds
                break
            e = estimate(demand, v, pool_has)
            ests.append(e)
            scores.append(e.total_s + self.regret_s(demand, v, views, pool_has))
            best = min(best, scores[-1])
        ranked = self._order(demand, ests, scores)
        return ranked[0] if ranked else None

    def _order(self, demand: Demand, ests: list[Estimate], scores: list[float]) -> list[Estimate]:
        if not ests:
            return ests
        best = min(scores)
        key = demand.base.key
        scored = list(zip(scores, ests))
        tied = [(s, e) for s, e in scored if s <= best + self.tie_s]
        rest = [(s, e) for s, e in scored if s > best + self.tie_s]
        tied.sort(key=lambda se: (displaced(demand, se[1].runner), -affinity(key, se[1].runner.runner_id)))
        rest.sort(key=lambda se: (se[0], -affinity(key, se[1].runner.runner_id)))
        return [e for _, e in tied + rest]


class RoundRobin(Policy):
    """The baseline: each call starts one runner further along (runners in id order), ignoring models."""

    name = "round-robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def order(self, views: Sequence[RunnerView]) -> list[RunnerView]:
        """The available runners, this turn's first (advances the turn)."""
        ordered = sorted(views, key=lambda v: v.runner_id)
        if not ordered:
            return []
        start = next(self._turn) % len(ordered)
        return [v for v in ordered[start:] + ordered[:start] if v.available]

    def rank(self, demand: Demand, views: Sequence[RunnerView], pool_has: PoolHas = None) -> list[Estimate]:
        pool_has = _memo(pool_has)
        return [estimate(demand, v, pool_has) for v in self.order(views)]

    def choose(self, demand: Demand, views: Sequence[RunnerView], pool_has: PoolHas = None) -> Estimate | None:
        turn = self.order(views)
        return estimate(demand, turn[0], pool_has) if turn else None


class Multiplex(Policy):
    """Ray Serve's multiplexed-model routing (``MultiplexMixin.rank_replicas_via_multiplex``).

    Rank 0: runners holding the base model on the device; rank 1: those
    holding the fewest models on the device; rank 2: the rest. Within a rank,
    the shortest queue (in requests, as Ray compares), then runner id. Ray
    picks two at random within a rank; this takes the better of all, so the
    comparison is deterministic. It looks at no costs.
    """

    name = "multiplex"

    def order(self, demand: Demand, views: Sequence[RunnerView]) -> list[RunnerView]:
        """The available runners in Ray's order for *demand*."""
        live = [v for v in views if v.available]
        if not live:
            return []
        fewest = min(len(v.device) for v in live)
        key = demand.base.key

        def rank_of(v: RunnerView) -> tuple[int, int, str]:
            r = 0 if key in v.device else (1 if len(v.device) == fewest else 2)
            return (r, v.busy, v.runner_id)

        return sorted(live, key=rank_of)

    def rank(self, demand: Demand, views: Sequence[RunnerView], pool_has: PoolHas = None) -> list[Estimate]:
        pool_has = _memo(pool_has)
        return [estimate(demand, v, pool_has) for v in self.order(demand, views)]

    def choose(self, demand: Demand, views: Sequence[RunnerView], pool_has: PoolHas = None) -> Estimate | None:
        order = self.order(demand, views)
        return estimate(demand, order[0], pool_has) if order else None


POLICIES: dict[str, type[Policy]] = {
    EarliestFinish.name: EarliestFinish,
    RoundRobin.name: RoundRobin,
    Multiplex.name: Multiplex,
}


def make_policy(name: str) -> Policy:
    """A fresh policy object by name (``finish``, ``round-robin``, ``multiplex``)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise InvalidArgument(f"unknown routing policy {name!r}; known: {', '.join(POLICIES)}")
    return cls()
