"""What a test needs from the machine, and whether lacking it is a skip or a failure.

One policy for every optional capability the tests use (FUSE mounts, torch, diffusers,
the Triton interpreter, the CPU flash kernel, bf16 on CPU, CUDA, a Prometheus server,
network namespaces for the multi-host test bed):

- ``SDCACHE_REQUIRE`` is a comma list of requirement names that this machine must have
  (``.ci/run`` sets it to everything CI has). A listed requirement that is missing makes
  the test fail, saying what is missing and how to install it.
- An unlisted requirement that is missing makes the test skip with that reason (a
  laptop without ``/dev/fuse``), shown by ``-ra`` in the short test summary.
- As root on Linux with ``/dev/fuse`` present, ``fuse`` is required even when unlisted:
  a mount failure there is a bug, not an environment. ``-fuse`` in the list opts out
  (a root container given ``/dev/fuse`` but no right to mount).
- What only the hardware decides (``cuda``, ``cpu-bf16``) always skips where absent and
  cannot be listed. Likewise the CPU flash kernel only exists for CPUs with AVX512-BF16 and
  no AMX: on other CPUs its tests skip with the missing instructions even when
  ``cpu-kernels`` is listed; on a CPU that can run it, a failed build counts as missing.

Tests say what they need with ``@pytest.mark.requires("name", ...)`` (the ``gpu`` and
``fuse`` markers imply ``cuda`` and ``fuse``), with :func:`require` inside a test, or with
:func:`import_required` for modules a whole test file imports.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pytest

ENV = "SDCACHE_REQUIRE"


def _force_cpu_kernel_on_amx() -> None:
    """Production prefers SDPA on AMX CPUs, but the CPU kernel runs there too: test it anyway.

    Set before any test can load the kernel (this module is imported by conftest).
    """
    try:
        with open("/proc/cpuinfo") as f:
            amx = " amx_" in f.read()
    except OSError:
        return
    if amx and os.environ.get("SDCACHE_CPU_ATTENTION", "1") not in ("0", "false", "no"):
        os.environ["SDCACHE_CPU_ATTENTION"] = "force"


_force_cpu_kernel_on_amx()

# The instructions cpu_attention.cpp is compiled for (kernels/cpu_attention.py, _cpu_ok).
CPU_KERNEL_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")


@dataclass(frozen=True)
class Missing:
    """Why a requirement is not met here. ``hardware``: no install can fix it on this machine."""

    reason: str
    hardware: bool = False


@dataclass(frozen=True)
class Requirement:
    name: str
    what: str
    install: str
    probe: Callable[[], Missing | None]
    installable: bool = True  # False: only the hardware decides, so it is never listed in SDCACHE_REQUIRE


def _import_probe(*modules: str) -> Callable[[], Missing | None]:
    def probe() -> Missing | None:
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                return Missing(f"{module} cannot be imported ({exc})")
        return None

    return probe


_MOUNT_PROBE = """
import sys
import pyfuse3
try:
    pyfuse3.init(pyfuse3.Operations(), sys.argv[1], {"fsname=sdcache-probe", "subtype=sdcache-probe", "ro"})
except RuntimeError:
    sys.exit(3)
pyfuse3.close(unmount=True)
"""


def _mounted(path: str) -> bool:
    """From the mount table: stat on a FUSE mount nobody serves would hang."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return any(line.split()[4] == path for line in f)


def _probe_fuse() -> Missing | None:
    if not os.path.exists("/dev/fuse"):
        return Missing("/dev/fuse is missing (run the container with --device /dev/fuse)")
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as exc:
        return Missing(f"pyfuse3/trio cannot be imported ({exc})")
    if not shutil.which("fusermount3"):
        return Missing("fusermount3 is missing")
    # A real mount, the way `sdcache mount` makes it (pyfuse3 -> libfuse: mount(2) as root,
    # fusermount3 otherwise), in a child so a hang cannot take the test run with it.
    mp = os.path.realpath(tempfile.mkdtemp(prefix="sdcache-fuse-probe-"))
    try:
        try:
            proc = subprocess.run([sys.executable, "-c", _MOUNT_PROBE, mp], capture_output=True, text=True,
                                  timeout=60, check=False)
        except subprocess.TimeoutExpired:
            return Missing("a test FUSE mount did not finish within 60 s")
        if proc.returncode != 0:
            detail = " ".join(proc.stderr.split())[-300:] or f"exit status {proc.returncode}"
            return Missing(f"a test FUSE mount failed: {detail} (a container needs "
                           "--device /dev/fuse --cap-add SYS_ADMIN, or --privileged)")
        return None
    finally:
        if _mounted(mp):
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, check=False)
        try:
            os.rmdir(mp)
        except OSError:
            pass


def _probe_prometheus() -> Missing | None:
    exe = shutil.which("prometheus")
    if not exe or not shutil.which("promtool"):
        return Missing(f"{'promtool' if exe else 'the prometheus binary'} is not on PATH")
    try:
        proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Missing(f"{exe} --version did not run: {exc}")
    if proc.returncode != 0:
        return Missing(f"{exe} --version exited {proc.returncode}: {' '.join(proc.stderr.split())[-200:]}")
    return None


def _probe_cpu_kernels() -> Missing | None:
    torch_missing = _import_probe("torch")()
    if torch_missing:
        return torch_missing
    from sdcache.kernels import cpu_attention, ops

    lacking = [flag for flag in CPU_KERNEL_FLAGS if flag not in ops._CPU_FLAGS]
    if lacking:
        return Missing(f"the CPU flash kernel needs {', '.join(lacking)}, which this CPU lacks", hardware=True)
    if os.environ.get("SDCACHE_CPU_ATTENTION", "1") in ("0", "false", "no"):
        return Missing("the CPU flash kernel is disabled by SDCACHE_CPU_ATTENTION=0")
    # What torch.utils.cpp_extension needs, named before a build fails less clearly.
    from torch.utils.cpp_extension import is_ninja_available

    cxx = os.environ.get("CXX", "c++")
    if not shutil.which(cxx):
        return Missing(f"no C++ compiler ({cxx}) to build the CPU flash kernel")
    if not is_ninja_available():
        return Missing("ninja is missing (torch.utils.cpp_extension builds with it)")
    include = sysconfig.get_path("include")
    if not os.path.exists(os.path.join(include, "Python.h")):
        return Missing(f"Python.h is missing from {include} (the Python development headers)")
    if not cpu_attention.available():  # builds on first call (about a minute), then cached
        return Missing(f"the CPU flash kernel does not build or load here: {cpu_attention._failed}")
    return None


def _probe_cpu_bf16() -> Missing | None:
    torch_missing = _import_probe("torch")()
    if torch_missing:
        return torch_missing
    import torch

    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return Missing("oneDNN has no bf16 on this CPU (needs AVX512 BW/VL/DQ or newer)", hardware=True)


def _probe_cuda() -> Missing | None:
    torch_missing = _import_probe("torch")()
    if torch_missing:
        return torch_missing
    import torch

    return None if torch.cuda.is_available() else Missing("no CUDA device", hardware=True)


def postgres_bindir() -> str | None:
    """The folder holding initdb and pg_ctl: PATH first, else Debian's /usr/lib/postgresql/N/bin (newest)."""
    exe = shutil.which("initdb")
    if exe and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(exe))
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def _probe_postgres() -> Missing | None:
    missing = _import_probe("psycopg", "psycopg_pool")()
    if missing:
        return missing
    bindir = postgres_bindir()
    if bindir is None:
        return Missing("initdb is neither on PATH nor under /usr/lib/postgresql/*/bin")
    for tool in ("postgres", "pg_ctl"):
        if not os.path.exists(os.path.join(bindir, tool)):
            return Missing(f"{tool} is missing from {bindir}")
    return None


def _probe_netns() -> Missing | None:
    from ._testbed import probe

    reason = probe()
    return Missing(reason) if reason else None


REQUIREMENTS: dict[str, Requirement] = {r.name: r for r in [
    Requirement("fuse", "FUSE mounts",
                "bash scripts/install.sh (apt-get install fuse3 libfuse3-dev pkg-config; pip install -e '.[fuse]')",
                _probe_fuse),
    Requirement("torch", "torch", "bash scripts/install.sh (or: pip install -e '.[torch]')",
                _import_probe("torch")),
    Requirement("diffusers", "diffusers and transformers",
                "bash scripts/install.sh (or: pip install -e '.[runner]')",
                _import_probe("torch", "diffusers", "transformers")),
    Requirement("triton-interpret", "Triton (its CPU interpreter runs the Triton kernels)",
                "bash scripts/install.sh (or: pip install -e '.[triton]')", _import_probe("triton")),
    Requirement("cpu-kernels", "the AVX512-BF16 CPU flash attention kernel (built on first use)",
                "bash scripts/install.sh (apt-get install g++ ninja-build python3-dev)", _probe_cpu_kernels),
    Requirement("prometheus", "a Prometheus server and promtool",
                "bash scripts/install.sh (apt-get install prometheus)", _probe_prometheus),
    Requirement("postgres", "a PostgreSQL server (initdb, pg_ctl) and psycopg 3",
                "bash scripts/install.sh (apt-get install postgresql; pip install 'psycopg[binary,pool]')",
                _probe_postgres),
    Requirement("netns", "network namespaces and tc shaping (the multi-host test bed, tests/_testbed.py)",
                "run as root; bash scripts/install.sh (apt-get install iproute2)", _probe_netns),
    Requirement("webuiapi", "the webuiapi A1111 client from PyPI",
                "bash scripts/install.sh (or: pip install -e '.[test]')", _import_probe("webuiapi")),
    Requirement("cpu-bf16", "bf16 on CPU (oneDNN)", "a CPU with AVX512 BW/VL/DQ", _probe_cpu_bf16,
                installable=False),
    Requirement("cuda", "a CUDA GPU", "an NVIDIA GPU and a CUDA build of torch", _probe_cuda, installable=False),
]}


def _listed() -> tuple[set[str], set[str]]:
    names = {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}
    return {n for n in names if not n.startswith("-")}, {n[1:] for n in names if n.startswith("-")}


def misnamed() -> list[str]:
    """What is wrong with SDCACHE_REQUIRE: a typo there would quietly turn failures into skips."""
    wanted, opted_out = _listed()
    problems = [f"{n!r} is not a requirement" for n in sorted((wanted | opted_out) - REQUIREMENTS.keys())]
    problems += [f"{n!r} is hardware: its tests skip where it is absent" for n in sorted(wanted)
                 if n in REQUIREMENTS and not REQUIREMENTS[n].installable]
    if problems:
        problems.append(f"installable requirements: {', '.join(n for n, r in REQUIREMENTS.items() if r.installable)}")
    return problems


def required() -> frozenset[str]:
    """The requirements that must be met here: SDCACHE_REQUIRE, plus ``fuse`` as root with /dev/fuse."""
    wanted, opted_out = _listed()
    if sys.platform == "linux" and os.geteuid() == 0 and os.path.exists("/dev/fuse"):
        wanted.add("fuse")
    return frozenset(wanted - opted_out)


@functools.cache
def missing(name: str) -> Missing | None:
    """Why requirement ``name`` is not met here, or None; probed once per test run."""
    return REQUIREMENTS[name].probe()


def skip_reason(name: str) -> str | None:
    """None when requirement ``name`` is met; else why to skip, or ``pytest.fail`` where it is required."""
    if name not in REQUIREMENTS:
        raise ValueError(f"unknown requirement {name!r}; known: {', '.join(REQUIREMENTS)}")
    miss = missing(name)
    if miss is None:
        return None
    req = REQUIREMENTS[name]
    if name in required() and not miss.hardware:
        why = f"{ENV} lists it" if name in _listed()[0] else "this runs as root with /dev/fuse"
        pytest.fail(f"required {name!r} ({req.what}) is missing: {miss.reason.rstrip('.')}. "
                    f"It is required because {why}. Install: {req.install}", pytrace=False)
    return f"{name}: {miss.reason.splitlines()[0][:300]}"  # one line in the short summary (a build log is long)


def require(*names: str) -> None:
    """Skip or fail the calling test (or module) unless every requirement in ``names`` is met."""
    for name in names:
        reason = skip_reason(name)
        if reason:
            pytest.skip(reason, allow_module_level=True)


def import_required(module: str, requirement: str | None = None) -> ModuleType:
    """``import module`` once ``requirement`` (default: the module's name) is met, else skip or fail."""
    require(requirement or module)
    return importlib.import_module(module)
