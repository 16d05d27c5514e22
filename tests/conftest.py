"""Shared fixtures: a real one-host cluster (metadata service + nodes as subprocesses)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sdcache import auth
from sdcache.cluster import LocalCluster
from sdcache.pool_layout import chunk_path

from . import _requirements as requirements

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# -- auth: one signing key for every test cluster, one admin token in the environment ----
# Each cluster's metadata service signs with this key (--token-key), so the
# token below is good on all of them, and every client a test makes without
# naming a token (fsspec, MetaClient, the CLI in a subprocess) finds it in
# $SDCACHE_TOKEN, exactly as a user's would. Tests about auth itself clear it.
_AUTH_DIR = tempfile.mkdtemp(prefix="sdcache-test-auth-")
TOKEN_KEY = os.path.join(_AUTH_DIR, "token.key")
_key, _ = auth.load_or_create_key(TOKEN_KEY)
ADMIN_TOKEN = auth.mint(_key, "test-admin", "admin")
os.environ["SDCACHE_TOKEN"] = ADMIN_TOKEN
os.environ.pop("SDCACHE_TOKEN_FILE", None)


def mint_token(role: str, name: str, ttl: float = 0) -> str:
    """A token of *role* for any test cluster (signed with the shared key)."""
    return auth.mint(_key, name, role, ttl=ttl)


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 30.0, step: float = 0.01) -> Any:
    """What *cond* returns once it is true (checked every *step* seconds); fails naming *what* after *timeout*."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto in server mode) on a free port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server._server.server_address[:2]  # type: ignore[union-attr]
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _make_cluster(tmp: str, nodes: int, capacity: int, env: dict[str, str] | None = None,
                  heartbeat: float = 0.3) -> LocalCluster:
    pool_root = tempfile.mkdtemp(prefix="sdcache-test-pool-", dir="/dev/shm")
    return LocalCluster(os.path.join(tmp, "meta"), nodes=nodes, capacity=capacity, heartbeat_interval=heartbeat,
                        pool_root=pool_root, env=env or {}, token_key=TOKEN_KEY)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> Iterator[LocalCluster]:
    """A session-wide cluster of three 1 GiB nodes (S3 endpoint set for read-through)."""
    c = _make_cluster(str(tmp_path_factory.mktemp("cluster")), 3, 1 << 30,
                      env={**AWS_ENV, "AWS_ENDPOINT_URL": s3_server})
    with c:
        yield c
    shutil.rmtree(c.pool_root, ignore_errors=True)


@pytest.fixture
def make_cluster(tmp_path: object) -> Iterator[object]:
    """Factory for private clusters with a chosen node count, capacity and heartbeat (seconds)."""
    made: list[LocalCluster] = []

    def make(nodes: int = 2, capacity: int = 1 << 30, heartbeat: float = 0.3) -> LocalCluster:
        c = _make_cluster(os.path.join(str(tmp_path), f"c{len(made)}"), nodes, capacity, heartbeat=heartbeat)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.stop()
        shutil.rmtree(c.pool_root, ignore_errors=True)


@pytest.fixture
def own_cluster(tmp_path: object) -> Iterator[LocalCluster]:
    """A private three-node cluster for tests that kill or corrupt things."""
    c = _make_cluster(str(tmp_path), 3, 1 << 30)
    with c:
        yield c
    shutil.rmtree(c.pool_root, ignore_errors=True)


def corrupt_everywhere(cluster: LocalCluster, chunk_id: str) -> int:
    """Flip the first byte of *chunk_id* in every node pool of *cluster* that holds it; how many copies."""
    flipped = 0
    for i in range(len(cluster.node_children)):
        p = chunk_path(os.path.join(cluster.pool_root, f"node{i}"), chunk_id)
        if os.path.exists(p):
            with open(p, "r+b") as f:
                b = f.read(1)
                f.seek(0)
                f.write(bytes([b[0] ^ 0xFF]))
            flipped += 1
    return flipped


def run_cli(*args: str, meta: str | None = None, input: bytes | None = None,
            check: bool = False, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``sdcache`` command line in a subprocess (*env*: changes; None removes a variable)."""
    argv = [sys.executable, "-m", "sdcache", *args]
    if meta:
        argv[3:3] = ["--meta", meta]
    child_env = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            child_env.pop(k, None)
        else:
            child_env[k] = v
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=child_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"sdcache {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


# -- requirements: skip, or fail where this machine must have them (tests/_requirements.py) ----
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(*names): needs these (tests/_requirements.py); skips, or fails "
                            "where SDCACHE_REQUIRE lists them")
    problems = requirements.misnamed()
    if problems:
        raise pytest.UsageError(f"{requirements.ENV}={os.environ.get(requirements.ENV, '')!r}: " + "; ".join(problems))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    names = [name for mark in item.iter_markers("requires") for name in mark.args]
    names[:0] = [name for marker, name in (("gpu", "cuda"), ("fuse", "fuse")) if item.get_closest_marker(marker)]
    for name in dict.fromkeys(names):
        reason = requirements.skip_reason(name)
        if reason:
            # A skip mark, not pytest.skip(): the short summary then names each test skipped.
            item.add_marker(pytest.mark.skip(reason=reason))
            return


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = len(terminalreporter.stats.get("skipped", []))
    where = ", reasons in the short test summary" if skipped else ""
    terminalreporter.write_line(f"requirements: {', '.join(sorted(requirements.required())) or 'none'} required "
                                f"here ({requirements.ENV}); {skipped} test(s) skipped{where}")
