"""``sdcache run``: generate images from cached models.

One request from flags::

    sdcache run --model sdcache://models/sd15.safetensors --lora sdcache://loras/a.safetensors:0.8 \\
        --prompt "a cat" --steps 20 --size 512x512 --seed 1 --out cat.png

or many in one process, one JSON object per line with the same fields
(flags given on the command line are defaults for every line)::

    sdcache run --requests batch.jsonl --out-dir out/

Each request prints a table: the seconds spent fetching, switching models and
denoising, and which tier served each component (``device``, ``ram``,
``cluster``, ``disk``). Errors print one line and exit non-zero.

torch and diffusers are imported only when a request is about to run, so
``sdcache --help`` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from sdcache import errors, tls

from .request import DEVICES, DTYPES, PREDICTION_TYPES, SCHEDULERS, Request, parse_lora, parse_size, read_requests

log = logging.getLogger(__name__)

_FIELDS = ("model", "prompt", "negative_prompt", "controlnet", "control_image", "controlnet_scale", "steps",
           "guidance", "size", "seed", "scheduler", "prediction_type")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``sdcache run`` arguments to *parser*."""
    g = parser.add_argument_group("request")
    g.add_argument("--model", metavar="URL",
                   help="base model: sdcache://… or local path (diffusers folder or single file)")
    g.add_argument("--lora", action="append", default=None, metavar="URL[:SCALE]",
                   help="LoRA to apply (repeatable), scale 1.0 unless given")
    g.add_argument("--controlnet", metavar="URL", help="ControlNet (diffusers folder or single file)")
    g.add_argument("--control-image", metavar="PNG", help="conditioning image for --controlnet")
    g.add_argument("--controlnet-scale", type=float, default=None, metavar="F", help="ControlNet strength (1.0)")
    g.add_argument("--prompt", metavar="TEXT")
    g.add_argument("--negative-prompt", metavar="TEXT")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (20)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (7.5)")
    g.add_argument("--size", metavar="WxH", help="image size, multiples of 8 (the model's native size)")
    g.add_argument("--seed", type=int, default=None, help="random seed (random, printed)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="sampler (euler)")
    g.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="override what the model predicts (auto: from the model)")
    g.add_argument("--out", metavar="OUT.png", help="where to write the image")
    b = parser.add_argument_group("batch")
    b.add_argument("--requests", metavar="FILE.jsonl", help="run every request of a JSONL file in this process")
    b.add_argument("--out-dir", metavar="DIR", help="where --requests writes its images")
    e = parser.add_argument_group("engine")
    e.add_argument("--device", choices=DEVICES, default="auto")
    e.add_argument("--dtype", choices=DTYPES, default="auto")
    e.add_argument("--no-optimize", action="store_true", help="run the stock diffusers pipeline (the reference)")
    e.add_argument("--host-cache", metavar="SIZE", help="host-RAM tier budget, e.g. 16GiB (half the RAM)")
    e.add_argument("--device-cache", metavar="SIZE",
                   help="device tier budget (60%% of the GPU; on a CPU 0: only the model in use)")
    e.add_argument("--json", action="store_true", help="print one JSON object per request instead of tables")
    e.add_argument("--meta", metavar="HOST:PORT", default=argparse.SUPPRESS,
                   help="metadata service for sdcache:// URLs (default: $SDCACHE_META, else 127.0.0.1:7070)")
    tls.add_arguments(e, suppress=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(diffusers|transformers|torch)\b.*")


def _flag_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields given as flags, parsed."""
    fields: dict[str, Any] = {}
    for name in _FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            fields[name] = v
    if args.lora is not None:
        fields["loras"] = [parse_lora(x) for x in args.lora]
    if isinstance(fields.get("size"), str):
        fields["size"] = parse_size(fields["size"])
    return fields


def _request_from_args(args: argparse.Namespace) -> Request:
    fields = _flag_fields(args)
    if not fields.get("model"):
        raise errors.InvalidArgument("--model is required")
    if fields.get("prompt") is None:
        raise errors.InvalidArgument("--prompt is required")
    req = Request(**fields)
    req.validate()
    return req


def _size_budget(text: str | None) -> int | None:
    if text is None:
        return None
    from sdcache.units import parse_size as parse_bytes

    try:
        return int(parse_bytes(text))
    except ValueError as exc:
        raise errors.InvalidArgument(f"bad size {text!r}: {exc}") from None


def _print_table(res: Any, req: Request, out: str, label: str) -> None:
    lines = [
        f"{label}{out}  ({res.family}, {res.width}x{res.height}, {req.steps} steps, {req.scheduler}, "
        f"seed {res.seed}, optimize {res.optimize})",
        f"  {'component':<15}{'tier':<9}source",
    ]
    for row in res.tiers:
        note = f"  ({row.note})" if row.note else ""
        lines.append(f"  {row.component:<15}{row.tier:<9}{row.url}{note}")
    total = res.fetch_s + res.switch_s + res.denoise_s
    lines.append(
        f"  fetch {res.fetch_s:.3f}s  switch {res.switch_s:.3f}s  denoise {res.denoise_s:.3f}s  total {total:.3f}s"
    )
    print("\n".join(lines), flush=True)


def _save(image: Any, out: str) -> None:
    path = Path(out)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, errors.SdcacheError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"{type(exc).__name__}: {exc}"


def _make_runner(args: argparse.Namespace) -> Any:
    _quiet_libraries()
    from .runner import Runner

    return Runner(
        device=args.device, dtype=args.dtype, optimize=not args.no_optimize,
        host_budget=_size_budget(args.host_cache), device_budget=_size_budget(args.device_cache),
        meta=getattr(args, "meta", None),
    )


def _run_one(args: argparse.Namespace) -> int:
    if not args.out:
        raise errors.InvalidArgument("--out OUT.png is required (or --requests FILE.jsonl --out-dir DIR)")
    req = _request_from_args(args)
    from . import sources

    meta = getattr(args, "meta", None)
    src = sources.resolve_base(req.model, meta)  # header-only: a wrong file fails before torch loads
    if req.controlnet:
        sources.resolve_controlnet(req.controlnet, meta)
    runner = _make_runner(args)
    runner._sources[req.model] = src
    res = runner.run(req)
    _save(res.image, args.out)
    if args.json:
        print(json.dumps({"out": args.out, **res.to_json()}), flush=True)
    else:
        _print_table(res, req, args.out, "")
    return 0


def _run_batch(args: argparse.Namespace) -> int:
    if not args.out_dir:
        raise errors.InvalidArgument("--requests needs --out-dir DIR")
    items = read_requests(args.requests, _flag_fields(args))
    if not items:
        raise errors.InvalidArgument(f"{args.requests}: no requests")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = None
    failed = 0
    for n, (line, item) in enumerate(items, 1):
        label = f"[{n}/{len(items)}] "
        try:
            if isinstance(item, errors.SdcacheError):
                raise item
            req = item
            req.validate()
            out = str(out_dir / (item.out or f"{n:04d}.png"))
            if runner is None:
                runner = _make_runner(args)
            res = runner.run(req)
            _save(res.image, out)
        except Exception as exc:  # one line per failed request, then the next one
            failed += 1
            log.debug("request on line %d failed", line, exc_info=True)
            print(f"sdcache run: error: {args.requests}:{line}: {_error_line(exc)}", file=sys.stderr, flush=True)
            if args.json:
                print(json.dumps({"line": line, "error": _error_line(exc)}), flush=True)
            continue
        if args.json:
            print(json.dumps({"line": line, "out": out, **res.to_json()}), flush=True)
        else:
            _print_table(res, req, out, label)
    if runner is not None and not args.json:
        print(f"{len(items) - failed} of {len(items)} requests done", flush=True)
    return 1 if failed else 0


def main(args: argparse.Namespace) -> int:
    """Body of ``sdcache run``; returns the exit status. Errors print one line on stderr."""
    t0 = time.perf_counter()
    try:
        tls.export_to_env(args)
        if args.requests:
            return _run_batch(args)
        return _run_one(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.debug("sdcache run failed", exc_info=True)
        print(f"sdcache run: error: {_error_line(exc)}", file=sys.stderr, flush=True)
        return 1
    finally:
        log.debug("sdcache run took %.3fs", time.perf_counter() - t0)


def _cli(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -c "from sdcache.kernels.cli import _cli; _cli()"``)."""
    parser = argparse.ArgumentParser(prog="sdcache run", description="generate images: base model + LoRAs + ControlNet")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return main(args)
