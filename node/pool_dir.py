"""A pool directory on disk: its ownership lock, its modes, and readers' locks on chunk files.

The rules are :mod:`sdcache.node.pool`'s (its docstring says why): one pool
owns a directory through an exclusive ``flock`` on :data:`LOCK_FILE`;
directories are :data:`DIR_MODE` and files :data:`FILE_MODE` whatever the
umask; a same-host reader that maps a chunk file holds ``LOCK_SH`` on it, and
an evicted file waits in :data:`EVICTED_DIR` until nobody does.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import tempfile

import xxhash

from sdcache.errors import AlreadyExists

LOCK_FILE = ".lock"  # flock'ed by the one pool that owns the directory
EVICTED_DIR = ".evicted"  # evicted chunk files a same-host reader still has mapped
DIR_MODE = 0o750  # pool directory and its subdirectories: the node's user and group
FILE_MODE = 0o640  # chunk files: readable by the node's group (short-circuit reads)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def default_pool_dir(node_id: str) -> str:
    """The pool directory of node *node_id* when none is given: ``/dev/shm/sdcache/<id>``.

    Stable per node id, so a restarted node finds its chunks again (a warm
    restart). Characters outside ``[A-Za-z0-9._-]`` become ``_``; an id that
    needed that, is over 100 characters or is only dots also gets a hash of
    the id appended, so distinct ids keep distinct directories and none
    escapes ``sdcache/``. Where ``/dev/shm`` is missing (not Linux), the base
    is :func:`tempfile.gettempdir` instead.
    """
    name = _UNSAFE.sub("_", node_id)
    if name != node_id or len(name) > 100 or not name.strip("."):
        name = f"{name[:64].strip('.') or 'node'}-{xxhash.xxh3_64_hexdigest(node_id.encode())}"
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, "sdcache", name)


def make_dir(path: str) -> None:
    """Create *path* (and parents) and give it :data:`DIR_MODE` whatever the umask."""
    os.makedirs(path, DIR_MODE, exist_ok=True)
    st = os.stat(path)
    want = DIR_MODE | (st.st_mode & stat.S_ISGID)  # keep an inherited group for readers
    if stat.S_IMODE(st.st_mode) != want:
        os.chmod(path, want)


def lock_dir(pool_dir: str) -> int:
    """Take the exclusive lock on *pool_dir*; returns the descriptor that holds it."""
    path = os.path.join(pool_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyExists(
            f"pool directory {pool_dir} is in use: another node holds it; "
            "give this node its own --pool-dir or stop the other one"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.fchmod(fd, FILE_MODE)
    return fd


def mapped_by_reader(path: str) -> bool:
    """Whether a same-host reader holds its shared lock on chunk file *path*."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops our lock, if we got it
    return False


def try_remove(path: str) -> int:
    """Unlink evicted file *path* unless a reader has it mapped; returns the bytes still held."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.fstat(fd).st_size
        # Holding LOCK_EX: a reader that opened the file before it was renamed
        # gets its LOCK_SH only after this, then finds the pool path changed.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return 0
    finally:
        os.close(fd)


def inode_of(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
