"""GET throughput of warm 4 MiB chunks from a cache node over loopback.

Compares, in one run and with the same client:

* ``node``            a real ``sdcache node`` subprocess registered with a real
                      metadata service (``LocalCluster``), the file committed by
                      the importer and warmed by ``Warmup`` (each GET checks the
                      bearer token, reads the tmpfs file, checks xxh3-128, sends
                      with a StreamResponse, headers sent on their own);
* ``static-response`` a plain aiohttp server answering from bytes already in
                      memory with ``web.Response(body=bytes)``;
* ``static-stream``   the same bytes written the way the node writes them (the
                      ceiling for the node: what is left is its read + verify).

Run: ``python benchmarks/bench_node.py [--requests 150] [--clients 2] [--rounds 3]``.
Every GET carries a read token and names the file (``?path=``), as the client
does; the static servers check neither, so the node's figure includes its auth.
The client (curl by default, else aiohttp) shares the CPUs with the servers, so
wall-clock GiB/s moves with whatever else the machine runs; the server's own
CPU seconds per GiB served (from /proc) is the steadier figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

CHUNK = 4 << 20
BENCH_PATH = "/bench/model.bin"


# --------------------------------------------------------------------------- the baseline server


def serve_static(mode: str, blob_path: str) -> None:
    from aiohttp import web

    from sdcache.hashing import chunk_id

    data = open(blob_path, "rb").read()
    chunks = {}
    for off in range(0, len(data), CHUNK):
        b = data[off:off + CHUNK]
        chunks[chunk_id(b)] = b

    async def get_response(request: web.Request) -> web.StreamResponse:
        return web.Response(body=chunks[request.match_info["id"]], content_type="application/octet-stream")

    async def get_stream(request: web.Request) -> web.StreamResponse:
        body = chunks[request.match_info["id"]]
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(body)
        await resp.prepare(request)
        request.writer.send_headers()  # as the node does: no header+body join copy
        await resp.write(body)
        await resp.write_eof()
        return resp

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/chunks/{id}", get_response if mode == "response" else get_stream)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"static listening on 127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


# --------------------------------------------------------------------------- the client


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _aiohttp_client(address: str, urls: list[str], headers: dict[str, str], q: mp.Queue) -> None:
    import aiohttp

    async def run() -> int:
        total = 0
        async with aiohttp.ClientSession(headers=headers) as s:
            for u in urls:
                async with s.get(f"http://{address}{u}") as r:
                    body = await r.read()
                    assert r.status == 200 and len(body) == CHUNK, r.status
                    total += len(body)
        return total

    q.put(asyncio.run(run()))


def _one_round(address: str, pid: int, ids: list[str], requests: int, clients: int, client: str,
               tmp: str, token: str) -> tuple[float, float]:
    """*requests* GETs on each of *clients* keep-alive connections: (GiB/s, server CPU s per GiB)."""
    rnd = random.Random(requests * 7919 + clients)
    lists = [[f"/chunks/{rnd.choice(ids)}?path={BENCH_PATH}" for _ in range(requests)] for _ in range(clients)]
    headers = {"Authorization": f"Bearer {token}"}
    cpu0 = _cpu_seconds(pid)
    t0 = time.perf_counter()
    if client == "curl":
        procs = []
        for k, urls in enumerate(lists):
            cfg = os.path.join(tmp, f"curl{k}.cfg")
            with open(cfg, "w") as f:
                f.write(f'header = "Authorization: Bearer {token}"\n')  # applies to every url below
                for u in urls:
                    f.write(f'url = "http://{address}{u}"\noutput = "/dev/null"\n')
            procs.append(subprocess.Popen(["curl", "-sSf", "-K", cfg, "-w", "%{size_download}\\n"],
                                          stdout=subprocess.PIPE))
        total = 0
        for p in procs:
            out, _ = p.communicate()
            assert p.returncode == 0, "curl failed"
            total += sum(int(x) for x in out.split())
    else:
        q: mp.Queue = mp.Queue()
        ps = [mp.Process(target=_aiohttp_client, args=(address, urls, headers, q)) for urls in lists]
        for p in ps:
            p.start()
        total = sum(q.get() for _ in ps)
        for p in ps:
            p.join()
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds(pid) - cpu0
    assert total == requests * clients * CHUNK, total
    gib = total / (1 << 30)
    return gib / wall, cpu / gib


# --------------------------------------------------------------------------- orchestration


def _start(cmd: list[str], what: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server that prints '... listening on HOST:PORT'; returns it and its address."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 60
    line = b""
    while not line.endswith(b"\n"):
        r, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        if not r:
            raise SystemExit(f"{what} did not start")
        b = os.read(proc.stdout.fileno(), 1)  # type: ignore[union-attr]
        if not b:
            raise SystemExit(f"{what} exited")
        line += b
    return proc, line.decode().split()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=64, help="distinct 4 MiB chunks (default 64)")
    ap.add_argument("--requests", type=int, default=150, help="GETs per connection per round (default 150)")
    ap.add_argument("--clients", type=int, default=2, help="concurrent keep-alive connections (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are shown (default 3)")
    ap.add_argument("--client", choices=["curl", "aiohttp"], default="curl" if shutil.which("curl") else "aiohttp")
    ap.add_argument("--serve-static", choices=["response", "stream"], help=argparse.SUPPRESS)
    ap.add_argument("--blob", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_static:
        serve_static(args.serve_static, args.blob)
        return

    from sdcache.client.importer import import_file
    from sdcache.client.metaclient import MetaClient
    from sdcache.cluster import LocalCluster

    work = tempfile.mkdtemp(prefix="sdcache-bench-")
    pool = tempfile.mkdtemp(prefix="sdcache-bench-pool-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    cluster = LocalCluster(os.path.join(work, "meta"), nodes=1, capacity=2 * args.chunks * CHUNK, pool_root=pool)
    try:
        blob = os.path.join(work, "model.bin")
        with open(blob, "wb") as f:
            f.write(os.urandom(args.chunks * CHUNK))
        cluster.start()
        meta = MetaClient(cluster.meta_addr, credentials=cluster.credentials)
        manifest = import_file(meta, blob, BENCH_PATH).manifest
        ids = [c.id for c in manifest.chunks]
        assert len(ids) == args.chunks and all(c.length == CHUNK for c in manifest.chunks)
        progress = list(meta.warmup([BENCH_PATH]))  # the service tells the node to load the file
        assert progress and progress[-1].done_bytes == args.chunks * CHUNK, progress[-1:]
        token = meta.create_token("read", name=f"bench-node-{os.getpid()}-{int(time.time())}").token
        meta.close()
        node = cluster.node_children[0]
        assert node.proc is not None
        procs["node (pool, verified)"] = (node.proc, node.address)
        node_addr = node.address
        for mode in ("response", "stream"):
            procs[f"static-{mode}"] = _start([sys.executable, __file__, "--serve-static", mode, "--blob", blob], mode)

        results: dict[str, list[tuple[float, float]]] = {name: [] for name in procs}
        for name, (p, addr) in procs.items():  # warm-up: connections, page cache, allocator
            _one_round(addr, p.pid, ids, 10, args.clients, args.client, work, token)
        for _ in range(args.rounds):
            for name, (p, addr) in procs.items():
                results[name].append(_one_round(addr, p.pid, ids, args.requests, args.clients, args.client,
                                                work, token))
        req = urllib.request.Request(f"http://{node_addr}/stats", headers={"Authorization": f"Bearer {token}"})
        st = json.loads(urllib.request.urlopen(req, timeout=30).read())

        print(f"\nwarm 4 MiB chunk GETs over loopback: {args.chunks} distinct chunks, {args.clients} keep-alive "
              f"connections x {args.requests} GETs, {args.client} client, median of {args.rounds} interleaved "
              f"rounds, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
        print(f"{'server':<24}{'GiB/s':>8}{'MiB/s':>9}{'server CPU s/GiB':>18}")
        for name, rs in results.items():
            gibs = statistics.median(r[0] for r in rs)
            cpu = statistics.median(r[1] for r in rs)
            print(f"{name:<24}{gibs:>8.2f}{gibs * 1024:>9.0f}{cpu:>18.3f}")
        print(f"\nnode stats: hits {st['hits']}, misses {st['misses']}, under-store reads {st['understore_reads']}, "
              f"served {st['bytes_served'] / (1 << 30):.1f} GiB")
    finally:
        for name, (p, _) in procs.items():
            if name.startswith("static") and p.poll() is None:
                p.terminate()
                p.wait()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(pool, ignore_errors=True)


if __name__ == "__main__":
    main()
