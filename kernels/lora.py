"""LoRAs: parse kohya/A1111 and diffusers/PEFT files, map them onto a base model, switch them in place.

Switching never reloads the base. The first time a LoRA touches a weight, the
weight's original tensor is set aside (never written) and a working buffer of
the same size is allocated for it, once. Every switch then writes, for each
module the new set touches, ``W = W0 + sum_i s_i * up_i @ down_i`` straight
from the original ``W0`` (one ``addmm`` into the working buffer, in the stored
dtype), and gives modules that only the old set touched their original tensor
back. Nothing is ever subtracted, so after A then B the weights are bit for bit
those of a fresh load with B alone, and removing every LoRA restores the base
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

    @property
    def summary(self) -> str:
        s = f"{self.matched}/{self.total} modules"
        if self.unsupported:
            s += f", {self.unsupported} tensors ignored"
        return s


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


class LoraPatcher:
    """Applies a set of resolved LoRAs to a base model's modules and switches sets exactly.

    Each touched weight keeps its original tensor (never written) and gets a
    working buffer the size of the weight, allocated once and reused by every
    later switch. Applying writes ``W0 + sum s_i up_i @ down_i`` into the
    working buffer and makes it the parameter's data; restoring makes the
    original tensor the parameter's data again. The parameter objects stay the
    same, so module references (and optimizer state keyed on them) hold.

    Restoring by handing back the original tensor rather than copying it into
    the buffer keeps the base model's output bit for bit what it was before
    any LoRA, not only its weights: CPU kernels may round differently for
    differently aligned storage.
    """

    def __init__(self, modules: Mapping[str, "torch.nn.Module"]) -> None:
        self._modules = dict(modules)
        self._originals: dict[tuple[str, str], torch.Tensor] = {}
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self.applied: tuple[tuple[str, float], ...] = ()
        self._touched: set[tuple[str, str]] = set()

    @property
    def extra_nbytes(self) -> int:
        """Bytes of the working buffers (the originals are the base model's own tensors)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def _param(self, ref: tuple[str, str]) -> "torch.nn.Parameter":
        return self._modules[ref[0]].get_submodule(ref[1]).weight

    def original(self, ref: tuple[str, str]) -> "torch.Tensor":
        """The untouched weight of module *ref* = (component, module name)."""
        orig = self._originals.get(ref)
        return orig if orig is not None else self._param(ref).data

    def switch(self, loras: Iterable[tuple[ResolvedLora, float]]) -> list[str]:
        """Make exactly *loras* (with their scales) applied; returns the ``component.module`` names changed.

        A change of the set is timed in ``sdcache_runner_lora_switch_seconds``.
        """
        loras = list(loras)
        key = tuple((r.url, float(s)) for r, s in loras)
        if key == self.applied:
            return []
        t0 = time.perf_counter()
        try:
            return self._switch(loras, key)
        finally:
            LORA_SWITCH_SECONDS.observe(time.perf_counter() - t0)

    def _switch(self, loras: list[tuple[ResolvedLora, float]], key: tuple[tuple[str, float], ...]) -> list[str]:
        import torch

        per_target: dict[tuple[str, str], list[tuple[Any, Any, float]]] = defaultdict(list)
        for r, scale in loras:
            for ref, (up, down, f) in r.targets.items():
                per_target[ref].append((up, down, f * float(scale)))
        changed: list[str] = []
        with torch.no_grad():
            for ref in sorted(self._touched - per_target.keys()):
                self._param(ref).data = self._originals[ref]
                changed.append(f"{ref[0]}.{ref[1]}")
            for ref in sorted(per_target):
                p = self._param(ref)
                orig = self._originals.setdefault(ref, p.data)
                buf = self._buffers.get(ref)
                if buf is None:
                    buf = self._buffers[ref] = torch.empty(orig.shape, dtype=orig.dtype, device=orig.device)
                ups, downs = [], []
                for up, down, s in per_target[ref]:
                    ups.append((up.to(device=buf.device, dtype=torch.float32) * s).to(buf.dtype))
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
                changed.append(f"{ref[0]}.{ref[1]}")
        self._touched = set(per_target)
        self.applied = key
        return changed
