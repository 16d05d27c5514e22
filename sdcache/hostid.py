"""Which machine this is, so a client can tell a node on its own host."""

from __future__ import annotations

import functools
import os
import socket

#: Overrides the host id: processes on one machine that stand for different hosts (a test bed of
#: network namespaces, tests/_testbed.py) must not read each other's pools directly.
HOST_ID_ENV = "SDCACHE_HOST_ID"


@functools.cache
def host_id() -> str:
    """A stable id of this machine for this boot: hostname plus kernel boot id (or ``$SDCACHE_HOST_ID``).

    Two processes get the same id exactly when they can see the same
    ``/dev/shm``; that is when a client may read a node's pool directly.
    """
    override = os.environ.get(HOST_ID_ENV)
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"
