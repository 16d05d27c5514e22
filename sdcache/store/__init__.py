"""Metadata stores: the :class:`MetaStore` interface, SQLite (embedded) and PostgreSQL (networked)."""

from __future__ import annotations

import os

from ..errors import InvalidArgument
from .base import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MetaStore, NodeRecord, StoreStats
from .sqlite import SqliteStore

#: URL schemes :func:`open_store` hands to the PostgreSQL store.
POSTGRES_SCHEMES = ("postgresql", "postgres")


def open_store(db: str | None, sqlite_path: str | os.PathLike[str]) -> MetaStore:
    """The store ``sdcache meta`` serves: PostgreSQL for a ``postgresql://`` *db*, else SQLite at *sqlite_path*.

    Blocking (it connects and migrates). psycopg is imported only here, so an
    install without the ``postgres`` extra runs the SQLite store.
    """
    if not db:
        return SqliteStore(sqlite_path)
    scheme, sep, _ = db.partition("://")
    if not sep or scheme.lower() not in POSTGRES_SCHEMES:
        shown = f"{scheme}://..." if sep else "a value without a scheme"  # never echo a password
        raise InvalidArgument(f"--db wants a postgresql://USER@HOST:PORT/DATABASE URL, got {shown} "
                              f"(without --db the store is SQLite under --data)")
    try:
        from .postgres import PostgresStore
    except ImportError as exc:
        raise InvalidArgument(f"--db {scheme}:// needs psycopg 3: pip install 'sdcache[postgres]' ({exc})") from None
    return PostgresStore(db)


__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "MetaStore", "NodeRecord", "SqliteStore", "StoreStats",
           "open_store"]
