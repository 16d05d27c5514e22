"""Build torch modules from a config and an already-loaded state dict.

Modules are created on the ``meta`` device (no memory, no random init) and
the loaded tensors are assigned as their parameters (``load_state_dict(...,
assign=True)``): on the CPU with a matching dtype the module's weights *are*
the cached buffer's views, no copy; otherwise each tensor is copied once to
the target device/dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdcache import errors

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DIFFUSERS_CLASSES = ("UNet2DConditionModel", "AutoencoderKL", "ControlNetModel")
TRANSFORMERS_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
#: Tensors some checkpoints carry that no module wants (old persistent buffers, OpenCLIP's logit scale).
IGNORABLE = ("position_ids", "logit_scale")


def _module_class(name: str) -> Any:
    if name in DIFFUSERS_CLASSES:
        import diffusers

        return getattr(diffusers, name)
    if name in TRANSFORMERS_CLASSES:
        import transformers

        return getattr(transformers, name)
    raise errors.InvalidArgument(f"unsupported component class {name}")


def empty_module(cls_name: str, config: Mapping[str, Any]) -> "torch.nn.Module":
    """An instance of *cls_name* with *config* whose tensors live on the meta device."""
    import torch

    cls = _module_class(cls_name)
    cfg = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
    with torch.device("meta"):
        if cls_name in TRANSFORMERS_CLASSES:
            from transformers import CLIPTextConfig

            tcfg = CLIPTextConfig.from_dict({k: v for k, v in cfg.items() if k not in ("architectures", "_class_name")})
            model = cls(tcfg)
        else:
            model = cls.from_config(cfg)
    return model


def _align_keys(model: "torch.nn.Module", sd: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Match the ``text_model.`` prefix convention of *sd* to *model* (transformers >= 5.6 flattened CLIPTextModel)."""
    want = model.state_dict().keys()
    has_prefix = any(k.startswith("text_model.") for k in want)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith(IGNORABLE):
            continue
        if not has_prefix and k.startswith("text_model."):
            k = k[len("text_model.") :]
        elif has_prefix and not k.startswith(("text_model.", "text_projection.")) and ("text_model." + k) in want:
            k = "text_model." + k
        out[k] = v
    return out


def _materialize_meta_buffers(model: "torch.nn.Module", device: "torch.device") -> None:
    """Non-persistent buffers are not in any checkpoint: recreate the ones CLIP has."""
    import torch

    for mod_name, mod in model.named_modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf is None or not buf.is_meta:
                continue
            if name == "position_ids":
                mod.register_buffer(
                    name, torch.arange(buf.shape[-1], device=device).expand(buf.shape).contiguous(), persistent=False
                )
            else:
                raise errors.InvalidArgument(f"no value for buffer {mod_name}.{name}")


def build_module(
    cls_name: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, "torch.Tensor"],
    device: "torch.device | str",
    dtype: "torch.dtype",
    what: str,
) -> "torch.nn.Module":
    """A ready-to-run module from *config* and *state_dict* on *device* in *dtype*.

    *what* names the component in errors (``"unet of /models/x.safetensors"``).
    Every parameter must be present with its shape; tensors nothing wants are
    dropped with a log line.
    """
    import torch

    device = torch.device(device)
    model = empty_module(cls_name, config)
    sd = _align_keys(model, state_dict)
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    if missing:
        raise errors.InvalidArgument(
            f"{what}: {len(missing)} of {len(want)} tensors missing for the {cls_name} (e.g. {missing[0]})"
        )
    bad = [k for k, v in want.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        k = bad[0]
        raise errors.InvalidArgument(
            f"{what}: {len(bad)} tensors have other shapes than the {cls_name} config "
            f"(e.g. {k}: {tuple(sd[k].shape)} vs {tuple(want[k].shape)})"
        )
    if unexpected:
        log.info("%s: ignoring %d tensors the %s does not use (e.g. %s)",
                 what, len(unexpected), cls_name, unexpected[0])
    ready = {}
    for k in want:
        t = sd[k]
        ready[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    model.load_state_dict(ready, strict=True, assign=True)
    _materialize_meta_buffers(model, device)
    model.eval()
    model.requires_grad_(False)
    return model


def module_nbytes(model: "torch.nn.Module") -> int:
    """Bytes held by *model*'s parameters and buffers (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
