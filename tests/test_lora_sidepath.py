"""Unmerged LoRAs (side paths): same outputs as merging, exact switches, the merge rule, the optimized path.

Tiny SD1.x / SDXL models from :mod:`tests.runner_models` (fixed seeds, no hub).
A LoRA here covers every module kohya trains (attention, feed-forward,
proj_in/proj_out), the text encoders, and -- where a test says so -- LoCon
factors on the resnets' 3x3 convolutions, so every call site the optimized
pipeline has is exercised: a plain module call, the fused Q/K/V GEMM, and the
packed convolution with its residual add fused in.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

from ._requirements import import_required  # noqa: E402

torch = import_required("torch")
import_required("diffusers")

from sdcache.kernels import lora, lora_paths  # noqa: E402
from sdcache.kernels.optimize import optimize, weights_changed  # noqa: E402
from sdcache.kernels.request import LoraRef, Request  # noqa: E402
from sdcache.kernels.runner import Runner  # noqa: E402

from . import runner_models as rm  # noqa: E402

#: Side-path vs merged outputs: the same sums in another order (fp32; bf16 rounds each GEMM).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
DTYPES = [pytest.param(torch.float32, id="fp32"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.requires("cpu-bf16"))]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def locon(comps: dict[str, Any], seed: int, rank: int = 4, std: float = 0.05) -> dict[str, torch.Tensor]:
    """kohya LoCon factors for every 3x3 resnet conv of the tiny UNet (down: the layer's kernel, up: 1x1)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, m in comps["unet"].named_modules():
        if isinstance(m, torch.nn.Conv2d) and ".resnets." in name and name.endswith(("conv1", "conv2")):
            stem = "lora_unet_" + name.replace(".", "_")
            w = m.weight
            sd[f"{stem}.lora_down.weight"] = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * std
            sd[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], rank, 1, 1, generator=g) * std
            sd[f"{stem}.alpha"] = torch.tensor(float(rank))
    return sd


class Model:
    """A tiny base model's components with two resolved LoRAs (A, B) and a way to run them."""

    def __init__(self, fam: str, dtype: torch.dtype = torch.float32, conv: bool = True) -> None:
        comps = rm.build_tiny(fam, 0)
        for c in ("unet", "text_encoder", "text_encoder_2"):
            if c in comps:
                comps[c] = comps[c].to(dtype).requires_grad_(False)
        self.fam, self.dtype, self.comps = fam, dtype, comps
        self.mods = {c: comps[c] for c in ("unet", "text_encoder", "text_encoder_2") if c in comps}
        index = lora.target_index(self.mods, fam == "sdxl")
        label = "SDXL" if fam == "sdxl" else "SD1.x"

        def make(url: str, seed: int) -> lora.ResolvedLora:
            sd = rm.kohya_lora(fam, comps, seed=seed, std=0.1)
            if conv:
                sd.update(locon(comps, seed + 100))
            return lora.resolve(lora.parse_lora(url, sd), self.mods, index, label, fam)

        self.a, self.b = make("A", 11), make("B", 12)
        g = torch.Generator().manual_seed(3)
        unet = comps["unet"]
        ctx_dim = unet.config.cross_attention_dim
        self.x = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
        self.ctx = torch.randn(2, 77, ctx_dim, generator=g).to(dtype)
        self.ids = torch.randint(0, 49408, (1, 77), generator=g)
        self.added = None
        if fam == "sdxl":
            self.added = {"text_embeds": torch.randn(2, 32, generator=g).to(dtype),
                          "time_ids": torch.randn(2, 6, generator=g).to(dtype)}

    def unet_out(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.comps["unet"](self.x, torch.tensor([10, 10]), self.ctx,
                                      added_cond_kwargs=self.added).sample.float()

    def te_out(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.comps["text_encoder"](self.ids)[0].float()

    def outs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.unet_out(), self.te_out()

    def optimize(self) -> None:
        optimize(self.comps["unet"])

    def switch(self, p: lora.LoraPatcher, loras: list[tuple[lora.ResolvedLora, float]]) -> list[str]:
        """``p.switch(loras)`` and, as the runner does, re-pack what the switch rewrote."""
        changed = p.switch(loras)
        weights_changed(self.comps["unet"], [n[len("unet."):] for n in p.weights_edited if n.startswith("unet.")])
        return changed


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def weights_of(mods: dict[str, Any]) -> dict[str, int]:
    return {f"{c}.{k}": v.data_ptr() for c, m in mods.items() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------ outputs and exactness


@pytest.mark.parametrize("optimized", [False, True], ids=["stock", "optimized"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_side_paths_give_the_merged_output(dtype: torch.dtype, optimized: bool) -> None:
    """UNet (attention, feed-forward, 1x1 and 3x3 convs) and text encoder: side paths == merged, in tolerance."""
    m = Model("sd1", dtype)
    if optimized:
        m.optimize()
    base = m.outs()
    side, merged = lora.LoraPatcher(m.mods, merge_after=None), lora.LoraPatcher(m.mods, merge_after=1)
    m.switch(side, [(m.a, 0.7), (m.b, 0.5)])
    assert side.mode == "side" and side.weights_edited == []
    got = m.outs()
    m.switch(side, [])
    m.switch(merged, [(m.a, 0.7), (m.b, 0.5)])
    assert merged.mode == "merged"
    want = m.outs()
    m.switch(merged, [])
    for g, w, b in zip(got, want, base):
        assert rel(w, b) > 0.05  # the LoRAs matter
        assert rel(g, w) < REL_TOL[dtype], rel(g, w)


@pytest.mark.parametrize("merge_after", [None, 1], ids=["side", "merged"])
@pytest.mark.parametrize("optimized", [False, True], ids=["stock", "optimized"])
def test_a_then_b_equals_b_alone_and_removal_restores_the_base(optimized: bool, merge_after: int | None) -> None:
    m = Model("sd1")
    if optimized:
        m.optimize()
    base = m.outs()
    p = lora.LoraPatcher(m.mods, merge_after=merge_after)
    m.switch(p, [(m.b, 0.8)])
    b_alone = m.outs()
    m.switch(p, [])
    assert all(torch.equal(x, y) for x, y in zip(m.outs(), base))
    m.switch(p, [(m.a, 1.0)])
    m.outs()
    m.switch(p, [(m.a, 1.0), (m.b, 0.3)])
    m.switch(p, [(m.b, 0.8)])
    assert all(torch.equal(x, y) for x, y in zip(m.outs(), b_alone))
    m.switch(p, [])
    assert all(torch.equal(x, y) for x, y in zip(m.outs(), base))


def test_a_side_path_switch_writes_no_weight_and_repacks_nothing() -> None:
    m = Model("sd1")
    m.optimize()
    m.unet_out()  # pack everything for the real input shape
    from sdcache.kernels import ops

    rebuilds = {k: s.rebuilds for k, s in ops.iter_sites(m.comps["unet"])}
    before = weights_of(m.mods)
    p = lora.LoraPatcher(m.mods)
    for loras in ([(m.a, 1.0)], [(m.b, 1.0)], [(m.a, 0.5), (m.b, 0.5)], []):
        assert m.switch(p, loras)  # every module the sets touch is reported changed
        assert p.weights_edited == []
        m.unet_out()
    assert weights_of(m.mods) == before
    assert {k: s.rebuilds for k, s in ops.iter_sites(m.comps["unet"])} == rebuilds
    assert p.extra_nbytes == 0  # fp32 factors on a fp32 CPU model are the LoRA file's own tensors


def test_side_paths_follow_an_optimize_that_runs_after_the_switch() -> None:
    """The runner's first request switches LoRAs before it assembles and optimizes the pipeline."""
    m = Model("sd1")
    ref = copy.deepcopy(m)
    p, p_ref = lora.LoraPatcher(m.mods, merge_after=None), lora.LoraPatcher(ref.mods, merge_after=1)
    m.switch(p, [(m.a, 1.0)])
    p_ref.switch([(ref.a, 1.0)])
    m.optimize()
    assert rel(m.unet_out(), ref.unet_out()) < 1e-5
    m.switch(p, [])
    p_ref.switch([])
    assert rel(m.unet_out(), ref.unet_out()) < 1e-5


# ------------------------------------------------------------------ the merge rule


def test_the_kth_request_with_the_same_set_merges_and_stays_exact() -> None:
    m = Model("sd1")
    m.optimize()
    base = m.outs()
    probe = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    p = lora.LoraPatcher(m.mods, merge_after=3)
    w0 = p.original(probe).data_ptr()
    side_outs = []
    for _ in range(2):  # requests 1 and 2: side paths, weights untouched
        m.switch(p, [(m.b, 0.8)])
        assert p.mode == "side" and p._param(probe).data_ptr() == w0
        side_outs.append(m.outs())
    changed = m.switch(p, [(m.b, 0.8)])  # request 3: merged
    assert p.mode == "merged" and changed and p.weights_edited
    assert p._param(probe).data_ptr() != w0
    merged_out = m.outs()
    for s, w in zip(side_outs[0], merged_out):
        assert rel(s, w) < 1e-5
    assert m.switch(p, [(m.b, 0.8)]) == []  # request 4: nothing to do
    # a merged B reached through A is B merged alone, bit for bit
    fresh = Model("sd1")
    fresh.optimize()
    q = lora.LoraPatcher(fresh.mods, merge_after=1)
    fresh.switch(q, [(fresh.b, 0.8)])
    assert all(torch.equal(x, y) for x, y in zip(fresh.outs(), merged_out))
    # leaving a merged set: back on side paths, originals handed back
    m.switch(p, [(m.a, 1.0)])
    assert p.mode == "side" and p._param(probe).data_ptr() == w0
    m.switch(p, [])
    assert all(torch.equal(x, y) for x, y in zip(m.outs(), base))


def test_modules_side_paths_cannot_cover_are_merged() -> None:
    """A grouped convolution merges while the rest of the set runs on side paths; a stated reason merges all."""
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2).requires_grad_(False)
    lin = torch.nn.Linear(8, 6).requires_grad_(False)
    mods = {"unet": torch.nn.ModuleDict({"conv": conv, "lin": lin})}
    g = torch.Generator().manual_seed(0)
    targets = {
        ("unet", "conv"): (torch.randn(8, 2, generator=g), torch.randn(2, 36, generator=g), 1.0),
        ("unet", "lin"): (torch.randn(6, 2, generator=g), torch.randn(2, 8, generator=g), 0.5),
    }
    r = lora.ResolvedLora("X", targets, 2, 2, 0)
    x, y = torch.randn(1, 8, 5, 5, generator=g), torch.randn(3, 8, generator=g)
    w0 = conv.weight.detach().clone()
    p = lora.LoraPatcher(mods, merge_after=None)
    assert "grouped" in (p.side_path_reason(("unet", "conv")) or "")
    p.switch([(r, 1.0)])
    assert p.mode == "mixed" and p.weights_edited == ["unet.conv"]
    up, down, _ = targets[("unet", "conv")]
    want = torch.nn.functional.conv2d(x, w0 + (up @ down).view_as(w0), conv.bias, padding=1, groups=2)
    torch.testing.assert_close(conv(x), want)
    up, down, _ = targets[("unet", "lin")]
    torch.testing.assert_close(lin(y), y @ (lin.weight + 0.5 * up @ down).T + lin.bias)
    p.switch([])
    p.merge_reason = "the optimized pipeline is torch.compile'd"
    p.switch([(r, 1.0)])
    assert p.mode == "merged"
    p.switch([])
    assert not lora_paths.paths_of(lin) and p.mode == ""


# ------------------------------------------------------------------ through the runner


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> rm.TinyModels:
    return rm.tiny_models(tmp_path_factory.getbasetemp() / "runner-models")


def pixels(res: Any) -> np.ndarray:
    return np.asarray(res.image).astype(np.int16)


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_runner_switches_on_side_paths_then_merges_a_repeated_set(models: rm.TinyModels, fam: str) -> None:
    a_url = str(models.sd1_lora_a if fam == "sd1" else models.sdxl_lora)
    b_url = str(models.sd1_lora_peft if fam == "sd1" else models.sdxl_lora_peft)
    model = str(models.sd1_file if fam == "sd1" else models.sdxl_file)

    def req(*loras: LoraRef) -> Request:
        return Request(model=model, prompt="a cat", steps=2, size=(64, 64), seed=1, loras=list(loras))

    a, b = LoraRef(a_url, 1.0), LoraRef(b_url, 0.8)
    r = Runner(device="cpu", optimize=True)
    base = r.run(req())
    bundle = r.loaded(model)
    assert bundle is not None
    w0 = weights_of(bundle.modules)
    r.run(req(a))
    assert bundle.patcher.mode == "side"
    b_side = r.run(req(b))
    assert bundle.patcher.mode == "side" and weights_of(bundle.modules) == w0
    fresh = Runner(device="cpu", optimize=True)
    assert np.array_equal(pixels(fresh.run(req(b))), pixels(b_side))  # A then B == B alone
    assert np.abs(pixels(b_side) - pixels(base)).mean() > 1.0
    # the same set again: the merge rule (lora.MERGE_AFTER) merges it
    for _ in range(lora.MERGE_AFTER - 1):
        b_merged = r.run(req(b))
    assert bundle.patcher.mode == "merged" and weights_of(bundle.modules) != w0
    assert np.abs(pixels(b_merged) - pixels(b_side)).max() <= 2  # float rounding only
    back = r.run(req())
    assert bundle.patcher.mode == "" and weights_of(bundle.modules) == w0
    assert np.array_equal(pixels(back), pixels(base))
