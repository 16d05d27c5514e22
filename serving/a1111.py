"""AUTOMATIC1111's ``/sdapi/v1`` wire format: request models, samplers, prompts, infotext, errors.

Field names and defaults follow ``modules/api/models.py`` of
AUTOMATIC1111/stable-diffusion-webui (the ``StableDiffusionTxt2ImgProcessingAPI``
and ``...Img2Img...`` models), so an A1111 client's payload parses as it would
there. Where a field is accepted it means what it means in A1111; a field A1111
has but sdcache does not implement is accepted only at its default value, and
any other value is a 422 naming it, never silently ignored. Unknown fields are
ignored, as A1111 does, and listed under ``info.sdcache.ignored_fields``.

Torch-free: the gateway parses requests with this module too.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdcache import errors

# -- samplers -----------------------------------------------------------------------------
#: A1111 sampler name -> (sdcache scheduler, aliases). The diffusers equivalents follow the
#: table in diffusers' scheduler docs ("A1111/k-diffusion -> diffusers").
SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Euler a": ("euler_a", ("k_euler_a", "k_euler_ancestral")),
    "Euler": ("euler", ("k_euler",)),
    "DPM++ 2M": ("dpmpp_2m", ("k_dpmpp_2m",)),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", ("k_dpmpp_2m_sde",)),
    "DPM++ SDE": ("dpmpp_sde", ("k_dpmpp_sde",)),
    "Heun": ("heun", ("k_heun",)),
    "DPM2": ("dpm2", ("k_dpm_2",)),
    "DPM2 a": ("dpm2_a", ("k_dpm_2_a",)),
    "DDIM": ("ddim", ("ddim",)),
    "PLMS": ("pndm", ("plms",)),
    "UniPC": ("unipc", ("unipc",)),
}
#: Before A1111 1.9 the schedule was part of the sampler's name ("DPM++ 2M Karras").
_KARRAS_SAMPLERS = {"Euler", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "Heun", "DPM2", "DPM2 a"}
#: A1111's ``scheduler`` field (the schedule type); "Automatic" is the sampler's own.
SCHEDULE_TYPES = ("Automatic", "Karras")
_ALIASES = {a.lower(): name for name, (_, aliases) in SAMPLERS.items() for a in (name, *aliases)}
_ALIASES.update({f"{n} karras".lower(): f"{n} Karras" for n in _KARRAS_SAMPLERS})


def sampler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: A1111's ``SamplerItem`` shape."""
    return [{"name": n, "aliases": list(a), "options": {"scheduler": "karras"} if n in _KARRAS_SAMPLERS else {}}
            for n, (_, a) in SAMPLERS.items()]


def scheduler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/schedulers``."""
    return [{"name": t.lower(), "label": t, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for t in SCHEDULE_TYPES]


def resolve_sampler(name: str | None, schedule: str | None) -> tuple[str, str, str]:
    """(sampler name as A1111 reports it, schedule type, sdcache scheduler) for a request's fields."""
    sampler = _ALIASES.get((name or "Euler").strip().lower())
    if sampler is None:
        raise errors.InvalidArgument(f"sampler {name!r} is unknown; known: {', '.join(SAMPLERS)}")
    karras = sampler.endswith(" Karras")
    base = sampler.removesuffix(" Karras")
    sched = (schedule or "Automatic").strip()
    if sched.lower() not in {t.lower() for t in SCHEDULE_TYPES}:
        raise errors.InvalidArgument(f"schedule type {schedule!r} is not supported; supported: "
                                     f"{', '.join(SCHEDULE_TYPES)}")
    karras = karras or sched.lower() == "karras"
    if karras and base not in _KARRAS_SAMPLERS:
        raise errors.InvalidArgument(f"sampler {base!r} has no Karras schedule; those that do: "
                                     f"{', '.join(sorted(_KARRAS_SAMPLERS))}")
    key = SAMPLERS[base][0] + ("_karras" if karras else "")
    return base, "Karras" if karras else "Automatic", key


# -- request models -----------------------------------------------------------------------
class _Api(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ProcessingRequest(_Api):
    """The fields txt2img and img2img share, with A1111's defaults."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # deprecated in A1111: sampler_name wins when both are given
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(ProcessingRequest):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(ProcessingRequest):
    init_images: list[Any] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False
    denoising_strength: float | None = 0.75


#: A1111 fields sdcache does not implement, with the values that mean "off" (accepted).
_UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "styles": (None, []),
    "subseed_strength": (0, 0.0),
    "restore_faces": (None, False),
    "tiling": (None, False),
    "refiner_checkpoint": (None, "", "None"),
    "script_name": (None, ""),
    "enable_hr": (False,),
    "mask": (None, ""),
    "save_images": (False,),
}
#: ``override_settings`` keys a request may carry: only these change anything.
OVERRIDABLE = ("sd_model_checkpoint",)


def parse_body(kind: str, body: Any) -> Txt2ImgRequest | Img2ImgRequest:
    """A txt2img/img2img request from a decoded JSON body; :class:`~sdcache.errors.InvalidArgument` when malformed."""
    cls = Txt2ImgRequest if kind == "txt2img" else Img2ImgRequest
    if not isinstance(body, dict):
        raise errors.InvalidArgument(f"{kind}: the body must be a JSON object")
    try:
        req = cls.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise errors.InvalidArgument(f"{kind}: field {where}: {first.get('msg', 'invalid')}{more}") from None
    for name, allowed in _UNSUPPORTED_UNLESS.items():
        value = getattr(req, name, None)
        if name in req.model_fields_set and value not in allowed:
            raise errors.InvalidArgument(f"{kind}: {name}={value!r} is not supported by sdcache serve")
    for name in (req.override_settings or {}):
        if name not in OVERRIDABLE:
            raise errors.InvalidArgument(f"{kind}: override_settings.{name} is not supported (supported: "
                                         f"{', '.join(OVERRIDABLE)})")
    return req


def ignored_fields(req: BaseModel) -> list[str]:
    """Fields of the body that are not A1111 fields (ignored, as A1111 ignores them)."""
    return sorted((req.model_extra or {}).keys())


# -- prompts ------------------------------------------------------------------------------
_LORA = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


@dataclass(frozen=True)
class PromptLora:
    name: str
    weight: float


def split_loras(prompt: str) -> tuple[str, list[PromptLora]]:
    """The prompt without its ``<lora:NAME:WEIGHT>`` tags, and the tags (weight 1 when omitted).

    A1111 removes the tags from the text the model sees and applies each LoRA
    at its weight; a name given twice adds up (as extra networks do).
    """
    found: dict[str, float] = {}
    for m in _LORA.finditer(prompt):
        name, weight = m.group(1).strip(), (m.group(2) or "").strip()
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise errors.InvalidArgument(f"<lora:{name}:{weight}>: the weight must be a number") from None
        found[name] = found.get(name, 0.0) + w
    text = re.sub(r"\s+", " ", _LORA.sub("", prompt)).strip(" ,")
    return text, [PromptLora(n, w) for n, w in found.items()]


# -- images -------------------------------------------------------------------------------
MAX_IMAGE_BYTES = 32 << 20  # a decoded PNG/JPEG we accept; the body bound is set by the server


def decode_image(data: Any, what: str) -> Any:
    """A PIL image from A1111's base64 (bare, or a ``data:image/...;base64,`` URL)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, dict):  # ControlNet units may send {"image": ..., "mask": ...}
        data = data.get("image")
    if not isinstance(data, str) or not data:
        raise errors.InvalidArgument(f"{what}: expected a base64-encoded image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise errors.InvalidArgument(f"{what}: not valid base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise errors.InvalidArgument(f"{what}: {len(raw)} bytes, over the {MAX_IMAGE_BYTES}-byte limit")
    try:
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > 64 << 20:
            raise errors.InvalidArgument(f"{what}: {img.width}x{img.height} is too large")
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise errors.InvalidArgument(f"{what}: not a PNG/JPEG/WebP image") from None
    return img.convert("RGB")


def encode_png(image: Any, infotext: str) -> str:
    """Base64 PNG with the infotext in its ``parameters`` text chunk, as A1111 saves it."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode()


# -- ControlNet units ---------------------------------------------------------------------
@dataclass
class ControlUnit:
    model: str
    image: Any  # decoded PIL image
    weight: float


def controlnet_units(alwayson: dict[str, Any]) -> list[ControlUnit]:
    """The enabled units of ``alwayson_scripts.controlnet.args`` (the key is matched case-insensitively)."""
    script = next((v for k, v in alwayson.items() if k.lower() == "controlnet"), None)
    if not script:
        return []
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise errors.InvalidArgument("alwayson_scripts.controlnet.args must be a list of units")
    units = []
    for i, unit in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(unit, dict):
            raise errors.InvalidArgument(f"{where}: expected an object")
        if not unit.get("enabled", True) or str(unit.get("model", "None")) in ("None", "none", ""):
            continue
        module = str(unit.get("module", "none") or "none")
        if module.lower() not in ("none", "no preprocessor"):
            raise errors.InvalidArgument(f"{where}: preprocessor {module!r} is not supported; send a ready "
                                         "control image with module 'none'")
        for key, default in (("guidance_start", 0.0), ("guidance_end", 1.0)):
            if float(unit.get(key, default)) != default:
                raise errors.InvalidArgument(f"{where}: {key} other than {default} is not supported")
        if str(unit.get("control_mode", "Balanced")) not in ("Balanced", "0"):
            raise errors.InvalidArgument(f"{where}: control_mode {unit.get('control_mode')!r} is not supported "
                                         "(Balanced only)")
        image = unit.get("image") or unit.get("input_image")
        if not image:
            raise errors.InvalidArgument(f"{where}: a ControlNet unit needs an image")
        try:
            weight = float(unit.get("weight", 1.0))
        except (TypeError, ValueError):
            raise errors.InvalidArgument(f"{where}: weight must be a number") from None
        units.append(ControlUnit(str(unit["model"]), decode_image(image, f"{where}.image"), weight))
    if len(units) > 1:
        raise errors.InvalidArgument(f"{len(units)} ControlNet units are enabled; sdcache serve runs one per request")
    return units


# -- infotext -----------------------------------------------------------------------------
@dataclass
class Infotext:
    """What A1111 writes under an image (``create_infotext``), for one image."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    schedule: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model_hash: str
    model_name: str
    denoising_strength: float | None = None
    lora_hashes: dict[str, str] = field(default_factory=dict)
    version: str = ""

    def text(self) -> str:
        params: list[tuple[str, Any]] = [
            ("Steps", self.steps), ("Sampler", self.sampler), ("Schedule type", self.schedule),
            ("CFG scale", f"{self.cfg_scale:g}"), ("Seed", self.seed), ("Size", f"{self.width}x{self.height}"),
            ("Model hash", self.model_hash), ("Model", self.model_name),
        ]
        if self.denoising_strength is not None:
            params.append(("Denoising strength", f"{self.denoising_strength:g}"))
        if self.lora_hashes:
            params.append(("Lora hashes", '"' + ", ".join(f"{n}: {h}" for n, h in self.lora_hashes.items()) + '"'))
        if self.version:
            params.append(("Version", self.version))
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {v}" for k, v in params))
        return "\n".join(lines)


def error_body(exc: BaseException, status: int) -> dict[str, Any]:
    """A1111's error shape (``api_middleware``'s ``handle_exception``)."""
    detail = str(exc) or type(exc).__name__
    name = type(exc).__name__ if isinstance(exc, errors.SdcacheError) else "HTTPException"
    return {"error": name, "detail": detail, "body": "", "errors": detail, "status": status}
