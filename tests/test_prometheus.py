"""A real Prometheus server scrapes a test cluster while the test reads files through it.

The distribution's ``prometheus`` binary runs as a subprocess with a generated
config (1 s scrapes, the read token in a ``credentials_file``) on a free port.
It scrapes the metadata service's ``--metrics-listen``, each node's ``/metrics``
on its chunk port, and this process's client metrics (the fsspec client the
test reads with). The test then asks Prometheus's HTTP API what an operator's
Prometheus would see: every target up, the counters moved by exactly what the
reads imply, and every query of ``deploy/grafana/sdcache.json`` evaluating
without error and returning data. A gateway (``sdcache serve``'s API in front of
the runner registry, no torch) is scraped too, and answers a few A1111 requests
so that the serving panels have data.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdcache import errors, metrics
from sdcache.chunking import CHUNK_SIZE
from sdcache.client.fs import SdcacheFileSystem
from sdcache.client.importer import import_file
from sdcache.client.metaclient import MetaClient
from sdcache.cluster import LocalCluster
from sdcache.placement import plan_file

from ._serving import API_PASS, API_USER, serve_process
from .conftest import TOKEN_KEY, mint_token, wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "sdcache.json"
EXAMPLE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
SCRAPE_INTERVAL = "1s"
RATE_WINDOW = "1m"  # what $__rate_interval stands for when the test evaluates the dashboard's queries
# The metrics of `sdcache serve` and `sdcache gateway` (serving/metrics.py, kernels/metrics.py).
SERVING_PREFIXES = ("sdcache_runner_", "sdcache_serve_", "sdcache_gateway_")
# Panels over these alone are exempt from "returns data": a serve process exports them once its runner
# is built (torch and diffusers imported), and this test starts no runner, only a gateway (which does
# not import torch). Their queries must still evaluate; tests/test_deploy.py checks that a real serve
# process exports every serving metric the dashboard names.
NEEDS_A_RUNNER = ("sdcache_runner_model_load_seconds", "sdcache_runner_lora_switch_seconds",
                  "sdcache_runner_denoise_seconds")


def free_port() -> int:
    """A port nothing listens on now (for the processes that cannot report the port they bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the Prometheus server


@dataclass
class Prometheus:
    """A running ``prometheus`` subprocess and the few HTTP API calls the test needs."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: str

    def log_tail(self, n: int = 2000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        """``data`` of a ``/api/v1`` answer; an error answer fails the test with Prometheus's message."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400/422: a query Prometheus rejected, with its reason
            doc = json.loads(exc.read() or b"{}")
        assert doc.get("status") == "success", f"Prometheus {path} {params}: {doc.get('errorType')}: {doc.get('error')}"
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return data["result"]

    def value(self, expr: str) -> float:
        """The one value of an aggregating *expr* now; 0 when it has no series yet (a counter never incremented)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} is not one series: {result}"
        return float(result[0]["value"][1]) if result else 0.0

    def by(self, label: str, expr: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets", state="active")["activeTargets"]

    def settle(self, targets: int) -> None:
        """Wait for a scrape of every target that started after this call: what was done before, it has seen."""
        since = time.time()

        def scraped() -> bool:
            stamps = [float(r["value"][1]) for r in self.query("timestamp(up)")]
            return len(stamps) == targets and min(stamps) > since

        wait_for(scraped, f"a scrape of all {targets} targets", timeout=15, step=0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_prometheus(workdir: str, jobs: dict[str, tuple[list[str], str | None]]) -> Prometheus:
    """``prometheus`` scraping *jobs* (name -> (targets, bearer token file or None)) every second."""
    scrape_configs = []
    for name, (targets, token_file) in jobs.items():
        job: dict[str, Any] = {"job_name": name, "static_configs": [{"targets": targets}]}
        if token_file:
            job["authorization"] = {"type": "Bearer", "credentials_file": token_file}
        scrape_configs.append(job)
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                   "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": scrape_configs,
    }
    config_path = os.path.join(workdir, "prometheus.yml")
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)  # JSON is YAML
    listen = f"127.0.0.1:{free_port()}"
    log_path = os.path.join(workdir, "prometheus.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [shutil.which("prometheus") or "prometheus", f"--config.file={config_path}",
             f"--web.listen-address={listen}", f"--storage.tsdb.path={os.path.join(workdir, 'tsdb')}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    prom = Prometheus(f"http://{listen}", proc, log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited with status {proc.returncode}: {prom.log_tail()}")
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:  # not listening yet, or 503 while it starts
            return False

    try:
        wait_for(ready, "prometheus to be ready", timeout=30, step=0.05)
    except BaseException:
        prom.stop()
        raise
    return prom


# --------------------------------------------------------------------------- the scraped processes


@pytest.fixture
def metrics_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Two nodes and a metadata service with ``--metrics-listen`` on a free port."""
    pool_root = tempfile.mkdtemp(prefix="sdcache-test-pool-", dir="/dev/shm")
    c = LocalCluster(str(tmp_path / "meta"), nodes=2, capacity=256 << 20, heartbeat_interval=0.3,
                     pool_root=pool_root, token_key=TOKEN_KEY,
                     meta_args=["--metrics-listen", f"127.0.0.1:{free_port()}"])
    try:
        with c:
            yield c
    finally:
        shutil.rmtree(pool_root, ignore_errors=True)


class ClientExposition(metrics.Exposition):
    """What a mount exports, from this process: the client's and FUSE's metrics only.

    Other tests in this process may have registered node or runner metrics; served here they would
    feed panels that must get their data from the real nodes (or, for the runner, from nothing).
    """

    def collect(self) -> Iterator[Any]:
        return (f for f in super().collect() if f.name.startswith(("sdcache_client_", "sdcache_fuse_")))


@pytest.fixture
def client_metrics() -> Iterator[str]:
    """This process's client metrics (the fsspec client the test reads with), served the way a mount serves them."""
    server = metrics.MetricsServer("127.0.0.1:0", ClientExposition(), None)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def read_token_file(tmp_path: Path) -> str:
    path = tmp_path / "prometheus.token"
    path.write_text(mint_token("read", "prom") + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def gateway(metrics_cluster: LocalCluster, tmp_path: Path) -> Iterator[str]:
    """A real ``sdcache gateway`` over the cluster (no runner registers), with one checkpoint it can name.

    The checkpoint is a one-tensor safetensors file: the gateway plans a request from the catalog alone
    (it never loads a model), so a txt2img naming it is planned, finds no runner, and is answered 503.
    """
    from safetensors.numpy import save_file

    checkpoint = tmp_path / "prom-sd1.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4), np.float16)}, str(checkpoint))
    meta = MetaClient(metrics_cluster.meta_addr)
    try:
        import_file(meta, str(checkpoint), "/models/checkpoints/prom-sd1.safetensors")
    finally:
        meta.close()
    g = serve_process(metrics_cluster, tmp_path, "gateway", command="gateway", token=mint_token("node", "gateway"))
    try:
        yield g.start().address
    finally:
        g.stop()


def _a1111(gateway: str, method: str, route: str, body: Any = None) -> int:
    """The status of one A1111 API call to *gateway*, logged in as an ``--api-auth`` user."""
    import base64

    login = base64.b64encode(f"{API_USER}:{API_PASS}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{gateway}/sdapi/v1/{route}", data=data, method=method,
                                     headers={"Authorization": f"Basic {login}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _meta_metrics_address(cluster: LocalCluster) -> str:
    return cluster.meta.argv[cluster.meta.argv.index("--metrics-listen") + 1]  # type: ignore[union-attr]


def _write_random(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


# --------------------------------------------------------------------------- the dashboard


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, panel description, PromQL) for every target of every panel, rows included."""
    doc = json.loads(DASHBOARD.read_text())
    out = []
    stack = list(doc["panels"])
    while stack:
        p = stack.pop(0)
        stack.extend(p.get("panels", []))
        for t in p.get("targets", []):
            out.append((p["title"], p.get("description", ""), t["expr"]))
    return out


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bsdcache_[a-z0-9_]+", expr))


def family(name: str) -> str:
    """The metric a series name belongs to (a histogram's ``_bucket``, ``_sum`` and ``_count`` are its own)."""
    return re.sub(r"_(bucket|sum|count)$", "", name)


def needs_a_runner(expr: str) -> bool:
    return all(family(n) in NEEDS_A_RUNNER for n in metric_names(expr))


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    """Offline: the JSON Grafana imports, one datasource input used by every query, no unknown variables."""
    doc = json.loads(DASHBOARD.read_text())
    assert 36 <= doc["schemaVersion"] <= 41
    assert [i["name"] for i in doc["__inputs"]] == ["DS_PROMETHEUS"]
    assert doc["__inputs"][0]["pluginId"] == "prometheus"
    assert any(v["name"] == "DS_PROMETHEUS" and v["type"] == "datasource" for v in doc["templating"]["list"])
    ids = []
    for p in doc["panels"]:
        ids.append(p["id"])
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
            # Grafana fills in $__rate_interval; any other variable would reach Prometheus unexpanded.
            assert "$" not in t["expr"].replace("$__rate_interval", ""), (p["title"], t["expr"])
            assert metric_names(t["expr"]), (p["title"], t["expr"])
    assert len(ids) == len(set(ids))
    serving = [(title, desc, expr) for title, desc, expr in dashboard_queries()
               if all(n.startswith(SERVING_PREFIXES) for n in metric_names(expr))]
    charted = {family(n) for _, _, expr in serving for n in metric_names(expr)}
    # What an operator of the serving layer watches: issue 9's API, queue and routing counters.
    assert charted >= {"sdcache_runner_model_load_seconds", "sdcache_runner_queue_depth",
                       "sdcache_runner_queue_wait_seconds", "sdcache_runner_queue_rejected_total",
                       "sdcache_serve_requests_total", "sdcache_serve_request_seconds",
                       "sdcache_gateway_routed_total", "sdcache_gateway_base_switches_total"}, sorted(charted)
    for title, desc, _ in serving:  # which process to scrape for it
        assert "`sdcache serve`" in desc or "`sdcache gateway`" in desc, title


def test_the_serving_panels_chart_metrics_serve_and_gateway_define() -> None:
    """The serving panels' names are the ones serve, gateway and the runner define (the live test has no runner)."""
    import prometheus_client

    import sdcache.kernels.metrics  # noqa: F401 - registers the runner's metrics
    import sdcache.serving.metrics  # noqa: F401 - the queue's, serve's and the gateway's

    defined = {f.name + ("_total" if f.type == "counter" else "") for f in prometheus_client.REGISTRY.collect()}
    used = {family(n) for _, _, expr in dashboard_queries() for n in metric_names(expr)
            if n.startswith(SERVING_PREFIXES)}
    assert used and used <= defined, sorted(used - defined)


@pytest.mark.requires("prometheus")
def test_the_example_prometheus_config_is_valid(tmp_path: Path) -> None:
    """promtool accepts deploy/prometheus/prometheus.yml, every job sending the token as a bearer credential."""
    token = tmp_path / "sdcache.token"
    token.write_text(mint_token("read", "prom") + "\n")
    text = EXAMPLE_CONFIG.read_text()
    assert text.count("credentials_file: /etc/prometheus/sdcache.token") == text.count("job_name:") == 5
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/etc/prometheus/sdcache.token", str(token)))  # promtool checks it exists
    proc = subprocess.run([shutil.which("promtool") or "promtool", "check", "config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- the live test


@pytest.mark.requires("prometheus")
def test_prometheus_scrapes_the_cluster_and_the_dashboard_queries_return_data(
        metrics_cluster: LocalCluster, client_metrics: str, gateway: str, read_token_file: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Targets up (and a tokenless scrape refused), counters moved exactly as the reads imply, dashboard live.

    A warm 10-chunk file read over HTTP adds 10 pool hits, split over the nodes as placement owns the
    chunks, and its size to pool-served bytes and to the client's node-tier bytes; a cold 5-chunk file
    adds 5 misses and its size to under-store bytes. An unreadable source and a missing path show up as
    under-store errors, client failovers and a NOT_FOUND RPC error. Through the gateway, an A1111 listing
    counts one 200, a txt2img naming no known model one 404, and one with no runner registered one 503 and
    one failed routing. Then every dashboard query evaluates and, but for those that need a runner
    (NEEDS_A_RUNNER), returns data.
    """
    cluster = metrics_cluster
    monkeypatch.setenv("SDCACHE_SHORT_CIRCUIT", "0")  # every chunk over HTTP, as from another host
    nodes = [child.address for child in cluster.node_children]
    jobs = {
        "sdcache-meta": ([_meta_metrics_address(cluster)], read_token_file),
        "sdcache-node": (nodes, read_token_file),
        "sdcache-client": ([client_metrics], read_token_file),
        "sdcache-gateway": ([gateway], read_token_file),
        "sdcache-node-no-token": ([nodes[0]], None),  # must be refused: /metrics needs a read token
    }
    n_targets = sum(len(targets) for targets, _ in jobs.values())
    meta = MetaClient(cluster.meta_addr)
    fs = SdcacheFileSystem(meta=cluster.meta_addr, skip_instance_cache=True)
    assert fs.fetcher.short_circuit is False
    live = meta.nodes(refresh=True)
    assert sorted(n.address for n in live) == sorted(nodes)  # a node's instance label is its chunk address

    prom = start_prometheus(str(tmp_path), jobs)
    try:
        # -- every target is up; the one without a token is refused ----------------------------
        def scraped_once() -> list[dict[str, Any]] | None:
            ts = prom.targets()
            return ts if len(ts) == n_targets and all(t["health"] != "unknown" for t in ts) else None

        targets = wait_for(scraped_once, "a first scrape of every target", timeout=15, step=0.1)
        health = {(t["labels"]["job"], t["labels"]["instance"]): (t["health"], t["lastError"]) for t in targets}
        for (job, instance), (state, error) in health.items():
            if job == "sdcache-node-no-token":
                assert state == "down" and "401" in error, (job, instance, state, error)
            else:
                assert state == "up", f"{job} {instance} is {state}: {error}"
        assert prom.value('max(sdcache_meta_live_nodes{job="sdcache-meta"})') == 2

        # -- a warm file read over HTTP: one pool hit per chunk, on the chunk's owner ---------
        a = _write_random(tmp_path / "warm.bin", 9 * CHUNK_SIZE + 1234, seed=1)
        ma = import_file(meta, str(a), "/prom/warm.bin").manifest
        for _ in meta.warmup(["/prom/warm.bin"]):
            pass
        plan = plan_file(ma.chunks, live, ma.replicas)
        owners = Counter(plan[ref.id][0].address for ref in ma.chunks)
        assert len(ma.chunks) == 10 and len({ref.id for ref in ma.chunks}) == 10
        prom.settle(n_targets)
        hits = 'sum(sdcache_node_chunk_requests_total{job="sdcache-node",result="hit"})'
        misses = 'sum(sdcache_node_chunk_requests_total{job="sdcache-node",result="miss"})'
        pool_bytes = 'sum(sdcache_node_served_bytes_total{job="sdcache-node",source="pool"})'
        under_bytes = 'sum(sdcache_node_served_bytes_total{job="sdcache-node",source="understore"})'
        node_tier = 'sum(sdcache_client_fetch_bytes_total{job="sdcache-client",tier="node"})'
        hits_by_node = 'sum by (instance) (sdcache_node_chunk_requests_total{job="sdcache-node",result="hit"})'
        before = {e: prom.value(e) for e in (hits, misses, pool_bytes, under_bytes, node_tier)}
        before_by_node = prom.by("instance", hits_by_node)

        assert fs.cat_file("/prom/warm.bin") == a.read_bytes()
        prom.settle(n_targets)
        after = {e: prom.value(e) for e in before}
        after_by_node = prom.by("instance", hits_by_node)
        assert after[hits] - before[hits] == len(ma.chunks)
        assert {i: after_by_node.get(i, 0) - before_by_node.get(i, 0) for i in nodes} == {i: owners[i] for i in nodes}
        assert after[misses] == before[misses]
        assert after[pool_bytes] - before[pool_bytes] == ma.size
        assert after[under_bytes] == before[under_bytes]
        assert after[node_tier] - before[node_tier] == ma.size

        # -- a cold file: one miss per chunk, its bytes read through from the under-store ------
        b = _write_random(tmp_path / "cold.bin", 4 * CHUNK_SIZE + 99, seed=2)
        mb = import_file(meta, str(b), "/prom/cold.bin").manifest
        understore = 'sum(sdcache_node_understore_bytes_total{job="sdcache-node"})'
        before = {e: prom.value(e) for e in (hits, misses, pool_bytes, under_bytes, node_tier, understore)}
        assert fs.cat_file("/prom/cold.bin") == b.read_bytes()
        prom.settle(n_targets)
        after = {e: prom.value(e) for e in before}
        assert after[misses] - before[misses] == len(mb.chunks) == 5
        assert after[hits] == before[hits]
        assert after[under_bytes] - before[under_bytes] == mb.size
        assert after[understore] - before[understore] == mb.size
        assert after[pool_bytes] == before[pool_bytes]
        assert after[node_tier] - before[node_tier] == mb.size

        # -- failures the error panels show: an unreadable source, a missing path --------------
        c = _write_random(tmp_path / "broken.bin", 1000, seed=3)
        import_file(meta, str(c), "/prom/broken.bin")
        c.unlink()
        c.mkdir()  # still there, but no longer readable as a file: Unavailable, not stale
        under_errors = 'sum(sdcache_node_understore_errors_total{job="sdcache-node",kind="error"})'
        retries = 'sum(sdcache_client_fetch_retries_total{job="sdcache-client"})'
        rpc_errors = 'sum(sdcache_meta_rpc_errors_total{job="sdcache-meta",code="NOT_FOUND"})'
        before = {e: prom.value(e) for e in (under_errors, retries, rpc_errors)}
        with pytest.raises(errors.Unavailable):
            fs.cat_file("/prom/broken.bin")
        with pytest.raises(FileNotFoundError):
            meta.stat("/prom/no-such-file")
        prom.settle(n_targets)
        after = {e: prom.value(e) for e in before}
        assert after[under_errors] - before[under_errors] == 2  # the owner, then the other node
        assert after[retries] > before[retries]
        assert after[rpc_errors] > before[rpc_errors]

        # -- the A1111 API through the gateway: a listing, and a request no runner can take -----
        api = 'sum(sdcache_serve_requests_total{job="sdcache-gateway",route="/sdapi/v1/%s",code="%s"})'
        failed = 'sum(sdcache_gateway_routed_total{job="sdcache-gateway",outcome="failed"})'
        before = {e: prom.value(e) for e in (api % ("samplers", 200), api % ("txt2img", 503), api % ("txt2img", 404),
                                             failed)}
        assert _a1111(gateway, "GET", "samplers") == 200
        for model, status in (("prom-sd1.safetensors", 503), ("no-such-model", 404)):
            body = {"prompt": "a lighthouse", "steps": 2, "override_settings": {"sd_model_checkpoint": model}}
            assert _a1111(gateway, "POST", "txt2img", body) == status, model
        prom.settle(n_targets)
        after = {e: prom.value(e) for e in before}
        assert {e: after[e] - before[e] for e in before} == {e: 1 for e in before}

        # -- every dashboard query: valid PromQL over series that exist ------------------------
        # rate() needs two samples of a series: one more scrape for those the errors above created
        # (an RPC error's {method, code} exists from its first occurrence on).
        prom.settle(n_targets)
        empty = []
        for title, _, expr in dashboard_queries():
            result = prom.query(expr.replace("$__rate_interval", RATE_WINDOW))  # fails on an error answer
            if not result and not needs_a_runner(expr):  # NEEDS_A_RUNNER: this test starts none
                empty.append(f"{title}: {expr}")
        assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
    except BaseException:
        print(f"prometheus log:\n{prom.log_tail()}")
        raise
    finally:
        prom.stop()
        meta.close()
