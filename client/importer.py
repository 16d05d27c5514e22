"""Importing source files: one read pass, chunks and sha256, a committed manifest.

The source stays where it is (a local path or any fsspec URL); the manifest
records its URL and version tag so nodes can read chunks through on a miss and
a changed source is detected instead of served.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from sdcache import errors, paths
from sdcache.chunking import chunk_file
from sdcache.manifest import Manifest

from .metaclient import MetaClient
from .underfs import split, version_tag

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass(slots=True)
class ImportResult:
    manifest: Manifest
    warning: str = ""


def _source_url(src: str) -> str:
    protocol, path = split(src)
    if protocol == "file":
        return os.path.abspath(path)
    return src


def _open_source(url: str) -> tuple[Any, Any]:
    """``(filesystem, path)`` for a source URL or local path."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def walk(src: str, *, recursive: bool) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield ``(source_url, relative_path, info)`` for the files under *src*.

    A file yields itself with relative path ``""``; a directory needs
    *recursive*.
    """
    url = _source_url(src)
    fs, path = _open_source(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise errors.NotFound(f"source not found: {src}") from None
    if info["type"] != "directory":
        yield url, "", info
        return
    if not recursive:
        raise errors.IsADirectory(f"{src} is a directory (use -r to import a tree)")
    base = path.rstrip("/")
    protocol, _ = split(url)
    for name, finfo in sorted(fs.find(path, detail=True).items()):
        rel = name[len(base) :].lstrip("/")
        full = name if protocol == "file" else f"{protocol}://{name}" if protocol not in ("http", "https") else name
        yield full, rel, finfo


def import_file(
    meta: MetaClient,
    src: str,
    dest: str,
    *,
    info: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> ImportResult:
    """Chunk the file at *src*, commit its manifest at cache path *dest*."""
    dest = paths.normalize(dest)
    url = _source_url(src)
    fs, path = _open_source(url)
    try:
        info = info or fs.info(path)
        size = int(info["size"])
        # readahead: the chunker reads tensor by tensor, and with no cache every small tensor of a
        # remote source would be a request of its own (an SD checkpoint has ~1,100).
        with fs.open(path, "rb", block_size=8 << 20, cache_type="readahead") if "://" in url else open(path, "rb", buffering=0) as f:
            chunked = chunk_file(f, size, name=dest, progress=progress)
    except FileNotFoundError:
        raise errors.NotFound(f"source not found: {src}") from None
    except EOFError as exc:
        raise errors.StaleSource(f"source changed while importing {src}: {exc}") from None
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0.0
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    manifest = Manifest(
        path=dest,
        size=size,
        mtime=float(mtime),
        source=url,
        version_tag=version_tag(info),
        sha256=chunked.sha256,
        chunks=chunked.chunks,
        kind=chunked.kind,
        base=chunked.base,
        metadata=chunked.metadata,
    )
    if chunked.warning:
        log.warning("%s: %s", src, chunked.warning)
    manifest.generation = meta.commit(manifest)
    return ImportResult(manifest, chunked.warning)


def destination(dest: str, rel: str, src: str) -> str:
    """Cache path for a file found at *rel* under an imported *src*.

    ``import a.safetensors /models/`` (trailing slash) keeps the file name;
    ``import dir /models -r`` maps ``dir/x/y`` to ``/models/x/y``.
    """
    if rel:
        return paths.join(dest, rel)
    if dest.endswith("/"):
        return paths.join(dest, os.path.basename(split(src)[1].rstrip("/")))
    return paths.normalize(dest)
