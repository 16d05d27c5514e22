"""``sdcache mount`` / ``sdcache umount``: the cache as an ordinary read-only folder.

Programs that only know file paths (ComfyUI, A1111, ``safetensors.safe_open``,
``cp``) read the cache through a FUSE mount (pyfuse3, libfuse 3). The request
handlers live in :mod:`._fuse_ops`, the chunk memory in :mod:`._fuse_cache`, the
page-cache push in :mod:`._fuse_push`;
this module parses arguments, mounts, runs the trio loop, daemonizes, raises
the kernel read-ahead of the mount, clears stale mounts and unmounts.

Without ``--foreground`` the command re-executes itself in the foreground as
a detached child and returns once the mount answers. A mount left behind by a
crashed daemon ("transport endpoint is not connected") is cleared before
mounting again. SIGTERM or SIGINT unmounts cleanly.

pyfuse3 and trio are imported only when a mount is served, so the CLI parser
builds without them.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from sdcache import errors, logs, tls
from sdcache import metrics as sdc_metrics
from sdcache.tls import Credentials
from sdcache.units import format_size, parse_size

log = logging.getLogger(__name__)

MOUNT_READY_TIMEOUT = 60.0
UMOUNT_WAIT = 15.0
DEFAULT_READ_AHEAD_KB = 4096  # kernel read-ahead of the mount: 4 MiB, one chunk
MAX_REQUESTS = 32  # FUSE requests handled at once
DEFAULT_PUSH_MEMORY = "25%"


def push_memory(value: str) -> int:
    """``--push-memory``: a size (``2GiB``) or a percentage of physical memory (``25%``), in bytes."""
    value = str(value).strip()
    if value.endswith("%"):
        try:
            share = float(value[:-1])
        except ValueError:
            raise errors.InvalidArgument(f"--push-memory {value!r}: not a percentage") from None
        if not 0 <= share <= 100:
            raise errors.InvalidArgument(f"--push-memory {value!r}: a percentage is 0 to 100")
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * share / 100)
    return parse_size(value)


# -- arguments ---------------------------------------------------------------------------
def add_mount_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``sdcache mount``."""
    p.add_argument("mountpoint", help="an existing empty directory")
    p.add_argument("--meta", metavar="HOST:PORT", default=argparse.SUPPRESS,
                   help="metadata service (default: $SDCACHE_META, else 127.0.0.1:7070)")
    tls.add_arguments(p, suppress=True)
    p.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground until unmounted")
    p.add_argument("--attr-timeout", type=float, default=3.0, metavar="SECONDS",
                   help="how long names and directory listings are trusted; a re-imported file shows its "
                        "new version to new opens after at most this long (default 3)")
    p.add_argument("--timeout", type=float, default=20.0, metavar="SECONDS",
                   help="longest wait for the cluster before a request fails with EIO (default 20)")
    p.add_argument("--max-memory", default="512MiB", metavar="SIZE",
                   help="bound on the daemon's chunk buffers, however many files are open (default 512MiB)")
    p.add_argument("--readahead", type=int, default=8, metavar="CHUNKS",
                   help="chunks fetched ahead of a sequential or mmap reader (default 8, i.e. 32 MiB)")
    p.add_argument("--threads", type=int, default=16, help="parallel chunk fetches (default 16)")
    p.add_argument("--push-memory", default=DEFAULT_PUSH_MEMORY, metavar="SIZE",
                   help="bound on the bytes of open files pushed into the kernel page cache ahead of their "
                        "readers, as a size or a percentage of physical memory (default 25%%; 0 turns pushing "
                        "off: every read is a FUSE request)")
    p.add_argument("--push-threads", type=int, default=2, metavar="N",
                   help="threads fetching chunks and copying them into the page cache (default 2)")
    p.add_argument("--read-ahead-kb", type=int, default=DEFAULT_READ_AHEAD_KB, metavar="KB",
                   help="kernel read-ahead of the mount, set when run as root (default 4096; 0 leaves it)")
    p.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    p.add_argument("--log", metavar="FILE", help="daemon log file in background mode "
                                                 "(default: a file in the runtime directory)")
    logs.add_argument(p)
    sdc_metrics.add_argument(p, "a loopback address needs no token; any other needs a token the metadata "
                                "service accepts for reading")
    p.add_argument("--ready-file", help=argparse.SUPPRESS)


def add_umount_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``sdcache umount``."""
    p.add_argument("mountpoint")
    p.add_argument("-z", "--lazy", action="store_true",
                   help="detach even while files are open: they keep reading, and the daemon exits "
                        "once the last one is closed")


# -- state files ---------------------------------------------------------------------
def _runtime_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    d = os.path.join(base, f"sdcache-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _state_path(mountpoint: str, suffix: str) -> str:
    key = hashlib.sha1(mountpoint.encode()).hexdigest()[:16]
    return os.path.join(_runtime_dir(), f"mount-{key}.{suffix}")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _daemon_pid(mountpoint: str) -> int | None:
    """Pid of the live daemon serving *mountpoint*, from its pid file."""
    try:
        with open(_state_path(mountpoint, "pid")) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return None
    args = cmdline.split(b"\0")
    return pid if b"sdcache" in args and b"mount" in args and mountpoint.encode() in args else None


def _alive(pid: int) -> bool:
    """False once *pid* and all its threads have exited (a zombie leader may outlive its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().rpartition(")")[2].split()[0] == "Z"
        return not zombie or os.listdir(f"/proc/{pid}/task") != [str(pid)]
    except OSError:
        return False


# -- mount state -----------------------------------------------------------------------
def _is_stale(mountpoint: str) -> bool:
    """True when *mountpoint* is a FUSE mount whose daemon is gone ("transport endpoint is not connected").

    ``stat`` alone can still succeed from the kernel's attribute cache for a moment after the
    daemon died; ``getxattr`` always reaches the daemon, and ours answers it at once.
    """
    try:
        os.stat(mountpoint)
        if not (_mountinfo(mountpoint) or ("", ""))[1].startswith("fuse"):
            return False
        os.getxattr(mountpoint, "user.sdcache.probe")
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _fusermount() -> str:
    for name in ("fusermount3", "fusermount"):
        path = shutil.which(name)
        if path:
            return path
    raise errors.Unavailable("fusermount3 not found (install fuse3)")


# fusermount3 reports a failed system call as "...: strerror(errno)", its only channel for the errno.
# Run in the C locale, that text maps back to the errno exactly (Python's own strerror is the C one).
_ERRNO_OF_STRERROR = {os.strerror(code): code for code in errno.errorcode}


def _unmount(mountpoint: str, *, lazy: bool) -> None:
    cmd = [_fusermount(), "-u", *(["-z"] if lazy else []), mountpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env={**os.environ, "LC_ALL": "C"})
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1].rsplit(": ", 1)[-1]
        code = _ERRNO_OF_STRERROR.get(why)
        if code == errno.EBUSY:
            why += " (files are open: close them, or use --lazy)"
        message = f"cannot unmount {mountpoint}: {why}"
        raise errors.from_errno(code, message) if code else errors.SdcacheError(message)


def _clear_stale(mountpoint: str) -> bool:
    if not _is_stale(mountpoint):
        return False
    log.warning("%s: clearing a stale mount left by a daemon that exited", mountpoint)
    _unmount(mountpoint, lazy=True)
    return True


def _mountinfo(mountpoint: str) -> tuple[str, str] | None:
    """(major:minor, fstype) of the mount at *mountpoint*, read without touching it."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split()
        mp = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        if mp == mountpoint:
            fstype = fields[fields.index("-") + 1]
            found = (fields[2], fstype)  # the last one mounted there wins
    return found


def _raise_read_ahead(mountpoint: str, kb: int) -> None:
    """Let the kernel send 1 MiB reads and read ahead *kb*: FUSE mounts start at 128 KiB."""
    if kb <= 0:
        return
    info = _mountinfo(mountpoint)
    if info is None:
        log.warning("%s: not in /proc/self/mountinfo; kernel read-ahead left as is", mountpoint)
        return
    path = f"/sys/class/bdi/{info[0]}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
        log.info("%s: kernel read-ahead set to %d KiB (%s)", mountpoint, kb, path)
    except OSError as exc:
        log.warning("%s: cannot raise the kernel read-ahead (%s: %s); sequential reads get 128 KiB requests. "
                    "As root: echo %d > %s", mountpoint, path, exc.strerror, kb, path)


# -- mount -----------------------------------------------------------------------------
def main_mount(args: argparse.Namespace) -> int:
    """``sdcache mount``: mount, in the background unless ``--foreground``."""
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.exists("/dev/fuse"):
        raise errors.Unavailable("/dev/fuse is missing: load the fuse module or run the container with "
                                 "--device /dev/fuse")
    _clear_stale(mountpoint)
    if not os.path.isdir(mountpoint):
        raise errors.NotFound(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise errors.AlreadyExists(f"{mountpoint} is already a mount point")
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as exc:
        raise errors.Unavailable(f"FUSE support is not installed ({exc}); pip install pyfuse3 trio") from None
    if args.max_memory and parse_size(args.max_memory) < (32 << 20):
        raise errors.InvalidArgument("--max-memory must be at least 32MiB")
    push_memory(args.push_memory)  # a bad value fails here, before the daemon starts
    if getattr(args, "metrics_listen", None):
        sdc_metrics.split_listen(args.metrics_listen)
    if args.foreground:
        return _serve(args, mountpoint)
    return _spawn(args, mountpoint)


def _child_argv(args: argparse.Namespace, mountpoint: str, ready_file: str) -> list[str]:
    argv = [sys.executable, "-m", "sdcache"]
    argv += ["-v"] * max(getattr(args, "verbose", 0), 1)
    meta = getattr(args, "meta", None)
    if meta:
        argv += ["--meta", meta]
    for flag in ("token_file", "tls_cert", "tls_key", "tls_ca"):
        value = getattr(args, flag, None)
        if value:
            argv += [f"--{flag.replace('_', '-')}", os.path.abspath(value)]
    argv += ["mount", mountpoint, "--foreground", "--ready-file", ready_file,
             "--attr-timeout", str(args.attr_timeout), "--timeout", str(args.timeout),
             "--max-memory", str(args.max_memory), "--readahead", str(args.readahead),
             "--threads", str(args.threads), "--read-ahead-kb", str(args.read_ahead_kb),
             "--push-memory", str(args.push_memory), "--push-threads", str(args.push_threads)]
    if args.allow_other:
        argv.append("--allow-other")
    if getattr(args, "log_format", "text") != "text":
        argv += ["--log-format", args.log_format]
    if getattr(args, "metrics_listen", None):
        argv += ["--metrics-listen", args.metrics_listen]
    return argv


def _spawn(args: argparse.Namespace, mountpoint: str) -> int:
    """Start the daemon detached; return once the mount answers."""
    ready_file = _state_path(mountpoint, "ready")
    log_path = os.path.abspath(args.log) if args.log else _state_path(mountpoint, "log")
    if os.path.exists(ready_file):
        os.unlink(ready_file)
    with open(log_path, "ab") as logf:
        start = logf.tell()  # this daemon's lines begin here
        proc = subprocess.Popen(_child_argv(args, mountpoint, ready_file), stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=logf, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + MOUNT_READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            why = _last_error(log_path, start) or f"exit status {proc.returncode}"
            raise errors.SdcacheError(f"mount failed: {why}")
        if os.path.exists(ready_file) and os.path.ismount(mountpoint):
            os.unlink(ready_file)
            print(f"sdcache: mounted at {mountpoint} (pid {proc.pid}, log {log_path})", flush=True)
            return 0
        time.sleep(0.02)
    proc.terminate()
    raise errors.Unavailable(f"mount did not become ready in {MOUNT_READY_TIMEOUT:.0f}s (log: {log_path})")


def _last_error(log_path: str, start: int) -> str:
    """The daemon's last error line in its log (its part begins at byte *start*)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            lines = f.read()[-4000:].decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if "error" in line.lower():
            return line.split("error: ", 1)[-1].strip()
    return lines[-1].strip() if lines else ""


def _serve(args: argparse.Namespace, mountpoint: str) -> int:
    """Mount and answer FUSE requests until unmounted or signalled."""
    import pyfuse3
    import trio

    from ._fuse_ops import MountConfig, SdcacheOperations
    from .fetcher import Fetcher
    from .metaclient import MetaClient

    logs.configure(getattr(args, "log_format", "text"))
    # Signals wait (blocked in every thread made from here on) until the loop turns them into a
    # clean unmount.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    config = MountConfig(attr_timeout=args.attr_timeout, timeout=args.timeout,
                         max_memory=parse_size(args.max_memory), readahead=max(0, args.readahead),
                         threads=max(1, args.threads), push_memory=push_memory(args.push_memory),
                         push_threads=max(1, args.push_threads))
    meta = MetaClient(getattr(args, "meta", None), timeout=config.timeout, credentials=Credentials.from_args(args))
    try:
        meta.stats()  # a wrong --meta fails here, with one clear line, not at the first read
    except errors.Unavailable:
        raise errors.Unavailable(f"cannot reach the metadata service at {meta.address}") from None
    fetcher = Fetcher(meta, threads=config.threads, timeout=config.timeout)
    ops = SdcacheOperations(meta, fetcher, config)
    options = {"fsname=sdcache", "subtype=sdcache", "ro", "default_permissions", "noatime"}
    if args.allow_other:
        options.add("allow_other")
    metrics_server = _metrics_server(getattr(args, "metrics_listen", None), meta)
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as exc:
        if metrics_server is not None:
            metrics_server.stop()
        raise errors.Unavailable(f"cannot mount {mountpoint}: {exc} (see the lines above)") from None
    try:
        trio.run(_run, ops, mountpoint, args)
    finally:
        ops.pusher.close()  # no worker may copy into the session once it is closed
        if metrics_server is not None:
            metrics_server.stop()
        # Safe after an external unmount too: libfuse skips the unmount when the kernel ended the session.
        pyfuse3.close(unmount=True)
        fetcher.close()
        meta.close()
        if _daemon_pid(mountpoint) in (None, os.getpid()):  # (not a newer daemon's)
            try:
                os.unlink(_state_path(mountpoint, "pid"))
            except OSError:
                pass
    push = ops.pusher
    log.info("%s: unmounted (chunk memory peak %s, %d buffers made; page cache: %s pushed for %d file loads, "
             "at most %s of open files at once, limit %s)", mountpoint, format_size(ops.cache.peak),
             ops.cache.fresh, format_size(push.total), push.files, format_size(push.peak), format_size(push.limit))
    return 0


class MetaTokenCheck:
    """Checks a scrape's bearer token by asking the metadata service: good if it accepts it for a read.

    The mount holds no token keys (only a node fetches those), so a token is
    good when a ``GetConfig`` call (role ``read``) made with it succeeds. A
    good answer is kept for :attr:`TTL` seconds, so Prometheus scraping every
    15 s costs the service one call per token every half minute and a revoked
    token stops working here within that.
    """

    TTL = 30.0
    MAX_KEPT = 64

    def __init__(self, address: str, tls_files: tls.TlsFiles | None) -> None:
        self.address = address
        self.tls_files = tls_files
        self._good: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, token: str | None) -> None:
        from .metaclient import MetaClient

        if not token:
            raise errors.Unauthenticated("no token: send Authorization: Bearer TOKEN (a read token)")
        now = time.monotonic()
        with self._lock:
            if self._good.get(token, 0.0) > now:
                return
        client = MetaClient(self.address, timeout=5.0, credentials=Credentials(token, self.tls_files))
        try:
            client.store_url()
        finally:
            client.close()
        with self._lock:
            if len(self._good) >= self.MAX_KEPT:
                self._good.clear()
            self._good[token] = now + self.TTL


def _metrics_server(listen: str | None, meta: Any) -> sdc_metrics.MetricsServer | None:
    """``--metrics-listen``: open on a loopback address, else behind a token the metadata service accepts."""
    if not listen:
        return None
    host, _ = sdc_metrics.split_listen(listen)
    check = None if sdc_metrics.is_loopback(host) else MetaTokenCheck(meta.address, meta.credentials.tls)
    server = sdc_metrics.MetricsServer(listen, sdc_metrics.Exposition(), check)
    server.start()
    return server


async def _run(ops: Any, mountpoint: str, args: argparse.Namespace) -> None:
    """The trio side: the FUSE loop, the signal watcher and the readiness report."""
    import pyfuse3
    import trio

    from ._fuse_cache import ABANDON

    async def watch_signals(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
            task_status.started()
            async for signum in signals:
                log.info("%s: %s received, unmounting", mountpoint, signal.Signals(signum).name)
                # Copies into the page cache can wait on a read request: they finish while requests
                # are still answered.
                await ops.pusher.drain()
                pyfuse3.terminate()
                return

    async def announce() -> None:
        # The kernel answers a stat of the mount only once the INIT handshake is done, and INIT
        # resets the read-ahead: so stat first (served by this very loop), then raise it.
        await trio.to_thread.run_sync(os.stat, mountpoint, **ABANDON)
        await trio.to_thread.run_sync(_after_mount, mountpoint, args)
        print(f"sdcache mount: serving {mountpoint} (metadata service {ops.meta.address})", flush=True)

    async with trio.open_nursery() as nursery:
        ops.attach(nursery)
        await nursery.start(watch_signals)
        nursery.start_soon(announce)
        # Each worker task holds a 1 MiB request buffer: enough of them for the kernel's background
        # reads plus readers' own, not a hundred.
        await pyfuse3.main(min_tasks=2, max_tasks=MAX_REQUESTS)
        nursery.cancel_scope.cancel()


def _after_mount(mountpoint: str, args: argparse.Namespace) -> None:
    """Once the kernel talks to the daemon: raise the read-ahead, write the pid and ready files."""
    _raise_read_ahead(mountpoint, args.read_ahead_kb)
    _write_atomic(_state_path(mountpoint, "pid"), f"{os.getpid()}\n")
    if args.ready_file:
        _write_atomic(args.ready_file, f"{mountpoint}\n")


# -- umount ----------------------------------------------------------------------------
def main_umount(args: argparse.Namespace) -> int:
    """``sdcache umount``: unmount and wait for the daemon to exit."""
    mountpoint = os.path.abspath(args.mountpoint)
    pid = _daemon_pid(mountpoint)
    if _clear_stale(mountpoint):
        print(f"sdcache: cleared the stale mount at {mountpoint}", flush=True)
        return 0
    if not os.path.ismount(mountpoint) or (_mountinfo(mountpoint) or ("", ""))[1] != "fuse.sdcache":
        raise errors.InvalidArgument(f"{mountpoint} is not an sdcache mount")
    _unmount(mountpoint, lazy=args.lazy)
    if args.lazy:
        return 0  # the daemon serves files still open, and exits once the last one is closed
    if pid is not None:
        deadline = time.monotonic() + UMOUNT_WAIT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(pid):
            log.warning("daemon %d still running after unmount; sending SIGTERM", pid)
            os.kill(pid, signal.SIGTERM)
    return 0
