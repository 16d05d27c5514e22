"""Serving test bed: tiny models imported into a real cluster under A1111's folders, and real serve processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcache.cluster import LocalCluster

from .conftest import run_cli, wait_for
from .runner_models import TinyModels

API_USER, API_PASS = "alice", "s3cret-pass"
READY_TIMEOUT = 180.0  # a serve process imports torch and diffusers before it answers /readyz


def import_models(m: TinyModels, meta: str) -> dict[str, str]:
    """The tiny models as a user would lay them out: checkpoints, LoRAs and ControlNets folders."""
    run_cli("import", str(m.sd1_file), "/models/checkpoints/sd1-tiny.safetensors", meta=meta, check=True)
    run_cli("import", str(m.sd1_other), "/models/checkpoints/sub/sd1-other.safetensors", meta=meta, check=True)
    run_cli("import", "-r", str(m.sdxl_folder), "/models/checkpoints/sdxl-tiny/", meta=meta, check=True)
    run_cli("import", str(m.sd1_lora_a), "/models/loras/style-a.safetensors", meta=meta, check=True)
    run_cli("import", str(m.sd1_lora_b), "/models/loras/style-b.safetensors", meta=meta, check=True)
    run_cli("import", str(m.sdxl_lora), "/models/loras/xl/xl-style.safetensors", meta=meta, check=True)
    run_cli("import", str(m.sd1_cn_file), "/models/controlnet/cn-sd1.safetensors", meta=meta, check=True)
    return {"sd1": "sd1-tiny.safetensors", "sd1_other": "sub/sd1-other.safetensors", "sdxl": "sdxl-tiny"}


@dataclass
class ServeProcess:
    """One real ``sdcache serve`` (or ``gateway``) subprocess."""

    argv: list[str]
    log_path: str
    ready_file: str
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> "ServeProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, env={**os.environ, **self.env},
                                     start_new_session=True)
        log.close()
        self.address = wait_for(self._address, f"{self.argv[3]} to listen", timeout=60, step=0.05)
        return self

    def _address(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{' '.join(self.argv[2:4])} exited {self.proc.returncode}: {self.log()}")
        if os.path.exists(self.ready_file):
            return Path(self.ready_file).read_text().strip()
        return ""

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        import requests

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.log()}")
            try:
                return requests.get(self.url + "/readyz", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        wait_for(ready, f"{self.url}/readyz", timeout=timeout, step=0.2)

    def log(self, n: int = 3000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()


def serve_process(cluster: LocalCluster, tmp: Path, name: str, *extra: str, token: str | None = None,
                  command: str = "serve") -> ServeProcess:
    """A ``sdcache serve`` on 127.0.0.1:0 over *cluster*, with the tiny models' defaults (CPU, fp32, 1 thread)."""
    ready = str(tmp / f"{name}.ready")
    argv = [sys.executable, "-m", "sdcache", command, "--listen", "127.0.0.1:0", "--meta", cluster.meta_addr,
            "--ready-file", ready]
    if command == "serve":
        argv += ["--device", "cpu", "--dtype", "fp32", "--threads", "1", "--runner-id", name,
                 "--device-budget", "0", "--host-budget", "1GiB"]
    argv += ["--api-auth", f"{API_USER}:{API_PASS}", *extra]
    env = {"SDCACHE_TOKEN": token} if token else {}
    return ServeProcess(argv, str(tmp / f"{name}.log"), ready, env=env)


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def elapsed(t0: float) -> float:
    return time.monotonic() - t0


def api(p: ServeProcess) -> Any:
    """The real ``webuiapi`` client from PyPI, logged in as A1111 users log in (HTTP Basic)."""
    import webuiapi

    host, port = p.address.rsplit(":", 1)
    return webuiapi.WebUIApi(host=host, port=int(port), username=API_USER, password=API_PASS, sampler="Euler",
                             steps=2)
