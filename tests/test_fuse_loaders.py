"""The loaders users run, over the mount: every tensor equal to the same call on the local file.

``safetensors.torch.load_file`` (ComfyUI's and A1111's loader), diffusers'
``StableDiffusionPipeline.from_single_file`` (a tiny SD1 model built from
configs, its configs from a local folder: never a hub) and ``torch.load`` of
a ``.ckpt`` zip pickle, plain and mmap'd. ``safe_open`` touching every
tensor is in ``test_fuse.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdcache.cluster import LocalCluster

from ._requirements import import_required
from .test_fuse import Mount, mounted
from .test_fuse_push import _import

pytestmark = [pytest.mark.fuse]
torch = import_required("torch")


@dataclass
class Files:
    local: Path  # directory of the source files
    folder: Path  # the diffusers config folder of the tiny model (configs only are used)


def _equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def files(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Files:
    """A tiny SD1 model as a single .safetensors and as a .ckpt, imported under /loaders."""
    import_required("diffusers", "diffusers")
    from safetensors.torch import load_file

    from .runner_models import build_tiny, save_folder, save_single_file

    root = tmp_path_factory.mktemp("loaders")
    comps = build_tiny("sd1", 3)
    save_folder("sd1", comps, root / "folder")
    save_single_file("sd1", comps, root / "sd1.safetensors")
    # A1111's .ckpt: a zip pickle holding {"state_dict": ...} (torch.save's default format)
    torch.save({"state_dict": load_file(root / "sd1.safetensors")}, root / "sd1.ckpt")
    for name in ("sd1.safetensors", "sd1.ckpt"):
        _import(cluster.meta_addr, root / name, f"/loaders/{name}")
    return Files(root, root / "folder")


@pytest.fixture(scope="module")
def mnt(cluster: LocalCluster, files: Files, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(cluster.meta_addr, tmp_path_factory.mktemp("loaders-mnt") / "mnt") as m:
        yield m


def test_safetensors_load_file_over_the_mount_equals_the_local_file(mnt, files):
    from safetensors.torch import load_file

    got = load_file(mnt.path / "loaders" / "sd1.safetensors")
    _equal(got, load_file(files.local / "sd1.safetensors"))


def test_diffusers_from_single_file_over_the_mount_equals_the_local_file(mnt, files):
    from diffusers import StableDiffusionPipeline

    def load(path: Path) -> dict:
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(files.folder), local_files_only=True,
                                                        safety_checker=None)
        return {f"{name}.{k}": v for name in ("unet", "vae", "text_encoder")
                for k, v in getattr(pipe, name).state_dict().items()}

    got = load(mnt.path / "loaders" / "sd1.safetensors")
    want = load(files.local / "sd1.safetensors")
    assert len(want) > 300
    _equal(got, want)


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
def test_torch_load_of_a_ckpt_over_the_mount_equals_the_local_file(mnt, files, use_mmap):
    got = torch.load(mnt.path / "loaders" / "sd1.ckpt", map_location="cpu", weights_only=True, mmap=use_mmap)
    want = torch.load(files.local / "sd1.ckpt", map_location="cpu", weights_only=True)
    _equal(got["state_dict"], want["state_dict"])
