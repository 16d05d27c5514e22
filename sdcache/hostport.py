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


def write_ready_file(path: str, address: str) -> None:
    """Announce a server's bound ``HOST:PORT`` in *path*, atomically (tests and ``up`` wait for it)."""
    import os

    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(address + "\n")
    os.replace(tmp, path)


def split_hostports(text: str, *, what: str = "--meta", default_host: str = "127.0.0.1") -> list[str]:
    """``HOST:PORT[,HOST:PORT...]`` to a list of normalized ``HOST:PORT``, in order, each once.

    Several addresses name several services over one store (``--meta a,b,c``,
    ``SDCACHE_META=a,b,c``); a client uses the first that answers and fails
    over to the next. An empty host is *default_host*. *what* names the flag
    in the error.
    """
    out: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        host, port = split_hostport(item, what=what, default_host=default_host)
        address = join_hostport(host, port)
        if address not in out:
            out.append(address)
    if not out:
        raise InvalidArgument(f"{what} wants HOST:PORT[,HOST:PORT...], got {text!r}")
    return out
