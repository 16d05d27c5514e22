"""The command line against a real cluster: output a script can parse, one-line errors."""

from __future__ import annotations

import json
import os
import struct

import pytest

from sdcache.synth import write_sd_checkpoint

from .conftest import run_cli


def _one_line_error(proc) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("path", ["/nope/missing.safetensors", "../etc/passwd", "/a//b"])
def test_bad_paths_get_one_clear_line(cluster, path):
    line = _one_line_error(run_cli("stat", path, meta=cluster.meta_addr))
    assert line.startswith("sdcache: error:")


def test_nul_in_a_path_is_rejected_by_the_service(cluster):
    import grpc

    from sdcache import errors
    from sdcache._proto import meta_pb2 as pb
    from sdcache._proto import meta_pb2_grpc as pbg
    from sdcache.client.metaclient import MetaClient

    with pytest.raises(errors.InvalidPath):
        MetaClient(cluster.meta_addr).stat("/a/\x00b")
    # The service validates on its own too, whatever a client sends.
    from sdcache.meta.grpcauth import channel
    from sdcache.tls import Credentials

    with channel(cluster.meta_addr, Credentials(token=cluster.admin_token)) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pbg.MetaStub(ch).Stat(pb.PathRequest(path="/a/\x00b"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_missing_source_and_unreachable_service(cluster, tmp_path):
    line = _one_line_error(run_cli("import", str(tmp_path / "nope.safetensors"), "/x/", meta=cluster.meta_addr))
    assert "not found" in line
    line = _one_line_error(run_cli("ls", "/", meta="127.0.0.1:1"))
    assert "unreachable" in line


def test_invalid_safetensors_is_stored_byte_exact_as_other(cluster, tmp_path):
    cases = {
        "truncated.safetensors": struct.pack("<Q", 10_000) + b"{",
        "notjson.safetensors": struct.pack("<Q", 8) + b"not json" + b"\0" * 64,
        "pastend.safetensors": _header({"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, 16),
        "overlap.safetensors": _header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24),
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        proc = run_cli("import", str(tmp_path / name), f"/bad/{name}", meta=cluster.meta_addr)
        assert proc.returncode == 0, proc.stderr
        assert "warning" in proc.stderr and "other" in proc.stderr
        stat = json.loads(run_cli("stat", "--json", f"/bad/{name}", meta=cluster.meta_addr, check=True).stdout)
        assert stat["kind"] == "other"
        assert _cat_bytes(cluster, name) == blob


def _cat_bytes(cluster, name: str) -> bytes:
    from sdcache.client.fs import SdcacheFileSystem

    return SdcacheFileSystem(meta=cluster.meta_addr).cat_file(f"/bad/{name}")


def _header(doc: dict, data_len: int) -> bytes:
    blob = json.dumps(doc).encode()
    return struct.pack("<Q", len(blob)) + blob + b"\1" * data_len


def test_ls_stat_nodes_stats_json(cluster, tmp_path):
    src = tmp_path / "m.safetensors"
    write_sd_checkpoint(str(src), 0.002, unet_seed=11)
    run_cli("import", str(tmp_path), "/tree", "-r", meta=cluster.meta_addr, check=True)
    rows = json.loads(run_cli("ls", "--json", "/tree", meta=cluster.meta_addr, check=True).stdout)
    assert [r["path"] for r in rows] == ["/tree/m.safetensors"]
    assert rows[0]["size"] == os.path.getsize(src)
    top = run_cli("ls", "-l", "/", meta=cluster.meta_addr, check=True).stdout
    assert "tree/" in top
    nodes = json.loads(run_cli("nodes", "--json", meta=cluster.meta_addr, check=True).stdout)
    assert len(nodes) == 3 and all(n["alive"] for n in nodes)
    stats = json.loads(run_cli("stats", "--json", meta=cluster.meta_addr, check=True).stdout)
    assert stats["nodes"] == 3 and stats["files"] >= 1


def test_put_get_rm_roundtrip(cluster, tmp_path):
    data = os.urandom(9 << 20) + b"tail"
    (tmp_path / "blob.bin").write_bytes(data)
    run_cli("put", str(tmp_path / "blob.bin"), "/up/blob.bin", meta=cluster.meta_addr, check=True)
    run_cli("get", "/up/blob.bin", str(tmp_path / "back.bin"), meta=cluster.meta_addr, check=True)
    assert (tmp_path / "back.bin").read_bytes() == data
    # The upload is the cluster's own copy: deleting the local file loses nothing.
    (tmp_path / "blob.bin").unlink()
    run_cli("evict", "/up/blob.bin", meta=cluster.meta_addr, check=True)
    run_cli("get", "/up/blob.bin", str(tmp_path / "again.bin"), meta=cluster.meta_addr, check=True)
    assert (tmp_path / "again.bin").read_bytes() == data
    run_cli("rm", "/up/blob.bin", meta=cluster.meta_addr, check=True)
    _one_line_error(run_cli("stat", "/up/blob.bin", meta=cluster.meta_addr))


def test_warmup_reports_progress_and_what_fits(cluster, tmp_path):
    src = tmp_path / "w.safetensors"
    write_sd_checkpoint(str(src), 0.01, unet_seed=5)
    run_cli("import", str(src), "/warm/w.safetensors", meta=cluster.meta_addr, check=True)
    proc = run_cli("warmup", "--json", "/warm/w.safetensors", meta=cluster.meta_addr, check=True)
    doc = json.loads(proc.stdout)
    assert doc["cached_bytes"] == doc["total_bytes"] == os.path.getsize(src)
    check = json.loads(run_cli("warmup", "--check", "--json", "/warm", "-r", meta=cluster.meta_addr,
                               check=True).stdout)
    assert check["cached_bytes"] == check["total_bytes"]


def test_a_pool_smaller_than_the_request_says_what_fits_and_still_serves(make_cluster, tmp_path):
    from sdcache.client.fs import SdcacheFileSystem
    from sdcache.client.metaclient import MetaClient

    c = make_cluster(nodes=2, capacity=16 << 20)
    src = tmp_path / "big.safetensors"
    write_sd_checkpoint(str(src), 0.03, unet_seed=4)  # ~60 MB into 32 MiB of pool
    run_cli("import", str(src), "/big/m.safetensors", meta=c.meta_addr, check=True)
    proc = run_cli("warmup", "/big/m.safetensors", meta=c.meta_addr)
    assert proc.returncode != 0
    assert "fits" in proc.stderr
    # Reads still return every byte; no node ever holds more than its capacity.
    data = SdcacheFileSystem(meta=c.meta_addr).cat_file("/big/m.safetensors")
    assert data == src.read_bytes()
    for n in MetaClient(c.meta_addr).nodes_raw():
        assert n.used <= 16 << 20
