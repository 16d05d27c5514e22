"""Where a PostgreSQL URL points, and why a first connection to it failed, in one line.

:class:`Target` is what a URL names, with libpq's defaults filled in, for
messages that never show the password. :func:`connect_error` turns a failed
first connection into the error that names the wrong part (host, port, user
or password, database) by asking, not by reading libpq's message text.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass

import psycopg
from psycopg import pq

from ..errors import InvalidArgument, NotFound, PermissionDenied, SdcacheError, Unauthenticated, Unavailable

CONNECT_TIMEOUT = 5  # seconds, unless the URL sets connect_timeout
PROBE_TIMEOUT = 3.0  # seconds: reachability checks behind a failed first connection


@dataclass(frozen=True, slots=True)
class Target:
    """Where a PostgreSQL URL points, for messages: never the password."""

    endpoints: tuple[tuple[str, int], ...]  # (host or socket directory, port)
    dbname: str
    user: str

    @classmethod
    def parse(cls, url: str) -> Target:
        """The target of *url* with libpq's defaults filled in; :class:`InvalidArgument` if it is no conninfo."""
        try:
            given = {o.keyword.decode(): o.val.decode() for o in pq.Conninfo.parse(url.encode())
                     if o.val is not None}
        except psycopg.Error as exc:
            raise InvalidArgument(f"--db is not a PostgreSQL URL: {one_line(exc)}") from None
        defaults = {o.keyword.decode(): (o.val or o.compiled or b"").decode() for o in pq.Conninfo.get_defaults()}

        def value(key: str, fallback: str) -> str:
            return given.get(key) or defaults.get(key) or fallback

        user = value("user", _os_user())
        hosts = value("host", "/var/run/postgresql" if os.path.isdir("/var/run/postgresql") else "localhost")
        ports = value("port", "5432").split(",")
        host_list = hosts.split(",")
        if len(ports) == 1:
            ports *= len(host_list)
        if len(ports) != len(host_list):
            raise InvalidArgument(f"--db: {len(ports)} ports for {len(host_list)} hosts ({hosts!r})")
        if not all(p.strip().isdigit() for p in ports):
            raise InvalidArgument(f"--db: port {','.join(ports)!r} is not a number")
        endpoints = tuple((h.strip(), int(p)) for h, p in zip(host_list, ports))
        return cls(endpoints, value("dbname", user), user)

    def where(self) -> str:
        places = ", ".join(f"{h}:{p}" if not h.startswith("/") else f"{h} (socket, port {p})"
                           for h, p in self.endpoints)
        return f"PostgreSQL at {places}, database {self.dbname!r}, user {self.user!r}"


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "postgres"


def one_line(exc: BaseException) -> str:
    """An exception's text on one line (libpq's messages span several)."""
    return " ".join(str(exc).split())[:300]


def _unreachable(host: str, port: int) -> str | None:
    """Why nothing answers at *host*:*port* (None when a connection opens), by trying it."""
    if host.startswith("/"):
        path = os.path.join(host, f".s.PGSQL.{port}")
        if not os.path.exists(path):
            return f"no server socket {path} (wrong port or directory, or the server is not running)"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(PROBE_TIMEOUT)
            try:
                sock.connect(path)
            except OSError as exc:
                return f"socket {path} refuses connections ({exc.strerror or exc}: the server is not running)"
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"host {host!r} does not resolve ({exc.strerror})"
    last = ""
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(PROBE_TIMEOUT)
            try:
                sock.connect(addr)
                return None
            except ConnectionRefusedError:
                last = f"nothing listens on {host}:{port} (connection refused: wrong port, or the server is not running)"
            except TimeoutError:
                last = f"{host}:{port} does not answer within {PROBE_TIMEOUT:.0f} s (wrong host, or a firewall)"
            except OSError as exc:
                last = f"{host}:{port}: {exc.strerror or exc}"
    return last or f"host {host!r} has no address"


def connect_error(url: str, target: Target, exc: psycopg.OperationalError) -> SdcacheError:
    """The one-line error for a first connection that failed, saying which part of the URL is wrong.

    Decided by asking, never by reading libpq's message (which a server may
    send in any language): can a socket reach each endpoint; if one can,
    do the same credentials open the maintenance database; if they do, does
    the named database exist. The server's own words follow, for detail.
    """
    said = one_line(exc)
    problems = []
    for host, port in target.endpoints:
        why = _unreachable(host, port)
        if why is None:
            break
        problems.append(why)
    else:
        return Unavailable(f"{target.where()}: {'; '.join(problems)}")
    for maintenance in ("postgres", "template1"):
        if maintenance == target.dbname:
            continue
        try:
            with psycopg.connect(url, dbname=maintenance, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target.dbname,)).fetchone()
        except psycopg.Error:
            continue
        if not exists:
            first = target.endpoints[0]
            return NotFound(f"{target.where()}: the server has no database {target.dbname!r} "
                            f"(create it: createdb -h {first[0]} -p {first[1]} -U {target.user} {target.dbname})")
        return PermissionDenied(f"{target.where()}: user {target.user!r} may not connect to database "
                                f"{target.dbname!r} (GRANT CONNECT, or a pg_hba.conf line for it; server: {said})")
    pgconn = exc.pgconn
    if pgconn is not None and pgconn.needs_password:
        why = f"the server wants a password for user {target.user!r} and none was given " \
              "(put it in the URL, $PGPASSWORD or ~/.pgpass)"
    elif pgconn is not None and pgconn.used_password:
        why = f"the server refused the password of user {target.user!r} (a wrong password, or no such user)"
    else:
        why = f"the server refused user {target.user!r} (no pg_hba.conf line for this host, user and database, " \
              "or peer/ident authentication failed)"
    return Unauthenticated(f"{target.where()}: {why} (server: {said})")
