"""The serving queue on its own: bound, 429, timeouts, interrupts and disconnects (no torch needed).

The work function here stands for a runner call: it blocks on the step
callback the real runner calls, so a test decides when each "step" happens.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from sdcache import errors
from sdcache.serving.jobs import Job, JobQueue


class Steps:
    """A work function that runs one step each time the test releases it, honouring the stop flag."""

    def __init__(self, total: int = 1000) -> None:
        self.total = total
        self.release = threading.Semaphore(0)
        self.started = threading.Event()

    def __call__(self, job: Job) -> dict[str, object]:
        self.started.set()
        for i in range(1, self.total + 1):
            self.release.acquire(timeout=30)
            if not job.on_step(i, self.total):
                return {"steps": i, "stopped": job.stop_reason}
        return {"steps": self.total, "stopped": ""}


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_full_queue_refuses_at_once_with_a_retry_after() -> None:
    q = JobQueue(max_queue=1, timeout=30)
    blocker, waiter = Steps(), Steps(1)

    async def go() -> None:
        first = asyncio.create_task(q.submit(Job("txt2img", blocker)))
        await asyncio.to_thread(blocker.started.wait, 10)
        second = asyncio.create_task(q.submit(Job("txt2img", waiter)))
        await asyncio.sleep(0.05)
        with pytest.raises(errors.QueueFull) as info:
            await q.submit(Job("txt2img", Steps(1)))
        assert info.value.http_status == 429 and info.value.retry_after >= 1  # type: ignore[attr-defined]
        assert "queue is full (1 waiting, limit 1)" in str(info.value)
        q.interrupt()
        blocker.release.release()
        waiter.release.release()
        assert (await first)["stopped"] == "interrupted"
        assert (await second)["steps"] == 1

    run(go())
    q.close()


def test_a_timeout_while_waiting_frees_the_slot_and_while_running_stops_the_work() -> None:
    q = JobQueue(max_queue=1, timeout=0.3)
    blocker = Steps()

    async def go() -> None:
        first = asyncio.create_task(q.submit(Job("txt2img", blocker)))
        await asyncio.to_thread(blocker.started.wait, 10)
        with pytest.raises(errors.DeadlineExceeded, match="still waiting in the queue"):
            await q.submit(Job("txt2img", Steps(1)))
        assert q.snapshot()[1] == []  # the slot is free again
        with pytest.raises(errors.DeadlineExceeded, match="running"):
            await first
        blocker.release.release()  # the next step sees the stop flag

    run(go())
    q.close()


def test_a_cancelled_waiter_leaves_the_queue_and_a_cancelled_runner_stops() -> None:
    q = JobQueue(max_queue=2, timeout=30)
    blocker, never = Steps(), Steps(1)
    job_running, job_waiting = Job("txt2img", blocker), Job("txt2img", never)

    async def go() -> None:
        first = asyncio.create_task(q.submit(job_running))
        await asyncio.to_thread(blocker.started.wait, 10)
        second = asyncio.create_task(q.submit(job_waiting))
        await asyncio.sleep(0.05)
        assert q.snapshot()[1] == [job_waiting]
        second.cancel()  # what aiohttp does when the client disconnects
        await asyncio.gather(second, return_exceptions=True)
        assert q.snapshot()[1] == []
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        assert job_running.stop.is_set() and job_running.stop_reason == "client disconnected"
        blocker.release.release()

    run(go())
    q.close()
    assert not never.started.is_set()  # the request whose client left never ran


def test_a_failing_request_reaches_its_client_and_the_queue_goes_on() -> None:
    q = JobQueue(max_queue=4, timeout=30)

    def boom(job: Job) -> None:
        raise errors.InvalidArgument("LoRA x is for SDXL; the base model is SD1.x")

    async def go() -> None:
        with pytest.raises(errors.InvalidArgument, match="SDXL"):
            await q.submit(Job("txt2img", boom))
        ok = Steps(1)
        ok.release.release()
        assert (await q.submit(Job("txt2img", ok)))["steps"] == 1

    run(go())
    q.close()


def test_on_start_runs_first_on_the_worker_thread() -> None:
    seen: list[str] = []
    q = JobQueue(max_queue=1, on_start=lambda: seen.append(threading.current_thread().name))

    async def go() -> None:
        await q.submit(Job("txt2img", lambda job: seen.append(threading.current_thread().name)))

    run(go())
    q.close()
    assert seen == ["sdcache-serve", "sdcache-serve"]
    with pytest.raises(errors.InvalidArgument):
        JobQueue(max_queue=-1)
