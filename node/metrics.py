"""A cache node's Prometheus metrics, served on its own HTTP port at ``GET /metrics`` (``read`` token).

One source of truth. Counters and gauges that ``GET /stats`` also reports
are not counted twice: :class:`NodeCollector` reads them, when scraped, from
the same counters ``/stats`` reads (:meth:`ChunkPool.stats`, the under-store's
:class:`UnderStoreStats`, the :class:`InflightBudget`), and the heartbeat
that ``sdcache nodes`` and ``sdcache stats`` print takes its ``used`` and
``chunks`` from that same :meth:`ChunkPool.stats`. So ``/stats``, ``/metrics``
and the CLI agree by construction, and two nodes in one process (tests) each
report their own. Only the latency histograms below are module-level objects,
observed where the work happens (off with ``SDCACHE_METRICS=0``); they count
per process, and a production node is one process.

No metric carries a node label: Prometheus adds ``instance``.

========================================================= ===============================================
``sdcache_node_chunk_requests_total{result}``             GET /chunks by result: ``hit`` (good pool copy),
                                                          ``miss`` (not in the pool), ``corrupt`` (the pool
                                                          copy failed its hash and was dropped)
``sdcache_node_chunk_request_seconds{result}``            histogram of the same, from the request reaching
                                                          the chunk logic to its bytes being ready
``sdcache_node_served_bytes_total{source}``               chunk bytes sent: ``pool``, ``understore`` (read
                                                          through), ``peer`` (a miss another node filled)
``sdcache_node_pool_bytes`` / ``_capacity_bytes`` /       the pool now (bytes held include evicted chunks a
``_chunks`` / ``_pinned_bytes``                           same-host reader still maps)
``sdcache_node_pool_evictions_total``                     chunks evicted
``sdcache_node_understore_request_seconds``               histogram of under-store range reads
``sdcache_node_understore_bytes_total``                   bytes read from the under-store
``sdcache_node_understore_errors_total{kind}``            ``stale`` (source changed or vanished), ``error``
``sdcache_node_inflight_bytes``                           chunk bytes held for requests now
``sdcache_node_overloaded_total``                         reads refused with 503 Overloaded
========================================================= ===============================================
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sdcache import metrics

if TYPE_CHECKING:
    from prometheus_client import Metric

    from .service import ChunkService

HIT, MISS, CORRUPT = "hit", "miss", "corrupt"
RESULTS = (HIT, MISS, CORRUPT)

CHUNK_REQUEST_SECONDS = metrics.histogram(
    "sdcache_node_chunk_request_seconds",
    "Seconds from a chunk GET reaching the node's chunk logic to its bytes being ready, by result.",
    ["result"],
)
#: Children bound once: the read path does no label lookup.
CHUNK_REQUEST_SECONDS_BY_RESULT = {r: CHUNK_REQUEST_SECONDS.labels(r) for r in RESULTS}
UNDERSTORE_REQUEST_SECONDS = metrics.histogram(
    "sdcache_node_understore_request_seconds",
    "Seconds per under-store byte-range read (read-through and warm-up), failures included.",
)


class NodeCollector:
    """The counters and gauges of one node, read from its service when scraped."""

    def __init__(self, service: ChunkService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        s = svc.pool.stats()
        u = svc.under.stats
        req = CounterMetricFamily("sdcache_node_chunk_requests", "Chunk GET requests, by result.",
                                  labels=["result"])
        req.add_metric([HIT], s.hits)
        req.add_metric([MISS], s.misses - s.corrupt_reads)
        req.add_metric([CORRUPT], s.corrupt_reads)
        yield req
        served = CounterMetricFamily("sdcache_node_served_bytes", "Chunk bytes served, by where they came from.",
                                     labels=["source"])
        served.add_metric(["pool"], s.served_pool_bytes)
        served.add_metric(["understore"], s.served_understore_bytes)
        served.add_metric(["peer"], s.served_peer_bytes)
        yield served
        yield GaugeMetricFamily("sdcache_node_pool_bytes", "Bytes the pool holds (present, being written, and "
                                "evicted but still mapped by a same-host reader).", value=s.used)
        yield GaugeMetricFamily("sdcache_node_pool_capacity_bytes", "The pool's byte capacity.", value=s.capacity)
        yield GaugeMetricFamily("sdcache_node_pool_chunks", "Chunks in the pool.", value=s.chunks)
        yield GaugeMetricFamily("sdcache_node_pool_pinned_bytes", "Bytes of pinned chunks the pool holds.",
                                value=s.pinned_bytes)
        yield CounterMetricFamily("sdcache_node_pool_evictions", "Chunks evicted from the pool.",
                                  value=s.evictions)
        yield CounterMetricFamily("sdcache_node_understore_bytes", "Bytes read from the under-store.",
                                  value=u.read_bytes)
        err = CounterMetricFamily("sdcache_node_understore_errors", "Failed under-store reads: stale (the source "
                                  "changed or vanished since import) or error (could not be read).", labels=["kind"])
        err.add_metric(["stale"], u.stale)
        err.add_metric(["error"], u.errors)
        yield err
        yield GaugeMetricFamily("sdcache_node_inflight_bytes", "Chunk bytes held for requests now.",
                                value=svc.budget.used)
        yield CounterMetricFamily("sdcache_node_overloaded", "Chunk reads refused with 503 Overloaded "
                                  "(over --max-inflight).", value=svc.budget.refused)
