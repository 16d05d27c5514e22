"""Cache paths: absolute, ``/``-separated, no ``..``, NUL or empty component."""

from __future__ import annotations

from .errors import InvalidPath

PROTOCOL = "sdcache"
MAX_PATH = 4096  # bytes of UTF-8 in a normalized path, like Linux PATH_MAX
MAX_NAME = 255  # bytes of UTF-8 in one component, like Linux NAME_MAX


def _show(raw: str) -> str:
    """*raw* quoted for an error message, cut short so a hostile path cannot bloat it."""
    text = repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


def normalize(path: str) -> str:
    """Return the canonical cache path for *path*, or raise :class:`InvalidPath`.

    Accepts ``sdcache://a/b``, ``/a/b`` and ``a/b``; a single trailing slash is
    dropped. ``.``/``..``, NUL bytes and empty components (``a//b``) are
    rejected rather than resolved, so a path names exactly one thing. A path
    must be valid Unicode (no lone surrogates), at most :data:`MAX_PATH` bytes
    of UTF-8, and each component at most :data:`MAX_NAME` bytes.
    """
    if not isinstance(path, str):
        raise InvalidPath(f"path must be a string, not {type(path).__name__}")
    raw = path
    if len(path) > 2 * MAX_PATH:  # surely too long: bound the work before any copy
        raise InvalidPath(f"path is longer than {MAX_PATH} bytes: {_show(raw)}")
    if path.startswith(PROTOCOL + "://"):
        path = path[len(PROTOCOL) + 3 :]
    if "\x00" in path:
        raise InvalidPath(f"path contains a NUL byte: {_show(raw)}")
    if path in ("", "/"):
        return "/"
    if not path.startswith("/"):
        path = "/" + path
    if path.endswith("/"):
        path = path[:-1]
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: no wire or file system can carry it
        raise InvalidPath(f"path is not valid Unicode: {_show(raw)}") from None
    if size > MAX_PATH:
        raise InvalidPath(f"path is longer than {MAX_PATH} bytes: {_show(raw)}")
    parts = path.split("/")[1:]
    for part in parts:
        if part == "":
            raise InvalidPath(f"path has an empty component: {_show(raw)}")
        if part in (".", ".."):
            raise InvalidPath(f"path has a {part!r} component: {_show(raw)}")
        if len(part.encode("utf-8")) > MAX_NAME:
            raise InvalidPath(f"path has a component longer than {MAX_NAME} bytes: {_show(raw)}")
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
