"""Human byte sizes: ``8GiB``, ``512MB``, ``4096``."""

from __future__ import annotations

import re

from .errors import InvalidArgument

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``8GiB`` or ``1.5G`` (decimal units unless ``i``)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidArgument(f"not a byte size: {text!r} (try 8GiB, 512MiB or 4096)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    """Format *n* bytes with binary units, e.g. ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_SECONDS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``3600``, ``90s``, ``15m``, ``12h`` or ``30d``."""
    m = _DURATION.match(text)
    if not m:
        raise InvalidArgument(f"not a duration: {text!r} (try 3600, 90m, 12h or 30d)")
    return float(m.group(1)) * _SECONDS[m.group(2)]
