"""Reading byte ranges of under-store objects (any fsspec URL) from the client."""

from __future__ import annotations

import functools
import os
from typing import Any

import fsspec


@functools.cache
def _filesystem(protocol: str) -> Any:
    return fsspec.filesystem(protocol)


def split(url: str) -> tuple[str, str]:
    """``(protocol, path)`` of *url*; plain paths are ``file``."""
    if "://" not in url:
        return "file", url
    protocol, _, rest = url.partition("://")
    if protocol == "file":
        return "file", rest
    return protocol, url if protocol in ("http", "https") else rest


def read_range(url: str, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of the object at *url*."""
    protocol, path = split(url)
    if protocol == "file":
        with open(path, "rb", buffering=0) as f:
            return os.pread(f.fileno(), length, offset)
    return _filesystem(protocol).cat_file(path, start=offset, end=offset + length)


def version_tag(info: dict[str, Any]) -> str:
    """A source's version: its etag where the store has one, else mtime and size."""
    for key in ("ETag", "etag", "e_tag"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created") or ""
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"{mtime}:{info.get('size')}"
