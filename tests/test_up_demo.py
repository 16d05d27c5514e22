"""`sdcache up` and `sdcache demo`: the README's main job, run for real."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

from .conftest import run_cli


def test_demo_runs_end_to_end(tmp_path):
    pool_root = tempfile.mkdtemp(prefix="sdcache-demo-test-", dir="/dev/shm")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sdcache", "demo", "--data", str(tmp_path / "demo"), "--model-size", "24MiB",
             "--pool-root", pool_root],
            capture_output=True, text=True, timeout=420,
        )
    finally:
        shutil.rmtree(pool_root, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    assert "sha256 matches" in proc.stdout
    assert "Where to look" in proc.stdout
    assert "kind checkpoint/sd1" in proc.stdout
    # The serving part: three images through the A1111 API, the LoRA switched in and out again.
    assert "the LoRA changed the image" in proc.stdout and "restored it bit for bit" in proc.stdout, proc.stdout
    from PIL import Image

    shots = {name: tmp_path / "demo" / f"demo-{name}.png" for name in ("base", "lora", "base-again")}
    pixels = {name: Image.open(p).tobytes() for name, p in shots.items()}
    assert pixels["base"] == pixels["base-again"] != pixels["lora"]
    assert Image.open(shots["base"]).size == (64, 64)
    assert "curl -s -H \"Authorization: Bearer $(cat " in proc.stdout and "/sdapi/v1/txt2img" in proc.stdout


def test_up_serves_until_ctrl_c(tmp_path):
    pool_root = tempfile.mkdtemp(prefix="sdcache-up-test-", dir="/dev/shm")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdcache", "up", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0",
         "--nodes", "2", "--capacity", "64MiB", "--pool-root", pool_root],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        first = proc.stdout.readline()
        assert "metadata service on" in first, proc.stderr.read() if proc.poll() is not None else first
        meta = first.split(" on ")[1].split()[0]
        export = next(line for line in proc.stdout if line.startswith("export "))
        token_file = export.split("SDCACHE_TOKEN_FILE=")[1].split()[0]
        assert os.stat(token_file).st_mode & 0o777 == 0o600
        # Auth is on: the printed line is what a user needs, and without it nothing is served.
        mine = {"SDCACHE_TOKEN": None, "SDCACHE_TOKEN_FILE": token_file}
        nodes = run_cli("nodes", meta=meta, check=True, env=mine).stdout
        assert nodes.count("yes") == 2
        refused = run_cli("nodes", meta=meta, env={"SDCACHE_TOKEN": None, "SDCACHE_TOKEN_FILE": None})
        assert refused.returncode == 1 and "no token" in refused.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(pool_root, ignore_errors=True)
    # Nothing left listening: the metadata service is gone.
    assert run_cli("ls", "/", meta=meta, env=mine).returncode != 0
    assert not [cmd for cmd in _cmdlines() if f"--ready-file {tmp_path}" in cmd]


def _cmdlines() -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                out.append(f.read().replace("\0", " "))
        except OSError:
            continue  # exited while we looked
    return out
