"""The runner reading tiny models from a real one-host cluster (``sdcache://`` URLs)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import numpy as np  # noqa: E402

from ._requirements import import_required  # noqa: E402

torch = import_required("torch")
import_required("diffusers")

from sdcache.kernels.request import LoraRef, Request  # noqa: E402
from sdcache.kernels.runner import Runner  # noqa: E402

from .conftest import run_cli  # noqa: E402
from .runner_models import TinyModels, tiny_models  # noqa: E402


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return tiny_models(tmp_path_factory.getbasetemp() / "runner-models")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_models_served_from_the_cluster_match_local_files(m: TinyModels, cluster: object) -> None:
    meta = cluster.meta_addr  # type: ignore[attr-defined]
    for src in (m.sd1_file, m.sd1_lora_a, m.sd1_cn_file, m.control_a):
        run_cli("import", str(src), "/runner/", meta=meta, check=True)
    run_cli("import", "-r", str(m.sdxl_folder), "/runner/sdxl-folder/", meta=meta, check=True)

    def req(model: str, **kw: object) -> Request:
        return Request(model=model, prompt="a cat", steps=2, size=(64, 64), seed=4, **kw)  # type: ignore[arg-type]

    local = Runner(device="cpu", optimize=False)
    remote = Runner(device="cpu", optimize=False, meta=meta, device_budget=0)
    lora_local = [LoraRef(str(m.sd1_lora_a), 0.9)]
    lora_remote = [LoraRef(f"sdcache://runner/{m.sd1_lora_a.name}", 0.9)]
    cn_local = dict(controlnet=str(m.sd1_cn_file), control_image=str(m.control_a))
    cn_remote = dict(controlnet=f"sdcache://runner/{m.sd1_cn_file.name}",
                     control_image=f"sdcache://runner/{m.control_a.name}")

    got = remote.run(req(f"sdcache://runner/{m.sd1_file.name}", loras=lora_remote, **cn_remote))
    want = local.run(req(str(m.sd1_file), loras=lora_local, **cn_local))
    assert {t.tier for t in got.tiers} == {"cluster"}
    assert np.array_equal(np.asarray(got.image), np.asarray(want.image))

    xl = remote.run(req("sdcache://runner/sdxl-folder"))
    assert {t.tier for t in xl.tiers} == {"cluster"} and xl.family == "SDXL"
    xl_local = local.run(req(str(m.sdxl_folder)))
    assert np.abs(np.asarray(xl.image).astype(int) - np.asarray(xl_local.image).astype(int)).max() <= 2

    back = remote.run(req(f"sdcache://runner/{m.sd1_file.name}"))  # evicted from the device, still in RAM
    assert {t.tier for t in back.tiers if t.component != "controlnet"} == {"ram"}
