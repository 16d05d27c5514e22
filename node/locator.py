"""Where a missing chunk's bytes are: the committed manifest, never the request.

A client asking for a chunk names the chunk and the cache path of the file it
reads. On a pool miss the node asks the metadata service (with its own node
token) for that path's committed manifest, finds the chunk in it, and reads
exactly that entry's byte range of the manifest's source. A chunk the
manifest does not hold is :class:`~sdcache.errors.NotFound`: whatever a caller
sends, the node reads only ranges of sources that belong to a committed
manifest, and under-store credentials stay in the node's own configuration.

A node started with ``--allow-source PREFIX`` (repeatable) also refuses
manifests whose source lies outside those prefixes, so even an admin who
commits a manifest over ``file:///etc/...`` gets nothing from it.

Manifests are cached per path for :data:`TTL` seconds (a 7 GB checkpoint is
~1,800 entries); a chunk missing from a cached manifest re-asks once, at most
every :data:`REFRESH_MIN` seconds per path, so a re-imported file is seen at
once. Concurrent misses of one path share one RPC.
"""

from __future__ import annotations

import asyncio
import posixpath
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sdcache.errors import NotFound, PermissionDenied, Unavailable
from sdcache.manifest import Manifest

TTL = 10.0
REFRESH_MIN = 0.5
MAX_ENTRIES = 1024


def _as_url(source: str) -> str:
    """A local path as the normalized ``file://`` URL it stands for, so prefixes compare either way
    and ``/nas/../etc`` is not under ``/nas/``."""
    if source.startswith("file://"):
        source = source[len("file://"):]
    elif "://" in source:
        return source
    return "file://" + posixpath.normpath(source) + ("/" if source.endswith("/") else "")


@dataclass(frozen=True, slots=True)
class SourceRange:
    """One chunk's bytes in the under-store."""

    url: str
    offset: int
    length: int


@dataclass(slots=True)
class _Cached:
    fetched: float
    source: str
    ranges: dict[str, tuple[int, int]]
    manifest: Manifest | None = None  # for placement: where else the chunk lives (node/peers.py)


class SourceLocator:
    """Finds chunk byte ranges in committed manifests fetched through *get_manifest*."""

    def __init__(self, get_manifest: Callable[[str], Awaitable[Manifest]] | None,
                 store_url: Callable[[], str] = lambda: "", allowed: tuple[str, ...] = ()) -> None:
        self._get = get_manifest
        self._store_url = store_url
        self.allowed = allowed  # source URL prefixes this node reads (--allow-source); () = any
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[_Cached]] = {}
        self.lookups = 0  # manifest RPCs made

    def known(self, path: str, chunk_id: str) -> bool:
        """Whether a manifest of *path* seen here holds *chunk_id* (no RPC; age does not matter).

        The pool credits a hit to a file only then, so a caller naming any
        path cannot grow the pool's file index or steer its eviction.
        """
        entry = self._cache.get(path)
        return entry is not None and chunk_id in entry.ranges

    def manifest(self, path: str | None) -> Manifest | None:
        """The committed manifest of *path* last read here (no RPC), or None."""
        entry = self._cache.get(path) if path is not None else None
        return entry.manifest if entry is not None else None

    async def locate(self, path: str, chunk_id: str) -> SourceRange:
        """The range of *chunk_id* in *path*'s committed manifest."""
        if self._get is None:
            raise NotFound(f"chunk {chunk_id} is not in this node's pool (standalone node: no read-through)")
        entry = self._cache.get(path)
        now = time.monotonic()
        if entry is None or now - entry.fetched > TTL or (
            chunk_id not in entry.ranges and now - entry.fetched > REFRESH_MIN
        ):
            entry = await self._fetch(path)
        found = entry.ranges.get(chunk_id)
        if found is None:
            raise NotFound(f"chunk {chunk_id} is not part of {path} as committed")
        return SourceRange(entry.source, *found)

    async def _fetch(self, path: str) -> _Cached:
        fut = self._inflight.get(path)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[path] = fut
        try:
            self.lookups += 1
            assert self._get is not None
            m = await self._get(path)
            store = self._store_url()
            source = m.source or (store.rstrip("/") + m.path if store else "")
            if not source:
                raise Unavailable(f"{path} has no source and the metadata service named no store")
            if self.allowed and not any(_as_url(source).startswith(_as_url(p)) for p in self.allowed):
                raise PermissionDenied(f"{path}: its source {source} is outside this node's --allow-source")
            entry = _Cached(time.monotonic(), source, {c.id: (c.offset, c.length) for c in m.chunks}, m)
            self._cache[path] = entry
            self._cache.move_to_end(path)
            while len(self._cache) > MAX_ENTRIES:
                self._cache.popitem(last=False)
            fut.set_result(entry)
            return entry
        except Exception as exc:
            self._cache.pop(path, None)
            fut.set_exception(exc)
            fut.exception()  # retrieved: joiners get it, nobody warns
            raise
        except BaseException:
            fut.cancel()
            raise
        finally:
            del self._inflight[path]
