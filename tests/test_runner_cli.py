"""``sdcache run`` as a user runs it: real subprocesses, PNGs on disk, tables, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ._requirements import import_required

import_required("torch")
import_required("diffusers")

from .runner_models import TinyModels, tiny_models  # noqa: E402

CLI = "import sys; from sdcache.kernels.cli import _cli; sys.exit(_cli())"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return tiny_models(tmp_path_factory.getbasetemp() / "runner-models")


def run(*args: str, via_sdcache: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "sdcache", "run", *args] if via_sdcache else [sys.executable, "-c", CLI, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=ENV)


def common(model: Path, **kw: str) -> list[str]:
    args = ["--model", str(model), "--prompt", "a red fox", "--steps", "2", "--size", "64x64", "--seed", "7"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def test_single_request_writes_the_png_and_a_table(m: TinyModels, tmp_path: Path) -> None:
    out = tmp_path / "fox.png"
    p = run(*common(m.sd1_file, lora=f"{m.sd1_lora_a}:0.8", out=str(out)), via_sdcache=True)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = p.stdout
    for word in ("unet", "vae", "text_encoder", "lora", "disk", "fetch", "switch", "denoise", "x0.8, 60/60 modules"):
        assert word in table, table
    assert "Traceback" not in p.stderr


def test_batch_of_requests_in_one_process(m: TinyModels, tmp_path: Path) -> None:
    lines = [
        {"model": str(m.sd1_file), "seed": 1, "out": "base.png"},
        {"model": str(m.sd1_file), "seed": 1, "lora": [f"{m.sd1_lora_a}:1.0"], "out": "lora.png"},
        {"model": str(m.sd1_file), "seed": 1, "out": "base-again.png"},
        {"model": str(m.sd1_file), "size": "60x64"},
        {"model": str(m.sdxl_folder), "seed": 2, "lora": [str(m.sdxl_lora)],
         "controlnet": str(m.sdxl_cn_folder), "control_image": str(m.control_a), "out": "xl.png"},
    ]
    reqs = tmp_path / "batch.jsonl"
    reqs.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    p = run("--requests", str(reqs), "--out-dir", str(out), "--prompt", "a red fox", "--steps", "2",
            "--size", "64x64", "--json")
    assert p.returncode == 1  # one request was bad; the others still ran
    errs = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(errs) == 1 and "batch.jsonl:4" in errs[0] and "multiples of 8" in errs[0], p.stderr
    results = [json.loads(line) for line in p.stdout.splitlines()]
    ok = {r["line"]: r for r in results if "error" not in r}
    assert sorted(ok) == [1, 2, 3, 5]
    tiers = {n: {t["component"]: t["tier"] for t in ok[n]["tiers"]} for n in ok}
    assert tiers[1]["unet"] == "disk" and tiers[2]["unet"] == "device" and tiers[3]["unet"] == "device"
    assert tiers[2]["lora"] == "disk" and tiers[5]["controlnet"] == "disk"
    assert all(ok[n]["fetch_s"] >= 0 and ok[n]["denoise_s"] > 0 for n in ok)
    base, lora, again = ((out / n).read_bytes() for n in ("base.png", "lora.png", "base-again.png"))
    assert base == again and base != lora
    assert (out / "xl.png").stat().st_size > 0


@pytest.mark.parametrize(
    "case, expect",
    [
        ("size", "multiples of 8"),
        ("no-control-image", "needs --control-image"),
        ("missing-control-image", "control image not found"),
        ("unknown-layout", "unknown checkpoint layout"),
        ("missing-model", "model not found"),
        ("lora-matches-nothing", "0 of 1 LoRA modules matched"),
        ("sdxl-lora-on-sd1", "is for SDXL; the base model is SD1.x"),
    ],
)
def test_bad_input_gets_one_line_and_a_nonzero_exit(m: TinyModels, tmp_path: Path, case: str, expect: str) -> None:
    out = str(tmp_path / "x.png")
    args = {
        "size": common(m.sd1_file, out=out)[:-4] + ["--size", "60x64", "--out", out],
        "no-control-image": common(m.sd1_file, controlnet=str(m.sd1_cn_folder), out=out),
        "missing-control-image": common(m.sd1_file, controlnet=str(m.sd1_cn_folder),
                                        control_image=str(tmp_path / "none.png"), out=out),
        "unknown-layout": common(m.not_a_model, out=out),
        "missing-model": common(tmp_path / "nope.safetensors", out=out),
        "lora-matches-nothing": common(m.sd1_file, lora=str(m.unrelated_lora), out=out),
        "sdxl-lora-on-sd1": common(m.sd1_file, lora=str(m.sdxl_lora), out=out),
    }[case]
    p = run(*args)
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert expect in lines[0] and lines[0].startswith("sdcache run: error: ")
    assert not Path(out).exists()
