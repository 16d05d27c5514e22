"""Run the Triton kernels through Triton's CPU interpreter and compare them with plain torch.

Executed as a subprocess by tests/test_kernels.py: ``TRITON_INTERPRET=1`` must be in the
environment before Triton is first imported, which a pytest process cannot guarantee.
With ``--device cuda`` the same cases run compiled on a GPU. Prints one JSON line:
``{"cases": [{"name", "max_err", "tol", "ok", "layout_ok"}...]}``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

# Tolerances vs an fp32 torch reference, per storage dtype (max abs error <= atol + rtol*|ref|).
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    atol, rtol = TOL[dtype]
    diff = (out.float() - ref).abs()
    ok = bool((diff <= atol + rtol * ref.abs()).all())
    return ok, float(diff.max()) if diff.numel() else 0.0


def run(device: str) -> list[dict]:
    from sdcache.kernels import triton_kernels as tk

    if not tk.available(torch.empty(0, device=device)):
        raise SystemExit(f"triton kernels not available on {device} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})")
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    cases = []
    gn_shapes = [((2, 64, 8, 8), 8), ((1, 40, 5, 7), 4), ((3, 12, 50), 3), ((2, 32, 33, 17), 8)]
    for dtype in dtypes:
        for shape, groups in gn_shapes:
            for channels_last in (False, True):
                if channels_last and len(shape) != 4:
                    continue
                for with_temb in (False, True):
                    if dtype != torch.float32 and device == "cpu" and not (with_temb and len(shape) == 4):
                        continue  # the interpreter is slow: low-precision dtypes get the ResNet case only
                    c = shape[1]
                    x = (torch.randn(shape, generator=gen) * 3 + 5).to(device=device, dtype=dtype)
                    if channels_last:
                        x = x.to(memory_format=torch.channels_last)
                    w = torch.randn(c, generator=gen).to(device=device, dtype=dtype)
                    b = torch.randn(c, generator=gen).to(device=device, dtype=dtype)
                    temb = torch.randn(shape[0], c, generator=gen).to(device=device, dtype=dtype) if with_temb else None
                    out = tk.group_norm_silu(x, w, b, groups, 1e-5, temb=temb)
                    xr = x.float()
                    if temb is not None:
                        xr = xr + temb.float().view(shape[0], c, *([1] * (len(shape) - 2)))
                    ref = F.silu(F.group_norm(xr, groups, w.float(), b.float(), 1e-5))
                    ok, err = _close(out, ref, dtype)
                    layout_ok = out.is_contiguous(memory_format=torch.channels_last) if channels_last else out.is_contiguous()
                    cases.append({
                        "name": f"group_norm_silu{tuple(shape)} g{groups} {str(dtype)[6:]} "
                                f"{'NHWC' if channels_last else 'NCHW'}{' +temb' if with_temb else ''}",
                        "max_err": err, "tol": TOL[dtype], "ok": ok, "layout_ok": layout_ok,
                    })
        x = torch.randn(2, 16, 6, 6, generator=gen).to(device=device, dtype=dtype)
        out = tk.group_norm_silu(x, None, None, 4, 1e-6, silu=False)
        ok, err = _close(out, F.group_norm(x.float(), 4, None, None, 1e-6), dtype)
        cases.append({"name": f"group_norm (no affine, no silu) {str(dtype)[6:]}", "max_err": err,
                      "tol": TOL[dtype], "ok": ok, "layout_ok": True})
        for shape in [(2, 7, 96), (3, 2 * 1280), (1, 5, 2 * 33)]:
            h = (torch.randn(shape, generator=gen) * 2).to(device=device, dtype=dtype)
            out = tk.geglu(h)
            a, g = h.float().chunk(2, dim=-1)
            ok, err = _close(out, a * F.gelu(g), dtype)
            cases.append({"name": f"geglu{shape} {str(dtype)[6:]}", "max_err": err, "tol": TOL[dtype],
                          "ok": ok, "layout_ok": tuple(out.shape) == (*shape[:-1], shape[-1] // 2)})
    return cases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(json.dumps({"cases": run(args.device)}))


if __name__ == "__main__":
    main()
