#!/usr/bin/env python3
"""Fill AUTOMATIC1111's hash cache from an sdcache mount, so the web UI never hashes a model itself.

Every file on an ``sdcache mount`` carries the sha256 of its bytes, computed
once at import, as the extended attribute ``user.sdcache.sha256``. Reading
it is one small request to the mount daemon; no byte of the model is read.
This script reads it for every model under a folder of the mount and writes
the entries A1111 looks up before it would hash a file itself::

    cache.json -> "hashes" -> "checkpoint/<path relative to --ckpt-dir>" -> {"mtime": ..., "sha256": ...}

A1111 takes an entry when its ``mtime`` is not older than the file's, which
on the mount is the source's mtime at import: a re-imported model gets a new
mtime, and running the script again gives its new hash. Existing entries
and sections of ``cache.json`` are kept.

Usage (see docs/HASHES.md)::

    python docs/a1111_hashes.py /mnt/sdcache/models/checkpoints --cache-json /path/to/webui/cache.json
    python docs/a1111_hashes.py /mnt/sdcache/models/loras --json > hashes.json   # {"sub/x.safetensors": "<sha256>"}

Needs only Python 3.9+ on Linux: no sdcache installation, no network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

XATTR = "user.sdcache.sha256"
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf")


def model_files(root: str) -> Iterator[str]:
    """Paths of the model files under *root*, recursively (directory listings only: no file is opened)."""
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.name.lower().endswith(MODEL_SUFFIXES):
                    yield e.path


def entry(path: str) -> dict | None:
    """A1111's cache entry for *path* from the mount's attributes, or None if the file has no sdcache hash."""
    try:
        sha256 = os.getxattr(path, XATTR).decode()
        st = os.stat(path)
    except OSError:
        return None
    # "mtime" and "sha256" are what A1111 reads; some forks also compare "mtime_ns" and "size".
    return {"mtime": st.st_mtime, "sha256": sha256, "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def collect(root: str, prefix: str, threads: int = 32) -> dict[str, dict]:
    """``{"<prefix>/<relative path>": entry}`` for every model under *root* (attributes read in parallel)."""
    paths = sorted(model_files(root))
    with ThreadPoolExecutor(threads) as pool:
        entries = list(pool.map(entry, paths))
    return {f"{prefix}/{os.path.relpath(p, root)}": e for p, e in zip(paths, entries) if e is not None}


def merge_into_cache_json(cache_json: str, section: str, entries: dict[str, dict]) -> None:
    """Add *entries* to *section* of A1111's ``cache.json``, keeping everything else; written atomically."""
    try:
        with open(cache_json, encoding="utf8") as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {}
    data.setdefault(section, {}).update(entries)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(cache_json)), prefix=".cache.json.")
    with os.fdopen(fd, "w", encoding="utf8") as f:
        json.dump(data, f, indent=4)
    os.replace(tmp, cache_json)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("models", help="a folder on the sdcache mount: the web UI's --ckpt-dir")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--cache-json", metavar="FILE", help="A1111's cache.json (made if missing)")
    out.add_argument("--json", action="store_true", help='print {"relative/path": "sha256"} instead')
    p.add_argument("--prefix", default="checkpoint", help='the A1111 key prefix (default "checkpoint")')
    args = p.parse_args(argv)
    if not os.path.isdir(args.models):
        print(f"{args.models}: not a directory", file=sys.stderr)
        return 1
    found = collect(args.models, args.prefix)
    if args.json:
        json.dump({k.split("/", 1)[1]: v["sha256"] for k, v in found.items()}, sys.stdout, indent=1)
        print()
        return 0
    merge_into_cache_json(args.cache_json, "hashes", found)
    print(f"{len(found)} hashes written to {args.cache_json} (section 'hashes', keys '{args.prefix}/...')",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
