"""sdcache.client: fetcher, fsspec filesystem, FUSE mount and ``load_safetensors``.

``import sdcache.client`` stays light: torch is imported only by
:func:`load_safetensors`, pyfuse3 only by the mount.
"""

from ._loader import load_safetensors
from .fetcher import Fetcher
from .metaclient import MetaClient

__all__ = ["Fetcher", "MetaClient", "SdcacheFileSystem", "load_safetensors"]


def __getattr__(name: str) -> object:
    if name == "SdcacheFileSystem":
        from .fs import SdcacheFileSystem

        return SdcacheFileSystem
    raise AttributeError(name)
