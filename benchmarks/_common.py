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


def load_average() -> str:
    """``1.2/3.4/5.6``: the 1, 5 and 15 minute load averages (quoted beside every figure)."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def write_random(path: str, size: int) -> None:
    """A file of *size* random bytes (incompressible, every chunk distinct), unless one is there."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            f.write(os.urandom(n))
            left -= n


def warm_cluster(data_dir: str, src: str, path: str, *, nodes: int, size: int, prefix: str,
                 **options: Any) -> tuple[Any, str | None]:
    """A started one-host cluster holding *src* as *path*, warm in every pool; and a read token for it.

    *options* go to :class:`sdcache.cluster.LocalCluster` (``meta_args``, ``node_args``, ``env``).
    The token is None when the cluster runs with ``--insecure-no-auth``.
    """
    import shutil
    import tempfile

    from sdcache.client.importer import import_file
    from sdcache.client.metaclient import MetaClient
    from sdcache.cluster import LocalCluster

    shutil.rmtree(data_dir, ignore_errors=True)
    cluster = LocalCluster(data_dir, nodes=nodes, capacity=max(64 << 20, int(size * 1.25)),
                           pool_root=tempfile.mkdtemp(prefix=prefix, dir="/dev/shm"), **options)
    cluster.start()
    admin = MetaClient(cluster.meta_addr, credentials=cluster.credentials)
    try:
        import_file(admin, src, path)
        for _ in admin.warmup([path]):
            pass
        # the reading client holds a read token, as a serving host would
        name = f"bench-{os.getpid()}-{os.path.basename(data_dir)}"
        token = admin.create_token("read", name=name).token if cluster.admin_token else None
    finally:
        admin.close()
    return cluster, token


def network_read(fs: Any, path: str, size: int) -> float:
    """GB/s of one whole-file read through *fs*, checked to be all chunks from nodes over the network."""
    before = dict(fs.fetcher.tiers)
    t0 = time.perf_counter()
    with fs.open(path, "rb") as f:
        got = len(f.read())
    dt = time.perf_counter() - t0
    tiers = {k: v - before.get(k, 0) for k, v in fs.fetcher.tiers.items() if v - before.get(k, 0)}
    if got != size or set(tiers) != {"node"}:
        raise RuntimeError(f"read {got} of {size} bytes, chunks from {tiers}: not a network read")
    return size / dt / 1e9
