"""Backbone benchmarks (issue: chunked model store), each beside its same-run comparison.

    python benchmarks/bench_backbone.py [--size-gib 1] [--ckpt-gib 2] [--skip-s3]

1. warm 1 GiB read through fsspec from two node processes (HTTP path) vs one plain
   loopback TCP stream of the same bytes;
2. load_safetensors of an SD-shaped checkpoint from warm nodes over HTTP vs
   safetensors.torch.load_file from local disk with the page cache dropped
   (both followed by touching every page: load_file maps lazily);
3. the same from a warm same-host node (short-circuit) vs load_file from the page cache;
4. the same file through s3fs from a local S3 server vs through sdcache (warm) with it as under-store;
5. import of the checkpoint vs a plain sha256 of it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import drop_page_cache, machine, median_time, table, touch_tensors, warm_page_cache  # noqa: E402

from sdcache.client.fs import SdcacheFileSystem  # noqa: E402
from sdcache.client.importer import import_file  # noqa: E402
from sdcache.cluster import LocalCluster  # noqa: E402
from sdcache.synth import write_sd_checkpoint  # noqa: E402

TCP_SERVER = r"""
import socket, sys
data = open(sys.argv[1], 'rb').read()
s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(data)
    c.close()
"""


def tcp_copy(port: int, size: int) -> None:
    buf = bytearray(size)
    mv = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = 0
        while got < size:
            n = s.recv_into(mv[got:], min(size - got, 8 << 20))
            if not n:
                raise EOFError
            got += n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--ckpt-gib", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--s3-mib", type=int, default=256,
                    help="checkpoint size for the S3 comparison (moto copies whole objects per range GET)")
    ap.add_argument("--workdir", default="/tmp/sdcache-bench")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    rows: list[tuple[str, ...]] = []

    blob = os.path.join(args.workdir, f"blob-{args.size_gib}g.bin")
    if not os.path.exists(blob):
        with open(blob, "wb") as f:
            for _ in range(int(args.size_gib * 256)):
                f.write(os.urandom(4 << 20))
    ckpt = os.path.join(args.workdir, f"sd-{args.ckpt_gib}g.safetensors")
    if not os.path.exists(ckpt):
        write_sd_checkpoint(ckpt, args.ckpt_gib * (1 << 30) / 2.07e9)
    blob_size, ckpt_size = os.path.getsize(blob), os.path.getsize(ckpt)

    pool_root = tempfile.mkdtemp(prefix="bench-pool-", dir="/dev/shm")
    cluster = LocalCluster(os.path.join(args.workdir, "cluster"), nodes=2,
                           capacity=int((blob_size + ckpt_size) * 1.2), pool_root=pool_root)
    shutil.rmtree(cluster.data_dir, ignore_errors=True)
    cluster.start()
    os.environ["SDCACHE_TOKEN"] = cluster.admin_token  # as a user exports theirs
    try:
        fs = SdcacheFileSystem(meta=cluster.meta_addr)

        # 5. import vs sha256 (page cache warm for both)
        warm_page_cache(ckpt)

        def sha() -> None:
            h = hashlib.sha256()
            with open(ckpt, "rb", buffering=0) as f:
                b = bytearray(4 << 20)
                while n := f.readinto(b):
                    h.update(memoryview(b)[:n])

        t_sha = median_time(sha, args.repeat)
        t_imp = median_time(lambda: import_file(fs.meta, ckpt, "/bench/ckpt.safetensors"), args.repeat)
        rows.append((f"import {ckpt_size / 2**30:.2f} GiB checkpoint", f"{t_imp:.2f} s", "plain sha256",
                     f"{t_sha:.2f} s", f"{t_imp / t_sha:.2f}x time (<= 1.3x)"))
        import_file(fs.meta, blob, "/bench/blob.bin")
        for _ in fs.meta.warmup(["/bench/blob.bin", "/bench/ckpt.safetensors"]):
            pass

        # 1. warm fsspec read (HTTP) vs single-stream loopback TCP
        srv = subprocess.Popen([sys.executable, "-c", TCP_SERVER, blob], stdout=subprocess.PIPE, text=True)
        port = int(srv.stdout.readline())
        try:
            t_tcp = median_time(lambda: tcp_copy(port, blob_size), args.repeat)
        finally:
            srv.kill()
        fs.fetcher.short_circuit = False

        def fsspec_read() -> None:
            with fs.open("/bench/blob.bin", "rb") as f:
                f.read()

        t_fs = median_time(fsspec_read, args.repeat)
        gbs = lambda t, n: f"{n / t / 1e9:.2f} GB/s"  # noqa: E731
        rows.append((f"fsspec read {blob_size / 2**30:.0f} GiB, 2 nodes, HTTP", gbs(t_fs, blob_size),
                     "loopback TCP single stream", gbs(t_tcp, blob_size), f"{t_tcp / t_fs:.2f}x (>= 0.6x)"))
        fs.fetcher.short_circuit = True
        t_fs_sc = median_time(fsspec_read, args.repeat)
        rows.append(("fsspec read, same host (short-circuit)", gbs(t_fs_sc, blob_size),
                     "loopback TCP single stream", gbs(t_tcp, blob_size), f"{t_tcp / t_fs_sc:.2f}x"))

        # 2./3. load_safetensors vs safetensors.torch.load_file
        import torch  # noqa: F401
        from safetensors.torch import load_file

        from sdcache.client import load_safetensors

        url = "sdcache://bench/ckpt.safetensors"
        fs.fetcher.short_circuit = False
        os.environ["SDCACHE_SHORT_CIRCUIT"] = "0"
        t_http = median_time(lambda: touch_tensors(load_safetensors(url, meta=cluster.meta_addr)), args.repeat)
        t_cold = median_time(lambda: touch_tensors(load_file(ckpt)), args.repeat, setup=lambda: drop_page_cache(ckpt))
        rows.append(("load_safetensors, warm nodes over HTTP", f"{t_http:.2f} s",
                     "load_file, page cache dropped", f"{t_cold:.2f} s", f"{t_cold / t_http:.2f}x faster (>= 1.5x)"))
        os.environ["SDCACHE_SHORT_CIRCUIT"] = "1"
        fs.fetcher.short_circuit = True
        t_sc = median_time(lambda: touch_tensors(load_safetensors(url, meta=cluster.meta_addr)), args.repeat)
        t_hot = median_time(lambda: touch_tensors(load_file(ckpt)), args.repeat, setup=lambda: warm_page_cache(ckpt))
        rows.append(("load_safetensors, same-host node (short-circuit)", f"{t_sc:.2f} s",
                     "load_file, page cache warm", f"{t_hot:.2f} s", f"{t_hot / t_sc:.2f}x faster (>= 1.0x)"))

        # 4. s3fs vs sdcache with S3 as under-store
        if not args.skip_s3:
            s3_ckpt = os.path.join(args.workdir, f"sd-{args.s3_mib}m.safetensors")
            if not os.path.exists(s3_ckpt):
                write_sd_checkpoint(s3_ckpt, args.s3_mib * (1 << 20) / 2.07e9)
            rows.append(bench_s3(args, s3_ckpt, os.path.getsize(s3_ckpt)))
    finally:
        cluster.stop()
        shutil.rmtree(pool_root, ignore_errors=True)
    print(table(f"sdcache backbone benchmarks — {time.strftime('%Y-%m-%d')} — {machine()}", rows,
                ("measure", "sdcache", "comparison", "comparison value", "ratio")))


def bench_s3(args: argparse.Namespace, ckpt: str, size: int) -> tuple[str, ...]:
    """S3 server in its own process; sdcache nodes read through from it once, then serve warm."""
    import boto3
    import s3fs

    port_file = os.path.join(args.workdir, "moto.port")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    endpoint = ""
    for line in server.stdout:
        if "Running on http://" in line:
            endpoint = line.strip().split("Running on ")[-1].split()[0]
            break
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    os.environ.update(env)
    threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()
    pool_root = tempfile.mkdtemp(prefix="bench-s3-", dir="/dev/shm")
    cluster = LocalCluster(os.path.join(args.workdir, "cluster-s3"), nodes=2, capacity=2 * size, pool_root=pool_root,
                           env=env)
    shutil.rmtree(cluster.data_dir, ignore_errors=True)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        boto3.client("s3", endpoint_url=endpoint).upload_file(ckpt, "bench", "ckpt.safetensors")
        s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        t_s3 = median_time(lambda: s3.cat_file("bench/ckpt.safetensors"), max(1, args.repeat - 1))
        cluster.start()
        os.environ["SDCACHE_TOKEN"] = cluster.admin_token  # as a user exports theirs
        fs = SdcacheFileSystem(meta=cluster.meta_addr)
        fs.fetcher.short_circuit = False
        import_file(fs.meta, "s3://bench/ckpt.safetensors", "/s3/ckpt.safetensors")
        for _ in fs.meta.warmup(["/s3/ckpt.safetensors"]):
            pass
        t_sd = median_time(lambda: fs.cat_file("/s3/ckpt.safetensors"), args.repeat)
    finally:
        cluster.stop()
        server.kill()
        shutil.rmtree(pool_root, ignore_errors=True)
    return (f"read {size / 2**20:.0f} MiB checkpoint via sdcache (S3 under-store, warm, HTTP)", f"{t_sd:.2f} s", "s3fs from the S3 server",
            f"{t_s3:.2f} s", f"{t_s3 / t_sd:.1f}x faster (>= 5x)")


if __name__ == "__main__":
    main()
