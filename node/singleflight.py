"""Merge concurrent calls for one key into one flight (as JuiceFS's singleflight)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Run at most one ``fn()`` per key at a time; later callers share its result.

    The flight is a task the group keeps a reference to; a caller that is
    cancelled (a client that hung up) does not cancel the flight others wait on.
    """

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Task[V]] = {}
        self.started = 0
        self.joined = 0

    def in_flight(self, key: K) -> bool:
        return key in self._flights

    async def do(self, key: K, fn: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """Result of the flight for *key*, and whether this call joined an existing one."""
        task = self._flights.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.get_running_loop().create_task(self._run(fn))
            self._flights[key] = task
            self.started += 1
            task.add_done_callback(lambda t, k=key: self._done(k, t))
        else:
            self.joined += 1
        return await asyncio.shield(task), joined

    async def _run(self, fn: Callable[[], Awaitable[V]]) -> V:
        return await fn()

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: waiters that left must not leave a warning

    async def close(self) -> None:
        """Cancel and await every flight (shutdown)."""
        tasks = list(self._flights.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
