"""The inference runner: one request in, one image out, models served from the tiered cache.

A request goes through three timed stages:

* **fetch**: read the model layouts (JSON, safetensors headers) and bring
  every weight file that is not already built on the device into host RAM,
  all files in parallel (``load_safetensors``: cluster or disk straight into
  tensors, no temporary files);
* **switch**: build the components that are not on the device yet (in
  parallel), put the requested LoRAs in place of the previous ones (never
  reloading the base), assemble the pipeline and optimize it;
* **denoise**: the diffusers pipeline call (text encoding, denoising loop,
  VAE decode).

With ``optimize=False`` the stock diffusers pipeline runs on the same weights:
the reference the optimized path is compared with.

A :class:`Runner` serves one request at a time (the LoRA state of a base model
is shared by every request on it); run one per device for concurrency.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdcache import errors

from . import checkpoint, components, lora, sources
from .metrics import DENOISE_SECONDS, LOAD_SECONDS_BY_TIER
from .families import Family, label_for_cross_attention_dim
from .model_cache import TIER_DEVICE, TIER_RAM, ModelCache, default_budgets, reclaim, tensors_nbytes
from .pipeline import assemble, make_scheduler
from .request import Request
from .tokenizer import clip_tokenizer, tokenizer_from_files

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class TierRow:
    """Which tier served one component of a request."""

    component: str
    url: str
    tier: str
    note: str = ""


@dataclass
class RunResult:
    """The image of one request with its timings (seconds) and where each component came from."""

    image: "Image.Image"
    seed: int
    width: int
    height: int
    fetch_s: float
    switch_s: float
    denoise_s: float
    tiers: list[TierRow]
    optimize: str  # "on", "off" or "unavailable"
    family: str
    images: list["Image.Image"] = field(default_factory=list)  # the whole batch; ``image`` is the first
    seeds: list[int] = field(default_factory=list)  # the seed of each image

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "width": self.width, "height": self.height, "fetch_s": round(self.fetch_s, 4),
            "switch_s": round(self.switch_s, 4), "denoise_s": round(self.denoise_s, 4), "optimize": self.optimize,
            "family": self.family, "seeds": self.seeds or [self.seed],
            "tiers": [{"component": r.component, "url": r.url, "tier": r.tier, "note": r.note} for r in self.tiers],
        }


@dataclass
class BaseBundle:
    """A base model built on the device: its modules, tokenizers, LoRA state and assembled pipelines."""

    source: sources.BaseSource
    modules: dict[str, "torch.nn.Module"]
    tokenizers: dict[str, Any]
    scheduler_config: dict[str, Any]
    prediction_type: str
    nbytes: int
    patcher: lora.LoraPatcher
    index: dict[str, tuple[str, str]]
    resolved: dict[str, lora.ResolvedLora] = field(default_factory=dict)
    pipes: dict[Any, Any] = field(default_factory=dict)  # controlnet key (or None) -> pipeline

    @property
    def family(self) -> Family:
        return self.source.family


@dataclass
class Prepared:
    """A pipeline ready to denoise one request (see :meth:`Runner.prepare`)."""

    pipe: Any
    bundle: BaseBundle
    control: Any
    tiers: list[TierRow]
    pinned: list[Any]
    fetch_s: float
    switch_s: float


def resolve_device(device: str) -> "torch.device":
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise errors.InvalidArgument("--device cuda: CUDA is not available on this host")
    return torch.device(device)


def resolve_dtype(dtype: str, device: "torch.device") -> "torch.dtype":
    import torch

    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise errors.InvalidArgument(f"--dtype {dtype}: choose auto, bf16, fp16 or fp32")
    return getattr(torch, _DTYPES[dtype])


def _warm_imports() -> None:
    """Import the pipeline classes now, so per-request timings measure models, not imports."""
    import diffusers
    import transformers

    for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionControlNetPipeline",
                 "StableDiffusionXLControlNetPipeline", "UNet2DConditionModel", "AutoencoderKL", "ControlNetModel"):
        getattr(diffusers, name)
    _ = transformers.CLIPTextModel


def _load_optimizer() -> tuple[Callable[[Any], Any], Callable[[Any, Any], None]] | None:
    try:
        from .optimize import optimize, weights_changed
    except Exception as exc:  # ImportError, or kernels that cannot load on this host
        log.warning("optimized kernels unavailable (%s): running the stock pipeline", exc)
        return None
    return optimize, weights_changed


class Runner:
    """Runs requests in one process, keeping models in the device and host-RAM tiers between them."""

    def __init__(
        self,
        device: str = "auto",
        dtype: str = "auto",
        optimize: bool = True,
        host_budget: int | None = None,
        device_budget: int | None = None,
        meta: str | None = None,
        loader: Callable[[str], dict[str, "torch.Tensor"]] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.meta = meta
        dev_default, host_default = default_budgets(self.device)
        if loader is None:
            from sdcache.client import load_safetensors

            def loader(url: str) -> dict[str, "torch.Tensor"]:
                return load_safetensors(url, meta=meta) if url.startswith("sdcache://") else load_safetensors(url)

        self.cache = ModelCache(
            loader,
            host_budget=host_default if host_budget is None else host_budget,
            device_budget=dev_default if device_budget is None else device_budget,
        )
        _warm_imports()
        self._optimizer = _load_optimizer() if optimize else None
        self.optimize_state = "off" if not optimize else ("on" if self._optimizer else "unavailable")
        self._sources: dict[str, sources.BaseSource] = {}
        self._cn_sources: dict[str, sources.ControlNetSource] = {}

    # ------------------------------------------------------------ the request
    def run(self, req: Request, *, on_step: Callable[[int, int], bool] | None = None) -> RunResult:
        """Produce the images for *req*. Raises :class:`~sdcache.errors.SdcacheError` with one-line messages.

        Image *i* of the batch is made from seed ``seed + i`` alone (one generator
        each), so a seed gives the same image whatever the batch size, as in A1111.
        *on_step(done, total)* is called after every denoising step; when it
        returns False the remaining steps are skipped and the latents reached so
        far are decoded (what A1111's interrupt does).
        """
        import torch

        prep = self.prepare(req)
        try:
            seed = req.seed if req.seed is not None else secrets.randbits(31)
            seeds = [seed + i for i in range(req.batch_size)]
            width, height = req.size if req.size else (None, None)
            kwargs: dict[str, Any] = dict(
                prompt=req.prompt, negative_prompt=req.negative_prompt or None, num_inference_steps=req.steps,
                guidance_scale=req.guidance, num_images_per_prompt=req.batch_size,
                generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds], output_type="pil",
            )
            if req.init_image is not None:
                kwargs["strength"] = req.strength
                kwargs["image"] = self._fit(req.init_image, req.size)
            else:
                kwargs.update(height=height, width=width)
            if prep.control is not None:
                kwargs["control_image" if req.init_image is not None else "image"] = prep.control
                kwargs["controlnet_conditioning_scale"] = req.controlnet_scale
            if on_step is not None:
                total = self._steps_run(req)

                def step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                    if not on_step(i + 1, total):
                        pipe._interrupt = True
                    return tensors

                kwargs["callback_on_step_end"] = step_end
            t0 = time.perf_counter()
            with torch.inference_mode():
                images = prep.pipe(**kwargs).images
            denoise_s = time.perf_counter() - t0
            DENOISE_SECONDS.observe(denoise_s)
        finally:
            self.release(prep)
        return RunResult(
            image=images[0], seed=seed, width=images[0].width, height=images[0].height, fetch_s=prep.fetch_s,
            switch_s=prep.switch_s, denoise_s=denoise_s, tiers=prep.tiers, optimize=self.optimize_state,
            family=prep.bundle.family.label, images=list(images), seeds=seeds,
        )

    @staticmethod
    def _steps_run(req: Request) -> int:
        """Denoising steps the pipeline will take: img2img runs the last *strength* of the schedule."""
        if req.init_image is None:
            return req.steps
        return max(1, min(req.steps, int(req.steps * req.strength)))

    @staticmethod
    def _fit(image: "Image.Image", size: tuple[int, int] | None) -> "Image.Image":
        from PIL import Image

        image = image.convert("RGB")
        if size and image.size != tuple(size):
            image = image.resize(tuple(size), Image.Resampling.LANCZOS)
        return image

    def prepare(self, req: Request) -> "Prepared":
        """Fetch and switch: everything up to a pipeline ready to denoise *req*.

        The models stay pinned in the device tier until :meth:`release`.
        """
        req.validate()
        t0 = time.perf_counter()
        src = self._base_source(req.model)
        cn_src = self._controlnet_source(req.controlnet) if req.controlnet else None
        base_key = ("base", src.url, str(self.device), str(self.dtype))
        cn_key = ("controlnet", cn_src.url, str(self.device), str(self.dtype)) if cn_src else None
        bundle: BaseBundle | None = self.cache.device.get(base_key)
        cn_model = self.cache.device.get(cn_key) if cn_key else None
        for hit in (bundle, cn_model):  # models already built on the device: a load from the device tier
            if hit is not None:
                LOAD_SECONDS_BY_TIER[TIER_DEVICE].observe(time.perf_counter() - t0)
        needed: list[str] = []
        if bundle is None:
            needed += src.urls
        if cn_src is not None and cn_model is None:
            needed += cn_src.files
        lora_cached = {lo.url: ("lora", lo.url) in self.cache.host for lo in req.loras}
        needed += [lo.url for lo in req.loras if not lora_cached[lo.url]]
        files = self.cache.files(needed)
        t_fetch = time.perf_counter()

        tiers: list[TierRow] = []
        pinned: list[Any] = []
        try:
            if bundle is None:  # free the models this one displaces before building it, not after
                evictions = self.cache.device.evictions
                self.cache.device.make_room(sum(tensors_nbytes(files[u][0].values()) for u in src.urls))
                if self.cache.device.evictions != evictions:
                    reclaim()  # the displaced model's memory goes back before the new one is built
                bundle = self._build_base(src, files, tiers)
                self.cache.device.put(base_key, bundle, bundle.nbytes, pin=True)
            else:
                self.cache.device.pin(base_key)
                tiers += [TierRow(c, src.url, TIER_DEVICE) for c in bundle.modules]
            pinned.append(base_key)
            if cn_src is not None and cn_key is not None:
                if cn_model is None:
                    cn_model = self._build_controlnet(cn_src, files, bundle)
                    tier = self._files_tier(cn_src.files, files)
                    self.cache.device.put(cn_key, cn_model, components.module_nbytes(cn_model), pin=True)
                else:
                    self._check_controlnet_fits(cn_src.url, cn_model.config, bundle)
                    tier = TIER_DEVICE
                    self.cache.device.pin(cn_key)
                pinned.append(cn_key)
                tiers.append(TierRow("controlnet", cn_src.url, tier))
            self._switch_loras(bundle, req, files, lora_cached, tiers, base_key)
            pipe = self._pipeline(bundle, cn_key, cn_model, img2img=req.init_image is not None)
            prediction = bundle.prediction_type if req.prediction_type == "auto" else req.prediction_type
            pipe.scheduler = make_scheduler(req.scheduler, bundle.scheduler_config, prediction)
            control = self._control_image(req) if cn_src else None
        except BaseException:
            for k in pinned:
                self.cache.device.unpin(k)
            raise
        t_switch = time.perf_counter()
        return Prepared(pipe, bundle, control, tiers, pinned, t_fetch - t0, t_switch - t_fetch)

    def prefetch(self, req: Request) -> list[str]:
        """Bring the files *req* needs into host RAM now, ahead of its turn; the URLs it loaded.

        For a request waiting in a queue (``serve``): when its turn comes, the
        fetch is done. Thread-safe with :meth:`run` (a file being loaded by one
        is waited for by the other, never read twice).
        """
        src = self._base_source(req.model)
        urls = [] if ("base", src.url, str(self.device), str(self.dtype)) in self.cache.device else list(src.urls)
        if req.controlnet:
            cn = self._controlnet_source(req.controlnet)
            if ("controlnet", cn.url, str(self.device), str(self.dtype)) not in self.cache.device:
                urls += cn.files
        urls += [lo.url for lo in req.loras if ("lora", lo.url) not in self.cache.host]
        todo = [u for u in dict.fromkeys(urls) if not self.cache.has_file(u)]
        self.cache.files(todo)
        return todo

    def release(self, prep: "Prepared") -> None:
        """Unpin what :meth:`prepare` pinned: the models may now be evicted when room is needed."""
        for k in prep.pinned:
            self.cache.device.unpin(k)
        prep.pinned = []

    def loaded(self, model_url: str) -> BaseBundle | None:
        """The base model *model_url* as built on the device, if the device tier holds it."""
        key = ("base", model_url, str(self.device), str(self.dtype))
        return self.cache.device.get(key) if key in self.cache.device else None

    # ------------------------------------------------------------ sources
    def _base_source(self, url: str) -> sources.BaseSource:
        src = self._sources.get(url)
        if src is None:
            src = self._sources[url] = sources.resolve_base(url, self.meta)
        return src

    def _controlnet_source(self, url: str) -> sources.ControlNetSource:
        src = self._cn_sources.get(url)
        if src is None:
            src = self._cn_sources[url] = sources.resolve_controlnet(url, self.meta)
        return src

    @staticmethod
    def _files_tier(urls: list[str], files: Mapping[str, tuple[Any, str]]) -> str:
        tiers = {files[u][1] for u in urls}
        for t in ("cluster", "store", "disk", TIER_RAM):
            if t in tiers:
                return t
        return TIER_RAM

    # ------------------------------------------------------------ building
    def _build_base(self, src: sources.BaseSource, files: Mapping[str, tuple[Any, str]],
                    tiers: list[TierRow]) -> BaseBundle:
        fam = src.family
        if src.layout == "single":
            ckpt = files[src.url][0]
            parts = checkpoint.split_single_file(fam, ckpt)

            def std(name: str) -> float | None:
                t = ckpt.get(name)
                return None if t is None else float(t.float().std(unbiased=False))

            prediction = checkpoint.prediction_type(fam, std, ckpt.keys(), src.metadata)
        else:
            parts = {}
            for comp in fam.components:
                sd: dict[str, Any] = {}
                for u in src.files[comp]:
                    sd.update(files[u][0])
                parts[comp] = (src.configs[comp], sd)
            prediction = src.scheduler_config.get("prediction_type", "epsilon")

        def build(comp: str) -> "torch.nn.Module":
            cfg, sd = parts[comp]
            return components.build_module(
                fam.components[comp], cfg, sd, self.device, self.dtype, f"{comp} of {src.url}"
            )

        with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="sdcache-build") as ex:
            futs = {c: ex.submit(build, c) for c in fam.components}
            modules = {c: f.result() for c, f in futs.items()}
        for comp in fam.components:
            tiers.append(TierRow(comp, src.url, self._files_tier(src.files[comp], files)))
        toks = {}
        for name, tcfg in fam.tokenizers.items():
            own = src.tokenizers.get(name)
            toks[name] = (
                tokenizer_from_files(own.vocab_json, own.merges_txt, own.config)
                if own is not None
                else clip_tokenizer(tcfg["pad_token"], int(tcfg.get("model_max_length", 77)))
            )
        nbytes = sum(components.module_nbytes(m) for m in modules.values())
        return BaseBundle(
            source=src, modules=modules, tokenizers=toks, scheduler_config=dict(src.scheduler_config),
            prediction_type=prediction, nbytes=nbytes, patcher=lora.LoraPatcher(modules),
            index=lora.target_index(modules, fam.is_xl),
        )

    def _build_controlnet(self, src: sources.ControlNetSource, files: Mapping[str, tuple[Any, str]],
                          bundle: BaseBundle) -> "torch.nn.Module":
        unet_cfg = dict(bundle.modules["unet"].config)
        sd: dict[str, Any] = {}
        for u in src.files:
            sd.update(files[u][0])
        if src.layout == "single":
            cfg, sd = checkpoint.convert_controlnet(sd, unet_cfg)
        else:
            cfg = dict(src.config or {})
        self._check_controlnet_fits(src.url, cfg, bundle)
        return components.build_module("ControlNetModel", cfg, sd, self.device, self.dtype, f"ControlNet {src.url}")

    @staticmethod
    def _check_controlnet_fits(url: str, cfg: Mapping[str, Any], bundle: BaseBundle) -> None:
        """One line when a ControlNet was made for another architecture than the base model."""
        unet_cfg = bundle.modules["unet"].config
        cn_dim, base_dim = cfg.get("cross_attention_dim"), unet_cfg.get("cross_attention_dim")
        same = (
            cn_dim in (None, base_dim)
            and cfg.get("addition_embed_type") == unet_cfg.get("addition_embed_type")
            and list(cfg.get("block_out_channels") or []) == list(unet_cfg.get("block_out_channels") or [])
        )
        if not same:
            made_for = label_for_cross_attention_dim(int(cn_dim)) if cn_dim else None
            if made_for is None:
                made_for = "SDXL" if cfg.get("addition_embed_type") == "text_time" else "another architecture"
            raise errors.InvalidArgument(
                f"ControlNet {url} is for {made_for} (text features {cn_dim} wide); the base model is"
                f" {bundle.family.label} ({base_dim})"
            )

    # ------------------------------------------------------------ LoRAs
    def _lora_file(self, url: str, files: Mapping[str, tuple[Any, str]]) -> lora.LoraFile:
        def make() -> tuple[lora.LoraFile, int]:
            sd, _ = files[url]
            lf = lora.parse_lora(url, sd)
            return lf, max(lf.nbytes, tensors_nbytes(sd.values()))

        lf, _ = self.cache.derived(("lora", url), make)
        self.cache.host.pop(("file", url))  # the parsed LoRA holds the same tensors
        return lf

    def _switch_loras(self, bundle: BaseBundle, req: Request, files: Mapping[str, tuple[Any, str]],
                      lora_cached: Mapping[str, bool], tiers: list[TierRow], base_key: Any) -> None:
        want = tuple((lo.url, float(lo.scale)) for lo in req.loras)
        already = want == bundle.patcher.applied
        chosen: list[tuple[lora.ResolvedLora, float]] = []
        for lo in req.loras:
            r = bundle.resolved.get(lo.url)
            if r is None:
                lf = self._lora_file(lo.url, files)
                r = lora.resolve(lf, bundle.modules, bundle.index, bundle.family.label, bundle.family.name)
                bundle.resolved[lo.url] = r
            chosen.append((r, lo.scale))
            tier = TIER_DEVICE if already else (TIER_RAM if lora_cached[lo.url] else files[lo.url][1])
            tiers.append(TierRow("lora", lo.url, tier, f"x{lo.scale:g}, {r.summary}"))
        if self._optimizer is not None and bundle.patcher.merge_reason is None:
            from .lora_paths import compile_expected

            if compile_expected(self.device):  # hooks on a compiled UNet would recompile it on every switch
                bundle.patcher.merge_reason = "the optimized pipeline is torch.compile'd"
        changed = bundle.patcher.switch(chosen)
        if changed:
            self.cache.device.resize(base_key, bundle.nbytes + bundle.patcher.extra_nbytes)
            edited = bundle.patcher.weights_edited  # side paths leave weights (and what is packed from them) alone
            if edited:
                reclaim()  # a merge or unmerge frees the weights' backups or working copies
            if self._optimizer is not None and edited:
                for pipe in bundle.pipes.values():
                    self._optimizer[1](pipe, edited)
        if len(bundle.resolved) > 16:  # keep the mapped factors of recent LoRAs only
            keep = {u for u, _ in bundle.patcher.applied}
            for u in list(bundle.resolved)[: len(bundle.resolved) - 16]:
                if u not in keep:
                    bundle.resolved.pop(u)

    # ------------------------------------------------------------ pipeline
    def _pipeline(self, bundle: BaseBundle, cn_key: Any, cn_model: Any, *, img2img: bool = False) -> Any:
        """The pipeline for the base (+ ControlNet), txt2img or img2img, over the same built modules."""
        key = (cn_key, "img2img") if img2img else cn_key
        pipe = bundle.pipes.get(key)
        if pipe is not None and (cn_key is None or pipe.controlnet is cn_model):
            return pipe
        pipe = assemble(
            bundle.family, bundle.modules, bundle.tokenizers,
            make_scheduler("euler", bundle.scheduler_config), cn_model, bundle.source.pipeline_kwargs,
            img2img=img2img,
        )
        if self._optimizer is not None:
            pipe = self._optimizer[0](pipe) or pipe
        if cn_key is not None:  # a ControlNet pipeline per ControlNet: drop the others of this base
            for k in [k for k in bundle.pipes if k not in (None, (None, "img2img"), cn_key, (cn_key, "img2img"))]:
                bundle.pipes.pop(k)
        bundle.pipes[key] = pipe
        return pipe

    def _control_image(self, req: Request) -> "Image.Image":
        from PIL import Image, UnidentifiedImageError

        assert req.control_image is not None
        if not isinstance(req.control_image, str):
            return self._fit(req.control_image, req.size)
        try:
            fs, path = sources.url_fs(req.control_image, self.meta)
            with fs.open(path, "rb") as f:
                img = Image.open(f)
                img.load()
        except FileNotFoundError:
            raise errors.NotFound(f"control image not found: {req.control_image}") from None
        except UnidentifiedImageError:
            raise errors.InvalidArgument(f"control image {req.control_image} is not an image") from None
        img = img.convert("RGB")
        if req.size:
            img = img.resize(req.size, Image.Resampling.BICUBIC)
        return img
