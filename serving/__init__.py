"""Serving: the A1111-compatible ``sdcache serve``, its queue, the ``gateway`` and the runner registry client.

Installed as ``sdcache.serving``. The gateway routes and never imports torch or
``sdcache.kernels``; the routing policy itself is pure core
(:mod:`sdcache.policies` over :mod:`sdcache.routing`), shared with ``sdcache simulate``.
"""
