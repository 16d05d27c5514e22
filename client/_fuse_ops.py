"""pyfuse3 operations: the cache namespace as a read-only file system.

Inodes. A directory is one inode per path. A file is one inode per *version*
(path, generation): a version's bytes never change, so the kernel may keep
its page cache across opens (``keep_cache``) and its attributes for long. A
re-imported path gets a new inode at the next lookup, which the kernel makes
once the entry timeout (``--attr-timeout``) runs out; files already open keep
the inode, hence the version, they opened.

Every handler is a few lines over :class:`MetaClient` (run in worker threads,
never on the event loop), :class:`ChunkCache` and :class:`PageCachePusher` (which
writes files being loaded into the kernel page cache); sdcache errors become their
errno, an unreachable cluster ``EIO`` plus one log line, and no handler waits
longer than the configured timeout.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import posixpath
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

from sdcache import errors
from sdcache.manifest import Entry, Manifest

from . import metrics
from ._fuse_cache import ABANDON, ChunkCache
from ._fuse_push import PageCachePusher
from .fetcher import Fetcher
from .metaclient import MetaClient

log = logging.getLogger(__name__)

XATTR_PREFIX = "user.sdcache."
XATTRS = (b"user.sdcache.sha256", b"user.sdcache.kind", b"user.sdcache.source", b"user.sdcache.cached")
BLKSIZE = 1 << 20  # st_blksize: buffered readers (cp, Python's io) ask for 1 MiB at a time
FILE_ATTR_TIMEOUT = 3600.0  # a version's attributes never change
UNAVAILABLE_LOG_EVERY = 10.0

T = TypeVar("T")


@dataclass
class MountConfig:
    """Tunables of one mount (see ``sdcache mount --help``)."""

    attr_timeout: float = 3.0
    timeout: float = 20.0
    max_memory: int = 512 << 20
    readahead: int = 8  # chunks fetched ahead of a sequential reader
    threads: int = 16
    meta_threads: int = 8
    push_memory: int = 1 << 30  # bound on bytes pushed into the page cache for open files; 0: no pushing
    push_threads: int = 2  # worker threads copying into the kernel page cache


@dataclass(eq=False)
class _Inode:
    ino: int
    path: str
    is_dir: bool
    entry: Entry
    manifest: Manifest | None = None  # bound at first open: the version this inode serves
    lookups: int = 0
    opens: int = 0


@dataclass(eq=False)
class _OpenFile:
    node: _Inode
    manifest: Manifest
    last_chunk: int = -2  # chunk index of the previous read's end; -2 = none yet


@dataclass(eq=False)
class _OpenDir:
    entries: list[Entry] = field(default_factory=list)


def _counted(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Count each call in ``sdcache_fuse_operations_total{op=<handler name>}``."""
    calls = metrics.FUSE_OPERATIONS.labels(fn.__name__)

    @functools.wraps(fn)
    async def handler(self: "SdcacheOperations", *args: Any) -> T:
        calls.inc()
        return await fn(self, *args)

    return handler


def _fuse_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn every failure of a handler into an errno (an escaping exception would stop the mount); count it."""
    calls = metrics.FUSE_OPERATIONS.labels(fn.__name__)

    @functools.wraps(fn)
    async def handler(self: "SdcacheOperations", *args: Any) -> T:
        calls.inc()
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except errors.NotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except (errors.Unavailable, trio.TooSlowError) as exc:
            self._report_unavailable(fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except errors.SdcacheError as exc:
            log.error("%s: %s", fn.__name__, exc, extra={"op": fn.__name__})
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.error("%s: %s", fn.__name__, exc, extra={"op": fn.__name__})
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__, extra={"op": fn.__name__})
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


class SdcacheOperations(pyfuse3.Operations):
    """The FUSE request handlers of ``sdcache mount``."""

    enable_writeback_cache = False

    def __init__(self, meta: MetaClient, fetcher: Fetcher, config: MountConfig) -> None:
        super().__init__()
        self.meta = meta
        self.fetcher = fetcher
        self.config = config
        self.cache = ChunkCache(fetcher, limit=config.max_memory, timeout=config.timeout)
        self.pusher = PageCachePusher(fetcher, limit=config.push_memory, threads=config.push_threads,
                                      store=pyfuse3.notify_store)
        self._meta_limiter = trio.CapacityLimiter(config.meta_threads)
        self._uid, self._gid = os.getuid(), os.getgid()
        self._started = time.time()
        root = _Inode(pyfuse3.ROOT_INODE, "/", True, Entry("/", True, mtime=self._started))
        self._inodes: dict[int, _Inode] = {root.ino: root}
        self._dirs: dict[str, int] = {"/": root.ino}
        self._versions: dict[tuple[str, int], int] = {}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._files: dict[int, _OpenFile] = {}
        self._dirhandles: dict[int, _OpenDir] = {}
        self._next_fh = 1
        self._scratch = bytearray(1 << 20)  # assembles a request that straddles chunks
        self._listings: dict[str, tuple[float, list[Entry]]] = {}
        self._statfs: tuple[float, pyfuse3.StatvfsData] | None = None
        self._unavailable_logged = 0.0

    def attach(self, nursery: trio.Nursery) -> None:
        """Chunk fetches report to tasks of *nursery*; the page-cache push threads start here."""
        self.cache.attach(nursery)
        self.pusher.start()

    # -- helpers -------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking metadata call in a worker thread, never longer than the timeout."""
        with trio.fail_after(self.config.timeout):
            return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._meta_limiter,
                                                 **ABANDON)

    def _report_unavailable(self, op: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._unavailable_logged >= UNAVAILABLE_LOG_EVERY:
            self._unavailable_logged = now
            what = str(exc) or f"no answer within {self.config.timeout:g}s"
            log.error("sdcache mount: cluster unreachable (metadata service %s), answering EIO (%s): %s",
                      self.meta.address, op, what)

    def _node(self, ino: int) -> _Inode:
        node = self._inodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _inode_for(self, e: Entry) -> _Inode:
        """The inode of a directory path or of one file version, made on first sight."""
        ino = self._dirs.get(e.path) if e.is_dir else self._versions.get((e.path, e.generation))
        if ino is not None:
            return self._inodes[ino]
        ino = self._next_ino
        self._next_ino += 1
        node = _Inode(ino, e.path, e.is_dir, e)
        self._inodes[ino] = node
        if e.is_dir:
            self._dirs[e.path] = ino
        else:
            self._versions[(e.path, e.generation)] = ino
        return node

    def _maybe_drop(self, node: _Inode) -> None:
        if node.lookups > 0 or node.opens > 0 or node.ino == pyfuse3.ROOT_INODE:
            return
        self._inodes.pop(node.ino, None)
        if node.is_dir:
            if self._dirs.get(node.path) == node.ino:
                del self._dirs[node.path]
        elif self._versions.get((node.path, node.entry.generation)) == node.ino:
            del self._versions[(node.path, node.entry.generation)]

    def _attrs(self, node: _Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.config.attr_timeout
        a.st_uid, a.st_gid = self._uid, self._gid
        a.st_blksize = BLKSIZE
        if node.is_dir:
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2
            a.st_size = 0
            a.attr_timeout = self.config.attr_timeout
        else:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.st_size = node.entry.size
            a.st_blocks = (node.entry.size + 511) // 512
            a.attr_timeout = FILE_ATTR_TIMEOUT
        ns = int((node.entry.mtime or self._started) * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        return a

    async def _listing(self, path: str) -> list[Entry]:
        """Entries of directory *path*, reused for half the attribute timeout."""
        hit = self._listings.get(path)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.config.attr_timeout / 2:
            return hit[1]
        entries = await self._call(lambda: list(self.meta.list(path)))
        self._listings[path] = (now, entries)
        if len(self._listings) > 256:
            for key in [k for k, (t, _) in self._listings.items() if now - t >= self.config.attr_timeout / 2]:
                del self._listings[key]
        return entries

    async def _manifest(self, node: _Inode) -> Manifest:
        """The version *node* serves, fetched and bound on first use."""
        if node.manifest is not None:
            return node.manifest
        m = await self._call(self.meta.manifest, node.path)
        if node.manifest is not None:  # another request bound it meanwhile
            return node.manifest
        if m.generation != node.entry.generation:
            # Re-imported between lookup and first open. Nothing was read through this inode yet, so
            # it can serve the new version whole; only its cached attributes must go.
            log.info("%s changed (generation %d -> %d) before its first open", node.path,
                     node.entry.generation, m.generation)
            if self._versions.get((node.path, node.entry.generation)) == node.ino:
                del self._versions[(node.path, node.entry.generation)]
            node.entry = Entry(m.path, False, m.size, m.mtime, m.kind, m.sha256, m.generation, len(m.chunks))
            self._versions.setdefault((node.path, m.generation), node.ino)
            try:
                pyfuse3.invalidate_inode(node.ino, attr_only=True)
            except OSError as exc:
                log.debug("invalidate_inode(%d): %s", node.ino, exc)
        node.manifest = m
        return m

    # -- namespace -----------------------------------------------------------------
    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        sname = os.fsdecode(name)
        if sname == ".":
            node = parent
        elif sname == "..":
            node = self._inode_for(Entry(posixpath.dirname(parent.path), True))
        else:
            path = posixpath.join(parent.path, sname)
            try:
                e = await self._call(self.meta.stat, path)
            except (errors.NotFound, errors.NotADirectory, errors.InvalidPath):
                neg = pyfuse3.EntryAttributes()
                neg.st_ino = 0  # cache the miss for the entry timeout
                neg.entry_timeout = self.config.attr_timeout
                return neg
            node = self._inode_for(e)
        node.lookups += 1
        return self._attrs(node)

    @_counted
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            node = self._inodes.get(ino)
            if node is not None:
                node.lookups = max(0, node.lookups - nlookup)
                self._maybe_drop(node)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    @_fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        entries = await self._listing(node.path)
        fh = self._next_fh
        self._next_fh += 1
        self._dirhandles[fh] = _OpenDir(entries)
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._dirhandles[fh]
        for i in range(start_id, len(d.entries)):
            e = d.entries[i]
            node = self._inode_for(e)
            if not pyfuse3.readdir_reply(token, os.fsencode(posixpath.basename(e.path)), self._attrs(node), i + 1):
                break
            node.lookups += 1

    @_counted
    async def releasedir(self, fh: int) -> None:
        self._dirhandles.pop(fh, None)

    @_fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        now = time.monotonic()
        if self._statfs is not None and now - self._statfs[0] < 1.0:
            return self._statfs[1]
        s = await self._call(self.meta.stats)
        bsize = 4096
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = bsize
        st.f_blocks = s.capacity // bsize
        st.f_bfree = st.f_bavail = max(0, s.capacity - s.used) // bsize
        st.f_files = s.files
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        self._statfs = (now, st)
        return st

    # -- extended attributes -----------------------------------------------------------
    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if not name.startswith(b"user."):
            # No ACLs, no security labels. ENOTSUP (not ENODATA) lets `ls -l` stop asking for every
            # file of a 10,000-file directory: it remembers a device that does not support them.
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        node = self._node(inode)
        if node.is_dir or name not in XATTRS:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        key = name.decode()[len(XATTR_PREFIX):]
        if key == "sha256":
            return node.entry.sha256.encode()
        if key == "kind":
            return node.entry.kind.encode()
        m = await self._manifest(node)
        if key == "source":
            return m.source.encode()
        with trio.fail_after(self.config.timeout):
            frac = await trio.to_thread.run_sync(self.fetcher.cached_fraction, m, limiter=self._meta_limiter,
                                                 **ABANDON)
        return f"{frac:.4f}".rstrip("0").rstrip(".").encode() if frac else b"0"

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [] if self._node(inode).is_dir else list(XATTRS)

    # -- reading -----------------------------------------------------------------
    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        m = await self._manifest(node)
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = _OpenFile(node, m)
        node.opens += 1
        self.pusher.opened(node.ino, m)
        # One inode is one immutable version: its page cache stays valid across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> Any:
        metrics.FUSE_READ_SIZE.observe(size)
        f = self._files.get(fh)
        if f is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        m = f.manifest
        end = min(off + size, m.size)
        if end <= off:
            return b""
        self.pusher.served(f.node.ino, off, end)
        first, last = m.chunk_index(off), m.chunk_index(end - 1)
        self._read_ahead(f, first, last)
        # pyfuse3 replies from the returned buffer before any other task runs, so a slice of a
        # chunk (or of the shared scratch buffer) stays valid for exactly as long as needed.
        if first == last:
            base = m.chunks[first].offset
            chunk = await self.cache.get(m, first)
            return chunk[off - base : end - base]  # zero-copy
        pieces = range(first, last + 1)
        for i in pieces:
            self.cache.prefetch(m, i)  # start every piece at once
        slots = []
        try:
            for i in pieces:
                slots.append(await self.cache.acquire(m, i))  # pinned: none can go while we wait
            # The request straddles chunks: one copy into the scratch buffer, no await from here on.
            if len(self._scratch) < end - off:
                self._scratch = bytearray(end - off)
            out = memoryview(self._scratch)
            for i, slot in zip(pieces, slots):
                ref = m.chunks[i]
                lo, hi = max(off, ref.offset), min(end, ref.offset + ref.length)
                out[lo - off : hi - off] = self.cache.view(slot)[lo - ref.offset : hi - ref.offset]
            return out[: end - off]
        finally:
            for slot in slots:
                self.cache.release(slot)

    def _read_ahead(self, f: _OpenFile, first: int, last: int) -> None:
        """Fetch the next chunks ahead of a reader that moves forward (read() or mmap faults)."""
        prev, f.last_chunk = f.last_chunk, last
        if last == prev or not self.config.readahead:
            return  # still in the chunk of the previous read: the window is already under way
        if not (first == 0 or prev - 2 <= first <= prev + self.config.readahead):
            return
        stop = min(last + 1 + self.config.readahead, len(f.manifest.chunks))
        for i in range(last + 1, stop):
            if self.pusher.pushing(f.node.ino, i):
                break  # the page-cache push has it from here
            self.cache.prefetch(f.manifest, i)

    @_counted
    async def flush(self, fh: int) -> None:
        return None

    @_counted
    async def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is not None:
            f.node.opens -= 1
            self.pusher.closed(f.node.ino)
            self._maybe_drop(f.node)

    @_fuse_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        self._node(inode)
        return True

    # -- everything that would change the cache: read-only -----------------------------
    async def _read_only(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = setxattr = removexattr = mknod = mkdir = unlink = rmdir = _read_only
    symlink = rename = link = create = write = _read_only
