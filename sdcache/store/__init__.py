"""Metadata stores: the :class:`MetaStore` interface and its SQLite implementation."""

from .base import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MetaStore, NodeRecord, StoreStats
from .sqlite import SqliteStore

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "MetaStore", "NodeRecord", "SqliteStore", "StoreStats"]
