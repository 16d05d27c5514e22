"""What Prometheus metrics cost a warm read: collection on against ``SDCACHE_METRICS=0``, in one run.

    python benchmarks/bench_metrics.py [--size 256MiB] [--repeat 7] [--nodes 2]

Two one-host clusters run side by side, each holding the same random file warm
in its nodes' pools: one as built (metrics on), one with ``SDCACHE_METRICS=0``
in the environment of its metadata service and nodes. Each is read by a client
process of its own, the one for the second cluster with ``SDCACHE_METRICS=0``
too (the switch is read once, at import, so one process cannot be both). The
read is fsspec ``open(...).read()`` of the whole file with
``SDCACHE_SHORT_CIRCUIT=0``: every chunk over HTTP from a node (checked with
the fetcher's ``tiers`` counter), the path where a node times each request and
the client each chunk. Rounds are interleaved (the order alternates) so
neighbours' load hits both alike. Ratio: on / off, target >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ["SDCACHE_SHORT_CIRCUIT"] = "0"  # before any fetcher exists: chunks over the network

from _common import load_average, machine, network_read, table, warm_cluster, write_random  # noqa: E402

PATH = "/bench/metrics.bin"
VARIANTS = ("metrics on", "SDCACHE_METRICS=0")


def worker(meta: str, token: str, size: int) -> None:
    """Read PATH whole for every line on stdin; print GB/s (or an error) per read."""
    from sdcache import metrics
    from sdcache.client.fs import SdcacheFileSystem

    fs = SdcacheFileSystem(meta=meta, token=token, skip_instance_cache=True)
    fs.fetcher.short_circuit = False
    print(json.dumps({"metrics": metrics.ENABLED}), flush=True)
    for _ in sys.stdin:
        try:
            print(json.dumps({"gbs": network_read(fs, PATH, size)}), flush=True)
        except RuntimeError as exc:
            print(json.dumps({"error": str(exc)}), flush=True)


class Reader:
    def __init__(self, meta: str, token: str, size: int, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", meta, token, str(size)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.enabled = self._answer()["metrics"]

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"reader exited with status {self.proc.wait()}")
        return json.loads(line)

    def read(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("read\n")
        self.proc.stdin.flush()
        doc = self._answer()
        if "error" in doc:
            raise SystemExit(doc["error"])
        return doc["gbs"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def main() -> None:
    from sdcache.cluster import LocalCluster
    from sdcache.units import format_size, parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256MiB", help="file size (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=7, help="interleaved rounds (default %(default)s)")
    ap.add_argument("--nodes", type=int, default=2, help="nodes per cluster (default %(default)s)")
    ap.add_argument("--workdir", default="/tmp/sdcache-bench-metrics")
    args = ap.parse_args()
    size = parse_size(args.size)
    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, f"random-{size}.bin")
    write_random(src, size)
    switch = ({"SDCACHE_METRICS": "1"}, {"SDCACHE_METRICS": "0"})  # per variant, for every process of it
    load_before = load_average()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    clusters: dict[str, LocalCluster] = {}
    readers: dict[str, Reader] = {}
    try:
        for i, name in enumerate(VARIANTS):
            c, token = warm_cluster(os.path.join(args.workdir, f"cluster{i}"), src, PATH, nodes=args.nodes,
                                    size=size, prefix="bench-metrics-", env=switch[i])
            clusters[name] = c
            env = {**os.environ, **switch[i]}
            readers[name] = Reader(c.meta_addr, token, size, env)
            if readers[name].enabled != (i == 0):
                raise SystemExit(f"{name}: the reader's metrics switch is not what this variant needs")
        for name in VARIANTS:  # connections set up outside the timed rounds
            readers[name].read()
        rounds: list[dict[str, float]] = []
        for r in range(args.repeat):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            rounds.append({name: readers[name].read() for name in order})
            print(f"round {r + 1}: " + ", ".join(f"{n} {rounds[-1][n]:.3f} GB/s" for n in VARIANTS),
                  file=sys.stderr, flush=True)
    finally:
        for rd in readers.values():
            rd.close()
        for c in clusters.values():
            c.stop()
            shutil.rmtree(c.pool_root, ignore_errors=True)
    load_after = load_average()

    med = {n: statistics.median(r[n] for r in rounds) for n in VARIANTS}
    best = {n: max(r[n] for r in rounds) for n in VARIANTS}
    ratio = med[VARIANTS[0]] / med[VARIANTS[1]]
    per_round = statistics.median(r[VARIANTS[0]] / r[VARIANTS[1]] for r in rounds)
    gbs = lambda x: f"{x:.3f} GB/s"  # noqa: E731
    rows = [(f"warm fsspec read {format_size(size)}, {args.nodes} nodes, HTTP, metrics on", gbs(med[VARIANTS[0]]),
             "SDCACHE_METRICS=0 (nodes, meta, client)", gbs(med[VARIANTS[1]]),
             f"{ratio:.2f}x (per round {per_round:.2f}x)", ">= 0.97x" + ("" if ratio >= 0.97 else ": **missed**"))]
    title = (f"sdcache metrics cost — {started} — {machine()} — load average {load_before} before, "
             f"{load_after} after — {args.repeat} interleaved rounds, medians")
    print(table(title, rows, ("measure", "sdcache", "comparison", "comparison value", "ratio", "target")))
    print(table("per variant", [(n, gbs(med[n]), gbs(best[n]), " ".join(f"{r[n]:.3f}" for r in rounds))
                                for n in VARIANTS], ("variant", "median", "best", "rounds (GB/s)")))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
