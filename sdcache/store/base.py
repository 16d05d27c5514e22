"""The metadata store interface: namespace, manifests, pins, node registry.

The metadata service is a thin gRPC adapter over a :class:`MetaStore`. The
embedded implementation is SQLite (:mod:`sdcache.store.sqlite`); the
networked one is PostgreSQL (:mod:`sdcache.store.postgres`). Another
database takes their place by implementing this class and passing the
contract suite in ``tests/test_store.py``.

Semantics every implementation keeps:

* Paths are cache paths; every method normalizes what it is given with
  :func:`sdcache.paths.normalize` and raises :class:`~sdcache.errors.InvalidPath`
  for ``..``, ``a//b`` and friends.
* Directories are implicit: a directory exists while a file lies under it;
  ``/`` always exists. A file never has a file as an ancestor.
* :meth:`MetaStore.commit` is durable once it returns and assigns the next
  value of one global, strictly increasing generation counter. So is every
  other write but :meth:`MetaStore.heartbeat`.
* Several stores (in several processes) may open one database; each sees
  the others' writes once they returned.
* Errors are :mod:`sdcache.errors` classes, never backend exceptions.
* Methods are blocking and safe to call from several threads at once;
  async callers run them in a thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..manifest import Entry, Manifest
from ..placement import NodeInfo

#: Listing page size when the caller asks for 0, and the largest page served.
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000


@dataclass(slots=True)
class NodeRecord:
    """One cache node as registered, with what its last heartbeat said."""

    node_id: str
    address: str  # host:port of its chunk API
    capacity: int
    role: str = "memory"
    host_id: str = ""
    pool_dir: str = ""
    used: int = 0
    chunks: int = 0
    last_seen: float = 0.0  # unix seconds of the last registration or heartbeat
    zone: str = ""  # failure domain (``sdcache node --zone``)

    def info(self) -> NodeInfo:
        """The placement view of this node."""
        return NodeInfo(
            node_id=self.node_id,
            address=self.address,
            capacity=self.capacity,
            role=self.role,
            host_id=self.host_id,
            pool_dir=self.pool_dir,
            used=self.used,
            zone=self.zone,
        )


@dataclass(slots=True)
class TokenRecord:
    """What the service keeps of a token it issued: never the token itself."""

    name: str
    role: str
    created: float  # unix seconds
    expires: float = 0.0  # 0 = never
    revoked: float = 0.0  # 0 = not revoked; else when


@dataclass(slots=True)
class StoreStats:
    """Namespace totals; node totals come from :meth:`MetaStore.list_nodes`."""

    files: int
    bytes: int  # logical bytes of all files
    unique_chunks: int
    unique_bytes: int  # bytes after dedup across all files
    pinned_files: int


class MetaStore(ABC):
    """Durable metadata of one sdcache cluster."""

    # -- namespace -----------------------------------------------------------

    @abstractmethod
    def stat(self, path: str) -> Entry:
        """The file or directory at *path*; :class:`NotFound` if neither.

        A directory's ``size`` is the logical bytes of all files under it.
        """

    @abstractmethod
    def get_manifest(self, path: str) -> Manifest:
        """The current manifest of the file at *path*.

        :class:`NotFound` if nothing is there, :class:`IsADirectory` for a directory.
        """

    @abstractmethod
    def list_dir(self, path: str, page_token: str = "", page_size: int = 0) -> tuple[list[Entry], str]:
        """One page of the entries of a directory, ordered by name.

        Returns ``(entries, next_page_token)``. *page_token* is the last name
        of the previous page (``""`` for the first); the returned token is
        ``""`` after the last page. *page_size* 0 means
        :data:`DEFAULT_PAGE_SIZE`; larger than :data:`MAX_PAGE_SIZE` is capped.
        Listing a file yields that one file. :class:`NotFound` if nothing is
        at *path*.
        """

    @abstractmethod
    def commit(self, manifest: Manifest) -> int:
        """Make *manifest* the current version of ``manifest.path``.

        Validates the chunk table (tiles ``[0, size)``, chunks of at most 4 MiB,
        valid ids) and raises :class:`InvalidArgument` otherwise;
        :class:`IsADirectory` where a directory is, :class:`NotADirectory`
        where an ancestor is a file. Durable on return. Returns the
        generation assigned (also set on *manifest*); committing over a
        pinned file keeps the pin and bumps the pins generation.
        """

    @abstractmethod
    def delete(self, path: str, recursive: bool = False) -> int:
        """Delete a file, or with *recursive* every file under a directory.

        Returns the number of files deleted. A non-empty directory without
        *recursive* raises :class:`IsADirectory`; nothing at *path* raises
        :class:`NotFound`. Pins of deleted files go with them.
        """

    @abstractmethod
    def resolve_files(self, path: str, recursive: bool = False) -> list[Manifest]:
        """The manifests a command on *path* acts on, ordered by path.

        A file yields itself; a directory yields every file under it when
        *recursive*, else raises :class:`IsADirectory`.
        """

    # -- pins ----------------------------------------------------------------

    @abstractmethod
    def pin(self, path: str, recursive: bool = False) -> int:
        """Pin a file (or every file under a directory, with *recursive*).

        Returns the number of files matched; bumps the pins generation when
        any was not pinned yet.
        """

    @abstractmethod
    def unpin(self, path: str, recursive: bool = False) -> int:
        """Unpin like :meth:`pin`; returns the number of files that were pinned."""

    @abstractmethod
    def pins_generation(self) -> int:
        """A counter that changes whenever the set of pinned chunks may have."""

    @abstractmethod
    def pinned_chunks(self) -> tuple[int, bytes]:
        """``(pins_generation, ids)``: the 16-byte digests of every chunk of a
        pinned file, concatenated, each once, read in one snapshot."""

    # -- nodes ---------------------------------------------------------------

    @abstractmethod
    def register_node(self, node: NodeRecord) -> None:
        """Insert or replace *node*; another node at the same address is dropped."""

    @abstractmethod
    def heartbeat(self, node_id: str, used: int, chunks: int, now: float) -> bool:
        """Record a heartbeat; False when *node_id* is not registered.

        Not durable on return: liveness is renewed every interval, so a store
        must not pay an fsync per heartbeat (a crash may forget the last few).
        Visible to every reader of the store, since any metadata process over
        it may be asked for the live nodes.
        """

    @abstractmethod
    def list_nodes(self) -> list[NodeRecord]:
        """Every registered node, live or not, ordered by node id.

        Liveness is the service's policy (``last_seen`` against its heartbeat
        interval), not the store's.
        """

    # -- replica policy ------------------------------------------------------

    @abstractmethod
    def set_replicas(self, path: str, replicas: int) -> None:
        """Set the replica count of the files under *path* (a directory or a file; it need not
        exist yet); 0 drops the override. Durable on return."""

    @abstractmethod
    def replica_overrides(self) -> dict[str, int]:
        """Every per-path replica override, ``{normalized path: replicas}``."""

    # -- tokens --------------------------------------------------------------

    @abstractmethod
    def add_token(self, token: TokenRecord) -> None:
        """Record a newly issued token; :class:`~sdcache.errors.AlreadyExists` if the name was ever used."""

    @abstractmethod
    def list_tokens(self) -> list[TokenRecord]:
        """Every token issued, revoked ones included, ordered by name."""

    @abstractmethod
    def revoke_token(self, name: str, now: float) -> TokenRecord:
        """Mark *name* revoked at *now* (kept if already revoked) and bump the auth generation.

        A name never issued is still recorded as revoked, so tokens minted
        elsewhere with the shared key can be revoked too.
        """

    @abstractmethod
    def auth_generation(self) -> int:
        """A counter that increases with every revocation."""

    # -- totals and lifetime -------------------------------------------------

    @abstractmethod
    def stats(self) -> StoreStats:
        """Namespace totals (files, logical and deduplicated bytes, pins)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> MetaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
