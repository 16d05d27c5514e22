"""The runner registry: which ``sdcache serve`` processes exist and what they last reported.

Soft state, in memory: each report is a lease of ``ttl`` seconds, and a runner
that stops reporting is forgotten when its lease runs out. Nothing here is
worth an fsync: a restarted service knows every live runner again after one
report interval, and with several metadata processes each runner reports to
every address it was given. The state a runner reports is an opaque JSON
object to this service (its meaning belongs to :mod:`sdcache.routing`); it is
bounded in size, and so is the number of runners.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass

from .. import errors
from ..hostport import split_hostport

MAX_RUNNERS = 4096
MAX_STATE_BYTES = 1 << 20
MAX_TTL = 300.0
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


@dataclass(frozen=True)
class RunnerRecord:
    runner_id: str
    address: str
    state: bytes
    reported: float  # monotonic time of the last report
    expires: float  # monotonic time the lease runs out


class RunnerRegistry:
    """Runner leases, safe to call from any thread."""

    def __init__(self, report_interval: float = 1.0) -> None:
        self.report_interval = report_interval
        self._clock = time.monotonic
        self._lock = threading.Lock()
        self._runners: dict[str, RunnerRecord] = {}

    def report(self, runner_id: str, address: str, state: bytes, ttl: float) -> None:
        """Record a report; :class:`~sdcache.errors.InvalidArgument` (one line) for a bad one."""
        if not _ID.fullmatch(runner_id):
            raise errors.InvalidArgument(
                f"runner id must be 1-128 of A-Z a-z 0-9 . _ : @ - (starting with a letter or digit), "
                f"not {runner_id[:140]!r}")
        split_hostport(address, what="runner address", default_host=None)
        if len(state) > MAX_STATE_BYTES:
            raise errors.InvalidArgument(f"runner state is {len(state)} bytes; the limit is {MAX_STATE_BYTES}")
        try:
            if not isinstance(json.loads(state or b"{}"), dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise errors.InvalidArgument(f"runner state must be a JSON object ({exc})") from None
        if ttl < 0 or ttl > MAX_TTL or ttl != ttl:
            raise errors.InvalidArgument(f"runner ttl must be within 0..{MAX_TTL:g} seconds, not {ttl}")
        ttl = ttl or 3 * self.report_interval
        now = self._clock()
        with self._lock:
            self._expire(now)
            if runner_id not in self._runners and len(self._runners) >= MAX_RUNNERS:
                raise errors.Overloaded(f"the runner registry is full ({MAX_RUNNERS} runners)")
            self._runners[runner_id] = RunnerRecord(runner_id, address, bytes(state), now, now + max(ttl, 0.1))

    def live(self) -> list[tuple[RunnerRecord, float]]:
        """Every runner whose lease holds, with the seconds since its last report."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            return [(r, now - r.reported) for r in sorted(self._runners.values(), key=lambda r: r.runner_id)]

    def _expire(self, now: float) -> None:
        for rid in [rid for rid, r in self._runners.items() if r.expires <= now]:
            del self._runners[rid]
