"""A one-host cluster: the metadata service and N cache nodes as child processes.

Used by ``sdcache up`` (in the foreground until Ctrl-C), ``sdcache demo``,
the tests and the benchmarks. Children report readiness through a ready file
(``HOST:PORT``), so ports can be 0 and nothing waits on a fixed sleep.

Auth stays on: the metadata service writes ``DATA/admin.token`` on its first
start; the cluster uses it to issue one node token (kept in
``DATA/node.token``, 0600) and hands that to its own nodes.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from . import auth, errors, logs
from .tls import Credentials, TlsFiles
from .units import format_size, parse_size

READY_TIMEOUT = 30.0


@dataclass
class Child:
    name: str
    argv: list[str]
    ready_file: str
    log_path: str
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""

    def start(self, env: dict[str, str]) -> None:
        if os.path.exists(self.ready_file):
            os.unlink(self.ready_file)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=log, env=env,
                                     start_new_session=True)
        log.close()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> str:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.ready_file):
                with open(self.ready_file) as f:
                    self.address = f.read().strip()
                if self.address:
                    return self.address
            if self.proc.poll() is not None:
                raise errors.Unavailable(f"{self.name} exited with status {self.proc.returncode}: {self.log_tail()}")
            time.sleep(0.02)
        raise errors.Unavailable(f"{self.name} did not become ready in {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, n: int = 400) -> str:
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()[-n:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip().replace("\n", " | ")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class LocalCluster:
    """Metadata service plus *nodes* cache nodes on this host."""

    data_dir: str
    nodes: int = 2
    capacity: int = 1 << 30
    meta_listen: str = "127.0.0.1:0"
    heartbeat_interval: float = 0.5
    pool_root: str = ""
    env: dict[str, str] = field(default_factory=dict)
    token_key: str | None = None  # --token-key for the metadata service (default DATA/token.key)
    meta_args: list[str] = field(default_factory=list)
    node_args: list[str] = field(default_factory=list)
    meta: Child | None = None
    node_children: list[Child] = field(default_factory=list)
    admin_token: str = ""  # for this cluster's own calls, and for tests and benchmarks

    @property
    def admin_token_file(self) -> str:
        return os.path.join(self.data_dir, "admin.token")

    @property
    def node_token_file(self) -> str:
        return os.path.join(self.data_dir, "node.token")

    @property
    def credentials(self) -> Credentials:
        """Admin credentials for this cluster's own calls.

        TLS files come from ``$SDCACHE_TLS_*`` in the environment the children
        get (ours plus *env*), so a cluster told its CA through *env* can also
        reach its own TLS metadata service.
        """
        return Credentials(self.admin_token or auth.resolve_token(), TlsFiles.resolve(env=self._env()))

    @property
    def meta_addr(self) -> str:
        assert self.meta is not None
        return self.meta.address

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        return env

    def _cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "sdcache", *args]

    def start(self) -> "LocalCluster":
        os.makedirs(self.data_dir, exist_ok=True)
        if not self.pool_root:
            self.pool_root = tempfile.mkdtemp(prefix="sdcache-pool-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        key = ["--token-key", self.token_key] if self.token_key else []
        self.meta = Child(
            "metadata service",
            self._cmd("meta", "--data", self.data_dir, "--listen", self.meta_listen,
                      "--heartbeat-interval", str(self.heartbeat_interval),
                      "--ready-file", os.path.join(self.data_dir, "meta.ready"), *key, *self.meta_args),
            os.path.join(self.data_dir, "meta.ready"),
            os.path.join(self.data_dir, "meta.log"),
        )
        self.meta.start(self._env())
        self.meta.wait_ready()
        if "--insecure-no-auth" not in self.meta_args:
            self._issue_tokens()
        for i in range(self.nodes):
            self.add_node(i)
        for child in self.node_children:
            child.wait_ready()
        self.wait_nodes(self.nodes)
        return self

    def _issue_tokens(self) -> None:
        """The admin token the service wrote, and a node token for our nodes (made once, then reused)."""
        from sdcache.client.metaclient import MetaClient

        if os.path.exists(self.admin_token_file):
            self.admin_token = auth.read_token_file(self.admin_token_file)
        else:  # a data directory whose admin token was moved away: the caller's own token must do
            self.admin_token = auth.resolve_token() or ""
        if os.path.exists(self.node_token_file):
            return
        client = MetaClient(self.meta_addr, credentials=self.credentials)
        try:
            token = client.create_token("node", name=f"local-nodes-{os.getpid()}-{int(time.time())}").token
        finally:
            client.close()
        auth.write_secret(self.node_token_file, (token + "\n").encode())

    def add_node(self, i: int, capacity: int | None = None, role: str = "memory", zone: str = "") -> Child:
        pool = os.path.join(self.pool_root, f"node{i}")
        token = (["--token-file", self.node_token_file] if "--insecure-no-auth" not in self.meta_args
                 else ["--insecure-no-auth"])
        child = Child(
            f"node {i}",
            self._cmd("node", "--meta", self.meta_addr, "--listen", "127.0.0.1:0",
                      "--capacity", str(capacity or self.capacity), "--role", role, "--pool-dir", pool,
                      "--node-id", f"node{i}", "--ready-file", os.path.join(self.data_dir, f"node{i}.ready"),
                      *token, *(["--zone", zone] if zone else []), *self.node_args),
            os.path.join(self.data_dir, f"node{i}.ready"),
            os.path.join(self.data_dir, f"node{i}.log"),
        )
        if i < len(self.node_children):
            self.node_children[i] = child
        else:
            self.node_children.append(child)
        child.start(self._env())
        return child

    def wait_nodes(self, count: int, timeout: float = READY_TIMEOUT) -> None:
        """Block until the metadata service lists *count* live nodes."""
        from sdcache.client.metaclient import MetaClient

        client = MetaClient(self.meta_addr, credentials=self.credentials)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if len(client.nodes(refresh=True)) == count:
                    return
                time.sleep(0.05)
        finally:
            client.close()
        raise errors.Unavailable(f"expected {count} live nodes, the metadata service never listed them")

    def restart_meta(self, sig: int = signal.SIGKILL) -> None:
        assert self.meta is not None
        self.meta.signal(sig)
        assert self.meta.proc is not None
        self.meta.proc.wait()
        self.meta.argv[self.meta.argv.index("--listen") + 1] = self.meta_addr
        self.meta.start(self._env())
        self.meta.wait_ready()

    def stop(self) -> None:
        for child in self.node_children:
            child.stop()
        if self.meta is not None:
            self.meta.stop()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def default_capacity(nodes: int) -> int:
    """Per-node capacity for ``up``: a quarter of free /dev/shm, split, at most 8 GiB each."""
    try:
        st = os.statvfs("/dev/shm")
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = 4 << 30
    return max(64 << 20, min(8 << 30, free // 4 // max(nodes, 1)))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="./sdcache-data", help="metadata directory (default ./sdcache-data)")
    p.add_argument("--listen", default="127.0.0.1:7070", help="metadata service address (default 127.0.0.1:7070)")
    p.add_argument("--nodes", type=int, default=2, help="cache nodes to start (default 2)")
    p.add_argument("--capacity", help="capacity of each node (default: a quarter of free /dev/shm, split)")
    p.add_argument("--pool-root", default="", help="parent of the nodes' pool directories (default under /dev/shm)")
    logs.add_argument(p)  # handed to the metadata service and every node


def main(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        raise errors.InvalidArgument("--nodes must be at least 1")
    capacity = parse_size(args.capacity) if args.capacity else default_capacity(args.nodes)
    pool_root = args.pool_root or os.path.join("/dev/shm", "sdcache-up")
    log_format = ["--log-format", args.log_format] if getattr(args, "log_format", "text") != "text" else []
    cluster = LocalCluster(os.path.abspath(args.data), nodes=args.nodes, capacity=capacity,
                           meta_listen=args.listen, heartbeat_interval=1.0, pool_root=pool_root,
                           meta_args=list(log_format), node_args=list(log_format))
    stop = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
        print(f"sdcache up: metadata service on {cluster.meta_addr} (data in {cluster.data_dir})", flush=True)
        for c in cluster.node_children:
            print(f"  {c.name} on {c.address}, {format_size(capacity)} pool", flush=True)
        print(f"export SDCACHE_META={cluster.meta_addr} SDCACHE_TOKEN_FILE={cluster.admin_token_file}"
              "   # then: sdcache import ..., sdcache ls -l /", flush=True)
        print("Ctrl-C stops the cluster.", flush=True)
        while not stop:
            for c in [cluster.meta, *cluster.node_children]:
                if c is not None and c.proc is not None and c.proc.poll() is not None:
                    raise errors.Unavailable(f"{c.name} exited unexpectedly: {c.log_tail()}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()  # pools stay in /dev/shm: the next `up` starts warm
    print("sdcache up: stopped", flush=True)
    return 0
