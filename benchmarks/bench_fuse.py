"""FUSE mount vs the fsspec client, measured in the same run on the same files.

Starts a one-host cluster (3 nodes), writes and imports (warm) a ~1 GiB and a
~2 GiB SD-shaped checkpoint, mounts the cache, then measures:

- sequential read of the 1 GiB file: ``dd bs=4M`` on the mount (kernel page
  cache dropped for the file) vs the fsspec client reading 4 MiB blocks, and,
  for scale, vs a pyfuse3 file system whose handler returns ready bytes;
- the same ``dd`` again, served from the kernel page cache;
- ``safetensors.safe_open`` on the mount touching every page of every tensor
  of the 2 GiB checkpoint vs ``load_safetensors("sdcache://...")``;
- ``ls -l`` of a directory of 10,000 files (first and repeated listing).

Each measurement runs ``--repeat`` times, interleaved; the table shows the
best and the median, and compares each round with its own reference (the
machine may be shared). CPU seconds per GiB show the cost apart from the
noise. Usage: ``python benchmarks/bench_fuse.py [--quick]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from sdcache.cluster import LocalCluster
from sdcache.manifest import Manifest
from sdcache.synth import write_sd_checkpoint

GiB = 1 << 30


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


def dd(path: str) -> float:
    """Seconds ``dd bs=4M`` takes to read *path* to /dev/null."""
    t = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M"], check=True, capture_output=True)
    return time.perf_counter() - t


def fsspec_read(meta: str, path: str) -> float:
    from sdcache.client.fs import SdcacheFileSystem

    fs = SdcacheFileSystem(meta=meta)
    buf = bytearray(4 << 20)
    t = time.perf_counter()
    with fs.open(path, "rb") as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


SAFE_OPEN = """
import sys, time, torch
from safetensors import safe_open
t = time.perf_counter()
with safe_open(sys.argv[1], framework="pt") as f:
    for k in f.keys():
        v = f.get_tensor(k).reshape(-1).view(torch.uint8)
        int(v[::4096].sum()) if v.numel() else None   # fault in every page of the tensor
print(time.perf_counter() - t)
"""

LOAD = """
import sys, time, torch
from sdcache.client import load_safetensors
t = time.perf_counter()
d = load_safetensors(sys.argv[1], meta=sys.argv[2])
print(time.perf_counter() - t)
"""


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
    Python can deliver on this machine, for scale."""

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

    def read(self) -> tuple[float, float]:
        """(seconds, CPU seconds of daemon + dd) for one dd of the whole file, page cache dropped."""
        drop_page_cache(self.path)
        c0 = _children_cpu() + _proc_cpu(self.proc.pid)
        secs = dd(self.path)
        return secs, _children_cpu() + _proc_cpu(self.proc.pid) - c0

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def python_seconds(code: str, *args: str) -> float:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


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


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(xs: list[float]) -> tuple[float, float]:
    return min(xs), statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-scale", type=float, default=0.5, help="synth scale of the sequential file (~1 GiB)")
    ap.add_argument("--st-scale", type=float, default=1.0, help="synth scale of the safetensors file (~2 GiB)")
    ap.add_argument("--files", type=int, default=10_000, help="files in the listed directory")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small files, one repeat (a smoke test)")
    ap.add_argument("--workdir", default="", help="where to put the files (default: a temporary directory)")
    args = ap.parse_args()
    if args.quick:
        args.seq_scale, args.st_scale, args.files, args.repeat = 0.05, 0.1, 2000, 1
    if not os.path.exists("/dev/fuse"):
        print("bench_fuse: /dev/fuse is missing; nothing to measure", file=sys.stderr)
        return 1

    work = args.workdir or tempfile.mkdtemp(prefix="sdcache-bench-fuse-")
    os.makedirs(work, exist_ok=True)
    pool_root = tempfile.mkdtemp(prefix="sdcache-bench-pool-", dir="/dev/shm")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    seq_src, st_src = os.path.join(work, "seq.safetensors"), os.path.join(work, "st.safetensors")
    rows: list[tuple[str, str, str, str, str]] = []
    ceiling: Ceiling | None = None
    cluster = LocalCluster(os.path.join(work, "meta"), nodes=3, capacity=3 * GiB // 2, pool_root=pool_root)
    try:
        cluster.start()
        os.environ["SDCACHE_TOKEN"] = cluster.admin_token  # as a user exports theirs
        meta = cluster.meta_addr
        t = time.perf_counter()
        seq_size = write_sd_checkpoint(seq_src, args.seq_scale, unet_seed=1)
        st_size = write_sd_checkpoint(st_src, args.st_scale, unet_seed=2, shared_seed=7)
        print(f"wrote {seq_size / GiB:.2f} GiB + {st_size / GiB:.2f} GiB in {time.perf_counter() - t:.0f}s",
              flush=True)
        sdcache("import", "--warm", "-q", seq_src, "/bench/seq.safetensors", meta=meta)
        sdcache("import", "--warm", "-q", st_src, "/bench/st.safetensors", meta=meta)
        commit_many(meta, "/bench/loras", args.files)
        print(f"imported and warmed; {args.files} files committed", flush=True)

        out = sdcache("mount", mnt, "--log", os.path.join(work, "mount.log"), meta=meta).strip()
        print(out, flush=True)
        daemon = int(re.search(r"pid (\d+)", out).group(1))  # type: ignore[union-attr]
        seq_path, st_path = os.path.join(mnt, "bench/seq.safetensors"), os.path.join(mnt, "bench/st.safetensors")
        with open(f"/sys/class/bdi/{_bdi(mnt)}/read_ahead_kb") as f:
            print(f"mount read_ahead_kb = {f.read().strip()}", flush=True)

        client_s, mount_s, cached_s, so_s, load_s, ls_again = [], [], [], [], [], []
        client_cpu, mount_cpu, ceil_s, ceil_cpu = [], [], [], []
        ceiling = Ceiling(work, seq_size)
        ls_first, count = ls_l(os.path.join(mnt, "bench/loras"))
        for r in range(args.repeat):
            c0 = _own_cpu()
            client_s.append(fsspec_read(meta, "/bench/seq.safetensors"))
            client_cpu.append(_own_cpu() - c0)
            drop_page_cache(seq_path)
            c0 = _children_cpu() + _proc_cpu(daemon)
            mount_s.append(dd(seq_path))
            mount_cpu.append(_children_cpu() + _proc_cpu(daemon) - c0)
            cached_s.append(dd(seq_path))
            secs, cpu = ceiling.read()
            ceil_s.append(secs)
            ceil_cpu.append(cpu)
            load_s.append(python_seconds(LOAD, "sdcache://bench/st.safetensors", meta))
            drop_page_cache(st_path)
            so_s.append(python_seconds(SAFE_OPEN, st_path))
            ls_again.append(ls_l(os.path.join(mnt, "bench/loras"))[0])
            print(f"  round {r + 1}: fsspec {seq_size / client_s[-1] / 1e9:.2f} GB/s, "
                  f"mount {seq_size / mount_s[-1] / 1e9:.2f} GB/s, "
                  f"page cache {seq_size / cached_s[-1] / 1e9:.2f} GB/s, "
                  f"pyfuse3 ceiling {seq_size / ceil_s[-1] / 1e9:.2f} GB/s, "
                  f"safe_open {so_s[-1]:.2f}s vs load_safetensors {load_s[-1]:.2f}s, ls -l {ls_again[-1]:.2f}s",
                  flush=True)

        gbps: Callable[[float], float] = lambda s: seq_size / s / 1e9  # noqa: E731
        (cb, cm), (mb, mm), (pb, pm) = summary(client_s), summary(mount_s), summary(cached_s)
        seq_ratio = statistics.median(c / m for c, m in zip(client_s, mount_s))
        rows.append(("fsspec client, sequential 4 MiB reads", f"{gbps(cb):.2f} GB/s", f"{gbps(cm):.2f} GB/s",
                     "reference", ""))
        rows.append(("mount, dd bs=4M (warm pool, cold page cache)", f"{gbps(mb):.2f} GB/s", f"{gbps(mm):.2f} GB/s",
                     f"{seq_ratio:.2f}x fsspec", ">= 0.5x (aim 0.8x)"))
        gib = seq_size / GiB
        rows.append(("  CPU seconds per GiB: fsspec client", f"{min(client_cpu) / gib:.2f} s", "", "", ""))
        rows.append(("  CPU seconds per GiB: mount daemon + dd", f"{min(mount_cpu) / gib:.2f} s", "",
                     f"{min(mount_cpu) / min(client_cpu):.2f}x fsspec", ""))
        (eb, em) = summary(ceil_s)
        ceil_ratio = statistics.median(c / e for c, e in zip(client_s, ceil_s))
        rows.append(("pyfuse3 ceiling: handler returning ready bytes", f"{gbps(eb):.2f} GB/s", f"{gbps(em):.2f} GB/s",
                     f"{ceil_ratio:.2f}x fsspec", "(for scale)"))
        rows.append(("  CPU seconds per GiB: ceiling daemon + dd", f"{min(ceil_cpu) / gib:.2f} s", "", "", ""))
        rows.append(("mount, dd bs=4M again (kernel page cache)", f"{gbps(pb):.2f} GB/s", f"{gbps(pm):.2f} GB/s",
                     "", ">= 2 GB/s"))
        (lb, lm), (sb, sm) = summary(load_s), summary(so_s)
        so_ratio = statistics.median(so / ld for so, ld in zip(so_s, load_s))
        rows.append((f"load_safetensors(sdcache://), {st_size / GiB:.1f} GiB", f"{lb:.2f} s", f"{lm:.2f} s",
                     "reference", ""))
        rows.append(("safe_open on the mount, every tensor", f"{sb:.2f} s", f"{sm:.2f} s",
                     f"{so_ratio:.2f}x load_safetensors", "<= 2x"))
        rows.append((f"ls -l of {count} files, first listing", f"{ls_first:.2f} s", "", "", "< 1 s"))
        ab, am = summary(ls_again)
        rows.append((f"ls -l of {count} files, again", f"{ab:.2f} s", f"{am:.2f} s", "", "< 1 s"))
    finally:
        if ceiling is not None:
            ceiling.close()
        if os.path.ismount(mnt):
            subprocess.run([sys.executable, "-m", "sdcache", "umount", "--lazy", mnt], capture_output=True)
        cluster.stop()
        shutil.rmtree(pool_root, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'measure':<50} {'best':>11} {'median':>11}  {'comparison (median round)':<26} target")
    print("-" * 114)
    for name, best, med, cmp_, target in rows:
        print(f"{name:<50} {best:>11} {med:>11}  {cmp_:<26} {target}")
    print(f"\n{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the end")
    return 0


def _bdi(mountpoint: str) -> str:
    """major:minor of the mount, naming its /sys/class/bdi entry."""
    found = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                found = fields[2]
    return found


if __name__ == "__main__":
    raise SystemExit(main())
