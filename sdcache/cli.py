"""The ``sdcache`` command line.

Every command prints one clear line and exits non-zero on error, never a
traceback; ``--json`` where a script would parse the output; progress bars on
long work (``import``, ``warmup``, ``put``, ``get``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__, errors, tls
from .units import format_size

log = logging.getLogger("sdcache")

Handler = Callable[[argparse.Namespace], int]


def _progress(total: int, desc: str, quiet: bool = False) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=quiet or None, leave=False, file=sys.stderr)


def _credentials(args: argparse.Namespace) -> Any:
    from .tls import Credentials

    return Credentials.from_args(args)


def _meta(args: argparse.Namespace) -> Any:
    from sdcache.client.metaclient import shared_client

    return shared_client(args.meta, _credentials(args))


def _fs(args: argparse.Namespace) -> Any:
    from sdcache.client.fs import SdcacheFileSystem

    c = _credentials(args)
    t = c.tls
    return SdcacheFileSystem(meta=args.meta, token=c.token, tls_ca=t and t.ca, tls_cert=t and t.cert,
                             tls_key=t and t.key)


# -- tokens ----------------------------------------------------------------------
def _token_row(t: Any) -> dict[str, Any]:
    return {"name": t.name, "role": t.role, "created": t.created, "expires": t.expires or None,
            "revoked": t.revoked or None}


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"


def cmd_token(args: argparse.Namespace) -> int:
    from .units import parse_duration

    meta = _meta(args)
    if args.token_command == "create":
        resp = meta.create_token(args.role, name=args.name or "", ttl=parse_duration(args.ttl) if args.ttl else 0)
        if args.json:
            _print_json({"token": resp.token, **_token_row(resp.info)})
        else:
            print(resp.token)  # alone on stdout (contract): `sdcache token create ... > node.token`
        return 0
    if args.token_command == "list":
        rows = [_token_row(t) for t in meta.list_tokens()]
        if args.json:
            _print_json(rows)
            return 0
        print(f"{'NAME':<32} {'ROLE':<6} {'CREATED (UTC)':<19} {'EXPIRES (UTC)':<19} REVOKED (UTC)")
        for t in meta.list_tokens():
            print(f"{t.name:<32} {t.role or '-':<6} {_when(t.created):<19} {_when(t.expires):<19} {_when(t.revoked)}")
        return 0
    info = meta.revoke_token(args.name)
    if not args.quiet:
        print(f"revoked {info.name} (at {_when(info.revoked)} UTC); nodes refuse it after their next heartbeat",
              file=sys.stderr)
    return 0


def _print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


# -- namespace commands ------------------------------------------------------------
def cmd_import(args: argparse.Namespace) -> int:
    from sdcache.client.importer import destination, import_file, walk

    meta = _meta(args)
    files = list(walk(args.src, recursive=args.recursive))
    total = sum(int(i["size"]) for _, _, i in files)
    done: list[dict[str, Any]] = []
    with _progress(total, "import", args.quiet) as bar:
        for url, rel, info in files:
            dest = destination(args.dest, rel, args.src)
            res = import_file(meta, url, dest, info=info, progress=bar.update)
            if res.warning:
                print(f"sdcache: warning: {dest}: {res.warning}", file=sys.stderr)
            m = res.manifest
            done.append({"path": m.path, "size": m.size, "sha256": m.sha256, "kind": m.kind, "base": m.base,
                         "chunks": len(m.chunks), "generation": m.generation})
    if args.json:
        _print_json(done)
    elif not args.quiet:
        for d in done:
            print(f"imported {d['path']}  {format_size(d['size'])}  {d['kind']}{'/' + d['base'] if d['base'] else ''}"
                  f"  {d['chunks']} chunks  sha256 {d['sha256'][:16]}")
    if args.warm and done:
        return _warm(args, [d["path"] for d in done], recursive=False, check=False)
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    fs = _fs(args)
    if os.path.isdir(args.src) and not args.recursive:
        raise errors.IsADirectory(f"{args.src} is a directory (use -r)")
    fs.put(args.src, args.dest, recursive=args.recursive)
    if not args.quiet:
        print(f"uploaded {args.src} -> sdcache://{fs._strip_protocol(args.dest).lstrip('/')}")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from fsspec.callbacks import TqdmCallback

    fs = _fs(args)
    size = fs.info(args.src, cached=False)["size"]
    cb = TqdmCallback(tqdm_kwargs={"desc": "get", "unit": "B", "unit_scale": True, "leave": False,
                                   "disable": args.quiet or None, "file": sys.stderr})
    t0 = time.perf_counter()
    fs.get_file(args.src, args.dest, callback=cb)
    dt = time.perf_counter() - t0
    if not args.quiet:
        print(f"{args.src} -> {args.dest}  {format_size(size)} in {dt:.2f}s ({size / max(dt, 1e-9) / 1e9:.2f} GB/s)")
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    fs = _fs(args)
    with fs.open(args.path, "rb") as f:
        while block := f.read(16 << 20):
            sys.stdout.buffer.write(block)
    sys.stdout.buffer.flush()
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from sdcache import paths

    meta = _meta(args)
    path = paths.normalize(args.path)
    try:
        entries = list(meta.list(path))
    except errors.NotADirectory:
        entries = [meta.stat(path)]
    if args.json:
        _print_json([{"path": e.path, "type": "directory" if e.is_dir else "file", "size": e.size,
                      "mtime": e.mtime, "kind": e.kind, "sha256": e.sha256, "chunks": e.chunk_count}
                     for e in entries])
        return 0
    for e in entries:
        name = e.path.rsplit("/", 1)[-1] + ("/" if e.is_dir else "")
        if args.long:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime)) if e.mtime else "-"
            print(f"{'d' if e.is_dir else '-'} {e.size:>14} {when} {(e.kind or '-'):<10} {name}")
        else:
            print(name)
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    info = _fs(args).info(args.path)
    info = {k: v for k, v in info.items()}
    if args.json:
        _print_json(info)
        return 0
    for key in ("name", "type", "size", "kind", "base", "sha256", "chunks", "cached", "source", "generation", "mtime"):
        if key in info:
            value = info[key]
            if key == "cached":
                value = f"{value * 100:.1f}%"
            elif key == "size":
                value = f"{value} ({format_size(value)})"
            print(f"{key:>10}: {value}")
    if info.get("metadata"):
        print(f"{'metadata':>10}: {json.dumps(info['metadata'], sort_keys=True)}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    fs = _fs(args)
    for p in args.paths:
        fs.rm(p, recursive=args.recursive)
    return 0


# -- cluster commands ----------------------------------------------------------------
def cmd_nodes(args: argparse.Namespace) -> int:
    nodes = _meta(args).nodes_raw(include_dead=args.all)
    rows = [{"node_id": n.node_id, "address": n.address, "role": n.role, "capacity": n.capacity, "used": n.used,
             "chunks": n.chunks, "alive": n.alive, "host_id": n.host_id, "pool_dir": n.pool_dir, "zone": n.zone}
            for n in nodes]
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'NODE':<28} {'ADDRESS':<22} {'ZONE':<12} {'ROLE':<7} {'USED':>12} {'CAPACITY':>12} {'CHUNKS':>7} ALIVE")
    for r in rows:
        print(f"{r['node_id']:<28} {r['address']:<22} {r['zone'] or '-':<12} {r['role']:<7} {format_size(r['used']):>12} "
              f"{format_size(r['capacity']):>12} {r['chunks']:>7} {'yes' if r['alive'] else 'no'}")
    return 0


def _warm(args: argparse.Namespace, paths_: list[str], *, recursive: bool, check: bool) -> int:
    meta = _meta(args)
    last = None
    bar = None
    try:
        for p in meta.warmup(paths_, recursive=recursive, check=check):
            if bar is None:
                bar = _progress(p.total_bytes, "check" if check else "warm-up", args.quiet or check)
            bar.update(p.done_bytes - bar.n)
            last = p
    finally:
        if bar is not None:
            bar.close()
    if last is None:
        return 0
    if last.message:
        print(f"sdcache: {last.message}", file=sys.stderr)
    doc = {"total_bytes": last.total_bytes, "cached_bytes": last.done_bytes, "pool_capacity": last.pool_capacity,
           "fits_bytes": last.fits_bytes}
    if getattr(args, "json", False):
        _print_json(doc)
    elif not args.quiet:
        frac = last.done_bytes / last.total_bytes if last.total_bytes else 1.0
        print(f"{'cached' if check else 'warm'}: {format_size(last.done_bytes)} of {format_size(last.total_bytes)} "
              f"({frac * 100:.1f}%); pool {format_size(last.pool_capacity)}")
    return 0 if last.done_bytes >= last.total_bytes or check else 1


def cmd_warmup(args: argparse.Namespace) -> int:
    return _warm(args, args.paths, recursive=args.recursive, check=args.check)


def cmd_pin(args: argparse.Namespace) -> int:
    meta = _meta(args)
    n = sum((meta.unpin if args.command == "unpin" else meta.pin)(p, recursive=args.recursive) for p in args.paths)
    if not args.quiet:
        print(f"{args.command}ned {n} file{'s' if n != 1 else ''}")
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    resp = _meta(args).evict(args.paths, recursive=args.recursive)
    if not args.quiet:
        print(f"evicted {resp.chunks} chunks ({format_size(resp.bytes)})")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    s = _meta(args).stats()
    doc = {f.name: getattr(s, f.name) for f in s.DESCRIPTOR.fields}
    if args.json:
        _print_json(doc)
        return 0
    for k, v in doc.items():
        shown = format_size(v) if k in ("bytes", "unique_bytes", "replicated_bytes", "capacity", "used") else v
        print(f"{k:>14}: {shown}")
    return 0


# -- parser ------------------------------------------------------------------------------
def _delegate(module: str, func: str = "main") -> Handler:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(args) or 0)

    return run


def _add_external(sub: Any, name: str, module: str, help_: str, *, add: str = "add_arguments",
                  main: str = "main") -> None:
    """A subcommand whose arguments and body live in another module."""
    import importlib

    p = sub.add_parser(name, help=help_, description=help_)
    try:
        getattr(importlib.import_module(module), add)(p)
    except ImportError as exc:
        reason = str(exc)

        def unavailable(args: argparse.Namespace) -> int:
            raise errors.SdcacheError(f"'{name}' is unavailable: {reason}")

        p.set_defaults(func=unavailable)
        return
    p.set_defaults(func=_delegate(module, main))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdcache",
        description="Distributed chunked model cache for Stable Diffusion serving.",
    )
    parser.add_argument("--version", action="version", version=f"sdcache {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--meta", metavar="HOST:PORT[,HOST:PORT...]",
                        help="metadata service(s), tried in order (default: $SDCACHE_META, else 127.0.0.1:7070)")
    tls.add_arguments(parser)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--meta", metavar="HOST:PORT[,HOST:PORT...]", default=argparse.SUPPRESS,
                        help="metadata service(s), tried in order (default: $SDCACHE_META, else 127.0.0.1:7070)")
    tls.add_arguments(common, suppress=True)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_external(sub, "meta", "sdcache.meta.server", "run the metadata service")
    _add_external(sub, "node", "sdcache.node.server", "run a cache node")
    _add_external(sub, "up", "sdcache.cluster", "run a one-host cluster in the foreground (meta + N nodes)")
    _add_external(sub, "replicas", "sdcache.replicas", "show or set how many copies of each chunk the pool keeps")

    p = sub.add_parser("import", parents=[common], help="register source files without copying them")
    p.add_argument("src", help="local path or URL (s3://, http://, any fsspec URL)")
    p.add_argument("dest", help="cache path, e.g. /models/ (trailing slash keeps the file name)")
    p.add_argument("-r", "--recursive", action="store_true", help="import a whole directory tree")
    p.add_argument("--warm", action="store_true", help="load the imported files into the pool")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("put", parents=[common], help="copy a local file into the cluster's own store")
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument("-r", "--recursive", action="store_true")
    p.set_defaults(func=cmd_put)

    p = sub.add_parser("get", parents=[common], help="copy a cached file to a local path")
    p.add_argument("src")
    p.add_argument("dest")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("cat", parents=[common], help="write a cached file to stdout")
    p.add_argument("path")
    p.set_defaults(func=cmd_cat)

    p = sub.add_parser("ls", parents=[common], help="list a directory")
    p.add_argument("path", nargs="?", default="/")
    p.add_argument("-l", "--long", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("stat", parents=[common], help="size, sha256, kind, chunks and cached fraction of a file")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stat)

    p = sub.add_parser("rm", parents=[common], help="remove files from the cache namespace")
    p.add_argument("paths", nargs="+")
    p.add_argument("-r", "--recursive", action="store_true")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("nodes", parents=[common], help="list cache nodes")
    p.add_argument("--all", action="store_true", help="include nodes that stopped heartbeating")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("warmup", parents=[common], help="load files' chunks into their owning nodes")
    p.add_argument("paths", nargs="+")
    p.add_argument("-r", "--recursive", action="store_true")
    p.add_argument("--check", action="store_true", help="only report what is cached and what would fit")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_warmup)

    for name, help_ in (("pin", "never evict these files"), ("unpin", "allow eviction again")):
        p = sub.add_parser(name, parents=[common], help=help_)
        p.add_argument("paths", nargs="+")
        p.add_argument("-r", "--recursive", action="store_true")
        p.set_defaults(func=cmd_pin)

    p = sub.add_parser("evict", parents=[common], help="drop files' chunks from the pool")
    p.add_argument("paths", nargs="+")
    p.add_argument("-r", "--recursive", action="store_true")
    p.set_defaults(func=cmd_evict)

    p = sub.add_parser("stats", parents=[common], help="cluster statistics")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("token", help="create, list and revoke bearer tokens (admin)")
    tsub = p.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    t = tsub.add_parser("create", parents=[common], help="issue a token; prints it alone on stdout")
    t.add_argument("--role", required=True, choices=("read", "node", "admin"))
    t.add_argument("--name", help="unique name, used to revoke it (default: generated)")
    t.add_argument("--ttl", help="lifetime, e.g. 3600, 90m, 12h, 30d (default: never expires)")
    t.add_argument("--json", action="store_true", help="print name, role and times too")
    t.set_defaults(func=cmd_token)
    t = tsub.add_parser("list", parents=[common], help="every token issued (never the tokens themselves)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_token)
    t = tsub.add_parser("revoke", parents=[common], help="revoke every token of NAME")
    t.add_argument("name")
    t.set_defaults(func=cmd_token)

    _add_external(sub, "mount", "sdcache.client.fuse", "mount the cache as a read-only folder (FUSE)",
                  add="add_mount_arguments", main="main_mount")
    _add_external(sub, "umount", "sdcache.client.fuse", "unmount a FUSE mount", add="add_umount_arguments",
                  main="main_umount")
    _add_external(sub, "run", "sdcache.kernels.cli", "generate images: base model + LoRAs + ControlNet")
    _add_external(sub, "serve", "sdcache.serving.serve", "serve A1111's /sdapi/v1 API over one runner")
    _add_external(sub, "gateway", "sdcache.serving.gateway",
                  "A1111's API in front of many serve processes, routed by what each holds")
    _add_external(sub, "simulate", "sdcache.simulate", "capacity planning: simulate a fleet of runners on a trace")
    _add_external(sub, "demo", "sdcache.demo", "start a one-host cluster, import a generated model, read it back")
    return parser


_SERVER_COMMANDS = frozenset({"meta", "node", "up", "serve", "gateway"})


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's C core logs at INFO unless told otherwise: a failed TLS handshake adds an "I1201 ...
    # ssl_transport_security.cc" line to a client command's one-line error. Servers keep it (their
    # log's only word on why a client's handshake was refused). Read once, when grpc is first
    # imported: before build_parser() imports the servers. GRPC_VERBOSITY=INFO brings it back.
    words = sys.argv[1:] if argv is None else list(argv)
    if not _SERVER_COMMANDS.intersection(words):
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except (errors.SdcacheError, OSError, ValueError) as exc:
        print(f"sdcache: error: {_describe(exc)}", file=sys.stderr)
        return 1


def _describe(exc: BaseException) -> str:
    if isinstance(exc, errors.SdcacheError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    return str(exc) or type(exc).__name__
