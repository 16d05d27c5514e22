"""The runner registry, client side: ``serve`` reports itself, the gateway reads every runner.

``serve`` reports to each metadata address it was given (``--meta a,b,c``)
every report interval: its address and its routing state (what its device
and host-RAM tiers hold, its queue, its measured costs; a
:class:`sdcache.routing.RunnerView` as JSON). Each report is a lease; a
runner that stops reporting drops out after three intervals. The reply's auth
generation keeps the runner's token verifier current.

The gateway lists the runners from the first metadata address that answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from sdcache import auth, errors, routing
from sdcache._proto import meta_pb2 as pb
from sdcache._proto import meta_pb2_grpc as pbg
from sdcache.meta import grpcauth
from sdcache.meta.authstate import AuthFollower
from sdcache.tls import Credentials

log = logging.getLogger(__name__)

RPC_TIMEOUT = 5.0
DEFAULT_INTERVAL = 1.0


def meta_addresses(text: str | None) -> list[str]:
    """``a,b,c`` (``--meta`` or ``$SDCACHE_META``) to a list; the default when empty."""
    from sdcache.client.metaclient import resolve_address

    return [a.strip() for a in resolve_address(text).split(",") if a.strip()]


class Reporter:
    """Keeps one runner registered: a report per interval to every metadata address."""

    def __init__(self, metas: list[str], runner_id: str, address: str, state: Callable[[], dict[str, Any]], *,
                 credentials: Credentials, verifier: auth.TokenVerifier) -> None:
        self.metas = metas
        self.runner_id = runner_id
        self.address = address
        self._state = state
        self._credentials = credentials
        self.followers = [AuthFollower(verifier, m) for m in metas]
        self.interval = DEFAULT_INTERVAL
        self.last_contact: float | None = None
        self.reports = 0

    async def run(self) -> None:
        channels = [grpcauth.aio_channel(m, self._credentials) for m in self.metas]
        try:
            stubs = [pbg.MetaStub(c) for c in channels]
            while True:
                await self.report_once(stubs)
                await asyncio.sleep(self.interval)
        finally:
            for c in channels:
                await c.close()

    async def report_once(self, stubs: list[pbg.MetaStub]) -> None:
        state = json.dumps(self._state(), separators=(",", ":")).encode()
        req = pb.RunnerReport(runner_id=self.runner_id, address=self.address, state=state)

        async def one(stub: pbg.MetaStub, follower: AuthFollower) -> None:
            try:
                resp = await stub.ReportRunner(req, timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                log.warning("runner report to %s failed (%s: %s)", follower.where, e.code().name, e.details())
                return
            self.last_contact = time.monotonic()
            self.reports += 1
            if resp.report_interval > 0:
                self.interval = min(max(resp.report_interval, 0.05), 30.0)
            await follower.sync(stub, resp.auth_generation)

        await asyncio.gather(*(one(s, f) for s, f in zip(stubs, self.followers)))

    def not_ready(self) -> str | None:
        if self.last_contact is None:
            return f"not registered with the metadata service at {','.join(self.metas)} yet"
        silent = time.monotonic() - self.last_contact
        if silent > 3 * self.interval + 1.0:
            return f"the metadata service has not answered for {silent:.1f}s"
        return None


class RunnerDirectory:
    """The gateway's view of the runners, refreshed from the registry every interval."""

    def __init__(self, metas: list[str], *, credentials: Credentials, verifier: auth.TokenVerifier,
                 interval: float = 0.5) -> None:
        self.metas = metas
        self._credentials = credentials
        self.followers = [AuthFollower(verifier, m) for m in metas]
        self.interval = interval
        self.views: dict[str, routing.RunnerView] = {}
        self.last_contact: float | None = None
        self.changed = asyncio.Event()
        # Requests sent, per runner: ticket -> [wall time sent, demand, wall time answered or None, ran].
        # A report taken before the runner saw one would forget it, so each view is rebuilt from the
        # runner's last report plus these, until a report taken after its answer shows what it left
        # behind. *ran*: the answer came from the runner having run it (not a refusal or a failure).
        self._pending: dict[str, dict[int, list[Any]]] = {}
        self._reports: dict[str, tuple[routing.RunnerView, float]] = {}  # runner -> (its last report, taken at)
        self._failed: dict[str, float] = {}  # runner -> wall time a request to it failed
        self._next = 0

    def sent(self, view: routing.RunnerView, demand: routing.Demand, est: routing.Estimate) -> int:
        """Count a request into *view* now; returns a ticket for :meth:`answered`."""
        view.assign(demand, est)
        self._next += 1
        self._pending.setdefault(view.runner_id, {})[self._next] = [time.time(), demand, None, False]
        return self._next

    def unhealthy(self, runner_id: str) -> None:
        """A request to *runner_id* failed: it is no candidate until a report taken after this says otherwise."""
        self._failed[runner_id] = time.time()
        view = self.views.get(runner_id)
        if view is not None:
            view.healthy = False

    def answered(self, runner_id: str, ticket: int, *, ran: bool) -> None:
        """The request of *ticket* came back: *ran* if the runner ran it (False: refused, or it failed).

        The runner's view is rebuilt at once: a request answered is no longer
        work on that runner, and the next request must not wait for the next
        report to see the runner free.
        """
        entry = self._pending.get(runner_id, {}).get(ticket)
        if entry is None:
            return
        entry[2], entry[3] = time.time(), ran
        view = self._view(runner_id)
        if view is not None:
            self.views[runner_id] = view
            routing.share_costs(list(self.views.values()))

    async def run(self) -> None:
        channels = [grpcauth.aio_channel(m, self._credentials) for m in self.metas]
        try:
            stubs = [pbg.MetaStub(c) for c in channels]
            while True:
                await self.refresh(stubs)
                await asyncio.sleep(self.interval)
        finally:
            for c in channels:
                await c.close()

    async def refresh(self, stubs: list[pbg.MetaStub]) -> None:
        for stub, follower in zip(stubs, self.followers):
            try:
                resp = await stub.ListRunners(pb.RunnersRequest(), timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                log.warning("listing runners at %s failed (%s: %s)", follower.where, e.code().name, e.details())
                continue
            await follower.sync(stub, None if follower.generation is None or self._auth_due() else follower.generation)
            self.last_contact = time.monotonic()
            reports: dict[str, tuple[routing.RunnerView, float]] = {}
            for r in resp.runners:
                try:
                    state = json.loads(r.state or b"{}")
                    at = float(state.pop("at", 0.0))
                    state.setdefault("runner_id", r.runner_id)
                    reported = routing.RunnerView.from_dict(state)
                except (ValueError, TypeError, AttributeError, errors.SdcacheError) as exc:
                    log.warning("runner %s sent a state that does not parse (%s); skipped", r.runner_id, exc)
                    continue
                reported.runner_id, reported.address = r.runner_id, r.address
                reports[r.runner_id] = (reported, at)
            self._reports = reports
            views = {rid: view for rid in reports if (view := self._view(rid)) is not None}
            routing.share_costs(list(views.values()))
            self.views = views
            for gone in set(self._pending) - set(views):
                del self._pending[gone]
            self.changed.set()
            return

    def _view(self, runner_id: str) -> routing.RunnerView | None:
        """Runner *runner_id* as of now: its last report, the time since, and the requests sent it since."""
        report = self._reports.get(runner_id)
        if report is None:
            return None
        reported, at = report
        view = reported.copy()  # the report stays as it came: each rebuild starts from it
        if self._failed.get(runner_id, 0.0) >= at:
            view.healthy = False
        else:
            self._failed.pop(runner_id, None)
        pending = self._pending.get(runner_id, {})
        since = at  # work has gone on since the report, or since the last answer it did not show yet
        for ticket, (t_sent, demand, t_answered, ran) in sorted(pending.items()):
            if t_answered is not None and (t_answered < at or not ran):
                del pending[ticket]  # the report shows the result, or the runner never ran it
            elif t_sent < at and t_answered is not None:
                view.finish_first()  # in the report as queued or running, answered since: done
                since = max(since, t_answered)
        view.advance(max(0.0, time.time() - since))
        for t_sent, demand, t_answered, _ in pending.values():
            if t_sent >= at and t_answered is not None:
                view.hold(demand)  # done since: what it loaded is there, its work is not queued
            elif t_sent >= at:  # sent after this report was taken: not in it yet
                view.assign(demand)
        return view

    _auth_at = 0.0

    def _auth_due(self) -> bool:
        """Token state is polled every few seconds (the gateway has no heartbeat that carries its generation)."""
        now = time.monotonic()
        if now - self._auth_at >= 2.0:
            self._auth_at = now
            return True
        return False
