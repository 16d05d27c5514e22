"""The test bed of ``bench_serving.py``: generated models, a one-node cluster, ``serve``/``gateway`` processes.

Models are written once under the work folder: SD1.5-sized checkpoints (the
shipped SD1.5 configs, random weights, fp16, original single-file layout) that
share one VAE and text encoder, so those chunks dedup in the pool, and rank-32
kohya LoRAs; or, for ``--quick``, tiny models of the same structure
(:mod:`sdcache.kernels.tiny`). A :class:`MemorySampler` records the peak of
our processes' private memory plus the pool's bytes, and stops the run before
the shared host runs out.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

USER, PASSWORD = "bench", "bench-pass"
AUTH = (USER, PASSWORD)
READY_TIMEOUT = 300.0
GUARD = 768 << 20  # bytes of available memory under which the run stops itself


# --------------------------------------------------------------------------- configuration


@dataclass
class Config:
    quick: bool
    workdir: Path
    bases: int
    loras: int
    size: int
    steps: int
    dtype: str
    optimize: bool
    threads: int
    pool: int  # bytes, the one node's capacity
    host_budget: int
    device_budget: int
    max_queue: int
    requests: int
    rate: float
    zipf: float
    seed: int
    warmup: float
    overhead_rounds: int
    policies: tuple[str, ...]

# --------------------------------------------------------------------------- models


@dataclass
class Models:
    bases: list[Path]
    loras: list[Path]

    @property
    def names(self) -> tuple[list[str], list[str]]:
        return [p.stem for p in self.bases], [p.stem for p in self.loras]


def _random_module(comp: str, seed: int, dtype: Any) -> Any:
    import torch

    from sdcache.kernels.tiny import random_module

    return random_module("sd1", comp, dtype, torch.Generator().manual_seed(seed))


def write_models(cfg: Config) -> Models:
    """The bases and LoRAs under the work folder (written once; a ``done`` file marks a complete set)."""
    import torch
    from safetensors.torch import save_file

    from sdcache.kernels.original_layout import original_layout
    from sdcache.kernels.tiny import build_tiny, kohya_lora

    root = cfg.workdir / "models"
    models = Models([root / f"base-{i:02d}.safetensors" for i in range(cfg.bases)],
                    [root / f"style-{j:02d}.safetensors" for j in range(cfg.loras)])
    done = root / f"done-{cfg.bases}-{cfg.loras}"
    if done.exists():
        return models
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if cfg.quick:
        shared = build_tiny("sd1", 0)
        unets = lambda i: build_tiny("sd1", 100 + i)["unet"]  # noqa: E731
        rank, std = 4, 0.3
    else:
        half = torch.float16
        shared = {"vae": _random_module("vae", 1, half), "text_encoder": _random_module("text_encoder", 2, half)}
        unets = lambda i: _random_module("unet", 100 + i, half)  # noqa: E731
        rank, std = 32, 0.01
    for i, path in enumerate(models.bases):
        unet = unets(i)
        comps = {**shared, "unet": unet}
        save_file(original_layout("sd1", comps), str(path), metadata={"format": "pt"})
        if i == 0:
            for j, lp in enumerate(models.loras):
                sd = kohya_lora("sd1", comps, seed=200 + j, rank=rank, alpha=rank / 2, std=std)
                save_file({k: (v.half() if v.ndim >= 2 else v).contiguous() for k, v in sd.items()}, str(lp))
        del unet, comps
        gc.collect()
        print(f"#   wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB)", flush=True)
    done.write_text("")
    print(f"# models written in {time.perf_counter() - t0:.0f}s", flush=True)
    return models


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """One ``sdcache serve`` or ``gateway`` subprocess, ready once ``/readyz`` says so."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""

    @property
    def ready_file(self) -> Path:
        return self.log_path.with_suffix(".ready")

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> Proc:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*self.argv, "--ready-file", str(self.ready_file)], stdout=log,
                                         stderr=log, env={**os.environ, **self.env}, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            if not self.address and self.ready_file.exists():
                self.address = self.ready_file.read_text().strip()
            if self.address:
                try:
                    if requests.get(self.url + "/readyz", timeout=5).status_code == 200:
                        return
                except requests.RequestException:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


class Bench:
    """The cluster, the imported models and the processes of one benchmark run."""

    def __init__(self, cfg: Config, models: Models) -> None:
        from sdcache.cluster import LocalCluster

        self.cfg = cfg
        self.models = models
        self.logs = cfg.workdir / "logs"
        shutil.rmtree(cfg.workdir / "cluster", ignore_errors=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pool_root = tempfile.mkdtemp(prefix="sdcache-bench-serving-", dir="/dev/shm")
        self.cluster = LocalCluster(str(cfg.workdir / "cluster"), nodes=1, capacity=cfg.pool, pool_root=self.pool_root)
        self.procs: list[Proc] = []
        self.sizes: dict[str, int] = {}

    def start(self) -> None:
        from sdcache.client.importer import import_file
        from sdcache.client.metaclient import MetaClient

        self.cluster.start()
        os.environ["SDCACHE_TOKEN"] = self.cluster.admin_token  # this process's runner and clients, as a user's
        admin = MetaClient(self.cluster.meta_addr, credentials=self.cluster.credentials)
        try:
            for p in self.models.bases:
                import_file(admin, str(p), f"/models/checkpoints/{p.name}")
                self.sizes[p.stem] = p.stat().st_size
            for p in self.models.loras:
                import_file(admin, str(p), f"/models/loras/{p.name}")
                self.sizes[p.stem] = p.stat().st_size
        finally:
            admin.close()

    @property
    def meta(self) -> str:
        return self.cluster.meta_addr

    def serve(self, name: str) -> Proc:
        c = self.cfg
        argv = [sys.executable, "-m", "sdcache", "serve", "--listen", "127.0.0.1:0", "--meta", self.meta,
                "--runner-id", name, "--api-auth", f"{USER}:{PASSWORD}", "--device", "cpu", "--dtype", c.dtype,
                "--threads", str(c.threads), "--host-budget", str(c.host_budget),
                "--device-budget", str(c.device_budget), "--max-queue", str(c.max_queue),
                *([] if c.optimize else ["--no-optimize"])]
        return self._proc(name, argv)

    def gateway(self, policy: str) -> Proc:
        argv = [sys.executable, "-m", "sdcache", "gateway", "--listen", "127.0.0.1:0", "--meta", self.meta,
                "--policy", policy, "--api-auth", f"{USER}:{PASSWORD}", "--refresh-interval", "0.2"]
        return self._proc(f"gateway-{policy}", argv)

    def _proc(self, name: str, argv: list[str]) -> Proc:
        p = Proc(name, argv, self.logs / f"{name}.log", {"SDCACHE_TOKEN": self.cluster.admin_token})
        self.procs.append(p)
        return p.start()

    def stop_procs(self) -> None:
        for p in self.procs:
            p.stop()
        self.procs = []

    def reset_pool(self) -> None:
        """Empty the pool and drop the under-store files from the page cache: every policy starts cold."""
        subprocess.run([sys.executable, "-m", "sdcache", "--meta", self.meta, "evict", "-q", "-r", "/models"],
                       check=True, capture_output=True, timeout=300, env={**os.environ})
        for p in [*self.models.bases, *self.models.loras]:
            fd = os.open(p, os.O_RDONLY)  # this file only: drop_caches would flush the other users' caches too
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def pool_bytes(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.pool_root):
            for f in files:
                try:
                    total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
                except OSError:
                    pass
        return total

    def close(self) -> None:
        self.stop_procs()
        self.cluster.stop()
        shutil.rmtree(self.pool_root, ignore_errors=True)


class MemorySampler:
    """Peaks, sampled every *interval* s: this host's used memory and our processes' RSS plus the pool."""

    def __init__(self, bench: Bench, interval: float = 0.5) -> None:
        self.bench = bench
        self.interval = interval
        self.peak_ours = 0
        self.peak_used = 0
        self.peaks: dict[str, int] = {}  # private bytes per process name, and "pool"
        self.base_used = _host_used()
        self.tripped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            named = {"bench": os.getpid()} | {p.name: p.proc.pid for p in self.bench.procs
                                              if p.proc and p.proc.poll() is None}
            named |= {c.name: c.proc.pid for c in [self.bench.cluster.meta, *self.bench.cluster.node_children]
                      if c is not None and c.proc is not None}
            sizes = {name: _anon_rss(pid) for name, pid in named.items()} | {"pool": self.bench.pool_bytes()}
            for name, n in sizes.items():
                self.peaks[name] = max(self.peaks.get(name, 0), n)
            ours = sum(sizes.values())
            self.peak_ours = max(self.peak_ours, ours)
            self.peak_used = max(self.peak_used, _host_used())
            if _host_total() - _host_used() < GUARD and not self.tripped:  # the host is shared: never its OOM killer
                self.tripped = True
                print(f"# memory guard: under {GUARD >> 20} MiB available, stopping the serve processes",
                      flush=True)
                for p in list(self.bench.procs):
                    if p.proc is not None and p.proc.poll() is None:
                        os.killpg(p.proc.pid, signal.SIGKILL)


def _anon_rss(pid: int) -> int:
    """Private resident bytes of *pid* (RssAnon: not the pool's shared pages, which are counted once)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _meminfo() -> dict[str, int]:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
    return info


def _host_used() -> int:
    info = _meminfo()
    return info["MemTotal"] - info["MemAvailable"]


def _host_total() -> int:
    return _meminfo()["MemTotal"]
