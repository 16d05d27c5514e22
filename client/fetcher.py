"""Fetching chunks: from a same-host pool, from their nodes, or from the under-store.

For each chunk the fetcher walks its owners first, then the other live nodes in
rendezvous order. The owners are the file's placement
(:func:`sdcache.placement.plan_file` of the manifest, its replica count and the
live node list: computed once per file and node list, no lookup), those in
the reader's zone (``SDCACHE_ZONE``, or ``zone=``) first. A node on this
machine is read straight from its shared-memory pool
(the short-circuit path); others over HTTP(S) with the client's bearer token,
naming the chunk and its file's path, so the node can read through on a miss
from the file's committed manifest. Every chunk is verified
(xxh3-128) before it is handed out: a dead node, or one that returns wrong
bytes, is skipped for the next, and after the nodes the under-store is read
directly. Bytes that do not match at the under-store mean the source changed
since import: :class:`~sdcache.errors.StaleSource`, never another version's
bytes.

Chunks are fetched by a bounded thread pool straight into caller-provided
buffers (``memoryview`` slices), so a whole-file read makes no copies.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import quote, urlencode

import xxhash

from sdcache import errors
from sdcache.chunking import ChunkRef
from sdcache.hostid import host_id
from sdcache.manifest import Manifest
from sdcache.placement import NodeInfo, check_zone, node_set_key, plan_file, rank, read_order
from sdcache.pool_layout import chunk_path

from . import metrics
from ._inflight import settled
from .metaclient import MetaClient
from .underfs import read_range

log = logging.getLogger(__name__)

SUSPECT_SECONDS = 5.0  # a node that failed is tried last for this long
# A node at its in-flight bound answers 503 Overloaded with Retry-After. It is
# not broken: it is tried last only for its Retry-After (at most BUSY_MAX), and
# when every node that answered was busy the fetch sleeps, BUSY_FIRST_SLEEP
# doubling up to BUSY_MAX, for BUSY_ROUNDS rounds before reading the
# under-store (1.55 s in all).
BUSY_MAX = 1.0
BUSY_DEFAULT = 0.1  # when the answer has no (usable) Retry-After
BUSY_FIRST_SLEEP = 0.05
BUSY_ROUNDS = 5
# Parallel chunk fetches per client. Measured on 2 cores: 8 threads beat 16 (GIL
# contention); more cores or longer network paths want more: SDCACHE_FETCH_THREADS.
# (On shaped links, 8 nodes at 20 MB/s each, 32 threads read 2 vCPUs' worth 20% faster
# than 8: benchmarks/bench_fleet.py.)
THREADS_ENV = "SDCACHE_FETCH_THREADS"
DEFAULT_THREADS = min(32, 4 * (os.cpu_count() or 2))
PLANS_KEPT = 256  # file placements cached per fetcher
# A read spread over many nodes keeps this many fetches in flight per node (one leaves each link
# idle between a chunk's last byte and the next request: 8 nodes on 12.5 MB/s links loaded at
# 0.81 of 8 links with 1, 0.92 with 2), on up to MAX_READ_WORKERS threads per read.
PER_NODE = 2
MAX_READ_WORKERS = 64
ZONE_ENV = "SDCACHE_ZONE"  # the reader's zone, like a node's --zone


def retry_after_seconds(value: str | None) -> float:
    """A ``Retry-After`` header (delta seconds or an HTTP date) in seconds, within [0, BUSY_MAX]."""
    if not value:
        return BUSY_DEFAULT
    try:
        secs = float(value)
    except ValueError:
        try:
            secs = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return BUSY_DEFAULT
    if secs != secs:  # NaN
        return BUSY_DEFAULT
    return min(max(secs, 0.0), BUSY_MAX)


class NodeBusy(errors.Overloaded):
    """A node's ``Overloaded`` answer and how long it asked us to stay away (capped)."""

    def __init__(self, message: str = "", retry_after: float = BUSY_DEFAULT) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Lanes:
    """Chunks of one read, queued per node; :meth:`take` hands out the next chunk of the node with
    the fewest fetches in flight (ties: the most left, then the node's name)."""

    def __init__(self, first_nodes: list[str]) -> None:
        self._queues: dict[str, list[int]] = {}
        for k, node in enumerate(first_nodes):
            self._queues.setdefault(node, []).append(k)
        for q in self._queues.values():
            q.reverse()  # pop() from the end takes them in file order
        self._node_of = first_nodes
        self._inflight = dict.fromkeys(self._queues, 0)
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            ready = [n for n, q in self._queues.items() if q]
            if not ready:
                return None
            node = min(ready, key=lambda n: (self._inflight[n], -len(self._queues[n]), n))
            self._inflight[node] += 1
            return self._queues[node].pop()

    def done(self, k: int) -> None:
        with self._lock:
            self._inflight[self._node_of[k]] -= 1


class Fetcher:
    """Parallel, verifying chunk fetcher shared by every open file of a client."""

    def __init__(
        self,
        meta: MetaClient,
        *,
        threads: int | None = None,
        timeout: float = 30.0,
        short_circuit: bool | None = None,
        zone: str | None = None,
    ) -> None:
        self.meta = meta
        #: Replicas in this zone are read first.
        self.zone = check_zone(os.environ.get(ZONE_ENV, "") if zone is None else zone)
        # (path, generation, replicas) -> (the node list it was made from, its key, the plan)
        self._plans: OrderedDict[tuple[str, int, int], tuple[list[NodeInfo], object, dict[str, list[NodeInfo]]]] = (
            OrderedDict())
        self._plans_lock = threading.Lock()
        self.timeout = timeout
        if short_circuit is None:
            short_circuit = os.environ.get("SDCACHE_SHORT_CIRCUIT", "1") != "0"
        self.short_circuit = short_circuit
        self.host = host_id()
        creds = meta.credentials
        self._headers = creds.headers()
        self._ssl = creds.tls.client_context() if creds.tls else None
        if threads is None:
            try:
                threads = max(1, int(os.environ.get(THREADS_ENV) or DEFAULT_THREADS))
            except ValueError:
                raise errors.InvalidArgument(f"${THREADS_ENV} must be a whole number of threads") from None
        self.threads = threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="sdcache-fetch")
        # Workers of whole-range reads (read_into), each draining the chunks of one read node by node.
        self._readers = ThreadPoolExecutor(max(threads, MAX_READ_WORKERS), thread_name_prefix="sdcache-read")
        self._local = threading.local()
        # (node id, address) -> monotonic time until which it is tried last: a node that comes back
        # on another address is a new process, not the one that failed.
        self._suspect: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self.tiers: Counter[str] = Counter()  # chunks served by "local", "node", "under"

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._readers.shutdown(wait=False, cancel_futures=True)

    # -- one chunk -------------------------------------------------------------
    def _nodes(self) -> list[NodeInfo]:
        try:
            return self.meta.nodes()
        except errors.Unavailable:
            return []

    def owners(self, m: Manifest, nodes: list[NodeInfo] | None = None) -> dict[str, list[NodeInfo]]:
        """The owners of each chunk of *m* over the live nodes (cached per file and node set)."""
        nodes = self._nodes() if nodes is None else nodes
        key = (m.path, m.generation, m.replicas)
        with self._plans_lock:
            hit = self._plans.get(key)
            if hit is not None and hit[0] is nodes:
                self._plans.move_to_end(key)
                return hit[2]
            set_key = node_set_key(nodes)
            if hit is not None and hit[1] == set_key:
                plan = hit[2]
            else:
                plan = plan_file(m.chunks, nodes, m.replicas)
            self._plans[key] = (nodes, set_key, plan)
            self._plans.move_to_end(key)
            while len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)
            return plan

    def _order(self, chunk_id: str, m: Manifest | None = None) -> list[NodeInfo]:
        """Nodes to ask for *chunk_id*: its owners (this zone's first), then the rest by rendezvous."""
        nodes = self._nodes()
        owners = read_order(self.owners(m, nodes).get(chunk_id, []), self.zone) if m is not None else []
        mine = {o.node_id for o in owners}
        ranked = owners + [n for n in rank(chunk_id, nodes) if n.node_id not in mine]
        now = time.monotonic()
        with self._lock:
            good = [n for n in ranked if self._suspect.get((n.node_id, n.address), 0) <= now]
            bad = [n for n in ranked if self._suspect.get((n.node_id, n.address), 0) > now]
        return good + bad

    def _mark_suspect(self, node: NodeInfo, why: object, chunk_id: str | None = None) -> None:
        log.warning("node %s (%s) failed, trying the next: %s", node.node_id, node.address, why,
                    extra={"node": node.node_id, "chunk": chunk_id})
        with self._lock:
            self._suspect[(node.node_id, node.address)] = time.monotonic() + SUSPECT_SECONDS

    def _mark_busy(self, node: NodeInfo, retry_after: float) -> None:
        """Try *node* last for *retry_after* seconds (never shortening a longer suspicion)."""
        log.debug("node %s (%s) is busy, trying the next for %.2fs", node.node_id, node.address, retry_after)
        until = time.monotonic() + min(max(retry_after, 0.0), BUSY_MAX)
        with self._lock:
            key = (node.node_id, node.address)
            self._suspect[key] = max(self._suspect.get(key, 0.0), until)

    def fetch_into(self, m: Manifest, index: int, out: memoryview) -> str:
        """Fill *out* (exactly the chunk's length) with chunk *index* of *m*, verified.

        A node answering ``Overloaded`` is passed over for the next at once and
        asked again after its ``Retry-After``; only when every node that answered
        was busy does the fetch back off and retry (see ``BUSY_*``) before the
        under-store. Returns the tier that served it: ``local``, ``node`` or ``under``.
        """
        ref = m.chunks[index]
        if len(out) != ref.length:
            raise ValueError("buffer length does not match the chunk")
        t0 = time.perf_counter()
        tier = self._fetch_into(m, ref, index, out)
        metrics.FETCH_SECONDS_BY_TIER[tier].observe(time.perf_counter() - t0)
        metrics.FETCH_BYTES_BY_TIER[tier].inc(ref.length)
        return tier

    def _fetch_into(self, m: Manifest, ref: ChunkRef, index: int, out: memoryview) -> str:
        sleep = BUSY_FIRST_SLEEP
        for round_ in range(BUSY_ROUNDS + 1):
            busy = False
            for node in self._order(ref.id, m):
                try:
                    if self.short_circuit and node.host_id == self.host and node.pool_dir:
                        if self._read_local(node, ref.id, out):
                            self.tiers["local"] += 1
                            return "local"
                    self._read_http(node, m, index, out)
                except errors.StaleSource:
                    raise
                except errors.Overloaded as exc:  # alive, at its bound: the next node now, this one soon
                    busy = True
                    metrics.RETRIES_BY_REASON["busy"].inc()
                    self._mark_busy(node, exc.retry_after if isinstance(exc, NodeBusy) else BUSY_DEFAULT)
                    continue
                except (OSError, http.client.HTTPException, errors.SdcacheError) as exc:
                    metrics.RETRIES_BY_REASON["corrupt" if isinstance(exc, errors.CorruptChunk) else "failover"].inc()
                    self._mark_suspect(node, exc, ref.id)
                    continue
                if xxhash.xxh3_128_hexdigest(out) == ref.id:
                    self.tiers["node"] += 1
                    return "node"
                metrics.RETRIES_BY_REASON["corrupt"].inc()
                self._mark_suspect(node, f"chunk {ref.id} failed its hash", ref.id)
            if not busy or round_ == BUSY_ROUNDS:
                break
            # Every node that answered is busy: back off (jittered, so the threads of many clients do
            # not come back together) rather than move the load onto the under-store at once.
            time.sleep(random.uniform(sleep / 2, sleep))
            sleep = min(sleep * 2, BUSY_MAX)
        self._read_under(m, index, out)
        self.tiers["under"] += 1
        return "under"

    def fetch(self, m: Manifest, index: int) -> bytearray:
        buf = bytearray(m.chunks[index].length)
        self.fetch_into(m, index, memoryview(buf))
        return buf

    def submit(self, m: Manifest, index: int) -> Future[bytearray]:
        """Fetch chunk *index* of *m* in the background into a new buffer."""
        return self._executor.submit(self.fetch, m, index)

    def submit_into(self, m: Manifest, index: int, out: memoryview) -> Future[str]:
        """Fetch chunk *index* of *m* in the background straight into *out*."""
        return self._executor.submit(self.fetch_into, m, index, out)

    def read_local(self, m: Manifest, index: int, out: memoryview) -> bool:
        """Fill *out* with chunk *index* of *m* from a pool on this host, verified; False if none has it.

        A memory copy and a hash, nothing else: no network, no retry, and no
        wait for the node list (False while the client has none yet). A
        caller with its own thread (the mount's event loop) reads here
        instead of handing every chunk to a worker thread and back, and calls
        :meth:`fetch_into` only when this says False.
        """
        if not self.short_circuit:
            return False
        nodes = self.meta.nodes_now()
        if not nodes:
            return False
        ref = m.chunks[index]
        if len(out) != ref.length:
            raise ValueError("buffer length does not match the chunk")
        t0 = time.perf_counter()
        for node in self._order(ref.id, m):
            if node.host_id != self.host or not node.pool_dir:
                continue
            try:
                if not self._read_local(node, ref.id, out):
                    continue
            except OSError:
                continue  # fetch_into tries it again and says why
            self.tiers["local"] += 1
            metrics.FETCH_SECONDS_BY_TIER["local"].observe(time.perf_counter() - t0)
            metrics.FETCH_BYTES_BY_TIER["local"].inc(ref.length)
            return True
        return False

    def _read_local(self, node: NodeInfo, chunk_id: str, out: memoryview) -> bool:
        """Short-circuit read from a same-host pool; False when the chunk is not there or bad."""
        try:
            fd = os.open(chunk_path(node.pool_dir, chunk_id), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            got = os.preadv(fd, [out], 0)
        finally:
            os.close(fd)
        return got == len(out) and xxhash.xxh3_128_hexdigest(out) == chunk_id

    def _connection(self, address: str) -> http.client.HTTPConnection:
        conns: dict[str, http.client.HTTPConnection] = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(address)
        if conn is None:
            host, _, port = address.rpartition(":")
            if self._ssl is not None:
                conn = http.client.HTTPSConnection(host.strip("[]"), int(port), timeout=self.timeout,
                                                   context=self._ssl)
            else:
                conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self.timeout)
            conns[address] = conn
        return conn

    def _drop_connection(self, address: str) -> None:
        conn = self._local.__dict__.get("conns", {}).pop(address, None)
        if conn is not None:
            conn.close()

    def _read_http(self, node: NodeInfo, m: Manifest, index: int, out: memoryview) -> None:
        ref = m.chunks[index]
        # The path only: the node reads the file's committed manifest to learn
        # where a missing chunk's bytes are. A request never names a source.
        query = urlencode({"path": m.path}, quote_via=quote)
        conn = self._connection(node.address)
        reused = conn.sock is not None
        try:
            try:
                conn.request("GET", f"/chunks/{ref.id}?{query}", headers=self._headers)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                # The node closed this kept-alive connection while it sat idle (its keep-alive timeout):
                # not a failure of the node. Ask again once on a new connection (a GET: safe to repeat).
                self._drop_connection(node.address)
                conn = self._connection(node.address)
                conn.request("GET", f"/chunks/{ref.id}?{query}", headers=self._headers)
                resp = conn.getresponse()
            if resp.status != 200:
                body = resp.read()
                try:
                    doc = json.loads(body)
                    err = errors.from_wire(doc.get("error"), doc.get("message", ""))
                except (ValueError, AttributeError):
                    err = errors.SdcacheError(f"node {node.address} answered HTTP {resp.status}")
                if isinstance(err, errors.Overloaded):
                    err = NodeBusy(err.message, retry_after_seconds(resp.getheader("Retry-After")))
                raise err
            if resp.getheader("Content-Length") != str(ref.length):
                raise errors.CorruptChunk(f"node {node.address} sent a chunk of the wrong length")
            got = 0
            while got < ref.length:
                n = resp.readinto(out[got:])
                if not n:
                    raise http.client.IncompleteRead(b"", ref.length - got)
                got += n
        except BaseException:
            self._drop_connection(node.address)
            raise

    def _read_under(self, m: Manifest, index: int, out: memoryview) -> None:
        ref = m.chunks[index]
        if not m.source:
            raise errors.Unavailable(f"{m.path}: no node holds chunk {ref.id} and the file has no source")
        try:
            data = read_range(m.source, ref.offset, ref.length)
        except FileNotFoundError:
            raise errors.StaleSource(f"{m.path}: source vanished since import: {m.source}") from None
        except OSError as exc:
            raise errors.Unavailable(f"{m.path}: no node answered and the source is unreachable: {exc}") from None
        if len(data) != ref.length or xxhash.xxh3_128_hexdigest(data) != ref.id:
            raise errors.StaleSource(f"{m.path}: source changed since import: {m.source}")
        out[:] = data

    # -- ranges ----------------------------------------------------------------
    def read_into(self, m: Manifest, start: int, out: memoryview) -> int:
        """Fill *out* with bytes [start, start+len(out)) of *m* (clipped at EOF), in parallel.

        Chunks wholly inside the range are fetched straight into *out*; the
        partial chunks at either end go through a temporary buffer. Returns
        or raises (the first chunk's error) only once no fetch writes into
        *out* any more: the caller may free it at once (see ``_inflight``).
        """
        end = min(start + len(out), m.size)
        if end <= start:
            return 0
        jobs: list[tuple[int, int, memoryview]] = []  # (chunk index, skip into the chunk, destination)
        for i in m.chunks_for(start, end):
            ref = m.chunks[i]
            lo, hi = max(start, ref.offset), min(end, ref.offset + ref.length)
            jobs.append((i, lo - ref.offset, out[lo - start : hi - start]))
        if len(jobs) < 3:
            futures: list[Future[object]] = []
            with settled(futures):
                for job in jobs:
                    futures.append(self._executor.submit(self._run_job, m, job))
            return end - start
        # Chunks go out node by node: each free worker takes the next chunk of the node with the
        # fewest fetches in flight, so every node of the file is kept busy (a pool draining one
        # queue in file order leaves some nodes idle while others serve two requests at once).
        first = self._first_nodes(m, [j[0] for j in jobs])
        lanes = _Lanes(first)
        failures: dict[int, BaseException] = {}

        def worker() -> None:
            while (k := lanes.take()) is not None:
                try:
                    self._run_job(m, jobs[k])
                except BaseException as exc:  # noqa: BLE001 - raised below, first in file order
                    failures[k] = exc
                finally:
                    lanes.done(k)

        workers: list[Future[object]] = []
        count = min(len(jobs), max(self.threads, min(PER_NODE * len(set(first)), MAX_READ_WORKERS)))
        with settled(workers):
            for _ in range(count):
                workers.append(self._readers.submit(worker))
        if failures:
            raise failures[min(failures)]
        return end - start

    def _run_job(self, m: Manifest, job: tuple[int, int, memoryview]) -> None:
        i, skip, dst = job
        if skip == 0 and len(dst) == m.chunks[i].length:
            self.fetch_into(m, i, dst)
        else:
            self._fetch_part(m, i, skip, dst)

    def _first_nodes(self, m: Manifest, indices: list[int]) -> list[str]:
        """For each chunk index, the node a fetch asks first (its first owner in read order)."""
        plan = self.owners(m)
        out = []
        for i in indices:
            owners = read_order(plan.get(m.chunks[i].id, []), self.zone)
            out.append(owners[0].node_id if owners else "")
        return out

    def _fetch_part(self, m: Manifest, index: int, skip: int, dst: memoryview) -> None:
        chunk = self.fetch(m, index)
        dst[:] = memoryview(chunk)[skip : skip + len(dst)]

    def cached_fraction(self, m: Manifest) -> float:
        """Fraction of *m*'s chunks held by at least one of their owners (asks each node once)."""
        if not m.chunks:
            return 1.0
        try:
            nodes = self.meta.nodes()
        except errors.Unavailable:
            return 0.0
        if not nodes:
            return 0.0
        plan = self.owners(m, nodes)
        by_node: dict[str, set[str]] = {}
        addr = {n.node_id: n.address for n in nodes}
        for cid, owners in plan.items():
            for o in owners:
                by_node.setdefault(o.node_id, set()).add(cid)
        cached: set[str] = set()
        for node_id, ids in by_node.items():
            try:
                held = set(self._post_json(addr[node_id], "/has", {"ids": sorted(ids)})["present"])
            except (OSError, http.client.HTTPException, ValueError, KeyError, errors.SdcacheError):
                continue
            cached.update(ids & held)
        return sum(1 for ref in m.chunks if ref.id in cached) / len(m.chunks)

    def _post_json(self, address: str, path: str, doc: object) -> dict:
        conn = self._connection(address)
        try:
            body = json.dumps(doc).encode()
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **self._headers})
            resp = conn.getresponse()
            data = json.loads(resp.read())
        except BaseException:
            self._drop_connection(address)
            raise
        if resp.status != 200:
            raise errors.from_wire(data.get("error"), data.get("message", ""))
        return data
