"""Stock diffusers pipelines assembled from already-built components, and the schedulers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdcache import errors

from .families import Family

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

SCHEDULER_CLASSES = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIMScheduler", {}),
}


def make_scheduler(name: str, base_config: Mapping[str, Any], prediction_type: str | None = None) -> Any:
    """Scheduler *name* (``euler``, ``euler_a``, ``dpmpp_2m``, ``ddim``) on the model's noise schedule."""
    import diffusers

    if name not in SCHEDULER_CLASSES:
        raise errors.InvalidArgument(f"unknown scheduler {name}")
    cls_name, overrides = SCHEDULER_CLASSES[name]
    cfg = {k: v for k, v in base_config.items() if not k.startswith("_")}
    cfg.update(overrides)
    if prediction_type:
        cfg["prediction_type"] = prediction_type
    return getattr(diffusers, cls_name).from_config(cfg)


def assemble(
    fam: Family,
    modules: Mapping[str, Any],
    tokenizers: Mapping[str, Any],
    scheduler: Any,
    controlnet: Any | None = None,
    pipeline_kwargs: Mapping[str, Any] | None = None,
) -> "DiffusionPipeline":
    """The family's diffusers pipeline (with ControlNet when given) over *modules*; no safety checker."""
    import diffusers

    kwargs: dict[str, Any] = {
        "vae": modules["vae"],
        "text_encoder": modules["text_encoder"],
        "tokenizer": tokenizers["tokenizer"],
        "unet": modules["unet"],
        "scheduler": scheduler,
    }
    if fam.is_xl:
        kwargs.update(text_encoder_2=modules["text_encoder_2"], tokenizer_2=tokenizers["tokenizer_2"],
                      add_watermarker=False)
        kwargs.update(pipeline_kwargs or {})
    else:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if controlnet is not None:
        cls = getattr(diffusers, fam.controlnet_pipeline)
        kwargs["controlnet"] = controlnet
    else:
        cls = getattr(diffusers, fam.pipeline)
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
