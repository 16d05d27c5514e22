"""deploy/kubernetes, checked offline: schemas, rendering, flags and documentation.

* Every YAML file parses; every kustomization renders with kustomize (``kustomize build`` or
  ``kubectl kustomize``; ``scripts/install.sh`` makes sure one is there) and every rendered
  object is valid against the Kubernetes schemas (``kubernetes-validate``, strict).
* Every container of the sdcache image runs a real ``sdcache`` subcommand (or the zone script
  the kustomization ships), and every flag it passes is in that subcommand's ``--help``; so is
  every ``sdcache`` command in docs/DEPLOY.md.
* Probes, Services, pool sizes, placement, GPUs and the serving topology are as the manifests
  promise; the zone initContainer's script reads a Node from a stand-in API server.

The overlays brought up as real processes are in ``test_deploy_running.py``; the helpers both
use are in ``_deploy.py``.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sdcache.units import parse_size

from ._deploy import (
    BUILDABLE,
    DEPLOY_MD,
    FOREIGN_CONTAINERS,
    K8S_VERSIONS,
    KUBE,
    KUSTOMIZATIONS,
    META_SERVICE,
    NAMESPACE,
    OVERLAYS,
    ROOT,
    RUNNER_IMAGE,
    argv_of,
    check_flags,
    check_sdcache_argv,
    container_env,
    expand,
    find,
    flag_value,
    help_flags,
    image_name,
    is_sdcache_image,
    k8s_quantity,
    _kustomization,
    pod_containers,
    port_of,
    probes,
    render,
    rendered,
    sdcache_invocations,
    secret_recipes,
    servers_of,
    workloads,
)
from ._pki import make_pki


def test_every_yaml_file_parses_and_belongs_to_a_kustomization() -> None:
    used: set[Path] = set()
    for folder in KUSTOMIZATIONS:
        k = _kustomization(folder)
        for entry in [*k.get("resources", []), *k.get("components", [])]:
            target = (folder / entry).resolve()
            assert target.exists(), f"{folder.relative_to(ROOT)} names {entry}, which does not exist"
            used.add(target)
        for patch in k.get("patches", []):
            if "path" in patch:  # else an inline patch
                used.add((folder / patch["path"]).resolve())
        for gen in k.get("configMapGenerator", []):
            used.update((folder / f).resolve() for f in gen.get("files", []))
    files = sorted(KUBE.rglob("*.yaml"))
    assert files
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert docs and all(isinstance(d, (dict, list)) for d in docs), f"{f.relative_to(ROOT)}: not YAML objects"
        if f.name != "kustomization.yaml":
            assert f.resolve() in used, f"{f.relative_to(ROOT)} is in no kustomization"


@pytest.mark.parametrize("folder", BUILDABLE, ids=lambda p: str(p.relative_to(KUBE)))
def test_renders_and_is_valid_kubernetes(folder: Path) -> None:
    docs = render(folder)
    assert docs
    for version in K8S_VERSIONS:
        for d in docs:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{folder.relative_to(KUBE)}: {d['kind']} {d['metadata']['name']} is not valid "
                            f"Kubernetes {version}: {exc.message} at {'/'.join(map(str, exc.path))}")
    for d in docs:
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']} {d['metadata']['name']}"
    for w in workloads(docs):
        for c in pod_containers(w["spec"]["template"]["spec"]):
            assert ":" in c["image"].rsplit("/", 1)[-1], f"{c['image']}: kustomize images: did not tag it"


def test_the_validator_refuses_what_the_api_server_would() -> None:
    """The strict check has teeth: a misspelt field and a wrong type are both caught."""
    ds = json.loads(json.dumps(find(rendered("two-zone"), "DaemonSet", "sdcache-node-gpu")))
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[-1], strict=True)
    ss = json.loads(json.dumps(find(rendered("two-zone"), "StatefulSet", "sdcache-node-memory")))
    ss["spec"]["replicas"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ss, K8S_VERSIONS[-1], strict=True)


# -- commands and flags -------------------------------------------------------------------------


def test_every_container_runs_a_real_subcommand_with_real_flags() -> None:
    zone_script = (KUBE / "base" / "node_zone.py").read_text()
    seen = set()
    for folder in BUILDABLE:
        docs = render(folder)
        for w in workloads(docs):
            pod = w["spec"]["template"]["spec"]
            for c in pod_containers(pod):
                where = f"{folder.relative_to(KUBE)}: {w['metadata']['name']}/{c['name']}"
                if not is_sdcache_image(c["image"]):
                    assert (w["metadata"]["name"], c["name"]) in FOREIGN_CONTAINERS, where
                    continue
                argv = argv_of(c)
                if argv[0] == "sdcache":
                    check_sdcache_argv(argv, where)
                    seen.add(argv[1])
                    # serve builds a torch runner; nothing else may need the image that carries torch.
                    assert (image_name(c["image"]) == RUNNER_IMAGE) == (argv[1] == "serve"), f"{where}: {c['image']}"
                else:  # the zone script, which the kustomization ships in a ConfigMap
                    assert argv[:1] == ["python"] and argv[1].endswith("/node_zone.py"), where
                    mount = next(m for m in c["volumeMounts"] if argv[1].startswith(m["mountPath"] + "/"))
                    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
                    cm = find(docs, "ConfigMap", volume["configMap"]["name"])
                    assert cm["data"]["node_zone.py"] == zone_script, where
                for _, probe in probes(c):
                    if "exec" not in probe:
                        continue
                    cmd = probe["exec"]["command"]
                    if cmd[:3] == ["python", "-m", "sdcache.meta.health"]:
                        check_flags(cmd[3:], help_flags("sdcache.meta.health"), f"{where} probe")
                    else:
                        assert cmd[:2] == ["python", "-c"] and "ismount" in cmd[2], f"{where}: probe {cmd}"
    assert seen == {"meta", "node", "mount", "serve", "gateway"}


def test_every_sdcache_command_in_deploy_md_is_real() -> None:
    commands = sdcache_invocations()
    assert {c[1] for c in commands} >= {"token", "nodes", "import", "ls"}
    for argv in commands:
        check_sdcache_argv(argv, f"docs/DEPLOY.md: {' '.join(argv)}")


# -- ports, probes, Services --------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_name_the_listen_port_and_services_reach_it(overlay: str) -> None:
    docs = rendered(overlay)
    servers = list(servers_of(docs))
    assert {w["metadata"]["name"] for w, _ in servers} == {"sdcache-meta", "sdcache-node-gpu", "sdcache-node-memory",
                                                          "sdcache-serve", "sdcache-gateway"}
    listen_ports: dict[str, int] = {}
    for w, c in servers:
        argv = argv_of(c)
        listen = flag_value(argv, "--listen")
        assert listen and listen.startswith("0.0.0.0:"), f"{w['metadata']['name']} must listen on every address"
        port = port_of(listen)
        listen_ports[w["metadata"]["name"]] = port
        assert port in [p["containerPort"] for p in c["ports"]]
        kinds = {k for k, _ in probes(c)}
        assert {"readinessProbe", "livenessProbe"} <= kinds, w["metadata"]["name"]
        for kind, probe in probes(c):
            if "httpGet" in probe:
                # Ready once registered and answering (/readyz); alive while serving (/healthz).
                expected = "/readyz" if kind == "readinessProbe" else "/healthz"
                assert probe["httpGet"]["port"] == port and probe["httpGet"]["path"] == expected, kind
            elif "grpc" in probe:
                assert probe["grpc"]["port"] == port
            else:
                assert port_of(probe["exec"]["command"][-1]) == port, f"{kind} of {w['metadata']['name']}"
    # Services select the pods and target the port they listen on.
    for svc in (d for d in docs if d["kind"] == "Service"):
        selected = [w for w, _ in servers
                    if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, svc["metadata"]["name"]
        (w,) = selected
        c = w["spec"]["template"]["spec"]["containers"][0]
        for sp in svc["spec"]["ports"]:
            target = sp["targetPort"]
            number = next(p["containerPort"] for p in c["ports"] if p.get("name") == target) \
                if isinstance(target, str) else target
            assert number == listen_ports[w["metadata"]["name"]]
    # Nodes, runners, gateways and the mount call the metadata service by its Service name and port.
    meta_port = find(docs, "Service", META_SERVICE)["spec"]["ports"][0]["port"]
    for w in workloads(docs):
        for c in pod_containers(w["spec"]["template"]["spec"]):
            if argv_of(c)[0] == "sdcache" and argv_of(c)[1] in ("node", "mount", "serve", "gateway"):
                assert flag_value(argv_of(c), "--meta") == f"{META_SERVICE}:{meta_port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pools_fit_below_the_memory_limit(overlay: str) -> None:
    docs = rendered(overlay)
    for w, c in servers_of(docs):
        if argv_of(c)[1] != "node":
            continue
        pod = w["spec"]["template"]["spec"]
        env = container_env(c, "pod-0")
        capacity = parse_size(expand(flag_value(argv_of(c), "--capacity") or "", env))
        pool_dir = flag_value(argv_of(c), "--pool-dir")
        assert pool_dir
        mount = next(m for m in c["volumeMounts"] if pool_dir.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["emptyDir"]["medium"] == "Memory"
        size_limit = k8s_quantity(volume["emptyDir"]["sizeLimit"])
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        limit = k8s_quantity(limits["memory"])
        name = w["metadata"]["name"]
        assert capacity < size_limit < limit, f"{name}: capacity {capacity} sizeLimit {size_limit} limit {limit}"
        assert k8s_quantity(requests["memory"]) == limit, f"{name}: memory request below its limit"
    for w in workloads(docs):
        for c in pod_containers(w["spec"]["template"]["spec"]):
            for what in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][what].keys(), f"{w['metadata']['name']}/{c['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_placement_of_nodes(overlay: str) -> None:
    docs = rendered(overlay)
    gpu = find(docs, "DaemonSet", "sdcache-node-gpu")["spec"]["template"]["spec"]
    assert gpu["nodeSelector"] == {"sdcache.io/gpu": "true"}
    memory = find(docs, "StatefulSet", "sdcache-node-memory")
    pod = memory["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"sdcache.io/memory": "true"}
    (term,) = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    text = DEPLOY_MD.read_text()
    assert "sdcache.io/gpu=true" in text and "sdcache.io/memory=true" in text
    if overlay == "two-zone":
        assert memory["spec"]["replicas"] == 4
        (spread,) = pod["spec"]["topologySpreadConstraints"]
        assert spread["topologyKey"] == "topology.kubernetes.io/zone"
        assert spread["whenUnsatisfiable"] == "DoNotSchedule"


def _selects(selector: dict[str, Any], workload: dict[str, Any]) -> bool:
    return selector["matchLabels"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_runners_have_a_gpu_each_and_fit_their_memory(overlay: str) -> None:
    """One GPU per runner where it runs on CUDA; the host-RAM tier below the memory limit, with room for torch."""
    serve = find(rendered(overlay), "StatefulSet", "sdcache-serve")
    pod = serve["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"sdcache.io/gpu": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (c,) = pod["containers"]
    argv = [expand(a, container_env(c, "sdcache-serve-0")) for a in argv_of(c)]
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    device = flag_value(argv, "--device")
    assert device in ("cuda", "cpu"), "a runner says which device it runs on (auto would hide a missing GPU)"
    gpus = int(limits.get("nvidia.com/gpu", 0))
    assert gpus == (1 if device == "cuda" else 0) and int(requests.get("nvidia.com/gpu", 0)) == gpus
    assert (overlay == "two-zone") == (device == "cuda")  # the dev overlay runs on any cluster's CPU
    limit = k8s_quantity(limits["memory"])
    budget = parse_size(flag_value(argv, "--host-budget") or "")
    # The rest is torch, the CUDA context, the pipeline being built and a batch's images.
    assert 0 < budget <= limit - (4 << 30), f"--host-budget {budget} in a {limits['memory']} limit"
    assert k8s_quantity(requests["memory"]) == limit
    threads = int(flag_value(argv, "--threads") or 0)
    assert 0 < threads <= k8s_quantity(limits["cpu"]), "torch threads beyond the CPU limit only contend"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_topology(overlay: str) -> None:
    """Runners at stable names the gateway can verify; gateways over zones; autoscalers own the counts."""
    docs = rendered(overlay)
    serve = find(docs, "StatefulSet", "sdcache-serve")
    (c,) = serve["spec"]["template"]["spec"]["containers"]
    argv = argv_of(c)
    # The gateway calls each runner at its advertised address: the pod's DNS name under the headless Service.
    headless = find(docs, "Service", serve["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    service = serve["spec"]["serviceName"]
    listen = port_of(flag_value(argv, "--listen") or "")
    assert flag_value(argv, "--advertise") == f"$(POD_NAME).{service}.$(POD_NAMESPACE).svc:{listen}"
    assert flag_value(argv, "--runner-id") == "$(POD_NAME)"  # a restarted pod takes its registry entry back
    gateway = find(docs, "Deployment", "sdcache-gateway")
    (g,) = gateway["spec"]["template"]["spec"]["containers"]
    for flag in ("--checkpoints", "--loras", "--controlnets", "--default-model"):  # the gateway names what runners load
        assert flag_value(argv_of(g), flag) == flag_value(argv, flag), flag
    assert image_name(g["image"]) == "sdcache"  # no torch: the gateway never imports it
    # Gateways: spread over zones (strictly where there are two), a Service in front, at least two.
    zone, host = gateway["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert (zone["topologyKey"], host["topologyKey"]) == ("topology.kubernetes.io/zone", "kubernetes.io/hostname")
    assert zone["whenUnsatisfiable"] == ("DoNotSchedule" if overlay == "two-zone" else "ScheduleAnyway")
    assert all(_selects(t["labelSelector"], gateway) for t in (zone, host))
    front = find(docs, "Service", "sdcache-gateway")
    assert front["spec"].get("type", "ClusterIP") == "ClusterIP" and front["spec"]["ports"][0]["port"] == 7861
    hpas = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == {"sdcache-gateway"}  # the runners' queue autoscaler is an example (it needs an adapter)
    hpa = hpas["sdcache-gateway"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sdcache-gateway"}
    assert hpa["spec"]["minReplicas"] >= (2 if overlay == "two-zone" else 1)
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu" and "cpu" in g["resources"]["requests"]
    assert "replicas" not in gateway["spec"], "the autoscaler owns the count; an apply would reset it"
    # A drain takes one runner and one gateway at a time.
    budgets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodDisruptionBudget"}
    for w in (serve, gateway):
        pdb = budgets[w["metadata"]["name"]]
        assert pdb["spec"]["maxUnavailable"] == 1 and _selects(pdb["spec"]["selector"], w)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_runner_autoscaling_example_composes_with_each_overlay(overlay: str, tmp_path: Path) -> None:
    """examples/runner-autoscaling added to an overlay: valid, on the runners' queue metric, owning their count."""
    import prometheus_client

    import sdcache.serving.metrics  # noqa: F401 - registers serve's metrics

    component = KUBE / "examples" / "runner-autoscaling"
    assert _kustomization(component)["kind"] == "Component"
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(KUBE / "overlays" / overlay, tmp_path)],
        "components": [os.path.relpath(component, tmp_path)],
    }))
    docs = render(tmp_path)
    hpa = find(docs, "HorizontalPodAutoscaler", "sdcache-serve")
    for d in (hpa, find(docs, "StatefulSet", "sdcache-serve")):
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(d, version, strict=True)
    assert hpa["metadata"]["namespace"] == NAMESPACE
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "sdcache-serve"}
    (metric,) = hpa["spec"]["metrics"]
    queue_depth = "sdcache_runner_queue_depth"  # a gauge per serve process: requests waiting
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == queue_depth
    assert any(f.name == queue_depth and f.type == "gauge" for f in prometheus_client.REGISTRY.collect())
    assert queue_depth in (component / "kustomization.yaml").read_text()  # the adapter rule that serves it
    assert "replicas" not in find(docs, "StatefulSet", "sdcache-serve")["spec"]
    assert len(docs) == len(rendered(overlay)) + 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_documented_and_hold_the_files_passed(overlay: str) -> None:
    """Every Secret a pod uses is made by a recipe in DEPLOY.md, with the keys the flags name."""
    recipes = secret_recipes()
    docs = rendered(overlay)
    for w in workloads(docs):
        pod = w["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        for c in pod_containers(pod):
            for ref in c.get("envFrom", []):
                if "secretRef" in ref:
                    assert ref["secretRef"]["name"] in recipes and ref["secretRef"].get("optional")
            for e in c.get("env", []):
                if "secretKeyRef" in e.get("valueFrom", {}):
                    ref = e["valueFrom"]["secretKeyRef"]
                    assert ref["name"] in recipes, f"Secret {ref['name']} has no `kubectl create secret` in DEPLOY.md"
                    assert ref["key"] in {k for k, _ in recipes[ref["name"]]}, f"{ref} is not in its recipe"
            args = [*argv_of(c), *(a for _, p in probes(c) for a in p.get("exec", {}).get("command", []))]
            for m in c.get("volumeMounts", []):
                if m["name"] not in secrets:
                    continue
                name = secrets[m["name"]]
                assert name in recipes, f"Secret {name} has no `kubectl create secret` in docs/DEPLOY.md"
                keys = {k for k, _ in recipes[name]}
                for a in args:
                    if a.startswith(m["mountPath"] + "/"):
                        assert a[len(m["mountPath"]) + 1:] in keys, f"{a}: Secret {name} has keys {keys}"


# -- the zone initContainer ---------------------------------------------------------------------


class _NodeApi(http.server.BaseHTTPRequestHandler):
    """A stand-in for the API server's ``GET /api/v1/nodes/{name}``: one token may get nodes."""

    nodes: dict[str, dict[str, str]] = {}
    token = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        name = self.path.removeprefix("/api/v1/nodes/")
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self._reply(403, {"kind": "Status", "reason": "Forbidden"})
        elif not self.path.startswith("/api/v1/nodes/") or name not in self.nodes:
            self._reply(404, {"kind": "Status", "reason": "NotFound"})
        else:
            self._reply(200, {"kind": "Node", "metadata": {"name": name, "labels": self.nodes[name]}})

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_zone_script_reads_the_node_label(tmp_path: Path) -> None:
    docs = rendered("two-zone")
    script = KUBE / "base" / "node_zone.py"
    api_dir_default = re.search(r'^API_DIR = "(.*)"$', script.read_text(), flags=re.M)
    assert api_dir_default
    # Wiring: the initContainer mounts the projected token where the script looks, and only it does.
    for name, kind in (("sdcache-node-gpu", "DaemonSet"), ("sdcache-node-memory", "StatefulSet")):
        pod = find(docs, kind, name)["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        (init,) = pod["initContainers"]
        api = next(m for m in init["volumeMounts"] if m["name"] == "kube-api")
        assert api["mountPath"] == api_dir_default.group(1)
        node = pod["containers"][0]
        assert "kube-api" not in {m["name"] for m in node["volumeMounts"]}
        assert {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in init["env"]} == {"NODE_NAME": "spec.nodeName"}
        zone_file = init["command"][-1]
        assert any(zone_file.startswith(m["mountPath"] + "/") and m["name"] == "zone" for m in node["volumeMounts"])
        binding = find(docs, "ClusterRoleBinding", "sdcache-node-zone-reader")
        assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE} in binding["subjects"]
        role = find(docs, "ClusterRole", binding["roleRef"]["name"])
        assert {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]} in role["rules"]

    pki = make_pki(tmp_path / "pki")
    api_dir = tmp_path / "kube-api"
    api_dir.mkdir()
    shutil.copy(pki.ca, api_dir / "ca.crt")
    (api_dir / "token").write_text("sa-token\n")
    _NodeApi.nodes = {"gpu-a1": {"topology.kubernetes.io/zone": "zone-a", "sdcache.io/gpu": "true"}, "bare": {}}
    _NodeApi.token = "sa-token"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NodeApi)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        def run(node: str) -> tuple[subprocess.CompletedProcess[str], Path]:
            out = tmp_path / f"zone-{node}-{len(list(tmp_path.glob('zone-*')))}"
            env = {"PATH": os.environ.get("PATH", ""), "NODE_NAME": node, "KUBE_API_DIR": str(api_dir),
                   "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.server_port)}
            return subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                                  timeout=30), out

        proc, out = run("gpu-a1")
        assert proc.returncode == 0, proc.stderr
        assert out.read_text() == "zone-a\n"
        assert "zone-a" in proc.stdout
        proc, out = run("bare")
        assert proc.returncode == 0 and out.read_text() == ""
        assert "no topology.kubernetes.io/zone label" in proc.stderr
        (api_dir / "token").write_text("a-token-that-may-not\n")
        proc, out = run("gpu-a1")
        assert proc.returncode == 1 and not out.exists()
        assert proc.stderr.count("\n") == 1 and "HTTP 403" in proc.stderr and "get nodes" in proc.stderr
    finally:
        server.shutdown()
        server.server_close()
