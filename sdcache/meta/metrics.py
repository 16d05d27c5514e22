"""The metadata service's Prometheus metrics, served by ``sdcache meta --metrics-listen HOST:PORT``.

``GET /metrics`` there needs a ``read`` token, checked by the service's own
verifier (:mod:`sdcache.metrics`).

========================================================= ===============================================
``sdcache_meta_rpc_seconds{method}``                      histogram of every ``sdcache.v1.Meta`` call the
                                                          servicer ran (a Warmup stream: until its end)
``sdcache_meta_rpc_errors_total{method,code}``            calls that ended with a gRPC status other than
                                                          OK (``code`` is its name: ``NOT_FOUND``, ...),
                                                          refusals of the auth interceptor included
``sdcache_meta_live_nodes``                               nodes that heartbeated within 3 intervals
``sdcache_meta_node_heartbeat_age_seconds{node}``         seconds since each registered node's last
                                                          heartbeat (one series per node id: the fleet)
``sdcache_meta_files`` / ``sdcache_meta_logical_bytes``   files in the namespace and their total size
========================================================= ===============================================

The gauges are read from the store when scraped (:class:`MetaCollector`);
``sdcache stats`` reads the same store figures through ``Stats``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily

from .. import metrics

if TYPE_CHECKING:
    from prometheus_client import Metric

    from .servicer import MetaServicer

RPC_SECONDS = metrics.histogram("sdcache_meta_rpc_seconds", "Seconds per metadata RPC, by method.", ["method"])
RPC_ERRORS = metrics.counter("sdcache_meta_rpc_errors_total",
                             "Metadata RPCs that ended with an error status, by method and gRPC status code.",
                             ["method", "code"])
SCRAPE_TIMEOUT = 10.0  # seconds the store reads of one scrape may take


class MetaCollector:
    """Live nodes, heartbeat ages and namespace totals of one service, read from its store when scraped.

    The reads run on the servicer's reader threads (the store keeps one
    connection per thread; a scrape thread of its own would leak one each).
    """

    def __init__(self, servicer: MetaServicer) -> None:
        self.servicer = servicer

    def collect(self) -> Iterator[Metric]:
        sv = self.servicer
        nodes = sv.read_blocking(sv.store.list_nodes, timeout=SCRAPE_TIMEOUT)
        totals = sv.read_blocking(sv.store.stats, timeout=SCRAPE_TIMEOUT)
        now = time.time()
        yield GaugeMetricFamily("sdcache_meta_live_nodes", "Cache nodes that heartbeated within 3 intervals.",
                                value=sum(1 for n in nodes if sv._alive(n, now)))
        age = GaugeMetricFamily("sdcache_meta_node_heartbeat_age_seconds",
                                "Seconds since each registered node's last heartbeat.", labels=["node"])
        for n in nodes:
            age.add_metric([n.node_id], max(0.0, now - n.last_seen))
        yield age
        yield GaugeMetricFamily("sdcache_meta_files", "Files in the namespace.", value=totals.files)
        yield GaugeMetricFamily("sdcache_meta_logical_bytes", "Total size of the files in the namespace.",
                                value=totals.bytes)
