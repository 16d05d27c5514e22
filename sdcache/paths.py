"""Cache paths: absolute, ``/``-separated, no ``..``, NUL or empty component."""

from __future__ import annotations

from .errors import InvalidPath

PROTOCOL = "sdcache"


def normalize(path: str) -> str:
    """Return the canonical cache path for *path*, or raise :class:`InvalidPath`.

    Accepts ``sdcache://a/b``, ``/a/b`` and ``a/b``; a single trailing slash is
    dropped. ``.``/``..``, NUL bytes and empty components (``a//b``) are
    rejected rather than resolved, so a path names exactly one thing.
    """
    if not isinstance(path, str):
        raise InvalidPath(f"path must be a string, not {type(path).__name__}")
    raw = path
    if path.startswith(PROTOCOL + "://"):
        path = path[len(PROTOCOL) + 3 :]
    if "\x00" in path:
        raise InvalidPath(f"path contains a NUL byte: {raw!r}")
    if path in ("", "/"):
        return "/"
    if not path.startswith("/"):
        path = "/" + path
    if path.endswith("/"):
        path = path[:-1]
    parts = path.split("/")[1:]
    for part in parts:
        if part == "":
            raise InvalidPath(f"path has an empty component: {raw!r}")
        if part in (".", ".."):
            raise InvalidPath(f"path has a {part!r} component: {raw!r}")
    return path


def parent(path: str) -> str:
    """Parent directory of a normalized path (``/`` for top-level names)."""
    if path == "/":
        return "/"
    head = path.rsplit("/", 1)[0]
    return head or "/"


def basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def ancestors(path: str) -> list[str]:
    """Every proper ancestor directory of *path*, from ``/`` down."""
    out = ["/"]
    parts = path.split("/")[1:-1]
    cur = ""
    for part in parts:
        cur += "/" + part
        out.append(cur)
    return out


def join(directory: str, name: str) -> str:
    return normalize(directory.rstrip("/") + "/" + name)
