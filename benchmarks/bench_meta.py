"""Metadata service latency: listing a 10,000-file directory and stat, over gRPC.

Starts ``sdcache meta`` as a subprocess on port 0 with a fresh data
directory, fills one directory with 10,000 files through ``Commit``, then
measures, each beside the same operation on the store directly (in this
process, same database file) so the gRPC cost is visible:

* listing all 10,000 entries (default 1,000-entry pages, and one page);
* ``Stat`` p50/p99 (target: p50 < 1 ms) and ``GetManifest`` of a 7 GB
  checkpoint-sized manifest (1,700 chunks);
* commit throughput one at a time and 64 in flight (group commit).

Run: ``python benchmarks/bench_meta.py [--files 10000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


from sdcache._proto import meta_pb2 as pb
from sdcache._proto import meta_pb2_grpc
from sdcache.chunking import CHUNK_SIZE, ChunkRef
from sdcache.hashing import chunk_id
from sdcache.manifest import pack_chunks
from sdcache.store import SqliteStore
from sdcache.meta import grpcauth
from sdcache.tls import Credentials

LIST_TARGET_MS = 100.0
STAT_TARGET_MS = 1.0


def wire_manifest(path: str, nchunks: int = 1, chunk: int = 1 << 20) -> pb.Manifest:
    refs = [ChunkRef(i * chunk, chunk, chunk_id(f"{path}#{i}".encode())) for i in range(nchunks)]
    return pb.Manifest(
        path=path,
        size=nchunks * chunk,
        mtime=time.time(),
        source=f"file:///models{path}",
        version_tag="1:1",
        sha256="00" * 32,
        chunks=pack_chunks(refs),
        kind="lora",
    )


def start_service(data: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-c", "import sys; from sdcache.meta.server import _cli; sys.exit(_cli())"]
    proc = subprocess.Popen([*cmd, "--data", str(data), "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("sdcache meta listening on "):
        proc.kill()
        raise SystemExit(f"meta service did not start: {line!r}")
    os.environ["SDCACHE_TOKEN"] = (data / "admin.token").read_text().strip()  # the service wrote it first
    return proc, line.rsplit(" ", 1)[1].strip()


def _creds() -> Credentials:
    return Credentials.resolve()


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Milliseconds of each of *repeat* calls."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


async def commit_many(address: str, manifests: list[pb.Manifest], in_flight: int) -> float:
    """Commit *manifests* with *in_flight* concurrent calls; commits per second."""
    async with grpcauth.aio_channel(address, _creds()) as channel:
        stub = meta_pb2_grpc.MetaStub(channel)
        todo = iter(manifests)

        async def worker() -> None:
            for m in todo:
                await stub.Commit(pb.CommitRequest(manifest=m), timeout=60)

        t = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(in_flight):
                tg.create_task(worker())
        return len(manifests) / (time.perf_counter() - t)


def list_all_grpc(stub: meta_pb2_grpc.MetaStub, path: str, page_size: int) -> int:
    n, token = 0, ""
    while True:
        page = stub.List(pb.ListRequest(path=path, page_token=token, page_size=page_size), timeout=30)
        n += len(page.entries)
        token = page.next_page_token
        if not token:
            return n


def list_all_store(store: SqliteStore, path: str, page_size: int) -> int:
    n, token = 0, ""
    while True:
        entries, token = store.list_dir(path, token, page_size)
        n += len(entries)
        if not token:
            return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--stats", type=int, default=3000, help="Stat calls to time")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-meta-") as tmp:
        data = Path(tmp) / "data"
        proc, address = start_service(data)
        try:
            names = [f"/bench/lora-{i:06d}.safetensors" for i in range(args.files)]
            serial_n = min(300, args.files // 10)
            serial = asyncio.run(commit_many(address, [wire_manifest(p) for p in names[:serial_n]], 1))
            grouped = asyncio.run(commit_many(address, [wire_manifest(p) for p in names[serial_n:]], 64))
            big = wire_manifest("/bench-big/sdxl.safetensors", nchunks=1700, chunk=CHUNK_SIZE)
            asyncio.run(commit_many(address, [big], 1))

            channel = grpcauth.channel(address, _creds())
            stub = meta_pb2_grpc.MetaStub(channel)
            store = SqliteStore(data / "meta.db")
            assert list_all_grpc(stub, "/bench", 0) == args.files

            rows: list[tuple[str, float, str, str]] = []
            for label, size in (("default pages", 0), ("one page", 10_000)):
                g = timed(lambda: list_all_grpc(stub, "/bench", size), 9)
                d = timed(lambda: list_all_store(store, "/bench", size), 9)
                target = f"< {LIST_TARGET_MS:.0f} ms"
                comparison = f"best {min(g):.1f} ms; store direct median {statistics.median(d):.1f}, best {min(d):.1f}"
                rows.append((f"list {args.files} entries, {label} (median)", statistics.median(g), target, comparison))

            rng = random.Random(0)
            picks = [rng.choice(names) for _ in range(args.stats)]
            it = iter(picks)
            grpc_stat = timed(lambda: stub.Stat(pb.PathRequest(path=next(it)), timeout=10), len(picks))
            it = iter(picks)
            store_stat = timed(lambda: store.stat(next(it)), len(picks))
            target = f"< {STAT_TARGET_MS:.0f} ms"
            rows.append(("stat p50", pct(grpc_stat, 0.5), target, f"store direct {pct(store_stat, 0.5):.3f} ms"))
            rows.append(("stat p99", pct(grpc_stat, 0.99), "", f"store direct {pct(store_stat, 0.99):.3f} ms"))
            gm = timed(lambda: stub.GetManifest(pb.PathRequest(path=big.path), timeout=10), 200)
            dm = timed(lambda: store.get_manifest(big.path), 200)
            rows.append(("get_manifest 1700 chunks p50", pct(gm, 0.5), "", f"store direct {pct(dm, 0.5):.3f} ms"))
            store.close()
            channel.close()
        finally:
            proc.terminate()
            proc.wait(timeout=15)

    load = os.getloadavg()[0]
    print(f"sdcache metadata service, {args.files} files in one directory, {os.cpu_count()} CPUs, load {load:.1f}\n")
    print(f"{'operation':<44} {'gRPC (ms)':>10}  {'target':<10} comparison")
    print("-" * 110)
    for label, ms, target, comparison in rows:
        print(f"{label:<44} {ms:>10.3f}  {target:<10} {comparison}")
    print(f"{'commit, 1 in flight':<44} {1e3 / serial:>10.3f}  {'':<10} {serial:.0f} commits/s")
    print(f"{'commit, 64 in flight (group commit)':<44} {1e3 / grouped:>10.3f}  {'':<10} {grouped:.0f} commits/s")
    failed = [r[0] for r in rows if r[2] and r[1] >= float(r[2].split()[1])]
    if failed:
        print(f"\nover target: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
