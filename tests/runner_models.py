"""Tiny SD1.x / SD2.x / SDXL / ControlNet / LoRA models for the runner tests.

Every model is built from a config with a fixed seed: tiny widths, the same
structure as the real architectures (cross-attention blocks, the SDXL added
conditions and two text encoders, a VAE that downsamples by 8, the real
CLIP vocabulary). They are written as diffusers folders (``save_pretrained``)
and as single files in the *original* layout, produced by renaming the
diffusers tensors back with an explicit key map
(:mod:`sdcache.kernels.original_layout`, the inverse of diffusers'
``convert_ldm_*`` functions; ``test_runner_convert.py`` checks the round trip
against diffusers' own conversion).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from sdcache.kernels.original_layout import controlnet_to_ldm
from sdcache.kernels.tiny import (  # noqa: F401 - re-exported for the tests
    TE_TARGETS,
    TINY_VAE,
    UNET_TARGETS,
    build_tiny,
    kohya_lora,
    peft_lora,
    pipeline_of,
    randomize_zeros,
    save_folder,
    save_lora,
    save_single_file,
)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

# ------------------------------------------------------------------ ControlNet


def build_controlnet(unet: Any, seed: int = 0) -> Any:
    """A tiny ControlNet mirroring *unet*, its zero convs randomised so the control image matters."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet)
    randomize_zeros(cn, seed + 1, std=0.2)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # He-initialised conditioning path, so the control image visibly steers the result
        for conv in cn.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()
    return cn.eval()


# ------------------------------------------------------------------------ LoRAs

def control_image(path: Path, size: int = 64, seed: int = 0) -> Path:
    """A deterministic RGB test pattern (white square, stripes) as PNG."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(size, size, 3, dtype=torch.uint8)
    lo = int(torch.randint(0, size // 2, (1,), generator=g))
    hi = int(torch.randint(0, size // 2, (1,), generator=g))
    img[lo : lo + size // 2, hi : hi + size // 3] = 255
    img[:, ::8, 0] = (torch.rand(size, generator=g) * 255).to(torch.uint8)[:, None]
    Image.fromarray(img.numpy()).save(path)
    return path


# ------------------------------------------------------------ the test set

class TinyModels:
    """Every tiny model, LoRA, ControlNet and control image the runner tests use, written under *root*."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.comps = {fam: build_tiny(fam, seed) for fam, seed in (("sd1", 0), ("sd2", 5), ("sdxl", 0))}
        sd1, sdxl = self.comps["sd1"], self.comps["sdxl"]
        self.sd1_file = save_single_file("sd1", sd1, root / "sd1.safetensors")
        self.sd1_folder = save_folder("sd1", sd1, root / "sd1-folder")
        self.sd1_other = save_single_file("sd1", build_tiny("sd1", 7), root / "sd1-other.safetensors")
        self.sd2_v_file = save_single_file("sd2", self.comps["sd2"], root / "sd2-v.safetensors",
                                           metadata={"modelspec.prediction_type": "v"})
        self.sdxl_file = save_single_file("sdxl", sdxl, root / "sdxl.safetensors")
        self.sdxl_folder = save_folder("sdxl", sdxl, root / "sdxl-folder")
        self.sd1_lora_a = save_lora(kohya_lora("sd1", sd1, seed=11), root / "sd1-a-kohya.safetensors")
        self.sd1_lora_b = save_lora(kohya_lora("sd1", sd1, seed=12), root / "sd1-b-kohya.safetensors")
        self.sd1_lora_peft = save_lora(peft_lora("sd1", sd1, seed=13), root / "sd1-c-peft.safetensors")
        self.sdxl_lora = save_lora(kohya_lora("sdxl", sdxl, seed=21), root / "sdxl-kohya.safetensors")
        self.sdxl_lora_peft = save_lora(peft_lora("sdxl", sdxl, seed=22), root / "sdxl-peft.safetensors")
        self.unrelated_lora = save_lora(
            {"lora_unet_no_such_block_to_q.lora_down.weight": torch.randn(4, 32),
             "lora_unet_no_such_block_to_q.lora_up.weight": torch.randn(32, 4)},
            root / "unrelated-lora.safetensors",
        )
        cn = build_controlnet(sd1["unet"], seed=31)
        cn.save_pretrained(root / "sd1-cn-folder", safe_serialization=True)
        self.sd1_cn_folder = root / "sd1-cn-folder"
        self.sd1_cn_file = root / "sd1-cn.safetensors"
        save_file(controlnet_to_ldm(cn), str(self.sd1_cn_file))
        cnx = build_controlnet(sdxl["unet"], seed=32)
        cnx.save_pretrained(root / "sdxl-cn-folder", safe_serialization=True)
        self.sdxl_cn_folder = root / "sdxl-cn-folder"
        self.control_a = control_image(root / "control-a.png", seed=1)
        self.control_b = control_image(root / "control-b.png", seed=2)
        self.not_a_model = root / "not-a-model.safetensors"
        save_file({"foo.weight": torch.zeros(2, 2)}, str(self.not_a_model))


_BUILT: dict[Path, TinyModels] = {}


def tiny_models(root: Path) -> TinyModels:
    """The :class:`TinyModels` under *root*, built once per process."""
    if root not in _BUILT:
        _BUILT[root] = TinyModels(root)
    return _BUILT[root]
