"""The runner's serving modes: batches with per-image seeds, img2img, ControlNet from a decoded image, interrupts."""

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

from PIL import Image  # noqa: E402
from sdcache.kernels.request import Request  # noqa: E402
from sdcache.kernels.runner import Runner  # noqa: E402

from sdcache import errors  # noqa: E402

from .runner_models import TinyModels, tiny_models  # noqa: E402

SIZE = (64, 64)


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return tiny_models(tmp_path_factory.getbasetemp() / "runner-models")


@pytest.fixture(scope="module")
def runner() -> Runner:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Runner(device="cpu", dtype="fp32", optimize=False)
    torch.set_num_threads(before)


def req(model: Path, **kw: object) -> Request:
    kw.setdefault("prompt", "a photo of a cat")
    kw.setdefault("steps", 2)
    kw.setdefault("size", SIZE)
    kw.setdefault("seed", 5)
    return Request(model=str(model), **kw)  # type: ignore[arg-type]


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_batch_image_i_is_the_image_of_seed_plus_i(m: TinyModels, runner: Runner, fam: str) -> None:
    model = m.sd1_file if fam == "sd1" else m.sdxl_file
    batch = runner.run(req(model, batch_size=2))
    assert batch.seeds == [5, 6] and len(batch.images) == 2
    alone = runner.run(req(model, seed=6))
    # Equal up to float rounding: a batch of two runs other matmul shapes than one image (so in A1111).
    diff = np.abs(px(batch.images[1]) - px(alone.image))
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())
    assert not np.array_equal(px(batch.images[0]), px(batch.images[1]))


def test_img2img_follows_the_start_image_and_strength(m: TinyModels, runner: Runner) -> None:
    start_a = Image.open(m.control_a).convert("RGB")
    start_b = Image.open(m.control_b).convert("RGB")
    a = runner.run(req(m.sd1_file, init_image=start_a, strength=0.5, steps=4))
    again = runner.run(req(m.sd1_file, init_image=start_a, strength=0.5, steps=4))
    b = runner.run(req(m.sd1_file, init_image=start_b, strength=0.5, steps=4))
    assert a.image.size == SIZE
    assert np.array_equal(px(a.image), px(again.image))
    assert not np.array_equal(px(a.image), px(b.image))
    # A weak strength keeps the picture close to the start image; a full one need not.
    weak = runner.run(req(m.sd1_file, init_image=start_a, strength=0.25, steps=4))
    full = runner.run(req(m.sd1_file, init_image=start_a, strength=1.0, steps=4))
    ref = px(start_a.resize(SIZE))
    assert np.abs(px(weak.image) - ref).mean() < np.abs(px(full.image) - ref).mean()


def test_controlnet_takes_a_decoded_image(m: TinyModels, runner: Runner) -> None:
    from_path = runner.run(req(m.sd1_file, controlnet=str(m.sd1_cn_folder), control_image=str(m.control_a)))
    decoded = runner.run(req(m.sd1_file, controlnet=str(m.sd1_cn_folder),
                             control_image=Image.open(m.control_a)))
    assert np.array_equal(px(from_path.image), px(decoded.image))
    i2i = runner.run(req(m.sd1_file, controlnet=str(m.sd1_cn_folder), control_image=Image.open(m.control_a),
                         init_image=Image.open(m.control_b), strength=0.6, steps=3))
    assert i2i.image.size == SIZE


def test_interrupt_stops_after_the_step_it_is_asked_at(m: TinyModels, runner: Runner) -> None:
    seen: list[tuple[int, int]] = []

    def stop_after_two(done: int, total: int) -> bool:
        seen.append((done, total))
        return done < 2

    res = runner.run(req(m.sd1_file, steps=6), on_step=stop_after_two)
    assert seen == [(1, 6), (2, 6)]
    full = runner.run(req(m.sd1_file, steps=6))
    assert res.image.size == SIZE and not np.array_equal(px(res.image), px(full.image))


def test_bad_strength_and_batch_are_one_line_errors(m: TinyModels, runner: Runner) -> None:
    start = Image.open(m.control_a)
    with pytest.raises(errors.InvalidArgument, match="strength"):
        runner.run(req(m.sd1_file, init_image=start, strength=0.0))
    with pytest.raises(errors.InvalidArgument, match="batch size"):
        runner.run(req(m.sd1_file, batch_size=0))
