"""LoRA switch: sdcache's in-place patcher vs diffusers load_lora_weights + fuse_lora + unfuse_lora.

The real SD1.5 UNet architecture (the shipped config, 859.5M parameters) with
random weights, and two random rank-32 kohya LoRAs over every module kohya
trains on SD1.5 (attention q/k/v/out, feed-forward, proj_in/proj_out: 192
modules), both already in RAM. One switch = take LoRA A off, put LoRA B on.

* sdcache: ``LoraPatcher.switch`` (what the runner does between requests):
  ``W = W0 + s * up @ down`` written from the kept original into a reused
  buffer; exact (after A then B, bitwise equal to B alone).
* diffusers: ``unfuse_lora`` + ``unload_lora_weights`` + ``load_lora_weights``
  (from the in-RAM state dict) + ``fuse_lora``, the documented way to switch
  fused LoRAs; needs ``peft``.

Run: ``python benchmarks/bench_lora_switch.py [--repeats 5] [--dtype fp32]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
from sdcache.kernels import lora  # noqa: E402
from sdcache.kernels.components import empty_module  # noqa: E402
from sdcache.kernels.families import family  # noqa: E402

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
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


def kohya_lora(unet: torch.nn.Module, seed: int, rank: int = 32, alpha: float = 16.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(TARGETS):
            continue
        stem = "lora_unet_" + name.replace(".", "_")
        w = m.weight
        extra = (1, 1) if w.ndim == 4 else ()
        sd[f"{stem}.lora_down.weight"] = torch.randn(rank, w.shape[1], *extra, generator=g) * 0.01
        sd[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], rank, *extra, generator=g) * 0.01
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    return sd


CPU_TIMES: dict[str, list[float]] = {"ours": [], "theirs": []}


def timed(fn: Any, cpu: list[float] | None = None) -> float:
    """Wall seconds of fn(); its process CPU seconds are appended to *cpu* (less sensitive to a busy host)."""
    c = time.process_time()
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="switches timed per method (after one warm-up)")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both methods (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]

    t = time.perf_counter()
    unet = random_unet(dtype)
    n_params = sum(p.numel() for p in unet.parameters())
    sd_a, sd_b = kohya_lora(unet, 1, args.rank), kohya_lora(unet, 2, args.rank)
    n_mod = len(sd_a) // 3
    print(f"# SD1.5 UNet {n_params / 1e6:.1f}M params, {args.dtype}, cpu, {torch.get_num_threads()} threads; "
          f"2 kohya LoRAs rank {args.rank} x {n_mod} modules (built in {time.perf_counter() - t:.1f}s)",
          flush=True)
    probe = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w_base = unet.get_submodule(probe).weight.detach().clone()

    # ---- sdcache: exactness first (before diffusers ever touches the weights)
    mods = {"unet": unet}
    index = lora.target_index(mods, xl=False)
    ra = lora.resolve(lora.parse_lora("A", sd_a), mods, index, "SD1.x", "sd1")
    rb = lora.resolve(lora.parse_lora("B", sd_b), mods, index, "SD1.x", "sd1")
    patcher = lora.LoraPatcher(mods)
    first_apply = timed(lambda: patcher.switch([(ra, 1.0)]))  # allocates the working buffers once
    patcher.switch([(rb, 1.0)])
    w_b_after_a = unet.get_submodule(probe).weight.detach().clone()
    remove = timed(lambda: patcher.switch([]))
    restored = torch.equal(unet.get_submodule(probe).weight, w_base)
    patcher.switch([(rb, 1.0)])
    b_alone = torch.equal(unet.get_submodule(probe).weight, w_b_after_a)
    patcher.switch([])
    print(f"# sdcache: first apply {first_apply:.3f}s (allocates buffers), remove {remove:.3f}s, "
          f"restore exact: {restored}, A-then-B == B alone: {b_alone}", flush=True)

    # ---- timing, interleaved so both see the same background load
    have_peft = True
    try:
        import peft  # noqa: F401
    except ImportError:
        have_peft = False
        print("diffusers baseline skipped: it needs peft (pip install peft)", file=sys.stderr)
    pipe = diffusers_pipeline(unet) if have_peft else None
    ours: list[float] = []
    theirs: list[float] = []
    for i in range(args.repeats):
        old, new = (ra, rb) if i % 2 == 0 else (rb, ra)
        patcher.switch([(old, 1.0)])
        ours.append(timed(lambda new=new: patcher.switch([(new, 1.0)]), CPU_TIMES["ours"]))
        patcher.switch([])
        if pipe is not None:
            sd_old, sd_new = (sd_a, sd_b) if i % 2 == 0 else (sd_b, sd_a)
            load(pipe, sd_old)
            theirs.append(timed(lambda sd_new=sd_new: switch(pipe, sd_new), CPU_TIMES["theirs"]))
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
            gc.collect()
    theirs_err = float((unet.get_submodule(probe).weight.float() - w_base.float()).abs().max())

    med = statistics.median
    print()
    print(f"{'method (one switch: A off, B on)':<48}{'median s':>9}{'min s':>8}{'max s':>8}{'cpu s':>8}"
          "  weights after removal")
    print(f"{'sdcache LoraPatcher.switch':<48}{med(ours):>9.3f}{min(ours):>8.3f}{max(ours):>8.3f}"
          f"{med(CPU_TIMES['ours']):>8.3f}  {'bitwise exact' if restored else 'NOT exact'}")
    if theirs:
        print(f"{'diffusers unfuse+unload+load_lora_weights+fuse':<48}{med(theirs):>9.3f}{min(theirs):>8.3f}"
              f"{max(theirs):>8.3f}{med(CPU_TIMES['theirs']):>8.3f}  max |W - W0| = {theirs_err:.2e}")
        print(f"speedup: {med(theirs) / med(ours):.1f}x wall median, {min(theirs) / min(ours):.1f}x wall best-of, "
              f"{med(CPU_TIMES['theirs']) / med(CPU_TIMES['ours']):.1f}x CPU time")
    return 0


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
