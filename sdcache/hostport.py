"""``HOST:PORT`` addresses: the one parser and joiner every process uses."""

from __future__ import annotations

from .errors import InvalidArgument


def split_hostport(text: str, *, what: str = "address", default_host: str | None = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too; port 0 picks one) to (host, port), brackets removed.

    An empty host is *default_host*, or an error when that is None. *what*
    names the flag in the error (``--listen``, ``--metrics-listen``).
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or int(port) > 65535 or (not host and default_host is None):
        raise InvalidArgument(f"{what} wants HOST:PORT, got {text!r}")
    return host or str(default_host), int(port)


def join_hostport(host: str, port: int) -> str:
    """(host, port) back to ``HOST:PORT``, bracketing an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
