"""Waiting for fetches that write into caller memory.

A fetch submitted with a destination view (``Fetcher.submit_into``, the
mapped loader's ``_place``) writes into memory its caller owns: the
uninitialised ``bytes`` of :func:`~sdcache.client._buffers.filled_bytes`, a
tensor's storage, a mapped range. The caller may free or reuse that memory as
soon as it returns or raises, so it must not do either while one of those
fetches still runs: a fetch writing into freed memory crashes the process or
silently corrupts its heap. Everything here settles every future first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


def settle(futures: Iterable[Future[Any]]) -> None:
    """Cancel what has not started and wait until the rest are done; never raises their errors.

    A second interrupt (Ctrl-C) while waiting does not cut the wait short: the
    fetches are bounded by their own timeouts, and the memory they write into
    must outlive them.
    """
    pending = [f for f in futures if not f.cancel()]
    interrupted: BaseException | None = None
    while pending:
        try:
            wait(pending)
        except BaseException as exc:  # noqa: BLE001 - re-raised once nothing writes any more
            interrupted = interrupted or exc
            continue
        pending = [f for f in pending if not f.done()]
    if interrupted is not None:
        raise interrupted


def wait_all(futures: Iterable[Future[T]]) -> list[T]:
    """The results of *futures*, in order.

    As soon as one fails, the futures not yet started are cancelled, the running
    ones are waited for, and then the failure is raised (the first in *futures*
    order, if several failed): when this returns or raises, nothing writes into
    the caller's memory any more.
    """
    futures = list(futures)
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
    except BaseException:  # interrupted while waiting
        settle(futures)
        raise
    if any(_failed(f) for f in futures):
        settle(futures)
        next(f for f in futures if _failed(f)).result()  # raises its error
    return [f.result() for f in futures]


def _failed(f: Future[Any]) -> bool:
    return f.done() and not f.cancelled() and f.exception() is not None


@contextmanager
def settled(futures: list[Future[Any]]) -> Iterator[None]:
    """Run the body, then :func:`wait_all` on *futures* (which the body may still add to).

    If the body raises, the futures are settled (cancelled or waited for) before
    the exception leaves the block.
    """
    try:
        yield
    except BaseException:
        settle(futures)
        raise
    wait_all(futures)
