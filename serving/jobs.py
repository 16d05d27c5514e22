"""The serving queue: bounded, one worker thread, timeouts, interrupts, and slots freed by disconnects.

Requests wait in FIFO order for the one worker thread that owns the runner
(a runner serves one request at a time). The queue holds at most
``max_queue`` waiting requests: one more is refused at once with
:class:`~sdcache.errors.QueueFull` (HTTP 429 with ``Retry-After`` from the
measured service time). A request has ``timeout`` seconds from arrival to
answer; one that runs out while waiting leaves the queue, one that runs out
while denoising is interrupted at the next step. A client that disconnects
is treated the same way, so its slot goes to the next request.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sdcache import errors

from . import metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One request in the queue; the worker calls ``work(job)`` and the result goes to its future."""

    kind: str
    work: Callable[["Job"], Any]
    estimate_s: float = 0.0  # what the router would expect it to take once running
    demand: Any = None  # its sdcache.routing.Demand: the models it brings into the runner's tiers
    job_id: int = field(default_factory=itertools.count(1).__next__)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    step: int = 0
    steps: int = 0
    iteration: int = 0  # of n_iter pipeline calls
    iterations: int = 1
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str = ""
    future: Future = field(default_factory=Future)

    def on_step(self, done: int, total: int) -> bool:
        """The runner's per-step callback: records progress; False asks the runner to stop."""
        self.step, self.steps = done, total
        return not self.stop.is_set()

    def cancel(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        self.stop.set()


class JobQueue:
    """FIFO of :class:`Job` in front of one worker thread."""

    def __init__(self, *, max_queue: int = 16, timeout: float = 600.0, name: str = "sdcache-serve",
                 on_start: Callable[[], None] | None = None) -> None:
        """*on_start* runs first on the worker thread (building the runner there keeps torch on one thread)."""
        if max_queue < 0:
            raise errors.InvalidArgument(f"--max-queue {max_queue}: must be 0 or more")
        self.max_queue = max_queue
        self.timeout = timeout
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self._closed = False
        self.served = 0
        self.mean_service_s = 1.0  # EWMA of run times, for Retry-After and the progress ETA
        self._on_start = on_start
        self._thread = threading.Thread(target=self._worker, name=name, daemon=True)
        self._thread.start()

    # -- the event loop side --------------------------------------------------------
    async def submit(self, job: Job) -> Any:
        """Queue *job* and wait for its result; the caller's cancellation (disconnect) frees its slot."""
        with self._cond:
            if self._closed:
                raise errors.Unavailable("the server is shutting down")
            if len(self._waiting) >= self.max_queue and self.running is not None:
                metrics.QUEUE_REJECTED.inc()
                full = errors.QueueFull(
                    f"the queue is full ({len(self._waiting)} waiting, limit {self.max_queue}); retry in "
                    f"{self.retry_after()} s or send it elsewhere")
                full.retry_after = self.retry_after()  # type: ignore[attr-defined]
                raise full
            self._waiting.append(job)
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._cond.notify()
        try:
            async with asyncio.timeout(self.timeout):
                return await asyncio.wrap_future(job.future)
        except TimeoutError:
            self._abandon(job, "timed out")
            raise errors.DeadlineExceeded(
                f"the request did not finish within {self.timeout:g} s "
                f"({'running' if job.started else 'still waiting in the queue'})") from None
        except asyncio.CancelledError:
            self._abandon(job, "client disconnected")
            raise

    def _abandon(self, job: Job, reason: str) -> None:
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                metrics.QUEUE_DEPTH.set(len(self._waiting))
                metrics.QUEUE_ABANDONED.labels("waiting").inc()
                log.info("request %d left the queue: %s", job.job_id, reason)
                return
        # Its future may already be cancelled (the awaiting task's cancellation reaches it): stop anyway.
        if job.started is not None and not job.stop.is_set():
            metrics.QUEUE_ABANDONED.labels("running").inc()
            log.info("request %d stops at the next step: %s", job.job_id, reason)
            job.cancel(reason)

    def interrupt(self) -> bool:
        """Stop the running request at its next step (``POST /sdapi/v1/interrupt``); False if none runs."""
        job = self.running
        if job is None:
            return False
        job.cancel("interrupted")
        return True

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one service time, at least 1."""
        return max(1, round(self.mean_service_s))

    def snapshot(self) -> tuple[Job | None, list[Job]]:
        """The running request and the waiting ones, in order."""
        with self._cond:
            return self.running, list(self._waiting)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._waiting:
                job.future.set_exception(errors.Unavailable("the server is shutting down"))
            self._waiting.clear()
            if self.running is not None:
                self.running.cancel("shutting down")
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # -- the worker thread ------------------------------------------------------------
    def _worker(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                metrics.QUEUE_DEPTH.set(len(self._waiting))
                job.started = time.monotonic()
                self.running = job
            metrics.QUEUE_WAIT_SECONDS.observe(job.started - job.submitted)
            try:
                result = job.work(job)
            except BaseException as exc:  # noqa: BLE001 - every failure reaches the waiting client
                if not job.future.done():
                    job.future.set_exception(exc)
            else:
                if not job.future.done():
                    job.future.set_result(result)
            finally:
                took = time.monotonic() - job.started
                with self._cond:
                    self.running = None
                    self.served += 1
                    self.mean_service_s = took if self.served == 1 else 0.8 * self.mean_service_s + 0.2 * took
