"""sdcache: a distributed chunked model cache for Stable Diffusion serving.

The pure core (chunking, manifests, placement, hashing, the safetensors header
reader and the metadata store interface) lives directly in this package and
imports no network or ML framework. Adapters live in ``sdcache.meta`` (gRPC),
``sdcache.node`` (aiohttp chunk server), ``sdcache.client`` (fetcher, fsspec,
FUSE, ``load_safetensors``) and ``sdcache.kernels`` (inference runner).
"""

__version__ = "0.1.0"

DEFAULT_META = "127.0.0.1:7070"
