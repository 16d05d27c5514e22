"""The runner's tiered model cache: device memory, then host RAM, then the cluster.

* **device** tier: built modules (a base model's UNet/VAE/text encoders, a
  ControlNet) already on the target device in the run dtype. A hit costs
  nothing. On a CPU-only host this tier is the modules held in RAM; its default
  budget there is 0, which keeps only the model in use.
* **ram** tier: loaded files (``load_safetensors`` results: one buffer, tensor
  views) and parsed LoRAs in host memory. A hit costs building modules from
  them (zero-copy on the CPU when the dtype matches, one host-to-device copy
  on a GPU).
* below that, ``load_safetensors`` fetches the file: from the cache cluster
  for ``sdcache://`` URLs (tier ``cluster``), from local disk for paths
  (``disk``), from any other fsspec store (``store``).

Each tier has a byte budget and evicts least recently used entries first;
entries in use by the running request are pinned. An entry larger than the
whole budget is served but not kept.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .metrics import LOAD_SECONDS_BY_TIER

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

V = TypeVar("V")

TIER_DEVICE = "device"
TIER_RAM = "ram"


def source_tier(url: str) -> str:
    """The tier a fresh load of *url* comes from."""
    if url.startswith("sdcache://"):
        return "cluster"
    if "://" in url and not url.startswith("file://"):
        return "store"
    return "disk"


@dataclass
class _Entry(Generic[V]):
    value: V
    nbytes: int
    pins: int = 0


class ByteLRU(Generic[V]):
    """A least-recently-used map bounded by the bytes of its values.

    Thread-safe. :meth:`put` evicts unpinned entries, oldest first, until the
    total fits the budget; *on_evict* hears of each eviction.
    """

    def __init__(self, name: str, budget: int, on_evict: Callable[[Hashable, V], None] | None = None) -> None:
        self.name = name
        self.budget = int(budget)
        self._items: OrderedDict[Hashable, _Entry[V]] = OrderedDict()
        self._lock = threading.RLock()
        self._on_evict = on_evict
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def used(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._items.values())

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items)

    def entries(self) -> list[tuple[Hashable, int]]:
        """(key, bytes) of every entry, least recently used first (what a runner reports to the router)."""
        with self._lock:
            return [(k, e.nbytes) for k, e in self._items.items()]

    def get(self, key: Hashable) -> V | None:
        """The value for *key* (now most recently used), or None."""
        with self._lock:
            e = self._items.get(key)
            if e is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return e.value

    def put(self, key: Hashable, value: V, nbytes: int, pin: bool = False) -> bool:
        """Insert *value* (pinned once if *pin*); False when it exceeds the budget and was not kept.

        A pinned entry is kept whatever its size: it is in use. Unpinned, it is
        evicted like any other when room is needed.
        """
        with self._lock:
            old = self._items.pop(key, None)
            pins = (old.pins if old else 0) + (1 if pin else 0)
            if nbytes > self.budget and not pins:
                self._evict_until(self.budget)  # still make room for what comes next
                log.info("%s tier: %s (%d bytes) exceeds the %d-byte budget, not kept",
                         self.name, key, nbytes, self.budget)
                return False
            self._items[key] = _Entry(value, int(nbytes), pins)
            self._evict_until(self.budget)
            return True

    def resize(self, key: Hashable, nbytes: int) -> None:
        """Record that *key*'s value now holds *nbytes* (e.g. LoRA working copies were added)."""
        with self._lock:
            e = self._items.get(key)
            if e is not None:
                e.nbytes = int(nbytes)
                self._evict_until(self.budget)

    def make_room(self, nbytes: int) -> None:
        """Evict unpinned entries, oldest first, until *nbytes* more would fit the budget.

        Called before a new model is built, so that a tier with room for one model
        frees the previous one first: the peak is one built model, not two.
        """
        with self._lock:
            self._evict_until(max(0, self.budget - int(nbytes)))

    def pin(self, key: Hashable) -> None:
        with self._lock:
            e = self._items.get(key)
            if e is not None:
                e.pins += 1

    def unpin(self, key: Hashable) -> None:
        with self._lock:
            e = self._items.get(key)
            if e is not None and e.pins:
                e.pins -= 1

    def pop(self, key: Hashable) -> V | None:
        with self._lock:
            e = self._items.pop(key, None)
            return e.value if e else None

    def clear(self) -> None:
        with self._lock:
            for k in list(self._items):
                e = self._items.pop(k)
                if self._on_evict:
                    self._on_evict(k, e.value)

    def _evict_until(self, budget: int) -> None:
        total = sum(e.nbytes for e in self._items.values())
        for k in list(self._items):
            if total <= budget:
                break
            e = self._items[k]
            if e.pins:
                continue
            del self._items[k]
            total -= e.nbytes
            self.evictions += 1
            log.info("%s tier: evicted %s (%d bytes)", self.name, k, e.nbytes)
            if self._on_evict:
                self._on_evict(k, e.value)


def reclaim() -> None:
    """Give freed model memory back to the OS: collect reference cycles, then trim malloc's arenas.

    A built model is thousands of tensors allocated from several threads' malloc
    arenas, and LoRA hooks tie modules into reference cycles. Without this, a
    long-running ``serve`` that switches base models grows by a model's size
    every few switches (measured: 2.5 to 4.7 GiB over ten SD1.5 requests with
    LoRAs; flat at 2.6-3.4 GiB with it). Costs tens of milliseconds, against
    the seconds of the switch it follows.
    """
    import gc

    gc.collect()
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL("libc.so.6")
    return _LIBC


def physical_memory() -> int:
    """Bytes of RAM this process may use: the host's, or its cgroup's memory limit where that is lower.

    In a container the host's RAM is not what the kernel lets the pod use: a
    default of half the host would be OOM-killed under a smaller limit.
    """
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        host = 16 << 30
    limit = cgroup_memory_limit()
    return min(host, limit) if limit else host


def cgroup_memory_limit(root: str = "/sys/fs/cgroup") -> int | None:
    """This process's cgroup memory limit in bytes (v2 ``memory.max``, else v1), None when unlimited."""
    candidates = []
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":  # v2 unified hierarchy
                    candidates.append(os.path.join(root, path.lstrip("/"), "memory.max"))
                elif "memory" in controllers.split(","):
                    candidates.append(os.path.join(root, "memory", path.lstrip("/"), "memory.limit_in_bytes"))
    except (OSError, ValueError):
        pass
    candidates += [os.path.join(root, "memory.max"), os.path.join(root, "memory", "memory.limit_in_bytes")]
    for p in candidates:
        try:
            with open(p) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            n = int(text)
        except ValueError:
            continue
        return n if 0 < n < (1 << 60) else None  # v1 says "unlimited" with a huge number
    return None


def default_budgets(device: "torch.device") -> tuple[int, int]:
    """(device, host) budgets: 60% of the GPU (0 on a CPU: only the model in use), half the RAM (or cgroup limit)."""
    host = physical_memory() // 2
    if device.type == "cuda":
        import torch

        total = torch.cuda.get_device_properties(device).total_memory
        return int(total * 0.6), host
    return 0, host


def tensors_nbytes(tensors: Iterable["torch.Tensor"]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class ModelCache:
    """Files in host RAM and built models on the device, each an LRU with a byte budget.

    *loader* is ``load_safetensors``-like: ``loader(url) -> dict[str, Tensor]``.
    """

    def __init__(
        self,
        loader: Callable[[str], dict[str, "torch.Tensor"]],
        host_budget: int,
        device_budget: int,
        max_parallel: int = 8,
    ) -> None:
        self._loader = loader
        self.host: ByteLRU[Any] = ByteLRU("ram", host_budget)
        self.device: ByteLRU[Any] = ByteLRU("device", device_budget)
        self._max_parallel = max_parallel
        self._inflight: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    # -- host tier: files
    def file(self, url: str) -> tuple[dict[str, "torch.Tensor"], str]:
        """The tensors of *url* and the tier that served them (``ram`` or where it was loaded from).

        Observes ``sdcache_runner_model_load_seconds`` by that tier (waiting for
        another thread's load of the same file, then taking it from RAM, is ``ram``).
        """
        t0 = time.perf_counter()
        sd, tier = self._file(url)
        LOAD_SECONDS_BY_TIER[tier].observe(time.perf_counter() - t0)
        return sd, tier

    def _file(self, url: str) -> tuple[dict[str, "torch.Tensor"], str]:
        key = ("file", url)
        while True:
            sd = self.host.get(key)
            if sd is not None:
                return sd, TIER_RAM
            with self._lock:
                ev = self._inflight.get(url)
                if ev is None:
                    ev = self._inflight[url] = threading.Event()
                    leader = True
                else:
                    leader = False
            if not leader:
                ev.wait()
                continue  # the leader's result is in the host tier now (or it failed: try ourselves)
            try:
                sd = self._loader(url)
                self.host.put(key, sd, tensors_nbytes(sd.values()))
                return sd, source_tier(url)
            finally:
                with self._lock:
                    self._inflight.pop(url, None)
                ev.set()

    def files(self, urls: Iterable[str]) -> dict[str, tuple[dict[str, "torch.Tensor"], str]]:
        """:meth:`file` for every URL, loaded in parallel threads."""
        urls = list(dict.fromkeys(urls))
        if len(urls) <= 1:
            return {u: self.file(u) for u in urls}
        workers = min(self._max_parallel, len(urls))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdcache-fetch") as ex:
            futs = {u: ex.submit(self.file, u) for u in urls}
            return {u: f.result() for u, f in futs.items()}

    def has_file(self, url: str) -> bool:
        return ("file", url) in self.host

    # -- host tier: derived objects (parsed LoRAs)
    def derived(self, key: Hashable, make: Callable[[], tuple[Any, int]]) -> tuple[Any, bool]:
        """A host-tier object for *key*, made by *make* -> (value, nbytes) on a miss; (value, was_hit)."""
        v = self.host.get(key)
        if v is not None:
            return v, True
        v, n = make()
        self.host.put(key, v, n)
        return v, False

    def stats(self) -> dict[str, Any]:
        return {
            t.name: {"entries": len(t), "used": t.used, "budget": t.budget, "hits": t.hits, "misses": t.misses,
                     "evictions": t.evictions}
            for t in (self.device, self.host)
        }
