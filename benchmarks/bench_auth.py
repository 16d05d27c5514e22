"""What auth and TLS cost a warm read over the network, each beside its same-run comparison.

    python benchmarks/bench_auth.py [--size 512MiB] [--repeat 5] [--nodes 2]

Three one-host clusters run side by side, each holding the same random file
warm in its nodes' pools:

- ``auth, plaintext``: bearer tokens checked on every chunk GET (the default);
- ``no auth``: ``--insecure-no-auth`` on the metadata service and the nodes;
- ``auth, TLS``: tokens plus ``--tls-cert/--tls-key/--tls-ca`` on every server,
  the client verifying them against a CA made for this run (``tests/_pki.py``).

Rounds are interleaved (each round reads from all three, in a rotating order)
in one process, so load from neighbours hits every variant alike. The read is
fsspec ``open(...).read()`` of the whole file with ``SDCACHE_SHORT_CIRCUIT=0``:
chunks travel over HTTP(S) from the nodes, never from shared memory (checked
with the fetcher's ``tiers`` counter). Ratios: auth on / auth off (target >=
0.95) and TLS on / TLS off, both with auth (aim 0.7).
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # the repository, for tests/_pki.py
os.environ["SDCACHE_SHORT_CIRCUIT"] = "0"  # before any fetcher exists: chunks over the network

from _common import load_average, machine, network_read, table, warm_cluster, write_random  # noqa: E402

from sdcache.client.fs import SdcacheFileSystem  # noqa: E402
from sdcache.cluster import LocalCluster  # noqa: E402
from sdcache.tls import TlsFiles  # noqa: E402
from sdcache.units import format_size, parse_size  # noqa: E402
from tests._pki import make_pki  # noqa: E402

PATH = "/bench/auth.bin"
VARIANTS = ("auth, plaintext", "no auth (--insecure-no-auth)", "auth, TLS")


def _cipher(address: str, tls: TlsFiles) -> str:
    """The TLS version and cipher a client negotiates with the node at *address*."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPSConnection(host.strip("[]"), int(port), timeout=10, context=tls.client_context())
    try:
        conn.connect()
        name, version, _ = conn.sock.cipher()  # type: ignore[union-attr]
        return f"{version} {name}"
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="512MiB", help="file size (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds (default %(default)s)")
    ap.add_argument("--nodes", type=int, default=2, help="nodes per cluster (default %(default)s)")
    ap.add_argument("--workdir", default="/tmp/sdcache-bench-auth")
    args = ap.parse_args()
    size = parse_size(args.size)
    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, f"random-{size}.bin")
    write_random(src, size)
    pki = make_pki(os.path.join(args.workdir, "pki"), "bench_auth CA")
    tls_flags = ["--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-ca", pki.ca]
    specs = {
        VARIANTS[0]: {},
        VARIANTS[1]: {"meta_args": ["--insecure-no-auth"]},
        VARIANTS[2]: {"meta_args": tls_flags, "node_args": tls_flags, "env": {"SDCACHE_TLS_CA": pki.ca}},
    }
    load_before = load_average()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    clusters: dict[str, LocalCluster] = {}
    fss: dict[str, SdcacheFileSystem] = {}
    cipher = ""
    try:
        for i, (name, spec) in enumerate(specs.items()):
            c, token = warm_cluster(os.path.join(args.workdir, f"cluster{i}"), src, PATH, nodes=args.nodes,
                                    size=size, prefix="bench-auth-", **spec)
            clusters[name] = c
            tls = TlsFiles(ca=pki.ca) if "TLS" in name else None
            fss[name] = SdcacheFileSystem(meta=c.meta_addr, token=token, tls_ca=tls and tls.ca,
                                          skip_instance_cache=True)
            fss[name].fetcher.short_circuit = False
            if tls:
                cipher = _cipher(c.node_children[0].address, tls)

        def read(name: str) -> float:
            try:
                return network_read(fss[name], PATH, size)
            except RuntimeError as exc:
                raise SystemExit(f"{name}: {exc}") from None

        for name in VARIANTS:  # connections (and TLS sessions) set up outside the timed rounds
            read(name)
        rounds: list[dict[str, float]] = []
        for r in range(args.repeat):
            order = VARIANTS[r % 3:] + VARIANTS[: r % 3]
            rounds.append({name: read(name) for name in order})
            print(f"round {r + 1}: " + ", ".join(f"{n} {rounds[-1][n]:.2f} GB/s" for n in VARIANTS),
                  file=sys.stderr, flush=True)
    finally:
        for c in clusters.values():
            c.stop()
            shutil.rmtree(c.pool_root, ignore_errors=True)
    load_after = load_average()

    med = {n: statistics.median(r[n] for r in rounds) for n in VARIANTS}
    best = {n: max(r[n] for r in rounds) for n in VARIANTS}
    gbs = lambda x: f"{x:.2f} GB/s"  # noqa: E731
    auth_ratio = med[VARIANTS[0]] / med[VARIANTS[1]]
    tls_ratio = med[VARIANTS[2]] / med[VARIANTS[0]]
    per_round = statistics.median(r[VARIANTS[0]] / r[VARIANTS[1]] for r in rounds), \
        statistics.median(r[VARIANTS[2]] / r[VARIANTS[0]] for r in rounds)
    rows = [
        (f"fsspec read {format_size(size)}, {args.nodes} nodes, HTTP, auth on", gbs(med[VARIANTS[0]]),
         "--insecure-no-auth", gbs(med[VARIANTS[1]]), f"{auth_ratio:.2f}x (per round {per_round[0]:.2f}x)",
         ">= 0.95x" + ("" if auth_ratio >= 0.95 else ": **missed**")),
        (f"fsspec read {format_size(size)}, {args.nodes} nodes, HTTPS ({cipher}), auth on", gbs(med[VARIANTS[2]]),
         "HTTP, auth on", gbs(med[VARIANTS[0]]), f"{tls_ratio:.2f}x (per round {per_round[1]:.2f}x)",
         "aim 0.7x" + ("" if tls_ratio >= 0.7 else ": missed")),
    ]
    title = (f"sdcache auth and TLS cost — {started} — {machine()} — load average {load_before} before, "
             f"{load_after} after — {args.repeat} interleaved rounds, medians")
    print(table(title, rows, ("measure", "sdcache", "comparison", "comparison value", "ratio", "target")))
    print(table("per variant", [(n, gbs(med[n]), gbs(best[n]), " ".join(f"{r[n]:.2f}" for r in rounds))
                                for n in VARIANTS], ("variant", "median", "best", "rounds (GB/s)")))


if __name__ == "__main__":
    main()
