"""The pure core: paths, chunking, manifests, placement, safetensors headers."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections import Counter

import numpy as np
import pytest
from safetensors.numpy import save

from sdcache import errors, paths
from sdcache.chunking import CHUNK_SIZE, chunk_file
from sdcache.manifest import Manifest, pack_chunks, unpack_chunks
from sdcache.placement import NodeInfo, rank
from sdcache.safetensors_header import HeaderError, detect_kind, parse_header
from sdcache.units import parse_size


@pytest.mark.parametrize("raw,want", [("sdcache://models/a.safetensors", "/models/a.safetensors"),
                                      ("models/a", "/models/a"), ("/x/", "/x"), ("", "/"), ("/", "/")])
def test_normalize_accepts(raw, want):
    assert paths.normalize(raw) == want


@pytest.mark.parametrize("raw", ["/a/../b", "../x", "/a//b", "/a/./b", "/a\x00b"])
def test_normalize_rejects(raw):
    with pytest.raises(errors.InvalidPath):
        paths.normalize(raw)


def test_errors_are_builtin_kinds_and_round_trip():
    assert issubclass(errors.NotFound, FileNotFoundError)
    assert issubclass(errors.ReadOnly, PermissionError)
    for cls in errors.ERRORS:
        again = errors.from_wire(cls.__name__, "m")
        assert type(again) is cls and str(again) == "m"
    assert isinstance(errors.from_wire(None, "x", grpc_code="NOT_FOUND"), errors.NotFound)


def test_parse_size():
    assert parse_size("8GiB") == 8 << 30
    assert parse_size("512MB") == 512_000_000
    with pytest.raises(errors.InvalidArgument):
        parse_size("lots")


def _tensors(prefix: str, seed: int, n: int = 30) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(320,), (320, 320), (1280, 320, 3), (4,), (640, 640, 3, 3), (77, 768)]
    return {f"{prefix}.{i:03d}": rng.standard_normal(shapes[i % len(shapes)]).astype(np.float16) for i in range(n)}


def _chunk(blob: bytes, name: str = "m.safetensors"):
    return chunk_file(io.BytesIO(blob), len(blob), name=name)


def test_chunks_tile_the_file_and_hash_it():
    blob = save({**_tensors("first_stage_model.x", 1), **_tensors("model.diffusion_model.y", 2)})
    r = _chunk(blob)
    m = Manifest("/m", len(blob), 0, "", "", r.sha256, r.chunks)
    m.validate()
    assert r.sha256 == hashlib.sha256(blob).hexdigest()
    assert all(c.length <= CHUNK_SIZE for c in r.chunks)
    assert unpack_chunks(pack_chunks(r.chunks)) == r.chunks
    assert r.kind == "checkpoint"


def test_shared_tensors_give_shared_chunks_whatever_the_header():
    shared = {**_tensors("first_stage_model.enc", 5), **_tensors("cond_stage_model.transformer", 6)}
    a = save({**shared, **_tensors("model.diffusion_model.a", 7)}, metadata={"n": "1"})
    b = save({**shared, **_tensors("model.diffusion_model.b", 8, 12)}, metadata={"n": "x" * 3000})
    ca, cb = _chunk(a), _chunk(b)
    ids_b = {c.id for c in cb.chunks}
    shared_bytes = sum(c.length for c in ca.chunks if c.id in ids_b)
    assert shared_bytes >= sum(v.nbytes for v in shared.values())


def test_non_safetensors_files_use_fixed_chunks():
    blob = bytes(range(256)) * (40_000)
    r = _chunk(blob, "model.ckpt")
    assert [c.length for c in r.chunks[:-1]] == [CHUNK_SIZE] * (len(r.chunks) - 1)
    assert r.kind == "other"


@pytest.mark.parametrize("blob", [
    b"\x01\x02",
    struct.pack("<Q", 5) + b"{nope",
    struct.pack("<Q", 1 << 40) + b"{}",
])
def test_bad_headers_fall_back_to_other(blob):
    r = _chunk(blob + b"\0" * 100)
    assert r.kind == "other" and "not a valid safetensors" in r.warning
    assert r.sha256 == hashlib.sha256(blob + b"\0" * 100).hexdigest()


def test_overlapping_and_past_end_offsets_are_rejected():
    doc = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    blob = json.dumps(doc).encode()
    with pytest.raises(HeaderError, match="overlap"):
        parse_header(blob, 8 + len(blob) + 24)
    with pytest.raises(HeaderError, match="past the end"):
        parse_header(blob, 8 + len(blob) + 10)


@pytest.mark.parametrize("names,kind,base", [
    (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"], "checkpoint", "sd1"),
    (["model.diffusion_model.x", "cond_stage_model.model.transformer.x"], "checkpoint", "sd2"),
    (["model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.x"], "checkpoint", "sdxl"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "lora", "sd1"),
    (["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"], "lora", "sdxl"),
    (["control_model.input_blocks.0.0.weight"], "controlnet", "sd1"),
    (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"], "vae", ""),
    (["emb_params"], "embedding", ""),
    (["foo"], "other", ""),
])
def test_detect_kind(names, kind, base):
    assert detect_kind(names) == (kind, base)


def test_rendezvous_is_weighted_and_stable():
    nodes = [NodeInfo("a", "h:1", 1 << 30), NodeInfo("b", "h:2", 1 << 30), NodeInfo("c", "h:3", 2 << 30)]
    ids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(6000)]
    owners = Counter(rank(i, nodes)[0].node_id for i in ids)
    assert 0.4 < owners["c"] / 6000 < 0.6  # twice the capacity, about half the chunks
    # Removing a node only moves the chunks it owned.
    moved = sum(1 for i in ids if rank(i, nodes)[0].node_id != "a" and rank(i, nodes[1:])[0].node_id != rank(i, nodes)[0].node_id)
    assert moved == 0
