"""Which machine this is, so a client can tell a node on its own host."""

from __future__ import annotations

import functools
import socket


@functools.cache
def host_id() -> str:
    """A stable id of this machine for this boot: hostname plus kernel boot id.

    Two processes get the same id exactly when they can see the same
    ``/dev/shm``; that is when a client may read a node's pool directly.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"
