"""Prometheus metrics of ``sdcache serve`` and ``sdcache gateway`` (module-level, ``sdcache_`` prefix).

========================================================= ===============================================
``sdcache_runner_queue_depth``                            requests waiting in a serve process's queue
``sdcache_runner_queue_wait_seconds``                     histogram of time from arrival to start
``sdcache_runner_queue_rejected_total``                   requests refused with 429 (queue full)
``sdcache_runner_queue_abandoned_total{where}``           requests given up (timeout or disconnect)
                                                          ``waiting`` or ``running``
``sdcache_serve_requests_total{route,code}``              API requests by route template and status
``sdcache_serve_request_seconds{route}``                  histogram of API request time
``sdcache_gateway_routed_total{policy,outcome}``          requests the gateway sent: ``ok``, ``retried``
                                                          (a runner failed, another answered), ``failed``
``sdcache_gateway_base_switches_total``                   requests sent to a runner that lacked their base
                                                          model on its device (a predicted base load)
========================================================= ===============================================

No metric carries a runner or model label (unbounded); Prometheus adds ``instance``.
"""

from __future__ import annotations

from sdcache import metrics

WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

QUEUE_DEPTH = metrics.gauge("sdcache_runner_queue_depth", "Requests waiting in the runner's queue.")
QUEUE_WAIT_SECONDS = metrics.histogram(
    "sdcache_runner_queue_wait_seconds", "Seconds a request waited in the runner's queue.", buckets=WAIT_BUCKETS)
QUEUE_REJECTED = metrics.counter("sdcache_runner_queue_rejected_total", "Requests refused because the queue was full.")
QUEUE_ABANDONED = metrics.counter("sdcache_runner_queue_abandoned_total",
                                  "Requests given up by timeout or disconnect, by where they were.", ["where"])
REQUESTS = metrics.counter("sdcache_serve_requests_total", "API requests by route and HTTP status.",
                           ["route", "code"])
REQUEST_SECONDS = metrics.histogram("sdcache_serve_request_seconds", "Seconds per API request, by route.",
                                    ["route"], buckets=WAIT_BUCKETS)
ROUTED = metrics.counter("sdcache_gateway_routed_total", "Requests the gateway sent, by policy and outcome.",
                         ["policy", "outcome"])
BASE_SWITCHES = metrics.counter("sdcache_gateway_base_switches_total",
                                "Requests routed to a runner whose device tier lacked their base model.")
