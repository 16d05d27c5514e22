"""``sdcache serve`` as an A1111 client sees it: the real ``webuiapi`` client and plain HTTP, a real cluster.

The cluster holds tiny SD1 and SDXL models built from configs (never from a hub),
imported under A1111's folders. One serve process per module, a real subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ._requirements import import_required

import_required("torch")
import_required("diffusers")
webuiapi = import_required("webuiapi", "webuiapi")

import numpy as np  # noqa: E402
import requests  # noqa: E402
from PIL import Image  # noqa: E402

from sdcache import auth  # noqa: E402
from sdcache.serving import serve as serve_mod  # noqa: E402

from ._serving import API_PASS, API_USER, ServeProcess, api, import_models, serve_process  # noqa: E402
from .conftest import mint_token  # noqa: E402
from .runner_models import TinyModels, tiny_models  # noqa: E402

BASIC = (API_USER, API_PASS)


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return tiny_models(tmp_path_factory.getbasetemp() / "runner-models")


@pytest.fixture(scope="module")
def served(m: TinyModels, cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> ServeProcess:
    names = import_models(m, cluster.meta_addr)
    tmp = tmp_path_factory.mktemp("serve")
    p = serve_process(cluster, tmp, "serve-a", "--default-model", names["sd1"], "--max-queue", "1",
                      "--max-steps", "20")
    p.start()
    try:
        p.wait_ready()
        yield p
    finally:
        p.stop()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(np.int16)


def txt2img(p: ServeProcess, **body: Any) -> requests.Response:
    body.setdefault("prompt", "a cat")
    body.setdefault("steps", 2)
    body.setdefault("width", 64)
    body.setdefault("height", 64)
    body.setdefault("seed", 3)
    return requests.post(p.url + "/sdapi/v1/txt2img", json=body, auth=BASIC, timeout=300)


def test_every_route_of_serve_and_gateway_has_a_role() -> None:
    from sdcache.serving import api, gateway, registry
    from sdcache.serving.catalog import Catalog
    from sdcache.serving.httpauth import Gate
    from sdcache.serving.plan import Limits
    from sdcache.tls import Credentials

    gate = Gate(auth.TokenVerifier(), {})
    s = serve_mod.ServeApp(catalog=Catalog(None), limits=Limits(), queue=None, runner_factory=None,  # type: ignore
                           runner_id="x", gate=gate)
    g = gateway.Gateway(directory=registry.RunnerDirectory([], credentials=Credentials(None, None),
                                                           verifier=gate.verifier),
                        policy=gateway.policies.make_policy("finish"), catalog=Catalog(None), limits=Limits(),
                        gate=gate, credentials=Credentials(None, None), request_timeout=1)
    for app in (serve_mod.build_app(s), gateway.build_app(g)):
        routes = api.routes_of(app)
        assert ("POST", "/sdapi/v1/txt2img") in routes
        missing = routes - set(auth.SERVE_ROLES)
        assert not missing, f"routes without a role in auth.SERVE_ROLES: {sorted(missing)}"


def test_sd_models_lists_every_checkpoint_with_its_hash(served: ServeProcess, m: TinyModels) -> None:
    models = {x["title"]: x for x in api(served).get_sd_models()}
    sd1 = sha256_of(m.sd1_file)
    unet = sha256_of(m.sdxl_folder / "unet" / "diffusion_pytorch_model.safetensors")
    want = {f"sd1-tiny.safetensors [{sd1[:10]}]", f"sub/sd1-other.safetensors [{sha256_of(m.sd1_other)[:10]}]",
            f"sdxl-tiny [{unet[:10]}]"}
    assert set(models) == want
    row = models[f"sd1-tiny.safetensors [{sd1[:10]}]"]
    assert row["sha256"] == sd1 and row["hash"] == sd1[:10] and row["model_name"] == "sd1-tiny"
    assert row["filename"] == "/models/checkpoints/sd1-tiny.safetensors"
    assert models[f"sub/sd1-other.safetensors [{sha256_of(m.sd1_other)[:10]}]"]["model_name"] == "sub_sd1-other"
    loras = {x["name"] for x in api(served).get_loras()}
    assert loras == {"style-a", "style-b", "xl-style"}


def test_txt2img_picks_the_model_and_is_reproducible(served: ServeProcess, m: TinyModels) -> None:
    client = api(served)
    a = client.txt2img(prompt="a cat", seed=11, width=64, height=64, steps=2,
                       override_settings={"sd_model_checkpoint": "sd1-tiny"})
    again = client.txt2img(prompt="a cat", seed=11, width=64, height=64, steps=2,
                           override_settings={"sd_model_checkpoint": sha256_of(m.sd1_file)[:10]})
    other = client.txt2img(prompt="a cat", seed=11, width=64, height=64, steps=2,
                           override_settings={"sd_model_checkpoint": "sub_sd1-other"})
    assert a.image.size == (64, 64)
    assert np.array_equal(pixels(a.image), pixels(again.image))
    assert not np.array_equal(pixels(a.image), pixels(other.image))
    assert a.info["sd_model_hash"] == sha256_of(m.sd1_file)[:10]
    assert other.info["sd_model_name"] == "sub_sd1-other"
    assert f"Model hash: {sha256_of(m.sd1_file)[:10]}" in a.info["infotexts"][0]
    assert "Seed: 11" in a.info["infotexts"][0] and "Sampler: Euler" in a.info["infotexts"][0]
    assert a.info["sdcache"]["runner"] == "serve-a"
    assert {t["tier"] for t in a.info["sdcache"]["tiers"]} <= {"cluster", "ram", "device"}
    # the PNG carries the infotext, as A1111 saves it
    assert a.image.info["parameters"] == a.info["infotexts"][0]


def test_lora_in_the_prompt_changes_the_image_and_removing_it_restores_it(served: ServeProcess,
                                                                          m: TinyModels) -> None:
    base = txt2img(served, prompt="a cat").json()
    styled = txt2img(served, prompt="a cat <lora:style-a:0.8>").json()
    back = txt2img(served, prompt="a cat").json()
    img = [pixels(Image.open(io.BytesIO(base64.b64decode(r["images"][0])))) for r in (base, styled, back)]
    assert not np.array_equal(img[0], img[1])
    assert np.array_equal(img[0], img[2])
    info = json.loads(styled["info"])
    assert f"Lora hashes: \"style-a: {sha256_of(m.sd1_lora_a)[:12]}\"" in info["infotexts"][0]
    assert info["prompt"] == "a cat <lora:style-a:0.8>"
    assert any(t["component"] == "lora" for t in info["sdcache"]["tiers"])


def test_seed_minus_one_is_random_and_reported(served: ServeProcess) -> None:
    r = txt2img(served, seed=-1, batch_size=2).json()
    info = json.loads(r["info"])
    assert len(r["images"]) == 2 and info["seed"] >= 0 and info["all_seeds"] == [info["seed"], info["seed"] + 1]
    again = txt2img(served, seed=info["seed"]).json()
    a = pixels(Image.open(io.BytesIO(base64.b64decode(r["images"][0]))))
    b = pixels(Image.open(io.BytesIO(base64.b64decode(again["images"][0]))))
    assert np.abs(a - b).max() <= 3  # the same seed; batched float rounding aside


def test_img2img_follows_the_init_image(served: ServeProcess, m: TinyModels) -> None:
    client = api(served)
    a = client.img2img(images=[Image.open(m.control_a)], prompt="a cat", seed=2, steps=4, width=64, height=64,
                       denoising_strength=0.5)
    b = client.img2img(images=[Image.open(m.control_b)], prompt="a cat", seed=2, steps=4, width=64, height=64,
                       denoising_strength=0.5)
    assert a.image.size == (64, 64) and not np.array_equal(pixels(a.image), pixels(b.image))
    assert "Denoising strength: 0.5" in a.info["infotexts"][0]


def test_controlnet_unit_in_alwayson_scripts(served: ServeProcess, m: TinyModels) -> None:
    unit = webuiapi.ControlNetUnit(image=Image.open(m.control_a), module="none", model="cn-sd1")
    a = api(served).txt2img(prompt="a cat", seed=2, steps=2, width=64, height=64, controlnet_units=[unit])
    # A fresh alwayson_scripts: webuiapi's default dict is shared between calls and keeps the unit.
    plain = api(served).txt2img(prompt="a cat", seed=2, steps=2, width=64, height=64, alwayson_scripts={})
    assert not np.array_equal(pixels(a.image), pixels(plain.image))
    assert not any(t["component"] == "controlnet" for t in plain.info["sdcache"]["tiers"])
    assert any(t["component"] == "controlnet" for t in a.info["sdcache"]["tiers"])


def test_options_set_the_default_model(served: ServeProcess, m: TinyModels) -> None:
    client = api(served)
    client.set_options({"sd_model_checkpoint": "sub/sd1-other.safetensors"})
    try:
        assert client.util_get_current_model().startswith("sub/sd1-other.safetensors [")
        r = client.txt2img(prompt="a cat", seed=1, width=64, height=64, steps=2)
        assert r.info["sd_model_name"] == "sub_sd1-other"
    finally:
        client.set_options({"sd_model_checkpoint": "sd1-tiny"})


@pytest.mark.parametrize("body, status, words", [
    ({"override_settings": {"sd_model_checkpoint": "sd1-tiny-typo"}}, 404, "closest: sd1-tiny.safetensors"),
    ({"prompt": "a cat <lora:no-such-style:1>"}, 404, "unknown LoRA 'no-such-style'"),
    ({"prompt": "a cat <lora:xl-style:1>"}, 422, "SDXL"),
    ({"width": 60}, 422, "multiples of 8"),
    ({"steps": 21}, 422, "steps 21"),
    ({"batch_size": 9}, 422, "batch_size 9"),
    ({"sampler_name": "Euler b"}, 422, "known: Euler a, Euler, DPM++ 2M"),
    ({"enable_hr": True}, 422, "enable_hr"),
    ({"steps": "many"}, 422, "field steps"),
])
def test_bad_requests_are_4xx_in_a1111s_shape(served: ServeProcess, body: dict[str, Any], status: int,
                                              words: str) -> None:
    r = txt2img(served, **body)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) >= {"error", "detail"} and words in err["detail"], err
    assert txt2img(served).status_code == 200  # and it keeps serving


def test_malformed_bodies_and_missing_init_image(served: ServeProcess) -> None:
    r = requests.post(served.url + "/sdapi/v1/txt2img", data=b"{not json", auth=BASIC, timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "not JSON" in r.json()["detail"]
    r = requests.post(served.url + "/sdapi/v1/img2img", json={"prompt": "x", "width": 64, "height": 64},
                      auth=BASIC, timeout=30)
    assert r.status_code == 422 and "init_images" in r.json()["detail"]
    r = requests.post(served.url + "/sdapi/v1/img2img", json={"init_images": ["bm90IGFuIGltYWdl"], "width": 64,
                                                              "height": 64}, auth=BASIC, timeout=30)
    assert r.status_code == 422 and "not a PNG" in r.json()["detail"]


def test_auth_basic_bearer_and_roles(served: ServeProcess) -> None:
    url = served.url + "/sdapi/v1/sd-models"
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, auth=(API_USER, "wrong"), timeout=30).status_code == 401
    reader = mint_token("read", "serve-reader")
    assert requests.get(url, headers={"Authorization": f"Bearer {reader}"}, timeout=30).status_code == 200
    r = requests.post(served.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "sd1-tiny"},
                      headers={"Authorization": f"Bearer {reader}"}, timeout=30)
    assert r.status_code == 403 and "needs 'admin'" in r.json()["detail"]
    assert requests.get(served.url + "/healthz", timeout=30).status_code == 200


def test_samplers_are_a1111_names_and_each_runs(served: ServeProcess) -> None:
    names = api(served).util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    for name in names:
        assert txt2img(served, sampler_name=name, steps=2).status_code == 200, name
    assert txt2img(served, sampler_name="DPM++ 2M Karras").status_code == 200
    r = txt2img(served, sampler_name="DDIM", scheduler="Karras")
    assert r.status_code == 422 and "no Karras schedule" in r.json()["detail"]


def test_full_queue_is_429_with_retry_after_and_interrupt_stops_the_running_one(served: ServeProcess) -> None:
    results: dict[str, requests.Response] = {}

    def slow(key: str) -> None:
        results[key] = txt2img(served, steps=20, width=128, height=128)

    first = threading.Thread(target=slow, args=("first",))
    first.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the first one denoises
        st = requests.get(served.url + "/sdapi/v1/progress", auth=BASIC, timeout=30).json()
        if st["state"]["sampling_step"] >= 1:
            break
        time.sleep(0.05)
    second = threading.Thread(target=slow, args=("second",))
    second.start()
    deadline = time.monotonic() + 30
    while requests.get(served.url + "/sdapi/v1/progress", auth=BASIC, timeout=30).json()["state"]["job_count"] < 2:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.02)
    third = txt2img(served)
    assert third.status_code == 429 and int(third.headers["Retry-After"]) >= 1
    assert "queue is full" in third.json()["detail"]
    assert requests.post(served.url + "/sdapi/v1/interrupt", auth=BASIC, timeout=30).status_code == 200
    first.join(120)
    info = json.loads(results["first"].json()["info"])
    assert results["first"].status_code == 200 and info["sdcache"]["interrupted"] is True
    requests.post(served.url + "/sdapi/v1/interrupt", auth=BASIC, timeout=30)
    second.join(120)
    assert results["second"].status_code == 200


def test_a_waiting_request_has_its_model_fetched_while_it_waits(served: ServeProcess) -> None:
    blocker = threading.Thread(target=lambda: txt2img(served, steps=20, width=128, height=128))
    blocker.start()
    deadline = time.monotonic() + 60
    while requests.get(served.url + "/sdapi/v1/progress", auth=BASIC, timeout=30).json()["state"]["sampling_step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # sdxl-tiny is in no tier of this runner yet: it would come from the cluster, but it waits behind the
    # running request, so its files are fetched meanwhile and its turn finds them in host RAM.
    before = _cluster_loads(served)
    waiting: dict[str, requests.Response] = {}
    t = threading.Thread(target=lambda: waiting.setdefault("r", txt2img(
        served, override_settings={"sd_model_checkpoint": "sdxl-tiny"})))
    t.start()
    deadline = time.monotonic() + 60
    while requests.get(served.url + "/sdapi/v1/progress", auth=BASIC, timeout=30).json()["state"]["job_count"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # SDXL's four weight files (UNet, VAE, two text encoders) come from the cluster while it waits.
    deadline = time.monotonic() + 60
    while _cluster_loads(served) < before + 4:
        assert time.monotonic() < deadline, "the waiting request's files were not fetched while it waited"
        time.sleep(0.05)
    requests.post(served.url + "/sdapi/v1/interrupt", auth=BASIC, timeout=30)
    blocker.join(120)
    t.join(120)
    tiers = {x["component"]: x["tier"] for x in json.loads(waiting["r"].json()["info"])["sdcache"]["tiers"]}
    assert tiers["unet"] == "ram" and tiers["text_encoder_2"] == "ram", tiers


def _cluster_loads(p: ServeProcess) -> float:
    """Model files the runner has loaded from the cluster so far (its /metrics)."""
    text = requests.get(p.url + "/metrics", auth=BASIC, timeout=30).text
    for line in text.splitlines():
        if line.startswith('sdcache_runner_model_load_seconds_count{tier="cluster"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_disconnects_frees_its_slot(served: ServeProcess) -> None:
    import socket

    # One long request runs; a second waits in the one queue slot, then its client hangs up.
    blocker = threading.Thread(target=lambda: txt2img(served, steps=20, width=128, height=128))
    blocker.start()
    deadline = time.monotonic() + 60
    while requests.get(served.url + "/sdapi/v1/progress", auth=BASIC, timeout=30).json()["state"]["job_count"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    host, port = served.address.rsplit(":", 1)
    body = json.dumps({"prompt": "x", "steps": 2, "width": 64, "height": 64}).encode()
    cred = base64.b64encode(f"{API_USER}:{API_PASS}".encode()).decode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Basic {cred}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    while requests.get(served.url + "/sdapi/v1/progress", auth=BASIC, timeout=30).json()["state"]["job_count"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    s.close()
    deadline = time.monotonic() + 30
    while requests.get(served.url + "/sdapi/v1/progress", auth=BASIC, timeout=30).json()["state"]["job_count"] > 1:
        assert time.monotonic() < deadline, "the disconnected request kept its slot"
        time.sleep(0.02)
    requests.post(served.url + "/sdapi/v1/interrupt", auth=BASIC, timeout=30)
    blocker.join(120)


def test_progress_and_scripts_answer_like_a1111(served: ServeProcess) -> None:
    st = api(served).get_progress()
    assert set(st) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert st["state"]["job_count"] == 0 and st["progress"] == 0.0
    scripts = requests.get(served.url + "/sdapi/v1/scripts", auth=BASIC, timeout=30).json()
    assert "controlnet" in scripts["txt2img"]
