"""GPU benchmark: SD1.5 at 512x512 and SDXL at 1024x1024, 20 steps, fp16, optimized vs stock.

Runs in one go on a CUDA machine (sized for one H200): builds each pipeline with random
weights from the real architectures' configs (fixed seed; nothing from a hub; a small
synthetic tokenizer stands in for CLIP's vocabulary, which does not change the cost), then
times, interleaved in the same process:

- ``stock``: diffusers as shipped (``AttnProcessor2_0`` = SDPA), fp16;
- ``optimized``: ``optimize(pipe, compile=False)`` (Triton GroupNorm+SiLU / GEGLU, fused QKV,
  channels-last, SDPA);
- ``optimized+compile``: ``optimize(pipe, compile=True)`` (the same plus inductor), with its
  compile time.

Reports the median end-to-end generation time (text encode + 20 UNet steps + VAE decode),
the median UNet step (CUDA events), the speedup over stock, and the relative difference of
the final latents from stock's. Without CUDA it prints why and exits 0.

Usage: python benchmarks/bench_gpu.py [--models sd15,sdxl] [--runs 3] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": (5, 10, 20), "block_out_channels": (320, 640, 1280),
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": (1, 2, 10),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "use_linear_projection": True,
}
VAE = {
    "act_fn": "silu", "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
             "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}


def _tokenizer(tmp: Path) -> Any:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77)


def _text_config(cfg: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig

    # Real CLIP vocab size, so the embedding table costs what it costs in production.
    return CLIPTextConfig(vocab_size=49408, bos_token_id=0, eos_token_id=1, pad_token_id=1, **cfg)


DEVICE = "cuda"
DTYPE = torch.float16
SMOKE = False

# --smoke-cpu: the same pipelines shrunk to toy widths, to check the code path without a GPU.
_SMOKE_UNET = {"block_out_channels": None, "norm_num_groups": 8, "layers_per_block": 1}
_SMOKE_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
               "projection_dim": 32}
_SMOKE_VAE = {"block_out_channels": (16, 32, 32, 32), "norm_num_groups": 8, "layers_per_block": 1}


def _cfg(base: dict[str, Any], model: str, kind: str) -> dict[str, Any]:
    cfg = dict(base)
    if not SMOKE:
        return cfg
    if kind == "unet":
        cfg.update(_SMOKE_UNET)
        if model == "sd15":
            cfg.update(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32)
        else:
            cfg.update(block_out_channels=(32, 64, 128), attention_head_dim=(2, 4, 8),
                       transformer_layers_per_block=(1, 1, 1), cross_attention_dim=64,
                       addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    elif kind == "vae":
        cfg.update(_SMOKE_VAE)
    else:
        cfg.update(_SMOKE_TEXT)
    return cfg


def build(model: str, tmp: Path) -> Any:
    """A random-weight fp16 pipeline on CUDA with the real architecture of ``model``."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from diffusers.utils import logging as dlog
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    dlog.set_verbosity_error()
    torch.manual_seed(0)
    tok = _tokenizer(tmp)
    with torch.device(DEVICE):  # initialise on the GPU: seconds instead of minutes
        vae_cfg = _cfg(VAE, model, "vae")
        if model == "sd15":
            unet = UNet2DConditionModel(**_cfg(SD15_UNET, model, "unet"))
            vae = AutoencoderKL(**vae_cfg, sample_size=512, scaling_factor=0.18215)
            text = CLIPTextModel(_text_config(_cfg(CLIP_L, model, "text")))
        else:
            unet = UNet2DConditionModel(**_cfg(SDXL_UNET, model, "unet"))
            vae = AutoencoderKL(**vae_cfg, sample_size=1024, scaling_factor=0.13025, force_upcast=False)
            text = CLIPTextModel(_text_config(_cfg(CLIP_L, model, "text")))
            text2 = CLIPTextModelWithProjection(_text_config(_cfg(CLIP_BIGG, model, "text")))
    sched_kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if model == "sd15":
        pipe = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
            scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **sched_kw),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            unet=unet, vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok, tokenizer_2=tok,
            scheduler=EulerDiscreteScheduler(**sched_kw),
        )
    pipe.to(DEVICE, DTYPE)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class UNetTimer:
    """CUDA-event timing of every UNet call, via forward hooks (outside any compiled region)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.pairs: list[tuple[Any, Any]] = []
        self._start: Any = None
        unet.register_forward_pre_hook(self._pre)
        unet.register_forward_hook(self._post)

    def _event(self) -> Any:
        if DEVICE == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _pre(self, *_: Any) -> None:
        self._start = self._event()

    def _post(self, *_: Any) -> None:
        self.pairs.append((self._start, self._event()))

    def take_ms(self) -> list[float]:
        _sync()
        if DEVICE == "cuda":
            out = [s.elapsed_time(e) for s, e in self.pairs]
        else:
            out = [(e - s) * 1e3 for s, e in self.pairs]
        self.pairs.clear()
        return out


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def generate(pipe: Any, size: int, steps: int) -> tuple[float, torch.Tensor]:
    _sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        latents = pipe("a photo of a cat", num_inference_steps=steps, height=size, width=size,
                       generator=torch.Generator(DEVICE).manual_seed(0), output_type="latent").images
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    _sync()
    del image
    return time.perf_counter() - t0, latents.float()


def bench_model(model: str, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    from sdcache.kernels.optimize import describe, optimize

    size = args.size or (512 if model == "sd15" else 1024)
    t0 = time.perf_counter()
    stock = build(model, tmp)
    print(f"[{model}] built in {time.perf_counter() - t0:.0f} s", flush=True)
    variants: dict[str, Any] = {"stock (SDPA)": stock}
    opt = copy.deepcopy(stock)
    optimize(opt, compile=False)
    variants["optimized"] = opt
    if not args.no_compile:
        optc = copy.deepcopy(stock)
        optimize(optc, compile=True)
        variants["optimized+compile"] = optc
    timers = {name: UNetTimer(p.unet) for name, p in variants.items()}

    first: dict[str, float] = {}
    ref_latents: torch.Tensor | None = None
    errs: dict[str, float] = {}
    for name, p in variants.items():
        first[name], lat = generate(p, size, args.steps)
        timers[name].take_ms()
        if ref_latents is None:
            ref_latents = lat
        errs[name] = ((lat - ref_latents).norm() / ref_latents.norm().clamp_min(1e-12)).item()
        print(f"[{model}] first run {name}: {first[name]:.1f} s", flush=True)
    e2e: dict[str, list[float]] = {n: [] for n in variants}
    step_ms: dict[str, list[float]] = {n: [] for n in variants}
    for i in range(args.runs):
        for name, p in variants.items():
            t, _ = generate(p, size, args.steps)
            e2e[name].append(t)
            step_ms[name].extend(timers[name].take_ms())
        print(f"[{model}] run {i + 1}/{args.runs}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in e2e.items()),
              flush=True)
    rows = []
    base_e2e = statistics.median(e2e["stock (SDPA)"])
    base_step = statistics.median(step_ms["stock (SDPA)"])
    for name, p in variants.items():
        d = describe(p)["components"].get("unet", {})
        rows.append({
            "model": model, "size": size, "variant": name,
            "e2e_s": statistics.median(e2e[name]), "e2e_speedup": base_e2e / statistics.median(e2e[name]),
            "step_ms": statistics.median(step_ms[name]), "step_speedup": base_step / statistics.median(step_ms[name]),
            "compile_s": d.get("compile_seconds"), "latent_rel_err": errs[name],
        })
    del variants, stock, opt
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--runs", type=int, default=3, help="timed generations per variant (median)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="check this script's code path on CPU in fp32 (not a benchmark)")
    args = ap.parse_args()
    if args.smoke_cpu:
        global DEVICE, DTYPE, SMOKE
        DEVICE, DTYPE, SMOKE = "cpu", torch.float32, True
        print("smoke run on CPU (fp32): exercises the code path only; the figures mean nothing")
    elif not torch.cuda.is_available():
        print("CUDA is not available on this machine: GPU benchmark skipped.")
        return 0
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed: GPU benchmark skipped.")
        return 0
    if DEVICE == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            if model not in ("sd15", "sdxl"):
                print(f"unknown model {model!r} (use sd15, sdxl)", file=sys.stderr)
                return 2
            rows.extend(bench_model(model, args, Path(tmp)))
    print()
    print(f"{str(DTYPE)[6:]}, {args.steps} steps, median of {args.runs} interleaved runs; e2e = encode + denoise + VAE decode")
    hdr = (f"{'model':<6} {'size':>5} {'variant':<18} {'e2e s':>7} {'speedup':>8} {'UNet step ms':>13} "
           f"{'speedup':>8} {'compile s':>10} {'latent err':>11}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        comp = f"{r['compile_s']:.0f}" if r["compile_s"] else "-"
        print(f"{r['model']:<6} {r['size']:>5} {r['variant']:<18} {r['e2e_s']:>7.2f} {r['e2e_speedup']:>7.2f}x "
              f"{r['step_ms']:>13.1f} {r['step_speedup']:>7.2f}x {comp:>10} {r['latent_rel_err']:>11.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
