"""Tiny Stable Diffusion models built from configs with a fixed seed: for ``sdcache demo`` and the tests.

Every model has the structure of the real architecture (cross-attention
blocks, SDXL's added conditions and two text encoders, a VAE that downsamples
by 8, the real CLIP vocabulary) at tiny widths, so a whole pipeline runs in
well under a second on a CPU. Nothing is downloaded: weights come from a
seeded generator. ``save_folder`` writes a diffusers folder, ``save_single_file``
the original single-file layout; ``kohya_lora`` and ``peft_lora`` make LoRAs
for them in the two common key layouts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import unet_ldm_prefixes, unet_name_to_ldm
from .components import empty_module
from .families import family
from .original_layout import original_layout
from .tokenizer import clip_tokenizer

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # save_pretrained's "Writing model shards" bar

TINY_VAE = dict(
    block_out_channels=[32, 32, 32, 32],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)


def _clip_config(hidden_act: str, layers: int = 2, hidden: int = 32) -> dict[str, Any]:
    return dict(
        hidden_size=hidden, intermediate_size=37, num_attention_heads=max(1, hidden // 64), num_hidden_layers=layers,
        vocab_size=49408, max_position_embeddings=77, hidden_act=hidden_act, projection_dim=hidden,
        bos_token_id=0, eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-5,
    )


def random_module(fam: str, comp: str, dtype: torch.dtype, generator: torch.Generator,
                  std: float = 0.02) -> torch.nn.Module:
    """Component *comp* of family *fam* at its real size (the shipped config), weights drawn from *generator*.

    For benchmarks that need real-sized models: nothing is downloaded. Every
    parameter is normal(0, *std*) in parameter order; ``position_ids`` buffers
    hold their positions.
    """
    f = family(fam)
    m = empty_module(f.components[comp], f.config(comp)).to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, std, generator=generator)
        for name, b in m.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand(b.shape))
    return m.eval()


def randomize_zeros(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Give zero-initialised weights (ControlNet zero convs) random values, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_tiny(fam: str, seed: int = 0) -> dict[str, Any]:
    """Components of a tiny *fam* (``sd1``, ``sd2``, ``sdxl``) pipeline, deterministic for *seed*."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    f = family(fam)
    torch.manual_seed(seed)
    if fam == "sdxl":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(1, 1), cross_attention_dim=64,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80, sample_size=8,
        )
    else:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8 if fam == "sd1" else [1, 1],
            use_linear_projection=fam == "sd2", upcast_attention=fam == "sd2", sample_size=8,
        )
    vae = AutoencoderKL(**TINY_VAE, scaling_factor=0.13025 if fam == "sdxl" else 0.18215,
                        force_upcast=fam == "sdxl")
    comps: dict[str, Any] = {"unet": unet.eval(), "vae": vae.eval()}
    te_act = "gelu" if fam == "sd2" else "quick_gelu"
    comps["text_encoder"] = CLIPTextModel(CLIPTextConfig(**_clip_config(te_act))).eval()
    if fam == "sdxl":
        comps["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**_clip_config("gelu"))).eval()
    for name, tcfg in f.tokenizers.items():
        comps[name] = clip_tokenizer(tcfg["pad_token"], 77)
    comps["scheduler_config"] = f.config("scheduler")
    return comps


def pipeline_of(fam: str, comps: dict[str, Any]) -> Any:
    """The stock diffusers pipeline over *comps* (what ``save_pretrained`` writes)."""
    import diffusers

    sched = diffusers.EulerDiscreteScheduler.from_config(comps["scheduler_config"])
    if fam == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=comps["vae"], text_encoder=comps["text_encoder"], text_encoder_2=comps["text_encoder_2"],
            tokenizer=comps["tokenizer"], tokenizer_2=comps["tokenizer_2"], unet=comps["unet"], scheduler=sched,
            add_watermarker=False,
        )
    return diffusers.StableDiffusionPipeline(
        vae=comps["vae"], text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"], unet=comps["unet"],
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_folder(fam: str, comps: dict[str, Any], path: Path) -> Path:
    """Write *comps* as a diffusers folder (``model_index.json`` + component folders, safetensors)."""
    pipeline_of(fam, comps).save_pretrained(path, safe_serialization=True)
    return path


def save_single_file(fam: str, comps: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write *comps* as one original-layout ``.safetensors`` checkpoint."""
    state = original_layout(fam, comps)
    save_file(state, str(path), metadata=metadata)
    return path


UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _lora_targets(module: torch.nn.Module, targets: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    return [
        (n, m)
        for n, m in module.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n.endswith("." + t) for t in targets)
    ]


def _factors(m: torch.nn.Module, rank: int, g: torch.Generator, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = m.weight
    if w.ndim == 4:  # 1x1 conv (SD1 proj_in/proj_out): kohya stores conv-shaped factors
        down = torch.randn(rank, w.shape[1], 1, 1, generator=g) * std
        up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * std
    else:
        down = torch.randn(rank, w.shape[1], generator=g) * std
        up = torch.randn(w.shape[0], rank, generator=g) * std
    return down, up


def _te_name(name: str) -> str:
    return name if name.startswith(("text_model.", "text_projection")) else "text_model." + name


def kohya_lora(fam: str, comps: dict[str, Any], seed: int, rank: int = 4, alpha: float = 2.0,
               std: float = 0.3, text_encoder: bool = True) -> dict[str, torch.Tensor]:
    """A kohya/A1111 LoRA (``lora_unet_*``, ``lora_te*_*``, ``.alpha``) for the tiny *fam* model.

    SDXL UNet modules are named after the original SGM blocks, as sd-scripts does.
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    unet = comps["unet"]
    pairs = unet_ldm_prefixes(unet.config)

    def add(stem: str, m: torch.nn.Module) -> None:
        down, up = _factors(m, rank, g, std)
        sd[f"{stem}.lora_down.weight"] = down
        sd[f"{stem}.lora_up.weight"] = up
        sd[f"{stem}.alpha"] = torch.tensor(alpha)

    for name, m in _lora_targets(unet, UNET_TARGETS):
        ldm = unet_name_to_ldm(name, pairs) if fam == "sdxl" else name
        add("lora_unet_" + ldm.replace(".", "_"), m)
    if text_encoder:
        tes = [("text_encoder", "lora_te1_" if fam == "sdxl" else "lora_te_")]
        if fam == "sdxl":
            tes.append(("text_encoder_2", "lora_te2_"))
        for comp, prefix in tes:
            for name, m in _lora_targets(comps[comp], TE_TARGETS):
                add(prefix + _te_name(name).replace(".", "_"), m)
    return sd


def peft_lora(fam: str, comps: dict[str, Any], seed: int, rank: int = 4, std: float = 0.3,
              text_encoder: bool = True) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT LoRA (``unet.<module>.lora_A.weight`` / ``lora_B.weight``) for the tiny model."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    comp_names = ["unet"] + (["text_encoder"] + (["text_encoder_2"] if fam == "sdxl" else []) if text_encoder else [])
    for comp in comp_names:
        targets = UNET_TARGETS if comp == "unet" else TE_TARGETS
        for name, m in _lora_targets(comps[comp], targets):
            down, up = _factors(m, rank, g, std)
            stem = f"{comp}.{name if comp == 'unet' else _te_name(name)}"
            sd[f"{stem}.lora_A.weight"] = down.flatten(1) if down.ndim == 4 and m.weight.ndim == 2 else down
            sd[f"{stem}.lora_B.weight"] = up.flatten(1) if up.ndim == 4 and m.weight.ndim == 2 else up
    return sd


def save_lora(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
