"""A real PostgreSQL for the tests and the benchmarks, made from the distribution's package.

:class:`PostgresServer` runs ``initdb`` in a fresh temporary directory and
``postgres`` on a Unix socket in that directory and on a free loopback port,
password authentication on both. Nothing of the machine's own PostgreSQL is
touched: no system cluster, no fixed port.

initdb and postgres refuse to run as root; as root (CI) they run as the
``postgres`` account the Debian package creates, else as ``nobody``, in a
directory that account owns (made under ``/tmp``, which every account can
traverse). The fixtures stop it and remove its directory however the tests
end (an interpreter exit too, through :mod:`atexit`).

The database uses an ICU collation (where initdb can make one), as a
production database created under a ``en_US.UTF-8`` locale would: the store
must not depend on the database's default collation.

Fixtures: :func:`postgres_server` (one server per test session) and
:func:`pg_url` (a fresh database per test, dropped after it whether it passed
or not; the server is started again first if a test killed it). A test
module takes them by importing them by name. The ``postgres`` requirement
(``tests/_requirements.py``) decides whether a missing server is a skip or,
where ``SDCACHE_REQUIRE`` lists it (CI), a failure.
"""

from __future__ import annotations

import atexit
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from . import _requirements as requirements

USER = "sdcache"  # the server's superuser, and the user every URL names
START_TIMEOUT = 30.0
PORT_TRIES = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One throwaway PostgreSQL server; :meth:`start` it, :meth:`cleanup` when done."""

    def __init__(self, bindir: str, *, fsync: bool = True) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.password = secrets.token_hex(12)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: dict[str, object] = {}
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    owner = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if owner is None:
                raise RuntimeError("running as root, but there is neither a postgres nor a nobody account "
                                   "to run initdb and postgres as")
            self._as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        self.dir = tempfile.mkdtemp(prefix="sdcache-pg-", dir="/tmp" if owner else None)
        if owner is not None:
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        os.chmod(self.dir, 0o700)
        self.data = os.path.join(self.dir, "data")
        atexit.register(self.cleanup)  # a run that ends without the fixture's finalizer leaves nothing behind
        self.log_path = os.path.join(self.dir, "server.log")
        self._env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": self.dir}
        try:
            self._initdb(owner)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _run_as(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, env=self._env, timeout=120, check=False,
                              cwd=self.dir, **self._as)  # type: ignore[arg-type]

    def _initdb(self, owner: pwd.struct_passwd | None) -> None:
        pwfile = os.path.join(self.dir, "pwfile")
        with open(pwfile, "w") as f:
            f.write(self.password + "\n")
        if owner is not None:
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        os.chmod(pwfile, 0o600)
        base = [os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", USER, f"--pwfile={pwfile}",
                "-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "-N"]
        done = self._run_as([*base, "--locale-provider=icu", "--icu-locale=en-US"])
        if done.returncode != 0:  # a server built without ICU (or before 15): the C collation
            shutil.rmtree(self.data, ignore_errors=True)
            done = self._run_as(base)
        os.unlink(pwfile)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {' '.join(done.stderr.split())[-600:]}")

    # -- lifetime -------------------------------------------------------------

    def start(self) -> PostgresServer:
        """Start the server (again, on the same port, after :meth:`kill`); return once it accepts connections."""
        tries = 1 if self.port else PORT_TRIES
        for _ in range(tries):
            port = self.port or _free_port()
            log = open(self.log_path, "ab")
            try:
                self.proc = subprocess.Popen(
                    [os.path.join(self.bindir, "postgres"), "-D", self.data, "-k", self.dir, "-h", "127.0.0.1",
                     "-p", str(port), "-c", f"fsync={'on' if self.fsync else 'off'}", "-c", "synchronous_commit=on", "-c", "max_connections=200",
                     "-c", "shared_buffers=32MB"],
                    stdout=subprocess.DEVNULL, stderr=log, env=self._env, cwd=self.dir, start_new_session=True,
                    **self._as)  # type: ignore[arg-type]
            finally:
                log.close()
            if self._wait_ready(port):
                self.port = port
                return self
            # Most likely another process took the port between the probe and the bind: another.
        raise RuntimeError(f"postgres did not start: {self.log_tail()}")

    def _wait_ready(self, port: int) -> bool:
        import psycopg

        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                psycopg.connect(self.url("postgres", port=port), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)  # starting up (or recovering after a kill): poll again
        self.kill()
        return False

    def kill(self) -> None:
        """SIGKILL the server and every backend (a crash: nothing is flushed or shut down)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then SIGKILL if it lingers."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
            self.proc = None
        except subprocess.TimeoutExpired:
            self.kill()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 800) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return " | ".join(f.read()[-n:].decode(errors="replace").split("\n"))
        except OSError:
            return ""

    # -- databases --------------------------------------------------------------

    def url(self, dbname: str, *, port: int | None = None, password: str | None = None) -> str:
        """A TCP URL of *dbname* on this server (*password*: another one, for error tests)."""
        return f"postgresql://{USER}:{password or self.password}@127.0.0.1:{port or self.port}/{dbname}"

    def socket_url(self, dbname: str) -> str:
        """The same database over the Unix socket."""
        return f"postgresql://{USER}:{self.password}@/{dbname}?host={self.dir}&port={self.port}"

    def execute(self, sql: str) -> None:
        """One statement as the superuser, outside any transaction (CREATE/DROP DATABASE)."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    @contextmanager
    def database(self, prefix: str = "t") -> Iterator[str]:
        """A fresh database for the block; its URL. Dropped afterwards, connections still open or not."""
        name = f"{prefix}_{secrets.token_hex(6)}"
        self.execute(f'CREATE DATABASE "{name}"')
        try:
            yield self.url(name)
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole test session."""
    requirements.require("postgres")
    bindir = requirements.postgres_bindir()
    assert bindir is not None  # the requirement checked it
    # fsync off: what it guards against is an operating-system crash or power loss, which no test
    # can make. A commit is still written to the WAL (write(2)) before it is acknowledged, so
    # kill -9 of the server loses nothing acknowledged, which the tests check. The benchmark
    # (benchmarks/bench_meta.py) runs with fsync on.
    server = PostgresServer(bindir, fsync=False)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's server."""
    if postgres_server.proc is None or postgres_server.proc.poll() is not None:
        postgres_server.start()  # an earlier test killed it
    with postgres_server.database() as url:
        yield url
