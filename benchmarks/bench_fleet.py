"""A fleet on shaped links: scaling with warm nodes, eight clients at once, a zone lost.

    python benchmarks/bench_fleet.py [--link-mbps 100] [--scale 1.0] [--nodes 1,2,4,8]
                                     [--clients 8] [--out /tmp/results_fleet.md]

Every process runs on a "host" of the multi-host test bed (``tests/_testbed.py``; root, ``ip
netns``, ``tc``): a network namespace of its own with its own host id, so no short-circuit
reads, joined to the others by one link. Every cache node and the NAS (an HTTP server with
Range, the under-store) sit behind a link of ``--link-mbps`` each way (tbf); clients and the
metadata service are unshaped, so a client can take in several node links at once. The
links are scaled down so that eight of them stay within what the machine's two shared vCPUs
can move (the unshaped ceiling is measured in the same run and printed beside).

1. Scaling: a ``--scale`` SD-shaped checkpoint (``sdcache.synth``; 1.0 is the real 2.1 GB,
   about 2 GiB) loaded with ``sdcache.client.load_safetensors`` from 1, 2, 4 and 8 warm nodes,
   against ``safetensors.torch.load_file`` of the same file fetched over the NAS's link
   (one HTTP GET into tmpfs, then ``load_file``, every page touched). Efficiency is the
   throughput over ``N x link``; the busiest node's share of the file is shown beside.
2. Eight clients, each on its own host, load eight different models (``--client-scale``) at
   once from 8 warm nodes: each one's time against the same client alone, and the NAS's
   share of the bytes.
3. Zone loss: 8 nodes in zones a and b, the zone-loss model in a directory with 2 replicas
   (``sdcache replicas``); a zone-a client reads it in a loop while zone a is SIGKILLed:
   failed reads and the p99 chunk latency against the steady state, and NAS requests.

Warm-ups run with the links unshaped (they are not what is measured), loads with them shaped.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # the repository, for tests/_testbed.py

from _common import load_average, table  # noqa: E402

from tests._testbed import Fleet, Host, TestBed, netem_available, probe  # noqa: E402

MB = 1_000_000

AGENT_PRELUDE = """
import gc, statistics, threading
import torch, safetensors.torch
from sdcache.client import load_safetensors
from sdcache.client import fetcher as _fetcher_mod

def touch(tensors):
    for t in tensors.values():
        flat = t.reshape(-1)
        if flat.numel():
            flat[:: max(1, 4096 // t.element_size())].sum()

def timed_load(path):
    # The node list as of now (nodes were restarted on new ports), not one cached up to 2 s ago.
    fsspec.filesystem("sdcache").meta.nodes(refresh=True)
    gc.collect()
    t0 = time.perf_counter()
    d = load_safetensors("sdcache:/" + path)
    touch(d)
    dt = time.perf_counter() - t0
    del d
    gc.collect()
    return dt

def nas_load(url, tmp):
    gc.collect()
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as resp, open(tmp, "wb") as f:
        while True:
            block = resp.read(1 << 20)
            if not block:
                break
            f.write(block)
    fetched = time.perf_counter() - t0
    d = safetensors.torch.load_file(tmp)
    touch(d)
    dt = time.perf_counter() - t0
    del d
    os.unlink(tmp)
    gc.collect()
    return [dt, fetched]

# Chunk latencies, every fetch timed (zone-loss section).
LAT = []
_orig_fetch_into = _fetcher_mod.Fetcher.fetch_into
def _timed_fetch_into(self, m, index, out):
    t0 = time.perf_counter()
    try:
        return _orig_fetch_into(self, m, index, out)
    finally:
        LAT.append((time.time(), time.perf_counter() - t0))
_fetcher_mod.Fetcher.fetch_into = _timed_fetch_into

LOOP = {"run": False, "reads": [], "errors": []}
def _loop(path):
    fs = fsspec.filesystem("sdcache")
    fs.meta.nodes(refresh=True)
    while LOOP["run"]:
        t0 = time.time()
        try:
            with fs.open(path, "rb") as f:
                while f.read(16 << 20):
                    pass
            LOOP["reads"].append((t0, time.time()))
        except Exception as exc:
            LOOP["errors"].append((t0, repr(exc)))
def start_loop(path):
    LOOP.update(run=True, reads=[], errors=[])
    LAT.clear()
    LOOP["thread"] = threading.Thread(target=_loop, args=(path,), daemon=True)
    LOOP["thread"].start()
def stop_loop():
    LOOP["run"] = False
    LOOP["thread"].join(600)
    return {"reads": LOOP["reads"], "errors": LOOP["errors"], "lat": LAT[:]}
"""


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.link = args.link_mbps * MB / 8  # bytes/s
        self.out: list[str] = []
        self.work = args.workdir
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        self.bed = TestBed()
        self.fleet = Fleet(self.bed, self.work, node_rate=self.link, nas_rate=self.link, client_rate=None,
                           heartbeat=1.0, replicas=1).start()
        self.client = self.fleet.client("c0", zone="a")
        self.fleet.call(self.client, AGENT_PRELUDE)
        self.node_names = [f"n{i}" for i in range(max(args.nodes))]
        made = self.fleet.add_nodes([(n, "") for n in self.node_names], capacity=args.capacity)
        for node in made:
            node.kill()
        self.files: dict[str, int] = {}

    def log(self, line: str = "") -> None:
        print(line, flush=True)
        self.out.append(line)

    # -- helpers ------------------------------------------------------------------
    def shape(self, rate: float | None) -> None:
        """Every node's and the NAS's link at *rate* (None: unshaped, for warm-ups)."""
        for node in self.fleet.nodes.values():
            node.host.shape(rate)
        self.fleet.nas.host.shape(rate)

    def run_nodes(self, names: list[str], zones: dict[str, str] | None = None) -> None:
        """Exactly *names* running, on empty pools."""
        for node in self.fleet.nodes.values():
            node.kill()
            shutil.rmtree(node.pool_dir, ignore_errors=True)
        chosen = [self.fleet.nodes[n] for n in names]
        for node in chosen:
            node.zone = (zones or {}).get(node.node_id, "")
        self.fleet.start_nodes(chosen)
        self.fleet.wait_live(self.client, set(names), timeout=60)

    def model(self, name: str, scale: float, seed: int) -> tuple[str, int]:
        from sdcache.synth import write_sd_checkpoint

        path = os.path.join(self.fleet.nas.root, name)
        if name not in self.files:
            self.files[name] = write_sd_checkpoint(path, scale, unet_seed=seed, shared_seed=100 + seed)
        return self.fleet.nas.url(name), self.files[name]

    def import_and_warm(self, url: str | None, path: str) -> None:
        """Import *url* at *path* (unless None: imported already) and warm it, links unshaped."""
        self.shape(None)
        if url is not None:
            self.fleet.call(self.client, "import_file(meta, url, path)", url=url, path=path)
        got = self.fleet.call(self.client, "result = warm([path])", path=path)
        if got["cached_bytes"] != got["total_bytes"]:
            raise RuntimeError(f"warm-up of {path} incomplete: {got['message']}")
        self.shape(self.link)

    # -- 1. scaling -----------------------------------------------------------------
    def scaling(self) -> None:
        a = self.args
        url, size = self.model("sd.safetensors", a.scale, 0)
        self.log(f"\n## 1. One {size / 2**30:.2f} GiB SD-shaped checkpoint, N warm nodes vs the NAS "
                 f"(links {a.link_mbps:g} Mbit/s = {self.link / MB:.1f} MB/s each way)")
        self.log(f"load average before: {load_average()}")
        rows: list[tuple[str, ...]] = []
        self.run_nodes(self.node_names[:1])
        self.shape(self.link)
        nas: list[float] = []
        for _ in range(a.repeat):
            nas.append(self.fleet.call(self.client, "result = nas_load(url, '/dev/shm/' + os.environ['SDCACHE_HOST_ID']"
                                       ".replace('/', '-') + '.st')", url=url)[0])
        t_nas = statistics.median(nas)
        rows.append(("NAS: HTTP GET + safetensors.torch.load_file", f"{t_nas:.2f}", f"{size / t_nas / MB:.1f}",
                     f"{self.link / MB:.1f}", f"{size / t_nas / self.link:.2f}", "-"))
        path = "/bench/sd.safetensors"
        self.fleet.call(self.client, "import_file(meta, url, path)", url=url, path=path)
        for n in a.nodes:
            names = self.node_names[:n]
            self.run_nodes(names)
            self.import_and_warm(None, path)
            used = {k: v["used"] for k, v in self.fleet.node_stats(self.client).items()}
            times = [self.fleet.call(self.client, "result = timed_load(path)", path=path) for _ in range(a.repeat)]
            t = statistics.median(times)
            ideal = n * self.link
            rows.append((f"load_safetensors from {n} warm node{'s' if n > 1 else ''}", f"{t:.2f}",
                         f"{size / t / MB:.1f}", f"{ideal / MB:.1f}", f"{size / t / ideal:.2f}",
                         f"{max(used.values()) / size * 100:.1f}%"))
            self.log(f"  {rows[-1]}  (load average {load_average()})")
            if n == max(a.nodes):
                self.shape(None)
                t_free = statistics.median(
                    self.fleet.call(self.client, "result = timed_load(path)", path=path) for _ in range(a.repeat))
                rows.append((f"  same, links unshaped (this machine's ceiling)", f"{t_free:.2f}",
                             f"{size / t_free / MB:.1f}", "-", "-", "-"))
                self.shape(self.link)
        self.log(table(f"Load of {size / 2**30:.2f} GiB, median of {a.repeat}; efficiency = MB/s / (N x link)",
                       rows, ("what", "seconds", "MB/s", "N x link MB/s", "efficiency", "busiest node")))
        t1 = next((float(r[1]) for r in rows if r[0].startswith("load_safetensors from 1 ")), None)
        vs = f"from 1 node vs the NAS: {t_nas / t1:.2f}x; " if t1 else ""
        self.log(f"\n{vs}load average after: {load_average()}")

    # -- 2. eight clients -----------------------------------------------------------
    def many_clients(self) -> None:
        a = self.args
        k = a.clients
        self.log(f"\n## 2. {k} clients on {k} hosts load {k} different models at once from {max(a.nodes)} warm nodes")
        self.log(f"load average before: {load_average()}")
        self.run_nodes(self.node_names)
        models = []
        for i in range(k):
            url, size = self.model(f"multi{i}.safetensors", a.client_scale, 10 + i)
            path = f"/multi/m{i}.safetensors"
            self.import_and_warm(url, path)
            models.append((path, size))
        hosts: list[Host] = []
        for i in range(k):
            host = self.fleet.client(f"k{i}")
            self.fleet.call(host, AGENT_PRELUDE)
            hosts.append(host)
        for host, (path, _) in zip(hosts, models):  # prime: torch loaded, connections made
            self.fleet.call(host, "timed_load(path)", path=path)
        alone = [self.fleet.call(host, "result = timed_load(path)", path=path) for host, (path, _) in zip(hosts, models)]
        nas_before = self.fleet.nas.counters()
        together: list[float] = [0.0] * k
        start = threading.Barrier(k)

        def go(i: int) -> None:
            start.wait()
            together[i] = self.fleet.call(hosts[i], "result = timed_load(path)", path=models[i][0])

        t0 = time.perf_counter()
        threads = [threading.Thread(target=go, args=(i,)) for i in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        nas_after = self.fleet.nas.counters()
        total = sum(size for _, size in models)
        rows = [(f"client {i}", f"{models[i][1] / MB:.0f}", f"{alone[i]:.2f}", f"{together[i]:.2f}",
                 f"{together[i] / alone[i]:.1f}x") for i in range(k)]
        self.log(table(f"{k} models, {total / MB:.0f} MB in all; {max(a.nodes)} node links = "
                       f"{max(a.nodes) * self.link / MB:.0f} MB/s",
                       rows, ("client", "model MB", "alone s", f"{k} at once s", "at once / alone")))
        self.log(f"\nall {k} at once: {wall:.2f} s wall, {total / wall / MB:.1f} MB/s together "
                 f"(vs {max(a.nodes) * self.link / MB:.0f} MB/s of node links); "
                 f"NAS bytes meanwhile: {nas_after['read_bytes'] - nas_before['read_bytes']} "
                 f"({(nas_after['read_bytes'] - nas_before['read_bytes']) / total * 100:.1f}% of the bytes loaded); "
                 f"load average after: {load_average()}")

    # -- 3. zone loss -------------------------------------------------------------
    def zone_loss(self) -> None:
        a = self.args
        names = self.node_names
        zones = {n: ("a" if i < len(names) // 2 else "b") for i, n in enumerate(names)}
        self.log(f"\n## 3. Zone loss: {len(names)} nodes in zones a and b, 2 replicas; a zone-a client reads in a loop")
        self.log(f"load average before: {load_average()}")
        self.run_nodes(names, zones)
        self.fleet.sdcache(self.client, "replicas", "/zone", "2")
        url, size = self.model("zone.safetensors", a.zone_scale, 50)
        path = "/zone/z.safetensors"
        self.import_and_warm(url, path)
        self.fleet.call(self.client, "start_loop(path)", path=path)
        time.sleep(a.steady)
        nas_before = self.fleet.nas.counters()
        killed_at = time.time()
        for n in names:
            if zones[n] == "a":
                self.fleet.nodes[n].kill()
        time.sleep(a.after)
        got = self.fleet.call(self.client, "result = stop_loop()")
        nas_after = self.fleet.nas.counters()
        lat = got["lat"]
        steady = [d for ts, d in lat if ts < killed_at]
        window = [d for ts, d in lat if killed_at <= ts < killed_at + 10]
        later = [d for ts, d in lat if ts >= killed_at + 10]
        reads_during = sum(1 for s, e in got["reads"] if e >= killed_at)
        errs = got["errors"]
        def phase(name: str, lo: float, hi: float, lat_: list[float]) -> tuple[str, ...]:
            reads = [e - s for s, e in got["reads"] if lo <= e < hi]
            failed = sum(1 for ts, _ in errs if lo <= ts < hi)
            return (name, str(len(reads)), str(failed), f"{statistics.median(reads):.1f}" if reads else "-",
                    str(len(lat_)), f"{_p(lat_, .5) * 1e3:.0f}", f"{_p(lat_, .99) * 1e3:.0f}")

        rows = [phase("steady (both zones)", 0, killed_at, steady),
                phase("first 10 s after zone a is SIGKILLed", killed_at, killed_at + 10, window),
                phase("after that (zone b alone, re-making its 2nd copies)", killed_at + 10, float("inf"), later)]
        self.log(table(f"{size / MB:.0f} MB model read whole through fsspec in a loop; links {self.link / MB:.1f} MB/s",
                       rows, ("phase", "reads ended", "failed reads", "median read s", "chunks", "p50 chunk ms",
                              "p99 chunk ms")))
        self.log(f"\nfailed reads in all: {len(errs)} {errs[:2] if errs else ''}; reads after the kill: {reads_during}; "
                 f"NAS requests during the loss: {nas_after['requests'] - nas_before['requests']}; "
                 f"load average after: {load_average()}")

    def close(self) -> None:
        self.fleet.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link-mbps", type=float, default=100.0, help="each node's and the NAS's link, Mbit/s")
    parser.add_argument("--scale", type=float, default=1.0, help="checkpoint scale (1.0: 2.1 GB)")
    parser.add_argument("--nodes", default="1,2,4,8")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--client-scale", type=float, default=0.1, help="scale of each client's model (0.1: 213 MB)")
    parser.add_argument("--zone-scale", type=float, default=0.1, help="scale of the zone-loss model (0.1: 213 MB)")
    parser.add_argument("--steady", type=float, default=25.0, help="seconds of steady reads before the zone loss")
    parser.add_argument("--after", type=float, default=35.0, help="seconds of reads after it")
    parser.add_argument("--capacity", type=int, default=3 << 30)
    parser.add_argument("--sections", default="scaling,clients,zone")
    parser.add_argument("--workdir", default="/tmp/bench-fleet")
    parser.add_argument("--out", default="/tmp/results_fleet.md")
    args = parser.parse_args()
    args.nodes = [int(n) for n in args.nodes.split(",")]
    why = probe()
    if why:
        print(f"bench_fleet: cannot make the test bed here: {why}", file=sys.stderr)
        return 2
    bench = Bench(args)
    started = time.time()
    head = [
        "# bench_fleet: sdcache on shaped links",
        "",
        f"command: python benchmarks/bench_fleet.py {' '.join(sys.argv[1:])}".rstrip(),
        f"date: 2026-12-01 (run at {datetime.datetime.now().strftime('%H:%M')} local)",
        "machine: 2-vCPU x86_64 VM, shared with four other engineers' work",
        f"links: every node and the NAS {args.link_mbps:g} Mbit/s = {bench.link / MB:.1f} MB/s each way (tc tbf); "
        f"clients and the metadata service unshaped; latency: "
        + ("netem 0.5 ms each way" if netem_available() else "no netem in this kernel: the veth's own (~0.05 ms) "
           "plus the tbf queue's"),
        f"load average at start: {load_average()}",
    ]
    for line in head:
        bench.log(line)
    try:
        sections = args.sections.split(",")
        if "scaling" in sections:
            bench.scaling()
        if "clients" in sections:
            bench.many_clients()
        if "zone" in sections:
            bench.zone_loss()
    finally:
        bench.log(f"\ntook {time.time() - started:.0f} s; load average at the end: {load_average()}")
        bench.close()
        with open(args.out, "w") as f:
            f.write("\n".join(bench.out) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
