"""Metadata service on SQLite against PostgreSQL, in one run: stat, listing 10,000 entries, commits, heartbeats.

For each store it starts ``sdcache meta`` as a subprocess on port 0 (SQLite
under a fresh ``--data``; PostgreSQL with ``--db`` on a server this script
starts from the distribution's package, ``initdb`` in a temporary directory,
fsync on), fills one directory with 10,000 files through ``Commit``, then
measures, each beside the same operation on the store directly (in this
process, same database) so the gRPC cost is visible:

* listing all 10,000 entries (default 1,000-entry pages, and one page);
* ``Stat`` p50/p99 (target: p50 < 1 ms) and ``GetManifest`` of a 7 GB
  checkpoint-sized manifest (1,700 chunks);
* commit throughput one at a time and 64 in flight (group commit);
* heartbeat cost: one ``Heartbeat`` at a time and 64 in flight, beside a
  durable one-row write (``RegisterNode``) of the same size: a heartbeat
  that cost an fsync would take as long as the durable write.

The table puts the two stores side by side; the last column is PostgreSQL's
figure over SQLite's. Run: ``python benchmarks/bench_meta.py [--files 10000]``
(as root the PostgreSQL server runs as the ``postgres`` or ``nobody`` account).
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
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # the repository, for tests/_postgres.py

from _common import load_average, machine, table  # noqa: E402

from sdcache._proto import meta_pb2 as pb  # noqa: E402
from sdcache._proto import meta_pb2_grpc  # noqa: E402
from sdcache.chunking import CHUNK_SIZE, ChunkRef  # noqa: E402
from sdcache.hashing import chunk_id  # noqa: E402
from sdcache.manifest import pack_chunks  # noqa: E402
from sdcache.meta import grpcauth  # noqa: E402
from sdcache.store import MetaStore, NodeRecord, SqliteStore  # noqa: E402
from sdcache.tls import Credentials  # noqa: E402

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


def start_service(data: Path, db: str | None) -> tuple[subprocess.Popen[str], str, Credentials]:
    cmd = [sys.executable, "-c", "import sys; from sdcache.meta.server import _cli; sys.exit(_cli())",
           "--data", str(data), "--listen", "127.0.0.1:0", *(["--db", db] if db else [])]
    data.mkdir(parents=True)
    with open(data.parent / f"{data.name}.log", "wb") as log:  # its first-start warnings, kept off the table
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("sdcache meta listening on "):
        proc.kill()
        raise SystemExit(f"meta service did not start: {line!r}: {(data.parent / f'{data.name}.log').read_text()}")
    token = (data / "admin.token").read_text().strip()  # the service wrote it first
    return proc, line.rsplit(" ", 1)[1].strip(), Credentials(token=token)


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


async def many(address: str, creds: Credentials, calls: list[Callable[[Any], Any]], in_flight: int) -> float:
    """Run *calls* (each given a stub, returning an awaitable) with *in_flight* at once; calls per second."""
    async with grpcauth.aio_channel(address, creds) as channel:
        stub = meta_pb2_grpc.MetaStub(channel)
        todo = iter(calls)

        async def worker() -> None:
            for call in todo:
                await call(stub)

        t = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(in_flight):
                tg.create_task(worker())
        return len(calls) / (time.perf_counter() - t)


def commits(manifests: list[pb.Manifest]) -> list[Callable[[Any], Any]]:
    return [lambda stub, m=m: stub.Commit(pb.CommitRequest(manifest=m), timeout=60) for m in manifests]


def heartbeats(n: int, nodes: int) -> list[Callable[[Any], Any]]:
    return [lambda stub, i=i: stub.Heartbeat(pb.HeartbeatRequest(node_id=f"hb-{i % nodes}", used=i, chunks=i),
                                             timeout=60) for i in range(n)]


def list_all_grpc(stub: meta_pb2_grpc.MetaStub, path: str, page_size: int) -> int:
    n, token = 0, ""
    while True:
        page = stub.List(pb.ListRequest(path=path, page_token=token, page_size=page_size), timeout=30)
        n += len(page.entries)
        token = page.next_page_token
        if not token:
            return n


def list_all_store(store: MetaStore, path: str, page_size: int) -> int:
    n, token = 0, ""
    while True:
        entries, token = store.list_dir(path, token, page_size)
        n += len(entries)
        if not token:
            return n


def measure(label: str, data: Path, db: str | None, files: int, nstats: int) -> dict[str, tuple[float, str]]:
    """Every figure of one store: name -> (value, unit or note)."""
    out: dict[str, tuple[float, str]] = {}
    proc, address, creds = start_service(data, db)
    try:
        names = [f"/bench/lora-{i:06d}.safetensors" for i in range(files)]
        serial_n = min(300, files // 10)
        serial = asyncio.run(many(address, creds, commits([wire_manifest(p) for p in names[:serial_n]]), 1))
        grouped = asyncio.run(many(address, creds, commits([wire_manifest(p) for p in names[serial_n:]]), 64))
        out["commits/s, 1 in flight"] = (serial, "/s")
        out["commits/s, 64 in flight (group commit)"] = (grouped, "/s")
        big = wire_manifest("/bench-big/sdxl.safetensors", nchunks=1700, chunk=CHUNK_SIZE)
        asyncio.run(many(address, creds, commits([big]), 1))

        channel = grpcauth.channel(address, creds)
        stub = meta_pb2_grpc.MetaStub(channel)
        store: MetaStore
        if db:
            from sdcache.store.postgres import PostgresStore

            store = PostgresStore(db)
        else:
            store = SqliteStore(data / "meta.db")
        try:
            assert list_all_grpc(stub, "/bench", 0) == files
            for name, size in (("default pages", 0), ("one page", 10_000)):
                g = timed(lambda: list_all_grpc(stub, "/bench", size), 9)
                d = timed(lambda: list_all_store(store, "/bench", size), 9)
                out[f"list {files} entries, {name}, median"] = (statistics.median(g), "ms")
                out[f"  (store direct, {name})"] = (statistics.median(d), "ms")

            rng = random.Random(0)
            picks = [rng.choice(names) for _ in range(nstats)]
            it = iter(picks)
            grpc_stat = timed(lambda: stub.Stat(pb.PathRequest(path=next(it)), timeout=10), len(picks))
            it = iter(picks)
            store_stat = timed(lambda: store.stat(next(it)), len(picks))
            out["stat p50"] = (pct(grpc_stat, 0.5), "ms")
            out["stat p99"] = (pct(grpc_stat, 0.99), "ms")
            out["  (store direct, stat p50)"] = (pct(store_stat, 0.5), "ms")
            gm = timed(lambda: stub.GetManifest(pb.PathRequest(path=big.path), timeout=10), 200)
            dm = timed(lambda: store.get_manifest(big.path), 200)
            out["GetManifest 1,700 chunks, p50"] = (pct(gm, 0.5), "ms")
            out["  (store direct, GetManifest p50)"] = (pct(dm, 0.5), "ms")

            # Heartbeats against a durable write of the same row, through the store and through gRPC.
            nodes = 64
            for i in range(nodes):
                store.register_node(NodeRecord(f"hb-{i}", f"10.9.{i // 250}.{i % 250}:7071", 1 << 30,
                                               last_seen=time.time()))
            hb = timed(lambda: store.heartbeat("hb-0", 1, 1, time.time()), 300)
            reg = timed(lambda: store.register_node(NodeRecord("hb-0", "10.9.0.0:7071", 1 << 30,
                                                               last_seen=time.time())), 100)
            out["heartbeat, store direct, p50"] = (pct(hb, 0.5), "ms")
            out["  durable 1-row write (register), p50"] = (pct(reg, 0.5), "ms")
            one = asyncio.run(many(address, creds, heartbeats(300, nodes), 1))
            flight = asyncio.run(many(address, creds, heartbeats(3000, nodes), 64))
            out["Heartbeat RPC, 1 in flight"] = (1e3 / one, "ms")
            out["Heartbeats/s, 64 in flight"] = (flight, "/s")
        finally:
            store.close()
            channel.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    print(f"  {label}: done (load {load_average()})", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--stats", type=int, default=3000, help="Stat calls to time")
    args = parser.parse_args()

    from tests import _requirements
    from tests._postgres import PostgresServer

    bindir = _requirements.postgres_bindir()
    if bindir is None or _requirements.missing("postgres"):
        raise SystemExit(f"PostgreSQL is missing: {_requirements.missing('postgres')}")
    load_before = load_average()
    print(f"{machine()}; load {load_before}", flush=True)
    server = PostgresServer(bindir, fsync=True)
    try:
        server.start()
        with tempfile.TemporaryDirectory(prefix="bench-meta-") as tmp:
            results = {"SQLite": measure("SQLite", Path(tmp) / "sqlite", None, args.files, args.stats)}
            with server.database("bench") as url:
                results["PostgreSQL"] = measure("PostgreSQL", Path(tmp) / "postgres", url, args.files, args.stats)
    finally:
        server.cleanup()

    rows = []
    for name, (lite, unit) in results["SQLite"].items():
        pg = results["PostgreSQL"][name][0]
        fmt = "{:.0f}" if unit == "/s" else "{:.3f}"
        rows.append((name, f"{fmt.format(lite)} {unit}", f"{fmt.format(pg)} {unit}", f"{pg / lite:.2f}x"))
    print(table(f"sdcache metadata service, {args.files} files in one directory: SQLite against PostgreSQL "
                f"(loopback TCP, fsync on), same run; load {load_before} before, {load_average()} after",
                rows, ("measure", "SQLite", "PostgreSQL", "PostgreSQL / SQLite")))
    missed = []
    for store, figures in results.items():
        if figures["stat p50"][0] >= STAT_TARGET_MS:
            missed.append(f"{store} stat p50 (target < {STAT_TARGET_MS:.0f} ms)")
        if figures[f"list {args.files} entries, default pages, median"][0] >= LIST_TARGET_MS:
            missed.append(f"{store} list (target < {LIST_TARGET_MS:.0f} ms)")
    if missed:
        print(f"\nover target: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
