"""``sdcache://`` for fsspec: the cache as a filesystem.

``sdcache://models/sd15.safetensors`` is the cache path
``/models/sd15.safetensors``; the storage option ``meta="host:port"`` names
the metadata service (``"a:7070,b:7070"``: several over one store, with
failover; else ``$SDCACHE_META``, else ``127.0.0.1:7070``), and
``token=`` the bearer token (else ``$SDCACHE_TOKEN``, else
``$SDCACHE_TOKEN_FILE``); ``tls_ca=``, ``tls_cert=``, ``tls_key=`` turn on TLS
(else ``$SDCACHE_TLS_*``).
Reads fetch chunks in parallel from the cache nodes; ``put``/``pipe`` upload
into the cluster's own store and import from there.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import uuid
from concurrent.futures import Future
from typing import Any

import fsspec
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from sdcache import errors, paths
from sdcache.chunking import CHUNK_SIZE
from sdcache.manifest import Entry, Manifest
from sdcache.tls import Credentials

from ._buffers import filled_bytes
from ._inflight import settled
from .fetcher import Fetcher
from .importer import import_file
from .metaclient import MetaClient, shared_client

log = logging.getLogger(__name__)

DEFAULT_READAHEAD = 8  # chunks fetched ahead of a sequential reader (32 MiB)
GET_WINDOW = 16 * CHUNK_SIZE  # bytes in flight per get_file window

_fetchers: dict[int, Fetcher] = {}
_fetchers_lock = threading.Lock()


def shared_fetcher(meta: MetaClient) -> Fetcher:
    """One fetcher (thread pool, connections) per metadata client, so per service and credentials."""
    with _fetchers_lock:
        f = _fetchers.get(id(meta))
        if f is None:
            f = _fetchers[id(meta)] = Fetcher(meta)
        return f


def _entry_info(e: Entry) -> dict[str, Any]:
    if e.is_dir:
        return {"name": e.path, "size": 0, "type": "directory"}
    return {
        "name": e.path,
        "size": e.size,
        "type": "file",
        "mtime": e.mtime,
        "kind": e.kind,
        "sha256": e.sha256,
        "chunks": e.chunk_count,
        "generation": e.generation,
    }


class SdcacheFileSystem(AbstractFileSystem):
    """fsspec filesystem over an sdcache cluster (see the module docstring)."""

    protocol = "sdcache"
    root_marker = "/"

    def __init__(self, meta: str | None = None, readahead: int = DEFAULT_READAHEAD, *, token: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.meta = shared_client(meta, Credentials.resolve(token=token, tls_ca=tls_ca, tls_cert=tls_cert,
                                                            tls_key=tls_key))
        self.fetcher = shared_fetcher(self.meta)
        self.readahead = readahead
        self._store_url: str | None = None

    @classmethod
    def _strip_protocol(cls, path: str | list[str]) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return paths.normalize(path)

    def unstrip_protocol(self, name: str) -> str:
        return "sdcache://" + name.lstrip("/")

    # -- namespace -------------------------------------------------------------
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        try:
            rows = [_entry_info(e) for e in self.meta.list(path)]
        except errors.NotADirectory:
            rows = [self.info(path, cached=False)]
        return rows if detail else [r["name"] for r in rows]

    def info(self, path: str, cached: bool = True, **kwargs: Any) -> dict[str, Any]:
        """Size, type, sha256, kind, base, chunk count and, for files, the fraction cached."""
        path = self._strip_protocol(path)
        if path == "/":
            return {"name": "/", "size": 0, "type": "directory"}
        e = self.meta.stat(path)
        out = _entry_info(e)
        if not e.is_dir:
            m = self.meta.manifest(path)
            out.update(base=m.base, source=m.source, metadata=m.metadata)
            if cached:
                out["cached"] = self.fetcher.cached_fraction(m)
        return out

    def manifest(self, path: str) -> Manifest:
        return self.meta.manifest(self._strip_protocol(path))

    # -- reading ---------------------------------------------------------------
    def _open(self, path: str, mode: str = "rb", block_size: Any = None, autocommit: bool = True,
              cache_options: Any = None, **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if "r" in mode:
            return SdcacheFile(self, self.meta.manifest(path), readahead=self.readahead)
        if "x" in mode and self.exists(path):
            raise errors.AlreadyExists(f"file exists: {path}")
        if "w" in mode or "x" in mode:
            return SdcacheWriteFile(self, path)
        raise errors.InvalidArgument(f"mode {mode!r} is not supported (use 'rb', or 'wb'/'xb' to upload)")

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        m = self.manifest(path)
        start, end = _clip(start, end, m.size)
        return filled_bytes(end - start, lambda out: self.fetcher.read_into(m, start, out))

    def get_file(self, rpath: str, lpath: str, callback: Any = None, outfile: Any = None, **kwargs: Any) -> None:
        if self.isdir(rpath):
            os.makedirs(lpath, exist_ok=True)
            return
        if os.path.isdir(lpath):
            lpath = os.path.join(lpath, os.path.basename(self._strip_protocol(rpath)))
        m = self.manifest(rpath)
        os.makedirs(os.path.dirname(os.path.abspath(lpath)), exist_ok=True)
        if callback is not None:
            callback.set_size(m.size)
        buf = bytearray(min(GET_WINDOW, max(m.size, 1)))
        mv = memoryview(buf)
        tmp = f"{lpath}.sdcache-{uuid.uuid4().hex[:8]}.part"
        try:
            with open(tmp, "wb") as f:
                pos = 0
                while pos < m.size:
                    n = self.fetcher.read_into(m, pos, mv[: min(len(buf), m.size - pos)])
                    f.write(mv[:n])
                    pos += n
                    if callback is not None:
                        callback.relative_update(n)
            os.replace(tmp, lpath)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- writing ---------------------------------------------------------------
    def store_url(self) -> str:
        if self._store_url is None:
            self._store_url = self.meta.store_url().rstrip("/")
        return self._store_url

    def put_file(self, lpath: str, rpath: str, callback: Any = None, mode: str = "overwrite",
                 **kwargs: Any) -> None:
        """Copy local *lpath* into the cluster's own store, then import it at *rpath*."""
        if os.path.isdir(lpath):
            return
        rpath = self._strip_protocol(rpath)
        if mode == "create" and self.exists(rpath):
            raise errors.AlreadyExists(f"file exists: {rpath}")
        old = self._existing_source(rpath)
        obj = f"{self.store_url()}/{uuid.uuid4().hex}-{os.path.basename(rpath)}"
        fs, opath = fsspec.core.url_to_fs(obj)
        fs.makedirs(fs._parent(opath), exist_ok=True)
        fs.put_file(lpath, opath)
        try:
            import_file(self.meta, obj, rpath)
        except BaseException:
            fs.rm_file(opath)
            raise
        self._remove_object(old)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        if mode == "create" and self.exists(path):
            raise errors.AlreadyExists(f"file exists: {self._strip_protocol(path)}")
        with tempfile.NamedTemporaryFile(prefix="sdcache-pipe-") as tmp:
            tmp.write(value)
            tmp.flush()
            self.put_file(tmp.name, path)

    def _existing_source(self, path: str) -> str:
        try:
            return self.meta.manifest(path).source
        except errors.NotFound:
            return ""

    def _remove_object(self, source: str) -> None:
        """Delete an object the cluster store owns (put/pipe), never a user's source."""
        if not source or not source.startswith(self.store_url() + "/"):
            return
        try:
            fs, opath = fsspec.core.url_to_fs(source)
            fs.rm_file(opath)
        except FileNotFoundError:
            pass

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Copy within the cache: a new manifest naming the same chunks (no bytes move)."""
        if self.isdir(path1):
            return  # directories are implicit
        m = self.manifest(path1)
        src = m.source
        if src.startswith(self.store_url() + "/"):
            # The copy gets an object of its own, so removing either file never breaks the other.
            fs, opath = fsspec.core.url_to_fs(src)
            src = f"{self.store_url()}/{uuid.uuid4().hex}-{os.path.basename(path2)}"
            fs.cp_file(opath, fsspec.core.url_to_fs(src)[1])
        dest = self._strip_protocol(path2)
        old = self._existing_source(dest)
        m.path, m.source, m.generation = dest, src, 0
        self.meta.commit(m)
        if old != src:
            self._remove_object(old)

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        source = self._existing_source(path)
        self.meta.delete(path)
        self._remove_object(source)

    def rm(self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None) -> None:
        for p in path if isinstance(path, list) else [path]:
            p = self._strip_protocol(p)
            if recursive and self.isdir(p):
                for f in self.find(p):  # file by file, so uploaded objects go too
                    self.rm_file(f)
            else:
                self.rm_file(p)

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """Directories are implicit: they exist while they hold a file."""

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Directories are implicit: they exist while they hold a file."""


def _clip(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else end)
    return max(0, min(start, size)), max(0, min(end, size))


class SdcacheFile(AbstractBufferedFile):
    """A read-only file pinned to the manifest it was opened with.

    Reads fetch the chunks they cover in parallel; a sequential reader gets
    the next ``readahead`` chunks fetched ahead of it. Memory stays bounded
    by the read-ahead window however large the file.
    """

    def __init__(self, fs: SdcacheFileSystem, manifest: Manifest, *, readahead: int = DEFAULT_READAHEAD) -> None:
        super().__init__(fs, manifest.path, mode="rb", block_size=CHUNK_SIZE, cache_type="none", size=manifest.size)
        self.manifest = manifest
        self.fetcher = fs.fetcher
        self.readahead = readahead
        self._window: dict[int, Future[bytearray]] = {}
        self._last_end = -1

    def _fetch_range(self, start: int, end: int) -> bytes:
        return filled_bytes(end - start, lambda out: self._read_into(start, out))

    def read(self, length: int = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if length is None or length < 0:
            length = self.size - self.loc
        n = max(0, min(length, self.size - self.loc))
        if n == 0:
            return b""
        data = filled_bytes(n, lambda out: self._read_into(self.loc, out))
        self.loc += n
        return data

    def readinto(self, b: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        out = memoryview(b).cast("B")
        n = max(0, min(len(out), self.size - self.loc))
        if n:
            self._read_into(self.loc, out[:n])
            self.loc += n
        return n

    def _read_into(self, start: int, out: memoryview) -> None:
        m = self.manifest
        end = start + len(out)
        # Fetches writing straight into *out*: all done or cancelled before this returns or raises,
        # since the caller may free *out* at once (see ``_inflight``).
        direct: list[Future[Any]] = []
        copies: list[tuple[Future[bytearray], memoryview, int]] = []
        with settled(direct):
            for i in m.chunks_for(start, end):
                ref = m.chunks[i]
                lo, hi = max(start, ref.offset), min(end, ref.offset + ref.length)
                dst = out[lo - start : hi - start]
                fut = self._window.get(i)
                if fut is None and lo == ref.offset and hi == ref.offset + ref.length:
                    direct.append(self.fetcher.submit_into(m, i, dst))
                    continue
                if fut is None:
                    fut = self._window[i] = self.fetcher.submit(m, i)
                copies.append((fut, dst, lo - ref.offset))
            sequential = start in (0, self._last_end)
            self._last_end = end
            last = m.chunk_index(end - 1)
            if sequential and self.readahead:
                for i in range(last + 1, min(last + 1 + self.readahead, len(m.chunks))):
                    if i not in self._window:
                        self._window[i] = self.fetcher.submit(m, i)
            try:
                for fut, dst, skip in copies:
                    dst[:] = memoryview(fut.result())[skip : skip + len(dst)]
            except BaseException:
                self._forget_failed()
                raise
        # Chunks behind the reader leave the window; the one it stopped in stays.
        for i in [i for i in self._window if i < last]:
            self._window.pop(i).cancel()

    def _forget_failed(self) -> None:
        """Drop failed fetches from the window, so the next read of those chunks tries again."""
        for i, f in list(self._window.items()):
            if f.done() and (f.cancelled() or f.exception() is not None):
                del self._window[i]

    def close(self) -> None:
        for f in self._window.values():
            f.cancel()
        self._window.clear()
        super().close()


class SdcacheWriteFile(AbstractBufferedFile):
    """``open(path, 'wb')``: spooled to a temporary file, uploaded with ``put`` on close."""

    def __init__(self, fs: SdcacheFileSystem, path: str) -> None:
        super().__init__(fs, path, mode="wb", block_size=CHUNK_SIZE, cache_type="none")
        self._tmp = tempfile.NamedTemporaryFile(prefix="sdcache-write-", delete=False)

    def _upload_chunk(self, final: bool = False) -> bool:
        self._tmp.write(self.buffer.getvalue())
        if final:
            self._tmp.close()
            try:
                self.fs.put_file(self._tmp.name, self.path)
            finally:
                os.unlink(self._tmp.name)
        return True

    def _initiate_upload(self) -> None:
        pass


fsspec.register_implementation("sdcache", SdcacheFileSystem, clobber=True)
