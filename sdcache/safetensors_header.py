"""Reading and validating a ``.safetensors`` header, and telling the model kind.

Layout of a safetensors file::

    u64 little-endian   N, the length of the JSON header
    N bytes             JSON: {name: {"dtype", "shape", "data_offsets": [b, e]}, "__metadata__": {...}}
    ...                 tensor bytes; offsets are relative to byte 8 + N

Only the header is read. A header that is truncated, not JSON, or whose
offsets run past the end or overlap raises :class:`HeaderError`; importers
then store the file byte-exact as kind ``other``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

HEADER_LEN = struct.Struct("<Q")  # u64: byte length of the JSON header
MAX_HEADER = 100 * 1024 * 1024  # the safetensors reference limit

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

KINDS = ("checkpoint", "lora", "controlnet", "vae", "embedding", "other")


class HeaderError(ValueError):
    """The file is not a valid safetensors file; says why in one line."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(slots=True)
class Header:
    data_start: int  # absolute offset of the tensor data (8 + N)
    tensors: list[TensorInfo]  # sorted by offset
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(f: BinaryIO, file_size: int) -> Header:
    """Read and validate the header of an open safetensors file of *file_size* bytes."""
    raw = f.read(HEADER_LEN.size)
    if len(raw) < HEADER_LEN.size:
        raise HeaderError("truncated: shorter than the 8-byte header length")
    (n,) = HEADER_LEN.unpack(raw)
    if n > MAX_HEADER or HEADER_LEN.size + n > file_size:
        raise HeaderError(f"truncated: header length {n} runs past the end of the {file_size}-byte file")
    return parse_header(f.read(n), file_size)


def parse_header(blob: bytes, file_size: int) -> Header:
    """Validate the JSON header *blob* of a file of *file_size* bytes."""
    data_start = HEADER_LEN.size + len(blob)
    try:
        doc = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"header is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise HeaderError("header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise HeaderError("__metadata__ is not an object")
    tensors: list[TensorInfo] = []
    for name, info in doc.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise HeaderError(f"tensor {name!r} has a malformed entry") from None
        if dtype not in DTYPE_SIZES:
            raise HeaderError(f"tensor {name!r} has unknown dtype {dtype!r}")
        count = 1
        for d in shape:
            if d < 0:
                raise HeaderError(f"tensor {name!r} has a negative dimension")
            count *= d
        if not 0 <= begin <= end or end - begin != count * DTYPE_SIZES[dtype]:
            raise HeaderError(f"tensor {name!r} has offsets that do not match its shape and dtype")
        if data_start + end > file_size:
            raise HeaderError(f"tensor {name!r} has offsets past the end of the file")
        tensors.append(TensorInfo(name, dtype, shape, data_start + begin, data_start + end))
    tensors.sort(key=lambda t: (t.begin, t.end))
    for a, b in zip(tensors, tensors[1:]):
        if b.begin < a.end:
            raise HeaderError(f"tensors {a.name!r} and {b.name!r} overlap")
    return Header(data_start, tensors, {str(k): str(v) for k, v in meta.items()})


def detect_kind(names: list[str]) -> tuple[str, str]:
    """Tell ``(kind, base)`` from tensor names.

    *kind* is one of :data:`KINDS`; *base* is ``sd1``, ``sd2``, ``sdxl`` or ``""``
    when the architecture cannot be told.
    """
    keys = set(names)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    def contains(part: str) -> bool:
        return any(part in k for k in keys)

    if contains("lora_up") or contains("lora_down") or contains("lora_A") or contains("lora_B") or contains(".lora."):
        if has("lora_te2_") or has("lora_te1_") or contains("input_blocks_4_1_transformer_blocks_1") or has("lora_unet_input_blocks"):
            base = "sdxl"
        elif has("lora_unet_") or has("lora_te_") or has("unet.") or has("text_encoder."):
            base = "sd1"
        else:
            base = ""
        return "lora", base
    if has("control_model.") or contains("controlnet_cond_embedding") or has("controlnet_down_blocks"):
        return "controlnet", "sdxl" if contains("add_embedding") or contains("label_emb") else "sd1"
    if has("model.diffusion_model."):
        if has("conditioner.embedders.1") or has("model.diffusion_model.label_emb"):
            return "checkpoint", "sdxl"
        if has("cond_stage_model.model."):
            return "checkpoint", "sd2"
        return "checkpoint", "sd1"
    if has("first_stage_model.") or (has("encoder.down") and has("decoder.up")) or (has("encoder.conv_in") and has("decoder.conv_in")):
        return "vae", ""
    if keys and (keys <= {"emb_params", "string_to_param.*", "clip_l", "clip_g", "string_to_token", "string_to_param"} or has("string_to_param")):
        return "embedding", "sdxl" if "clip_g" in keys else ""
    if has("down_blocks.") and has("conv_in.") and contains("attentions"):
        return "checkpoint", "sdxl" if has("add_embedding.") else "sd1"
    return "other", ""
