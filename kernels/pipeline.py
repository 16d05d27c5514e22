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
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++"}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
#: Schedulers that take Karras sigmas (``<name>_karras``), as A1111's "Karras" schedule type.
KARRAS = frozenset({"euler", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "heun", "dpm2", "dpm2_a"})


def make_scheduler(name: str, base_config: Mapping[str, Any], prediction_type: str | None = None) -> Any:
    """Scheduler *name* (a key of :data:`SCHEDULER_CLASSES`, ``_karras`` appended for Karras sigmas)."""
    import diffusers

    base, karras = (name[: -len("_karras")], True) if name.endswith("_karras") else (name, False)
    if base not in SCHEDULER_CLASSES or (karras and base not in KARRAS):
        raise errors.InvalidArgument(f"unknown scheduler {name}")
    cls_name, overrides = SCHEDULER_CLASSES[base]
    cfg = {k: v for k, v in base_config.items() if not k.startswith("_")}
    cfg.update(overrides)
    if karras:
        cfg["use_karras_sigmas"] = True
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
    *,
    img2img: bool = False,
) -> "DiffusionPipeline":
    """The family's diffusers pipeline (with ControlNet when given) over *modules*; no safety checker.

    *img2img*: the image-to-image variant of the same class (``StableDiffusionImg2ImgPipeline``, ...).
    """
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
        name = fam.controlnet_pipeline
        kwargs["controlnet"] = controlnet
    else:
        name = fam.pipeline
    if img2img:
        name = name.replace("Pipeline", "Img2ImgPipeline")
    cls = getattr(diffusers, name)
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
