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
        # Requests sent, per runner: ticket -> [wall time sent, demand, wall time answered or None]. A
        # report taken before the runner saw one would forget it, so refresh() applies it again, until a
        # report taken after its answer shows what it left behind.
        self._pending: dict[str, dict[int, list[Any]]] = {}
        self._next = 0

    def sent(self, view: routing.RunnerView, demand: routing.Demand, est: routing.Estimate) -> int:
        """Count a request into *view* now; returns a ticket for :meth:`answered`."""
        view.assign(demand, est)
        self._next += 1
        self._pending.setdefault(view.runner_id, {})[self._next] = [time.time(), demand, None]
        return self._next

    def answered(self, runner_id: str, ticket: int) -> None:
        entry = self._pending.get(runner_id, {}).get(ticket)
        if entry is not None:
            entry[2] = time.time()

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
            views: dict[str, routing.RunnerView] = {}
            for r in resp.runners:
                try:
                    state = json.loads(r.state or b"{}")
                    at = float(state.pop("at", 0.0))
                    state.setdefault("runner_id", r.runner_id)
                    view = routing.RunnerView.from_dict(state)
                except (ValueError, TypeError, AttributeError, errors.SdcacheError) as exc:
                    log.warning("runner %s sent a state that does not parse (%s); skipped", r.runner_id, exc)
                    continue
                view.runner_id, view.address = r.runner_id, r.address
                view.advance(max(0.0, time.time() - at))  # work done since the report was taken
                pending = self._pending.get(r.runner_id, {})
                for ticket, (t_sent, demand, t_answered) in list(pending.items()):
                    if t_answered is not None and t_answered < at:
                        del pending[ticket]  # the report is newer than the answer: it shows the result
                    elif t_sent >= at and t_answered is not None:
                        view.hold(demand)  # done since: what it loaded is there, its work is not queued
                    elif t_sent >= at:  # sent after this report was taken: not in it yet
                        view.assign(demand)
                views[r.runner_id] = view
            routing.share_costs(list(views.values()))
            self.views = views
            for gone in set(self._pending) - set(views):
                del self._pending[gone]
            self.changed.set()
            return

    _auth_at = 0.0

    def _auth_due(self) -> bool:
        """Token state is polled every few seconds (the gateway has no heartbeat that carries its generation)."""
        now = time.monotonic()
        if now - self._auth_at >= 2.0:
            self._auth_at = now
            return True
        return False
