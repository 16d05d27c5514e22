"""End to end: real metadata service, real nodes, real client, real files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading

import fsspec
import pytest

from sdcache import errors
from sdcache.client.fs import SdcacheFileSystem
from sdcache.client.metaclient import MetaClient
from sdcache.pool_layout import chunk_path
from sdcache.synth import write_sd_checkpoint

from ._requirements import import_required
from .conftest import corrupt_everywhere, run_cli

SCALE = 0.08  # ~150 MB: SD-shaped, few hundred MB class


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    path = str(tmp_path_factory.mktemp("models") / "sd15-tiny.safetensors")
    write_sd_checkpoint(path, SCALE, unet_seed=7)
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return path, digest


def _sha_of_stream(f, block: int = 3 << 20) -> str:
    h = hashlib.sha256()
    while data := f.read(block):
        h.update(data)
    return h.hexdigest()


def test_import_and_read_back_through_fsspec(cluster, checkpoint):
    src, digest = checkpoint
    run_cli("import", src, "/models/sd15.safetensors", meta=cluster.meta_addr, check=True)
    fs = fsspec.filesystem("sdcache", meta=cluster.meta_addr)
    info = fs.info("sdcache://models/sd15.safetensors")
    assert info["sha256"] == digest
    assert info["kind"] == "checkpoint" and info["base"] == "sd1"
    assert info["size"] == os.path.getsize(src)
    assert info["size"] / info["chunks"] >= 1 << 20  # chunks average at least 1 MiB
    with fs.open("sdcache://models/sd15.safetensors", "rb") as f:
        assert _sha_of_stream(f) == digest
    assert hashlib.sha256(fs.cat("sdcache://models/sd15.safetensors")).hexdigest() == digest
    # Random access: seek + read matches the source bytes.
    with open(src, "rb") as ref, fs.open("/models/sd15.safetensors") as f:
        for off, n in ((0, 100), (5_000_123, 9_000_000), (info["size"] - 10, 100)):
            ref.seek(off)
            f.seek(off)
            assert f.read(n) == ref.read(n)
    # Once read, every chunk sits in the pool.
    assert fs.info("/models/sd15.safetensors")["cached"] == 1.0


def test_load_safetensors_from_cache_equals_local(cluster, checkpoint):
    torch = import_required("torch")
    from safetensors.torch import load_file

    from sdcache.client import load_safetensors

    src, _ = checkpoint
    run_cli("import", src, "/models/load.safetensors", meta=cluster.meta_addr, check=True)
    got = load_safetensors("sdcache://models/load.safetensors", meta=cluster.meta_addr)
    want = load_file(src)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_node_killed_mid_read_still_returns_right_bytes(own_cluster, checkpoint):
    src, digest = checkpoint
    run_cli("import", src, "/m/a.safetensors", "--warm", meta=own_cluster.meta_addr, check=True)
    fs = SdcacheFileSystem(meta=own_cluster.meta_addr)
    h = hashlib.sha256()
    with fs.open("/m/a.safetensors", "rb") as f:
        h.update(f.read(20 << 20))
        own_cluster.node_children[1].signal(signal.SIGKILL)
        own_cluster.node_children[1].proc.wait()
        while data := f.read(4 << 20):
            h.update(data)
    assert h.hexdigest() == digest


def test_corrupted_chunk_in_a_node_never_reaches_the_reader(own_cluster, checkpoint):
    src, digest = checkpoint
    meta = own_cluster.meta_addr
    run_cli("import", src, "/m/c.safetensors", "--warm", meta=meta, check=True)
    m = MetaClient(meta).manifest("/m/c.safetensors")
    flipped = sum(corrupt_everywhere(own_cluster, ref.id) for ref in m.chunks[:40])
    assert flipped >= 20
    for short_circuit in (True, False):
        fs = SdcacheFileSystem(meta=meta)
        fs.fetcher.short_circuit = short_circuit
        assert hashlib.sha256(fs.cat_file("/m/c.safetensors")).hexdigest() == digest


def test_committed_files_survive_kill_9_of_the_metadata_service(own_cluster, checkpoint):
    src, digest = checkpoint
    meta = own_cluster.meta_addr
    for i in range(5):
        run_cli("import", src, f"/keep/{i}.safetensors", meta=meta, check=True)
    own_cluster.restart_meta(signal.SIGKILL)
    own_cluster.wait_nodes(3)
    out = run_cli("ls", "--json", "/keep", meta=meta, check=True)
    names = sorted(e["path"] for e in json.loads(out.stdout))
    assert names == [f"/keep/{i}.safetensors" for i in range(5)]
    fs = SdcacheFileSystem(meta=meta)
    assert hashlib.sha256(fs.cat_file("/keep/3.safetensors")).hexdigest() == digest


def test_shared_vae_and_text_encoder_are_stored_once(cluster, tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    write_sd_checkpoint(a, 0.02, unet_seed=1, metadata={"note": "fine-tune A"})
    # Different UNet weights and a longer header: everything but VAE + text encoder differs.
    write_sd_checkpoint(b, 0.02, unet_seed=2, unet_scale=0.03, metadata={"note": "fine-tune B " + "x" * 5000})
    run_cli("import", a, "/dedup/a.safetensors", meta=cluster.meta_addr, check=True)
    run_cli("import", b, "/dedup/b.safetensors", meta=cluster.meta_addr, check=True)
    client = MetaClient(cluster.meta_addr)
    ma, mb = client.manifest("/dedup/a.safetensors"), client.manifest("/dedup/b.safetensors")
    assert ma.sha256 != mb.sha256
    ids_b = {c.id for c in mb.chunks}
    shared = sum(c.length for c in ma.chunks if c.id in ids_b)
    from sdcache.synth import sd_checkpoint_tensors

    t = sd_checkpoint_tensors(0.02, unet_seed=1)
    shared_tensor_bytes = sum(v.nbytes for k, v in t.items() if not k.startswith("model.diffusion_model."))
    assert shared >= shared_tensor_bytes  # every VAE and text-encoder byte dedups


def test_changed_or_vanished_source_reads_as_stale(cluster, tmp_path):
    src = tmp_path / "lora.safetensors"
    write_sd_checkpoint(str(src), 0.002, unet_seed=3)
    run_cli("import", str(src), "/stale/lora.safetensors", meta=cluster.meta_addr, check=True)
    data = bytearray(src.read_bytes())
    data[-1000] ^= 0xFF  # same size, one byte changed
    src.write_bytes(bytes(data))
    fs = SdcacheFileSystem(meta=cluster.meta_addr)
    with pytest.raises(errors.StaleSource):
        fs.cat_file("/stale/lora.safetensors")
    proc = run_cli("cat", "/stale/lora.safetensors", meta=cluster.meta_addr)
    assert proc.returncode != 0 and "changed since import" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    src.unlink()
    with pytest.raises(errors.StaleSource, match="vanished"):
        fs.cat_file("/stale/lora.safetensors")


def test_s3_source_read_through(cluster, s3_server, tmp_path):
    import boto3

    src = str(tmp_path / "s3.safetensors")
    write_sd_checkpoint(src, 0.004, unet_seed=9)  # moto reads whole objects per range: keep it small
    with open(src, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="models")
    s3.upload_file(src, "models", "base/sd15.safetensors")
    run_cli("import", "s3://models/base/sd15.safetensors", "/s3/sd15.safetensors", meta=cluster.meta_addr,
            check=True)
    fs = SdcacheFileSystem(meta=cluster.meta_addr)
    info = fs.info("/s3/sd15.safetensors")
    assert info["sha256"] == digest and info["source"] == "s3://models/base/sd15.safetensors"
    assert hashlib.sha256(fs.cat_file("/s3/sd15.safetensors")).hexdigest() == digest


def test_concurrent_readers_get_identical_bytes(cluster, checkpoint):
    src, digest = checkpoint
    run_cli("import", src, "/conc/a.safetensors", meta=cluster.meta_addr, check=True)
    results: list[str] = []

    def reader() -> None:
        fs = SdcacheFileSystem(meta=cluster.meta_addr)
        with fs.open("/conc/a.safetensors", "rb") as f:
            results.append(_sha_of_stream(f))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [digest] * 4


def test_same_host_load_maps_the_pool_verifies_and_never_writes_it(own_cluster, tmp_path):
    torch = import_required("torch")
    from safetensors.torch import load_file

    from sdcache.client import load_safetensors

    src = str(tmp_path / "m.safetensors")
    write_sd_checkpoint(src, 0.01, unet_seed=12)
    meta = own_cluster.meta_addr
    run_cli("import", src, "/map/m.safetensors", "--warm", meta=meta, check=True)
    m = MetaClient(meta).manifest("/map/m.safetensors")
    pool_files = [p for ref in m.chunks for i in range(3)
                  if os.path.exists(p := chunk_path(os.path.join(own_cluster.pool_root, f"node{i}"), ref.id))]
    assert len(pool_files) >= len(m.chunks)
    victim = pool_files[len(pool_files) // 2]
    with open(victim, "r+b") as f:  # corrupt one pooled chunk in place
        f.seek(100)
        f.write(b"\xff\xfe")
    fs = SdcacheFileSystem(meta=meta)
    fs.fetcher.tiers.clear()
    got = load_safetensors("sdcache://map/m.safetensors", meta=meta)
    assert fs.fetcher.tiers["local"] >= len(m.chunks) - 2  # mapped, not copied
    want = load_file(src)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    before = {p: open(p, "rb").read() for p in pool_files if p != victim}
    for t in got.values():
        t.zero_()  # tensors are writable; the pool never changes
    assert all(open(p, "rb").read() == data for p, data in before.items())
