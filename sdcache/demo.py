"""``sdcache demo``: the main job end to end on one host, with nothing to download.

Starts a one-host cluster (metadata service + 2 nodes) unless ``--meta``
names a running one, generates a random-weight SD1.5-shaped checkpoint,
imports it, warms it into the pool, reads it back through fsspec and
``load_safetensors``, checks every byte, and prints where to look.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

from . import errors
from .units import format_size, parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="./sdcache-demo", help="where the cluster and the model go (default ./sdcache-demo)")
    p.add_argument("--model-size", default="256MiB", help="size of the generated checkpoint (2GiB = real SD1.5)")
    p.add_argument("--keep-running", action="store_true", help="leave the cluster up afterwards (Ctrl-C stops it)")
    p.add_argument("--pool-root", default="/dev/shm/sdcache-demo", help="parent of the nodes' pool directories")


def main(args: argparse.Namespace) -> int:
    from .cluster import LocalCluster, default_capacity
    from .synth import write_sd_checkpoint

    data = os.path.abspath(args.data)
    os.makedirs(data, exist_ok=True)
    target = parse_size(args.model_size)
    model = os.path.join(data, f"demo-sd15-{target >> 20}MiB.safetensors")
    if not os.path.exists(model):
        print(f"[1/5] generating a random-weight SD1.5-shaped checkpoint ({format_size(target)}) -> {model}")
        write_sd_checkpoint(model + ".tmp", target / 2.07e9, unet_seed=0)
        os.replace(model + ".tmp", model)
    else:
        print(f"[1/5] using the generated checkpoint {model}")
    size = os.path.getsize(model)

    cluster = None
    meta = getattr(args, "meta", None)
    if not meta:
        capacity = max(default_capacity(2), 2 * size)
        print(f"[2/5] starting a one-host cluster: metadata service + 2 nodes ({format_size(capacity)} each)")
        cluster = LocalCluster(os.path.join(data, "cluster"), nodes=2, capacity=capacity,
                               pool_root=args.pool_root)
        cluster.start()
        meta = cluster.meta_addr
    else:
        print(f"[2/5] using the cluster at {meta}")
    try:
        return _run(meta, model, size, cluster, args)
    finally:
        if cluster is not None:
            cluster.stop()


def _run(meta: str, model: str, size: int, cluster: object, args: argparse.Namespace) -> int:
    from .client.fs import SdcacheFileSystem
    from .client.importer import import_file

    token = getattr(cluster, "admin_token", None) or None
    fs = SdcacheFileSystem(meta=meta, token=token)
    dest = "/demo/" + os.path.basename(model)
    t0 = time.perf_counter()
    res = import_file(fs.meta, model, dest)
    t_import = time.perf_counter() - t0
    m = res.manifest
    print(f"[3/5] imported {dest}: {format_size(size)}, kind {m.kind}/{m.base}, {len(m.chunks)} chunks, "
          f"sha256 {m.sha256[:16]}… in {t_import:.2f}s")
    t0 = time.perf_counter()
    last = None
    for last in fs.meta.warmup([dest]):
        pass
    t_warm = time.perf_counter() - t0
    print(f"[4/5] warmed into the pool in {t_warm:.2f}s "
          f"({format_size(last.done_bytes if last else 0)} of {format_size(size)})")
    t0 = time.perf_counter()
    with fs.open(dest, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    t_read = time.perf_counter() - t0
    if digest != m.sha256:
        raise errors.CorruptChunk(f"read back {digest}, expected {m.sha256}")
    line = f"[5/5] read back through sdcache:// in {t_read:.2f}s ({size / t_read / 1e9:.2f} GB/s), sha256 matches"
    try:
        from .client import load_safetensors

        t0 = time.perf_counter()
        tensors = load_safetensors("sdcache:/" + dest, meta=meta, token=token)
        line += f"; load_safetensors: {len(tensors)} tensors in {time.perf_counter() - t0:.2f}s"
    except ImportError:
        line += "; (torch not installed: skipped load_safetensors)"
    print(line)
    print()
    print("Where to look:")
    if cluster is not None:
        print(f"  export SDCACHE_TOKEN_FILE={getattr(cluster, 'admin_token_file')}   # auth is on: the admin token")
    print(f"  sdcache --meta {meta} ls -l /demo          # the namespace")
    print(f"  sdcache --meta {meta} stat {dest}")
    print(f"  sdcache --meta {meta} nodes                # pool use per node")
    print(f"  python -c \"import fsspec; print(fsspec.filesystem('sdcache', meta='{meta}').ls('/demo'))\"")
    if cluster is not None:
        print(f"  logs and metadata: {os.path.join(os.path.dirname(model), 'cluster')}; pools under {args.pool_root}")
        if args.keep_running:
            print("The cluster keeps running; Ctrl-C stops it.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0
