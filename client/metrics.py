"""Client-side Prometheus metrics: every process that reads through the fetcher, and the FUSE mount.

Module-level objects, counted per process (a runner, a notebook, the mount
daemon). The mount serves them with ``sdcache mount --metrics-listen
HOST:PORT``; other processes can expose :mod:`prometheus_client`'s default
registry however they serve.

========================================================= ===============================================
``sdcache_client_fetch_seconds{tier}``                    histogram per chunk, from the first try to
                                                          verified bytes, by the tier that served it:
                                                          ``local`` (same-host pool), ``node`` (HTTP),
                                                          ``under`` (the under-store, directly)
``sdcache_client_fetch_bytes_total{tier}``                chunk bytes fetched, by the same tiers
``sdcache_client_fetch_retries_total{reason}``            a node passed over for the next: ``failover``
                                                          (it failed or was unreachable), ``busy`` (503
                                                          Overloaded), ``corrupt`` (bytes failed the hash)
``sdcache_fuse_operations_total{op}``                     FUSE requests handled, by operation
``sdcache_fuse_read_size_bytes``                          histogram of FUSE read request sizes
``sdcache_fuse_page_cache_pushed_bytes_total``            file bytes the mount wrote into the kernel page
                                                          cache ahead of readers (``notify_store``)
``sdcache_fuse_page_cache_pushed_open_bytes``             of those, the bytes of files still open: what
                                                          counts against the limit
``sdcache_fuse_page_cache_push_limit_bytes``              that limit (``sdcache mount --push-memory``)
========================================================= ===============================================
"""

from __future__ import annotations

from sdcache import metrics

TIERS = ("local", "node", "under")
REASONS = ("failover", "busy", "corrupt")

FETCH_SECONDS = metrics.histogram(
    "sdcache_client_fetch_seconds", "Seconds to fetch one verified chunk, by the tier that served it.", ["tier"])
FETCH_BYTES = metrics.counter(
    "sdcache_client_fetch_bytes_total", "Chunk bytes fetched, by the tier that served them.", ["tier"])
FETCH_RETRIES = metrics.counter(
    "sdcache_client_fetch_retries_total", "Nodes passed over for the next one while fetching a chunk, by reason.",
    ["reason"])
#: Children bound once: the read path does no label lookup.
FETCH_SECONDS_BY_TIER = {t: FETCH_SECONDS.labels(t) for t in TIERS}
FETCH_BYTES_BY_TIER = {t: FETCH_BYTES.labels(t) for t in TIERS}
RETRIES_BY_REASON = {r: FETCH_RETRIES.labels(r) for r in REASONS}

FUSE_OPERATIONS = metrics.counter(
    "sdcache_fuse_operations_total", "FUSE requests handled by the mount, by operation.", ["op"])
#: 4 KiB to 16 MiB, by powers of two.
READ_SIZE_BUCKETS = tuple(float(4096 << i) for i in range(13))
FUSE_READ_SIZE = metrics.histogram(
    "sdcache_fuse_read_size_bytes", "Sizes of the FUSE read requests the mount answered.",
    buckets=READ_SIZE_BUCKETS)

PUSHED_BYTES = metrics.counter(
    "sdcache_fuse_page_cache_pushed_bytes", "File bytes the mount wrote into the kernel page cache ahead of readers.")
PUSH_HELD = metrics.gauge(
    "sdcache_fuse_page_cache_pushed_open_bytes",
    "Bytes pushed into the kernel page cache for files still open (counted against the push limit).")
PUSH_LIMIT = metrics.gauge(
    "sdcache_fuse_page_cache_push_limit_bytes", "Bound on the bytes pushed for files still open.")
