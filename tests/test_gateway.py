"""``sdcache gateway`` over two real ``serve`` processes: routing by residency, retries, the A1111 client.

Real subprocesses: a cluster, two serve processes that report to its runner
registry, and a gateway in front of them. Requests alternate between two base
models; the gateway must settle one model per runner, so that after the first
two requests no request makes a runner switch its base model.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import pytest

from ._requirements import import_required

import_required("torch")
import_required("diffusers")
import_required("webuiapi", "webuiapi")

import requests  # noqa: E402

from ._serving import API_PASS, API_USER, ServeProcess, api, import_models, serve_process  # noqa: E402
from .conftest import wait_for  # noqa: E402
from .runner_models import TinyModels, tiny_models  # noqa: E402

BASIC = (API_USER, API_PASS)


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return tiny_models(tmp_path_factory.getbasetemp() / "runner-models")


@pytest.fixture(scope="module")
def fleet(m: TinyModels, cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServeProcess]:
    import_models(m, cluster.meta_addr)
    tmp = tmp_path_factory.mktemp("gateway")
    procs = {name: serve_process(cluster, tmp, name) for name in ("runner-1", "runner-2")}
    procs["gateway"] = serve_process(cluster, tmp, "gateway", "--refresh-interval", "0.2", command="gateway")
    procs["gateway"].argv.insert(3, "-vv")  # the routing decisions, in its log
    try:
        for p in procs.values():
            p.start()
        for p in procs.values():
            p.wait_ready()
        gw = procs["gateway"]
        wait_for(lambda: requests.get(gw.url + "/sdapi/v1/progress", auth=BASIC, timeout=10)
                 .json()["sdcache"]["available"] == 2, "both runners in the gateway's view", timeout=60)
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def post(p: ServeProcess, model: str, **body: Any) -> requests.Response:
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1,
            "override_settings": {"sd_model_checkpoint": model}, **body}
    return requests.post(p.url + "/sdapi/v1/txt2img", json=body, auth=BASIC, timeout=300)


def unet_tier(r: requests.Response) -> str:
    return next(t["tier"] for t in json.loads(r.json()["info"])["sdcache"]["tiers"] if t["component"] == "unet")


def test_alternating_models_settle_one_per_runner(fleet: dict[str, ServeProcess]) -> None:
    gw = fleet["gateway"]
    served: list[tuple[str, str, str]] = []
    for i in range(8):
        model = "sd1-tiny" if i % 2 == 0 else "sub_sd1-other"
        r = post(gw, model)
        assert r.status_code == 200, r.text
        served.append((model, r.headers["X-Sdcache-Runner"], unet_tier(r)))
    runners = {model: {rid for m_, rid, _ in served if m_ == model} for model in ("sd1-tiny", "sub_sd1-other")}
    assert all(len(v) == 1 for v in runners.values()) and runners["sd1-tiny"] != runners["sub_sd1-other"], \
        (served, gw.log())
    assert all(tier == "device" for _, _, tier in served[2:]), served  # no base switch after the first two


def test_the_webuiapi_client_works_through_the_gateway(fleet: dict[str, ServeProcess], m: TinyModels) -> None:
    client = api(fleet["gateway"])
    titles = client.util_get_model_names()
    assert any(t.startswith("sd1-tiny.safetensors [") for t in titles) and len(titles) == 3
    r = client.txt2img(prompt="a cat <lora:style-a:1>", seed=4, steps=2, width=64, height=64,
                       override_settings={"sd_model_checkpoint": "sd1-tiny"})
    assert r.image.size == (64, 64) and r.info["sdcache"]["runner"] in ("runner-1", "runner-2")
    bad = post(fleet["gateway"], "no-such-model")
    assert bad.status_code == 404 and "closest" in bad.json()["detail"]


def test_a_runner_killed_mid_request_still_gives_an_image(fleet: dict[str, ServeProcess]) -> None:
    gw = fleet["gateway"]
    assert post(gw, "sd1-tiny").status_code == 200
    out: dict[str, requests.Response] = {}
    t = threading.Thread(target=lambda: out.setdefault("r", post(gw, "sd1-tiny", steps=20, width=128, height=128)))
    t.start()

    def denoising() -> str | None:  # the runner the gateway chose, once it is denoising this request
        for name in ("runner-1", "runner-2"):
            st = requests.get(fleet[name].url + "/sdapi/v1/progress", auth=BASIC, timeout=10).json()
            if st["state"]["sampling_step"] >= 1:
                return name
        return None

    victim = wait_for(denoising, "the request to start denoising", timeout=180, step=0.02)
    fleet[victim].kill(signal.SIGKILL)
    t.join(300)
    r = out["r"]
    assert r.status_code == 200, r.text
    assert r.headers["X-Sdcache-Runner"] != victim
    assert len(r.json()["images"]) == 1
    # The dead runner leaves the gateway's view once its lease runs out; requests keep working.
    wait_for(lambda: requests.get(gw.url + "/sdapi/v1/progress", auth=BASIC, timeout=10)
             .json()["sdcache"]["runners"] == 1, "the dead runner to leave the registry", timeout=30)
    assert post(gw, "sub_sd1-other").status_code == 200
