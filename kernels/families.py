"""Model families the runner knows (SD1.x, SD2.x, SDXL) and their shipped configs.

The architecture configs live in ``kernels/configs/<family>/`` as JSON, written
from the published architecture values, so nothing is ever fetched from a hub.
Single-file checkpoints start from these configs; widths and depths are then
read from the checkpoint's tensor shapes (see :mod:`.checkpoint`), which for a
real checkpoint gives back exactly the shipped values.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class Family:
    """One model family: its label, pipeline classes and component configs."""

    name: str
    label: str
    pipeline: str
    controlnet_pipeline: str
    components: dict[str, str]  # component -> class name
    tokenizers: dict[str, dict[str, Any]]  # tokenizer name -> {pad_token, model_max_length}
    head_rule: str  # "fixed": keep attention_head_dim; "dim64": heads = channels // 64
    default_size: int
    configs: dict[str, dict[str, Any]] = field(repr=False, default_factory=dict)

    def config(self, component: str) -> dict[str, Any]:
        """A fresh copy of the shipped config of *component* (``unet``, ``vae``, ``scheduler``...)."""
        return copy.deepcopy(self.configs[component])

    @property
    def is_xl(self) -> bool:
        return self.name == "sdxl"


def _read_json(family: str, name: str) -> dict[str, Any]:
    path = resources.files("sdcache.kernels").joinpath("configs", family, f"{name}.json")
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=None)
def family(name: str) -> Family:
    """The :class:`Family` called *name* (``sd1``, ``sd2`` or ``sdxl``)."""
    if name not in FAMILIES:
        raise KeyError(name)
    p = _read_json(name, "pipeline")
    configs = {c: _read_json(name, c) for c in [*p["components"], "scheduler"]}
    return Family(
        name=name,
        label=p["label"],
        pipeline=p["pipeline"],
        controlnet_pipeline=p["controlnet_pipeline"],
        components=dict(p["components"]),
        tokenizers=dict(p["tokenizers"]),
        head_rule=p["head_rule"],
        default_size=int(p["default_size"]),
        configs=configs,
    )


def label_for_cross_attention_dim(dim: int) -> str | None:
    """The family whose UNet cross-attends to *dim*-wide text features, for real-sized models."""
    return {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(dim)
