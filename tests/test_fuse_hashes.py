"""docs/a1111_hashes.py: A1111's hash cache filled from the mount's attributes, reading no model byte."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sdcache.client.metaclient import MetaClient
from sdcache.manifest import Manifest
from sdcache.synth import write_sd_checkpoint

from .conftest import run_cli, wait_for
from .test_fuse import _sha, mounted
from .test_fuse_push import _metrics
from .test_metrics import value

pytestmark = [pytest.mark.fuse]

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "a1111_hashes.py"
FILES = 2000


def a1111_sha256_from_cache(cache_json: Path, filename: str, title: str) -> str | None:
    """What AUTOMATIC1111's ``modules/hashes.py`` ``sha256_from_cache`` returns, over its ``cache.json``."""
    hashes = json.loads(cache_json.read_text()).get("hashes", {})
    ondisk_mtime = os.path.getmtime(filename)
    if title not in hashes:
        return None
    cached_sha256 = hashes[title].get("sha256", None)
    cached_mtime = hashes[title].get("mtime", 0)
    if ondisk_mtime > cached_mtime or cached_sha256 is None:
        return None
    return cached_sha256


def test_a1111_hash_cache_is_filled_for_thousands_of_models_without_reading_one(cluster, tmp_path):
    meta = MetaClient(cluster.meta_addr)
    fake = {f"/hashes/checkpoints/{'sub/' if i % 10 == 0 else ''}m{i:05d}.safetensors":
            hashlib.sha256(str(i).encode()).hexdigest() for i in range(FILES)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: meta.commit(Manifest(kv[0], 0, 1_700_000_000.0 + len(kv[0]), "", "", kv[1], [],
                                                      kind="checkpoint")), fake.items()))
    real = tmp_path / "real.safetensors"
    write_sd_checkpoint(str(real), 0.002, unet_seed=71)
    run_cli("import", str(real), "/hashes/checkpoints/real.safetensors", meta=cluster.meta_addr, check=True)
    cache_json = tmp_path / "webui" / "cache.json"
    cache_json.parent.mkdir()
    cache_json.write_text(json.dumps({"hashes": {"checkpoint/local.ckpt": {"mtime": 1.0, "sha256": "ab" * 32}},
                                      "safetensors-metadata": {"x": {"mtime": 1.0, "value": {}}}}))

    with mounted(cluster.meta_addr, tmp_path / "mnt", "--metrics-listen", "127.0.0.1:0") as m:
        ckpt_dir = m.path / "hashes" / "checkpoints"
        before = _metrics(m)
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, str(SCRIPT), str(ckpt_dir), "--cache-json", str(cache_json)],
                              capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr
        after = _metrics(m)
        ops = "sdcache_fuse_operations_total"
        for op in ("open", "read"):  # no model was opened, no byte read: nothing was hashed
            assert value(after, ops, op=op) == value(before, ops, op=op), op

        data = json.loads(cache_json.read_text())
        assert data["hashes"]["checkpoint/local.ckpt"]["sha256"] == "ab" * 32  # what was there stays
        assert "safetensors-metadata" in data
        assert len(data["hashes"]) == FILES + 2
        for path, digest in list(fake.items())[:: FILES // 50]:
            rel = path.removeprefix("/hashes/checkpoints/")
            assert a1111_sha256_from_cache(cache_json, str(ckpt_dir / rel), f"checkpoint/{rel}") == digest
        on_mount = str(ckpt_dir / "real.safetensors")
        assert a1111_sha256_from_cache(cache_json, on_mount, "checkpoint/real.safetensors") == _sha(real)
        assert elapsed < 30, f"{FILES} models took {elapsed:.1f}s"

        proc = subprocess.run([sys.executable, str(SCRIPT), str(ckpt_dir), "--json"], capture_output=True,
                              text=True, timeout=120, check=True)
        listing = json.loads(proc.stdout)
        assert listing["real.safetensors"] == _sha(real)
        assert listing["sub/m00010.safetensors"] == fake["/hashes/checkpoints/sub/m00010.safetensors"]

        # A re-imported model has a new mtime on the mount: its old entry no longer counts; a new run fixes it.
        write_sd_checkpoint(str(real), 0.002, unet_seed=72)
        os.utime(real, (time.time() + 10, time.time() + 10))
        run_cli("import", str(real), "/hashes/checkpoints/real.safetensors", meta=cluster.meta_addr, check=True)
        wait_for(lambda: os.getxattr(on_mount, "user.sdcache.sha256").decode() == _sha(real), "the new version")
        assert a1111_sha256_from_cache(cache_json, on_mount, "checkpoint/real.safetensors") is None
        subprocess.run([sys.executable, str(SCRIPT), str(ckpt_dir), "--cache-json", str(cache_json)],
                       capture_output=True, timeout=120, check=True)
        assert a1111_sha256_from_cache(cache_json, on_mount, "checkpoint/real.safetensors") == _sha(real)
