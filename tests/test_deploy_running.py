"""deploy/kubernetes, run: each overlay's processes brought up here the way the kubelet would run them.

* The rendered command and arguments, ``$(VAR)`` expanded from the container's env, every path
  under a volume mount mapped to a local folder holding what that volume would (Secrets built by
  replaying docs/DEPLOY.md's recipes, memory-backed emptyDirs as a tmpfs of their sizeLimit).
  Only addresses change: ``--listen`` becomes ``127.0.0.1:0`` (its port is what the probes must
  name) and ``--meta sdcache-meta:7070`` the local service. Then every probe runs as the kubelet
  runs it: GET without a token (HTTPS unverified), the gRPC health check, the exec command.
* The runners and the gateway run the same way against the running metadata service: /healthz
  at once, /readyz once the runner is built (torch) and registered, and the gateway ready only
  once a runner is; the gateway logs A1111 users in from the Secret DEPLOY.md makes, and every
  serving metric the dashboard charts is exported.

The offline checks are in ``test_deploy.py``; the helpers both use are in ``_deploy.py``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sdcache import auth
from sdcache.client.metaclient import MetaClient
from sdcache.meta import health
from sdcache.tls import Credentials, TlsFiles
from sdcache.units import parse_size

from ._deploy import (
    DASHBOARD,
    META_SERVICE,
    NAMESPACE,
    OVERLAYS,
    ROOT,
    SERVE_READY,
    SERVERS,
    START,
    argv_of,
    container_env,
    expand,
    find,
    flag_value,
    k8s_quantity,
    pod_containers,
    port_of,
    probes,
    rendered,
    secret_recipes,
    servers_of,
    shell_blocks,
)

# -- the overlays, run ----------------------------------------------------------------------------


@dataclass
class Operator:
    """The deploy machine of DEPLOY.md: the recipe's files, and the tokens §6 would mint."""

    workdir: Path
    key: Any
    recipes: dict[str, list[tuple[str, str]]]

    def secret_files(self, name: str) -> dict[str, bytes]:
        files = {}
        for key, source in self.recipes[name]:
            kind, _, value = source.partition(":")
            files[key] = (self.workdir / value).read_bytes() if kind == "file" else value.encode()
        return files


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Operator:
    """Run DEPLOY.md's openssl recipe (GPU hosts: 127.0.0.1) and mint the tokens with its key."""
    if not shutil.which("openssl"):
        pytest.fail("openssl is missing (scripts/install.sh installs it)")
    workdir = tmp_path_factory.mktemp("operator")
    (block,) = [b for b in shell_blocks() if "openssl req -x509" in b]
    block, n = re.subn(r'^gpu_hosts="[^"]*"', 'gpu_hosts="127.0.0.1"', block, flags=re.M)
    assert n == 1, "the recipe's gpu_hosts line changed; this test sets it"
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=workdir, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    key, created = auth.load_or_create_key(workdir / "token.key")
    assert not created
    for role, file in (("node", "node.token"), ("read", "read.token"), ("admin", "admin.token")):
        (workdir / file).write_text(auth.mint(key, f"deploy-{role}", role) + "\n")
    return Operator(workdir, key, secret_recipes())


@dataclass
class Running:
    """One container of a rendered pod, running here."""

    workload: str
    container: dict[str, Any]
    mounts: dict[str, str]  # mountPath -> local folder
    manifest_port: int | None  # the port of its --listen in the manifest
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    log: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # what the manifest sets, paths already local

    def local(self, text: str) -> str:
        """*text* with every container path under a mount replaced by the local folder (one pass)."""
        if not self.mounts:
            return text
        alternatives = "|".join(re.escape(m) for m in sorted(self.mounts, key=len, reverse=True))
        pattern = rf"(?<![\w./-])({alternatives})(?=$|[/'\"])"
        return re.sub(pattern, lambda m: self.mounts[m.group(1)], text)

    def log_text(self) -> str:
        return self.log.read_text() if self.log and self.log.exists() else ""


class Kubelet:
    """Runs rendered containers on this machine, as far as a kubelet's job can be done here."""

    def __init__(self, docs: tuple[dict[str, Any], ...], operator: Operator, tmp: Path) -> None:
        self.docs, self.operator, self.tmp = docs, operator, tmp
        self.running: list[Running] = []
        self.tmpfs: list[str] = []

    def _volume_dir(self, workload: dict[str, Any], volume: dict[str, Any], pod_dir: Path) -> str:
        path = pod_dir / volume["name"]
        path.mkdir(parents=True, exist_ok=True)
        if "secret" in volume:
            for key, data in self.operator.secret_files(volume["secret"]["secretName"]).items():
                (path / key).write_bytes(data)
                os.chmod(path / key, 0o600)
        elif "configMap" in volume:
            for key, data in find(self.docs, "ConfigMap", volume["configMap"]["name"]).get("data", {}).items():
                (path / key).write_text(data)
        elif volume.get("emptyDir", {}).get("medium") == "Memory":
            size = k8s_quantity(volume["emptyDir"]["sizeLimit"])
            # What the kubelet makes: a tmpfs of sizeLimit bytes (SizeMemoryBackedVolumes).
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                self.tmpfs.append(str(path))
            else:
                # As root (CI) the mount must work: its failure is a failure, not a skip.
                assert os.geteuid() != 0, f"mount -t tmpfs failed as root: {proc.stderr.strip()}"
                free = shutil.disk_usage("/dev/shm").free
                if size > free:
                    pytest.skip(f"a {volume['emptyDir']['sizeLimit']} memory emptyDir needs a tmpfs mount "
                                f"(root): {proc.stderr.strip()}")
                path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="sdcache-deploy-"))
        return str(path)

    def prepare(self, kind: str, name: str, container: str, pod_name: str) -> tuple[Running, list[str], dict[str, str]]:
        workload = find(self.docs, kind, name)
        pod = workload["spec"]["template"]["spec"]
        c = next(c for c in pod_containers(pod) if c["name"] == container)
        pod_dir = self.tmp / pod_name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for claim in workload["spec"].get("volumeClaimTemplates", []):
            volumes[claim["metadata"]["name"]] = {"name": claim["metadata"]["name"]}  # a fresh volume: a folder
        mounts = {m["mountPath"]: self._volume_dir(workload, volumes[m["name"]], pod_dir) for m in c["volumeMounts"]}
        referenced = {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                      if "secretKeyRef" in e.get("valueFrom", {})}
        env = container_env(c, pod_name, {n: self.operator.secret_files(n) for n in referenced})
        argv = [expand(a, env) for a in argv_of(c)]
        assert not [a for a in argv if "$(" in a], f"{name}: an undefined variable in {argv}"
        listen = flag_value(argv, "--listen")
        run = Running(name, c, mounts, port_of(listen) if listen else None, log=self.tmp / f"{pod_name}-{container}.log")
        run.env = {k: run.local(v) for k, v in env.items()}
        argv = [run.local(a) for a in argv]
        return run, argv, env

    def start(self, run: Running, argv: list[str], meta: str | None) -> Running:
        argv = list(argv)
        port = 0
        if argv[1] == "serve":
            # serve's --ready-file names the address it advertises (a DNS name here), not the one it bound
            # (sdcache.hostport.write_ready_file says the bound one): give it a port that is free now.
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
        if "--listen" in argv:
            argv[argv.index("--listen") + 1] = f"127.0.0.1:{port}"
        if "--metrics-listen" in argv:  # no fixed port, no wildcard address in a test
            argv[argv.index("--metrics-listen") + 1] = "127.0.0.1:0"
        if meta and "--meta" in argv:
            assert argv[argv.index("--meta") + 1] == f"{META_SERVICE}:7070"
            argv[argv.index("--meta") + 1] = meta
        ready = self.tmp / f"{run.workload}.ready"
        if argv[1] in SERVERS:
            argv += ["--ready-file", str(ready)]
        # A pod's environment: what its manifest sets, nothing of this test's SDCACHE_* variables.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDCACHE_")} | run.env
        assert run.log is not None
        with open(run.log, "wb") as log:
            run.proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.running.append(run)
        if argv[1] in SERVERS:
            deadline = time.monotonic() + START
            while not ready.exists():
                assert run.proc.poll() is None, f"{run.workload} exited:\n{run.log_text()}"
                assert time.monotonic() < deadline, f"{run.workload} did not start:\n{run.log_text()}"
                time.sleep(0.05)
            run.address = f"127.0.0.1:{port}" if port else ready.read_text().strip()
        return run

    def exec_probe(self, run: Running, probe: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        cmd = [run.local(a) for a in probe["exec"]["command"]]
        assert cmd[0] == "python"
        cmd[0] = sys.executable
        if run.manifest_port is not None:  # the probe dials the pod's own listen port
            assert port_of(cmd[-1]) == run.manifest_port
            cmd[-1] = f"{cmd[-1].rsplit(':', 1)[0]}:{port_of(run.address)}"
        return subprocess.run(cmd, capture_output=True, text=True, timeout=probe.get("timeoutSeconds", 1) + 30)

    @staticmethod
    def stop(run: Running) -> None:
        """SIGTERM, as the kubelet sends; SIGKILL after a grace period."""
        if run.proc and run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)
            try:
                run.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait()

    def stop_all(self) -> None:
        for run in reversed(self.running):
            self.stop(run)
        for path in self.tmpfs:
            subprocess.run(["umount", path], capture_output=True)


@dataclass
class Deployed:
    overlay: str
    kubelet: Kubelet
    meta: Running
    nodes: list[Running] = field(default_factory=list)


@pytest.fixture(scope="module", params=OVERLAYS)
def deployed(request: pytest.FixtureRequest, operator: Operator,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """The overlay's metadata service and one pod of each node workload, running here."""
    docs = rendered(request.param)
    kubelet = Kubelet(docs, operator, tmp_path_factory.mktemp(request.param))
    try:
        run, argv, _ = kubelet.prepare("StatefulSet", "sdcache-meta", "meta", "sdcache-meta-0")
        meta = kubelet.start(run, argv, None)
        d = Deployed(request.param, kubelet, meta)
        for kind, name, pod_name in (("DaemonSet", "sdcache-node-gpu", "sdcache-node-gpu-x7k2p"),
                                     ("StatefulSet", "sdcache-node-memory", "sdcache-node-memory-0")):
            run, argv, _ = kubelet.prepare(kind, name, "node", pod_name)
            d.nodes.append(kubelet.start(run, argv, meta.address))
        yield d
    finally:
        kubelet.stop_all()


def _credentials(d: Deployed, role: str = "admin") -> Credentials:
    tls = d.meta.mounts.get("/etc/sdcache/tls")
    token = auth.mint(d.kubelet.operator.key, f"test-{role}", role)
    return Credentials(token, TlsFiles(ca=os.path.join(tls, "ca.crt")) if tls else None)


def test_meta_probes_answer(deployed: Deployed) -> None:
    run = deployed.meta
    for kind, probe in probes(run.container):
        if "grpc" in probe:  # what the kubelet does: plaintext, no token
            status = health.check(f"127.0.0.1:{port_of(run.address)}", service=probe["grpc"].get("service", ""))
            assert status == "SERVING", kind
        else:
            proc = deployed.kubelet.exec_probe(run, probe)
            assert proc.returncode == 0, f"{kind}: {proc.stderr}"
    assert deployed.overlay != "two-zone" or all("exec" in p for _, p in probes(run.container))


def test_node_probes_answer_without_a_token(deployed: Deployed) -> None:
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE  # as the kubelet: HTTPS probes skip verification
    for run in deployed.nodes:
        for kind, probe in probes(run.container):
            get = probe["httpGet"]
            url = f"{get.get('scheme', 'HTTP').lower()}://127.0.0.1:{port_of(run.address)}{get['path']}"
            with urllib.request.urlopen(url, timeout=10, context=unverified) as reply:
                assert reply.status == 200, f"{run.workload} {kind}"


def test_nodes_register_as_the_manifests_say(deployed: Deployed) -> None:
    client = MetaClient(deployed.meta.address, credentials=_credentials(deployed))
    try:
        deadline = time.monotonic() + START
        while len(nodes := client.nodes_raw()) < 2:
            assert time.monotonic() < deadline, [n.node_id for n in nodes]
            time.sleep(0.1)
    finally:
        client.close()
    by_id = {n.node_id: n for n in nodes}
    assert by_id["test-host-1"].role == "gpu" and by_id["test-host-1"].address == "127.0.0.1:7071"
    memory = by_id["sdcache-node-memory-0"]
    assert memory.role == "memory"
    assert memory.address == "sdcache-node-memory-0.sdcache-node-memory.sdcache.svc:7071"
    for run in deployed.nodes:
        env = container_env(run.container, "pod-0")
        capacity = parse_size(expand(flag_value(argv_of(run.container), "--capacity") or "", env))
        node = by_id["test-host-1" if run.workload.endswith("gpu") else "sdcache-node-memory-0"]
        assert node.capacity == capacity


@pytest.mark.requires("fuse")
def test_mount_sidecar_mounts_and_its_probes_pass(deployed: Deployed) -> None:
    kubelet = deployed.kubelet
    run, argv, _ = kubelet.prepare("Deployment", "sdcache-example-app", "sdcache-mount", "sdcache-example-app-abc")
    run.manifest_port = None
    mountpoint = run.mounts["/mnt/sdcache"]
    try:
        kubelet.start(run, argv, deployed.meta.address)
        startup = run.container["startupProbe"]
        deadline = time.monotonic() + startup["periodSeconds"] * startup["failureThreshold"]
        while kubelet.exec_probe(run, startup).returncode != 0:
            assert run.proc is not None and run.proc.poll() is None, f"mount exited:\n{run.log_text()}"
            assert time.monotonic() < deadline, f"never mounted:\n{run.log_text()}"
            time.sleep(0.2)
        assert kubelet.exec_probe(run, run.container["livenessProbe"]).returncode == 0
        assert os.path.ismount(mountpoint) and os.listdir(mountpoint) == []  # nothing imported yet
    finally:
        assert run.proc is not None
        run.proc.send_signal(signal.SIGTERM)  # what the kubelet sends; it unmounts
        assert run.proc.wait(timeout=30) == 0, run.log_text()
    assert not os.path.ismount(mountpoint)


# -- the serving layer, run ---------------------------------------------------------------------


def _has_gpu() -> bool:
    return Path("/dev/nvidiactl").exists()


@dataclass
class Serving:
    """One runner pod and one gateway pod of the overlay, running here against its metadata service."""

    serve: Running
    gateway: Running
    gateway_alone: int  # the gateway's /readyz status before any runner existed
    serve_at_start: dict[str, int]  # the runner's probe statuses right after it listened

    def readiness(self, run: Running) -> dict[str, Any]:
        return next(p for k, p in probes(run.container) if k == "readinessProbe")

    def wait_ready(self) -> None:
        """Until both are ready; the gateway is never ready while the runner is not."""
        deadline = time.monotonic() + SERVE_READY
        while True:
            gateway = probe_status(self.gateway, self.readiness(self.gateway))
            serve = probe_status(self.serve, self.readiness(self.serve))
            if serve == 200:
                break
            # The runner was not ready after the gateway answered, so it was not ready before: no runner
            # could take a request, and the gateway must have said so.
            assert gateway == 503, "the gateway was ready while its only runner was not"
            for run in (self.serve, self.gateway):
                assert run.proc is not None and run.proc.poll() is None, f"{run.workload} exited:\n{run.log_text()}"
            assert time.monotonic() < deadline, f"the runner was not ready in {SERVE_READY}s:\n{self.serve.log_text()}"
            time.sleep(0.2)
        while probe_status(self.gateway, self.readiness(self.gateway)) != 200:
            assert time.monotonic() < deadline + START, f"the gateway never saw the runner:\n{self.gateway.log_text()}"
            time.sleep(0.1)


def _unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # as the kubelet: HTTPS probes skip verification
    return ctx


def http_get(run: Running, path: str, scheme: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET *path* from the process behind *run* (HTTPS unverified, as the kubelet and this test's client)."""
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port_of(run.address)}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=_unverified()) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def probe_status(run: Running, probe: dict[str, Any]) -> int:
    get = probe["httpGet"]
    assert get["port"] == run.manifest_port  # the probe names the port the process listens on
    return http_get(run, get["path"], get.get("scheme", "HTTP").lower())[0]


def scheme_of(run: Running) -> str:
    return "https" if "--tls-cert" in argv_of(run.container) else "http"


@pytest.fixture(scope="module")
def serving(deployed: Deployed) -> Iterator[Serving]:
    """The gateway, then one runner, from their rendered args, against the deployed metadata service."""
    kubelet = deployed.kubelet
    run, argv, _ = kubelet.prepare("Deployment", "sdcache-gateway", "gateway", "sdcache-gateway-5c7d9-x2mq4")
    gateway = kubelet.start(run, argv, deployed.meta.address)
    started: list[Running] = [gateway]
    try:
        alone = probe_status(gateway, next(p for k, p in probes(gateway.container) if k == "readinessProbe"))
        run, argv, _ = kubelet.prepare("StatefulSet", "sdcache-serve", "serve", "sdcache-serve-0")
        # The one change besides addresses: the two-zone runner says --device cuda, and this machine (like
        # CI) has no GPU. serve would start and stay unready ("the runner did not start"), which is right on a
        # host without a GPU but tests nothing here; on the CPU it builds the same runner.
        if flag_value(argv, "--device") == "cuda" and not _has_gpu():
            argv[argv.index("--device") + 1] = "cpu"
        serve = kubelet.start(run, argv, deployed.meta.address)
        started.append(serve)
        at_start = {k: probe_status(serve, p) for k, p in probes(serve.container)}
        yield Serving(serve, gateway, alone, at_start)
    finally:
        for r in reversed(started):
            kubelet.stop(r)


def test_serving_probes_answer_as_the_manifests_say(serving: Serving) -> None:
    """Alive at once; the runner ready once its pipeline is built, the gateway once a runner is."""
    assert serving.gateway_alone == 503, "a gateway with no runner must not get traffic"
    assert serving.serve_at_start["livenessProbe"] == 200, "liveness while torch imports: else the pod restarts forever"
    assert serving.serve_at_start["readinessProbe"] in (503, 200)
    serving.wait_ready()
    for run in (serving.serve, serving.gateway):
        for kind, probe in probes(run.container):
            assert probe_status(run, probe) == 200, f"{run.workload} {kind}"
        assert {k for k, _ in probes(run.container)} == {"readinessProbe", "livenessProbe"}


def test_runner_registers_at_the_name_the_gateway_dials(deployed: Deployed, serving: Serving) -> None:
    """The registry holds the pod's name and DNS name; under TLS, the runner's certificate verifies for it."""
    from sdcache._proto import meta_pb2 as pb
    from sdcache._proto import meta_pb2_grpc as pbg
    from sdcache.meta import grpcauth

    serving.wait_ready()
    channel = grpcauth.channel(deployed.meta.address, _credentials(deployed))
    try:
        runners = pbg.MetaStub(channel).ListRunners(pb.RunnersRequest(), timeout=10).runners
    finally:
        channel.close()
    assert [(r.runner_id, r.address) for r in runners] == [
        ("sdcache-serve-0", f"sdcache-serve-0.sdcache-serve.{NAMESPACE}.svc:7860")]
    if deployed.overlay != "two-zone":
        assert scheme_of(serving.serve) == scheme_of(serving.gateway) == "http"
        return
    # What the gateway's HTTPS call to that address checks, and what a client of the gateway's Service checks.
    for run, name in ((serving.serve, runners[0].address.rsplit(":", 1)[0]),
                      (serving.gateway, f"sdcache-gateway.{NAMESPACE}.svc"), (serving.gateway, "localhost")):
        ctx = ssl.create_default_context(cafile=os.path.join(run.mounts["/etc/sdcache/tls"], "ca.crt"))
        with socket.create_connection(("127.0.0.1", port_of(run.address)), timeout=10) as sock:
            with ctx.wrap_socket(sock, server_hostname=name) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3"), name
        with pytest.raises(ssl.SSLCertVerificationError):  # and it has teeth
            with socket.create_connection(("127.0.0.1", port_of(run.address)), timeout=10) as sock:
                ctx.wrap_socket(sock, server_hostname=META_SERVICE)


def test_gateway_logs_in_the_a1111_users_of_the_secret(deployed: Deployed, serving: Serving) -> None:
    """The user DEPLOY.md puts in sdcache-api-auth logs in with HTTP Basic, as an A1111 client does."""
    serving.wait_ready()  # bearer tokens need the token keys, which come with the registry
    recipe = deployed.kubelet.operator.secret_files("sdcache-api-auth")["api-auth"].decode()
    user, _, password = recipe.split(",")[0].partition(":")
    gateway, scheme = serving.gateway, scheme_of(serving.gateway)

    def basic(u: str, p: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()}

    status, body = http_get(gateway, "/sdapi/v1/sd-models", scheme, basic(user, password))
    assert status == 200 and json.loads(body) == []  # nothing imported: an empty list, as A1111 gives
    assert http_get(gateway, "/sdapi/v1/sd-models", scheme, basic(user, password + "x"))[0] == 401
    assert http_get(gateway, "/sdapi/v1/sd-models", scheme)[0] == 401
    read = auth.mint(deployed.kubelet.operator.key, "test-read", "read")  # programs: a read token
    assert http_get(gateway, "/sdapi/v1/samplers", scheme, {"Authorization": f"Bearer {read}"})[0] == 200


def test_serving_exports_what_the_dashboard_charts(deployed: Deployed, serving: Serving) -> None:
    """Scraped where the annotations say, with a read token: every serving metric of the dashboard exists."""
    from prometheus_client.parser import text_string_to_metric_families

    serving.wait_ready()
    read = {"Authorization": f"Bearer {auth.mint(deployed.kubelet.operator.key, 'test-prometheus', 'read')}"}
    exported: dict[str, set[str]] = {}
    for run in (serving.serve, serving.gateway):
        annotations = find(deployed.kubelet.docs, "StatefulSet" if run is serving.serve else "Deployment",
                           run.workload)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == run.manifest_port
        status, body = http_get(run, annotations["prometheus.io/path"], scheme_of(run), read)
        assert status == 200, body
        exported[run.workload] = {f.name + ("_total" if f.type == "counter" else "")
                                  for f in text_string_to_metric_families(body.decode())}
    charted = set()
    panels = list(json.loads(DASHBOARD.read_text())["panels"])
    while panels:
        panel = panels.pop()
        panels += panel.get("panels", [])
        for target in panel.get("targets", []):
            names = re.findall(r"\bsdcache_[a-z0-9_]+", target["expr"])
            charted |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}  # a histogram's series: its name
    for prefix, run in (("sdcache_runner_", serving.serve), ("sdcache_serve_", serving.serve),
                        ("sdcache_serve_", serving.gateway), ("sdcache_gateway_", serving.gateway)):
        wanted = {n for n in charted if n.startswith(prefix)}
        assert wanted and wanted <= exported[run.workload], (run.workload, sorted(wanted - exported[run.workload]))


def test_dockerfile_builds_what_the_manifests_run() -> None:
    """Two targets: the default (last) stage without torch, `runner` with it; both run as the pods' user."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    stages = re.split(r"^(?=FROM )", text, flags=re.M)[1:]
    assert all(st.startswith("FROM python:3.11-slim") for st in stages)
    runner = [st for st in stages if re.match(r"FROM \S+ AS runner$", st, flags=re.M)]
    assert len(runner) == 1 and "[s3,runner]" in runner[0], "serve needs torch and diffusers (the runner extra)"
    plain = stages[-1]  # what `docker build` without --target makes
    assert "fuse3" in plain and "[fuse,s3]" in plain and "runner" not in plain.split("\n", 1)[0]
    assert "torch" not in plain and "runner]" not in plain
    users = {m.groups() for m in re.finditer(r"^USER (\d+):(\d+)$", text, flags=re.M)}
    assert len(users) == 1 and all("USER " in st for st in (runner[0], plain))
    for overlay in OVERLAYS:
        for w, _ in servers_of(rendered(overlay)):
            ctx = w["spec"]["template"]["spec"]["securityContext"]
            assert (str(ctx["runAsUser"]), str(ctx["runAsGroup"])) in users
