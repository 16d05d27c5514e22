"""UNet step time of the real SD1.5 architecture on this CPU: optimized vs stock diffusers.

Random weights (fixed seed, built from the config below -- nothing from a hub), 512x512
(latents 64x64), batch 2 (classifier-free guidance), bf16 when the CPU has native bf16
(else fp32), the same dtype for every variant. All variants live in the same process and
their steps are interleaved, so background load hits them alike; the median step is reported.

Variants: stock diffusers (SDPA processor, default memory format); ``optimize(compile=False)``
(channels-last, pre-packed oneDNN weights, fused QKV/GEGLU/GroupNorm+SiLU); and, unless
``--no-compile``, ``optimize(compile=True)`` (the same plus inductor), with its compile time,
and -- unless ``--no-warm-compile`` -- the compile time of a fresh process that finds the
inductor cache warm. For each optimized variant it also times ``weights_changed`` after a
LoRA-sized in-place edit (rank-16 deltas on every transformer-block linear plus proj_in/out,
192 modules on SD1.5) and checks the output still matches stock with the same edit.

Usage: python benchmarks/bench_unet_cpu.py [--steps 5] [--no-compile] [--no-warm-compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}


def build_unet(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False)
    return unet.to(dtype)


def make_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 64, 64, generator=g).to(dtype)
    text = torch.randn(2, 77, 768, generator=g).to(dtype)
    return sample, torch.tensor([500, 500]), text


def lora_module_names(unet: torch.nn.Module) -> list[str]:
    """The layers a typical (kohya-style) SD1.5 LoRA touches: transformer linears + proj_in/out."""
    names = []
    for name, m in unet.named_modules():
        if ".transformer_blocks." in name and isinstance(m, torch.nn.Linear):
            names.append(name)
        elif name.endswith(("proj_in", "proj_out")) and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            names.append(name)
    return names


def lora_deltas(unet: torch.nn.Module, names: list[str], rank: int = 16, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        w = unet.get_submodule(n).weight
        o, i = w.shape[0], w[0].numel()
        delta = (torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g)) * (0.02 / rank)
        out[n] = delta.reshape(w.shape).to(w.dtype)
    return out


def apply_deltas(unet: torch.nn.Module, deltas: dict[str, torch.Tensor], sign: float = 1.0) -> None:
    """In-place ``weight.data += delta`` -- the edit PyTorch's version counter cannot see."""
    for n, d in deltas.items():
        w = unet.get_submodule(n).weight
        w.data.add_(d, alpha=sign)


def step(unet: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = unet(*inputs, return_dict=False)[0]
    return time.perf_counter() - t0, out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def compile_only(dtype_name: str) -> None:
    """Child-process mode: build, optimize(compile=True), report first-call (compile) time."""
    from sdcache.kernels.optimize import describe, optimize

    dtype = getattr(torch, dtype_name)
    unet = build_unet(dtype)
    optimize(unet, compile=True)
    inputs = make_inputs(dtype)
    t_first, _ = step(unet, inputs)
    t_next, _ = step(unet, inputs)
    comp = describe(unet)["components"]["UNet2DConditionModel"]
    print(json.dumps({"first_call_s": t_first, "next_step_s": t_next, "compile_s": comp["compile_seconds"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="measured steps per variant (median reported)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--no-warm-compile", action="store_true", help="skip the warm-cache compile in a new process")
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--cache-dir", help="inductor cache directory (default: a fresh temporary one, so the "
                    "first compile is cold and the child process's is warm)")
    ap.add_argument("--compile-only", metavar="DTYPE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_only:
        compile_only(args.compile_only)
        return
    tmp_cache = None
    if not args.no_compile:
        if args.cache_dir is None:
            tmp_cache = args.cache_dir = tempfile.mkdtemp(prefix="sdcache-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir
    try:
        run(args)
    finally:
        if tmp_cache is not None:
            shutil.rmtree(tmp_cache, ignore_errors=True)


def run(args: argparse.Namespace) -> None:

    from sdcache.kernels import ops
    from sdcache.kernels.optimize import describe, optimize, weights_changed

    dtype = ops.preferred_dtype("cpu") if args.dtype == "auto" else getattr(torch, args.dtype)
    load0 = os.getloadavg()[0]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 {ops.cpu_has_native_bf16()}, dtype {str(dtype).replace('torch.', '')}", flush=True)
    t0 = time.perf_counter()
    stock = build_unet(dtype)
    print(f"built SD1.5 UNet ({sum(p.numel() for p in stock.parameters()) / 1e6:.0f} M params) "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    inputs = make_inputs(dtype)

    variants: dict[str, torch.nn.Module] = {"stock diffusers": stock}
    if not args.no_compile:
        # Optimized first, so its layer keys match those of the warm-cache child process.
        optc = copy.deepcopy(stock)
        optimize(optc, compile=True)
    opt = copy.deepcopy(stock)
    t0 = time.perf_counter()
    optimize(opt, compile=False)
    opt_setup = time.perf_counter() - t0
    variants["optimized (eager)"] = opt
    if not args.no_compile:
        variants["optimized + compile"] = optc

    # Warm-up (and compile) each variant once; check agreement with stock.
    first: dict[str, float] = {}
    outs: dict[str, torch.Tensor] = {}
    for name, m in variants.items():
        first[name], outs[name] = step(m, inputs)
        print(f"first call {name}: {first[name]:.1f} s", flush=True)
    errs = {name: rel_err(outs[name], outs["stock diffusers"]) for name in variants}

    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.steps):
        for name, m in variants.items():
            times[name].append(step(m, inputs)[0])
        print(f"round {i + 1}/{args.steps}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    best = {n: min(t) for n, t in times.items()}

    # LoRA-sized switch: edit weights in place (through .data), tell the optimizer, re-run.
    names = lora_module_names(stock)
    deltas = lora_deltas(stock, names)
    apply_deltas(stock, deltas)
    _, ref_after = step(stock, inputs)
    switch: dict[str, dict[str, float]] = {}
    for name, m in variants.items():
        if name == "stock diffusers":
            continue
        t_apply0 = time.perf_counter()
        apply_deltas(m, deltas)
        t_apply = time.perf_counter() - t_apply0
        t_wc0 = time.perf_counter()
        weights_changed(m, names)
        t_wc = time.perf_counter() - t_wc0
        t_after, out_after = step(m, inputs)
        switch[name] = {
            "apply_s": t_apply, "weights_changed_s": t_wc, "step_after_s": t_after,
            "rel_err_after": rel_err(out_after, ref_after),
        }

    comp: dict[str, float | None] = {}
    for name, m in variants.items():
        d = describe(m)["components"].get("UNet2DConditionModel", {})
        # The first compiled call also runs one step; count only the compilation.
        comp[name] = max(0.0, first[name] - med[name]) if d.get("compiled") else None
    warm = None
    if not args.no_compile and not args.no_warm_compile:
        env = dict(os.environ)
        proc = subprocess.run(
            [sys.executable, __file__, "--compile-only", str(dtype).replace("torch.", ""),
             "--threads", str(torch.get_num_threads())],
            capture_output=True, text=True, env=env, check=False,
        )
        try:
            warm = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            print("warm-compile child failed:", proc.stderr[-2000:], file=sys.stderr)

    base = med["stock diffusers"]
    print()
    print(f"SD1.5 UNet, 512x512 (latents 64x64), batch 2, {str(dtype).replace('torch.', '')}, "
          f"{args.steps} interleaved steps; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    hdr = (f"{'variant':<22} {'median s':>8} {'speedup':>8} {'min s':>7} {'speedup':>8} {'rel err':>8} "
           f"{'compile s':>10} {'switch ms':>10} {'err after':>10}")
    print(hdr)
    print("-" * len(hdr))
    for name in variants:
        c = comp.get(name)
        sw = switch.get(name)
        c_txt = f"{c:.0f}" if c else "-"
        sw_txt = f"{sw['weights_changed_s'] * 1e3:.0f}" if sw else "-"
        err_txt = f"{sw['rel_err_after']:.1e}" if sw else "-"
        print(f"{name:<22} {med[name]:>8.2f} {base / med[name]:>7.2f}x {best[name]:>7.2f} "
              f"{best['stock diffusers'] / best[name]:>7.2f}x {errs[name]:>8.1e} "
              f"{c_txt:>10} {sw_txt:>10} {err_txt:>10}")
    print()
    print(f"optimize() setup (eager): {opt_setup:.1f} s; LoRA-sized switch = {len(names)} modules "
          f"(weights_changed re-packs just those)")
    for name, sw in switch.items():
        print(f"  {name}: in-place edit {sw['apply_s'] * 1e3:.0f} ms, weights_changed {sw['weights_changed_s'] * 1e3:.0f} ms, "
              f"first step after switch {sw['step_after_s']:.2f} s")
    if warm is not None:
        print(f"compile in a new process with a warm inductor cache: "
              f"{max(0.0, warm['first_call_s'] - warm['next_step_s']):.0f} s "
              f"(first call {warm['first_call_s']:.0f} s, next step {warm['next_step_s']:.2f} s)")
    for name, m in variants.items():
        d = describe(m)["components"].get("UNet2DConditionModel")
        if d and d.get("optimized"):
            print(f"  {name}: applied {d['applied']}, left stock {d['left_stock']}, "
                  f"derived weights {d['derived_weight_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
