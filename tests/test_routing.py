"""The routing policies as a gateway user sees them: which runner each request lands on."""

from __future__ import annotations

import json

import pytest

from sdcache import errors
from sdcache.policies import POLICIES, EarliestFinish, Multiplex, RoundRobin, make_policy
from sdcache.routing import Component, Costs, Demand, RunnerView, Tier, estimate

GB = 10**9
BASE_A = Component("/models/checkpoints/a.safetensors", "base", 4 * GB)
BASE_B = Component("/models/checkpoints/b.safetensors", "base", 4 * GB)
BASE_C = Component("/models/checkpoints/c.safetensors", "base", 4 * GB)
LORA_X = Component("/models/loras/x.safetensors", "lora", 100 * 10**6)


def demand(base: Component = BASE_A, **kw: object) -> Demand:
    return Demand(base, steps=kw.pop("steps", 20), width=512, height=512, **kw)  # type: ignore[arg-type]


def runner(rid: str, *, device: int = 8 * GB, host: int = 64 * GB, holds: tuple[Component, ...] = (),
           **kw: object) -> RunnerView:
    """A runner with room for two bases on the device, holding *holds* on the device and in RAM."""
    v = RunnerView(rid, f"{rid}:7861", Tier(device), Tier(host), **kw)  # type: ignore[arg-type]
    for c in holds:
        v.hold(demand(c))
    return v


def route(policy: object, d: Demand, views: list[RunnerView]) -> RunnerView:
    """Route *d* as the gateway does: take the best, account for it there."""
    ranked = policy.rank(d, views)  # type: ignore[attr-defined]
    assert ranked, "no runner could take the request"
    best = ranked[0]
    best.runner.assign(d, best)
    return best.runner


def test_alternating_models_settle_one_per_runner() -> None:
    views = [runner("r1", device=5 * GB), runner("r2", device=5 * GB)]  # room for one base each
    policy = EarliestFinish()
    placed: dict[str, list[str]] = {BASE_A.key: [], BASE_B.key: []}
    loads = 0
    for i in range(20):
        base = (BASE_A, BASE_B)[i % 2]
        best = policy.rank(demand(base), views)[0]
        loads += best.tiers[base.key] != "device"
        best.runner.assign(demand(base), best)
        placed[base.key].append(best.runner_id)
        for v in views:
            v.advance(60)  # each finishes before the next arrives
    assert len(set(placed[BASE_A.key])) == 1 and len(set(placed[BASE_B.key])) == 1
    assert placed[BASE_A.key][0] != placed[BASE_B.key][0]
    assert loads == 2


def test_back_to_back_requests_for_a_new_model_load_it_once_per_runner() -> None:
    views = [runner("r1"), runner("r2")]
    policy = EarliestFinish()
    loads = []
    for _ in range(6):  # all arrive before any heartbeat
        best = policy.rank(demand(BASE_A), views)[0]
        loads.append((best.runner_id, best.tiers[BASE_A.key]))
        best.runner.assign(demand(BASE_A), best)
    cold = [rid for rid, tier in loads if tier != "device"]
    assert sorted(cold) == ["r1", "r2"]  # each paid for the model once, then the view knew it holds it
    assert all(v.busy >= 2 for v in views)  # and the work was spread


def test_equal_idle_runners_send_a_model_to_the_same_runner_every_time() -> None:
    chosen = {EarliestFinish().rank(demand(BASE_C), [runner("r1"), runner("r2"), runner("r3")])[0].runner_id
              for _ in range(5)}
    assert len(chosen) == 1


def test_a_long_enough_queue_makes_switching_on_an_idle_runner_worth_it() -> None:
    holder = runner("holder", holds=(BASE_A,))
    idle = runner("idle")
    policy = EarliestFinish()
    holder.queue_s = [2.0]
    assert policy.rank(demand(BASE_A), [holder, idle])[0].runner is holder
    holder.queue_s = [30.0, 30.0]
    best = policy.rank(demand(BASE_A), [holder, idle])[0]
    assert best.runner is idle
    assert best.tiers[BASE_A.key] == "cluster" and best.fetch_s > 0 and best.switch_s > 0


def test_a_model_in_host_ram_is_cheaper_than_one_in_the_pool_cheaper_than_the_store() -> None:
    in_ram = runner("ram", device=0, holds=(BASE_A,))  # device holds only what is running
    in_ram.device = Tier(0)
    cold = runner("cold")
    d = demand(BASE_A)
    e_ram, e_pool = estimate(d, in_ram), estimate(d, cold)
    e_store = estimate(d, cold, pool_has=lambda key: False)
    assert (e_ram.tiers[BASE_A.key], e_pool.tiers[BASE_A.key], e_store.tiers[BASE_A.key]) == ("ram", "cluster", "store")
    assert e_ram.total_s < e_pool.total_s < e_store.total_s


def test_costs_learned_from_observations_change_the_choice() -> None:
    holder = runner("holder", holds=(BASE_A,))
    idle = runner("idle")
    holder.queue_s = [10.0]
    policy = EarliestFinish()
    assert policy.rank(demand(BASE_A), [holder, idle])[0].runner is idle  # 4 GB at the 1 GB/s prior: 6 s
    for _ in range(3):  # the idle runner's link turns out to be slow: 4 GB took 40 s
        idle.costs.observe_cluster_fetch(4 * GB, 40.0)
    assert policy.rank(demand(BASE_A), [holder, idle])[0].runner is holder
    # And a slow denoise on the holder (queue counted in requests stays the same) tips it back.
    slow = runner("slow", holds=(BASE_A,))
    fast = runner("fast", holds=(BASE_A,))
    slow.costs.observe_denoise(20, 512, 512, 1, 50.0)
    assert policy.rank(demand(BASE_A), [slow, fast])[0].runner is fast


def test_costs_travel_in_a_heartbeat_and_come_back_the_same() -> None:
    c = Costs()
    c.observe_cluster_fetch(2 * GB, 1.0)
    c.observe_cluster_fetch(2 * GB, 2.0)
    c.observe_denoise(30, 1024, 1024, 2, 6.0)
    c.observe_lora_switch(0.9, changed=3)
    back = Costs.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back.to_dict() == c.to_dict()
    assert 1e9 < back.cluster_bps < 2e9  # moved from the first towards the second
    assert back.lora_switch_s == pytest.approx(0.3)
    assert Costs().cluster_bps == Costs.from_dict({}).cluster_bps  # unmeasured: the prior
    c.observe_build(4 * GB, 0.0)  # a timing of zero carries no rate
    assert c.ram_to_device_bps == Costs().ram_to_device_bps


def test_runner_view_round_trips_through_its_heartbeat_dict() -> None:
    v = runner("r1", holds=(BASE_A, BASE_B), queue_s=[1.5, 2.0], running_s=0.7, max_queue=4)
    back = RunnerView.from_dict(json.loads(json.dumps(v.to_dict())))
    assert back.to_dict() == v.to_dict()
    assert back.device.keys() == [BASE_A.key, BASE_B.key]  # LRU order kept
    assert back.wait_s == pytest.approx(4.2)
    with pytest.raises(errors.InvalidArgument):
        RunnerView.from_dict({"address": "x"})


def test_assigning_a_model_evicts_the_least_recently_used_like_the_runner() -> None:
    v = runner("r1", holds=(BASE_A, BASE_B))  # device fits two 4 GB bases
    v.hold(demand(BASE_A))  # A is now the most recent
    v.assign(demand(BASE_C))
    assert v.device.keys() == [BASE_A.key, BASE_C.key]
    assert BASE_B.key in v.host  # still in RAM: a cheaper way back
    assert estimate(demand(BASE_B), v).tiers[BASE_B.key] == "ram"


def test_loras_already_applied_cost_nothing_and_new_ones_cost_a_switch() -> None:
    v = runner("r1")
    with_lora = demand(BASE_A, loras=(LORA_X,))
    v.hold(with_lora)
    same = estimate(with_lora, v)
    assert same.tiers[LORA_X.key] == "device" and same.switch_s == 0 and same.fetch_s == 0
    without = estimate(demand(BASE_A), v)
    assert without.switch_s == pytest.approx(v.costs.lora_switch_s)  # removing it


def test_full_and_unhealthy_runners_are_never_chosen() -> None:
    full = runner("full", holds=(BASE_A,), max_queue=2, queue_s=[1.0, 1.0])
    sick = runner("sick", holds=(BASE_A,), healthy=False)
    ok = runner("ok")
    for name in POLICIES:
        ranked = make_policy(name).rank(demand(BASE_A), [full, sick, ok])
        assert [e.runner_id for e in ranked] == ["ok"], name
    assert EarliestFinish().rank(demand(BASE_A), [full, sick]) == []
    assert EarliestFinish().choose(demand(BASE_A), [full]) is None


def test_round_robin_takes_turns_whatever_the_models() -> None:
    views = [runner("r1", holds=(BASE_A,)), runner("r2"), runner("r3")]
    policy = RoundRobin()
    order = [route(policy, demand(BASE_A), views).runner_id for _ in range(6)]
    assert order == ["r1", "r2", "r3", "r1", "r2", "r3"]


def test_multiplex_prefers_holders_then_runners_with_fewest_models() -> None:
    holder = runner("holder", holds=(BASE_A,), queue_s=[100.0, 100.0])
    two = runner("two", holds=(BASE_B, BASE_C))
    empty = runner("empty")
    policy = Multiplex()
    # Holding the model wins whatever the queue (Ray looks at no costs).
    assert [e.runner_id for e in policy.rank(demand(BASE_A), [two, empty, holder])] == ["holder", "empty", "two"]
    # Nobody holds it: the runner with the fewest models.
    other = Component("/models/checkpoints/z.safetensors", "base", 2 * GB)
    assert policy.rank(demand(other), [two, holder, empty])[0].runner_id == "empty"


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(errors.InvalidArgument) as e:
        make_policy("fastest")
    assert "finish" in str(e.value) and "round-robin" in str(e.value) and "multiplex" in str(e.value)
    assert isinstance(make_policy("finish"), EarliestFinish)


def test_bad_demands_are_invalid_arguments() -> None:
    with pytest.raises(errors.InvalidArgument):
        Component("/x", "vae", 1)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument):
        Demand(LORA_X, steps=20, width=512, height=512)
    with pytest.raises(errors.InvalidArgument):
        demand(BASE_A, steps=0)
    d = demand(BASE_A, loras=(LORA_X,), batch=2)
    assert Demand.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def test_popularity_follows_recent_requests() -> None:
    from sdcache.policies import Popularity

    pop = Popularity(window=10)
    for _ in range(30):
        pop.observe(BASE_A.key)
    assert pop.share(BASE_A.key) > 0.9 and pop.share(BASE_B.key) == 0.0
    for _ in range(30):  # the traffic moves to B: A's share decays, untouched keys included
        pop.observe(BASE_B.key)
    assert pop.share(BASE_B.key) > 0.9 > 0.1 > pop.share(BASE_A.key)
    assert pop.share(BASE_A.key) + pop.share(BASE_B.key) == pytest.approx(1.0)


def test_a_rare_model_does_not_evict_the_popular_one() -> None:
    """r1 holds the model most requests want, r2 a rarely used one; a new model goes to r2 even a bit later."""
    def fleet() -> list[RunnerView]:
        r1 = runner("r1", device=5 * GB, holds=(BASE_A,))  # room for one base each
        r2 = runner("r2", device=5 * GB, holds=(BASE_B,), running_s=1.0)
        return [r1, r2]

    fresh = EarliestFinish()  # no traffic seen: plain earliest finish takes the idle runner
    assert fresh.choose(demand(BASE_C), fleet()).runner_id == "r1"
    learned = EarliestFinish()
    for i in range(40):
        learned.observe(demand(BASE_B if i % 10 == 0 else BASE_A))  # A: 90% of the traffic
    views = fleet()
    assert learned.choose(demand(BASE_C), views).runner_id == "r2"
    assert [e.runner_id for e in learned.rank(demand(BASE_C), views)] == ["r2", "r1"]
    # ... but not at any price: a long enough queue on r2 outweighs reloading A
    views[1].running_s = 120.0
    assert learned.choose(demand(BASE_C), views).runner_id == "r1"
    # and with A on both runners, evicting one copy costs nothing
    both = [runner("r1", device=5 * GB, holds=(BASE_A,)), runner("r2", device=5 * GB, holds=(BASE_A,), running_s=1.0)]
    assert learned.choose(demand(BASE_C), both).runner_id == "r1"
