"""Which models the cache holds, named the way A1111 names them, from the metadata service alone.

A listing is one ``List`` call per folder: every file's sha256 was computed
once, at import, and travels in its listing entry, so listing thousands of
models hashes nothing and reads no model byte.

* A **checkpoint** is a ``.safetensors``/``.ckpt`` file under the checkpoints
  folder, or a diffusers folder there (one holding ``model_index.json``),
  titled by its name; a folder's hash is that of its UNet weights file.
  A1111's naming: ``name`` is the path under the folder, ``title`` is
  ``name [sha256[:10]]``, ``model_name`` is ``name`` without its extension
  and with ``/`` as ``_``. A request may name one by title, name, model_name,
  short hash or full sha256.
* A **LoRA** is a weight file under the LoRA folder; ``<lora:NAME:W>`` names
  it by its file stem (A1111's Lora extension) or its path under the folder
  without extension. Its A1111 short hash is sha256[:12].
* A **ControlNet** is a weight file or diffusers folder under the ControlNet
  folder, named by stem or ``stem [sha256[:8]]`` (the ControlNet extension).
"""

from __future__ import annotations

import difflib
import logging
import posixpath
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from sdcache import errors
from sdcache.manifest import Entry

log = logging.getLogger(__name__)

CHECKPOINT_EXTS = (".safetensors", ".ckpt")
WEIGHT_EXTS = (".safetensors",)
UNET_FILES = ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors")
CONTROLNET_FOLDER_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
MAX_MODELS = 200_000  # per folder: a bound on what one refresh keeps in memory


@dataclass(frozen=True)
class Model:
    """One model as A1111's lists show it, with where the runner loads it from."""

    kind: str  # checkpoint, lora, controlnet
    name: str  # path under its folder (checkpoints: with extension; LoRAs: stem)
    path: str  # cache path of the file or folder
    sha256: str  # of the file; of the UNet (checkpoint folders) or weights file (ControlNet folders)
    size: int  # bytes of every file the model loads (what a switch fetches)
    folder: bool = False
    alias: str = ""

    @property
    def url(self) -> str:
        return "sdcache:/" + self.path

    @property
    def short_hash(self) -> str:
        return self.sha256[: {"checkpoint": 10, "lora": 12, "controlnet": 8}[self.kind]]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]" if self.sha256 else self.name

    @property
    def model_name(self) -> str:
        stem = self.name if self.folder else posixpath.splitext(self.name)[0]
        return stem.replace("/", "_")

    def names(self) -> Iterator[str]:
        """Every name a request may use for this model."""
        yield self.title
        yield self.name
        yield self.model_name
        if self.alias:
            yield self.alias
        if self.kind != "checkpoint":
            yield posixpath.basename(self.name)
        if self.sha256:
            yield self.sha256
            yield self.short_hash
            yield self.sha256[:10]

    def a1111(self) -> dict[str, object]:
        """The row of ``GET /sdapi/v1/sd-models`` (checkpoints) or ``/loras``."""
        if self.kind == "lora":
            return {"name": posixpath.basename(self.name), "alias": self.alias or posixpath.basename(self.name),
                    "path": self.path, "metadata": {}, "sha256": self.sha256}
        return {"title": self.title, "model_name": self.model_name, "hash": self.short_hash,
                "sha256": self.sha256, "filename": self.path, "config": None}


class Catalog:
    """The checkpoints, LoRAs and ControlNets under three cache folders; refreshed on demand."""

    def __init__(self, meta: object, checkpoints: str = "/models/checkpoints", loras: str = "/models/loras",
                 controlnets: str = "/models/controlnet", *, max_age: float = 30.0) -> None:
        self._meta = meta  # a MetaClient (typed loosely: this module is imported by torch-free code)
        self.folders = {"checkpoint": checkpoints.rstrip("/") or "/", "lora": loras.rstrip("/") or "/",
                        "controlnet": controlnets.rstrip("/") or "/"}
        self.max_age = max_age
        self._lock = threading.Lock()
        self._models: dict[str, list[Model]] = {k: [] for k in self.folders}
        self._index: dict[str, dict[str, Model]] = {k: {} for k in self.folders}
        self._lower: dict[str, dict[str, Model]] = {k: {} for k in self.folders}
        self.refreshed_at = 0.0

    # -- listing ------------------------------------------------------------------
    def refresh(self) -> None:
        """List the three folders again (``POST /sdapi/v1/refresh-checkpoints``)."""
        found = {kind: self._scan(kind, folder) for kind, folder in self.folders.items()}
        with self._lock:
            for kind, models in found.items():
                models.sort(key=lambda m: m.name)
                self._models[kind] = models
                index: dict[str, Model] = {}
                for m in models:
                    for n in m.names():
                        index.setdefault(n, m)
                self._index[kind] = index
                self._lower[kind] = {n.lower(): m for n, m in reversed(list(index.items()))}
            self.refreshed_at = time.monotonic()
        log.info("catalog: %d checkpoints, %d LoRAs, %d ControlNets", *(len(found[k]) for k in self.folders))

    def models(self, kind: str) -> list[Model]:
        self._fresh()
        with self._lock:
            return list(self._models[kind])

    def _fresh(self) -> None:
        if time.monotonic() - self.refreshed_at > self.max_age:
            self.refresh()

    def _list(self, path: str) -> list[Entry]:
        try:
            return list(self._meta.list(path))  # type: ignore[attr-defined]
        except (errors.NotFound, errors.NotADirectory):
            return []

    def _scan(self, kind: str, folder: str) -> list[Model]:
        out: list[Model] = []
        stack = [folder]
        while stack and len(out) < MAX_MODELS:
            d = stack.pop()
            entries = self._list(d)
            names = {posixpath.basename(e.path): e for e in entries}
            if d != folder and self._is_model_folder(kind, names):
                model = self._folder_model(kind, folder, d)
                if model is not None:
                    out.append(model)
                continue
            for e in entries:
                if e.is_dir:
                    stack.append(e.path)
                elif self._is_weight_file(kind, e.path):
                    rel = posixpath.relpath(e.path, folder)
                    name = posixpath.splitext(rel)[0] if kind == "lora" else rel
                    out.append(Model(kind, name, e.path, e.sha256, e.size))
        return out

    @staticmethod
    def _is_weight_file(kind: str, path: str) -> bool:
        return path.endswith(CHECKPOINT_EXTS if kind == "checkpoint" else WEIGHT_EXTS)

    @staticmethod
    def _is_model_folder(kind: str, names: dict[str, Entry]) -> bool:
        if kind == "checkpoint":
            return "model_index.json" in names
        if kind == "controlnet":
            return "config.json" in names and any(f in names for f in CONTROLNET_FOLDER_FILES)
        return False

    def _folder_model(self, kind: str, folder: str, d: str) -> Model | None:
        """A diffusers folder: its hash is its UNet's (checkpoints) or its weights file's (ControlNets)."""
        size = 0
        sha = ""
        stack = [d]
        while stack:
            for e in self._list(stack.pop()):
                if e.is_dir:
                    stack.append(e.path)
                    continue
                size += e.size
                rel = posixpath.relpath(e.path, d)
                if rel in (UNET_FILES if kind == "checkpoint" else CONTROLNET_FOLDER_FILES) and not sha:
                    sha = e.sha256
        return Model(kind, posixpath.relpath(d, folder), d, sha, size, folder=True)

    # -- lookup -------------------------------------------------------------------
    def find(self, kind: str, name: str) -> Model:
        """The model a request names; :class:`~sdcache.errors.NotFound` naming the closest ones otherwise."""
        for attempt in range(2):
            if attempt:
                self.refresh()  # a model imported since the last listing
            else:
                self._fresh()
            with self._lock:
                hit = self._index[kind].get(name) or self._lower[kind].get(name.lower())
                if hit is None and name.endswith("]") and " [" in name:  # a title whose hash changed
                    hit = self._index[kind].get(name.rsplit(" [", 1)[0])
                if hit is not None:
                    return hit
        with self._lock:
            names = [m.title if kind == "checkpoint" else m.name for m in self._models[kind]]
        what = {"checkpoint": "model", "lora": "LoRA", "controlnet": "ControlNet"}[kind]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.0)
        hint = f"; closest: {', '.join(close)}" if close else f"; none under {self.folders[kind]}"
        raise errors.NotFound(f"unknown {what} {name!r}{hint}")
