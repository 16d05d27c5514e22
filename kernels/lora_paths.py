"""Unmerged LoRAs: low-rank side paths on the modules that actually run.

A side path leaves the base weight alone and adds the update to the module's
output, ``y = base(x) + sum_i s_i * up_i(down_i(x))``, the way S-LoRA and
Punica serve many LoRAs over one base. A LoRA switch then only swaps the
references a module holds to its paths: no weight is written, nothing derived
from a weight (packed oneDNN layouts, fused Q/K/V matrices) is rebuilt.

Where the update is added, per kind of call site:

* a ``Linear`` or ``Conv2d`` called as a module (stock or
  :class:`~.packing.PackedLinear` / :class:`~.packing.PackedConv2d`): a forward
  hook adds the paths to the output. Hooks leave the module's class alone, so
  :func:`.optimize.optimize` still recognises and packs it.
* the fused Q/K/V (or K/V) GEMM of :class:`~.ops.FusedAttnProcessor`, which
  never calls ``to_q``/``to_k``/``to_v``: a pre-hook on the ``Attention`` module
  gives the processor's site, when it first runs, a subclass that adds each
  projection's paths into its slice of the fused output. The pre-hook is what
  makes this work whatever the order of LoRA switch and ``optimize``.
* ``PackedConv2d.forward_add`` (a ``ResnetBlock2D``'s ``conv2``, an SD1
  ``proj_out``: the residual add fused into the convolution): an instance
  ``forward_add`` runs the fused call with the hook silenced, then adds the paths.

Linear: ``h = x @ down.T`` (N x rank), then ``y += s * h @ up.T`` as one
in-place ``addmm_`` into the output (the add is fused into the GEMM). Conv2d
(kohya LoCon): ``down`` is a convolution with the layer's kernel, stride,
padding and dilation; ``up`` a 1x1 convolution, run as a GEMM over the
channels-last (or NCHW) output in place. Pointwise layers compute ``down`` as a
GEMM too.

Exactness: a module's output depends only on its base and the paths it holds
(in request order), never on what it held before, so after LoRA A then B the
output is bit for bit that of B alone; detaching the last path removes the
hooks and hands fused sites their own class back, so the base runs exactly as
it did before any LoRA.

Not covered, left to merging (:class:`~.lora.LoraPatcher` decides per module,
:func:`unsupported_reason` says why): grouped convolutions and padding modes
other than zeros; any module of a ``torch.compile``'d component (hooks and
factor tensors would be guards of the compiled graph, so every switch would
recompile).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SidePath", "set_paths", "paths_of", "sync_fused_owner", "unsupported_reason", "compiled",
           "compile_expected"]

_PATHS = "_sdc_lora_paths"  # module.__dict__: tuple[SidePath, ...]
_HOOK = "_sdc_lora_hook"  # module.__dict__: the forward hook's handle
_BIND = "_sdc_lora_bind"  # Attention.__dict__: the pre-hook's handle
_QUIET = "_sdc_lora_quiet"  # module.__dict__: set while forward_add runs the base call
_FUSED_LEAVES = ("to_q", "to_k", "to_v")


@dataclass(frozen=True, eq=False)
class SidePath:
    """One LoRA's update on one module, as device-ready factors: ``y += scale * up(down(x))``."""

    down: torch.Tensor  # Linear: (rank, in); Conv2d: (rank, in, kh, kw), the layer's kernel
    up: torch.Tensor  # (out, rank)
    scale: float  # (alpha / rank) * the request's weight


def unsupported_reason(module: nn.Module) -> str | None:
    """Why *module* cannot take side paths (its LoRAs are merged instead), or None."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped convolution ({module.groups} groups)"
        if module.padding_mode != "zeros":
            return f"padding mode {module.padding_mode}"
        return None
    if isinstance(module, nn.Linear):
        return None
    return f"{type(module).__name__} is neither Linear nor Conv2d"


def compiled(component: nn.Module) -> bool:
    """Whether :func:`.optimize.optimize` compiled *component* (its LoRAs must then be merged)."""
    state = component.__dict__.get("_sdc_opt_state")
    return bool(getattr(state, "compiled", False))


def compile_expected(device: torch.device) -> bool:
    """Whether ``optimize(pipe)`` with its default ``compile="auto"`` will compile on *device*."""
    try:
        from .optimize import _resolve_compile
    except Exception:  # optimized kernels unavailable: nothing will be compiled
        return False
    return bool(_resolve_compile("auto", device))


def paths_of(module: nn.Module) -> tuple[SidePath, ...]:
    """The side paths *module* holds now (empty: runs as its base)."""
    return module.__dict__.get(_PATHS, ())


def set_paths(module: nn.Module, paths: tuple[SidePath, ...]) -> None:
    """Make *paths* the side paths of *module* (``()``: remove them, and every hook they needed).

    A fused Q/K/V projection's owner needs :func:`sync_fused_owner` afterwards.
    """
    d = module.__dict__
    if paths:
        d[_PATHS] = tuple(paths)
        if _HOOK not in d:
            d[_HOOK] = module.register_forward_hook(_output_hook, with_kwargs=True)
            if isinstance(module, nn.Conv2d):
                d["forward_add"] = types.MethodType(_conv_forward_add, module)
        return
    d.pop(_PATHS, None)
    d.pop("forward_add", None)
    handle = d.pop(_HOOK, None)
    if handle is not None:
        handle.remove()


def sync_fused_owner(owner: nn.Module) -> None:
    """Keep *owner*'s (an ``Attention``'s) fused Q/K/V GEMM adding its projections' side paths.

    With a path on any of ``to_q``/``to_k``/``to_v``, a forward pre-hook binds the
    processor's site to :class:`_SidePathSite` before each call (an ``optimize``
    after the switch makes a new processor and site); without, the pre-hook goes
    and the site gets its own class back.
    """
    if not hasattr(owner, "processor"):
        return
    d = owner.__dict__
    leaves = [getattr(owner, leaf, None) for leaf in _FUSED_LEAVES]
    if any(paths_of(m) for m in leaves if isinstance(m, nn.Module)):
        if _BIND not in d:
            d[_BIND] = owner.register_forward_pre_hook(_bind_site)
        _bind_site(owner, ())
        return
    handle = d.pop(_BIND, None)
    if handle is not None:
        handle.remove()
    site = getattr(getattr(owner, "processor", None), "site", None)
    base = _site_base()
    if base is not None and type(site) is _side_site_class():
        site.__class__ = base


# ----------------------------------------------------------------- the arithmetic


def _inplace_ok(y: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and y.requires_grad) and not y.is_mkldnn


def _add_linear(y: torch.Tensor, x: torch.Tensor, paths: tuple[SidePath, ...]) -> torch.Tensor:
    """``y + sum s * (x @ down.T) @ up.T``, in place into *y* where it can be."""
    if _inplace_ok(y) and y.is_contiguous():
        y2 = y.view(-1, y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        _addmm_paths(y2, x2, paths)
        return y
    for p in paths:
        h = F.linear(x.to(p.down.dtype), p.down)
        y = y + (p.scale * F.linear(h, p.up)).to(y.dtype)
    return y


def _addmm_paths(y2: torch.Tensor, x2: torch.Tensor, paths: tuple[SidePath, ...]) -> None:
    """``y2 += sum s * (x2 @ down.T) @ up.T`` for 2-D *y2* (a view: a fused GEMM's slice is fine)."""
    for p in paths:
        xx = x2 if x2.dtype == p.down.dtype else x2.to(p.down.dtype)
        h = torch.mm(xx, p.down.t())
        if h.dtype == y2.dtype:
            y2.addmm_(h, p.up.t(), alpha=p.scale)
        else:
            y2.add_(torch.mm(h, p.up.t()), alpha=p.scale)


def _pointwise(conv: nn.Conv2d) -> bool:
    return (
        tuple(conv.kernel_size) == (1, 1)
        and tuple(conv.stride) == (1, 1)
        and not isinstance(conv.padding, str)
        and tuple(conv.padding) == (0, 0)
    )


def _add_conv(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, paths: tuple[SidePath, ...]) -> torch.Tensor:
    """``y + sum s * up(down(x))`` for a convolution; ``down`` has the layer's geometry, ``up`` is 1x1."""
    if x.dim() != 4:  # unbatched input: do it batched
        return _add_conv(conv, x.unsqueeze(0), y.unsqueeze(0), paths).squeeze(0)
    n, c_out = y.shape[0], y.shape[1]
    inplace = _inplace_ok(y)
    cl = torch.channels_last
    for p in paths:
        xx = x if x.dtype == p.down.dtype else x.to(p.down.dtype)
        rank = p.down.shape[0]
        if inplace and y.is_contiguous():  # NCHW: per sample, (out, HW) += up @ (rank, HW)
            if _pointwise(conv) and xx.is_contiguous():
                h3 = torch.matmul(p.down.view(rank, -1), xx.view(n, xx.shape[1], -1))
            else:
                h3 = F.conv2d(xx, p.down, None, conv.stride, conv.padding, conv.dilation).reshape(n, rank, -1)
            y3 = y.view(n, c_out, -1)
            if h3.dtype == y3.dtype:
                y3.baddbmm_(p.up.expand(n, -1, -1), h3, alpha=p.scale)
            else:
                y3.add_(torch.matmul(p.up, h3).to(y3.dtype), alpha=p.scale)
        elif inplace and y.is_contiguous(memory_format=cl):  # channels-last: (NHW, out) += (NHW, rank) @ up.T
            y2 = y.permute(0, 2, 3, 1).view(-1, c_out)
            if _pointwise(conv) and xx.is_contiguous(memory_format=cl):
                h2 = torch.mm(xx.permute(0, 2, 3, 1).view(-1, xx.shape[1]), p.down.view(rank, -1).t())
            else:
                h = F.conv2d(xx, p.down, None, conv.stride, conv.padding, conv.dilation)
                h2 = h.permute(0, 2, 3, 1).reshape(-1, rank)
            if h2.dtype == y2.dtype:
                y2.addmm_(h2, p.up.t(), alpha=p.scale)
            else:
                y2.add_(torch.mm(h2, p.up.t()).to(y2.dtype), alpha=p.scale)
        else:
            h = F.conv2d(xx, p.down, None, conv.stride, conv.padding, conv.dilation)
            y = y + (p.scale * F.conv2d(h, p.up[:, :, None, None])).to(y.dtype)
            inplace = _inplace_ok(y)
    return y


def _output_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    d = module.__dict__
    paths = d.get(_PATHS)
    if not paths or d.get(_QUIET) or not isinstance(output, torch.Tensor):
        return None
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor):
        return None
    if isinstance(module, nn.Conv2d):
        return _add_conv(module, x, output, paths)
    return _add_linear(output, x, paths)


def _conv_forward_add(self: nn.Conv2d, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``other + self(x)`` with the side paths: the class's fused call (hook silenced), then the paths."""
    fused = getattr(type(self), "forward_add", None)
    if fused is None:
        return other + self(x)
    d = self.__dict__
    d[_QUIET] = True
    try:
        out = fused(self, x, other)
    finally:
        d.pop(_QUIET, None)
    paths = d.get(_PATHS)
    return _add_conv(self, x, out, paths) if paths else out


# ----------------------------------------------------------------- fused Q/K/V sites

_SITE_CLASSES: dict[str, type] = {}


def _site_base() -> type | None:
    """``packing._LinearSite``, or None where the packed kernels cannot load (then no site exists)."""
    if "base" not in _SITE_CLASSES:
        try:
            from .packing import _LinearSite
        except Exception:
            return None
        _SITE_CLASSES["base"] = _LinearSite
    return _SITE_CLASSES["base"]


def _side_site_class() -> type | None:
    if "side" in _SITE_CLASSES:
        return _SITE_CLASSES["side"]
    base = _site_base()
    if base is None:
        return None

    class _SidePathSite(base):  # type: ignore[misc, valid-type]
        """A fused Q/K/V (or K/V) GEMM that adds each projection's side paths into its slice."""

        def run(self, x: torch.Tensor) -> torch.Tensor:
            return _add_fused(self, x, super().run(x))

        def run_dense(self, x: torch.Tensor) -> torch.Tensor:
            return _add_fused(self, x, super().run_dense(x))

    _SITE_CLASSES["side"] = _SidePathSite
    return _SidePathSite


def _add_fused(site: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    lins = site.linears()
    if not any(paths_of(lin) for lin in lins):
        return y
    if not (_inplace_ok(y) and y.is_contiguous()):
        parts = list(y.split(site.out_features, dim=-1))
        for i, lin in enumerate(lins):
            if paths_of(lin):
                parts[i] = _add_linear(parts[i].contiguous(), x, paths_of(lin))
        return torch.cat(parts, dim=-1)
    y2 = y.view(-1, y.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    off = 0
    for lin, width in zip(lins, site.out_features):
        paths = paths_of(lin)
        if paths:
            _addmm_paths(y2[:, off : off + width], x2, paths)
        off += width
    return y


def _bind_site(owner: nn.Module, args: tuple[Any, ...]) -> None:
    site = getattr(getattr(owner, "processor", None), "site", None)
    base = _site_base()
    if base is not None and type(site) is base and getattr(site, "attrs", None):
        site.__class__ = _side_site_class()
