"""Pre-packed conv/linear layers and the weight-derived state behind them (*sites*).

On CPU, every ``nn.Conv2d`` (bf16/fp32) and bf16 ``nn.Linear`` weight is reordered once into
oneDNN's blocked layout (``torch.ops.mkldnn._reorder_*_weight``) and run with
``torch.ops.mkldnn._{convolution,linear}_pointwise``, instead of being reordered on every call
-- what inductor's ``freezing`` does, but per layer and outside any compiled graph. Fused
projections (``cat(Wq, Wk, Wv)``) are sites too, on every device.

A site remembers a signature of its source parameters (data pointer, version counter, dtype,
device, shape) and rebuilds itself when that no longer matches, so assigning a new tensor to
``param.data`` / a new ``Parameter``, ``copy_()`` under ``no_grad`` or ``.to()`` are all seen
before the next use. Writes *through* ``param.data`` in place are invisible to PyTorch's version
counter: code doing that calls ``optimize.weights_changed``, which rebuilds just those sites.

Compiled graphs reach a site through the opaque ``sdcache::*`` custom ops by its string key, so
a packed weight is never a graph constant and re-packing never recompiles.

Layers keep their names, parameters and ``isinstance``: :func:`swap_class` gives the instance
a subclass (``PackedConv2d``/``PackedLinear``) that overrides ``forward``, and every call the
packed path does not cover (autograd, another device or dtype) runs the stock ``forward``.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = [
    "PackedConv2d",
    "PackedLinear",
    "attach_conv_site",
    "attach_linear_site",
    "restore_module",
    "swap_class",
]


def _mkldnn_packable(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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
