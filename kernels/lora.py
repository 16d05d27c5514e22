"""LoRAs: parse kohya/A1111 and diffusers/PEFT files, map them onto a base model, switch them in place.

Switching never reloads the base. A new LoRA set runs *unmerged*: each touched
module adds ``sum_i s_i * up_i(down_i(x))`` to its output through a low-rank
side path (:mod:`.lora_paths`), so a switch only swaps references -- no weight
is written and nothing packed from a weight is rebuilt. When requests keep
using one set, it is *merged* (the K-th request in a row, :data:`MERGE_AFTER`):
the weight's original tensor is set aside (never written), a working buffer of
the same size is allocated for it once, and ``W = W0 + sum_i s_i * up_i @
down_i`` is written into it straight from ``W0``, so steps cost what the base
costs. Nothing is ever subtracted, so after A then B the outputs are bit for bit
those of B alone (in the same mode), and removing every LoRA restores the base
exactly (see :class:`LoraPatcher`).

Key layouts understood:

* kohya / A1111: ``lora_unet_<module>``, ``lora_te_<module>`` (SD1/SD2),
  ``lora_te1_``/``lora_te2_`` (SDXL), each with ``.lora_down.weight``,
  ``.lora_up.weight`` and optional ``.alpha``; UNet modules named after
  diffusers modules (SD1/SD2 sd-scripts) or the original SGM blocks
  (SDXL sd-scripts: ``input_blocks_4_1_transformer_blocks_0_attn1_to_q``).
* diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight``
  (also ``text_encoder.``, ``text_encoder_2.``, ``base_model.model.``, an
  adapter name before ``.weight``), the older ``.lora.down.weight``,
  ``.lora_linear_layer.down.weight`` and ``.processor.to_q_lora.down.weight``.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdcache import errors

from .checkpoint import unet_ldm_prefixes, unet_name_to_ldm
from .families import label_for_cross_attention_dim
from .metrics import LORA_SWITCH_SECONDS

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_DOWN_UP = [
    (re.compile(r"^(.*)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(.*)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(.*)\.lora_A(?:\.[A-Za-z0-9_-]+)?\.weight$"), "down"),
    (re.compile(r"^(.*)\.lora_B(?:\.[A-Za-z0-9_-]+)?\.weight$"), "up"),
    (re.compile(r"^(.*)\.(?:lora|lora_linear_layer)\.down\.weight$"), "down"),
    (re.compile(r"^(.*)\.(?:lora|lora_linear_layer)\.up\.weight$"), "up"),
]
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_ALPHA = re.compile(r"^(.*)\.alpha$")


@dataclass
class LoraModule:
    """One low-rank update: ``delta = (alpha / rank) * up @ down``."""

    stem: str
    down: "torch.Tensor"
    up: "torch.Tensor"
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def factor(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank


@dataclass
class LoraFile:
    """A parsed LoRA file, independent of any base model (what the host tier keeps)."""

    url: str
    modules: dict[str, LoraModule]
    unsupported: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(m.down.numel() * m.down.element_size() + m.up.numel() * m.up.element_size()
                   for m in self.modules.values())

    def family_hint(self) -> str | None:
        """``sdxl``, ``sd1``, ``sd2``, ``single-te`` (SD1.x/SD2.x) or None, from names and shapes."""
        stems = list(self.modules)
        if any(s.startswith(("lora_te2_", "text_encoder_2.")) for s in stems):
            return "sdxl"
        for s, m in self.modules.items():
            if re.search(r"attn2[._]to_k$", s):
                dim = int(m.down.reshape(m.down.shape[0], -1).shape[1])
                lab = label_for_cross_attention_dim(dim)
                if lab:
                    return {"SD1.x": "sd1", "SD2.x": "sd2", "SDXL": "sdxl"}[lab]
                break
        if any(s.startswith(("lora_te_", "text_encoder.")) for s in stems):
            return "single-te"
        return None


def parse_lora(url: str, sd: Mapping[str, "torch.Tensor"]) -> LoraFile:
    """Group a LoRA file's tensors into :class:`LoraModule` by module stem."""
    parts: dict[str, dict[str, Any]] = defaultdict(dict)
    unsupported: list[str] = []
    for key, t in sd.items():
        m = _PROCESSOR.match(key)
        if m:
            proj = "to_out.0" if m.group(2) == "to_out" else m.group(2)
            parts[f"{m.group(1)}.{proj}"][m.group(3)] = t
            continue
        for pat, role in _DOWN_UP:
            m = pat.match(key)
            if m:
                parts[m.group(1)][role] = t
                break
        else:
            m = _ALPHA.match(key)
            if m and t.numel() == 1:
                parts[m.group(1)]["alpha"] = float(t.float().item())
            else:  # LoHa/LoKr/DoRA/full-diff tensors and anything else: counted, never applied
                unsupported.append(key)
    modules: dict[str, LoraModule] = {}
    for stem, p in parts.items():
        if "down" in p and "up" in p:
            modules[stem] = LoraModule(stem, p["down"], p["up"], p.get("alpha"))
        elif "down" in p or "up" in p:
            unsupported.append(stem + " (half a pair)")
    if not modules:
        example = f" (e.g. {unsupported[0]})" if unsupported else ""
        raise errors.InvalidArgument(
            f"LoRA {url}: no LoRA weights in a known layout: 0 of {len(sd)} tensors are kohya or diffusers/PEFT"
            f" lora_down/lora_up/lora_A/lora_B pairs{example}"
        )
    return LoraFile(url, modules, unsupported)


# ----------------------------------------------------------------- mapping


def _te_canonical(name: str, model: "torch.nn.Module") -> str:
    """HF CLIP module name with its ``text_model.`` prefix, whatever transformers version built it."""
    if hasattr(model, "text_model") or name.startswith(("text_model.", "text_projection")):
        return name
    return "text_model." + name


def target_index(modules: Mapping[str, "torch.nn.Module"], xl: bool) -> dict[str, tuple[str, str]]:
    """Every name a LoRA may use for a base model's Linear/Conv2d modules -> (component, module name)."""
    import torch

    index: dict[str, tuple[str, str]] = {}
    unet = modules.get("unet")
    if unet is not None:
        pairs = unet_ldm_prefixes(unet.config)
        for name, m in unet.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            ref = ("unet", name)
            index["lora_unet_" + name.replace(".", "_")] = ref
            ldm = unet_name_to_ldm(name, pairs)
            if ldm is not None:
                index["lora_unet_" + ldm.replace(".", "_")] = ref
            index["unet." + name] = ref
            index["base_model.model." + name] = ref
            index[name] = ref
    for comp, kohya in (("text_encoder", "lora_te1_" if xl else "lora_te_"), ("text_encoder_2", "lora_te2_")):
        te = modules.get(comp)
        if te is None:
            continue
        for name, m in te.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            ref = (comp, name)
            canon = _te_canonical(name, te)
            index[kohya + canon.replace(".", "_")] = ref
            index[f"{comp}.{canon}"] = ref
            index[f"{comp}.{name}"] = ref
    return index


@dataclass
class ResolvedLora:
    """A LoRA mapped onto one base model: per target module, its factors as 2-D matrices."""

    url: str
    targets: dict[tuple[str, str], tuple["torch.Tensor", "torch.Tensor", float]]  # (comp, module) -> (up, down, f)
    matched: int
    total: int
    unsupported: int
    #: (target, device, dtype) -> (down, up, bytes copied): factors made ready for side paths, once
    _device_factors: dict[Any, tuple[Any, Any, int]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def summary(self) -> str:
        s = f"{self.matched}/{self.total} modules"
        if self.unsupported:
            s += f", {self.unsupported} tensors ignored"
        return s

    def device_factors(self, ref: tuple[str, str],
                       module: "torch.nn.Module") -> tuple["torch.Tensor", "torch.Tensor", int]:
        """``(down, up, copied bytes)`` of target *ref* in *module*'s device and dtype, ``down`` in the
        layer's shape (a conv's kernel), made once per LoRA and reused by every later switch."""
        w = module.weight
        key = (ref, w.device, w.dtype)
        got = self._device_factors.get(key)
        if got is None:
            up, down, _ = self.targets[ref]
            d = down.to(device=w.device, dtype=w.dtype).reshape(down.shape[0], *w.shape[1:]).contiguous()
            u = up.to(device=w.device, dtype=w.dtype).contiguous()
            copied = sum(t.numel() * t.element_size() for t, src in ((d, down), (u, up))
                         if t.untyped_storage().data_ptr() != src.untyped_storage().data_ptr())
            got = self._device_factors[key] = (d, u, copied)
        return got


def resolve(
    lora: LoraFile,
    modules: Mapping[str, "torch.nn.Module"],
    index: Mapping[str, tuple[str, str]],
    base_label: str,
    base_family: str,
) -> ResolvedLora:
    """Map *lora* onto the base model; one-line errors for a LoRA that does not belong to it."""
    hint = lora.family_hint()
    if hint == "sdxl" and base_family != "sdxl":
        raise errors.InvalidArgument(f"LoRA {lora.url} is for SDXL; the base model is {base_label}")
    if hint in ("sd1", "sd2", "single-te") and base_family == "sdxl":
        lab = {"sd1": "SD1.x", "sd2": "SD2.x"}.get(hint, "SD1.x/SD2.x")
        raise errors.InvalidArgument(f"LoRA {lora.url} is for {lab}; the base model is SDXL")
    if hint in ("sd1", "sd2") and base_family in ("sd1", "sd2") and hint != base_family:
        lab = {"sd1": "SD1.x", "sd2": "SD2.x"}[hint]
        raise errors.InvalidArgument(f"LoRA {lora.url} is for {lab}; the base model is {base_label}")
    targets: dict[tuple[str, str], tuple[Any, Any, float]] = {}
    unmatched: list[str] = []
    misfit: list[str] = []
    for stem, lm in lora.modules.items():
        ref = index.get(stem)
        if ref is None:
            unmatched.append(stem)
            continue
        comp, name = ref
        w = modules[comp].get_submodule(name).weight
        out_f = w.shape[0]
        in_f = w[0].numel()
        down = lm.down.reshape(lm.down.shape[0], -1)
        up = lm.up.reshape(lm.up.shape[0], -1)
        if up.shape[0] != out_f or down.shape[1] != in_f or up.shape[1] != down.shape[0]:
            misfit.append(f"{stem}: LoRA {up.shape[0]}x{down.shape[1]} vs weight {out_f}x{in_f}")
            continue
        targets[ref] = (up, down, lm.factor())
    total = len(lora.modules)
    if misfit:
        raise errors.InvalidArgument(
            f"LoRA {lora.url} does not fit the {base_label} base model: {len(misfit)} of {total} modules have"
            f" other shapes (e.g. {misfit[0]})"
        )
    if not targets:
        raise errors.InvalidArgument(
            f"LoRA {lora.url} matches nothing in the {base_label} base model: 0 of {total} LoRA modules matched"
            f" (e.g. {unmatched[0]})"
        )
    if unmatched:
        log.warning("LoRA %s: %d of %d modules match the base model (e.g. %s does not)",
                    lora.url, len(targets), total, unmatched[0])
    return ResolvedLora(lora.url, targets, len(targets), total, len(lora.unsupported))


# ----------------------------------------------------------------- patching

#: The default merge rule: the K-th request in a row with the same LoRA set runs merged. See
#: :class:`LoraPatcher` and benchmarks/RESULTS.md (``bench_lora_switch.py``) for the figures.
MERGE_AFTER = 2

_Ref = tuple[str, str]


class LoraPatcher:
    """Applies a set of resolved LoRAs to a base model's modules and switches sets exactly.

    Two ways to apply a LoRA to a module, chosen per request:

    * **side paths** (the default for a new set): the base weight is left alone
      and the module adds ``sum_i s_i * up_i(down_i(x))`` to its output
      (:mod:`.lora_paths`). A switch only swaps the factor references the
      modules hold: milliseconds for an SD1.5 UNet, nothing re-packed. Each
      denoising step pays for the extra low-rank GEMMs.
    * **merged**: each touched weight keeps its original tensor (never written)
      and gets a working buffer the size of the weight, allocated once and
      reused; applying writes ``W0 + sum_i s_i up_i @ down_i`` into the buffer
      and makes it the parameter's data (the parameter objects stay the same).
      Steps cost what the base costs; a switch costs a GEMM per touched weight
      and, in an optimized pipeline, re-packing what was derived from it.

    The rule (*merge_after* = K, default :data:`MERGE_AFTER`): a request whose
    LoRA set differs from the previous request's runs on side paths; the K-th
    request in a row with the same set (scales included) merges it first and
    it stays merged until the set changes. A change from a merged set restores
    the originals (reference swaps) and puts the new set on side paths. K = 1
    merges every set at once (the behaviour before side paths); ``None`` never
    merges. Modules that cannot take side paths (grouped convolutions, any
    module of a ``torch.compile``'d component, every module while
    :attr:`merge_reason` is set) are merged on every request.

    Exactness, in either mode: an output depends only on the base and the set
    applied (in request order), never on the sets before. After A then B the
    outputs are bit for bit those of B alone applied the same way; removing
    every LoRA restores the base exactly -- the original weight tensors come
    back (not copies: CPU kernels may round differently for differently aligned
    storage) and the hooks of side paths are removed. Side-path and merged
    outputs of one set agree within float rounding, not bit for bit.
    """

    def __init__(self, modules: Mapping[str, "torch.nn.Module"], merge_after: int | None = MERGE_AFTER) -> None:
        self._modules = dict(modules)
        self._originals: dict[_Ref, torch.Tensor] = {}
        self._buffers: dict[_Ref, torch.Tensor] = {}
        self.applied: tuple[tuple[str, float], ...] = ()
        self.merge_after = merge_after
        #: When set (say, "the UNet will be compiled"), every set is merged at once; the text says why.
        self.merge_reason: str | None = None
        #: ``component.module`` names whose *weights* the last :meth:`switch` rewrote or restored
        #: (what an optimized pipeline must re-pack: ``optimize.weights_changed``).
        self.weights_edited: list[str] = []
        self._merged: set[_Ref] = set()
        self._sided: dict[_Ref, int] = {}  # module -> bytes of factor copies its side paths hold
        self._streak = 0
        self._found: dict[_Ref, torch.nn.Module] = {}

    @property
    def extra_nbytes(self) -> int:
        """Bytes of the working buffers and of side-path factors that had to be copied to the device/dtype."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values()) + sum(self._sided.values())

    @property
    def mode(self) -> str:
        """How the applied set runs: ``side`` (paths), ``merged``, ``mixed`` or ``""`` (no LoRA)."""
        if self._sided and self._merged:
            return "mixed"
        return "side" if self._sided else ("merged" if self._merged else "")

    def _module(self, ref: _Ref) -> "torch.nn.Module":
        m = self._found.get(ref)
        if m is None:  # looked up once: get_submodule through diffusers' __getattr__ is slow
            m = self._found[ref] = self._modules[ref[0]].get_submodule(ref[1])
        return m

    def _param(self, ref: _Ref) -> "torch.nn.Parameter":
        return self._module(ref).weight

    def original(self, ref: _Ref) -> "torch.Tensor":
        """The untouched weight of module *ref* = (component, module name)."""
        orig = self._originals.get(ref)
        return orig if orig is not None else self._param(ref).data

    def side_path_reason(self, ref: _Ref) -> str | None:
        """Why module *ref* is merged rather than given side paths, or None when it takes them."""
        from . import lora_paths

        if self.merge_reason:
            return self.merge_reason
        if lora_paths.compiled(self._modules[ref[0]]):
            return f"the {ref[0]} is torch.compile'd (a side-path change would recompile it)"
        return lora_paths.unsupported_reason(self._module(ref))

    def switch(self, loras: Iterable[tuple[ResolvedLora, float]]) -> list[str]:
        """Make exactly *loras* (with their scales) applied; returns the ``component.module`` names changed.

        Call it once per request, also when the set is the one applied: that is
        how the merge rule counts requests. A change of the set is timed in
        ``sdcache_runner_lora_switch_seconds``; :attr:`weights_edited` lists the
        modules whose weights were written or restored.
        """
        loras = list(loras)
        key = tuple((r.url, float(s)) for r, s in loras)
        if key == self.applied:
            self._streak += 1
            self.weights_edited = []
            if key and self._sided and self.merge_after is not None and self._streak >= self.merge_after:
                t0 = time.perf_counter()
                changed = self._apply(loras, key, merge_all=True)
                log.debug("merged LoRA set %s after %d requests in %.3f s", key, self._streak,
                          time.perf_counter() - t0)
                return changed
            return []
        self._streak = 1
        t0 = time.perf_counter()
        try:
            return self._apply(loras, key, merge_all=self.merge_after is not None and self.merge_after <= 1)
        finally:
            LORA_SWITCH_SECONDS.observe(time.perf_counter() - t0)

    def _apply(self, loras: list[tuple[ResolvedLora, float]], key: tuple[tuple[str, float], ...],
               merge_all: bool) -> list[str]:
        import torch

        from . import lora_paths

        per_target: dict[_Ref, list[tuple[ResolvedLora, float]]] = defaultdict(list)
        for r, scale in loras:
            for ref in r.targets:
                per_target[ref].append((r, float(scale)))
        changed: list[str] = []
        edited: list[str] = []
        owners: dict[int, torch.nn.Module] = {}
        with torch.no_grad():
            for ref in sorted((self._merged | self._sided.keys()) - per_target.keys()):
                self._restore(ref, edited)
                self._detach(ref, owners)
                changed.append(f"{ref[0]}.{ref[1]}")
            for ref in sorted(per_target):
                if merge_all or self.side_path_reason(ref) is not None:
                    self._detach(ref, owners)
                    self._merge(ref, per_target[ref])
                    edited.append(f"{ref[0]}.{ref[1]}")
                else:
                    self._restore(ref, edited)
                    self._attach(ref, per_target[ref], owners)
                changed.append(f"{ref[0]}.{ref[1]}")
            for owner in owners.values():
                lora_paths.sync_fused_owner(owner)
        self.weights_edited = edited
        self.applied = key
        return changed

    # -- side paths
    def _owner(self, ref: _Ref, owners: dict[int, "torch.nn.Module"]) -> None:
        parent, _, leaf = ref[1].rpartition(".")
        if leaf in ("to_q", "to_k", "to_v") and parent:
            m = self._module((ref[0], parent))
            owners[id(m)] = m

    def _attach(self, ref: _Ref, items: list[tuple[ResolvedLora, float]], owners: dict[int, "torch.nn.Module"]) -> None:
        from .lora_paths import SidePath, set_paths

        module = self._module(ref)
        paths, copied = [], 0
        for r, scale in items:
            down, up, nbytes = r.device_factors(ref, module)
            paths.append(SidePath(down, up, r.targets[ref][2] * scale))
            copied += nbytes
        set_paths(module, tuple(paths))
        self._sided[ref] = copied
        self._owner(ref, owners)

    def _detach(self, ref: _Ref, owners: dict[int, "torch.nn.Module"]) -> None:
        if ref in self._sided:
            from .lora_paths import set_paths

            set_paths(self._module(ref), ())
            del self._sided[ref]
            self._owner(ref, owners)

    # -- merging
    def _restore(self, ref: _Ref, edited: list[str]) -> None:
        if ref in self._merged:
            self._param(ref).data = self._originals[ref]
            self._merged.discard(ref)
            edited.append(f"{ref[0]}.{ref[1]}")

    def _merge(self, ref: _Ref, items: list[tuple[ResolvedLora, float]]) -> None:
        import torch

        p = self._param(ref)
        orig = self._originals.setdefault(ref, p.data)
        buf = self._buffers.get(ref)
        if buf is None:
            buf = self._buffers[ref] = torch.empty(orig.shape, dtype=orig.dtype, device=orig.device)
        ups, downs = [], []
        for r, scale in items:
            up, down, f = r.targets[ref]
            ups.append((up.to(device=buf.device, dtype=torch.float32) * (f * scale)).to(buf.dtype))
            downs.append(down.to(device=buf.device, dtype=buf.dtype))
        up_all = ups[0] if len(ups) == 1 else torch.cat(ups, dim=1)
        down_all = downs[0] if len(downs) == 1 else torch.cat(downs, dim=0)
        out2 = buf.view(buf.shape[0], -1)
        if buf.device.type == "cpu" and buf.dtype in (torch.bfloat16, torch.float16):
            # oneDNN runs a half-precision GEMM fast only without the addend (about 2.5x here)
            torch.mm(up_all, down_all, out=out2)
            out2.add_(orig.reshape(orig.shape[0], -1))
        else:
            torch.addmm(orig.reshape(orig.shape[0], -1), up_all, down_all, out=out2)
        p.data = buf
        self._merged.add(ref)
