"""Triton kernels for the runner's GPU path: fused GroupNorm(+temb add)+SiLU and fused GEGLU.

Triton is imported lazily (first use of :func:`available` or a kernel), so importing this
module costs nothing on machines without Triton. The kernels run on CUDA tensors and, when
``TRITON_INTERPRET=1`` was set before Triton was first imported, on CPU tensors through
Triton's interpreter; that is how CI checks them without a GPU.

Why these two: in a Stable Diffusion UNet every ResnetBlock2D does ``GroupNorm -> SiLU`` twice
(the second after adding the time embedding) and every transformer block does
``Linear -> chunk -> a * gelu(g)``. Stock PyTorch runs each as 2-3 separate memory-bound kernels
and materialises the intermediates; here each is one read and one write (plus a statistics
read for the norm). Attention and the QKV projection need no custom kernel: a single GEMM over
concatenated weights and ``scaled_dot_product_attention`` (FlashAttention / cuDNN) are already
the fastest paths; see ``ops.py``.

All arithmetic is in fp32 whatever the storage dtype; results are rounded once on store.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["available", "interpreting", "group_norm_silu", "geglu"]


@functools.cache
def _triton() -> tuple[Any, Any] | None:
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # ImportError, or a broken install
        log.info("triton unavailable: %s", exc)
        return None
    return triton, tl


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(t: torch.Tensor | None = None) -> bool:
    """Whether the Triton kernels can run on tensor ``t`` (CUDA, or CPU under the interpreter)."""
    if _triton() is None:
        return False
    if t is None:
        return torch.cuda.is_available() or interpreting()
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and interpreting()


@functools.cache
def _kernels() -> dict[str, Any]:
    """Define the @triton.jit kernels on first use (keeps ``import triton`` lazy)."""
    mod = _triton()
    if mod is None:
        raise RuntimeError("triton is not installed")
    triton, tl = mod

    @triton.jit
    def gn_stats_kernel(
        X, TEMB, PART,  # PART: (N*G, SPLIT, 3) fp32 -> count, mean, M2
        C, S, CG, G, s_n, s_c, s_s, t_n, t_c, CHUNK, SPLIT,
        HAS_TEMB: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        ng = tl.program_id(0)
        sp = tl.program_id(1)
        n = ng // G
        g = ng % G
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        chan = g * CG + offs_c
        base = X + n * s_n + chan * s_c
        if HAS_TEMB:
            tv = tl.load(TEMB + n * t_n + chan * t_c, mask=mask_c, other=0.0).to(tl.float32)
        s_lo = sp * CHUNK
        s_hi = tl.minimum(s_lo + CHUNK, S)
        cnt = tl.zeros((), dtype=tl.float32)
        mean = tl.zeros((), dtype=tl.float32)
        m2 = tl.zeros((), dtype=tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = (offs_s < s_hi)[:, None] & mask_c[None, :]
            x = tl.load(base[None, :] + offs_s[:, None] * s_s, mask=mask, other=0.0).to(tl.float32)
            if HAS_TEMB:
                x = tl.where(mask, x + tv[None, :], 0.0)
            n_t = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
            t_mean = tl.sum(tl.sum(x, axis=1), axis=0) / tl.maximum(n_t, 1.0)
            d = tl.where(mask, x - t_mean, 0.0)
            t_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
            new_cnt = cnt + n_t
            delta = t_mean - mean
            mean = mean + delta * (n_t / tl.maximum(new_cnt, 1.0))
            m2 = m2 + t_m2 + delta * delta * (cnt * n_t / tl.maximum(new_cnt, 1.0))
            cnt = new_cnt
        out = PART + (ng * SPLIT + sp) * 3
        tl.store(out, cnt)
        tl.store(out + 1, mean)
        tl.store(out + 2, m2)

    @triton.jit
    def gn_apply_kernel(
        X, TEMB, W, B, MEAN, RSTD, Y,
        C, S, CG, G, s_n, s_c, s_s, t_n, t_c, y_n, y_c, y_s, CHUNK,
        HAS_TEMB: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        ng = tl.program_id(0)
        sp = tl.program_id(1)
        n = ng // G
        g = ng % G
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        chan = g * CG + offs_c
        mean = tl.load(MEAN + ng)
        rstd = tl.load(RSTD + ng)
        scale = tl.zeros((BLOCK_C,), dtype=tl.float32) + rstd
        if HAS_W:
            scale = scale * tl.load(W + chan, mask=mask_c, other=0.0).to(tl.float32)
        shift = -mean * scale
        if HAS_B:
            shift = shift + tl.load(B + chan, mask=mask_c, other=0.0).to(tl.float32)
        if HAS_TEMB:
            tv = tl.load(TEMB + n * t_n + chan * t_c, mask=mask_c, other=0.0).to(tl.float32)
        s_lo = sp * CHUNK
        s_hi = tl.minimum(s_lo + CHUNK, S)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = (offs_s < s_hi)[:, None] & mask_c[None, :]
            x = tl.load(X + n * s_n + chan[None, :] * s_c + offs_s[:, None] * s_s, mask=mask, other=0.0)
            x = x.to(tl.float32)
            if HAS_TEMB:
                x = x + tv[None, :]
            y = x * scale[None, :] + shift[None, :]
            if SILU:
                y = y / (1.0 + tl.exp(-y))
            ptr = Y + n * y_n + chan[None, :] * y_c + offs_s[:, None] * y_s
            tl.store(ptr, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def geglu_kernel(H, Y, D, h_row, y_row, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < D
        a = tl.load(H + row * h_row + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(H + row * h_row + D + offs, mask=mask, other=0.0).to(tl.float32)
        y = a * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
        tl.store(Y + row * y_row + offs, y.to(Y.dtype.element_ty), mask=mask)

    return {"gn_stats": gn_stats_kernel, "gn_apply": gn_apply_kernel, "geglu": geglu_kernel}


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _as_ncs(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int, int]:
    """View ``x`` (N, C, *spatial) as (N, C, S) strides without copying when it is NCHW- or
    NHWC-dense; otherwise copy to contiguous. Returns (x, N, C, S, s_n, s_c, s_s)."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(1, n * c)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x, n, c, s, x.stride(0), 1, c  # type: ignore[return-value]
    if not x.is_contiguous():
        x = x.contiguous()
    return x, n, c, s, c * s, s, 1  # type: ignore[return-value]


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    *,
    temb: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """``silu(group_norm(x + temb[:, :, None, None]))`` in two Triton kernels.

    ``x`` is (N, C, *spatial), NCHW-contiguous or channels-last; the output keeps its memory
    format. ``temb`` (optional) is (N, C) and is added before the statistics, as diffusers'
    ResnetBlock2D does with the time embedding. Statistics use Welford/Chan in fp32.
    """
    k = _kernels()
    triton = _triton()[0]  # type: ignore[index]
    n_orig_shape = x.shape
    x, n, c, s, s_n, s_c, s_s = _as_ncs(x)
    if c % num_groups:
        raise ValueError(f"channels {c} not divisible by groups {num_groups}")
    cg = c // num_groups
    y = torch.empty_like(x)  # preserves channels-last
    if x.dim() == 4 and s_c == 1 and c > 1:
        y_n, y_c, y_s = y.stride(0), 1, c
    else:
        y_n, y_c, y_s = c * s, s, 1
    block_c = _next_pow2(cg)
    block_s = max(16, min(1024, 4096 // block_c))
    # Enough programs to fill a large GPU, each with a sizeable slice.
    want = max(1, 512 // max(1, n * num_groups))
    split = max(1, min(want, triton.cdiv(s, block_s * 4)))
    chunk = triton.cdiv(triton.cdiv(s, split), block_s) * block_s
    split = triton.cdiv(s, chunk)
    if temb is not None:
        temb = temb.reshape(n, c)
        t_n, t_c = temb.stride(0), temb.stride(1)
    else:
        t_n = t_c = 0
    part = torch.empty((n * num_groups, split, 3), device=x.device, dtype=torch.float32)
    grid = (n * num_groups, split)
    k["gn_stats"][grid](
        x, temb if temb is not None else x, part,
        c, s, cg, num_groups, s_n, s_c, s_s, t_n, t_c, chunk, split,
        HAS_TEMB=temb is not None, BLOCK_S=block_s, BLOCK_C=block_c,
    )
    cnt, mean_p, m2_p = part.unbind(-1)
    total = cnt.sum(1)
    mean = (cnt * mean_p).sum(1) / total
    m2 = (m2_p + cnt * (mean_p - mean[:, None]) ** 2).sum(1)
    rstd = torch.rsqrt(m2 / total + eps)
    k["gn_apply"][grid](
        x, temb if temb is not None else x,
        weight if weight is not None else x, bias if bias is not None else x,
        mean.contiguous(), rstd.contiguous(), y,
        c, s, cg, num_groups, s_n, s_c, s_s, t_n, t_c, y_n, y_c, y_s, chunk,
        HAS_TEMB=temb is not None, HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
        BLOCK_S=block_s, BLOCK_C=block_c,
    )
    return y.view(n_orig_shape) if y.shape != n_orig_shape else y


def geglu(h: torch.Tensor) -> torch.Tensor:
    """``a * gelu(g)`` (exact erf GELU) where ``a, g = h.chunk(2, -1)``, in one Triton kernel."""
    k = _kernels()
    triton = _triton()[0]  # type: ignore[index]
    d2 = h.shape[-1]
    if d2 % 2:
        raise ValueError("geglu needs an even last dimension")
    d = d2 // 2
    h2 = h.reshape(-1, d2)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    rows = h2.shape[0]
    y = torch.empty((rows, d), device=h.device, dtype=h.dtype)
    if rows:
        block = min(1024, _next_pow2(d))
        k["geglu"][(rows, triton.cdiv(d, block))](h2, y, d, h2.stride(0), y.stride(0), BLOCK_D=block)
    return y.view(*h.shape[:-1], d)
