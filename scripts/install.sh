#!/usr/bin/env bash
# Install sdcache and everything its tests need on a fresh Debian/Ubuntu machine.
# System packages: fuse3 + libfuse3-dev + pkg-config (for pyfuse3 and FUSE mounts).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq fuse3 libfuse3-dev pkg-config >/dev/null
fi
PY=${PYTHON:-python3}
# torch first, pinned to the CPU build this image ships, so no extra pulls a CUDA build.
$PY -m pip install -q --disable-pip-version-check 'torch==2.13.0' || $PY -m pip install -q 'torch>=2.3'
$PY -m pip install -q --disable-pip-version-check -e '.[test,s3,fuse,runner,triton]'
# The CLIP BPE vocabulary ships inside open_clip_torch; only that file is read, so skip its
# dependencies (its torchvision pin would pull a second, CUDA torch).
$PY -m pip install -q --disable-pip-version-check --no-deps open_clip_torch
