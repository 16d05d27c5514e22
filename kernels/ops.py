"""Kernel dispatch and drop-in replacements for the hot modules of diffusers models.

Functional ops (each picks the fastest correct path for the tensor it gets):

- :func:`group_norm_silu` -- CUDA: one fused Triton kernel pair (optionally adding the time
  embedding first); CPU: ``F.group_norm`` (native channels-last kernel) + in-place SiLU.
- :func:`geglu` -- CUDA: fused Triton kernel; CPU: ``gelu(g).mul_(a)`` (one temporary less).
- :func:`attention` -- ``scaled_dot_product_attention``: FlashAttention/cuDNN on CUDA (faster
  than a hand-written Triton attention); on CPUs with AVX512-BF16 and no AMX, long bf16
  attention runs our AVX512-BF16 flash kernel (``cpu_attention``), 2x PyTorch's there.

Under ``torch.compile`` the torch forms are used and inductor fuses them itself.

Drop-in replacements (instance class swaps, so names, parameters and ``isinstance`` stay):
``FusedResnetBlock2D`` (GroupNorm+SiLU fused, time-embedding add folded in, residual add fused
into the packed ``conv2`` on CPU), ``FusedGEGLU``, ``ChannelsLastTransformer2DModel`` (no NCHW
copy of the output, residual fused into ``proj_out`` on CPU), and :class:`FusedAttnProcessor`
(one GEMM for Q/K/V, SDPA). Pre-packed ``PackedConv2d``/``PackedLinear`` live in
:mod:`.packing` and are re-exported here. Each replacement reproduces the stock maths only for
the configurations its ``*_supported`` predicate accepts, and defers to the stock code for any
call it does not cover (training, autograd, an attention mask, extra arguments).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_attention, triton_kernels
from .packing import (  # noqa: F401 - re-exported: the drop-in replacements live together here
    PackedConv2d,
    PackedLinear,
    _LinearSite,
    _Site,
    _linear_call,
    attach_conv_site,
    attach_linear_site,
    restore_module,
    swap_class,
)

log = logging.getLogger(__name__)

__all__ = [
    "attention",
    "cpu_has_native_bf16",
    "geglu",
    "group_norm_silu",
    "preferred_dtype",
    "PackedConv2d",
    "PackedLinear",
    "FusedResnetBlock2D",
    "FusedGEGLU",
    "FusedAttnProcessor",
    "restore_module",
]


# --------------------------------------------------------------------------- capabilities


def _read_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Read once at import: these are consulted inside torch.compile'd code, where they must be
# plain constants, not file reads.
_CPU_FLAGS = _read_cpu_flags()
_CPU_AMX = "amx_bf16" in _CPU_FLAGS


def cpu_has_amx() -> bool:
    """True when the CPU has AMX tiles for bf16 (Sapphire Rapids and later)."""
    return _CPU_AMX


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX) and oneDNN can use it.

    Older AVX-512 CPUs also "support" bf16 in oneDNN by converting to fp32, which is slower
    than fp32 itself; those get ``False``.
    """
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    if _CPU_FLAGS:
        return bool(_CPU_FLAGS & {"avx512_bf16", "amx_bf16"})
    return "AMX" in torch.backends.cpu.get_cpu_capability()


def preferred_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The fastest dtype that keeps SD image quality on ``device``.

    CUDA: fp16. CPU: bf16 when the CPU has native bf16, else fp32.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return torch.float16
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and not torch.compiler.is_compiling() and triton_kernels.available(x)


# --------------------------------------------------------------------------- functional ops


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    *,
    temb: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """``silu(group_norm(x + temb[:, :, None, None]))``; ``temb`` (N, C) is optional.

    Under ``torch.compile`` the torch form is used: inductor fuses it into one kernel itself.
    """
    if _use_triton(x):
        return triton_kernels.group_norm_silu(x, weight, bias, num_groups, eps, temb=temb, silu=silu)
    if temb is not None:
        x = x + temb.reshape(*temb.shape[:2], *([1] * (x.dim() - 2)))
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y, inplace=not torch.compiler.is_compiling()) if silu else y


def geglu(h: torch.Tensor) -> torch.Tensor:
    """``a * gelu(g)`` with ``a, g = h.chunk(2, -1)`` (diffusers' GEGLU after its projection)."""
    if _use_triton(h):
        return triton_kernels.geglu(h)
    a, g = h.chunk(2, dim=-1)
    if torch.compiler.is_compiling():
        return a * F.gelu(g)
    return F.gelu(g).mul_(a)




def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, L, D) tensors on the fastest available backend.

    CUDA: SDPA (FlashAttention / cuDNN / memory-efficient, whichever PyTorch picks). CPU, bf16,
    long key sequences (>= 512), on a CPU with AVX512-BF16 but no AMX: the flash kernel in
    ``cpu_attention`` (2x SDPA on SD1.5's 4096-token, 40-wide heads), once it is built
    (``optimize`` builds it). Everything else: SDPA. The result may be a non-contiguous view
    (stored (B, L, H, D)), like SDPA's own CPU output.
    """
    if (
        q.device.type == "cpu"
        and k.shape[-2] >= 512
        and q.shape[-1] <= 128
        and cpu_attention.ready()
        and cpu_attention.supports(q, k, v)
    ):
        return cpu_attention.flash_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# --------------------------------------------------------------------------- module swaps

def _resnet_cls() -> type | None:
    try:
        from diffusers.models.resnet import ResnetBlock2D
    except Exception:  # pragma: no cover - diffusers missing
        return None
    return ResnetBlock2D


def _geglu_cls() -> type | None:
    try:
        from diffusers.models.activations import GEGLU
    except Exception:  # pragma: no cover
        return None
    return GEGLU


_FUSED_CLASSES: dict[type, type] = {}


def _fused_resnet_class() -> type | None:
    base = _resnet_cls()
    if base is None:
        return None
    if base in _FUSED_CLASSES:
        return _FUSED_CLASSES[base]

    class FusedResnetBlock2D(base):  # type: ignore[misc, valid-type]
        """diffusers ResnetBlock2D with fused GroupNorm+SiLU (temb add folded into the second)
        and the residual add fused into ``conv2`` when it is packed."""

        def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args: Any, **kwargs: Any):
            if args or kwargs.get("scale") is not None or self.training or (
                self.time_emb_proj is None and temb is not None
            ):
                return super().forward(input_tensor, temb, *args, **kwargs)
            n1, n2 = self.norm1, self.norm2
            h = group_norm_silu(input_tensor, n1.weight, n1.bias, n1.num_groups, n1.eps)
            h = self.conv1(h)
            t = None
            if self.time_emb_proj is not None and temb is not None:
                t = temb if self.skip_time_act else F.silu(temb)
                t = self.time_emb_proj(t)
            h = group_norm_silu(h, n2.weight, n2.bias, n2.num_groups, n2.eps, temb=t)
            h = self.dropout(h)
            shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
            if isinstance(self.conv2, PackedConv2d):
                out = self.conv2.forward_add(h, shortcut)
            else:
                out = shortcut + self.conv2(h)
            if self.output_scale_factor != 1.0:
                out = out / self.output_scale_factor
            return out

    _FUSED_CLASSES[base] = FusedResnetBlock2D
    return FusedResnetBlock2D


def _fused_geglu_class() -> type | None:
    base = _geglu_cls()
    if base is None:
        return None
    if base in _FUSED_CLASSES:
        return _FUSED_CLASSES[base]

    class FusedGEGLU(base):  # type: ignore[misc, valid-type]
        """diffusers GEGLU with the chunk + gelu + multiply fused."""

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args or kwargs.get("scale") is not None:
                return super().forward(hidden_states, *args, **kwargs)
            return geglu(self.proj(hidden_states))

    _FUSED_CLASSES[base] = FusedGEGLU
    return FusedGEGLU


def _transformer2d_cls() -> type | None:
    try:
        from diffusers.models.transformers.transformer_2d import Transformer2DModel
    except Exception:  # pragma: no cover
        return None
    return Transformer2DModel


def _fused_transformer2d_class() -> type | None:
    base = _transformer2d_cls()
    if base is None:
        return None
    if base in _FUSED_CLASSES:
        return _FUSED_CLASSES[base]

    class ChannelsLastTransformer2DModel(base):  # type: ignore[misc, valid-type]
        """diffusers Transformer2DModel whose output stays channels-last (stock copies it to
        NCHW with ``.contiguous()``) and, on CPU, adds the residual inside ``proj_out``."""

        def _get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height, width, inner_dim):
            if not self.use_linear_projection:
                h = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
                if isinstance(self.proj_out, PackedConv2d):
                    return self.proj_out.forward_add(h, residual)
                return self.proj_out(h) + residual
            h = self.proj_out(hidden_states)
            return h.reshape(batch_size, height, width, -1).permute(0, 3, 1, 2) + residual

    _FUSED_CLASSES[base] = ChannelsLastTransformer2DModel
    return ChannelsLastTransformer2DModel


def transformer2d_supported(m: nn.Module) -> bool:
    """Whether ``m`` is a plain diffusers Transformer2DModel on continuous (image) inputs."""
    base = _transformer2d_cls()
    return (
        base is not None
        and type(m) is base
        and getattr(m, "is_input_continuous", False)
        and hasattr(base, "_get_output_for_continuous_inputs")
        and isinstance(m.proj_out, (nn.Conv2d, nn.Linear))
    )


def __getattr__(name: str) -> Any:
    """``ops.FusedResnetBlock2D`` / ``ops.FusedGEGLU``, built lazily (diffusers is optional)."""
    if name == "FusedResnetBlock2D":
        return _fused_resnet_class()
    if name == "FusedGEGLU":
        return _fused_geglu_class()
    if name == "ChannelsLastTransformer2DModel":
        return _fused_transformer2d_class()
    raise AttributeError(name)


def resnet_supported(m: nn.Module) -> bool:
    """Whether ``m`` is a plain diffusers ResnetBlock2D whose maths the fused forward reproduces."""
    base = _resnet_cls()
    return (
        base is not None
        and type(m) is base
        and type(m.norm1) is nn.GroupNorm
        and type(m.norm2) is nn.GroupNorm
        and m.norm1.affine
        and m.norm2.affine
        and type(m.nonlinearity) is nn.SiLU
        and m.upsample is None
        and m.downsample is None
        and m.time_embedding_norm == "default"
        and isinstance(m.conv1, nn.Conv2d)
        and isinstance(m.conv2, nn.Conv2d)
        and (m.time_emb_proj is None or isinstance(m.time_emb_proj, nn.Linear))
    )


def geglu_supported(m: nn.Module) -> bool:
    """Whether ``m`` is a plain diffusers GEGLU over an ``nn.Linear``."""
    base = _geglu_cls()
    return base is not None and type(m) is base and isinstance(m.proj, nn.Linear)


# --------------------------------------------------------------------------- attention


def _attn_processor_types() -> tuple[type, ...]:
    try:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    except Exception:  # pragma: no cover
        return ()
    return (AttnProcessor, AttnProcessor2_0)


def attention_supported(attn: nn.Module) -> bool:
    """Whether ``attn`` is a diffusers Attention the fused processor reproduces exactly."""
    try:
        from diffusers.models.attention_processor import Attention
    except Exception:  # pragma: no cover
        return False
    if type(attn) is not Attention or type(attn.processor) not in _attn_processor_types():
        return False
    lins = [attn.to_q, attn.to_k, attn.to_v]
    if any(type(lin) not in (nn.Linear, PackedLinear) for lin in lins):
        return False
    if len({lin.bias is None for lin in lins}) != 1:
        return False
    if attn.to_k.in_features != attn.to_v.in_features:
        return False
    inner = attn.to_q.out_features
    if inner % attn.heads or attn.to_k.out_features != attn.to_v.out_features:
        return False
    head_dim = inner // attn.heads
    return (
        attn.spatial_norm is None
        and not getattr(attn, "norm_cross", None)
        and getattr(attn, "norm_q", None) is None
        and getattr(attn, "norm_k", None) is None
        and getattr(attn, "add_k_proj", None) is None
        and getattr(attn, "fused_projections", False) is False
        and abs(attn.scale - head_dim**-0.5) < 1e-12
        and len(attn.to_out) >= 1
    )


class FusedAttnProcessor:
    """Attention processor computing Q/K/V with one GEMM and attention with SDPA.

    Self-attention layers fuse ``to_q``, ``to_k``, ``to_v``; cross-attention layers fuse
    ``to_k``, ``to_v``. Calls this processor does not cover (a mask, extra arguments, a
    context for a self-attention layer) go to the stock processor it replaced.
    """

    def __init__(self, attn: nn.Module, stock: Any) -> None:
        self.stock = stock
        self.self_attn = not attn.is_cross_attention and attn.to_q.in_features == attn.to_k.in_features
        attrs = ["to_q", "to_k", "to_v"] if self.self_attn else ["to_k", "to_v"]
        self.site: _LinearSite | None = _LinearSite(attn, attrs)
        self.site.rebuild()

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        site = self.site
        if (
            site is None
            or attention_mask is not None
            or args
            or kwargs
            or (self.self_attn and encoder_hidden_states is not None)
            or (not self.self_attn and encoder_hidden_states is None)
            or site.owner() is not attn
            or not site.intact()
            or not site.accepts(hidden_states if self.self_attn else encoder_hidden_states)  # type: ignore[arg-type]
        ):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.reshape(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        bsz = hidden_states.shape[0]
        heads = attn.heads
        if self.self_attn:
            qkv = _linear_call(site, hidden_states)
            nq, nk, nv = site.out_features
            query, key, value = qkv.split([nq, nk, nv], dim=-1)
        else:
            query = attn.to_q(hidden_states)
            kv = _linear_call(site, encoder_hidden_states)  # type: ignore[arg-type]
            key, value = kv.split(site.out_features, dim=-1)
        head_dim = key.shape[-1] // heads
        query = query.unflatten(-1, (heads, -1)).transpose(1, 2)
        key = key.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        value = value.unflatten(-1, (heads, -1)).transpose(1, 2)
        out = attention(query, key, value)
        out = out.transpose(1, 2).flatten(2)
        out = attn.to_out[0](out)
        for m in list(attn.to_out)[1:]:
            out = m(out)
        if input_ndim == 4:
            # (B, HW, C) viewed as channels-last NCHW: same values, no copy.
            out = out.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if attn.residual_connection:
            out = out + residual
        if attn.rescale_output_factor != 1.0:
            out = out / attn.rescale_output_factor
        return out


def iter_sites(root: nn.Module) -> Iterator[tuple[str, _Site]]:
    """All sites attached under ``root`` with the qualified name of their owner module."""
    for name, m in root.named_modules():
        site = m.__dict__.get("_sdc_site")
        if site is not None:
            yield name, site
        proc = m.__dict__.get("processor")
        if isinstance(proc, FusedAttnProcessor) and proc.site is not None:
            yield name, proc.site


def site_source_modules(owner_name: str, site: _Site) -> list[str]:
    """Qualified names (relative to the root ``owner_name`` is from) of the modules whose
    parameters feed ``site``."""
    if isinstance(site, _LinearSite) and site.attrs:
        prefix = owner_name + "." if owner_name else ""
        return [prefix + a for a in site.attrs]
    return [owner_name]

