"""Diffusers components -> an original-layout (LDM/SGM) single file: the inverse of :mod:`.checkpoint`.

Used to write SD1.x/SD2.x/SDXL checkpoints in the layout A1111, ComfyUI and
``from_single_file`` read (tests and benchmarks build their single files with
it; ``tests/test_runner_convert.py`` checks that diffusers' own
``convert_ldm_*`` functions give every tensor back unchanged).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdcache import errors

from .checkpoint import (
    CONTROLNET_PREFIX,
    SD1_CLIP_PREFIX,
    SD2_OPENCLIP_PREFIX,
    XL_CLIP_PREFIX,
    XL_OPENCLIP_PREFIX,
    unet_ldm_prefixes,
    unet_name_to_ldm,
    unet_to_ldm,
)

if TYPE_CHECKING:
    import torch


def vae_to_ldm(sd: Mapping[str, "torch.Tensor"], config: Mapping[str, Any]) -> dict[str, "torch.Tensor"]:
    """Diffusers AutoencoderKL tensors -> ``first_stage_model.*`` names and shapes."""
    n_up = len(config["up_block_types"])
    attn_names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        nk = k
        for side in ("encoder", "decoder"):
            if not k.startswith(side + "."):
                continue
            rest = k[len(side) + 1 :]
            if rest.startswith("down_blocks."):
                _, i, kind, *tail = rest.split(".")
                if kind == "resnets":
                    j, *tail = tail
                    nk = f"{side}.down.{i}.block.{j}." + ".".join(tail).replace("conv_shortcut", "nin_shortcut")
                else:  # downsamplers.0.conv.*
                    nk = f"{side}.down.{i}.downsample." + ".".join(tail[1:])
            elif rest.startswith("up_blocks."):
                _, i, kind, *tail = rest.split(".")
                b = n_up - 1 - int(i)
                if kind == "resnets":
                    j, *tail = tail
                    nk = f"{side}.up.{b}.block.{j}." + ".".join(tail).replace("conv_shortcut", "nin_shortcut")
                else:
                    nk = f"{side}.up.{b}.upsample." + ".".join(tail[1:])
            elif rest.startswith("mid_block.resnets."):
                _, _, j, *tail = rest.split(".")
                nk = f"{side}.mid.block_{int(j) + 1}." + ".".join(tail).replace("conv_shortcut", "nin_shortcut")
            elif rest.startswith("mid_block.attentions.0."):
                tail = rest[len("mid_block.attentions.0.") :]
                name, _, kind = tail.rpartition(".")
                nk = f"{side}.mid.attn_1.{attn_names[name]}.{kind}"
                if kind == "weight" and v.ndim == 2:
                    v = v[:, :, None, None]
            elif rest.startswith("conv_norm_out."):
                nk = f"{side}.norm_out." + rest.split(".", 1)[1]
        out["first_stage_model." + nk] = v.contiguous()
    return out


def clip_to_ldm(sd: Mapping[str, "torch.Tensor"], prefix: str) -> dict[str, "torch.Tensor"]:
    """HF CLIP text tensors -> ``<prefix>text_model.*`` (the SD1 / SDXL-embedder-0 layout)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def open_clip_to_ldm(sd: Mapping[str, "torch.Tensor"], prefix: str, n_layers: int) -> dict[str, "torch.Tensor"]:
    """HF CLIP text tensors -> OpenCLIP names under *prefix* (fused in_proj, transposed projection)."""
    import torch

    sd = {k[len("text_model.") :] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    for i in range(n_layers):
        a, b = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[b + f"attn.in_proj_{kind}"] = torch.cat([sd[a + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[b + f"attn.out_proj.{kind}"] = sd[a + f"self_attn.out_proj.{kind}"]
            out[b + f"ln_1.{kind}"] = sd[a + f"layer_norm1.{kind}"]
            out[b + f"ln_2.{kind}"] = sd[a + f"layer_norm2.{kind}"]
            out[b + f"mlp.c_fc.{kind}"] = sd[a + f"mlp.fc1.{kind}"]
            out[b + f"mlp.c_proj.{kind}"] = sd[a + f"mlp.fc2.{kind}"]
    return out


def original_layout(fam: str, comps: Mapping[str, Any]) -> dict[str, "torch.Tensor"]:
    """A pipeline's *comps* (``unet``, ``vae``, text encoders) as one original-layout (LDM/SGM) state dict.

    SD2 files hold one more OpenCLIP block than SD2 uses (it conditions on the
    penultimate layer) and a text projection it never applies; neither is part
    of the diffusers model, so a copy of the last block and an identity
    projection stand in for them.
    """
    import torch

    sd: dict[str, "torch.Tensor"] = {}
    sd.update(unet_to_ldm(comps["unet"].state_dict(), comps["unet"].config))
    sd.update(vae_to_ldm(comps["vae"].state_dict(), comps["vae"].config))
    te = comps["text_encoder"]
    if fam == "sd1":
        sd.update(clip_to_ldm(te.state_dict(), SD1_CLIP_PREFIX))
    elif fam == "sd2":
        n = te.config.num_hidden_layers
        tsd = {k[len("text_model.") :] if k.startswith("text_model.") else k: v for k, v in te.state_dict().items()}
        for k, v in list(tsd.items()):
            if k.startswith(f"encoder.layers.{n - 1}."):
                tsd[k.replace(f"encoder.layers.{n - 1}.", f"encoder.layers.{n}.")] = v.clone()
        hidden = te.config.hidden_size
        tsd["text_projection.weight"] = torch.eye(hidden, dtype=tsd["final_layer_norm.weight"].dtype)
        sd.update(open_clip_to_ldm(tsd, SD2_OPENCLIP_PREFIX, n + 1))
    elif fam == "sdxl":
        sd.update(clip_to_ldm(te.state_dict(), XL_CLIP_PREFIX))
        te2 = comps["text_encoder_2"]
        sd.update(open_clip_to_ldm(te2.state_dict(), XL_OPENCLIP_PREFIX, te2.config.num_hidden_layers))
    else:
        raise errors.InvalidArgument(f"no original layout for family {fam}")
    return {k: v.contiguous() for k, v in sd.items()}


def controlnet_to_ldm(cn: Any) -> dict[str, "torch.Tensor"]:
    """Diffusers ControlNet tensors -> the original ``control_model.*`` layout."""
    pairs = unet_ldm_prefixes(cn.config | {"up_block_types": []})
    out = {}
    for k, v in cn.state_dict().items():
        if k.startswith("controlnet_down_blocks."):
            _, i, kind = k.split(".")
            nk = f"zero_convs.{i}.0.{kind}"
        elif k.startswith("controlnet_mid_block."):
            nk = "middle_block_out.0." + k.split(".")[-1]
        elif k.startswith("controlnet_cond_embedding.conv_in."):
            nk = "input_hint_block.0." + k.split(".")[-1]
        elif k.startswith("controlnet_cond_embedding.conv_out."):
            nk = "input_hint_block.14." + k.split(".")[-1]
        elif k.startswith("controlnet_cond_embedding.blocks."):
            _, _, i, kind = k.split(".")
            nk = f"input_hint_block.{2 * (int(i) + 1)}.{kind}"
        else:
            ldm = unet_name_to_ldm(k, pairs)
            if ldm is None:
                raise errors.InvalidArgument(f"ControlNet tensor {k} has no original-layout name")
            nk = ldm
        out[CONTROLNET_PREFIX + nk] = v.contiguous()
    return out
