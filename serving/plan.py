"""From an A1111 request to what must run: the models it names, its sizes, seeds and limits.

Torch-free and shared: ``serve`` turns a plan into a runner request, the
gateway turns the same plan into a routing :class:`~sdcache.routing.Demand`
(so both agree on which base model, LoRAs and ControlNet a request needs).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from sdcache import errors, routing

from . import a1111
from .catalog import Catalog, Model


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``serve`` flags); over a limit is a 4xx naming it."""

    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter
    max_batch: int = 8
    max_pixels: int = 2048 * 2048
    max_loras: int = 8


@dataclass
class Plan:
    kind: str  # txt2img or img2img
    body: a1111.ProcessingRequest
    checkpoint: Model
    loras: list[tuple[Model, float]]
    controlnet: tuple[Model, a1111.ControlUnit | None] | None
    prompt: str  # without its <lora:...> tags
    negative_prompt: str
    sampler: str
    schedule: str
    scheduler: str  # the sdcache scheduler key
    seed: int
    width: int
    height: int
    steps: int
    batch_size: int
    n_iter: int
    strength: float | None
    init_image: Any = None
    ignored: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.batch_size * self.n_iter)]

    def demand(self) -> routing.Demand:
        """What the router weighs: the components and the work."""
        return routing.Demand(
            routing.Component(self.checkpoint.url, "base", self.checkpoint.size),
            loras=tuple(routing.Component(m.url, "lora", m.size) for m, _ in self.loras),
            controlnet=routing.Component(self.controlnet[0].url, "controlnet", self.controlnet[0].size)
            if self.controlnet else None,
            steps=self.steps if self.strength is None else max(1, int(self.steps * self.strength)),
            width=self.width, height=self.height, batch=self.batch_size * self.n_iter,
        )


def make_plan(kind: str, body: Any, catalog: Catalog, default_checkpoint: str | None, limits: Limits,
              *, decode: bool = True) -> Plan:
    """Check and resolve one request. *decode*: decode its images (``serve``; the gateway need not)."""
    req = a1111.parse_body(kind, body)
    ignored = a1111.ignored_fields(req)
    ignored += [n for n in ("eta", "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise")
                if getattr(req, n) not in (None, 0, 0.0, 1.0) or (n == "s_noise" and getattr(req, n) not in (None, 1.0))]
    name = (req.override_settings or {}).get("sd_model_checkpoint") or default_checkpoint
    if not name:
        raise errors.InvalidArgument("no model: send override_settings.sd_model_checkpoint or set "
                                     "sd_model_checkpoint with POST /sdapi/v1/options")
    checkpoint = catalog.find("checkpoint", str(name))
    prompt, tags = a1111.split_loras(req.prompt)
    neg_text, neg_tags = a1111.split_loras(req.negative_prompt)
    if neg_tags:
        raise errors.InvalidArgument("<lora:...> in the negative prompt is not supported")
    if req.disable_extra_networks:
        tags = []
    if len(tags) > limits.max_loras:
        raise errors.InvalidArgument(f"{len(tags)} LoRAs in one prompt; the limit is {limits.max_loras}")
    loras = [(catalog.find("lora", t.name), t.weight) for t in tags]
    units = a1111.controlnet_units(req.alwayson_scripts) if decode else _units_without_images(req.alwayson_scripts)
    controlnet = None
    if units:
        controlnet = (catalog.find("controlnet", units[0].model), units[0] if decode else None)
    sampler, schedule, scheduler = a1111.resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
    width, height = req.width, req.height
    init_image = None
    strength: float | None = None
    if kind == "img2img":
        assert isinstance(req, a1111.Img2ImgRequest)
        if not req.init_images:
            raise errors.InvalidArgument("img2img needs init_images (one base64 image)")
        if len(req.init_images) > 1:
            raise errors.InvalidArgument(f"{len(req.init_images)} init_images; sdcache serve uses one per request")
        if req.resize_mode not in (0,):
            raise errors.InvalidArgument(f"resize_mode {req.resize_mode} is not supported (0: just resize)")
        strength = 0.75 if req.denoising_strength is None else float(req.denoising_strength)
        if not 0.0 < strength <= 1.0:
            raise errors.InvalidArgument(f"denoising_strength {strength}: must be within (0, 1]")
        if decode:
            init_image = a1111.decode_image(req.init_images[0], "init_images[0]")
    _check_limits(req, width, height, limits)
    seed = req.seed if req.seed is not None and req.seed >= 0 else secrets.randbits(31)
    return Plan(kind, req, checkpoint, loras, controlnet, prompt, neg_text, sampler, schedule,
                scheduler, seed, width, height, req.steps, req.batch_size, req.n_iter, strength, init_image,
                ignored)


def _units_without_images(alwayson: dict[str, Any]) -> list[a1111.ControlUnit]:
    script = next((v for k, v in alwayson.items() if k.lower() == "controlnet"), None)
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        return []
    return [a1111.ControlUnit(str(u["model"]), None, float(u.get("weight", 1.0))) for u in args
            if isinstance(u, dict) and u.get("enabled", True) and str(u.get("model", "None")) not in ("None", "")][:1]


def _check_limits(req: a1111.ProcessingRequest, width: int, height: int, limits: Limits) -> None:
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise errors.InvalidArgument(f"size {width}x{height}: width and height must be positive multiples of 8")
    if width * height > limits.max_pixels:
        raise errors.InvalidArgument(f"size {width}x{height} is over the limit of {limits.max_pixels} pixels")
    if not 1 <= req.steps <= limits.max_steps:
        raise errors.InvalidArgument(f"steps {req.steps}: must be within 1..{limits.max_steps}")
    if not 1 <= req.batch_size <= limits.max_batch:
        raise errors.InvalidArgument(f"batch_size {req.batch_size}: must be within 1..{limits.max_batch}")
    if req.n_iter < 1 or req.batch_size * req.n_iter > limits.max_images:
        raise errors.InvalidArgument(f"batch_size x n_iter = {req.batch_size * req.n_iter} images: must be within "
                                     f"1..{limits.max_images}")
    if not 0.0 <= req.cfg_scale <= 30.0:
        raise errors.InvalidArgument(f"cfg_scale {req.cfg_scale}: must be within 0..30")
