"""Original-layout (LDM/SGM) single-file checkpoints -> diffusers components.

The tensors are renamed with diffusers' own conversion functions
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``,
``convert_controlnet_checkpoint``); the configs are the shipped family configs
(:mod:`.families`) with widths and depths read from the tensor shapes, never
``from_single_file``'s hub config fetch. Renaming keeps the loaded tensors
(zero-copy views of the cached buffer) except where a layout really differs
(OpenCLIP's fused ``in_proj`` and transposed projection, the VAE's 1x1 conv
attention).

The family of a single file is told from its key names alone
(:func:`detect_family`), so a wrong file fails on its header before any
tensor bytes move.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sdcache import errors

from .families import Family, family

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
XL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
XL_REFINER_PREFIX = "conditioner.embedders.0.model."
CONTROLNET_PREFIX = "control_model."

Shape = tuple[int, ...]

# ---------------------------------------------------------------- detection


def _has(names: Iterable[str], prefix: str) -> bool:
    return any(n.startswith(prefix) for n in names)


def detect_family(url: str, shapes: Mapping[str, Shape]) -> Family:
    """The family of an original-layout base checkpoint, from its tensor names and shapes.

    Raises :class:`~sdcache.errors.InvalidArgument` with one line saying what
    the file looks like when it is not an SD1.x/SD2.x/SDXL base checkpoint.
    """
    names = list(shapes)
    if not names:
        raise errors.InvalidArgument(f"unknown checkpoint layout in {url}: the file holds no tensors")
    if any(n.startswith(("lora_unet_", "lora_te")) or ".lora_down." in n or ".lora_A." in n for n in names):
        raise errors.InvalidArgument(f"{url} is a LoRA, not a base model: pass it with --lora")
    if _has(names, CONTROLNET_PREFIX) or ("input_hint_block.0.weight" in shapes and not _has(names, UNET_PREFIX)):
        raise errors.InvalidArgument(f"{url} is a ControlNet, not a base model: pass it with --controlnet")
    has_unet = _has(names, UNET_PREFIX)
    has_vae = any(_has(names, p) for p in VAE_PREFIXES)
    if _has(names, XL_OPENCLIP_PREFIX) and _has(names, XL_CLIP_PREFIX):
        fam = "sdxl"
    elif _has(names, XL_REFINER_PREFIX):
        raise errors.InvalidArgument(f"{url} is an SDXL refiner checkpoint; only SDXL base is supported")
    elif _has(names, SD2_OPENCLIP_PREFIX):
        fam = "sd2"
    elif _has(names, SD1_CLIP_PREFIX):
        fam = "sd1"
    else:
        fam = None
    if fam is None or not has_unet or not has_vae:
        missing = [
            what
            for what, ok in (("UNet", has_unet), ("VAE", has_vae), ("text encoder", fam is not None))
            if not ok
        ]
        raise errors.InvalidArgument(
            f"unknown checkpoint layout in {url}: no {', '.join(missing)} in the original SD1.x/SD2.x/SDXL layout"
            " (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*/conditioner.*)"
        )
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise errors.InvalidArgument(
            f"{url} is an inpainting/instruct checkpoint (UNet takes {conv_in[1]} channels); only text-to-image"
            " base checkpoints are supported"
        )
    return family(fam)


def prediction_type(fam: Family, shapes_std: Callable[[str], float | None], names: Iterable[str],
                    metadata: Mapping[str, str]) -> str:
    """``epsilon`` or ``v_prediction`` for a single file.

    Told by, in order: the safetensors ``__metadata__`` (``modelspec.prediction_type``,
    kohya's ``ss_v_parameterization``), a ``v_pred`` marker tensor, and for SD2
    the norm statistics that tell the 768-v models from the 512 base models
    (the rule ComfyUI uses). Otherwise ``epsilon``.
    """
    pt = str(metadata.get("modelspec.prediction_type", "")).lower()
    if pt in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if pt in ("epsilon", "eps"):
        return "epsilon"
    if str(metadata.get("ss_v_parameterization", "")).lower() == "true":
        return "v_prediction"
    if "v_pred" in set(names):
        return "v_prediction"
    if fam.name == "sd2":
        std = shapes_std(UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias")
        if std is not None and std > 0.09:
            return "v_prediction"
    return "epsilon"


# ----------------------------------------------------- UNet name maps (both ways)

_RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def unet_ldm_prefixes(config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """``(diffusers prefix, LDM prefix, is_resnet)`` for every block of a UNet with *config*.

    The inverse of diffusers' ``convert_ldm_unet_checkpoint``: it is what
    kohya SDXL LoRAs (named after the SGM modules) are mapped with, and what
    writes original-layout files.
    """
    pairs: list[tuple[str, str, bool]] = [
        ("time_embedding.linear_1", "time_embed.0", False),
        ("time_embedding.linear_2", "time_embed.2", False),
        ("conv_in", "input_blocks.0.0", False),
        ("conv_norm_out", "out.0", False),
        ("conv_out", "out.2", False),
    ]
    if config.get("addition_embed_type") == "text_time":
        pairs += [("add_embedding.linear_1", "label_emb.0.0", False),
                  ("add_embedding.linear_2", "label_emb.0.2", False)]
    if config.get("class_embed_type") in ("timestep", "projection"):
        pairs += [("class_embedding.linear_1", "label_emb.0.0", False),
                  ("class_embedding.linear_2", "label_emb.0.2", False)]
    levels = len(config["block_out_channels"])
    n = int(config["layers_per_block"])
    for b, kind in enumerate(config["down_block_types"]):
        attn = "CrossAttn" in kind
        for j in range(n):
            idx = 1 + b * (n + 1) + j
            pairs.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{idx}.0", True))
            if attn:
                pairs.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{idx}.1", False))
        if b < levels - 1:
            pairs.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{1 + b * (n + 1) + n}.0.op", False))
    pairs += [
        ("mid_block.resnets.0", "middle_block.0", True),
        ("mid_block.attentions.0", "middle_block.1", False),
        ("mid_block.resnets.1", "middle_block.2", True),
    ]
    for u, kind in enumerate(config["up_block_types"]):
        attn = "CrossAttn" in kind
        for j in range(n + 1):
            idx = u * (n + 1) + j
            pairs.append((f"up_blocks.{u}.resnets.{j}", f"output_blocks.{idx}.0", True))
            if attn:
                pairs.append((f"up_blocks.{u}.attentions.{j}", f"output_blocks.{idx}.1", False))
        if u < levels - 1:
            idx = u * (n + 1) + n
            pairs.append((f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{idx}.{2 if attn else 1}.conv", False))
    return pairs


def unet_name_to_ldm(name: str, pairs: list[tuple[str, str, bool]]) -> str | None:
    """The LDM name of diffusers UNet module or tensor *name*, or None if it has none."""
    for dif, ldm, resnet in pairs:
        if name == dif or name.startswith(dif + "."):
            rest = name[len(dif) :]
            if resnet and rest:
                head, _, tail = rest[1:].partition(".")
                rest = "." + _RESNET_LDM.get(head, head) + ("." + tail if tail else "")
            return ldm + rest
    return None


def unet_to_ldm(state_dict: Mapping[str, "torch.Tensor"], config: Mapping[str, Any]) -> dict[str, "torch.Tensor"]:
    """A diffusers UNet state dict renamed to the original ``model.diffusion_model.*`` layout."""
    pairs = unet_ldm_prefixes(config)
    out = {}
    for k, v in state_dict.items():
        ldm = unet_name_to_ldm(k, pairs)
        if ldm is None:
            raise errors.InvalidArgument(f"UNet tensor {k} has no original-layout name")
        out[UNET_PREFIX + ldm] = v
    return out


# ------------------------------------------------------- config from shapes


def _indices(names: Iterable[str], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pat.match(n))})


def heads_for(fam: Family, channels: list[int], config: Mapping[str, Any]) -> Any:
    """``attention_head_dim`` for *channels*: SD1 keeps its fixed 8 heads; SD2/SDXL use 64-wide heads."""
    if fam.head_rule == "fixed":
        return config["attention_head_dim"]
    return [max(1, c // 64) for c in channels]


def unet_config_from_ldm(
    fam: Family, shapes: Mapping[str, Shape], te2_projection_dim: int | None = None
) -> dict[str, Any]:
    """The family's UNet config with widths/depths read from LDM UNet *shapes* (prefix stripped)."""
    cfg = fam.config("unet")
    names = list(shapes)
    inputs = _indices(names, "input_blocks.")
    if not inputs:
        raise errors.InvalidArgument("the UNet has no input_blocks")
    n_in = max(inputs) + 1
    levels = 1 + sum(1 for i in inputs if f"input_blocks.{i}.0.op.weight" in shapes)
    lpb, rem = divmod(n_in - 1 - (levels - 1), levels)
    if rem or lpb < 1:
        raise errors.InvalidArgument(f"the UNet has {n_in} input blocks, which fits no {fam.label} layout")
    first = [1 + b * (lpb + 1) for b in range(levels)]
    channels = [shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0] for i in first]
    attn = [_has(names, f"input_blocks.{i}.1.") for i in first]
    cfg["block_out_channels"] = channels
    cfg["layers_per_block"] = lpb
    cfg["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    cfg["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    cfg["in_channels"] = shapes["input_blocks.0.0.weight"][1]
    cfg["out_channels"] = shapes["out.2.weight"][0]
    cfg["attention_head_dim"] = heads_for(fam, channels, cfg)
    a0 = next((i for i, a in zip(first, attn, strict=True) if a), None)
    if a0 is not None:
        cfg["cross_attention_dim"] = shapes[f"input_blocks.{a0}.1.transformer_blocks.0.attn2.to_k.weight"][1]
        cfg["use_linear_projection"] = len(shapes[f"input_blocks.{a0}.1.proj_in.weight"]) == 2
    if isinstance(cfg.get("transformer_layers_per_block"), list):
        cfg["transformer_layers_per_block"] = [
            len(_indices(names, f"input_blocks.{i}.1.transformer_blocks.")) if a else 1
            for i, a in zip(first, attn, strict=True)
        ]
    if cfg.get("addition_embed_type") == "text_time":
        in_dim = shapes["label_emb.0.0.weight"][1]
        cfg["projection_class_embeddings_input_dim"] = in_dim
        if te2_projection_dim is not None:
            per_id, rem = divmod(in_dim - te2_projection_dim, 6)
            if rem or per_id < 1:
                raise errors.InvalidArgument(
                    f"the UNet's added-conditions width {in_dim} does not fit a text projection of {te2_projection_dim}"
                )
            cfg["addition_time_embed_dim"] = per_id
    return cfg


def vae_config_from_ldm(fam: Family, shapes: Mapping[str, Shape]) -> dict[str, Any]:
    """The family's VAE config with widths/depths read from LDM VAE *shapes* (prefix stripped)."""
    cfg = fam.config("vae")
    names = list(shapes)
    levels = _indices(names, "encoder.down.")
    if not levels:
        raise errors.InvalidArgument("the VAE has no encoder.down blocks")
    channels = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
    cfg["block_out_channels"] = channels
    cfg["layers_per_block"] = len(_indices(names, "encoder.down.0.block."))
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * len(channels)
    cfg["up_block_types"] = ["UpDecoderBlock2D"] * len(channels)
    cfg["in_channels"] = shapes["encoder.conv_in.weight"][1]
    cfg["out_channels"] = shapes["decoder.conv_out.weight"][0]
    cfg["latent_channels"] = shapes["encoder.conv_out.weight"][0] // 2
    return cfg


def clip_config_from_hf(
    fam: Family, component: str, shapes: Mapping[str, Shape], n_layers: int | None = None
) -> dict[str, Any]:
    """The family's text encoder config with sizes read from HF-CLIP *shapes* (``text_model.*`` keys)."""
    cfg = fam.config(component)
    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    cfg["vocab_size"] = vocab
    cfg["hidden_size"] = hidden
    cfg["max_position_embeddings"] = shapes["text_model.embeddings.position_embedding.weight"][0]
    cfg["num_hidden_layers"] = n_layers if n_layers is not None else len(_indices(shapes, "text_model.encoder.layers."))
    cfg["intermediate_size"] = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
    cfg["num_attention_heads"] = max(1, hidden // 64)
    if "text_projection.weight" in shapes:
        cfg["projection_dim"] = shapes["text_projection.weight"][0]
    return cfg


def controlnet_config(unet_config: Mapping[str, Any], shapes: Mapping[str, Shape] | None = None) -> dict[str, Any]:
    """A ControlNet config mirroring a base UNet (what ``ControlNetModel.from_unet`` builds).

    The conditioning-embedding widths are read from *shapes* (diffusers names) when given.
    """
    keys = (
        "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
        "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
        "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim",
        "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads", "use_linear_projection",
        "class_embed_type", "addition_embed_type", "addition_time_embed_dim", "num_class_embeds",
        "upcast_attention", "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "mid_block_type",
    )
    cfg: dict[str, Any] = {"_class_name": "ControlNetModel"}
    cfg.update({k: unet_config[k] for k in keys if k in unet_config})
    cfg["conditioning_embedding_out_channels"] = [16, 32, 96, 256]
    cfg["controlnet_conditioning_channel_order"] = "rgb"
    if shapes and "controlnet_cond_embedding.conv_in.weight" in shapes:
        chans = [shapes["controlnet_cond_embedding.conv_in.weight"][0]]
        blocks = _indices(shapes, "controlnet_cond_embedding.blocks.")
        chans += [shapes[f"controlnet_cond_embedding.blocks.{i}.weight"][0] for i in blocks if i % 2 == 1]
        cfg["conditioning_embedding_out_channels"] = chans
        cfg["conditioning_channels"] = shapes["controlnet_cond_embedding.conv_in.weight"][1]
    return cfg


# ------------------------------------------------------------ conversion


def _strip(sd: Mapping[str, "torch.Tensor"], prefix: str) -> dict[str, "torch.Tensor"]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _shapes(sd: Mapping[str, "torch.Tensor"]) -> dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def split_single_file(
    fam: Family, ckpt: Mapping[str, "torch.Tensor"]
) -> dict[str, tuple[dict[str, Any], dict[str, "torch.Tensor"]]]:
    """Split an original-layout checkpoint into diffusers ``{component: (config, state_dict)}``."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    out: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}

    # text encoders first: the SDXL UNet config needs the projection width
    if fam.name == "sd1" or fam.name == "sdxl":
        # strips cond_stage_model.transformer. (SD1) / conditioner.embedders.0.transformer. (SDXL)
        te = convert_ldm_clip_checkpoint(ckpt)
        out["text_encoder"] = (clip_config_from_hf(fam, "text_encoder", _shapes(te)), te)
    te2_proj = None
    if fam.name in ("sd2", "sdxl"):
        prefix = SD2_OPENCLIP_PREFIX if fam.name == "sd2" else XL_OPENCLIP_PREFIX
        n_blocks = len(_indices(ckpt, prefix + "transformer.resblocks."))
        hidden = ckpt[prefix + "token_embedding.weight"].shape[1]
        stub = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))
        te = convert_open_clip_checkpoint(stub, ckpt, prefix=prefix)
        if fam.name == "sd2":
            # SD2 conditions on the penultimate layer: the last block is never used.
            n_layers = n_blocks - 1
            drop = f"text_model.encoder.layers.{n_layers}."
            te = {k: v for k, v in te.items() if not k.startswith(drop) and k != "text_projection.weight"}
            out["text_encoder"] = (clip_config_from_hf(fam, "text_encoder", _shapes(te), n_layers), te)
        else:
            cfg = clip_config_from_hf(fam, "text_encoder_2", _shapes(te), n_blocks)
            te2_proj = cfg["projection_dim"]
            out["text_encoder_2"] = (cfg, te)

    unet_shapes = {k[len(UNET_PREFIX) :]: tuple(v.shape) for k, v in ckpt.items() if k.startswith(UNET_PREFIX)}
    unet_cfg = unet_config_from_ldm(fam, unet_shapes, te2_proj)
    unet = convert_ldm_unet_checkpoint(ckpt, unet_cfg)
    out["unet"] = (unet_cfg, {k: v for k, v in unet.items() if v is not None})

    vae_prefix = next(p for p in VAE_PREFIXES if _has(ckpt, p))
    vae_cfg = vae_config_from_ldm(fam, _shapes(_strip(ckpt, vae_prefix)))
    vae = convert_ldm_vae_checkpoint(ckpt, vae_cfg)
    out["vae"] = (vae_cfg, {k: v for k, v in vae.items() if v is not None})
    return out


def convert_controlnet(
    ckpt: Mapping[str, "torch.Tensor"], unet_config: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, "torch.Tensor"]]:
    """A ControlNet single file (original ``control_model.*`` or diffusers names) -> (config, state dict)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if "time_embedding.linear_1.weight" not in ckpt and not (
        _has(ckpt, CONTROLNET_PREFIX) or "input_hint_block.0.weight" in ckpt
    ):
        raise errors.InvalidArgument(
            "not a ControlNet: no control_model.*/input_hint_block or diffusers ControlNet keys"
        )
    sd = convert_controlnet_checkpoint(dict(ckpt), dict(unet_config))
    sd = {k: v for k, v in sd.items() if v is not None}
    return controlnet_config(unet_config, _shapes(sd)), sd
