"""Read-through from the under-store: one verified byte range of a source URL.

Any fsspec URL works: local paths and ``file://``, ``s3://`` (s3fs; the
endpoint and credentials come from the environment, ``AWS_ENDPOINT_URL`` or
``FSSPEC_S3_ENDPOINT_URL`` and ``AWS_*``), ``http(s)://``. Bytes are checked
against the chunk id before anyone sees them: a source that changed since the
import, or vanished, raises :class:`~sdcache.errors.StaleSource` rather than
returning another version's bytes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import fsspec
import xxhash
from fsspec.spec import AbstractFileSystem

from sdcache.errors import SdcacheError, StaleSource, Unavailable

from .metrics import UNDERSTORE_REQUEST_SECONDS

log = logging.getLogger(__name__)


@dataclass(slots=True)
class UnderStoreStats:
    """Counters of under-store traffic (every read is one byte-range request)."""

    reads: int = 0
    read_bytes: int = 0
    stale: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "understore_reads": self.reads,
            "understore_bytes": self.read_bytes,
            "understore_stale": self.stale,
            "understore_errors": self.errors,
        }


class UnderStore:
    """Reads verified chunk byte ranges from source URLs, in worker threads."""

    def __init__(self) -> None:
        self.stats = UnderStoreStats()
        self._lock = threading.Lock()
        # fsspec already caches instances per (class, options); this also
        # skips re-parsing the URL's protocol and options for every chunk.
        self._fs: dict[str, AbstractFileSystem] = {}

    def _resolve(self, src: str) -> tuple[AbstractFileSystem, str]:
        scheme = src.split("://", 1)[0] if "://" in src else "file"
        if "::" not in src:
            fs = self._fs.get(scheme)
            if fs is not None:
                return fs, fs._strip_protocol(src)
        fs, path = fsspec.core.url_to_fs(src)
        if "::" not in src:
            with self._lock:
                self._fs.setdefault(scheme, fs)
        return fs, path

    def read_sync(self, src: str, offset: int, length: int, chunk_id: str) -> bytes:
        """Read ``[offset, offset+length)`` of *src* and check it is *chunk_id*.

        Raises StaleSource when the bytes differ or the source is gone, and
        Unavailable when the under-store cannot be read.
        """
        with self._lock:
            self.stats.reads += 1
        t0 = time.perf_counter()
        try:
            fs, path = self._resolve(src)
            data = fs.cat_file(path, start=offset, end=offset + length)
        except FileNotFoundError as e:
            with self._lock:
                self.stats.stale += 1
            raise StaleSource(f"source vanished: {src}") from e
        except SdcacheError:
            raise
        except Exception as e:  # noqa: BLE001 - any backend failure is "cannot read"
            with self._lock:
                self.stats.errors += 1
            log.warning("under-store read of %s failed: %s", src, e, extra={"chunk": chunk_id, "source": src})
            raise Unavailable(f"cannot read {src}: {type(e).__name__}: {e}") from e
        finally:
            UNDERSTORE_REQUEST_SECONDS.observe(time.perf_counter() - t0)
        with self._lock:
            self.stats.read_bytes += len(data)
        if len(data) != length or xxhash.xxh3_128_hexdigest(data) != chunk_id:
            with self._lock:
                self.stats.stale += 1
            raise StaleSource(
                f"source changed since import: {src} bytes {offset}+{length} "
                f"are not chunk {chunk_id}"
            )
        return bytes(data)

    async def read(self, src: str, offset: int, length: int, chunk_id: str) -> bytes:
        """Async :meth:`read_sync` (runs in a worker thread)."""
        return await asyncio.to_thread(self.read_sync, src, offset, length, chunk_id)
