"""Chaos soak: readers keep reading warm models while nodes, the metadata service and pool files fail.

    python benchmarks/soak.py [--readers 6] [--models 4] [--model-size 48MiB] [--minutes 5] [--seed 1] [--json]

A real one-host cluster (:class:`sdcache.cluster.LocalCluster`: the metadata
service and ``--nodes`` cache nodes as subprocesses, auth on) holds ``--models``
warm models: random-weight SD-shaped ``.safetensors`` files (``sdcache.synth``;
they share their VAE and text-encoder tensors, so chunk ids repeat across
files) alternating with random-bytes ``.bin`` files, imported with the real
importer and warmed. The sources stay in place, so every read must succeed:
the client fails over node -> node -> under-store.

``--readers`` reader processes (half over HTTP with ``SDCACHE_SHORT_CIRCUIT=0``,
half reading same-host pools directly) read through ``fsspec.filesystem("sdcache")``
for ``--minutes``: whole files (checked by sha256), ranges with ``cat_file``
(fresh manifest each time) and ranges on long-lived open files, each compared
byte for byte with the source. Meanwhile the parent, at random (``--seed``):

* SIGKILLs a cache node and restarts it a few seconds later on its pool directory;
* SIGKILLs the metadata service and restarts it on the same port;
* flips one byte of a random chunk file in a random node's pool.

Prints the reads, bytes, wrong bytes, failed reads and p50/p99 latency, per
path and kind of read, and for reads that began while something was down (or
within :data:`FAULT_WINDOW_S` of it coming back, or of a corruption) vs the
others; then what chaos happened.
Exits 1 if any byte was wrong or any read failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, table  # noqa: E402

from sdcache.chunking import CHUNK_SIZE  # noqa: E402
from sdcache.units import format_size, parse_size  # noqa: E402

FAULT_WINDOW_S = 1.0  # a read that began this soon after a fault was mended counts as during it
CHAOS_INTERVAL_S = (1.5, 4.0)  # seconds between two faults, uniform
HANG_GRACE_S = 90.0  # a reader still busy this long after the end is hung: killed, its read failed
OPS = ("whole", "cat_range", "open_range")  # kinds of read, see Reader.read_once
OP_WEIGHTS = (2, 3, 4)
REOPEN_EVERY = 25  # reads on one open file before it is reopened (a fresh manifest)


@dataclass
class Model:
    path: str  # cache path
    source: str  # local source file (left in place)
    size: int
    sha256: str


# --------------------------------------------------------------------------- reader process


def compare(got: bytes, want: bytes | memoryview) -> int:
    """Wrong bytes in *got* against *want*: differing positions plus any length difference."""
    import numpy as np

    n = min(len(got), len(want))
    a = np.frombuffer(got, dtype=np.uint8, count=n)
    b = np.frombuffer(want, dtype=np.uint8, count=n)
    return int(np.count_nonzero(a != b)) + abs(len(got) - len(want))


class Reader:
    """One reader process: random reads of the models, each checked, one JSON line per read."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        import fsspec

        self.cfg = cfg
        self.rng = random.Random(cfg["seed"])
        self.models = [Model(**m) for m in cfg["models"]]
        self._maps = {}
        for m in self.models:
            with open(m.source, "rb") as f:
                self._maps[m.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        options = {"token": cfg["token"]} if cfg["token_option"] else {}  # else $SDCACHE_TOKEN
        self.fs = fsspec.filesystem("sdcache", meta=cfg["meta"], skip_instance_cache=True, **options)
        self.open_files: dict[str, tuple[Any, int]] = {}  # path -> (file, reads left)
        self.out = open(cfg["results"], "w")

    def _range(self, size: int) -> tuple[int, int]:
        kind = self.rng.random()
        if kind < 0.3:
            n = self.rng.randint(1, 4096)  # small, often inside one chunk
        elif kind < 0.8:
            n = self.rng.randint(1, 2 * CHUNK_SIZE)  # across a boundary or two
        else:
            n = self.rng.randint(2 * CHUNK_SIZE, 6 * CHUNK_SIZE)
        n = min(n, size)
        start = size - n if self.rng.random() < 0.1 else self.rng.randint(0, size - n)  # sometimes the tail
        return start, start + n

    def _handle(self, m: Model) -> Any:
        f, left = self.open_files.get(m.path, (None, 0))
        if f is None or left <= 0:
            if f is not None:
                f.close()
            f = self.fs.open(m.path, "rb")
            left = REOPEN_EVERY
        self.open_files[m.path] = (f, left - 1)
        return f

    def read_once(self) -> dict[str, Any]:
        m = self.rng.choice(self.models)
        op = self.rng.choices(OPS, OP_WEIGHTS)[0]
        start, end = (0, m.size) if op == "whole" else self._range(m.size)
        rec: dict[str, Any] = {"t": time.time(), "op": op, "model": m.path, "start": start, "end": end,
                               "bytes": 0, "wrong": 0, "err": None}
        t0 = time.perf_counter()
        try:
            if op == "whole":
                got = self.fs.cat_file(m.path)
            elif op == "cat_range":
                got = self.fs.cat_file(m.path, start, end)
            else:
                f = self._handle(m)
                f.seek(start)
                got = f.read(end - start)
        except Exception as exc:  # noqa: BLE001 - every failure is a result to report
            rec["lat"] = time.perf_counter() - t0
            rec["err"] = f"{type(exc).__name__}: {exc}"[:500]
            f, _ = self.open_files.pop(m.path, (None, 0))
            if f is not None:
                try:
                    f.close()
                except Exception:  # noqa: BLE001
                    pass
            return rec
        rec["lat"] = time.perf_counter() - t0
        rec["bytes"] = len(got)
        if op == "whole" and len(got) == m.size and hashlib.sha256(got).hexdigest() == m.sha256:
            return rec
        rec["wrong"] = compare(got, memoryview(self._maps[m.path])[start:end])
        return rec

    def run(self, deadline: float) -> None:
        while time.time() < deadline:
            rec = self.read_once()
            self.out.write(json.dumps(rec) + "\n")
            self.out.flush()
        tiers = dict(self.fs.fetcher.tiers)
        self.out.write(json.dumps({"final": True, "tiers": tiers}) + "\n")
        self.out.close()


def reader_main(config_path: str) -> int:
    with open(config_path) as f:
        cfg = json.load(f)
    reader = Reader(cfg)
    reader.fs.meta.nodes(refresh=True)  # connected before the clock starts
    print("ready", flush=True)
    line = sys.stdin.readline().split()  # "go DEADLINE" once every reader is ready
    if not line or line[0] != "go":
        return 1
    reader.run(float(line[1]))
    return 0


# --------------------------------------------------------------------------- models and cluster


def make_models(workdir: str, count: int, size: int, seed: int) -> list[str]:
    """*count* source files of about *size* bytes: SD-shaped .safetensors alternating with random .bin."""
    from sdcache.synth import write_sd_checkpoint

    out = []
    rng = random.Random(seed)
    for i in range(count):
        if i % 2 == 0:
            path = os.path.join(workdir, f"model{i}.safetensors")
            write_sd_checkpoint(path, size / 2.07e9, unet_seed=seed * 1000 + i, shared_seed=seed)
        else:
            path = os.path.join(workdir, f"model{i}.bin")
            with open(path, "wb") as f:
                left = size
                while left:
                    n = min(left, 8 << 20)
                    f.write(rng.randbytes(n))
                    left -= n
        out.append(path)
    return out


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while b := f.read(8 << 20):
            h.update(b)
    return h.hexdigest()


@dataclass
class Chaos:
    """What the parent broke, when."""

    node_kills: int = 0
    node_restarts: int = 0
    meta_restarts: int = 0
    corruptions: int = 0
    skipped_corruptions: int = 0  # the chosen pool had no chunk file
    events: list[tuple[float, str]] = field(default_factory=list)
    faults: list[tuple[float, float]] = field(default_factory=list)  # (broken, mended) wall times

    def note(self, what: str) -> float:
        now = time.time()
        self.events.append((now, what))
        return now


def chunk_files(pool_dir: str) -> list[str]:
    """Every chunk file in a pool directory (``<pool>/<id[:2]>/<id>``, see sdcache.pool_layout)."""
    out = []
    try:
        with os.scandir(pool_dir) as top:
            for d in top:
                if len(d.name) == 2 and d.is_dir(follow_symlinks=False):
                    with os.scandir(d.path) as inner:
                        out.extend(e.path for e in inner if e.name[:2] == d.name)
    except FileNotFoundError:
        pass
    return out


def flip_byte(path: str, rng: random.Random) -> bool:
    """Flip one byte of *path* in place (the inode a node and same-host readers use)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False  # evicted or replaced meanwhile
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return False
        pos = rng.randrange(size)
        b = os.pread(fd, 1, pos)
        os.pwrite(fd, bytes([b[0] ^ 0xFF]), pos)
        return True
    finally:
        os.close(fd)


class ChaosMonkey:
    """Breaks a LocalCluster at random times: node kills, metadata restarts, corrupted chunk files."""

    KINDS = ("node_kill", "meta_restart", "corrupt")
    WEIGHTS = (4, 2, 4)

    def __init__(self, cluster: Any, rng: random.Random, interval: tuple[float, float] = CHAOS_INTERVAL_S) -> None:
        self.cluster = cluster
        self.rng = rng
        self.interval = interval
        self.chaos = Chaos()
        self.down: dict[int, tuple[float, float]] = {}  # node index -> (when to restart it, when killed)
        self._first = list(self.KINDS)
        rng.shuffle(self._first)  # every kind happens early, then at random

    def _restart_due(self, now: float, force: bool = False) -> None:
        for i, (when, killed) in sorted(self.down.items()):
            if force or when <= now:
                self.cluster.add_node(i).wait_ready()
                del self.down[i]
                self.chaos.node_restarts += 1
                self.chaos.faults.append((killed, self.chaos.note(f"node{i} restarted")))

    def step(self) -> None:
        kind = self._first.pop(0) if self._first else self.rng.choices(self.KINDS, self.WEIGHTS)[0]
        nodes = self.cluster.node_children
        if kind == "node_kill":
            up = [i for i in range(len(nodes)) if i not in self.down]
            if len(up) <= 1:  # keep one node serving; the under-store is still behind it
                kind = "corrupt"
            else:
                i = self.rng.choice(up)
                nodes[i].signal(signal.SIGKILL)
                nodes[i].proc.wait()
                killed = self.chaos.note(f"node{i} SIGKILL")
                self.down[i] = (time.monotonic() + self.rng.uniform(1.0, 5.0), killed)
                self.chaos.node_kills += 1
        if kind == "meta_restart":
            self.cluster.meta.signal(signal.SIGKILL)
            self.cluster.meta.proc.wait()
            killed = self.chaos.note("meta SIGKILL")
            time.sleep(self.rng.uniform(0.0, 1.5))  # down for a while, not just a restart
            self.cluster.restart_meta()
            self.chaos.meta_restarts += 1
            self.chaos.faults.append((killed, self.chaos.note("meta restarted")))
        if kind == "corrupt":
            i = self.rng.randrange(len(nodes))
            files = chunk_files(os.path.join(self.cluster.pool_root, f"node{i}"))
            if files and flip_byte(self.rng.choice(files), self.rng):
                self.chaos.corruptions += 1
                now = self.chaos.note(f"node{i} chunk corrupted")
                self.chaos.faults.append((now, now))
            else:
                self.chaos.skipped_corruptions += 1

    def run_until(self, deadline: float) -> None:
        """Break things until wall time *deadline*, then bring every node back."""
        next_at = time.time() + self.rng.uniform(*self.interval) / 2
        while True:
            now = time.time()
            self._restart_due(time.monotonic())
            if now >= deadline:
                break
            if now >= next_at:
                self.step()
                next_at = time.time() + self.rng.uniform(*self.interval)
            time.sleep(min(0.05, max(0.0, deadline - now)))
        self._restart_due(time.monotonic(), force=True)


def node_stats(cluster: Any) -> dict[str, int]:
    """Summed /stats counters of the nodes now up (they count since their last restart)."""
    total: Counter[str] = Counter()
    for c in cluster.node_children:
        if not c.address:
            continue
        req = urllib.request.Request(f"http://{c.address}/stats",
                                     headers={"Authorization": f"Bearer {cluster.admin_token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                doc = json.load(resp)
        except OSError:
            continue
        for k in ("corrupt_dropped", "hits", "misses"):
            total[k] += int(doc.get(k, 0))
    return dict(total)


# --------------------------------------------------------------------------- the soak


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [r["lat"] for r in records]
    return {
        "reads": len(records),
        "bytes": sum(r["bytes"] for r in records),
        "wrong_bytes": sum(r["wrong"] for r in records),
        "failed_reads": sum(1 for r in records if r["err"]),
        "p50_ms": ms(pct(lat, 0.50)),
        "p99_ms": ms(pct(lat, 0.99)),
        "max_ms": ms(max(lat, default=None)),
    }


def run_soak(*, readers: int = 6, models: int = 4, model_size: int = 48 << 20, minutes: float = 5.0,
             seed: int = 1, nodes: int = 3, workdir: str | None = None, token_key: str | None = None,
             interval: tuple[float, float] = CHAOS_INTERVAL_S) -> dict[str, Any]:
    """Run the soak and return its report (see the module docstring)."""
    from sdcache.client.importer import import_file
    from sdcache.client.metaclient import MetaClient
    from sdcache.cluster import LocalCluster

    rng = random.Random(seed)
    own_workdir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="sdcache-soak-")
    os.makedirs(workdir, exist_ok=True)
    pool_root = tempfile.mkdtemp(prefix="sdcache-soak-pool-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    t_setup = time.time()
    sources = make_models(os.path.join(workdir, ""), models, model_size, seed)
    total = sum(os.path.getsize(p) for p in sources)
    # Room for every model on every node: the owner keeps its chunks warm, the others keep what they read through.
    cluster = LocalCluster(os.path.join(workdir, "cluster"), nodes=nodes, capacity=max(64 << 20, 2 * total),
                           heartbeat_interval=0.5, pool_root=pool_root, token_key=token_key)
    shutil.rmtree(cluster.data_dir, ignore_errors=True)
    procs: list[subprocess.Popen[str]] = []
    report: dict[str, Any] = {}
    try:
        cluster.start()
        meta = MetaClient(cluster.meta_addr, credentials=cluster.credentials)
        try:
            specs = []
            for i, src in enumerate(sources):
                dest = f"/soak/{os.path.basename(src)}"
                import_file(meta, src, dest)
                specs.append(Model(dest, src, os.path.getsize(src), sha256_file(src)))
            for _ in meta.warmup([m.path for m in specs]):
                pass
        finally:
            meta.close()
        setup_s = time.time() - t_setup

        env = dict(os.environ, SDCACHE_TOKEN=cluster.admin_token)
        env.pop("SDCACHE_TOKEN_FILE", None)
        results = []
        for i in range(readers):
            short_circuit = i % 2 == 1  # even readers over HTTP, odd ones from same-host pools
            res = os.path.join(workdir, f"reader{i}.jsonl")
            cfg = {"meta": cluster.meta_addr, "token": cluster.admin_token, "token_option": i % 4 < 2,
                   "seed": seed * 7919 + i, "models": [asdict(m) for m in specs], "results": res}
            cfg_path = os.path.join(workdir, f"reader{i}.json")
            with open(cfg_path, "w") as f:
                json.dump(cfg, f)
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--reader", cfg_path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                stderr=open(os.path.join(workdir, f"reader{i}.log"), "w"),
                env=dict(env, SDCACHE_SHORT_CIRCUIT="1" if short_circuit else "0")))
            results.append((res, "short-circuit" if short_circuit else "HTTP"))
        for i, p in enumerate(procs):
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"reader {i} did not start (see {workdir}/reader{i}.log)")
        start = time.time()
        deadline = start + minutes * 60
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"go {deadline}\n")
            p.stdin.close()

        monkey = ChaosMonkey(cluster, rng, interval)
        monkey.run_until(deadline)
        hung = 0
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline + HANG_GRACE_S - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                hung += 1
        stats = node_stats(cluster)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        cluster.stop()
        shutil.rmtree(pool_root, ignore_errors=True)

    records: list[dict[str, Any]] = []
    tiers: Counter[str] = Counter()
    exits = []
    for (path, kind), p in zip(results, procs):
        exits.append(p.returncode)
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("final"):
                    tiers.update(rec["tiers"])
                    continue
                rec["path"] = kind
                records.append(rec)
    faults = monkey.chaos.faults

    def near_fault(r: dict[str, Any]) -> bool:
        return any(broken <= r["t"] <= mended + FAULT_WINDOW_S for broken, mended in faults)

    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for kind in ("short-circuit", "HTTP"):
        for op in OPS:
            groups.append((f"{kind}, {op}", [r for r in records if r["path"] == kind and r["op"] == op]))
    groups.append((f"all, began during a fault (+{FAULT_WINDOW_S:.0f} s)", [r for r in records if near_fault(r)]))
    groups.append(("all, other times", [r for r in records if not near_fault(r)]))
    groups.append(("all", records))
    errors_seen = Counter(r["err"].split(":")[0] for r in records if r["err"])
    chaos = asdict(monkey.chaos)
    chaos.pop("events")
    chaos.pop("faults")
    report = {
        "options": {"readers": readers, "models": models, "model_size": model_size, "minutes": minutes,
                    "seed": seed, "nodes": nodes},
        "model_bytes": total,
        "setup_s": setup_s,
        "churn_s": deadline - start,
        "groups": {name: summarize(recs) for name, recs in groups},
        "total": summarize(records),
        "hung_readers": hung,
        "reader_exits": exits,
        "errors": dict(errors_seen),
        "first_errors": [r["err"] for r in records if r["err"]][:5],
        "wrong_reads": [{k: r[k] for k in ("op", "model", "start", "end", "wrong")}
                        for r in records if r["wrong"]][:5],
        "chaos": chaos,
        "events": [(round(t - start, 2), what) for t, what in monkey.chaos.events],
        "tiers": dict(tiers),
        "node_stats_at_end": stats,
    }
    report["total"]["failed_reads"] += hung  # a hung reader's last read never came back
    if own_workdir and report["total"]["failed_reads"] == 0 and report["total"]["wrong_bytes"] == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        report["workdir"] = workdir  # reader logs and per-read records, kept for a look
    return report


def format_report(report: dict[str, Any], argv: list[str]) -> str:
    o = report["options"]
    rows = []
    for name, g in report["groups"].items():
        fmt = lambda v, d: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        rows.append((name, str(g["reads"]), format_size(g["bytes"]), str(g["wrong_bytes"]), str(g["failed_reads"]),
                     fmt(g["p50_ms"], 1), fmt(g["p99_ms"], 1), fmt(g["max_ms"], 0)))
    title = (f"sdcache chaos soak — {time.strftime('%Y-%m-%d %H:%M')} — {machine()} — "
             f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
             f"{o['readers']} readers, {o['models']} models x {format_size(o['model_size'])} "
             f"({format_size(report['model_bytes'])}), {o['nodes']} nodes, {report['churn_s']:.0f} s of churn, "
             f"seed {o['seed']}\ncommand: python {' '.join(argv)}")
    out = [table(title, rows, ("reads", "count", "bytes", "wrong bytes", "failed", "p50 ms", "p99 ms", "max ms"))]
    c = report["chaos"]
    t = report["tiers"]
    chaos_rows = [
        ("cache nodes SIGKILLed / restarted", f"{c['node_kills']} / {c['node_restarts']}"),
        ("metadata service SIGKILLed and restarted", str(c["meta_restarts"])),
        ("pool chunk files corrupted (one byte flipped)", str(c["corruptions"])),
        ("chunks served: same-host pool / node HTTP / under-store",
         f"{t.get('local', 0)} / {t.get('node', 0)} / {t.get('under', 0)}"),
        ("corrupt chunks dropped by nodes (since their last restart)",
         str(report["node_stats_at_end"].get("corrupt_dropped", 0))),
        ("hung readers", str(report["hung_readers"])),
    ]
    out.append(table("chaos", chaos_rows, ("event", "count")))
    if report["errors"]:
        out.append(f"\nerrors: {report['errors']}\nfirst: {report['first_errors']}")
    if report["wrong_reads"]:
        out.append(f"\nwrong reads: {report['wrong_reads']}")
    if "workdir" in report:
        out.append(f"\nrecords and logs kept in {report['workdir']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--reader"]:
        return reader_main(argv[1])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readers", type=int, default=6, help="reader processes (half over HTTP; default 6)")
    ap.add_argument("--models", type=int, default=4, help="warm models read (default 4)")
    ap.add_argument("--model-size", default="48MiB", help="size of each model (default 48MiB)")
    ap.add_argument("--minutes", type=float, default=5.0, help="minutes of churn (default 5)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the models, the reads and the chaos")
    ap.add_argument("--nodes", type=int, default=3, help="cache nodes (default 3)")
    ap.add_argument("--workdir", default=None, help="where sources, logs and records go (default a temp dir)")
    ap.add_argument("--token-key", default=None, help="signing key for the metadata service (default its own)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    if args.readers < 1 or args.models < 1 or args.nodes < 2:
        ap.error("need at least one reader, one model and two nodes")
    report = run_soak(readers=args.readers, models=args.models, model_size=parse_size(args.model_size),
                      minutes=args.minutes, seed=args.seed, nodes=args.nodes, workdir=args.workdir,
                      token_key=args.token_key)
    shown = ["benchmarks/soak.py", *argv]
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report, shown))
    bad = report["total"]["wrong_bytes"] or report["total"]["failed_reads"] or any(report["reader_exits"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
