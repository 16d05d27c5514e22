"""Reference tests for sdcache.kernels: fused ops, pre-packed layers, optimize(), weights_changed().

Tolerances (max abs error <= atol + rtol * |reference|, reference computed in fp32 unless
stated): fp32 1e-4/1e-4 for single ops, 1e-3 relative-L2 through a whole model; bf16
3e-2/2e-2 for single ops, 2e-2 relative-L2 through a whole model (several bf16 roundings).

Triton kernels run under ``TRITON_INTERPRET=1`` in a subprocess (the variable must be set
before Triton is imported), so CI checks them without a GPU; the same cases run compiled on
CUDA in the ``gpu``-marked tests.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ._requirements import import_required, missing

torch = import_required("torch")
import_required("diffusers")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sdcache.kernels import cpu_attention, ops  # noqa: E402
from sdcache.kernels.optimize import describe, optimize, unoptimize, weights_changed  # noqa: E402

HERE = Path(__file__).parent
# Single-op tests run in bf16 too, skipped (with the reason) on CPUs without it; whole-model
# tests use the best dtype this CPU has.
DTYPES = [pytest.param(torch.float32, id="float32"),
          pytest.param(torch.bfloat16, id="bfloat16", marks=pytest.mark.requires("cpu-bf16"))]
MODEL_DTYPE = torch.float32 if missing("cpu-bf16") else torch.bfloat16
OP_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
MODEL_TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = OP_TOL[dtype]
    diff = (out.float() - ref.float()).abs()
    bound = atol + rtol * ref.float().abs()
    assert bool((diff <= bound).all()), f"max err {diff.max().item():.3g} over tolerance ({atol}, {rtol})"


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------- tiny models


def tiny_unet(**overrides) -> nn.Module:
    """SD1.5-shaped UNet (cross-attn down/up blocks, mid block, GEGLU, conv proj_in/out), tiny."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = dict(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    cfg.update(overrides)
    return UNet2DConditionModel(**cfg).eval().requires_grad_(False)


def unet_inputs(dtype: torch.dtype, device: str = "cpu", size: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g).to(device=device, dtype=dtype)
    ctx = torch.randn(2, 7, 32, generator=g).to(device=device, dtype=dtype)
    return x, torch.tensor([10, 700], device=device), ctx


def run_unet(unet: nn.Module, inputs, **kw) -> torch.Tensor:
    with torch.no_grad():
        return unet(*inputs, return_dict=False, **kw)[0]


def tiny_pipeline(tmp_path: Path):
    """A StableDiffusionPipeline built from configs: tiny CLIP text encoder + tokenizer, UNet, VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    vae = AutoencoderKL(
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=tiny_unet(), vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> torch.Tensor:
    out = pipe("a cat", num_inference_steps=2, height=32, width=32, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.images


# ----------------------------------------------------------------------------- Triton kernels


def _triton_cases(device: str) -> list[dict]:
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_interpret_cases.py"), "--device", device],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["cases"]


def _check_cases(cases: list[dict]) -> None:
    assert len(cases) > 20
    bad = [c for c in cases if not (c["ok"] and c["layout_ok"])]
    assert not bad, f"{len(bad)} cases off: {bad[:5]}"
    names = " ".join(c["name"] for c in cases)
    assert "NHWC +temb" in names and "geglu" in names


@pytest.mark.requires("triton-interpret")
def test_triton_kernels_match_torch_under_interpreter() -> None:
    """Fused GroupNorm(+temb)+SiLU and GEGLU Triton kernels, run on CPU by Triton's interpreter."""
    _check_cases(_triton_cases("cpu"))


@pytest.mark.gpu
@pytest.mark.requires("triton-interpret")
def test_triton_kernels_match_torch_on_cuda() -> None:
    _check_cases(_triton_cases("cuda"))


# ----------------------------------------------------------------------------- CPU ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_cpu_matches_reference(dtype: torch.dtype, channels_last: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 32, 9, 7, generator=g) * 2 + 1).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b, temb = torch.randn(32, generator=g), torch.randn(32, generator=g), torch.randn(2, 32, generator=g)
    out = ops.group_norm_silu(x, w.to(dtype), b.to(dtype), 8, 1e-5, temb=temb.to(dtype))
    xr = x.float() + temb.to(dtype).float()[:, :, None, None]
    ref = F.silu(F.group_norm(xr, 8, w.to(dtype).float(), b.to(dtype).float(), 1e-5))
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_and_attention_cpu_match_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 10, 64, generator=g).to(dtype)
    a, gate = h.float().chunk(2, -1)
    assert_close(ops.geglu(h), a * F.gelu(gate), dtype)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=g).to(dtype) for _ in range(3))
    ref = torch.softmax(q.float() @ k.float().transpose(-1, -2) / 4.0, -1) @ v.float()
    assert_close(ops.attention(q, k, v), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [(16, 32, 3, 1, 1, True), (32, 16, 1, 1, 0, True), (16, 24, 3, 2, 1, False)])
def test_packed_conv2d_matches_stock(dtype: torch.dtype, spec) -> None:
    cin, cout, k, stride, pad, bias = spec
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias).to(dtype).requires_grad_(False)
    ref_conv = copy.deepcopy(conv)
    assert ops.attach_conv_site(conv) is not None
    assert isinstance(conv, ops.PackedConv2d) and isinstance(conv, nn.Conv2d)
    for shape in [(2, cin, 12, 12), (1, cin, 9, 14)]:  # a second input shape reuses the packed weight
        x = torch.randn(shape).to(dtype).to(memory_format=torch.channels_last)
        with torch.no_grad():
            assert_close(conv(x), ref_conv(x).float(), dtype)
            other = torch.randn_like(ref_conv(x))
            assert_close(conv.forward_add(x, other), (other + ref_conv(x)).float(), dtype)


@pytest.mark.requires("cpu-bf16")
def test_packed_linear_and_fused_qkv_match_stock() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 40).to(torch.bfloat16).requires_grad_(False)
    ref = copy.deepcopy(lin)
    assert ops.attach_linear_site(lin) is not None
    x = torch.randn(3, 5, 48).to(torch.bfloat16)
    with torch.no_grad():
        assert_close(lin(x), ref(x).float(), torch.bfloat16)
    owner = nn.Module()
    owner.q, owner.k, owner.v = (nn.Linear(48, 40).to(torch.bfloat16) for _ in range(3))
    q, k, v = owner.q, owner.k, owner.v
    site = ops._LinearSite(owner, ["q", "k", "v"])
    site.rebuild()
    with torch.no_grad():
        fused = site.run(x)
        assert_close(fused, torch.cat([q(x), k(x), v(x)], -1).float(), torch.bfloat16)


def test_packed_conv_falls_back_when_autograd_is_needed() -> None:
    """Training-style calls (grad required) take the stock path, so gradients still flow."""
    conv = nn.Conv2d(4, 8, 3, padding=1)
    ops.attach_conv_site(conv)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    conv(x).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


@pytest.mark.parametrize("shape", [
    (2, 8, 1024, 1024, 40),  # SD1.5 self-attention (smaller)
    (1, 2, 100, 77, 40),     # cross-attention length, query tail
    (2, 3, 50, 130, 64),     # key tail inside a 64-block
    (1, 2, 97, 600, 80),     # two key blocks, second partial
    (1, 1, 7, 5, 160),       # widest head supported
])
@pytest.mark.requires("cpu-kernels")
def test_cpu_flash_attention_matches_reference(shape) -> None:
    """The AVX512-BF16 flash kernel vs fp32 attention, at SDPA-bf16's own accuracy."""
    b, h, lq, lk, d = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, lq, d, generator=g).bfloat16()
    k = torch.randn(b, h, lk, d, generator=g).bfloat16()
    v = torch.randn(b, h, lk, d, generator=g).bfloat16()
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = cpu_attention.flash_attention(q, k, v)
    assert out.shape == ref.shape
    err = (out.float() - ref).abs().max().item()
    sdpa_err = (F.scaled_dot_product_attention(q, k, v).float() - ref).abs().max().item()
    assert err <= max(2 * sdpa_err, 1e-2), (err, sdpa_err)
    # Strided views straight out of a fused QKV projection, and a custom scale.
    qkv = torch.randn(b, lq, 3 * h * d, generator=g).bfloat16()
    qs, ks, vs = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in qkv.split(h * d, -1))
    ref2 = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), scale=0.3)
    assert_close(cpu_attention.flash_attention(qs, ks, vs, 0.3), ref2, torch.bfloat16)


@pytest.mark.requires("cpu-kernels")
def test_optimized_unet_with_cpu_flash_attention_matches_stock() -> None:
    """32x32 latents give 1024-token self-attention, which takes the CPU flash kernel."""
    stock = tiny_unet().to(torch.bfloat16)
    opt = copy.deepcopy(stock)
    optimize(opt, compile=False)
    assert ops.cpu_attention.ready()
    inputs = unet_inputs(torch.bfloat16, size=32)
    assert rel_l2(run_unet(opt, inputs), run_unet(stock, inputs)) < MODEL_TOL[torch.bfloat16]


# ----------------------------------------------------------------------------- optimize()


@pytest.mark.parametrize("dtype", DTYPES)
def test_optimize_unet_matches_stock(dtype: torch.dtype) -> None:
    stock = tiny_unet().to(dtype)
    opt = copy.deepcopy(stock)
    optimize(opt, compile=False)
    d = describe(opt)["components"]["UNet2DConditionModel"]
    assert d["optimized"] and not d["compiled"]
    applied = d["applied"]
    assert applied["fused_resnet_groupnorm_silu"] == 8  # 2 down + 2 mid + 3 up... all ResnetBlock2D
    assert applied["fused_geglu"] == 4 and applied["fused_qkv"] == 4 and applied["fused_kv"] == 4
    assert applied["channels_last_transformer_out"] == 4
    assert applied["packed_conv2d"] > 20
    assert d["left_stock"] == {}
    inputs = unet_inputs(dtype)
    ref = run_unet(stock, inputs)
    out = run_unet(opt, inputs)
    assert out.shape == ref.shape
    assert rel_l2(out, ref) < MODEL_TOL[dtype]
    # Module names and parameters are untouched: a LoRA loader still finds its targets.
    assert [n for n, _ in opt.named_parameters()] == [n for n, _ in stock.named_parameters()]
    assert isinstance(opt.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, nn.Linear)


def test_optimize_pipeline_images_match_stock(tmp_path: Path) -> None:
    """The whole txt2img pipeline (tiny, fp32, fixed seed): optimized images equal stock's."""
    pipe = tiny_pipeline(tmp_path)
    ref = generate(pipe)
    opt = optimize(pipe, compile=False)
    assert opt is pipe
    info = describe(pipe)
    assert set(info["components"]) == {"unet", "vae"}
    assert info["components"]["vae"]["applied"]["fused_resnet_groupnorm_silu"] > 0
    assert info["components"]["vae"]["applied"]["sdpa_attention"] == 2  # encoder + decoder mid-block
    out = generate(pipe)
    assert out.shape == ref.shape == (1, 3, 32, 32)
    assert (out - ref).abs().max().item() < 2e-3
    unoptimize(pipe)
    assert type(pipe.unet.down_blocks[0].resnets[0]).__name__ == "ResnetBlock2D"
    assert (generate(pipe) - ref).abs().max().item() < 1e-5


def test_unsupported_modules_stay_stock() -> None:
    """Variants the fused code does not reproduce keep their stock class/processor, and the
    model output still equals stock."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class CustomProcessor(AttnProcessor2_0):
        pass

    stock = tiny_unet(resnet_time_scale_shift="scale_shift")
    attn = stock.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attn.set_processor(CustomProcessor())
    opt = copy.deepcopy(stock)
    optimize(opt, compile=False)
    d = describe(opt)["components"]["UNet2DConditionModel"]
    assert d["left_stock"]["resnet"] == 8 and "fused_resnet_groupnorm_silu" not in d["applied"]
    assert d["left_stock"]["attention"] == 1
    opt_attn = opt.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert type(opt_attn.processor) is CustomProcessor
    assert type(opt.down_blocks[0].resnets[0]).__name__ == "ResnetBlock2D"
    inputs = unet_inputs(torch.float32)
    assert rel_l2(run_unet(opt, inputs), run_unet(stock, inputs)) < MODEL_TOL[torch.float32]


def test_calls_outside_the_fused_path_run_stock_code() -> None:
    """An attention mask is not handled by the fused processor: it must defer to stock."""
    stock = tiny_unet()
    opt = copy.deepcopy(stock)
    optimize(opt, compile=False)
    inputs = unet_inputs(torch.float32)
    mask = torch.ones(2, 7)
    mask[:, 5:] = 0
    ref = run_unet(stock, inputs, encoder_attention_mask=mask)
    out = run_unet(opt, inputs, encoder_attention_mask=mask)
    assert rel_l2(out, ref) < MODEL_TOL[torch.float32]
    assert rel_l2(out, run_unet(stock, inputs)) > 1e-3  # the mask mattered


# ----------------------------------------------------------------------------- weight changes


def _lora_like_edit(model: nn.Module, names: list[str], seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    for n in names:
        w = model.get_submodule(n).weight
        delta = torch.randn(w.shape, generator=g).to(w.dtype) * 0.05 * w.float().std().item()
        w.data.add_(delta)  # invisible to the version counter, like PEFT's merge


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_changed_refreshes_only_touched_layers(dtype: torch.dtype) -> None:
    stock = tiny_unet().to(dtype)
    opt = copy.deepcopy(stock)
    optimize(opt, compile=False)
    inputs = unet_inputs(dtype)
    run_unet(opt, inputs)  # packs lazily on first use
    before = {id(s): s.rebuilds for _, s in ops.iter_sites(opt)}
    names = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "down_blocks.0.resnets.0.conv1",
        "up_blocks.1.attentions.0.proj_out",
    ]
    _lora_like_edit(stock, names)
    _lora_like_edit(opt, names)
    weights_changed(opt, [n + ".weight" if i % 2 else n for i, n in enumerate(names)])
    rebuilt = [s for _, s in ops.iter_sites(opt) if s.rebuilds != before[id(s)]]
    # Exactly the sites fed by the edited layers (fp32 Linear layers have none: not packed).
    assert len(rebuilt) == (len(names) if dtype == torch.bfloat16 else len(names) - 1)
    ref = run_unet(stock, inputs)
    assert rel_l2(run_unet(opt, inputs), ref) < MODEL_TOL[dtype]
    # Restore (LoRA off) the same way and check again.
    stock2 = tiny_unet().to(dtype)
    for n in names:
        opt.get_submodule(n).weight.data.copy_(stock2.get_submodule(n).weight.data)
    weights_changed(opt, names)
    assert rel_l2(run_unet(opt, inputs), run_unet(stock2, inputs)) < MODEL_TOL[dtype]


def test_weight_edits_pytorch_can_see_need_no_call() -> None:
    """copy_() under no_grad and assigning a new Parameter are detected before the next use."""
    dtype = MODEL_DTYPE
    stock = tiny_unet().to(dtype)
    opt = copy.deepcopy(stock)
    optimize(opt, compile=False)
    inputs = unet_inputs(dtype)
    run_unet(opt, inputs)
    name_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    name_c = "down_blocks.0.resnets.0.conv2"
    g = torch.Generator().manual_seed(9)
    new_q = torch.randn(stock.get_submodule(name_q).weight.shape, generator=g).to(dtype) * 0.1
    new_c = torch.randn(stock.get_submodule(name_c).weight.shape, generator=g).to(dtype) * 0.05
    with torch.no_grad():
        stock.get_submodule(name_q).weight.copy_(new_q)
        opt.get_submodule(name_q).weight.copy_(new_q)
    stock.get_submodule(name_c).weight = nn.Parameter(new_c.clone(), requires_grad=False)
    opt.get_submodule(name_c).weight = nn.Parameter(new_c.clone(), requires_grad=False)
    assert rel_l2(run_unet(opt, inputs), run_unet(stock, inputs)) < MODEL_TOL[dtype]


def test_weights_changed_accepts_pipeline_names(tmp_path: Path) -> None:
    pipe = tiny_pipeline(tmp_path)
    optimize(pipe, compile=False)
    ref_before = generate(pipe)
    name = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"
    w = pipe.unet.get_submodule(name.split(".", 1)[1]).weight
    orig = w.detach().clone()
    w.data.mul_(3.0)
    weights_changed(pipe, [name])
    changed = generate(pipe)
    assert (changed - ref_before).abs().max().item() > 1e-4
    w.data.copy_(orig)
    weights_changed(pipe, ["unet"])  # a whole component
    assert (generate(pipe) - ref_before).abs().max().item() < 1e-5
    weights_changed(pipe, ["text_encoder.text_model.encoder.layers.0.mlp.fc1"])  # not optimized: no-op


@pytest.mark.slow
def test_compiled_unet_matches_stock_and_switches_without_recompiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile (inductor) over the optimized UNet: same output, and a LoRA-style switch
    refreshes packed weights without a recompile."""
    import torch._dynamo

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    dtype = MODEL_DTYPE
    torch._dynamo.reset()
    stock = tiny_unet().to(dtype)
    opt = copy.deepcopy(stock)
    optimize(opt, compile=True)
    inputs = unet_inputs(dtype, size=32)  # 1024 tokens: the CPU flash kernel's custom op is in the graph
    assert rel_l2(run_unet(opt, inputs), run_unet(stock, inputs)) < MODEL_TOL[dtype]
    d = describe(opt)["components"]["UNet2DConditionModel"]
    assert d["compiled"] and d["compile_seconds"] > 0
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"]
    _lora_like_edit(stock, names)
    _lora_like_edit(opt, names)
    weights_changed(opt, names)
    assert rel_l2(run_unet(opt, inputs), run_unet(stock, inputs)) < MODEL_TOL[dtype]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_optimize_unet_matches_stock_on_cuda() -> None:
    stock = tiny_unet().to("cuda", torch.float16)
    opt = copy.deepcopy(stock)
    optimize(opt, compile=False)
    inputs = unet_inputs(torch.float16, "cuda")
    assert rel_l2(run_unet(opt, inputs), run_unet(stock, inputs)) < MODEL_TOL[torch.float16]
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    _lora_like_edit(stock, names)
    _lora_like_edit(opt, names)
    weights_changed(opt, names)
    assert rel_l2(run_unet(opt, inputs), run_unet(stock, inputs)) < MODEL_TOL[torch.float16]


def test_preferred_dtype() -> None:
    assert ops.preferred_dtype("cuda") == torch.float16
    assert ops.preferred_dtype("cpu") in (torch.bfloat16, torch.float32)
    assert ops.preferred_dtype("cpu") == (torch.bfloat16 if ops.cpu_has_native_bf16() else torch.float32)


def test_deepcopy_of_optimized_model_owns_its_weights() -> None:
    """A copy of an optimized model re-derives from its own weights, never the original's."""
    dtype = MODEL_DTYPE
    stock = tiny_unet().to(dtype)
    opt = copy.deepcopy(stock)
    optimize(opt, compile=False)
    inputs = unet_inputs(dtype)
    run_unet(opt, inputs)
    twin = copy.deepcopy(opt)
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", "down_blocks.0.resnets.0.conv1"]
    _lora_like_edit(twin, names)
    weights_changed(twin, names)
    edited = copy.deepcopy(stock)
    _lora_like_edit(edited, names)
    assert rel_l2(run_unet(twin, inputs), run_unet(edited, inputs)) < MODEL_TOL[dtype]
    assert rel_l2(run_unet(opt, inputs), run_unet(stock, inputs)) < MODEL_TOL[dtype]
