"""A multi-host test bed on one machine: hosts in network namespaces, joined by shaped links.

Used by the fleet tests (``tests/test_fleet.py``) and by ``benchmarks/bench_fleet.py``: one
implementation. Needs root, ``ip netns`` and ``tc`` (requirement ``netns`` in
``tests/_requirements.py``).

Shape of it::

    namespace <bed>-sw:   bridge br0, one port per host (the "switch")
    namespace <bed>-<h>:  eth0 10.77.0.N/24 <-veth-> port sN on br0; lo

Why one namespace per host, not distinct loopback addresses in one namespace: a host's link
is then a device of its own, so ``tc`` shapes it as a NIC (``tbf`` for the rate, ``netem`` for
the latency), in both directions (the host's ``eth0`` is its uplink, the switch port ``sN`` its
downlink), and every flow between two hosts crosses the sender's uplink and the receiver's
downlink, as between machines. Shaping per address on one ``lo`` needs classful qdiscs and
filters per pair and still has one queue for everything. Each host also gets its own ports,
routes and loopback, so nothing can reach a process by accident through ``127.0.0.1``.

The bridge lives in a private namespace of its own, and no namespace has a default route:
traffic can only go to addresses of the bed's own namespaces, never to the machine's networks,
and deleting the namespaces removes every device. :meth:`TestBed.close` (also run at
interpreter exit, and for beds a killed run left behind) kills the processes the bed started
and deletes its namespaces.

Each host's processes get ``SDCACHE_HOST_ID`` of their own (see ``sdcache/hostid.py``), so
"hosts" on this one machine never read each other's ``/dev/shm`` pools directly; they share the
filesystem, which is how a node that is killed and restarted finds its pool again.

Link model: a host's rate is ``rate`` bytes/s each way (``None``: unshaped), and each direction
of its link adds ``delay`` seconds, so host to host is ``2 x delay`` one way (``4 x delay``
round trip). The delay needs the kernel's ``sch_netem``; a kernel without it (this project's
2-vCPU VM has tbf and htb but no netem) gets links with the rate and the veth's own latency
(tens of microseconds) plus the tbf queue's (up to 200 ms when full): :func:`netem_available`.

:class:`Nas` is the under-store: a threaded HTTP server with ``Range`` support on its own
host, counting what it serves (``counters()``, read from a file it rewrites, since the test
process itself stays outside the bed). :class:`Fleet` puts sdcache on a bed: the metadata
service, nodes with zones, clients that run the CLI or a Python snippet on their host.
"""

from __future__ import annotations

import argparse
import atexit
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "sdctb"  # every bed's namespaces start with this, then the creating pid
SUBNET = "10.77.0"
SWITCH_ADDR_START = 10  # hosts get .10, .11, ...
_PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy",
               "NO_PROXY")
_live_beds: list[TestBed] = []


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", *args], capture_output=True, text=True, check=check, timeout=30)


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete the namespaces (and /dev/shm pools) of beds whose creating process is gone (a killed run)."""
    removed = []
    for ns in _namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)[a-z]-.*", ns)
        if m and not _pid_alive(int(m.group(1))):
            _kill_in(ns)
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    try:
        shm = os.listdir("/dev/shm")
    except OSError:
        shm = []
    for name in shm:
        m = re.fullmatch(rf"{PREFIX}(\d+)[a-z]-pools-.*", name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join("/dev/shm", name), ignore_errors=True)
            removed.append(name)
    return removed


def _kill_in(ns: str) -> None:
    """SIGKILL every process still in namespace *ns* (ours; nothing else ever enters it)."""
    out = _ip("netns", "pids", ns, check=False).stdout
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


_netem: bool | None = None


def netem_available() -> bool:
    """Whether this kernel has ``sch_netem`` (some VM kernels ship tbf but not netem)."""
    global _netem
    if _netem is None:
        ns = f"{PREFIX}{os.getpid()}z-netem"
        try:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
            _netem = _tc("-n", ns, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms",
                         check=False).returncode == 0
        finally:
            _ip("netns", "del", ns, check=False)
    return _netem


def tc_shape(ns: str, dev: str, rate: float | None, delay: float) -> None:
    """Shape egress of *dev* in *ns*: *delay* seconds (netem, where the kernel has it), then *rate*
    bytes/s (tbf), or unshaped."""
    _tc("-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
    parent = ["root"]
    if delay > 0 and netem_available():
        _tc("-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay",
            f"{delay * 1e6:.0f}us", "limit", "100000")
        parent = ["parent", "1:"]
    if rate is not None:
        bits = int(rate * 8)
        burst = max(int(rate / 250), 128 * 1024)  # a 4 ms refill at least, and whole GSO segments
        _tc("-n", ns, "qdisc", "add", "dev", dev, *parent, "handle", "2:", "tbf", "rate", f"{bits}bit",
            "burst", str(burst), "latency", "200ms")


@dataclass
class Host:
    """One "machine" of the bed: a network namespace with one shaped link to the switch."""

    bed: TestBed
    name: str
    ns: str
    ip: str
    port: str  # its switch port, in the switch namespace
    rate: float | None
    delay: float
    zone: str = ""  # for clients: the SDCACHE_ZONE their reads prefer
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def host_id(self) -> str:
        return f"{self.bed.prefix}/{self.name}"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of this host's processes: ours, without proxies, with its own host id."""
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
        env["SDCACHE_HOST_ID"] = self.host_id
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        env.update(extra or {})
        return env

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def popen(self, argv: Sequence[str], *, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[bytes]:
        """Start *argv* on this host (its own session, so it can be killed alone)."""
        proc = subprocess.Popen(self.argv(argv), env=self.env(env), start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 300,
            check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(argv), env=self.env(env), capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv[:4])} on {self.name} failed ({proc.returncode}): "
                                 f"{proc.stderr.strip()[-2000:]}")
        return proc

    def python(self, code: str, *, env: dict[str, str] | None = None, timeout: float = 300) -> Any:
        """Run a Python snippet on this host; it prints one JSON document last, which is returned."""
        out = self.run([sys.executable, "-c", code], env=env, timeout=timeout).stdout
        return json.loads(out.strip().splitlines()[-1])

    def agent(self, env: dict[str, str] | None = None) -> Agent:
        """A Python process on this host that runs snippets sent to it (no start-up cost per call)."""
        proc = self.popen([sys.executable, "-u", os.path.abspath(__file__), "agent"], env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return Agent(self, proc)

    def shape(self, rate: float | None, delay: float | None = None) -> None:
        """Change this host's link: *rate* bytes/s each way (None: unshaped), *delay* seconds each way."""
        self.rate = rate
        self.delay = self.delay if delay is None else delay
        tc_shape(self.ns, "eth0", rate, self.delay)
        tc_shape(self.bed.switch, self.port, rate, self.delay)

    def link(self, up: bool) -> None:
        """Plug or unplug this host's cable (packets are then dropped, as for a host that vanished)."""
        _ip("-n", self.bed.switch, "link", "set", self.port, "up" if up else "down")

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        _kill_in(self.ns)


class Agent:
    """A long-lived Python process on a host: :meth:`call` runs a snippet there and returns its ``result``.

    Snippets share one namespace of globals, so imports and clients made by one are there for the
    next. An exception there is raised here as :class:`AssertionError` with its traceback.
    """

    def __init__(self, host: Host, proc: subprocess.Popen[bytes]) -> None:
        self.host = host
        self.proc = proc
        self._lock = threading.Lock()

    def call(self, code: str, timeout: float = 600, **values: Any) -> Any:
        """Run *code* with *values* bound as globals; returns what it assigned to ``result``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(json.dumps({"code": code, "values": values}).encode() + b"\n")
            self.proc.stdin.flush()
            box: list[bytes] = []
            reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(timeout)
            if not box or not box[0]:
                raise AssertionError(f"the agent on {self.host.name} did not answer within {timeout:.0f}s")
        reply = json.loads(box[0])
        if "error" in reply:
            raise AssertionError(f"on {self.host.name}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _agent() -> int:
    """The agent's side: one JSON request a line on stdin, one JSON reply a line on stdout."""
    import traceback

    scope: dict[str, Any] = {"__name__": "__agent__"}
    out = sys.stdout
    sys.stdout = sys.stderr  # what snippets print must not break the protocol
    for line in sys.stdin:
        req = json.loads(line)
        scope.update(req.get("values") or {})
        scope.pop("result", None)
        try:
            exec(compile(req["code"], "<agent>", "exec"), scope)
            reply = {"result": scope.get("result")}
        except BaseException:  # noqa: BLE001 - sent back whole
            reply = {"error": traceback.format_exc()[-4000:]}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


class TestBed:
    """Network namespaces as hosts on one switch (see the module docstring). Use as a context manager."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        sweep_stale()
        n = sum(1 for b in _live_beds if b.prefix.startswith(f"{PREFIX}{os.getpid()}"))
        self.prefix = f"{PREFIX}{os.getpid()}{chr(ord('a') + n)}"
        self.switch = f"{self.prefix}-sw"
        self.hosts: dict[str, Host] = {}
        self._closed = False
        _live_beds.append(self)
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def add_host(self, name: str, *, rate: float | None = None, delay: float = 0.0005) -> Host:
        """A new host on the switch with a link of *rate* bytes/s each way and *delay* seconds each way."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", name) or name in self.hosts:
            raise ValueError(f"host name {name!r}: 1-8 of a-z0-9, new")
        i = len(self.hosts)
        ns, port = f"{self.prefix}-{name}", f"s{i}"
        ip = f"{SUBNET}.{SWITCH_ADDR_START + i}"
        _ip("netns", "add", ns)
        host = Host(self, name, ns, ip, port, rate, delay)
        self.hosts[name] = host
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        host.shape(rate, delay)
        return host

    def close(self) -> None:
        """Kill every process the bed started and delete its namespaces (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts.values():
            host.kill_all()
        for ns in [h.ns for h in self.hosts.values()] + [self.switch]:
            _kill_in(ns)
            _ip("netns", "del", ns, check=False)
        if self in _live_beds:
            _live_beds.remove(self)

    def __enter__(self) -> TestBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    for bed in list(_live_beds):
        bed.close()


def probe() -> str | None:
    """Why a bed cannot be made here (None when it can): root, ``ip netns``, a veth and tbf.

    netem (latency) is used where the kernel has it and is not required: without it a link has
    the bandwidth of its tbf and the latency of a veth plus its queue."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"{tool} is missing (apt-get install iproute2)"
    ns = f"{PREFIX}{os.getpid()}z-probe"
    try:
        steps = [["ip", "netns", "add", ns],
                 ["ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
                 ["tc", "-n", ns, "qdisc", "add", "dev", "p0", "root", "handle", "2:", "tbf", "rate",
                  "100mbit", "burst", "131072", "latency", "200ms"]]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=30)
            if proc.returncode != 0:
                return f"`{' '.join(step[:6])}` failed: {proc.stderr.strip()[:200]}"
        return None
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run ip/tc: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


# --------------------------------------------------------------------------- the NAS


class _NasHandler(http.server.BaseHTTPRequestHandler):
    """GET (with one ``Range``) and HEAD of files under the server's root; counts what it serves."""

    protocol_version = "HTTP/1.1"
    server: _NasServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _file(self) -> tuple[str, os.stat_result] | None:
        rel = self.path.split("?", 1)[0].lstrip("/")
        full = os.path.realpath(os.path.join(self.server.root, rel))
        if not full.startswith(self.server.root + os.sep) or not os.path.isfile(full):
            self.send_error(404)
            return None
        return full, os.stat(full)

    def _headers(self, st: os.stat_result, length: int, status: int = 200, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{st.st_mtime_ns:x}-{st.st_size:x}"')
        self.send_header("Last-Modified", self.date_time_string(int(st.st_mtime)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def do_HEAD(self) -> None:
        self.server.count(requests=1)
        found = self._file()
        if found:
            self.server.count(head=1)
            self._headers(found[1], found[1].st_size)

    def do_GET(self) -> None:
        self.server.count(requests=1)
        found = self._file()
        if not found:
            return
        path, st = found
        start, end = 0, st.st_size
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "") or "")
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(st.st_size, int(m.group(2)) + 1) if m.group(2) else st.st_size
            else:
                start = max(0, st.st_size - int(m.group(2)))
            self._headers(st, end - start, 206, {"Content-Range": f"bytes {start}-{end - 1}/{st.st_size}"})
        else:
            self._headers(st, st.st_size)
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start
            while left:
                block = f.read(min(left, 1 << 20))
                if not block:
                    break
                self.wfile.write(block)
                left -= len(block)
        self.server.count(reads=1, read_bytes=end - start - left)


class _NasServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], root: str, counters: str) -> None:
        super().__init__(addr, _NasHandler)
        self.root = os.path.realpath(root)
        self.counters_path = counters
        self.counters = {"requests": 0, "reads": 0, "read_bytes": 0, "head": 0}
        self._lock = threading.Lock()
        self._write()

    def count(self, **inc: int) -> None:
        with self._lock:
            for k, v in inc.items():
                self.counters[k] += v
            self._write()

    def _write(self) -> None:
        tmp = f"{self.counters_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.counters, f)
        os.replace(tmp, self.counters_path)


@dataclass
class Nas:
    """The under-store: an HTTP server on its own host serving the files under *root*."""

    host: Host
    root: str
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def counters_path(self) -> str:
        return os.path.join(self.root, ".nas-counters.json")

    def start(self) -> Nas:
        ready = os.path.join(self.root, ".nas-ready")
        if os.path.exists(ready):
            os.unlink(ready)
        self.proc = self.host.popen([sys.executable, os.path.abspath(__file__), "nas", "--root", self.root,
                                     "--listen", self.host.ip, "--ready-file", ready],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the NAS server on {self.host.name} did not start")
            time.sleep(0.02)
        with open(ready) as f:
            self.port = int(f.read())
        return self

    def url(self, rel: str) -> str:
        return f"http://{self.host.ip}:{self.port}/{rel.lstrip('/')}"

    def counters(self) -> dict[str, int]:
        with open(self.counters_path) as f:
            return json.load(f)


# --------------------------------------------------------------------------- sdcache on a bed


@dataclass
class FleetNode:
    host: Host
    node_id: str
    zone: str
    capacity: int
    pool_dir: str
    log_path: str
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)
            self.proc.wait(30)


class Fleet:
    """sdcache on a :class:`TestBed`: a metadata service host, a NAS host, node hosts, client hosts.

    Every link but the metadata service's is shaped: nodes at *node_rate*, the NAS at *nas_rate*,
    clients at *client_rate* (None: unshaped, so a client can take in many node links at once).
    """

    def __init__(self, bed: TestBed, workdir: str, *, node_rate: float | None, nas_rate: float | None,
                 client_rate: float | None = None, delay: float = 0.0005, heartbeat: float = 0.3,
                 replicas: int = 1, node_args: Sequence[str] = ()) -> None:
        from sdcache import auth

        self.bed = bed
        self.workdir = workdir
        self.node_rate, self.nas_rate, self.client_rate, self.delay = node_rate, nas_rate, client_rate, delay
        self.heartbeat = heartbeat
        self.replicas = replicas
        self.node_args = list(node_args)
        self.nodes: dict[str, FleetNode] = {}
        self.clients: dict[str, Host] = {}
        self.agents: dict[str, Agent] = {}
        os.makedirs(workdir, exist_ok=True)
        self.data = os.path.join(workdir, "meta")
        os.makedirs(self.data, exist_ok=True)
        self.token_key = os.path.join(workdir, "token.key")
        key, _ = auth.load_or_create_key(self.token_key)
        self.admin_token = auth.mint(key, "fleet-admin", "admin")
        self.node_token = auth.mint(key, "fleet-nodes", "node")
        self.pool_root = tempfile.mkdtemp(prefix=f"{bed.prefix}-pools-", dir="/dev/shm")
        self.nas = Nas(bed.add_host("nas", rate=nas_rate, delay=delay), os.path.join(workdir, "nas"))
        os.makedirs(self.nas.root, exist_ok=True)
        self.meta_host = bed.add_host("meta", rate=None, delay=delay)
        self.meta_addr = ""
        self.meta_proc: subprocess.Popen[bytes] | None = None

    # -- processes -------------------------------------------------------------------
    def _wait_ready(self, proc: subprocess.Popen[bytes], ready: str, log: str, what: str) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if os.path.exists(ready):
                with open(ready) as f:
                    addr = f.read().strip()
                if addr:
                    return addr
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        with open(log, "rb") as f:
            tail = f.read()[-1500:].decode(errors="replace")
        raise RuntimeError(f"{what} did not start: {tail}")

    def start(self) -> Fleet:
        self.nas.start()
        ready, log = os.path.join(self.data, "meta.ready"), os.path.join(self.workdir, "meta.log")
        if os.path.exists(ready):
            os.unlink(ready)
        with open(log, "ab") as logf:
            self.meta_proc = self.meta_host.popen(
                [sys.executable, "-m", "sdcache", "meta", "--data", self.data, "--listen", f"{self.meta_host.ip}:0",
                 "--heartbeat-interval", str(self.heartbeat), "--token-key", self.token_key, "--ready-file", ready,
                 "--replicas", str(self.replicas)], stdout=subprocess.DEVNULL, stderr=logf)
        self.meta_addr = self._wait_ready(self.meta_proc, ready, log, "metadata service")
        return self

    def add_node(self, name: str, zone: str, capacity: int = 1 << 30) -> FleetNode:
        return self.add_nodes([(name, zone)], capacity)[0]

    def add_nodes(self, specs: Sequence[tuple[str, str]], capacity: int = 1 << 30) -> list[FleetNode]:
        """Start nodes ``(name, zone)``, each on a host of its own, all at once."""
        made = []
        for name, zone in specs:
            host = self.bed.add_host(name, rate=self.node_rate, delay=self.delay)
            node = FleetNode(host, name, zone, capacity, os.path.join(self.pool_root, name),
                             os.path.join(self.workdir, f"{name}.log"))
            self.nodes[name] = node
            made.append(node)
        self.start_nodes(made)
        return made

    def start_node(self, node: FleetNode) -> None:
        self.start_nodes([node])

    def start_nodes(self, nodes: Sequence[FleetNode]) -> None:
        """(Re)start *nodes* on their hosts and pool directories; returns once each listens."""
        readies = []
        for node in nodes:
            ready = os.path.join(self.workdir, f"{node.node_id}.ready")
            if os.path.exists(ready):
                os.unlink(ready)
            with open(node.log_path, "ab") as logf:
                node.proc = node.host.popen(
                    [sys.executable, "-m", "sdcache", "node", "--meta", self.meta_addr, "--listen",
                     f"{node.host.ip}:0", "--capacity", str(node.capacity), "--pool-dir", node.pool_dir,
                     "--node-id", node.node_id, "--zone", node.zone, "--ready-file", ready, *self.node_args],
                    env={"SDCACHE_TOKEN": self.node_token}, stdout=subprocess.DEVNULL, stderr=logf)
            readies.append(ready)
        for node, ready in zip(nodes, readies):
            assert node.proc is not None
            node.address = self._wait_ready(node.proc, ready, node.log_path, f"node {node.node_id}")

    def client(self, name: str, zone: str = "") -> Host:
        """A client host (in *zone*: its reads prefer that zone's replicas), with an :class:`Agent` on it."""
        host = self.clients.get(name)
        if host is None:
            host = self.clients[name] = self.bed.add_host(name, rate=self.client_rate, delay=self.delay)
            host.zone = zone
            self.agents[name] = host.agent(self.client_env(host))
            self.agents[name].call(_CLIENT_PRELUDE)
        return host

    def call(self, host: Host, code: str, timeout: float = 600, **values: Any) -> Any:
        """Run *code* in the client agent on *host* (see :data:`_CLIENT_PRELUDE` for what it has)."""
        return self.agents[host.name].call(code, timeout, **values)

    def client_env(self, host: Host) -> dict[str, str]:
        return {"SDCACHE_META": self.meta_addr, "SDCACHE_TOKEN": self.admin_token, "SDCACHE_SHORT_CIRCUIT": "0",
                "SDCACHE_ZONE": host.zone}

    def sdcache(self, host: Host, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """The ``sdcache`` command line on *host*, against this fleet."""
        return host.run([sys.executable, "-m", "sdcache", *args], env=self.client_env(host), timeout=timeout)

    def python(self, host: Host, code: str, timeout: float = 600) -> Any:
        return host.python(code, env=self.client_env(host), timeout=timeout)

    def live_nodes(self, host: Host) -> set[str]:
        return set(self.call(host, "result = sorted(n.node_id for n in meta.nodes(refresh=True))"))

    def wait_live(self, host: Host, names: set[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            live = self.live_nodes(host)
            if live == names:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"live nodes {sorted(live)}, wanted {sorted(names)}")
            time.sleep(self.heartbeat)

    def node_stats(self, host: Host) -> dict[str, dict[str, Any]]:
        """``GET /stats`` of every live node, asked from *host* (node id -> stats)."""
        return self.call(host, "result = node_stats()")

    def close(self) -> None:
        for agent in self.agents.values():
            agent.close()
        self.bed.close()
        shutil.rmtree(self.pool_root, ignore_errors=True)



#: What a client agent starts with: a metadata client, and helpers the tests and benchmarks share.
_CLIENT_PRELUDE = """
import hashlib, json, os, time, urllib.error, urllib.request
import fsspec
from sdcache.client.metaclient import MetaClient
from sdcache.client.importer import import_file
meta = MetaClient()

def node_stats():
    out = {}
    for n in meta.nodes(refresh=True):
        req = urllib.request.Request(f"http://{n.address}/stats",
                                     headers={"Authorization": "Bearer " + os.environ["SDCACHE_TOKEN"]})
        for attempt in range(50):  # a node registers a moment before it holds the token keys (503)
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    out[n.node_id] = json.load(resp)
                break
            except urllib.error.HTTPError as exc:
                if exc.code != 503 or attempt == 49:
                    raise
                time.sleep(0.1)
    return out

def warm(paths, check=False):
    last = None
    for p in meta.warmup(list(paths), check=check):
        last = p
    return {"total_bytes": last.total_bytes, "cached_bytes": last.done_bytes, "message": last.message}

def read_sha256(path, fresh=True):
    fs = fsspec.filesystem("sdcache", skip_instance_cache=True)
    if fresh:  # the node list as of now, not the one cached up to NODE_LIST_TTL ago
        fs.meta.nodes(refresh=True)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    with fs.open(path, "rb") as f:
        while True:
            b = f.read(8 << 20)
            if not b:
                break
            h.update(b)
    return {"sha256": h.hexdigest(), "seconds": time.perf_counter() - t0, "tiers": dict(fs.fetcher.tiers),
            "short_circuit": fs.fetcher.short_circuit, "zone": fs.fetcher.zone}
"""


# --------------------------------------------------------------------------- entry point (on a host)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="test bed helpers, run inside a bed host")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("agent", help="run snippets sent on stdin (Host.agent)")
    nas = sub.add_parser("nas", help="serve files over HTTP with Range, counting reads")
    nas.add_argument("--root", required=True)
    nas.add_argument("--listen", required=True)
    nas.add_argument("--ready-file", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "agent":
        return _agent()
    server = _NasServer((args.listen, 0), args.root, os.path.join(args.root, ".nas-counters.json"))
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(tmp, args.ready_file)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
