"""Base model switch: sdcache's host-RAM tier (and warm cache nodes) vs diffusers loading from local disk.

Two SD1.5-architecture pipelines with random weights (shipped configs, fp16,
~2.1 GB each): base A as an original-layout single file, base B as a diffusers
folder. A switch makes the other base ready to denoise (UNet, VAE, text
encoder, tokenizer, scheduler on the CPU):

* sdcache: ``Runner.prepare`` with both files in the host-RAM tier and the
  device tier kept to the model in use (``device_budget=0``), so every switch
  rebuilds the modules from RAM: meta-device modules given the cached tensors
  (no copy, no random init);
* diffusers: ``StableDiffusionPipeline.from_single_file`` (configs from base B's
  folder: no hub) and ``from_pretrained``, from local disk, with the page cache
  warm (the files were just read) and cold (``posix_fadvise(DONTNEED)``).
* ``--cluster``: also a one-host cluster (metadata service + 2 nodes on this
  host, files imported and warmed up); the runner then keeps no host-RAM copy
  (``host_budget=0``), so every switch fetches the chunks from the nodes.

Run: ``python benchmarks/bench_base_switch.py [--repeats 4] [--cluster]``
(install ``accelerate`` to give diffusers its fastest loading path).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from sdcache.kernels.families import family  # noqa: E402
from sdcache.kernels.original_layout import original_layout  # noqa: E402
from sdcache.kernels.request import Request  # noqa: E402
from sdcache.kernels.runner import Runner  # noqa: E402
from sdcache.kernels.tiny import random_module  # noqa: E402
from sdcache.kernels.tokenizer import clip_tokenizer  # noqa: E402


def random_components(seed: int, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    g = torch.Generator().manual_seed(seed)  # one generator through every component, in family order
    return {comp: random_module("sd1", comp, dtype, g) for comp in family("sd1").components}


def write_models(root: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    import diffusers

    a = random_components(1, dtype)
    single = root / "base-a.safetensors"
    save_file(original_layout("sd1", a), str(single))
    del a
    gc.collect()
    b = random_components(2, dtype)
    folder = root / "base-b"
    sched = diffusers.EulerDiscreteScheduler.from_config(family("sd1").config("scheduler"))
    diffusers.StableDiffusionPipeline(
        vae=b["vae"], text_encoder=b["text_encoder"], tokenizer=clip_tokenizer(), unet=b["unet"],
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder, safe_serialization=True)
    del b
    gc.collect()
    return single, folder


def drop_page_cache(root: Path) -> None:
    """Evict *root*'s files from the page cache (works without privileges for clean pages)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(fn: Callable[[], Any], repeats: int, before: Callable[[], None] | None = None) -> list[float]:
    times = []
    for _ in range(repeats):
        if before:
            before()
        gc.collect()
        t = time.perf_counter()
        keep = fn()
        times.append(time.perf_counter() - t)
        del keep
    return times


def runner_switches(runner: Runner, a: str, b: str, repeats: int) -> tuple[list[float], list[float], set[str]]:
    """Alternate A and B; returns (seconds to A, seconds to B, tiers seen)."""
    to_a, to_b, tiers = [], [], set()
    for _ in range(repeats):
        for url, out in ((a, to_a), (b, to_b)):
            prep = runner.prepare(Request(model=url, prompt="x"))
            runner.release(prep)
            out.append(prep.fetch_s + prep.switch_s)
            tiers |= {t.tier for t in prep.tiers}
            del prep
    return to_a, to_b, tiers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--cluster", action="store_true", help="also measure fetching from warm cache nodes")
    ap.add_argument("--dir", help="where to write the two models (default: a temporary folder)")
    args = ap.parse_args()
    dtype = torch.float16
    import diffusers

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        single, folder = write_models(root, dtype)
        size = single.stat().st_size
        print(f"# SD1.5 architecture, random weights, fp16: {size / 1e9:.2f} GB per model; "
              f"written in {time.perf_counter() - t:.0f}s; cpu, {torch.get_num_threads()} threads", flush=True)
        rows: list[tuple[str, list[float], str]] = []

        # sdcache, host-RAM tier
        drop_page_cache(root)
        runner = Runner(device="cpu", dtype="fp16", optimize=False, device_budget=0)
        first_a = runner.prepare(Request(model=str(single), prompt="x"))
        runner.release(first_a)
        first_b = runner.prepare(Request(model=str(folder), prompt="x"))
        runner.release(first_b)
        rows.append(("sdcache, first load (disk, cold cache)",
                     [first_a.fetch_s + first_a.switch_s, first_b.fetch_s + first_b.switch_s], "disk"))
        del first_a, first_b
        to_a, to_b, tiers = runner_switches(runner, str(single), str(folder), args.repeats)
        rows.append(("sdcache switch to single file, host-RAM tier", to_a, "/".join(sorted(tiers))))
        rows.append(("sdcache switch to folder, host-RAM tier", to_b, "/".join(sorted(tiers))))
        del runner
        gc.collect()

        def from_single() -> Any:
            return diffusers.StableDiffusionPipeline.from_single_file(
                str(single), config=str(folder), torch_dtype=dtype, local_files_only=True,
                safety_checker=None, requires_safety_checker=False)

        def from_folder() -> Any:
            return diffusers.StableDiffusionPipeline.from_pretrained(
                str(folder), torch_dtype=dtype, local_files_only=True, safety_checker=None,
                requires_safety_checker=False)

        rows.append(("diffusers from_single_file, disk (page cache warm)", measure(from_single, args.repeats), "disk"))
        rows.append(("diffusers from_single_file, disk (cold)",
                     measure(from_single, args.repeats, lambda: drop_page_cache(root)), "disk"))
        rows.append(("diffusers from_pretrained, disk (page cache warm)", measure(from_folder, args.repeats), "disk"))
        rows.append(("diffusers from_pretrained, disk (cold)",
                     measure(from_folder, args.repeats, lambda: drop_page_cache(root)), "disk"))

        if args.cluster:
            rows += cluster_rows(root, single, folder, args.repeats)

    print()
    print(f"{'base model switch (UNet+VAE+text encoder ready)':<54}{'median s':>9}{'min s':>8}{'max s':>8}  served by")
    for name, times, tier in rows:
        print(f"{name:<54}{statistics.median(times):>9.3f}{min(times):>8.3f}{max(times):>8.3f}  {tier}")
    ours = statistics.median(rows[1][1] + rows[2][1])
    disk = {name: statistics.median(times) for name, times, _ in rows[3:7]}
    best = min(disk.values())
    print(f"speedup of the host-RAM tier: {best / ours:.1f}x vs the fastest diffusers load "
          f"({min(disk, key=disk.get)}), {max(disk.values()) / ours:.1f}x vs the slowest")
    return 0


def cluster_rows(root: Path, single: Path, folder: Path, repeats: int) -> list[tuple[str, list[float], str]]:
    from sdcache.cluster import LocalCluster

    pool = tempfile.mkdtemp(prefix="sdcache-bench-pool-", dir="/dev/shm")
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    cluster = LocalCluster(str(root / "meta"), nodes=2, capacity=int(size * 0.75) + (256 << 20), pool_root=pool)
    rows = []
    with cluster:
        os.environ["SDCACHE_TOKEN"] = cluster.admin_token  # as a user exports theirs
        meta = cluster.meta_addr

        def cli(*a: str) -> None:
            subprocess.run([sys.executable, "-m", "sdcache", "--meta", meta, *a], check=True,
                           capture_output=True, timeout=900)

        cli("import", str(single), "/bench/")
        cli("import", "-r", str(folder), "/bench/base-b/")
        cli("warmup", "/bench/", "-r")
        runner = Runner(device="cpu", dtype="fp16", optimize=False, device_budget=0, host_budget=0, meta=meta)
        a, b = f"sdcache://bench/{single.name}", "sdcache://bench/base-b"
        runner_switches(runner, a, b, 1)  # first pass: connections, manifests
        to_a, to_b, tiers = runner_switches(runner, a, b, repeats)
        rows.append(("sdcache switch to single file, warm cache nodes", to_a, "/".join(sorted(tiers))))
        rows.append(("sdcache switch to folder, warm cache nodes", to_b, "/".join(sorted(tiers))))
    subprocess.run(["rm", "-rf", pool], check=False)
    return rows


if __name__ == "__main__":
    sys.exit(main())
