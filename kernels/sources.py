"""What a model URL points at: a diffusers folder or an original-layout single file.

Torch-free: only JSON, text and safetensors headers are read here (through
fsspec, so ``sdcache://`` and local paths behave the same), which tells the
layout, the family and the weight files to fetch. Weights themselves are read
later, by :mod:`.model_cache`, through ``load_safetensors``.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

from sdcache import errors
from sdcache.safetensors_header import HEADER_LEN, HeaderError, parse_header

from . import checkpoint
from .families import Family, family

log = logging.getLogger(__name__)

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
_PIPELINE_FAMILY = {
    "StableDiffusionPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionControlNetPipeline": "sd1",
    "StableDiffusionXLControlNetPipeline": "sdxl",
    "StableDiffusionImg2ImgPipeline": "sd1",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}


@dataclass
class TokenizerFiles:
    """A folder's own tokenizer: ``vocab.json`` and ``merges.txt`` texts and its config."""

    vocab_json: str
    merges_txt: str
    config: dict[str, Any]


@dataclass
class BaseSource:
    """A base model: where its weights are and how to build it."""

    url: str
    layout: str  # "folder" | "single"
    family: Family
    files: dict[str, list[str]]  # component -> weight file URLs (all the same file for a single file)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # folder component configs
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    tokenizers: dict[str, TokenizerFiles | None] = field(default_factory=dict)
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # single-file __metadata__

    @property
    def urls(self) -> list[str]:
        """Every distinct weight file, in component order."""
        seen: dict[str, None] = {}
        for files in self.files.values():
            for u in files:
                seen.setdefault(u, None)
        return list(seen)


@dataclass
class ControlNetSource:
    """A ControlNet: a diffusers folder (``config.json``) or a single file."""

    url: str
    layout: str
    files: list[str]
    config: dict[str, Any] | None = None


def url_fs(url: str, meta: str | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and path of *url* (``sdcache://`` gets the ``meta`` option)."""
    import fsspec

    opts: dict[str, Any] = {}
    if url.startswith("sdcache://") and meta:
        opts["meta"] = meta
    return fsspec.core.url_to_fs(url, **opts)


def join(url: str, *parts: str) -> str:
    """*url* with path *parts* appended (works for local paths and ``scheme://`` URLs alike)."""
    return posixpath.join(url.rstrip("/"), *parts)


def read_text(url: str, meta: str | None = None) -> str:
    fs, path = url_fs(url, meta)
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8")


def read_json(url: str, meta: str | None = None) -> dict[str, Any]:
    try:
        doc = json.loads(read_text(url, meta))
    except json.JSONDecodeError as exc:
        raise errors.InvalidArgument(f"{url}: not valid JSON ({exc.msg})") from None
    if not isinstance(doc, dict):
        raise errors.InvalidArgument(f"{url}: expected a JSON object")
    return doc


def read_header(url: str, meta: str | None = None) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and ``__metadata__`` of a safetensors file, reading only its header."""
    fs, path = url_fs(url, meta)
    try:
        size = fs.size(path)
        with fs.open(path, "rb") as f:
            raw = f.read(HEADER_LEN.size)
            if len(raw) < HEADER_LEN.size:
                raise HeaderError("truncated")
            (n,) = HEADER_LEN.unpack(raw)
            if n > 100 * 1024 * 1024 or HEADER_LEN.size + n > size:
                raise HeaderError("header length runs past the end")
            header = parse_header(f.read(n), size)
    except HeaderError as exc:
        raise errors.InvalidArgument(f"{url} is not a safetensors file ({exc})") from None
    return {t.name: tuple(t.shape) for t in header.tensors}, dict(header.metadata)


def _exists(url: str, meta: str | None) -> tuple[bool, bool]:
    """(exists, is a directory)."""
    fs, path = url_fs(url, meta)
    try:
        if fs.isdir(path):
            return True, True
        return bool(fs.exists(path)), False
    except FileNotFoundError:
        return False, False


def _listdir(url: str, meta: str | None) -> list[str]:
    fs, path = url_fs(url, meta)
    try:
        return [posixpath.basename(str(p).rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def weight_files(folder: str, meta: str | None = None) -> list[str]:
    """The safetensors weight files of one component folder (plain, fp16 variant, or sharded)."""
    names = set(_listdir(folder, meta))
    for variant in ("", ".fp16"):
        for base in WEIGHT_NAMES:
            name = f"{base}{variant}.safetensors"
            if name in names:
                return [join(folder, name)]
            index = f"{name}.index.json"
            if index in names:
                weight_map = read_json(join(folder, index), meta).get("weight_map", {})
                shards = sorted(set(weight_map.values()))
                if not shards:
                    raise errors.InvalidArgument(f"{join(folder, index)}: empty weight_map")
                return [join(folder, s) for s in shards]
    if any(n.endswith((".bin", ".ckpt", ".pt", ".pth")) for n in names):
        raise errors.InvalidArgument(f"{folder} has only pickle weights (.bin/.ckpt); only .safetensors is supported")
    raise errors.NotFound(f"no .safetensors weights in {folder}")


def _check_single_file_name(url: str) -> None:
    low = url.lower()
    if low.endswith((".ckpt", ".pt", ".pth", ".bin")):
        raise errors.InvalidArgument(f"{url}: pickle checkpoints are not supported; convert it to .safetensors")


def resolve_base(url: str, meta: str | None = None) -> BaseSource:
    """Read the layout of the base model at *url* (folder with ``model_index.json`` or single file)."""
    exists, is_dir = _exists(url, meta)
    if not exists:
        raise errors.NotFound(f"model not found: {url}")
    if is_dir:
        return _resolve_folder(url, meta)
    _check_single_file_name(url)
    shapes, metadata = read_header(url, meta)
    fam = checkpoint.detect_family(url, shapes)
    return BaseSource(
        url=url,
        layout="single",
        family=fam,
        files={c: [url] for c in fam.components},
        scheduler_config=fam.config("scheduler"),
        tokenizers={name: None for name in fam.tokenizers},
        metadata=metadata,
    )


def _resolve_folder(url: str, meta: str | None) -> BaseSource:
    names = set(_listdir(url, meta))
    if "model_index.json" not in names:
        raise errors.InvalidArgument(
            f"unknown checkpoint layout in {url}: a folder without model_index.json is not a diffusers pipeline"
        )
    index = read_json(join(url, "model_index.json"), meta)
    cls = str(index.get("_class_name", ""))
    fam_name = _PIPELINE_FAMILY.get(cls)
    if fam_name is None:
        raise errors.InvalidArgument(f"{url}: unsupported pipeline {cls or '(no _class_name)'}; SD1.x/SD2.x/SDXL only")
    configs: dict[str, dict[str, Any]] = {}
    files: dict[str, list[str]] = {}
    for comp in family(fam_name).components:
        if comp not in index or not index[comp] or index[comp][0] is None:
            raise errors.InvalidArgument(f"{url}: model_index.json has no {comp}")
        cfg_name = "config.json"
        configs[comp] = read_json(join(url, comp, cfg_name), meta)
        files[comp] = weight_files(join(url, comp), meta)
    if fam_name == "sd1" and configs["text_encoder"].get("hidden_act") == "gelu":
        fam_name = "sd2"  # an OpenCLIP text encoder: SD2.x
    fam = family(fam_name)
    sched_url = join(url, "scheduler", "scheduler_config.json")
    scheduler_config = read_json(sched_url, meta) if _exists(sched_url, meta)[0] else fam.config("scheduler")
    tokenizers: dict[str, TokenizerFiles | None] = {}
    for name in fam.tokenizers:
        tok_dir = join(url, name)
        tok_names = set(_listdir(tok_dir, meta))
        cfg = read_json(join(tok_dir, "tokenizer_config.json"), meta) if "tokenizer_config.json" in tok_names else {}
        if {"vocab.json", "merges.txt"} <= tok_names:
            tokenizers[name] = TokenizerFiles(
                read_text(join(tok_dir, "vocab.json"), meta), read_text(join(tok_dir, "merges.txt"), meta), cfg
            )
        elif "tokenizer.json" in tok_names:  # what transformers >= 5 writes
            vocab_json, merges_txt = _bpe_from_tokenizer_json(read_text(join(tok_dir, "tokenizer.json"), meta))
            tokenizers[name] = TokenizerFiles(vocab_json, merges_txt, cfg)
        else:
            tokenizers[name] = None
    kwargs = {}
    if fam.is_xl and "force_zeros_for_empty_prompt" in index:
        kwargs["force_zeros_for_empty_prompt"] = bool(index["force_zeros_for_empty_prompt"])
    return BaseSource(
        url=url, layout="folder", family=fam, files=files, configs=configs,
        scheduler_config=scheduler_config, tokenizers=tokenizers, pipeline_kwargs=kwargs,
    )


def _bpe_from_tokenizer_json(text: str) -> tuple[str, str]:
    """``vocab.json`` and ``merges.txt`` texts from a ``tokenizers`` BPE ``tokenizer.json``."""
    try:
        model = json.loads(text)["model"]
        vocab, merges = model["vocab"], model["merges"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise errors.InvalidArgument("tokenizer.json is not a BPE tokenizer") from None
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return json.dumps(vocab), "#version: 0.2\n" + "\n".join(lines)


def resolve_controlnet(url: str, meta: str | None = None) -> ControlNetSource:
    """Read the layout of the ControlNet at *url* (folder with ``config.json`` or single file)."""
    exists, is_dir = _exists(url, meta)
    if not exists:
        raise errors.NotFound(f"ControlNet not found: {url}")
    if is_dir:
        names = set(_listdir(url, meta))
        if "config.json" not in names:
            raise errors.InvalidArgument(f"{url}: a ControlNet folder needs config.json")
        cfg = read_json(join(url, "config.json"), meta)
        if cfg.get("_class_name") not in (None, "ControlNetModel"):
            raise errors.InvalidArgument(f"{url}: {cfg.get('_class_name')} is not a ControlNetModel")
        return ControlNetSource(url, "folder", weight_files(url, meta), cfg)
    _check_single_file_name(url)
    shapes, _ = read_header(url, meta)
    names = list(shapes)
    ok = (
        "time_embedding.linear_1.weight" in shapes
        or any(n.startswith(checkpoint.CONTROLNET_PREFIX) for n in names)
        or "input_hint_block.0.weight" in shapes
    )
    if not ok:
        raise errors.InvalidArgument(
            f"unknown ControlNet layout in {url}: no control_model.*/input_hint_block.* or diffusers ControlNet keys"
        )
    return ControlNetSource(url, "single", [url], None)
