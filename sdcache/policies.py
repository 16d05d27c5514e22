"""Routing policies: which runner a generation request goes to, over a snapshot of runners.

The gateway (``sdcache gateway``) and the simulator (``sdcache simulate``) both
route with the policies in this module, over the fleet model of
:mod:`sdcache.routing` (demands, runner views, tiers, measured costs and
:func:`~sdcache.routing.estimate`), so what the simulator predicts is what the
gateway does. Pure: no I/O, no clock, stdlib only.

:class:`EarliestFinish` (ours) ranks runners by estimated finish plus the
expected cost of what the request would evict; :class:`RoundRobin` (the
baseline) and :class:`Multiplex` (Ray Serve's multiplexed-model router: prefer
replicas holding the model, else those holding the fewest models) are there to
compare against. All three share one signature, :meth:`Policy.rank`; the
gateway and the simulator call :meth:`Policy.observe` once per request.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Sequence

from .errors import InvalidArgument
from .routing import TIER_CLUSTER, TIER_STORE, Demand, Estimate, PoolHas, RunnerView, estimate


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
