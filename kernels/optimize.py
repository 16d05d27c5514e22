"""Apply the runner's kernels to a diffusers pipeline, and keep them right across weight edits.

``optimize(pipe)`` rewrites, in place, the denoiser (UNet / ControlNet) and the VAE:

- channels-last memory format for every convolution;
- every diffusers ``ResnetBlock2D`` runs fused GroupNorm+SiLU (the time-embedding add folded
  into the second one) and, on CPU, fuses the residual add into ``conv2``;
- every ``GEGLU`` runs a fused ``a * gelu(g)``;
- every ``Transformer2DModel`` keeps its output channels-last (stock copies it to NCHW) and,
  on CPU, adds its residual inside ``proj_out``;
- every ``Attention`` with the stock processor computes Q/K/V (or K/V for cross-attention)
  with one GEMM over concatenated weights and attends with SDPA -- or, on CPUs with
  AVX512-BF16 and no AMX, with our bf16 flash kernel (``cpu_attention``), twice as fast there;
- on CPU, every Conv2d weight (bf16 or fp32) and every Linear weight (bf16) is pre-packed
  for oneDNN once, instead of being reordered on every call;
- optionally ``torch.compile`` (inductor) over the denoiser's forward, which fuses the
  remaining elementwise work (norms, adds, GEGLU, SiLU).

Modules keep their names and parameters (the replacements are subclasses swapped onto the
instance), so LoRA code that addresses ``unet.down_blocks.0...to_q`` keeps working. A module
the optimizer does not recognise is left stock; a call the fused code does not cover runs the
stock code. Text encoders are left as they are (small, run once per prompt).

Why this design rather than inductor ``freezing``: freezing pre-packs weights too, but into
the compiled graph as constants, so every LoRA apply/restore or base switch would cost a
recompile (~100 s on a 2-core CPU). Here the packed weights live outside any graph, keyed by
layer: compiled code reaches them through opaque ``sdcache::*`` custom ops, and
:func:`weights_changed` re-packs exactly the layers a switch touched (milliseconds each).
Parameters stay graph *inputs*, so in-place edits never invalidate a compiled graph. Inductor's
FX graph cache is pointed at ``~/.cache/sdcache/inductor`` (unless ``TORCHINDUCTOR_CACHE_DIR``
is set), so a new process with the same architecture reuses the generated code.

``compile="auto"`` compiles on CUDA, and on CPU only when ``SDCACHE_COMPILE=1``. Measured on the
2-core CPU host (``benchmarks/bench_unet_cpu.py``, SD1.5 bf16): inductor adds only 0-3% on top
of the eager optimizations -- the step is dominated by oneDNN convolutions/GEMMs and attention,
which compile leaves as extern calls -- while costing 75-140 s on the first call (10-17 s in a
new process once its cache is warm). On CUDA the fusions matter more and compile is worth it
for a long-lived server.

Weights written in place *through* ``param.data`` (``p.data.add_(delta)``) are invisible to
PyTorch's version counter: call :func:`weights_changed` after such edits. Other edits --
``p.data = new_tensor``, a new ``Parameter``, ``p.copy_()`` under ``no_grad``, ``.to()`` -- are
detected before the next use anyway; calling :func:`weights_changed` then only moves the
re-pack out of the next step.
"""

from __future__ import annotations

import logging
import os
import time
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import cpu_attention, ops, triton_kernels

log = logging.getLogger(__name__)

__all__ = ["optimize", "weights_changed", "describe", "unoptimize"]

# Components whose convs/attention we rewrite; text encoders stay stock.
_ROOT_COMPONENTS = ("unet", "controlnet", "vae", "prior", "decoder")
_STATE_ATTR = "_sdc_opt_state"
# How many models of each class this process optimized: part of the stable site keys.
_ROOT_ORDINALS: dict[str, int] = {}


class _RootState:
    """What was applied to one component (a UNet, VAE, ...)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.compiled = False
        self.compile_seconds: float | None = None
        self.channels_last = False

    def bump(self, key: str, table: dict[str, int] | None = None) -> None:
        t = self.counts if table is None else table
        t[key] = t.get(key, 0) + 1


def _roots(pipe: Any) -> list[tuple[str, nn.Module]]:
    if isinstance(pipe, nn.Module):
        return [("", pipe)]
    comps = getattr(pipe, "components", None)
    if not isinstance(comps, dict):
        raise TypeError(f"optimize() needs a diffusers pipeline or an nn.Module, got {type(pipe).__name__}")
    return [(n, m) for n, m in comps.items() if n in _ROOT_COMPONENTS and isinstance(m, nn.Module)]


def _resolve_compile(compile: bool | str, device: torch.device) -> bool:
    if isinstance(compile, bool):
        return compile
    if compile != "auto":
        raise ValueError(f"compile must be True, False or 'auto', not {compile!r}")
    env = os.environ.get("SDCACHE_COMPILE")
    if env is not None:
        return env not in ("", "0", "false", "no")
    return device.type == "cuda"


def _setup_compile_cache() -> None:
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        path = Path(os.environ.get("SDCACHE_CACHE_HOME", Path.home() / ".cache" / "sdcache")) / "inductor"
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    try:
        import torch._inductor.config as icfg

        icfg.fx_graph_cache = True
    except Exception:  # pragma: no cover - inductor missing
        pass


def _module_device_dtype(m: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in m.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _optimize_root(name: str, root: nn.Module, compile_: bool) -> _RootState:
    state = _RootState(name)
    device, dtype = _module_device_dtype(root)
    root.to(memory_format=torch.channels_last)
    state.channels_last = True
    fused_lins: set[int] = set()
    for mod_name, m in list(root.named_modules()):
        if ops.resnet_supported(m):
            ops.swap_class(m, ops._fused_resnet_class())
            state.bump("fused_resnet_groupnorm_silu")
        elif type(m).__name__ == "ResnetBlock2D":
            state.bump("resnet", state.skipped)
        if ops.transformer2d_supported(m):
            ops.swap_class(m, ops._fused_transformer2d_class())
            state.bump("channels_last_transformer_out")
        if ops.geglu_supported(m):
            ops.swap_class(m, ops._fused_geglu_class())
            state.bump("fused_geglu")
        elif type(m).__name__ == "GEGLU":
            state.bump("geglu", state.skipped)
        if type(m).__name__ == "Attention":
            if ops.attention_supported(m):
                proc = ops.FusedAttnProcessor(m, m.processor)
                m.set_processor(proc)
                state.bump(proc.site.kind)
                state.bump("sdpa_attention")
                fused_lins.update(id(lin) for lin in proc.site.linears())
            else:
                state.bump("attention", state.skipped)
    if device.type == "cpu":
        if dtype == torch.bfloat16 and state.counts.get("sdpa_attention") and cpu_attention.available():
            state.bump("cpu_flash_attention_kernel")  # built/loaded now, not inside a step
        for mod_name, m in list(root.named_modules()):
            if type(m) is nn.Conv2d:
                if ops.attach_conv_site(m) is not None:
                    state.bump("packed_conv2d")
                else:
                    state.bump("conv2d", state.skipped)
            elif type(m) is nn.Linear:
                if id(m) in fused_lins:
                    continue  # only reached by the fused GEMM (or, on fallback, stock F.linear)
                if ops.attach_linear_site(m) is not None:
                    state.bump("packed_linear")
    ordinal = _ROOT_ORDINALS.get(type(root).__name__, 0)
    _ROOT_ORDINALS[type(root).__name__] = ordinal + 1
    for owner, site in ops.iter_sites(root):
        site.set_key(f"{type(root).__name__}{ordinal}/{owner}")
    if compile_:
        _compile_root(root, state)
    return state


class _GuardedForward:
    """Instance ``forward`` of a compiled root: checks weight freshness, then runs compiled code.

    The check is Python outside the compiled region (a few microseconds per layer), so a
    weight edit the runner forgot to report still rebuilds the derived state before use.
    """

    def __init__(self, root: nn.Module, fn: Any, state: _RootState) -> None:
        self.root_ref = root
        self.fn = fn
        self.state = state
        self.sites = [s for _, s in ops.iter_sites(root)]
        self.first_call_done = False

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # A copy of a compiled model runs eagerly (still optimized); compile it again if needed.
        new_root = memo.get(id(self.root_ref))
        if new_root is None:
            return None
        return types.MethodType(type(new_root).forward, new_root)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for site in self.sites:
            site.ensure_fresh()
        if self.first_call_done:
            return self.fn(*args, **kwargs)
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.state.compile_seconds = time.perf_counter() - t0
        self.first_call_done = True
        log.info("compiled %s in %.1f s", self.state.name or type(self.root_ref).__name__, self.state.compile_seconds)
        return out


def _compile_root(root: nn.Module, state: _RootState) -> None:
    _setup_compile_cache()
    orig = root.forward
    compiled = torch.compile(orig)
    root.forward = _GuardedForward(root, compiled, state)  # type: ignore[method-assign]
    state.compiled = True


def optimize(
    pipe: Any,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    compile: bool | str = "auto",  # noqa: A002 - public keyword named in the issue
) -> Any:
    """Apply fused/pre-packed kernels to ``pipe`` (a diffusers pipeline or a bare model), in place.

    ``device``/``dtype``: move the pipeline first (``None`` keeps what it has; use
    :func:`ops.preferred_dtype` for the fastest dtype of a device). ``compile``: ``True``,
    ``False`` or ``"auto"`` (CUDA, or CPU with ``SDCACHE_COMPILE=1``). Returns ``pipe``.
    Calling it twice is a no-op for components already optimized.
    """
    if device is not None or dtype is not None:
        pipe.to(*[a for a in (device, dtype) if a is not None])
    for name, root in _roots(pipe):
        if _STATE_ATTR in root.__dict__:
            continue
        dev, _ = _module_device_dtype(root)
        compile_ = _resolve_compile(compile, dev) and name in ("", "unet", "controlnet", "prior", "decoder")
        state = _optimize_root(name, root, compile_)
        root.__dict__[_STATE_ATTR] = state
        log.info("optimized %s: %s (left stock: %s)", name or type(root).__name__, state.counts, state.skipped)
    return pipe


def unoptimize(pipe: Any) -> Any:
    """Put every optimized module back to its stock class and processor (frees packed weights)."""
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0
    except Exception:  # pragma: no cover
        AttnProcessor2_0 = None  # type: ignore[assignment, misc]
    for _, root in _roots(pipe):
        state = root.__dict__.pop(_STATE_ATTR, None)
        if state is None:
            continue
        if "forward" in root.__dict__:
            del root.forward
        for _, m in root.named_modules():
            proc = m.__dict__.get("processor")
            if isinstance(proc, ops.FusedAttnProcessor):
                m.set_processor(proc.stock if proc.stock is not None else AttnProcessor2_0())
            ops.restore_module(m)
    return pipe


def _split_names(pipe: Any, names: Iterable[str]) -> dict[int, tuple[nn.Module, set[str] | None]]:
    """Map each root to the set of module names (relative to it) to refresh; None = all."""
    roots = _roots(pipe)
    by_name = {n: r for n, r in roots}
    out: dict[int, tuple[nn.Module, set[str] | None]] = {id(r): (r, set()) for _, r in roots}
    for raw in names:
        name = raw.strip(".")
        head, _, rest = name.partition(".")
        targets: list[tuple[nn.Module, str]]
        if name in by_name and name:
            out[id(by_name[name])] = (by_name[name], None)
            continue
        if head in by_name and head:
            targets = [(by_name[head], rest)]
        else:
            targets = [(r, name) for _, r in roots]
        for root, rel in targets:
            if rel == "":
                out[id(root)] = (root, None)
                continue
            entry = out[id(root)]
            if entry[1] is None:
                continue
            try:
                root.get_submodule(rel)
                entry[1].add(rel)
            except AttributeError:
                mod, _, _leaf = rel.rpartition(".")
                try:
                    root.get_submodule(mod)
                    entry[1].add(mod)  # a parameter name: refresh its module
                except AttributeError:
                    if len(targets) == 1:
                        log.warning("weights_changed: no module %r", raw)
    return out


def weights_changed(pipe: Any, module_names: Iterable[str]) -> None:
    """Refresh derived state (packed / fused weights) of the modules whose weights were edited.

    ``module_names`` are module (or parameter) names as ``pipe.components`` reaches them,
    e.g. ``"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"``; names without
    a component prefix are looked up in every optimized component, and a component name alone
    (``"unet"``) refreshes all of it. Only layers fed by those modules are rebuilt, so a LoRA
    switch costs milliseconds per touched layer and never a recompile. Cheap no-op for
    modules with no derived state.
    """
    plan = _split_names(pipe, list(module_names))
    for root, wanted in plan.values():
        if _STATE_ATTR not in root.__dict__:
            continue
        if wanted is not None and not wanted:
            continue
        # Names above an edited module (its parents) -- a site reading a module whose child was
        # edited (a LoRA wrapper's base layer, say) is refreshed too.
        above = {".".join(w.split(".")[:i]) for w in wanted or () for i in range(1, w.count(".") + 1)}
        for owner, site in ops.iter_sites(root):
            if wanted is None or any(
                src in above or _under_any(src, wanted) for src in ops.site_source_modules(owner, site)
            ):
                site.rebuild()


def _under_any(name: str, wanted: set[str]) -> bool:
    """``name`` is one of ``wanted`` or inside one of them."""
    if name in wanted:
        return True
    parts = name.split(".")
    return any(".".join(parts[:i]) in wanted for i in range(1, len(parts)))


def describe(pipe: Any) -> dict[str, Any]:
    """What :func:`optimize` applied, per component: counts of each kernel, what stayed stock,
    compile status/time, bytes of derived (packed/fused) weights, device and dtype."""
    out: dict[str, Any] = {
        "triton": triton_kernels.available(),
        "cpu_native_bf16": ops.cpu_has_native_bf16(),
        "components": {},
    }
    for name, root in _roots(pipe):
        state: _RootState | None = root.__dict__.get(_STATE_ATTR)
        dev, dt = _module_device_dtype(root)
        key = name or type(root).__name__
        if state is None:
            out["components"][key] = {"optimized": False, "device": str(dev), "dtype": str(dt)}
            continue
        derived = sum(s.derived_bytes() for _, s in ops.iter_sites(root))
        out["components"][key] = {
            "optimized": True,
            "device": str(dev),
            "dtype": str(dt).replace("torch.", ""),
            "channels_last": state.channels_last,
            "applied": dict(state.counts),
            "left_stock": dict(state.skipped),
            "compiled": state.compiled,
            "compile_seconds": state.compile_seconds,
            "derived_weight_bytes": derived,
        }
    return out
