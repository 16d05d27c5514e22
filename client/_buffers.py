"""Result buffers that need no extra copy.

``read()`` must return ``bytes``; building it from a filled ``bytearray``
costs a second pass over every byte (a full copy plus zero-filling the
bytearray first), which for a 1 GiB read is most of the time spent. On
CPython we allocate the ``bytes`` object uninitialised and fill it in place
through a writable view, before anyone else can see it. Elsewhere we fall
back to ``bytearray`` plus one copy.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

_CPYTHON = sys.implementation.name == "cpython"
if _CPYTHON:
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype = ctypes.py_object
    _new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    _as_string = ctypes.pythonapi.PyBytes_AsString
    _as_string.restype = ctypes.c_void_p
    _as_string.argtypes = (ctypes.py_object,)

SMALL = 1 << 16  # below this a plain copy is cheaper than the ctypes calls


def filled_bytes(n: int, fill: Callable[[memoryview], None]) -> bytes:
    """A new ``bytes`` of length *n* whose content *fill* writes into the view it is given.

    *fill* must not return or raise while anything (a worker thread) still
    writes into the view: on an error the ``bytes`` is freed at once, and a
    late write would land in freed memory. ``Fetcher.read_into`` keeps to this.
    """
    if n <= 0:
        return b""
    if not _CPYTHON or n < SMALL:
        buf = bytearray(n)
        fill(memoryview(buf))
        return bytes(buf)
    out: bytes = _new_bytes(None, n)  # uninitialised; nobody else holds a reference yet
    view = memoryview((ctypes.c_char * n).from_address(_as_string(out))).cast("B")
    try:
        fill(view)
    finally:
        view.release()
    return out
