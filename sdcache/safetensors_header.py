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
    blob = f.read(n)
    if len(blob) != n:  # the file is shorter than *file_size* said
        raise HeaderError(f"truncated: header length {n}, but the file ends after {len(blob)} header bytes")
    return parse_header(blob, file_size)


def _is_count(x: object) -> bool:
    """A JSON integer >= 0 (``true`` is not a count, nor is ``1.0``)."""
    return type(x) is int and x >= 0


def _utf8(text: str, what: str) -> str:
    """*text*, unless it holds a lone surrogate (a ``\\ud800`` escape), which no wire can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise HeaderError(f"{what} is not valid Unicode") from None
    return text


def parse_header(blob: bytes, file_size: int) -> Header:
    """Validate the JSON header *blob* of a file of *file_size* bytes.

    Any defect raises :class:`HeaderError`, never another exception: the
    header is untrusted input. Like the reference reader, the header must be
    UTF-8, dims and offsets must be JSON integers, and ``data_offsets`` must
    be ``[begin, end]``.
    """
    data_start = HEADER_LEN.size + len(blob)
    try:
        doc = json.loads(str(blob, "utf-8"))
    except RecursionError:
        raise HeaderError("header is nested too deeply") from None
    except ValueError as exc:  # not UTF-8, not JSON, or an integer of more than 4300 digits
        raise HeaderError(f"header is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise HeaderError("header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise HeaderError("__metadata__ is not an object")
    tensors: list[TensorInfo] = []
    for name, info in doc.items():
        _utf8(name, "a tensor name")
        if not isinstance(info, dict):
            raise HeaderError(f"tensor {name!r:.80} has a malformed entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(_is_count(d) for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(x) for x in offsets)
        ):
            raise HeaderError(f"tensor {name!r:.80} has a malformed entry")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise HeaderError(f"tensor {name!r:.80} has unknown dtype {dtype!r:.40}")
        begin, end = offsets
        count = 1
        if 0 not in shape:
            for d in shape:
                count *= d
                if count > file_size:  # cannot fit; stop before the product grows without bound
                    raise HeaderError(f"tensor {name!r:.80} has a shape larger than the file")
        else:
            count = 0
        if not begin <= end or end - begin != count * DTYPE_SIZES[dtype]:
            raise HeaderError(f"tensor {name!r:.80} has offsets that do not match its shape and dtype")
        if data_start + end > file_size:
            raise HeaderError(f"tensor {name!r:.80} has offsets past the end of the file")
        tensors.append(TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end))
    tensors.sort(key=lambda t: (t.begin, t.end))
    for a, b in zip(tensors, tensors[1:]):
        if b.begin < a.end:
            raise HeaderError(f"tensors {a.name!r:.80} and {b.name!r:.80} overlap")
    try:
        metadata = {_utf8(str(k), "a __metadata__ key"): _utf8(str(v), "a __metadata__ value") for k, v in meta.items()}
    except RecursionError:
        raise HeaderError("__metadata__ is nested too deeply") from None
    return Header(data_start, tensors, metadata)


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
