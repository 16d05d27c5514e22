"""FUSE mount vs the fsspec client and vs local files, measured in the same run on the same files.

Starts a one-host cluster (3 nodes), writes and imports (warm) a ~1 GiB
SD-shaped checkpoint (``sdcache.synth``), a real-architecture SD1 checkpoint
with random weights (~2 GiB, built from the shipped diffusers configs; never a
hub download) and a ~1 GiB ``.ckpt`` zip pickle, mounts the cache twice
(default: chunks pushed into the kernel page cache ahead of readers; and
``--push-memory 0``: every read a FUSE request), then, in interleaved rounds:

- ``dd bs=4M`` of the 1 GiB file, warm pool, cold page cache, on both mounts,
  vs the fsspec client reading 4 MiB blocks, and vs a pyfuse3 file system
  whose handler returns ready bytes (the request-path ceiling, for scale);
- the loaders users run, each touching every page of every tensor, over the
  mount (page cache dropped, then warm) vs the same call on the local file in
  the page cache vs ``load_safetensors("sdcache://...")`` of the same model:
  ``safe_open`` (every tensor), ``safetensors.torch.load_file``, diffusers'
  ``StableDiffusionPipeline.from_single_file`` and ``torch.load`` of the
  ``.ckpt`` (whose reference is ``load_safetensors`` of the same tensors);
- ``ls -l`` of a directory of 10,000 files.

Every row shows the median over rounds (best beside it) and the median of the
per-round ratios to its reference, plus CPU seconds per GiB of daemon and
reader together and, for loaders, their minor page faults per GiB (each one
maps pages already in the page cache: how many a load takes depends on the
size of the page-cache folios, not on sdcache); the load average is printed
per round. Usage:
``python benchmarks/bench_fuse.py [--repeat 3] [--quick] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import load_average  # noqa: E402

from sdcache.cluster import LocalCluster  # noqa: E402
from sdcache.manifest import Manifest  # noqa: E402
from sdcache.synth import write_sd_checkpoint  # noqa: E402

GiB = 1 << 30
CHILD_ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
             "TOKENIZERS_PARALLELISM": "false"}


# -- helpers ------------------------------------------------------------------------------------
def sdcache(*args: str, meta: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "sdcache", "--meta", meta, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sdcache {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def drop_page_cache(path: str) -> None:
    """Forget the kernel's cached pages of *path* (works on the FUSE mount, needs no root)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_page_cache(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bdi(mountpoint: str) -> str:
    """major:minor of the mount, naming its /sys/class/bdi entry."""
    found = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                found = fields[2]
    return found


@dataclass
class Sample:
    seconds: float
    cpu: float  # CPU seconds of the reader plus the daemon serving it
    faults: int = -1  # minor page faults of a loader (mapping pages already in the page cache); -1: not counted


@dataclass
class Row:
    name: str
    size: int  # bytes the measure reads
    references: tuple[str, ...] = ()  # names of the rows it is compared with, round by round
    target: str = ""
    samples: list[Sample] = field(default_factory=list)


class Daemons:
    """The daemon processes whose CPU time counts with a reader's (pids of the mounts and the ceiling)."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def cpu(self) -> float:
        return sum(_proc_cpu(p) for p in self.pids)


def measure(daemons: Daemons, fn, *args) -> Sample:
    """Wall and CPU seconds of ``fn(*args)`` and of the daemons meanwhile.

    A loader run in a child process reports its own (seconds, CPU seconds) of
    the load, without the interpreter's start; other work is timed here, its
    CPU being this process's and its children's.
    """
    c0, d0, s0 = _children_cpu(), daemons.cpu(), _own_cpu()
    t = time.perf_counter()
    inner = fn(*args)
    wall = time.perf_counter() - t
    daemon = daemons.cpu() - d0
    if isinstance(inner, tuple):
        return Sample(inner[0], inner[1] + daemon, inner[2])
    return Sample(wall, _children_cpu() - c0 + _own_cpu() - s0 + daemon)


def dd(path: str) -> None:
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M"], check=True, capture_output=True)


def fsspec_read(meta: str, path: str) -> None:
    from sdcache.client.fs import SdcacheFileSystem

    fs = SdcacheFileSystem(meta=meta)
    buf = bytearray(4 << 20)
    with fs.open(path, "rb") as f:
        while f.readinto(buf):
            pass


# Each loader runs in a fresh process (as a server would load a model), touches one element per 4 KiB
# page of every tensor (so "loaded" means the same for lazy and eager loaders) and prints its seconds.
TOUCH = """
import resource, sys, time, torch
def touch(tensors):
    for t in tensors:
        flat = t.reshape(-1)
        if flat.numel():
            flat[:: max(1, 4096 // t.element_size())].sum()
t0, c0 = time.perf_counter(), time.process_time()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def done():
    print(time.perf_counter() - t0, time.process_time() - c0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""
LOADERS = {
    "safe_open": TOUCH + """
from safetensors import safe_open
with safe_open(sys.argv[1], framework="pt") as f:
    touch(f.get_tensor(k) for k in f.keys())
done()
""",
    "load_file": TOUCH + """
from safetensors.torch import load_file
touch(load_file(sys.argv[1]).values())
done()
""",
    "from_single_file": TOUCH + """
from diffusers import StableDiffusionPipeline
p = StableDiffusionPipeline.from_single_file(sys.argv[1], config=sys.argv[2], local_files_only=True,
                                             torch_dtype=torch.float16, safety_checker=None)
touch(t for m in (p.unet, p.vae, p.text_encoder) for t in m.state_dict().values())
done()
""",
    "torch.load": TOUCH + """
touch(torch.load(sys.argv[1], map_location="cpu", weights_only=True)["state_dict"].values())
done()
""",
    "load_safetensors": TOUCH + """
from sdcache.client import load_safetensors
touch(load_safetensors(sys.argv[1], meta=sys.argv[2]).values())
done()
""",
}


def run_loader(kind: str, *args: str) -> tuple[float, float, int]:
    """(seconds, CPU seconds, minor page faults) of one load in a fresh process, as the loader measured them."""
    proc = subprocess.run([sys.executable, "-c", LOADERS[kind], *args], capture_output=True, text=True, env=CHILD_ENV)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {args[0]} failed: {proc.stderr.strip()[-2000:]}")
    secs, cpu, faults = proc.stdout.strip().splitlines()[-1].split()
    return float(secs), float(cpu), int(faults)


CEILING = """
import errno, os, stat, sys, pyfuse3, trio
SIZE = int(sys.argv[2])
BUF = memoryview(bytearray(os.urandom(1 << 20)))
class Ops(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.attr_timeout, a.entry_timeout = inode, 300, 300
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o555, 2
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, SIZE
        return a
    async def lookup(self, parent, name, ctx=None):
        if name != b"f":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(2)
    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=2, keep_cache=True)
    async def read(self, fh, off, size):
        return BUF[: max(0, min(size, SIZE - off))]
    async def release(self, fh):
        pass
pyfuse3.init(Ops(), sys.argv[1], {"ro", "fsname=ceiling"})
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close()
"""


class Ceiling:
    """A pyfuse3 file system whose read handler returns ready bytes: the most any FUSE daemon in
    Python answering requests can deliver on this machine, for scale."""

    def __init__(self, work: str, size: int) -> None:
        self.mnt = os.path.join(work, "ceiling")
        os.makedirs(self.mnt, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", CEILING, self.mnt, str(size)])
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench_fuse: the ceiling file system did not mount")
            time.sleep(0.02)
        try:
            with open(f"/sys/class/bdi/{_bdi(self.mnt)}/read_ahead_kb", "w") as f:
                f.write("4096")
        except OSError:
            pass
        self.path = os.path.join(self.mnt, "f")

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ls_l(path: str) -> tuple[float, int]:
    t = time.perf_counter()
    out = subprocess.run(["ls", "-l", path], capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - t, len(out.splitlines()) - 1


def commit_many(meta_addr: str, directory: str, n: int) -> None:
    from sdcache.client.metaclient import MetaClient

    meta = MetaClient(meta_addr)
    empty = hashlib.sha256(b"").hexdigest()

    def one(i: int) -> None:
        meta.commit(Manifest(f"{directory}/lora-{i:05d}.safetensors", 0, time.time(), "", "", empty, [],
                             kind="lora"))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))


# -- the models -------------------------------------------------------------------------------
WRITE_SD1 = """
import gc, json, os, sys, torch
from safetensors.torch import save_file
from sdcache.kernels.families import family
from sdcache.kernels.original_layout import original_layout
from sdcache.kernels.tiny import random_module
from sdcache.kernels.tokenizer import clip_tokenizer
path, folder = sys.argv[1], sys.argv[2]
f = family("sd1")
g = torch.Generator().manual_seed(5)
comps = {comp: random_module("sd1", comp, torch.float16, g) for comp in f.components}
save_file(original_layout("sd1", comps), path)
# the diffusers config folder from_single_file reads its configs from (configs only: no weights)
index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
         "safety_checker": [None, None], "feature_extractor": [None, None],
         "tokenizer": ["transformers", "CLIPTokenizer"]}
for comp in ("unet", "vae", "text_encoder", "scheduler"):
    cfg = f.config(comp)
    os.makedirs(os.path.join(folder, comp), exist_ok=True)
    with open(os.path.join(folder, comp, "scheduler_config.json" if comp == "scheduler" else "config.json"), "w") as fh:
        json.dump(cfg, fh)
    cls = cfg.get("_class_name") or cfg["architectures"][0]
    index[comp] = ["transformers" if comp == "text_encoder" else "diffusers", cls]
clip_tokenizer().save_pretrained(os.path.join(folder, "tokenizer"))
with open(os.path.join(folder, "model_index.json"), "w") as fh:
    json.dump(index, fh)
"""

WRITE_CKPT = """
import sys, torch
from safetensors.torch import load_file
torch.save({"state_dict": load_file(sys.argv[1])}, sys.argv[2])
"""


def write_models(work: str, quick: bool) -> dict[str, str]:
    """Local source files (kept in *work* between runs): seq, model (+ its config folder), ckpt."""
    files = {"seq": os.path.join(work, "seq.safetensors"), "model": os.path.join(work, "sd1.safetensors"),
             "folder": os.path.join(work, "sd1-configs"), "ckpt": os.path.join(work, "seq.ckpt")}
    if quick:
        files["model"] = os.path.join(work, "model-quick.safetensors")
        files["ckpt"] = os.path.join(work, "seq-quick.ckpt")
        files["seq"] = os.path.join(work, "seq-quick.safetensors")
    t = time.perf_counter()
    if not os.path.exists(files["seq"]):
        write_sd_checkpoint(files["seq"], 0.05 if quick else 0.5, unet_seed=1)
    if not os.path.exists(files["model"]):
        if quick:
            write_sd_checkpoint(files["model"], 0.1, unet_seed=2, shared_seed=7)
        else:
            subprocess.run([sys.executable, "-c", WRITE_SD1, files["model"], files["folder"]], check=True,
                           env=CHILD_ENV)
    if not os.path.exists(files["ckpt"]):
        subprocess.run([sys.executable, "-c", WRITE_CKPT, files["seq"], files["ckpt"]], check=True, env=CHILD_ENV)
    print(f"models ready in {time.perf_counter() - t:.0f}s: " + ", ".join(
        f"{k} {os.path.getsize(v) / GiB:.2f} GiB" for k, v in files.items() if k != "folder"), flush=True)
    return files


# -- the run --------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000, help="files in the listed directory")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small files, one round, no from_single_file (a smoke test)")
    ap.add_argument("--workdir", default="", help="where to keep the generated models (default: a temporary "
                                                  "directory, removed at the end)")
    ap.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    ap.add_argument("--only", default="dd,loaders,ls", help="comma list of the groups to run: dd, loaders "
                                                           "(add 'single' for from_single_file), ls")
    args = ap.parse_args()
    if args.quick:
        args.files, args.repeat = 2000, 1
    if not os.path.exists("/dev/fuse"):
        print("bench_fuse: /dev/fuse is missing; nothing to measure", file=sys.stderr)
        return 1

    work = args.workdir or tempfile.mkdtemp(prefix="sdcache-bench-fuse-")
    os.makedirs(work, exist_ok=True)
    files = write_models(work, args.quick)
    sizes = {k: os.path.getsize(v) for k, v in files.items() if k != "folder"}
    pool_root = tempfile.mkdtemp(prefix="sdcache-bench-pool-", dir="/dev/shm")
    mnt, plain = os.path.join(work, "mnt"), os.path.join(work, "mnt-requests")
    ceiling: Ceiling | None = None
    daemons = Daemons()
    capacity = max(1 << 30, int(sum(sizes.values()) * 0.5))
    cluster = LocalCluster(os.path.join(work, "meta"), nodes=3, capacity=capacity, pool_root=pool_root)
    rows: dict[str, Row] = {}

    def row(name: str, size: int, *references: str, target: str = "") -> Row:
        return rows.setdefault(name, Row(name, size, references, target))

    loads: list[str] = []
    try:
        cluster.start()
        os.environ["SDCACHE_TOKEN"] = cluster.admin_token  # as a user exports theirs
        CHILD_ENV["SDCACHE_TOKEN"] = cluster.admin_token
        meta = cluster.meta_addr
        for key, dest in (("seq", "/bench/seq.safetensors"), ("model", "/bench/sd1.safetensors"),
                          ("ckpt", "/bench/seq.ckpt")):
            sdcache("import", "--warm", "-q", files[key], dest, meta=meta)
        commit_many(meta, "/bench/loras", args.files)
        print(f"imported and warmed; {args.files} files committed", flush=True)
        for mp, extra in ((mnt, []), (plain, ["--push-memory", "0"])):
            os.makedirs(mp, exist_ok=True)
            out = sdcache("mount", mp, "--log", mp + ".log", *extra, meta=meta).strip()
            daemons.pids.append(int(re.search(r"pid (\d+)", out).group(1)))  # type: ignore[union-attr]
        on = {k: os.path.join(mnt, "bench", os.path.basename(d)) for k, d in
              (("seq", "seq.safetensors"), ("model", "sd1.safetensors"), ("ckpt", "seq.ckpt"))}
        with open(f"/sys/class/bdi/{_bdi(mnt)}/read_ahead_kb") as f:
            print(f"mount read_ahead_kb = {f.read().strip()}", flush=True)
        ceiling = Ceiling(work, sizes["seq"])
        daemons.pids.append(ceiling.proc.pid)
        ls_first, count = ls_l(os.path.join(mnt, "bench/loras"))
        groups = set(args.only.split(","))
        if "loaders" in groups and not args.quick and args.only == "dd,loaders,ls":
            groups.add("single")
        loaders = [] if "loaders" not in groups else (
            ["safe_open", "load_file", "torch.load"] + (["from_single_file"] if "single" in groups else []))
        for r in range(args.repeat):
            loads.append(load_average())
            seq = os.path.join(plain, "bench", "seq.safetensors")
            for name, path in (("mount, dd bs=4M (warm pool, cold page cache)", on["seq"]),
                               ("mount --push-memory 0 (requests only), dd", seq),
                               ("pyfuse3 ceiling (handler returns ready bytes), dd", ceiling.path)):
                if "dd" not in groups:
                    break
                if name.startswith("mount, dd"):
                    row("fsspec client, sequential 4 MiB reads", sizes["seq"]).samples.append(
                        measure(daemons, fsspec_read, meta, "/bench/seq.safetensors"))
                drop_page_cache(path)
                target = ">= 0.5x (aim 0.8x)" if name.startswith("mount, dd") else ""
                row(name, sizes["seq"], "fsspec client, sequential 4 MiB reads", target=target).samples.append(
                    measure(daemons, dd, path))
            if "dd" in groups:
                row("mount, dd again (kernel page cache)", sizes["seq"], "fsspec client, sequential 4 MiB reads",
                    target=">= 2 GB/s").samples.append(measure(daemons, dd, on["seq"]))
            for twin in ("model", "seq") if loaders else ():  # the reference of loaders of the same tensors
                url = f"sdcache://bench/{os.path.basename(on[twin])}"
                row(f"load_safetensors(sdcache://) of {twin}", sizes[twin]).samples.append(
                    measure(daemons, run_loader, "load_safetensors", url, meta))
            for kind in loaders:
                key = "ckpt" if kind == "torch.load" else "model"
                ref = f"load_safetensors(sdcache://) of {'seq' if key == 'ckpt' else 'model'}"
                extra = [files["folder"]] if kind == "from_single_file" else []
                warm_page_cache(files[key])
                local = f"{kind}, local file in the page cache"
                row(local, sizes[key], ref).samples.append(measure(daemons, run_loader, kind, files[key], *extra))
                drop_page_cache(on[key])
                target = {"safe_open": "<= 2x load_safetensors (aim 1.2x)",
                          "load_file": "<= 1.5x local page-cached"}.get(kind, "")
                row(f"{kind}, mount, cold page cache", sizes[key], ref, local, target=target).samples.append(
                    measure(daemons, run_loader, kind, on[key], *extra))
                row(f"{kind}, mount, page cache warm", sizes[key], ref, local, target=target).samples.append(
                    measure(daemons, run_loader, kind, on[key], *extra))
            if "ls" in groups:
                secs, _ = ls_l(os.path.join(mnt, "bench/loras"))
                row(f"ls -l of {count} files, again", 0, target="< 1 s").samples.append(Sample(secs, 0.0))
            print(f"  round {r + 1} done, load average {loads[-1]} -> {load_average()}", flush=True)
        loads.append(load_average())
        rows_ls_first = Sample(ls_first, 0.0)
    finally:
        if ceiling is not None:
            ceiling.close()
        for mp in (mnt, plain):
            if os.path.ismount(mp):
                subprocess.run([sys.executable, "-m", "sdcache", "umount", "--lazy", mp], capture_output=True)
        cluster.stop()
        shutil.rmtree(pool_root, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    report(list(rows.values()), rows, rows_ls_first, count, loads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": loads, "rows": {r.name: [s.__dict__ for s in r.samples] for r in rows.values()}}, f,
                      indent=1)
    return 0


def report(order: list[Row], rows: dict[str, Row], ls_first: Sample, count: int, loads: list[str]) -> None:
    print()
    head = (f"{'measure':<52} {'median':>10} {'best':>10} {'CPU s/GiB':>9} {'faults/GiB':>10}  "
            f"{'vs (median of per-round ratios)':<56} target")
    print(head)
    print("-" * len(head))
    for r in order:
        secs = [s.seconds for s in r.samples]
        med, best = statistics.median(secs), min(secs)
        if r.size and r.name.startswith(("fsspec", "mount, dd", "mount --push", "pyfuse3")):
            fmt = lambda s: f"{r.size / s / 1e9:.2f} GB/s"  # noqa: E731
        else:
            fmt = lambda s: f"{s:.2f} s"  # noqa: E731
        cpu = f"{statistics.median(s.cpu for s in r.samples) / (r.size / GiB):.2f}" if r.size else ""
        counted = [s.faults for s in r.samples if s.faults >= 0]
        faults = f"{statistics.median(counted) / (r.size / GiB):,.0f}" if counted and r.size else ""
        vs = []
        for name in r.references:
            ref = rows[name]
            ratio = statistics.median(s.seconds / q.seconds for s, q in zip(r.samples, ref.samples))
            if fmt(1.0).endswith("GB/s"):
                vs.append(f"{1 / ratio:.2f}x the speed of {ref.name.split(',')[0]}")
            else:
                vs.append(f"{ratio:.2f}x {'load_safetensors' if name.startswith('load_s') else 'local'}")
        print(f"{r.name:<52} {fmt(med):>10} {fmt(best):>10} {cpu:>9} {faults:>10}  "
              f"{'; '.join(vs) or 'reference':<56} {r.target}")
    print(f"{'ls -l of ' + str(count) + ' files, first listing':<52} {ls_first.seconds:>8.2f} s")
    print(f"\n{os.cpu_count()} CPUs; load average (1/5/15 min) at each round's start and at the end: "
          + ", ".join(loads))


if __name__ == "__main__":
    raise SystemExit(main())
