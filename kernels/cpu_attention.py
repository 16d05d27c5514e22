"""bf16 flash attention for CPUs with AVX512-BF16 and no AMX (see ``cpu_attention.cpp``).

The C++ kernel is compiled on first use with ``torch.utils.cpp_extension`` (about a minute,
once per machine and checkout: the build is cached under ``~/.cache/sdcache/torch_extensions``,
or ``$SDCACHE_CACHE_HOME``; ``scripts/install.sh`` builds it). If the CPU lacks the instructions, no compiler is available, the
build fails, or ``SDCACHE_CPU_ATTENTION=0`` is set (``force`` builds it on AMX CPUs too, where
it is correct but slower than SDPA: the tests use that to check it everywhere it can run), :func:`available` says so and callers use
``scaled_dot_product_attention`` instead -- never a wrong result.

Inside ``torch.compile`` the kernel is the opaque custom op ``sdcache::cpu_flash_attention``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["available", "flash_attention", "ready", "supports"]

_SRC = Path(__file__).with_name("cpu_attention.cpp")
_lock = threading.Lock()
_module: Any = None
_failed: str | None = None


def _cpu_ok() -> bool:
    """The instructions are there, and no AMX (SDPA is faster there) unless ``SDCACHE_CPU_ATTENTION=force``."""
    from .ops import _CPU_FLAGS, cpu_has_amx

    needed = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}
    forced = os.environ.get("SDCACHE_CPU_ATTENTION") == "force"
    return needed <= _CPU_FLAGS and (forced or not cpu_has_amx())


def _build_dir() -> Path:
    home = Path(os.environ.get("SDCACHE_CACHE_HOME", Path.home() / ".cache" / "sdcache"))
    d = home / "torch_extensions" / f"cpu_attention_{torch.__version__.replace('+', '_')}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _load() -> Any:
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        if os.environ.get("SDCACHE_CPU_ATTENTION", "1") in ("0", "false", "no"):
            _failed = "disabled by SDCACHE_CPU_ATTENTION=0"
            return None
        if not _cpu_ok():
            _failed = "CPU lacks AVX512-BF16 (or has AMX, where SDPA is faster)"
            return None
        try:
            from torch.utils.cpp_extension import load

            _module = load(
                name="sdcache_cpu_attention",
                sources=[str(_SRC)],
                extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(_build_dir()),
                verbose=False,
            )
        except Exception as exc:  # no compiler, old compiler, ...
            _failed = f"build failed: {exc}"
            log.warning("CPU flash attention unavailable, using SDPA (%s)", str(exc).splitlines()[0][:200])
            return None
    return _module


def ready() -> bool:
    """Whether the kernel is already loaded (never builds; cheap enough for hot paths)."""
    return _module is not None


def available() -> bool:
    """Whether the kernel is (or can be) built and usable here; builds it on first call."""
    return _load() is not None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Shapes/dtypes the kernel handles (bf16 CPU (B, H, L, D), D even and <= 160)."""
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.dim() == k.dim() == v.dim() == 4
        and q.shape[-1] % 2 == 0
        and q.shape[-1] <= 160
        and k.shape[-2] > 0
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    )


@torch.library.custom_op("sdcache::cpu_flash_attention", mutates_args=())
def _flash_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return _load().flash_attention_bf16(q, k, v, scale)


@_flash_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    b, h, lq, d = q.shape
    return q.new_empty((b, lq, h, d)).permute(0, 2, 1, 3)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax(q k^T * scale) v for bf16 (B, H, L, D); output stored as (B, L, H, D)."""
    s = float(scale) if scale is not None else q.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        return torch.ops.sdcache.cpu_flash_attention(q, k, v, s)
    return _load().flash_attention_bf16(q, k, v, s)
