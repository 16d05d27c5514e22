"""One image request: what the user asked for, checked before anything is loaded.

Torch-free on purpose: ``sdcache run`` rejects a bad size, a ControlNet
without a control image or an unknown scheduler in milliseconds, before torch
and diffusers are even imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from sdcache import errors

SCHEDULERS = ("euler", "euler_a", "dpmpp_2m", "ddim", "dpmpp_2m_sde", "dpmpp_sde", "heun", "dpm2", "dpm2_a", "unipc",
              "pndm")
#: Those with a Karras-sigmas variant, named ``<scheduler>_karras`` (kept in step with kernels/pipeline.py).
KARRAS_SCHEDULERS = ("euler", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "heun", "dpm2", "dpm2_a")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bf16", "fp16", "fp32")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")


@dataclass(frozen=True)
class LoraRef:
    """A LoRA to apply: its URL and strength."""

    url: str
    scale: float = 1.0


@dataclass
class Request:
    """Everything one image needs. Field names match the ``sdcache run`` flags and the JSONL keys."""

    model: str
    prompt: str
    negative_prompt: str = ""
    loras: list[LoraRef] = field(default_factory=list)
    controlnet: str | None = None
    control_image: Any = None  # a path or URL (``sdcache run``), or an image already decoded (PIL, ``serve``)
    controlnet_scale: float = 1.0
    steps: int = 20
    guidance: float = 7.5
    size: tuple[int, int] | None = None  # (width, height); None: the family's native size
    seed: int | None = None
    scheduler: str = "euler"
    prediction_type: str = "auto"
    out: str | None = None
    init_image: Any = None  # img2img: the decoded start image (PIL); None for txt2img
    strength: float = 0.75  # img2img: how much of the schedule re-noises the start image (A1111's denoising_strength)
    batch_size: int = 1  # images made together, seeds seed, seed+1, ... (A1111's batch_size)

    def validate(self) -> None:
        """Raise :class:`~sdcache.errors.InvalidArgument` (one line) for a request that cannot run."""
        if not self.model:
            raise errors.InvalidArgument("--model is required")
        if self.size is not None:
            w, h = self.size
            if w <= 0 or h <= 0 or w % 8 or h % 8:
                raise errors.InvalidArgument(f"--size {w}x{h}: width and height must be positive multiples of 8")
        if self.steps < 1:
            raise errors.InvalidArgument(f"--steps {self.steps}: needs at least 1 step")
        base = self.scheduler.removesuffix("_karras")
        if base not in SCHEDULERS or (base != self.scheduler and base not in KARRAS_SCHEDULERS):
            raise errors.InvalidArgument(f"--scheduler {self.scheduler}: choose one of {', '.join(SCHEDULERS)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise errors.InvalidArgument(
                f"--prediction-type {self.prediction_type}: choose one of {', '.join(PREDICTION_TYPES)}"
            )
        if self.controlnet and self.control_image is None:
            raise errors.InvalidArgument(f"--controlnet {self.controlnet} needs --control-image PNG")
        if self.control_image is not None and not self.controlnet:
            raise errors.InvalidArgument("--control-image given without --controlnet")
        if self.init_image is not None and not 0.0 < self.strength <= 1.0:
            raise errors.InvalidArgument(f"denoising strength {self.strength}: must be within (0, 1]")
        if self.batch_size < 1:
            raise errors.InvalidArgument(f"batch size {self.batch_size}: needs at least 1 image")
        if isinstance(self.control_image, str) and "://" not in self.control_image:
            import os

            if not os.path.isfile(self.control_image):
                raise errors.NotFound(f"control image not found: {self.control_image}")

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}  # not asdict: it would deep-copy images
        for key in ("init_image", "control_image"):
            if d[key] is not None and not isinstance(d[key], str):
                d[key] = "<image>"
        d["loras"] = [f"{lo.url}:{lo.scale:g}" for lo in self.loras]
        d["size"] = f"{self.size[0]}x{self.size[1]}" if self.size else None
        return d


def parse_size(text: str) -> tuple[int, int]:
    """``"768x512"`` -> ``(768, 512)`` (width, height); a single number means a square."""
    t = str(text).lower().strip()
    try:
        if "x" in t:
            w, h = t.split("x", 1)
            return int(w), int(h)
        return int(t), int(t)
    except ValueError:
        raise errors.InvalidArgument(f"--size {text}: expected WIDTHxHEIGHT, e.g. 512x768") from None


def parse_lora(text: str) -> LoraRef:
    """``URL[:SCALE]``; the scale is split off only when the tail is a number (URLs have colons)."""
    head, sep, tail = str(text).rpartition(":")
    if sep and head and not head.endswith(("sdcache", "s3", "http", "https", "file", "gs", "memory")):
        try:
            return LoraRef(head, float(tail))
        except ValueError:
            pass
    return LoraRef(str(text), 1.0)


_KEYS = {
    "model", "prompt", "negative_prompt", "lora", "loras", "controlnet", "control_image", "controlnet_scale",
    "steps", "guidance", "size", "seed", "scheduler", "prediction_type", "out",
}


def request_from_json(obj: Any, where: str = "request", defaults: dict[str, Any] | None = None) -> Request:
    """A :class:`Request` from one JSONL line's object (same keys as the flags, ``-`` as ``_``).

    *defaults* (already-parsed :class:`Request` fields, e.g. from command-line
    flags) fill the keys the line does not give.
    """
    if not isinstance(obj, dict):
        raise errors.InvalidArgument(f"{where}: expected a JSON object")
    obj = {str(k).replace("-", "_"): v for k, v in obj.items()}
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise errors.InvalidArgument(f"{where}: unknown field(s) {', '.join(unknown)}")
    fields: dict[str, Any] = dict(defaults or {})
    try:
        for key in ("model", "prompt", "negative_prompt", "controlnet", "control_image", "scheduler",
                    "prediction_type", "out"):
            if obj.get(key) is not None:
                fields[key] = str(obj[key])
        for key, conv in (("controlnet_scale", float), ("steps", int), ("guidance", float), ("seed", int)):
            if obj.get(key) is not None:
                fields[key] = conv(obj[key])
        if obj.get("size"):
            fields["size"] = parse_size(obj["size"])
        if "loras" in obj or "lora" in obj:
            raw = obj.get("loras", obj.get("lora")) or []
            if isinstance(raw, (str, dict)):
                raw = [raw]
            fields["loras"] = [
                LoraRef(str(lo["url"]), float(lo.get("scale", 1.0))) if isinstance(lo, dict) else parse_lora(str(lo))
                for lo in raw
            ]
    except (TypeError, ValueError, KeyError) as exc:
        if isinstance(exc, errors.SdcacheError):
            raise
        raise errors.InvalidArgument(f"{where}: {exc}") from None
    if not fields.get("model") or fields.get("prompt") is None:
        raise errors.InvalidArgument(f"{where}: 'model' and 'prompt' are required")
    return Request(**fields)


def read_requests(path: str, defaults: dict[str, Any] | None = None) -> list[tuple[int, Request | errors.SdcacheError]]:
    """Every request of a JSONL file, by line number; a bad line yields its error instead."""
    out: list[tuple[int, Request | errors.SdcacheError]] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise errors.NotFound(f"requests file not found: {path}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            out.append((i, request_from_json(json.loads(line), f"{path}:{i}", defaults)))
        except json.JSONDecodeError as exc:
            out.append((i, errors.InvalidArgument(f"{path}:{i}: not JSON ({exc.msg})")))
        except errors.SdcacheError as exc:
            out.append((i, exc))
    return out
