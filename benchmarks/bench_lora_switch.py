"""LoRA switch: sdcache's side paths vs its merge vs diffusers, and what side paths cost per step.

The real SD1.5 UNet architecture (the shipped config, 859.5M parameters) with
random weights, fp32 on the CPU, and two random rank-32 kohya LoRAs over every
module kohya trains on SD1.5 (attention q/k/v/out, feed-forward,
proj_in/proj_out: 192 modules) plus, with ``--conv``, LoCon factors on every
ResnetBlock2D's 3x3 ``conv1``/``conv2`` (44 more), both already in RAM. One
switch = take LoRA A off, put LoRA B on.

* (a) sdcache side paths: ``LoraPatcher.switch`` (what the runner does between
  requests that change the set): the modules' references to their low-rank
  factors are swapped, no weight is written.
* (b) sdcache merged: the same call with ``merge_after=1`` (the behaviour before
  side paths, and what the merge rule falls back to): ``W = W0 + s * up @ down``
  written from the kept original into a reused buffer.
* (c) diffusers: ``unfuse_lora`` + ``unload_lora_weights`` + ``load_lora_weights``
  (from the in-RAM state dict) + ``fuse_lora``, the documented way to switch
  fused LoRAs (needs ``peft``).
* serving path: the same UNet after ``optimize()`` (packed convolutions, fused
  Q/K/V): (a) vs (b) followed by ``weights_changed`` (the re-pack a merge needs),
  and the cost of merging the applied set in place of its side paths and of
  leaving a merged set, which is what the merge rule weighs.
* (d) one denoising step of the optimized UNet (``--latent 32``: 256x256 images,
  batch 2 for CFG) with no LoRA, with the LoRA on side paths and merged.

Every comparison is measured in the same run, methods interleaved round by
round (the host is shared: medians, and the load average before and after).

Run: ``python benchmarks/bench_lora_switch.py [--repeats 7] [--step-repeats 5] [--conv]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _common import load_average, machine, table  # noqa: E402
from sdcache.kernels import lora  # noqa: E402
from sdcache.kernels.components import empty_module  # noqa: E402
from sdcache.kernels.families import family  # noqa: E402

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
CONV_TARGETS = ("conv1", "conv2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_unet(dtype: torch.dtype) -> torch.nn.Module:
    """The SD1.5 UNet with random weights (no checkpoint needed), built without a slow init."""
    unet = empty_module("UNet2DConditionModel", family("sd1").config("unet"))
    unet = unet.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return unet.eval().requires_grad_(False)


def kohya_lora(unet: torch.nn.Module, seed: int, rank: int = 32, alpha: float = 16.0,
               conv: bool = True) -> dict[str, torch.Tensor]:
    """A random kohya LoRA: ``TARGETS`` (1x1 factors on SD1's conv proj_in/out), LoCon on resnet convs."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        is_conv = conv and isinstance(m, torch.nn.Conv2d) and ".resnets." in name and name.endswith(CONV_TARGETS)
        if not (name.endswith(TARGETS) or is_conv):
            continue
        stem = "lora_unet_" + name.replace(".", "_")
        w = m.weight
        kernel = tuple(w.shape[2:]) if is_conv else ((1, 1) if w.ndim == 4 else ())
        up_k = (1, 1) if w.ndim == 4 else ()
        sd[f"{stem}.lora_down.weight"] = torch.randn(rank, w.shape[1], *kernel, generator=g) * 0.01
        sd[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], rank, *up_k, generator=g) * 0.01
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    return sd


def timed(fn: Any, cpu: list[float] | None = None) -> float:
    """Wall seconds of fn(); its process CPU seconds are appended to *cpu* (less sensitive to a busy host)."""
    c = time.process_time()
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return wall


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="switches timed per method (after one warm-up)")
    ap.add_argument("--step-repeats", type=int, default=6, help="denoising steps timed per variant")
    ap.add_argument("--latent", type=int, default=32, help="latent side of the denoising step (32: 256x256)")
    ap.add_argument("--steps", type=int, default=20, help="steps per request, for the merge rule's arithmetic")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--conv", action="store_true", help="LoCon factors on the resnets' 3x3 convs too (more RAM)")
    ap.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    load_before = load_average()
    started = datetime.now(timezone.utc)

    t = time.perf_counter()
    unet = random_unet(dtype)
    n_params = sum(p.numel() for p in unet.parameters())
    sd_a, sd_b = (kohya_lora(unet, s, args.rank, conv=args.conv) for s in (1, 2))
    n_mod = len(sd_a) // 3
    print(f"# SD1.5 UNet {n_params / 1e6:.1f}M params, {args.dtype}, cpu, {torch.get_num_threads()} threads; "
          f"2 kohya LoRAs rank {args.rank} x {n_mod} modules{' (LoCon on resnet convs)' if args.conv else ''} "
          f"(built in {time.perf_counter() - t:.1f}s); {machine()}; load {load_before}", flush=True)

    mods = {"unet": unet}
    index = lora.target_index(mods, xl=False)
    ra = lora.resolve(lora.parse_lora("A", sd_a), mods, index, "SD1.x", "sd1")
    rb = lora.resolve(lora.parse_lora("B", sd_b), mods, index, "SD1.x", "sd1")
    side = lora.LoraPatcher(mods, merge_after=None)
    merged = lora.LoraPatcher(mods, merge_after=1)

    exact = exactness(unet, side, merged, ra, rb)
    print(f"# exactness: {exact}", flush=True)

    # ---- switch timings on the stock UNet, the three methods interleaved
    pipe = diffusers_pipeline(unet) if args.diffusers and have_peft() else None
    times: dict[str, list[float]] = {"side": [], "merged": [], "diffusers": []}
    times_cpu: dict[str, list[float]] = {k: [] for k in times}
    warm: list[float] = []
    for i in range(args.repeats + 1):
        old, new = (ra, rb) if i % 2 == 0 else (rb, ra)
        tc: dict[str, list[float]] = times_cpu if i else {k: warm for k in times}
        side.switch([(old, 1.0)])
        s = timed(lambda new=new: side.switch([(new, 1.0)]), tc["side"])
        side.switch([])
        merged.switch([(old, 1.0)])
        m = timed(lambda new=new: merged.switch([(new, 1.0)]), tc["merged"])
        merged.switch([])
        d = None
        if pipe is not None:
            sd_old, sd_new = (sd_a, sd_b) if i % 2 == 0 else (sd_b, sd_a)
            load(pipe, sd_old)
            d = timed(lambda sd_new=sd_new: switch(pipe, sd_new), tc["diffusers"])
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
            gc.collect()
        if i:  # the first round warms caches (and allocates the merge buffers)
            times["side"].append(s)
            times["merged"].append(m)
            if d is not None:
                times["diffusers"].append(d)
    if pipe is not None:
        del pipe
        gc.collect()

    # ---- the serving path: the optimized UNet
    from sdcache.kernels.optimize import optimize, weights_changed

    optimize(unet)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, args.latent, args.latent, generator=g, dtype=dtype)
    ctx = torch.randn(2, 77, 768, generator=g, dtype=dtype)
    tstep = torch.tensor([500, 500])

    def step() -> None:
        with torch.inference_mode():
            unet(lat, tstep, ctx)

    def repack(p: lora.LoraPatcher) -> None:
        """What the runner does after a switch: re-pack the layers whose weights it rewrote."""
        weights_changed(unet, [n[len("unet."):] for n in p.weights_edited])

    def merged_switch(new: Any) -> None:
        merged.switch([(new, 1.0)])
        repack(merged)

    # a fresh patcher (optimize() gave the 3x3 convs new channels-last weight tensors), one set of
    # merge buffers for both merged measurements
    del merged
    gc.collect()
    merged = lora.LoraPatcher(mods, merge_after=1)
    opt: dict[str, list[float]] = {"side": [], "merged+repack": [], "merge in place of side": [],
                                   "leave merged (restore+repack)": []}
    opt_cpu: dict[str, list[float]] = {k: [] for k in opt}
    scratch: list[float] = []
    for i in range(args.repeats + 1):
        old, new = (ra, rb) if i % 2 == 0 else (rb, ra)
        side.switch([(old, 1.0)])
        cpu_of: dict[str, list[float]] = opt_cpu if i else {k: scratch for k in opt}
        s = timed(lambda new=new: side.switch([(new, 1.0)]), cpu_of["side"])
        side.switch([])
        merged_switch(old)
        m = timed(lambda new=new: merged_switch(new), cpu_of["merged+repack"])
        merged.switch([])
        repack(merged)
        # the rule's two costs: the K-th request merging its set, and the next change leaving it
        merged.merge_after = 2
        merged.switch([(new, 1.0)])  # a new set: side paths
        into = timed(lambda new=new: (merged.switch([(new, 1.0)]), repack(merged)), cpu_of["merge in place of side"])
        assert merged.mode == "merged"
        out = timed(lambda: (merged.switch([]), repack(merged)), cpu_of["leave merged (restore+repack)"])
        merged.merge_after = 1
        if i:
            opt["side"].append(s)
            opt["merged+repack"].append(m)
            opt["merge in place of side"].append(into)
            opt["leave merged (restore+repack)"].append(out)

    # ---- (d) denoising step: base, side paths, merged, interleaved in rotating order
    variants = {
        "no LoRA": lambda: None,
        "LoRA B on side paths": lambda: side.switch([(rb, 1.0)]),
        "LoRA B merged": lambda: merged_switch(rb),
    }

    def clear() -> None:
        side.switch([])
        merged.switch([])
        repack(merged)

    steps: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for i in range(args.step_repeats + 1):
        for k in names[i % 3:] + names[: i % 3]:
            clear()
            variants[k]()
            c = time.process_time()
            step_s = timed(step)
            if i:
                steps[k].append(step_s)
                cpu[k].append(time.process_time() - c)
    clear()
    load_after = load_average()

    # ---- report
    labels = {"side": "(a) sdcache side paths (`LoraPatcher.switch`)",
              "merged": "(b) sdcache merged (`merge_after=1`)",
              "diffusers": "(c) diffusers unfuse+unload+load_lora_weights+fuse"}
    rows = [(labels[k], ms(med(v)), ms(min(v)), ms(med(times_cpu[k])), f"{med(v) / med(times['side']):.0f}x (a)")
            for k, v in times.items() if v]
    print(table(f"one switch A -> B, stock UNet ({args.repeats} interleaved rounds)", rows,
                ("method", "median", "best", "median CPU", "vs (a)")))
    rows = [(k, ms(med(v)), ms(min(v)), ms(med(opt_cpu[k])), f"{med(v) / med(opt['side']):.0f}x (a)")
            for k, v in opt.items()]
    print(table(f"the serving path: optimize()d UNet ({args.repeats} interleaved rounds)", rows,
                ("what", "median", "best", "median CPU", "vs side switch")))
    base_cpu = med(cpu["no LoRA"])
    side_k, merged_k = "LoRA B on side paths", "LoRA B merged"
    # paired: each round's ratio to the same round's merged step (the load changes slowly)
    paired = {k: med([c / m for c, m in zip(cpu[k], cpu[merged_k])]) for k in cpu}
    rows = [(k, f"{med(v):.3f} s", f"{min(v):.3f} s", f"{med(cpu[k]):.3f} s", f"{med(cpu[k]) / base_cpu:.3f}x",
             f"{paired[k]:.3f}x") for k, v in steps.items()]
    print(table(f"(d) one denoising step, optimize()d UNet, latents {args.latent}x{args.latent}, batch 2, "
                f"{torch.get_num_threads()} threads ({args.step_repeats} interleaved rounds)", rows,
                ("variant", "median wall", "best wall", "median CPU", "CPU vs no LoRA", "CPU vs merged, paired")))
    # the rule's arithmetic in CPU seconds: on a shared host wall time also counts the time others ran
    frac = paired[side_k] - 1.0
    merge_cost = med(opt_cpu["merge in place of side"]) + med(opt_cpu["leave merged (restore+repack)"])
    if frac <= 0:
        print(f"\nmerge rule: no measurable side-path cost per step in this run ({frac:+.1%}); merging in and out "
              f"costs {ms(merge_cost)} CPU (lora.MERGE_AFTER = {lora.MERGE_AFTER})")
    else:
        extra = frac * med(cpu[merged_k])
        per_request = extra * args.steps
        print(f"\nmerge rule (CPU seconds): side paths cost {frac:.1%} ({ms(extra)}) more per step than merged, "
              f"{ms(per_request)} per {args.steps}-step request; merging in and out costs {ms(merge_cost)}: "
              f"break-even after {merge_cost / per_request:.2f} requests "
              f"({merge_cost / extra:.1f} steps; lora.MERGE_AFTER = {lora.MERGE_AFTER})")
    print(f"merge buffers {merged.extra_nbytes / 2**30:.2f} GiB; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    print(f"started {started:%Y-%m-%d %H:%M} UTC; load average before {load_before}, after {load_after}")
    return 0


def exactness(unet: torch.nn.Module, side: lora.LoraPatcher, merged: lora.LoraPatcher,
              ra: lora.ResolvedLora, rb: lora.ResolvedLora) -> str:
    """Outputs after A then B vs B alone, and after removal vs the base, in each mode (small input)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=unet.dtype)
    ctx = torch.randn(1, 77, 768, generator=g, dtype=unet.dtype)

    def out() -> torch.Tensor:
        with torch.inference_mode():
            return unet(x, torch.tensor([10]), ctx).sample

    base = out()
    report = []
    side_b = None
    for name, p in (("side", side), ("merged", merged)):
        p.switch([(rb, 1.0)])
        b_alone = out()
        p.switch([(ra, 1.0)])
        p.switch([(rb, 1.0)])
        a_then_b = torch.equal(out(), b_alone)
        p.switch([])
        restored = torch.equal(out(), base)
        if side_b is None:
            side_b = b_alone
        report.append(f"{name}: A-then-B == B alone {a_then_b}, removal restores base {restored}")
    assert side_b is not None
    merged.switch([(rb, 1.0)])
    diff = float((out() - side_b).abs().max())
    merged.switch([])
    report.append(f"max |side - merged| = {diff:.1e} (outputs ~{float(base.abs().mean()):.2f})")
    return "; ".join(report)


def have_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        print("diffusers baseline skipped: it needs peft (pip install peft)", file=sys.stderr)
        return False
    return True


def load(pipe: Any, sd: dict[str, torch.Tensor]) -> None:
    pipe.load_lora_weights(dict(sd), adapter_name="x")  # a copy: diffusers pops keys while converting
    pipe.fuse_lora(lora_scale=1.0)


def switch(pipe: Any, sd: dict[str, torch.Tensor]) -> None:
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    load(pipe, sd)


def diffusers_pipeline(unet: torch.nn.Module) -> Any:
    """A stock pipeline around the same UNet (a tiny text encoder and VAE complete it)."""
    import diffusers
    from sdcache.kernels.tokenizer import clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=1,
                                      num_hidden_layers=1, vocab_size=49408))
    vae = diffusers.AutoencoderKL(block_out_channels=[32], down_block_types=["DownEncoderBlock2D"],
                                  up_block_types=["UpDecoderBlock2D"], layers_per_block=1)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


if __name__ == "__main__":
    sys.exit(main())
