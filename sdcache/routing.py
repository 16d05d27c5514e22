"""The fleet as a router sees it: demands, runners' tiers and queues, measured costs, finish estimates.

The gateway (``sdcache gateway``) and the simulator (``sdcache simulate``)
share this model and the policies over it (:mod:`sdcache.policies`), so what the
simulator predicts is what the gateway does. It is pure: no I/O, no clock,
stdlib only.

A request (:class:`Demand`) needs a base model, LoRAs and maybe a ControlNet
(:class:`Component`). A runner (:class:`RunnerView`) holds some of them in its
two tiers, the same two the runner's ``ModelCache`` keeps:

* ``device``: built modules (bases, ControlNets) on the accelerator; a hit costs nothing;
* ``ram``: loaded files (and parsed LoRAs) in host memory; a hit costs a build on the device;

below those a file comes from the cache cluster's pool (``cluster``) or, where
the pool lacks it, from the under-store (``store``). These are the tier names
the runner's ``TierRow`` reports.

A runner's finish time for a demand (:func:`estimate`) is
``wait (queue) + fetch (into RAM) + switch (onto the device, LoRAs) + denoise``,
each from that runner's measured :class:`Costs`.

Between heartbeats the gateway calls :meth:`RunnerView.assign` after each
decision, so the view already counts the queued work and the models the runner
will hold once it has run it: two requests for a new model in a row do not both
go to a runner that lacks it, nor both pay for it.
"""

from __future__ import annotations

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

    def finish_first(self) -> None:
        """The request running (or, if none, the first queued) has finished: the next one starts."""
        if self.running_s > 0 or not self.queue_s:
            self.running_s = self.queue_s.pop(0) if self.queue_s else 0.0
        else:
            self.queue_s.pop(0)

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
