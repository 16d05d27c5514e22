"""The inference runner on tiny SD1.x / SDXL models: images, LoRA switching, ControlNet, tiers, errors.

In-process (one torch import for the whole module); ``test_runner_cli.py``
covers the command line in subprocesses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

from ._requirements import import_required  # noqa: E402

torch = import_required("torch")
import_required("diffusers")

from sdcache.kernels.request import LoraRef, Request  # noqa: E402
from sdcache.kernels.runner import Runner  # noqa: E402

from sdcache import errors  # noqa: E402

from .runner_models import TinyModels, tiny_models  # noqa: E402

SIZE = (64, 64)
STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """Tiny models run fastest on one thread (and a shared 2-core host punishes spinning OpenMP threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return tiny_models(tmp_path_factory.getbasetemp() / "runner-models")


def req(model: Path | str, **kw: object) -> Request:
    kw.setdefault("prompt", "a photo of a cat")
    kw.setdefault("steps", STEPS)
    kw.setdefault("size", SIZE)
    kw.setdefault("seed", 1)
    return Request(model=str(model), **kw)  # type: ignore[arg-type]


def pixels(res: object) -> "np.ndarray":
    return np.asarray(res.image).astype(np.int16)  # type: ignore[attr-defined]


def weights(runner: Runner, model: Path) -> dict[str, "torch.Tensor"]:
    bundle = runner.loaded(str(model))
    assert bundle is not None
    return {f"{c}.{k}": v.clone() for c, mod in bundle.modules.items() for k, v in mod.state_dict().items()}


def assert_same_weights(a: dict[str, "torch.Tensor"], b: dict[str, "torch.Tensor"]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def stock(m: TinyModels) -> Runner:
    """One reference runner (stock diffusers path) shared by the read-only tests."""
    return Runner(device="cpu", optimize=False, device_budget=1 << 40)


# ------------------------------------------------------------------ images


def test_same_seed_same_image_and_other_seed_differs(m: TinyModels, stock: Runner) -> None:
    a = stock.run(req(m.sd1_file, seed=5))
    b = stock.run(req(m.sd1_file, seed=5))
    c = stock.run(req(m.sd1_file, seed=6))
    assert a.image.size == SIZE
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 1.0


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_single_file_and_folder_give_the_same_image(m: TinyModels, stock: Runner, fam: str) -> None:
    f = stock.run(req(getattr(m, f"{fam}_file")))
    d = stock.run(req(getattr(m, f"{fam}_folder")))
    assert f.family == d.family == ("SDXL" if fam == "sdxl" else "SD1.x")
    # same weights; only float rounding from differently aligned buffers may differ
    assert np.abs(pixels(f) - pixels(d)).max() <= 2


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_optimized_matches_no_optimize(m: TinyModels, stock: Runner, fam: str) -> None:
    model = getattr(m, f"{fam}_file")
    lora_url = str(m.sd1_lora_a if fam == "sd1" else m.sdxl_lora)
    fast = Runner(device="cpu", optimize=True)
    for loras in ([], [LoraRef(lora_url, 0.8)], []):
        ref = stock.run(req(model, loras=loras))
        got = fast.run(req(model, loras=loras))
        diff = np.abs(pixels(ref) - pixels(got))
        assert diff.mean() < 1.0 and diff.max() <= 16, (fast.optimize_state, diff.mean(), diff.max())


def test_optimized_controlnet_and_plain_requests_share_the_base(m: TinyModels, stock: Runner) -> None:
    fast = Runner(device="cpu", optimize=True)
    cn = dict(controlnet=str(m.sd1_cn_folder), control_image=str(m.control_a))
    for kw in ({}, cn, {}, cn):
        ref = stock.run(req(m.sd1_file, **kw))
        got = fast.run(req(m.sd1_file, **kw))
        diff = np.abs(pixels(ref) - pixels(got))
        assert diff.mean() < 1.0 and diff.max() <= 16


def test_a_folders_own_tokenizer_files_win(m: TinyModels, stock: Runner, tmp_path: Path) -> None:
    import json
    import shutil

    folder = tmp_path / "sd1-own-tokenizer"
    shutil.copytree(m.sd1_folder, folder)
    cfg_path = folder / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pad_token"] = "!"
    cfg_path.write_text(json.dumps(cfg))
    a = stock.run(req(folder))
    bundle = stock.loaded(str(folder))
    assert bundle is not None and bundle.tokenizers["tokenizer"].pad_token == "!"
    assert np.abs(pixels(a) - pixels(stock.run(req(m.sd1_folder)))).mean() > 0.1  # other padding, other image


def test_sd2_v_prediction_single_file(m: TinyModels, stock: Runner) -> None:
    res = stock.run(req(m.sd2_v_file))
    bundle = stock.loaded(str(m.sd2_v_file))
    assert res.family == "SD2.x" and bundle is not None
    assert bundle.prediction_type == "v_prediction"
    eps = stock.run(req(m.sd2_v_file, prediction_type="epsilon"))
    assert np.abs(pixels(res) - pixels(eps)).mean() > 1.0


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m", "ddim"])
def test_schedulers_run_and_are_reproducible(m: TinyModels, stock: Runner, scheduler: str) -> None:
    a = stock.run(req(m.sd1_file, scheduler=scheduler, seed=3))
    b = stock.run(req(m.sd1_file, scheduler=scheduler, seed=3))
    assert np.array_equal(pixels(a), pixels(b))


# ------------------------------------------------------------------ LoRA


def test_lora_changes_output_and_removing_it_restores_the_base_exactly(m: TinyModels) -> None:
    r = Runner(device="cpu", optimize=False)
    base = r.run(req(m.sd1_file))
    w0 = weights(r, m.sd1_file)
    with_lora = r.run(req(m.sd1_file, loras=[LoraRef(str(m.sd1_lora_a), 1.0)]))
    lora_row = [t for t in with_lora.tiers if t.component == "lora"][0]
    assert lora_row.note.endswith("60/60 modules")
    assert np.abs(pixels(base) - pixels(with_lora)).mean() > 1.0
    again = r.run(req(m.sd1_file))
    assert_same_weights(weights(r, m.sd1_file), w0)
    assert np.array_equal(pixels(base), pixels(again))
    assert [t.tier for t in again.tiers] == ["device"] * 3  # the base was never reloaded


def test_a_then_b_equals_b_alone_bit_for_bit(m: TinyModels) -> None:
    a, b = LoraRef(str(m.sd1_lora_a), 0.7), LoraRef(str(m.sd1_lora_b), 1.0)
    r1 = Runner(device="cpu", optimize=False)
    r1.run(req(m.sd1_file, loras=[a]))
    img1 = r1.run(req(m.sd1_file, loras=[b]))
    r2 = Runner(device="cpu", optimize=False)
    img2 = r2.run(req(m.sd1_file, loras=[b]))
    assert_same_weights(weights(r1, m.sd1_file), weights(r2, m.sd1_file))
    assert np.array_equal(pixels(img1), pixels(img2))


def test_several_loras_with_scales_and_back_to_one(m: TinyModels) -> None:
    a, b = LoraRef(str(m.sd1_lora_a), 0.5), LoraRef(str(m.sd1_lora_peft), 0.8)
    r = Runner(device="cpu", optimize=False)
    only_a = r.run(req(m.sd1_file, loras=[a]))
    w_a = weights(r, m.sd1_file)
    both = r.run(req(m.sd1_file, loras=[a, b]))
    assert np.abs(pixels(both) - pixels(only_a)).mean() > 1.0
    rows = [t for t in both.tiers if t.component == "lora"]
    assert [row.url for row in rows] == [a.url, b.url] and rows[1].note.startswith("x0.8")
    half = r.run(req(m.sd1_file, loras=[LoraRef(a.url, 0.25)]))
    assert np.abs(pixels(half) - pixels(only_a)).mean() > 0.1
    r.run(req(m.sd1_file, loras=[a]))
    assert_same_weights(weights(r, m.sd1_file), w_a)


def test_lora_switch_is_exact_with_optimize_on(m: TinyModels) -> None:
    a, b = LoraRef(str(m.sdxl_lora), 1.0), LoraRef(str(m.sdxl_lora_peft), 0.6)
    r1 = Runner(device="cpu", optimize=True)
    base = r1.run(req(m.sdxl_file))
    r1.run(req(m.sdxl_file, loras=[a]))
    img1 = r1.run(req(m.sdxl_file, loras=[b]))
    r2 = Runner(device="cpu", optimize=True)
    img2 = r2.run(req(m.sdxl_file, loras=[b]))
    assert_same_weights(weights(r1, m.sdxl_file), weights(r2, m.sdxl_file))
    assert np.array_equal(pixels(img1), pixels(img2))
    assert np.array_equal(pixels(r1.run(req(m.sdxl_file))), pixels(base))


@pytest.mark.parametrize("which", ["sdxl_lora", "sdxl_lora_peft"])
def test_sdxl_loras_match_every_module(m: TinyModels, stock: Runner, which: str) -> None:
    res = stock.run(req(m.sdxl_folder, loras=[LoraRef(str(getattr(m, which)))]))
    note = [t.note for t in res.tiers if t.component == "lora"][0]
    done, total = note.split(", ")[1].split()[0].split("/")
    assert done == total and int(total) > 50


def test_lora_that_matches_nothing_says_how_many_matched(m: TinyModels, stock: Runner) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"matches nothing .*0 of 1 LoRA modules matched"):
        stock.run(req(m.sd1_file, loras=[LoraRef(str(m.unrelated_lora))]))


def test_lora_for_the_other_family_is_refused(m: TinyModels, stock: Runner) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"is for SDXL; the base model is SD1\.x"):
        stock.run(req(m.sd1_file, loras=[LoraRef(str(m.sdxl_lora))]))
    with pytest.raises(errors.InvalidArgument, match=r"is for SD1\.x/SD2\.x; the base model is SDXL"):
        stock.run(req(m.sdxl_file, loras=[LoraRef(str(m.sd1_lora_a))]))
    # the failed requests left the bases as they were
    assert stock.loaded(str(m.sd1_file)).patcher.applied == ()  # type: ignore[union-attr]


# ------------------------------------------------------------------ ControlNet


@pytest.mark.parametrize("which", ["sd1_cn_file", "sd1_cn_folder"])
def test_controlnet_follows_the_control_image(m: TinyModels, stock: Runner, which: str) -> None:
    cn = str(getattr(m, which))
    plain = stock.run(req(m.sd1_file))
    a = stock.run(req(m.sd1_file, controlnet=cn, control_image=str(m.control_a)))
    b = stock.run(req(m.sd1_file, controlnet=cn, control_image=str(m.control_b)))
    assert [t.component for t in a.tiers][-1] == "controlnet"
    assert np.abs(pixels(a) - pixels(plain)).mean() > 0.5
    assert np.abs(pixels(a) - pixels(b)).mean() > 0.1


def test_controlnet_single_file_equals_folder(m: TinyModels, stock: Runner) -> None:
    a = stock.run(req(m.sd1_file, controlnet=str(m.sd1_cn_file), control_image=str(m.control_a)))
    b = stock.run(req(m.sd1_file, controlnet=str(m.sd1_cn_folder), control_image=str(m.control_a)))
    assert np.abs(pixels(a) - pixels(b)).max() <= 2


def test_sdxl_controlnet_runs(m: TinyModels, stock: Runner) -> None:
    res = stock.run(req(m.sdxl_folder, controlnet=str(m.sdxl_cn_folder), control_image=str(m.control_a)))
    assert res.image.size == SIZE and res.family == "SDXL"


def test_controlnet_for_another_family_is_refused(m: TinyModels, stock: Runner) -> None:
    with pytest.raises(errors.InvalidArgument, match="ControlNet"):
        stock.run(req(m.sd1_file, controlnet=str(m.sdxl_cn_folder), control_image=str(m.control_a)))


# ------------------------------------------------------------------ tiers


def test_tiers_disk_then_device_then_ram_after_a_switch(m: TinyModels) -> None:
    r = Runner(device="cpu", optimize=False, device_budget=0)  # keep only the model in use built
    first = r.run(req(m.sd1_file))
    assert {t.tier for t in first.tiers} == {"disk"}
    again = r.run(req(m.sd1_file))
    assert {t.tier for t in again.tiers} == {"device"}
    other = r.run(req(m.sd1_other))
    assert {t.tier for t in other.tiers} == {"disk"}
    back = r.run(req(m.sd1_file))
    assert {t.tier for t in back.tiers} == {"ram"}  # rebuilt from host RAM, not read again
    assert np.array_equal(pixels(back), pixels(first))
    assert np.abs(pixels(other) - pixels(first)).mean() > 1.0


def test_host_budget_evicts_least_recently_used_files(m: TinyModels) -> None:
    size = m.sd1_file.stat().st_size
    r = Runner(device="cpu", optimize=False, device_budget=0, host_budget=int(size * 1.5))
    r.run(req(m.sd1_file))
    r.run(req(m.sd1_other))  # does not fit beside the first: the first file leaves RAM
    back = r.run(req(m.sd1_file))
    assert {t.tier for t in back.tiers} == {"disk"}
    assert r.cache.host.used <= int(size * 1.5)


# ------------------------------------------------------------------ bad input


def test_unknown_checkpoint_layout(m: TinyModels, stock: Runner) -> None:
    with pytest.raises(errors.InvalidArgument, match="unknown checkpoint layout"):
        stock.run(req(m.not_a_model))


def test_size_must_be_a_multiple_of_8(m: TinyModels, stock: Runner) -> None:
    with pytest.raises(errors.InvalidArgument, match="multiples of 8"):
        stock.run(req(m.sd1_file, size=(60, 64)))


def test_controlnet_without_control_image(m: TinyModels, stock: Runner) -> None:
    with pytest.raises(errors.InvalidArgument, match="needs --control-image"):
        stock.run(req(m.sd1_file, controlnet=str(m.sd1_cn_folder)))
    with pytest.raises(errors.NotFound, match="control image not found"):
        stock.run(req(m.sd1_file, controlnet=str(m.sd1_cn_folder), control_image=str(m.root / "missing.png")))
