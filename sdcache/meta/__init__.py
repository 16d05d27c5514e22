"""The metadata service: gRPC adapter (``servicer``), startup (``server``),
wire conversions (``convert``) and the warm-up/evict fan-out to nodes
(``fanout``, ``nodeclient``) over a :class:`sdcache.store.MetaStore`."""
