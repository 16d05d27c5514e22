"""``sdcache demo``: the main job end to end on one host, with nothing to download.

Starts a one-host cluster (metadata service + 2 nodes) unless ``--meta``
names a running one, generates a random-weight SD1.5-shaped checkpoint,
imports it, warms it into the pool, reads it back through fsspec and
``load_safetensors``, checks every byte. Then (with torch and diffusers) it
builds a tiny SD1 model and a LoRA from configs, serves them with
``sdcache serve`` and makes images through the A1111 API: the base, the LoRA
switched in, and the LoRA switched out again (bit for bit the first image).
It prints where everything is, and the curl line that made the image.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any

from . import errors
from .units import format_size, parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="./sdcache-demo", help="where the cluster and the model go (default ./sdcache-demo)")
    p.add_argument("--model-size", default="256MiB", help="size of the generated checkpoint (2GiB = real SD1.5)")
    p.add_argument("--keep-running", action="store_true", help="leave the cluster up afterwards (Ctrl-C stops it)")
    p.add_argument("--pool-root", default="/dev/shm/sdcache-demo", help="parent of the nodes' pool directories")
    p.add_argument("--no-serve", action="store_true", help="skip the serving part (sdcache serve + the A1111 API)")


_STEPS = 7  # 5 with --no-serve


def main(args: argparse.Namespace) -> int:
    global _STEPS
    _STEPS = 5 if getattr(args, "no_serve", False) else 7
    from .cluster import LocalCluster, default_capacity
    from .synth import write_sd_checkpoint

    data = os.path.abspath(args.data)
    os.makedirs(data, exist_ok=True)
    target = parse_size(args.model_size)
    model = os.path.join(data, f"demo-sd15-{target >> 20}MiB.safetensors")
    if not os.path.exists(model):
        print(f"[1/{_STEPS}] generating a random-weight SD1.5-shaped checkpoint ({format_size(target)}) -> {model}")
        write_sd_checkpoint(model + ".tmp", target / 2.07e9, unet_seed=0)
        os.replace(model + ".tmp", model)
    else:
        print(f"[1/{_STEPS}] using the generated checkpoint {model}")
    size = os.path.getsize(model)

    cluster = None
    meta = getattr(args, "meta", None)
    if not meta:
        capacity = max(default_capacity(2), 2 * size)
        print(f"[2/{_STEPS}] starting a one-host cluster: metadata service + 2 nodes ({format_size(capacity)} each)")
        cluster = LocalCluster(os.path.join(data, "cluster"), nodes=2, capacity=capacity,
                               pool_root=args.pool_root)
        cluster.start()
        meta = cluster.meta_addr
    else:
        print(f"[2/{_STEPS}] using the cluster at {meta}")
    try:
        return _run(meta, model, size, cluster, args)
    finally:
        if cluster is not None:
            cluster.stop()


def _run(meta: str, model: str, size: int, cluster: object, args: argparse.Namespace) -> int:
    from .client.fs import SdcacheFileSystem
    from .client.importer import import_file

    token = getattr(cluster, "admin_token", None) or None
    fs = SdcacheFileSystem(meta=meta, token=token)
    dest = "/demo/" + os.path.basename(model)
    t0 = time.perf_counter()
    res = import_file(fs.meta, model, dest)
    t_import = time.perf_counter() - t0
    m = res.manifest
    print(f"[3/{_STEPS}] imported {dest}: {format_size(size)}, kind {m.kind}/{m.base}, {len(m.chunks)} chunks, "
          f"sha256 {m.sha256[:16]}… in {t_import:.2f}s")
    t0 = time.perf_counter()
    last = None
    for last in fs.meta.warmup([dest]):
        pass
    t_warm = time.perf_counter() - t0
    print(f"[4/{_STEPS}] warmed into the pool in {t_warm:.2f}s "
          f"({format_size(last.done_bytes if last else 0)} of {format_size(size)})")
    t0 = time.perf_counter()
    with fs.open(dest, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    t_read = time.perf_counter() - t0
    if digest != m.sha256:
        raise errors.CorruptChunk(f"read back {digest}, expected {m.sha256}")
    line = f"[5/{_STEPS}] read back through sdcache:// in {t_read:.2f}s ({size / t_read / 1e9:.2f} GB/s), sha256 matches"
    try:
        from .client import load_safetensors

        t0 = time.perf_counter()
        tensors = load_safetensors("sdcache:/" + dest, meta=meta, token=token)
        line += f"; load_safetensors: {len(tensors)} tensors in {time.perf_counter() - t0:.2f}s"
    except ImportError:
        line += "; (torch not installed: skipped load_safetensors)"
    print(line)
    served = None
    if not getattr(args, "no_serve", False):
        served = _serve_demo(meta, token, getattr(cluster, "admin_token_file", None), os.path.dirname(model),
                             args.keep_running)
    print()
    print("Where to look:")
    if cluster is not None:
        print(f"  export SDCACHE_TOKEN_FILE={getattr(cluster, 'admin_token_file')}   # auth is on: the admin token")
    print(f"  sdcache --meta {meta} ls -l /demo          # the namespace")
    print(f"  sdcache --meta {meta} stat {dest}")
    print(f"  sdcache --meta {meta} nodes                # pool use per node")
    print(f"  python -c \"import fsspec; print(fsspec.filesystem('sdcache', meta='{meta}').ls('/demo'))\"")
    if served is not None:
        for line in served.lines:
            print(line)
    if cluster is not None:
        print(f"  logs and metadata: {os.path.join(os.path.dirname(model), 'cluster')}; pools under {args.pool_root}")
        if args.keep_running:
            print("The cluster keeps running; Ctrl-C stops it.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    if served is not None:
        served.stop()
    return 0


class _Served:
    """The demo's ``sdcache serve`` child and the lines that say where to look."""

    def __init__(self, proc: "subprocess.Popen[bytes]", lines: list[str]) -> None:
        self.proc, self.lines = proc, lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _serve_demo(meta: str, token: str | None, token_file: str | None, data: str, keep: bool) -> _Served | None:
    """Tiny SD1 model + LoRA -> the cache -> ``sdcache serve`` -> three images through the A1111 API."""
    try:
        from .kernels.tiny import build_tiny, kohya_lora, save_folder, save_lora
    except ImportError as exc:
        print(f"[6/{_STEPS}] serving skipped: the runner needs torch and diffusers ({exc})")
        return None
    from pathlib import Path

    from .client.importer import destination, import_file, walk
    from .client.metaclient import MetaClient

    if token is None:  # a cluster named by --meta: the token this process would use ($SDCACHE_TOKEN...)
        from .tls import Credentials

        token = Credentials.resolve().token
    folder, lora = Path(data) / "tiny-sd1", Path(data) / "tiny-style.safetensors"
    t0 = time.perf_counter()
    comps = build_tiny("sd1", seed=0)
    save_folder("sd1", comps, folder)
    save_lora(kohya_lora("sd1", comps, seed=11), lora)
    client = MetaClient(meta, timeout=30) if token is None else MetaClient(
        meta, timeout=30, credentials=_credentials(token))
    for url, rel, info in walk(str(folder), recursive=True):
        import_file(client, url, destination("/models/checkpoints/tiny-sd1", rel, str(folder)), info=info)
    import_file(client, str(lora), "/models/loras/tiny-style.safetensors")
    print(f"[6/{_STEPS}] built a tiny SD1 model and a LoRA from configs, imported under /models ({time.perf_counter() - t0:.1f}s)")

    ready = os.path.join(data, "serve.ready")
    log_path = os.path.join(data, "serve.log")
    if os.path.exists(ready):
        os.unlink(ready)
    env = dict(os.environ, **({"SDCACHE_TOKEN": token} if token else {}))
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sdcache", "serve", "--listen", "127.0.0.1:0", "--meta", meta, "--ready-file", ready,
             "--device", "cpu", "--dtype", "fp32", "--no-optimize", "--default-model", "tiny-sd1"],
            stdout=log_file, stderr=log_file, env=env, start_new_session=True)
    served = _Served(proc, [])
    try:
        address = _wait_ready(proc, ready, log_path)
        url = f"http://{address}/sdapi/v1/txt2img"
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        body = {"prompt": "a lighthouse at dusk", "steps": 4, "width": 64, "height": 64, "seed": 1}
        shots = []
        for name, prompt in (("base", body["prompt"]), ("lora", body["prompt"] + " <lora:tiny-style:1>"),
                             ("base-again", body["prompt"])):
            reply = _post(url, {**body, "prompt": prompt}, auth)
            info = json.loads(reply["info"])
            png = base64.b64decode(reply["images"][0])
            out = os.path.join(data, f"demo-{name}.png")
            with open(out, "wb") as f:
                f.write(png)
            shots.append((name, out, png, info))
        same = shots[0][2] == shots[2][2]
        changed = shots[0][2] != shots[1][2]
        sw = shots[1][3]["sdcache"]["switch_s"]
        print(f"[7/{_STEPS}] sdcache serve on {address} made 3 images through /sdapi/v1/txt2img: the LoRA "
              f"{'changed' if changed else 'did NOT change'} the image (switch {sw * 1000:.0f} ms) and removing it "
              f"{'restored it bit for bit' if same else 'did NOT restore it'}")
        if not (same and changed):
            raise errors.SdcacheError("the LoRA switch did not behave: see " + log_path)
        curl_body = json.dumps(body)
        bearer = f"$(cat {token_file})" if token_file else "$SDCACHE_TOKEN"
        auth_arg = f' -H "Authorization: Bearer {bearer}"'
        served.lines = [
            f"  images: {', '.join(out for _, out, _, _ in shots)}",
            f"  serve log: {log_path}",
            "  the request that made the first image" + (" (the server is still up):" if keep else
                                                         " (run with --keep-running to keep the server up for it):"),
            f"    curl -s{auth_arg} -H 'Content-Type: application/json' -d '{curl_body}' {url} | python3 -c "
            "\"import sys, json, base64; sys.stdout.buffer.write(base64.b64decode(json.load(sys.stdin)['images'][0]))\""
            " > out.png",
        ]
    except BaseException:
        served.stop()
        raise
    if not keep:
        served.stop()
    return served


def _credentials(token: str) -> Any:
    from .tls import Credentials

    return Credentials(token, None)


def _wait_ready(proc: "subprocess.Popen[bytes]", ready: str, log_path: str, timeout: float = 300.0) -> str:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    address = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise errors.Unavailable(f"sdcache serve exited {proc.returncode}; see {log_path}")
        if not address and os.path.exists(ready):
            address = open(ready).read().strip()
        if address:
            try:
                with urllib.request.urlopen(f"http://{address}/readyz", timeout=5) as r:
                    if r.status == 200:
                        return address
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.2)
    raise errors.Unavailable(f"sdcache serve was not ready within {timeout:.0f}s; see {log_path}")


def _post(url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise errors.SdcacheError(f"POST {url}: {exc.code} {exc.read()[:300]!r}") from None
