"""The gateway's view of a runner between reports: a request it got an answer for is no longer work there.

A real metadata service (the session cluster) holds the runner reports; the
gateway's :class:`RunnerDirectory` lists them over gRPC, as ``sdcache
gateway`` does. Each report is what a runner sends (``RunnerView.to_dict``
plus the time it was taken).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from sdcache import auth
from sdcache._proto import meta_pb2 as pb
from sdcache._proto import meta_pb2_grpc as pbg
from sdcache.meta import grpcauth
from sdcache.policies import make_policy
from sdcache.routing import Component, Demand, RunnerView, Tier
from sdcache.serving.registry import RunnerDirectory
from sdcache.tls import Credentials

from .conftest import mint_token

GB = 10**9
A = Component("/models/checkpoints/a.safetensors", "base", 2 * GB)
B = Component("/models/checkpoints/b.safetensors", "base", 2 * GB)


def _demand(base: Component) -> Demand:
    return Demand(base, steps=20, width=512, height=512)


def _runner(rid: str, holds: Component, running_s: float = 0.0) -> RunnerView:
    v = RunnerView(rid, "", Tier(2 * GB), Tier(64 * GB))  # room for one base on the device
    v.hold(_demand(holds))
    v.running_s = running_s
    return v


async def _scenario(meta: str) -> dict[str, Any]:
    node = Credentials(mint_token("node", "test-runner"))
    reader = Credentials(mint_token("read", "test-gateway"))
    out: dict[str, Any] = {}
    async with grpcauth.aio_channel(meta, node) as rc, grpcauth.aio_channel(meta, reader) as gc:
        report_stub, list_stub = pbg.MetaStub(rc), pbg.MetaStub(gc)

        async def report(view: RunnerView, at: float) -> None:
            state = json.dumps({"at": at, **view.to_dict()}).encode()
            req = pb.RunnerReport(runner_id=view.runner_id, address="127.0.0.1:9", state=state)
            await report_stub.ReportRunner(req, timeout=10)

        d = RunnerDirectory([meta], credentials=reader, verifier=auth.TokenVerifier())
        policy = make_policy("finish")
        ids = ("view-test-1", "view-test-2")
        # runner 1 holds A, runner 2 holds B; both idle
        await report(_runner(ids[0], A), time.time())
        await report(_runner(ids[1], B), time.time())
        await d.refresh([list_stub])

        # A request for A: runner 1. Then runner 1 reports while running it (3 s estimated left).
        first = policy.rank(_demand(A), [d.views[i] for i in ids])[0]
        t1 = d.sent(first.runner, _demand(A), first)
        out["first"] = first.runner_id
        await report(_runner(ids[0], A, running_s=3.0), time.time())
        await d.refresh([list_stub])
        out["busy_before_answer"] = d.views[ids[0]].wait_s
        d.answered(ids[0], t1, ran=True)
        out["busy_after_answer"] = d.views[ids[0]].wait_s
        # The next request for A goes to runner 1 again: it is free and holds A.
        out["second"] = policy.rank(_demand(A), [d.views[i] for i in ids])[0].runner_id

        # A request sent after the last report and answered: its model is held, its work is gone.
        est = policy.rank(_demand(A), [d.views[i] for i in ids])[0]
        t2 = d.sent(est.runner, _demand(A), est)
        out["busy_while_sent"] = d.views[ids[0]].wait_s
        d.answered(ids[0], t2, ran=True)
        out["busy_after_second"] = d.views[ids[0]].wait_s
        out["holds_a"] = A.key in d.views[ids[0]].device

        # A request runner 2 refused (429): nothing of it stays in the view, not even its model.
        est = policy.rank(_demand(A), [d.views[ids[1]]])[0]
        t3 = d.sent(est.runner, _demand(A), est)
        d.answered(ids[1], t3, ran=False)
        out["refused_leaves"] = (d.views[ids[1]].wait_s, A.key in d.views[ids[1]].device)

        # A runner whose request failed is no candidate until a report taken after the failure.
        d.unhealthy(ids[1])
        await d.refresh([list_stub])
        out["healthy_after_old_report"] = d.views[ids[1]].healthy
        await report(_runner(ids[1], B), time.time())
        await d.refresh([list_stub])
        out["healthy_after_new_report"] = d.views[ids[1]].healthy
    return out


def test_an_answered_request_frees_its_runner_at_once(cluster) -> None:
    out = asyncio.run(_scenario(cluster.meta_addr))
    assert out["first"] == "view-test-1"
    assert out["busy_before_answer"] > 2.0  # the report shows it running
    assert out["busy_after_answer"] == pytest.approx(0.0, abs=1e-6)
    assert out["second"] == "view-test-1"
    assert out["busy_while_sent"] > 0
    assert out["busy_after_second"] == pytest.approx(0.0, abs=1e-6)
    assert out["holds_a"]
    assert out["refused_leaves"] == (0.0, False)
    assert out["healthy_after_old_report"] is False
    assert out["healthy_after_new_report"] is True
