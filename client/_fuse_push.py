"""Pushing a file that is being loaded into the kernel page cache, ahead of its reader (FUSE ``notify_store``).

Without it every 1 MiB a reader takes through the mount is one FUSE round
trip: the kernel asks, the daemon's event loop answers with a copy, one
request at a time. A loader reads a model whole, so once a reader shows it is
loading a file (a read request at or past :data:`START_AFTER` and past the
header chunk: a reader of the header only, such as a model listing, never
gets there) the mount's push threads fetch the file's chunks themselves and
write them into the page cache of its inode, in file order from where the
reader is, then the part before. The reader's later ``read`` calls and mmap
page faults find the pages there and never become requests. A page the push
has not reached yet is asked for and answered as before, so a reader never
waits for the push; when a reader catches up with the push, the push leaves
it the kernel's read-ahead window (:data:`LEAP`) and goes on beyond, so the
two work side by side instead of on the same bytes.

Why the bytes are always right:

- Each version of a file is its own inode, and a version's bytes never
  change: a page pushed for an inode is that version's bytes for as long as
  the kernel keeps it, and a re-imported path is a new inode (see
  :mod:`._fuse_ops`). Pushes only ever go to the inode of the manifest the
  bytes come from.
- Chunks come from :meth:`Fetcher.fetch_into`, verified (with failover to the
  next node and the under-store), into a buffer the push thread owns.
- The kernel marks a page up to date only when a push fills it whole.
  Chunks start at tensor boundaries, so a page where two chunks meet is
  assembled from both (a few KiB copied) and pushed once complete; if one
  side is never pushed (the reader had it already) the page is left to a
  request.

Memory: the bytes pushed for a file count against ``limit`` from the push
until the file's last handle (and mapping) is closed; then they are ordinary
page cache, kept across opens like pages the kernel read itself and reclaimed
by it under memory pressure. A push that does not fit waits for a file to
close, leaving the reader to requests meanwhile. Each push thread holds one
chunk buffer (4 MiB) beside the chunk cache's ``--max-memory``.

A push thread can wait on a page lock held by a read request in flight, which
the event loop answers meanwhile (a push never waits on the event loop, so
this cannot deadlock); :meth:`PageCachePusher.drain` lets pushes under way
finish while requests are still served, before the FUSE loop stops.
"""

from __future__ import annotations

import errno
import logging
import mmap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from sdcache import errors
from sdcache.chunking import CHUNK_SIZE
from sdcache.manifest import Manifest
from sdcache.units import format_size

from . import metrics
from ._fuse_cache import ABANDON
from .fetcher import Fetcher

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
START_AFTER = 4 << 20  # a read request from here on (and past the header chunk) starts the push
LEAP = 4 << 20  # the kernel's read-ahead window of the mount (``--read-ahead-kb`` 4096)
DRAIN_TIMEOUT = 30.0

#: ``pyfuse3.notify_store(inode, offset, data)``: copies *data* into the page cache of *inode*.
Store = Callable[[int, int, memoryview], None]


@dataclass(eq=False)
class _File:
    """One open inode: the version it serves, and what of it was pushed or answered by requests."""

    ino: int
    manifest: Manifest
    served: list[int]  # bytes of each chunk the reader already got through read requests
    claimed: bytearray  # 1: a push thread took the chunk
    opens: int = 0
    pushed: int = 0  # bytes claimed for pushing while open: counted against the limit
    started: bool = False
    passes: list[tuple[int, int]] = field(default_factory=list)  # chunk ranges [start, stop) to go, in order
    cursor: int = 0  # the next chunk of passes[0]
    pages: dict[int, list] = field(default_factory=dict)  # page offset -> [bytes so far, count filled]
    failed: str = ""
    over_limit_logged: bool = False


class PageCachePusher:
    """Push threads that copy the files readers are loading into the kernel page cache, within a byte limit.

    The request handlers (on the event loop) call :meth:`opened`,
    :meth:`served` and :meth:`closed`; everything they share with the push
    threads is guarded by one lock, taken once per request or chunk.
    """

    def __init__(self, fetcher: Fetcher, *, limit: int, threads: int, store: Store,
                 start_after: int = START_AFTER, leap: int = LEAP) -> None:
        self.fetcher = fetcher
        self.limit = max(0, limit)
        self.start_after = start_after
        self.leap = leap
        self._store = store
        self._cond = threading.Condition()
        self._files: dict[int, _File] = {}
        self._active: list[_File] = []  # files with chunks still to push, in turn
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"sdcache-push-{i}", daemon=True)
                         for i in range(max(1, threads) if self.limit else 0)]
        self.held = 0  # bytes of open files claimed for pushing
        self.peak = 0
        self.total = 0  # bytes pushed since the mount started
        self.files = 0  # pushes started
        metrics.PUSH_LIMIT.set(self.limit)

    def start(self) -> None:
        """Start the push threads (once the FUSE session exists)."""
        for t in self._threads:
            t.start()

    # -- what the request handlers tell it (event loop) ------------------------------------------
    def opened(self, ino: int, m: Manifest) -> None:
        """A handle of inode *ino*, which serves *m*, was opened."""
        if not self._threads:
            return
        with self._cond:
            f = self._files.get(ino)
            if f is None:
                f = self._files[ino] = _File(ino, m, [0] * len(m.chunks), bytearray(len(m.chunks)))
            f.opens += 1

    def served(self, ino: int, off: int, end: int) -> None:
        """A read request got bytes [off, end) of inode *ino*: note it, and start pushing a file being loaded."""
        f = self._files.get(ino)
        if f is None or not self._threads or not f.manifest.chunks:
            return
        m = f.manifest
        with self._cond:
            first = m.chunk_index(off)
            for i in m.chunks_for(off, end):
                ref = m.chunks[i]
                f.served[i] += min(end, ref.offset + ref.length) - max(off, ref.offset)
            if f.started:
                if f.passes and f.cursor <= first < f.passes[0][1]:
                    self._leap(f, first, end)
            elif off >= max(self.start_after, m.chunks[0].length) and not self._stopping:
                f.started = True
                f.passes = [(first, len(m.chunks)), (0, first)]
                f.cursor = first
                self.files += 1
                self._active.append(f)
                self._cond.notify_all()
                log.debug("%s: pushing into the page cache from byte %d", m.path, m.chunks[first].offset)

    def _leap(self, f: _File, first: int, end: int) -> None:
        """The reader caught up with the push at chunk *first*: leave it what it reads next (lock held).

        The kernel will ask for its read-ahead window and more while the
        reader goes on, so the push jumps to the middle of what is left of
        its pass (at least a read-ahead window ahead) and comes back for the
        half it skipped, minus what the reader had meanwhile. The reader and
        the push then work on different bytes, and they meet again only a
        few times per file.
        """
        m = f.manifest
        stop = f.passes[0][1]
        jump = max(m.chunk_index(min(m.size - 1, end + self.leap)) + 1, first + (stop - first) // 2)
        if jump >= stop:
            f.cursor = stop
            return
        f.passes[0] = (jump, stop)
        f.passes.insert(1, (first, jump))
        f.cursor = jump

    def pushing(self, ino: int, index: int) -> bool:
        """Whether the push has chunk *index* of inode *ino* or is about to (the reader need not fetch it ahead)."""
        f = self._files.get(ino)
        if f is None or not f.started:
            return False
        if f.claimed[index]:
            return True
        passes = f.passes
        return bool(passes) and f.cursor <= index < passes[0][1]

    def closed(self, ino: int) -> None:
        """A handle of inode *ino* was released (the kernel sends this once no mapping uses it either)."""
        with self._cond:
            f = self._files.get(ino)
            if f is None:
                return
            f.opens -= 1
            if f.opens > 0:
                return
            del self._files[ino]
            if f in self._active:
                self._active.remove(f)
            f.pages.clear()
            if f.started:
                log.debug("%s: closed; %s pushed into the page cache, %s by read requests", f.manifest.path,
                          format_size(f.pushed), format_size(sum(f.served)))
            if f.pushed:
                self.held -= f.pushed
                metrics.PUSH_HELD.set(self.held)
                self._cond.notify_all()

    # -- push threads ------------------------------------------------------------------------------
    def _claim(self) -> tuple[_File, int] | None:
        """(file, chunk index) to push next, taking turns between files; None if none fits now (lock held)."""
        for _ in range(len(self._active)):
            f = self._active.pop(0)
            i = self._next(f)
            if i is None:
                continue  # done: not put back
            length = f.manifest.chunks[i].length
            if self.held + length > self.limit:
                if not f.over_limit_logged:
                    f.over_limit_logged = True
                    log.info("%s: page-cache push waits: %s of open files pushed, the limit is %s",
                             f.manifest.path, format_size(self.held), format_size(self.limit))
                self._active.append(f)
                continue
            f.cursor += 1
            f.claimed[i] = 1
            f.pushed += length
            self.held += length
            self.peak = max(self.peak, self.held)
            metrics.PUSH_HELD.set(self.held)
            self._active.append(f)
            return f, i
        return None

    @staticmethod
    def _next(f: _File) -> int | None:
        """The next chunk of *f* to push (at ``f.cursor``, which moves past the rest), or None when done."""
        if f.failed:
            return None
        chunks = f.manifest.chunks
        while f.passes:
            stop = f.passes[0][1]
            while f.cursor < stop:
                i = f.cursor
                if not f.claimed[i] and f.served[i] < chunks[i].length:
                    return i
                f.cursor += 1
            f.passes.pop(0)
            if f.passes:
                f.cursor = f.passes[0][0]
        return None

    def _work(self) -> None:
        buf = mmap.mmap(-1, CHUNK_SIZE, flags=mmap.MAP_PRIVATE)
        while True:
            with self._cond:
                job = None if self._stopping else self._claim()
                while job is None:
                    if self._stopping:
                        return
                    self._cond.wait()
                    job = None if self._stopping else self._claim()
            f, i = job
            try:
                self._push_chunk(f, i, memoryview(buf)[: f.manifest.chunks[i].length])
            except OSError as exc:
                why = errno.errorcode.get(exc.errno or 0, str(exc))
                f.failed = f"{why}"
                if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                    log.warning("the kernel takes no page-cache pushes (notify_store): pushing is off")
                    with self._cond:
                        self._stopping = True
                elif exc.errno not in (errno.ENOENT, errno.ENODEV):  # inode or mount gone: nothing to do
                    log.warning("%s: page-cache push stopped: %s", f.manifest.path, exc)
            except errors.SdcacheError as exc:  # the chunk could not be fetched: the reader's requests say so
                f.failed = str(exc)
                log.info("%s: page-cache push stopped: %s", f.manifest.path, exc)
            except Exception:
                f.failed = "error"
                log.exception("%s: page-cache push failed", f.manifest.path)
            finally:
                with self._cond:
                    self._cond.notify_all()

    def _push_chunk(self, f: _File, i: int, view: memoryview) -> None:
        """Fetch chunk *i* of *f* into *view* and copy it into the page cache: whole pages, and its share of edges."""
        m = f.manifest
        ref = m.chunks[i]
        self.fetcher.fetch_into(m, i, view)
        if f.opens <= 0:
            return
        o, e = ref.offset, ref.offset + ref.length
        lo = -(-o // PAGE) * PAGE
        hi = e if e == m.size else e // PAGE * PAGE
        pushed = 0
        if hi > lo:
            self._store(f.ino, lo, view[lo - o : hi - o])
            pushed += hi - lo
        if o % PAGE:  # the page where this chunk begins
            page = o // PAGE * PAGE
            pushed += self._edge(f, page, o - page, view[: min(e, page + PAGE) - o])
        if e % PAGE and e != m.size and e // PAGE * PAGE >= lo:  # the page where it ends, if another
            page = e // PAGE * PAGE
            pushed += self._edge(f, page, 0, view[page - o :])
        with self._cond:
            self.total += pushed
        metrics.PUSHED_BYTES.inc(pushed)

    def _edge(self, f: _File, page: int, at: int, piece: memoryview) -> int:
        """Put *piece* at *at* in the page at file offset *page*; push the page once every chunk gave its share."""
        length = min(PAGE, f.manifest.size - page)
        with self._cond:
            entry = f.pages.get(page)
            if entry is None:
                entry = f.pages[page] = [bytearray(length), 0]
            entry[0][at : at + len(piece)] = piece
            entry[1] += len(piece)
            if entry[1] < length:
                return 0
            del f.pages[page]
        self._store(f.ino, page, memoryview(entry[0]))
        return length

    # -- lifecycle ---------------------------------------------------------------------------------
    async def drain(self) -> None:
        """Stop pushing, and wait (serving requests meanwhile) until no push thread copies into the kernel."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        await trio.to_thread.run_sync(self._join, DRAIN_TIMEOUT, **ABANDON)

    def close(self) -> None:
        """Once the FUSE loop has stopped: end the push threads (waiting for a copy in progress)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._join(DRAIN_TIMEOUT)

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            log.warning("page-cache push threads still copying after %.0fs: %s", timeout, ", ".join(stuck))
