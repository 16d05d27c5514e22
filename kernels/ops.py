"""Kernel dispatch and drop-in replacements for the hot modules of diffusers models.

Functional ops (each picks the fastest correct path for the tensor it gets):

- :func:`group_norm_silu` -- CUDA: one fused Triton kernel pair (optionally adding the time
  embedding first); CPU: ``F.group_norm`` (native channels-last kernel) + in-place SiLU.
- :func:`geglu` -- CUDA: fused Triton kernel; CPU: ``gelu(g).mul_(a)`` (one temporary less).
- :func:`attention` -- ``scaled_dot_product_attention`` everywhere: FlashAttention/cuDNN on
  CUDA, the flash-style CPU kernel on CPU. Both beat a hand-written Triton attention.

Weight-derived state (a *site*): on CPU, conv and linear weights are pre-packed once into
oneDNN's blocked layout (``torch.ops.mkldnn._reorder_*_weight``) so no step pays the reorder
again -- the same thing inductor's ``freezing`` does, but per layer and outside any compiled
graph, so a LoRA or base switch re-packs only the layers it touched (milliseconds each) and
never recompiles. Attention projections are fused: one GEMM over ``cat(Wq, Wk, Wv)``
(self-attention) or ``cat(Wk, Wv)`` (cross-attention). Every site remembers a signature of
its source parameters (data pointer, version counter, dtype, device) and rebuilds itself when
it no longer matches, so ``module.weight = ...``, ``weight.copy_(...)`` under ``no_grad`` and
``.to(...)`` are all seen; an edit through ``param.data`` is invisible to PyTorch's version
counter, so code that does that must call ``optimize.weights_changed`` (the runner does).

Module replacements keep module names, parameters and ``isinstance`` intact: they swap the
instance's class to a subclass that overrides ``forward`` (and swap it back in
:func:`restore_module`). Anything they do not recognise at call time (training mode, autograd
needed, an attention mask, an odd dtype) runs the stock code.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import triton_kernels

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


def _mkldnn_packable(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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

    CUDA: SDPA (FlashAttention / cuDNN / memory-efficient, whichever PyTorch picks). CPU:
    SDPA's flash-style kernel; for long bf16 self-attention on a CPU without AMX it runs in
    fp32, which that kernel does faster there (SD1.5's 4096-token, 40-wide heads: 5-15% less
    time, measured) and more accurately; the result is cast back. Short key sequences
    (cross-attention over 77 text tokens) stay bf16, where the casts would cost more.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[-2] >= 1024 and not _CPU_AMX:
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# --------------------------------------------------------------------------- derived-weight sites


def _tensor_sig(t: torch.Tensor) -> tuple[Any, ...]:
    try:
        version = t._version
    except RuntimeError:  # inference tensors carry no version counter
        version = -1
    return (t.data_ptr(), version, t.dtype, t.device, t.shape)


_SITES: "weakref.WeakValueDictionary[str, _Site]" = weakref.WeakValueDictionary()
_NEXT_KEY = [0]


class _Site:
    """Weight-derived state of one module (a packed or fused weight), rebuilt on change.

    Each site has a string ``key`` so compiled graphs can reach it through the opaque
    ``sdcache::*`` custom ops without the packed tensor ever being a graph constant.
    """

    kind = "site"

    def __init__(self, module: nn.Module) -> None:
        self.module_ref = weakref.ref(module)
        self._register()
        self._sig: tuple[Any, ...] | None = None
        self.rebuilds = 0

    def _register(self) -> None:
        # A string, not an int: dynamo would turn an int that differs between call sites
        # into a symbolic size, while strings are always compile-time constants.
        self.key = f"tmp{_NEXT_KEY[0]}"
        _NEXT_KEY[0] += 1
        _SITES[self.key] = self

    def set_key(self, key: str) -> None:
        """Name the site stably (``optimize`` uses ``<model ordinal>/<module name>``), so the
        same model built in another process compiles to the same graph and hits inductor's
        on-disk cache."""
        if _SITES.get(key) not in (None, self):
            raise ValueError(f"site key {key!r} already in use")
        _SITES.pop(self.key, None)
        self.key = key
        _SITES[key] = self

    def owner(self) -> nn.Module:
        m = self.module_ref()
        if m is None:
            raise RuntimeError("optimized module was garbage-collected")
        return m

    def _reset_derived(self) -> None:
        """Drop derived tensors (after a copy): they are rebuilt on first use."""

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Site | None":
        # copy.deepcopy of an optimized model: bind a fresh site to the *copied* owner (which
        # deepcopy has already registered in memo), never to the original's weights.
        new_owner = memo.get(id(self.module_ref()))
        if new_owner is None:
            return None  # cannot tell what it belongs to: callers fall back to stock code
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.module_ref = weakref.ref(new_owner)
        new._register()
        new._sig = None
        new.rebuilds = 0
        new._reset_derived()
        memo[id(self)] = new
        return new

    def sources(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def signature(self) -> tuple[Any, ...]:
        return tuple(_tensor_sig(t) for t in self.sources())

    def is_fresh(self) -> bool:
        return self._sig is not None and self._sig == self.signature()

    def ensure_fresh(self) -> None:
        if not self.is_fresh():
            self.rebuild()

    def rebuild(self) -> None:
        self._build()
        self._sig = self.signature()
        self.rebuilds += 1

    def _build(self) -> None:
        raise NotImplementedError

    def derived_bytes(self) -> int:
        return 0


def _same_layout(old: torch.Tensor | None, new: torch.Tensor) -> bool:
    return (
        old is not None
        and not old.is_mkldnn
        and old.shape == new.shape
        and old.dtype == new.dtype
        and old.device == new.device
    )


def _packed_nbytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    return t.numel() * t.element_size()


class _ConvSite(_Site):
    """A Conv2d whose weight is pre-packed for oneDNN (CPU)."""

    kind = "packed_conv"

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(conv)
        self.padding = list(conv.padding)  # type: ignore[arg-type]
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.out_channels = conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.input_hint: list[int] | None = None
        self.packed: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.dtype = conv.weight.dtype

    def conv(self) -> nn.Conv2d:
        return self.owner()  # type: ignore[return-value]

    def _reset_derived(self) -> None:
        self.packed = None
        self.bias = None

    def sources(self) -> list[torch.Tensor]:
        c = self.conv()
        return [c.weight] if c.bias is None else [c.weight, c.bias]

    def _build(self) -> None:
        c = self.conv()
        w = c.weight.detach()
        self.dtype = w.dtype
        self.bias = c.bias.detach() if c.bias is not None else None
        if self.input_hint is None:  # packed lazily on first call, for the real input shape
            self.packed = None
            return
        self.packed = torch.ops.mkldnn._reorder_convolution_weight(
            w, self.padding, self.stride, self.dilation, self.groups, self.input_hint
        )

    def accepts(self, x: torch.Tensor) -> bool:
        c = self.conv()
        return (
            x.device.type == "cpu"
            and x.dim() == 4
            and x.dtype == c.weight.dtype
            and c.weight.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or c.weight.requires_grad))
        )

    def run(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is None or not self.is_fresh():
            if self.input_hint is None:
                self.input_hint = list(x.shape)
            self.rebuild()
        if other is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.packed, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], ""
            )
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, self.packed, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "add", None, None, [], None,
        )

    def out_shape(self, x: torch.Tensor) -> list[int]:
        n, _, h, w = x.shape
        out = [n, self.out_channels]
        for size, k, p, s, d in zip((h, w), self.kernel_size, self.padding, self.stride, self.dilation):
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return out

    def derived_bytes(self) -> int:
        return _packed_nbytes(self.packed)


class _LinearSite(_Site):
    """One or more Linear layers sharing an input, as one (optionally packed) GEMM.

    With several layers (Q, K, V) the weights are concatenated along the output dimension;
    the result is split again by the caller. On CPU with bf16 the weight is pre-packed for
    oneDNN; elsewhere it stays a dense tensor used with ``F.linear``.
    """

    kind = "linear"

    def __init__(self, owner: nn.Module, attrs: list[str]) -> None:
        """``attrs``: attribute names of the Linear layers on ``owner`` (``[]``: owner itself)."""
        super().__init__(owner)
        self.attrs = list(attrs)
        linears = self.linears()
        self.out_features = [lin.out_features for lin in linears]
        self.has_bias = linears[0].bias is not None
        self.batch_hint: int | None = None
        self.weight: torch.Tensor | None = None  # dense (fused) weight, or packed
        self.bias: torch.Tensor | None = None
        self.packed = False
        self.pending_pack = False
        if len(linears) > 1:
            self.kind = "fused_qkv" if len(linears) == 3 else "fused_kv"
        else:
            self.kind = "packed_linear"

    def linears(self) -> list[nn.Linear]:
        owner = self.owner()
        if not self.attrs:
            return [owner]  # type: ignore[list-item]
        return [getattr(owner, a) for a in self.attrs]

    def intact(self) -> bool:
        """The layers are still plain Linears (not, say, wrapped by a LoRA adapter since)."""
        return all(type(lin) in (nn.Linear, PackedLinear) for lin in self.linears())

    def _reset_derived(self) -> None:
        self.weight = None
        self.bias = None
        self.packed = False
        self.pending_pack = False

    def sources(self) -> list[torch.Tensor]:
        srcs: list[torch.Tensor] = []
        for lin in self.linears():
            srcs.append(lin.weight)
            if lin.bias is not None:
                srcs.append(lin.bias)
        return srcs

    def _build(self) -> None:
        lins = self.linears()
        self.out_features = [lin.out_features for lin in lins]
        ws = [lin.weight.detach() for lin in lins]
        bias = None
        if self.has_bias:
            bs = [lin.bias.detach() for lin in lins]  # type: ignore[union-attr]
            bias = bs[0] if len(bs) == 1 else torch.cat(bs, 0)
        w0 = ws[0]
        self.pending_pack = False
        if w0.device.type == "cpu" and w0.dtype == torch.bfloat16 and _mkldnn_packable(w0.dtype):
            if self.batch_hint is None:  # packed on first call, for the real batch size
                self.weight, self.bias, self.packed, self.pending_pack = None, None, False, True
                return
            dense = w0 if len(ws) == 1 else torch.cat(ws, 0)
            self.weight = torch.ops.mkldnn._reorder_linear_weight(dense, self.batch_hint)
            self.bias, self.packed = bias, True
            return
        if len(ws) == 1:  # nothing derived: F.linear on the module's own weight
            self.weight, self.bias, self.packed = None, None, False
            return
        dense = torch.cat(ws, 0)
        old_w, old_b = (None, None) if self.packed else (self.weight, self.bias)
        self.packed = False
        if _same_layout(old_w, dense) and (bias is None or _same_layout(old_b, bias)):
            # In place, so a compiled graph that captured these tensors sees the new values.
            old_w.copy_(dense)  # type: ignore[union-attr]
            if bias is not None:
                old_b.copy_(bias)  # type: ignore[union-attr]
        else:
            self.weight, self.bias = dense, bias

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_hint is None:
            self.batch_hint = x.numel() // max(1, x.shape[-1])
        if self.pending_pack or not self.is_fresh():
            self.rebuild()
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.weight is None:
            lin = self.linears()[0]
            return F.linear(x, lin.weight, lin.bias)
        return F.linear(x, self.weight, self.bias)

    def run_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMM on the current derived weight, without freshness checks (traceable)."""
        if self.weight is None:
            lin = self.linears()[0]
            return F.linear(x, lin.weight, lin.bias)
        return F.linear(x, self.weight, self.bias)

    def accepts(self, x: torch.Tensor) -> bool:
        lins = self.linears()
        w = lins[0].weight
        return (
            x.dtype == w.dtype
            and x.device == w.device
            and all(lin.weight.dtype == w.dtype and lin.weight.device == w.device for lin in lins)
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.sources())))
        )

    def derived_bytes(self) -> int:
        return _packed_nbytes(self.weight) + (_packed_nbytes(self.bias) if len(self.attrs) > 1 else 0)


# --------------------------------------------------------------------------- custom ops (compile)
# Opaque to dynamo/inductor: the packed weight is looked up by site key at run time, so a
# compiled graph never bakes it in, and re-packing after a LoRA switch needs no recompile.


@torch.library.custom_op("sdcache::packed_conv2d", mutates_args=())
def _packed_conv2d_op(x: torch.Tensor, key: str) -> torch.Tensor:
    return _SITES[key].run(x)  # type: ignore[attr-defined]


@_packed_conv2d_op.register_fake
def _(x: torch.Tensor, key: str) -> torch.Tensor:
    site = _SITES[key]
    return torch.empty(site.out_shape(x), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)  # type: ignore[attr-defined]


@torch.library.custom_op("sdcache::packed_conv2d_add", mutates_args=())
def _packed_conv2d_add_op(x: torch.Tensor, other: torch.Tensor, key: str) -> torch.Tensor:
    return _SITES[key].run(x, other)  # type: ignore[attr-defined]


@_packed_conv2d_add_op.register_fake
def _(x: torch.Tensor, other: torch.Tensor, key: str) -> torch.Tensor:
    site = _SITES[key]
    return torch.empty(site.out_shape(x), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)  # type: ignore[attr-defined]


@torch.library.custom_op("sdcache::site_linear", mutates_args=())
def _site_linear_op(x: torch.Tensor, key: str) -> torch.Tensor:
    return _SITES[key].run(x).contiguous()  # type: ignore[attr-defined]


@_site_linear_op.register_fake
def _(x: torch.Tensor, key: str) -> torch.Tensor:
    site = _SITES[key]
    return x.new_empty((*x.shape[:-1], sum(site.out_features)))  # type: ignore[attr-defined]


def _conv_call(site: _ConvSite, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    if torch.compiler.is_compiling():
        if other is None:
            return torch.ops.sdcache.packed_conv2d(x, site.key)
        return torch.ops.sdcache.packed_conv2d_add(x, other, site.key)
    return site.run(x, other)


def _linear_call(site: _LinearSite, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        if x.device.type == "cpu":
            return torch.ops.sdcache.site_linear(x, site.key)
        # GPU: a plain GEMM inductor can see; freshness is checked outside the graph
        # (optimize's guarded forward), and refreshes write the same tensor in place.
        return site.run_dense(x)
    return site.run(x)


# --------------------------------------------------------------------------- module swaps


def _site_of(m: nn.Module) -> Any:
    return m.__dict__.get("_sdc_site")


class PackedConv2d(nn.Conv2d):
    """``nn.Conv2d`` running on a oneDNN pre-packed weight on CPU; stock elsewhere."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        site = _site_of(self)
        if site is None or not site.accepts(input):
            return super().forward(input)
        return _conv_call(site, input)

    def forward_add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``other + self(x)``, with the add fused into the convolution when packed."""
        site = _site_of(self)
        if site is None or not site.accepts(x) or other.shape[1] != self.out_channels or other.dtype != x.dtype:
            return other + self(x)
        if tuple(site.out_shape(x)) != tuple(other.shape):
            return other + self(x)
        return _conv_call(site, x, other)


class PackedLinear(nn.Linear):
    """``nn.Linear`` running on a oneDNN pre-packed bf16 weight on CPU; stock elsewhere."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        site = _site_of(self)
        if site is None or input.device.type != "cpu" or not site.accepts(input):
            return super().forward(input)
        return _linear_call(site, input)


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


def swap_class(m: nn.Module, cls: type) -> None:
    """Give ``m`` the subclass ``cls`` (keeps its names, parameters and isinstance)."""
    if "_sdc_orig_class" not in m.__dict__:
        m.__dict__["_sdc_orig_class"] = type(m)
    m.__class__ = cls


def restore_module(m: nn.Module) -> None:
    """Undo :func:`swap_class` and drop any site attached to ``m``."""
    orig = m.__dict__.pop("_sdc_orig_class", None)
    if orig is not None:
        m.__class__ = orig
    m.__dict__.pop("_sdc_site", None)


def attach_conv_site(conv: nn.Conv2d) -> _ConvSite | None:
    """Make ``conv`` a :class:`PackedConv2d` if its weight can be packed; returns the site."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    if conv.weight.device.type != "cpu" or not _mkldnn_packable(conv.weight.dtype):
        return None
    site = _ConvSite(conv)
    site.rebuild()
    conv.__dict__["_sdc_site"] = site
    swap_class(conv, PackedConv2d)
    return site


def attach_linear_site(lin: nn.Linear) -> _LinearSite | None:
    """Make ``lin`` a :class:`PackedLinear` if it runs in bf16 on CPU; returns the site."""
    if type(lin) is not nn.Linear:
        return None
    w = lin.weight
    if w.device.type != "cpu" or w.dtype != torch.bfloat16 or not _mkldnn_packable(w.dtype):
        return None
    site = _LinearSite(lin, [])
    site.rebuild()
    lin.__dict__["_sdc_site"] = site
    swap_class(lin, PackedLinear)
    return site


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

