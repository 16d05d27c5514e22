"""Helpers shared by the benchmarks: timing, tables, generated models, a cluster."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


def median_time(fn: Callable[[], Any], repeat: int = 3, setup: Callable[[], Any] | None = None) -> float:
    """Median wall time of *fn* over *repeat* runs (each after *setup*)."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        del result  # freeing (munmap of gigabytes) is not part of what is timed
    return statistics.median(times)


def drop_page_cache(path: str) -> None:
    """Evict *path* from the page cache: POSIX_FADV_DONTNEED, plus drop_caches when root."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        pass


def touch_tensors(tensors: dict) -> dict:
    """Read one element per 4 KiB page of every tensor.

    ``safetensors.torch.load_file`` maps the file lazily, so its tensors are
    not in memory until used; touching every page makes "loaded" mean the
    same thing for every loader compared.
    """
    for t in tensors.values():
        flat = t.reshape(-1)
        if flat.numel():
            flat[:: max(1, 4096 // t.element_size())].sum()
    return tensors


def warm_page_cache(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}"


def table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    out = [f"\n{title}", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)
