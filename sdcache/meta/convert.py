"""Conversions between the wire messages of ``meta.proto`` and the core types.

Also the two directions of error translation: an :class:`SdcacheError` sent
as a gRPC status plus the ``sdcache-error`` trailer, and back.
"""

from __future__ import annotations

from typing import Any

import grpc

from .. import errors, paths
from ..manifest import Entry, Manifest, pack_chunks, unpack_chunks
from ..placement import NodeInfo, check_zone
from .._proto import meta_pb2 as pb
from ..store.base import NodeRecord, TokenRecord

#: Trailing-metadata key naming the exact sdcache error class.
ERROR_TRAILER = "sdcache-error"


def manifest_from_proto(msg: pb.Manifest) -> Manifest:
    """A core manifest from its wire form, or :class:`~sdcache.errors.InvalidArgument` (or
    :class:`~sdcache.errors.InvalidPath`) saying why not.

    The wire is untrusted: the path must normalize and the packed table must be
    whole entries that tile the file (:meth:`Manifest.validate`), so no caller
    ever holds a manifest whose chunks overlap, leave gaps or pass its end.
    """
    path = paths.normalize(msg.path)
    try:
        m = Manifest(
            path=path,
            size=msg.size,
            mtime=msg.mtime,
            source=msg.source,
            version_tag=msg.version_tag,
            sha256=msg.sha256,
            chunks=unpack_chunks(msg.chunks),
            kind=msg.kind or "other",
            base=msg.base,
            metadata=dict(msg.metadata),
            generation=msg.generation,
            replicas=msg.replicas or 1,
        )
        m.validate()
    except errors.InvalidArgument as exc:
        raise errors.InvalidArgument(f"{path}: {exc}") from None
    return m


def manifest_to_proto(m: Manifest) -> pb.Manifest:
    return pb.Manifest(
        path=m.path,
        size=m.size,
        mtime=m.mtime,
        source=m.source,
        version_tag=m.version_tag,
        sha256=m.sha256,
        chunks=pack_chunks(m.chunks),
        kind=m.kind,
        base=m.base,
        metadata=m.metadata,
        generation=m.generation,
        replicas=m.replicas,
    )


def _entry_fields(e: Entry) -> dict[str, Any]:
    return {
        "path": e.path,
        "is_dir": e.is_dir,
        "size": e.size,
        "mtime": e.mtime,
        "kind": e.kind,
        "sha256": e.sha256,
        "generation": e.generation,
        "chunk_count": e.chunk_count,
    }


def entry_to_proto(e: Entry) -> pb.Entry:
    return pb.Entry(**_entry_fields(e))


def add_entries(out: Any, entries: list[Entry]) -> None:
    """Append *entries* to a repeated ``Entry`` field (in place: no message copies)."""
    add = out.add
    for e in entries:
        add(**_entry_fields(e))


def entry_from_proto(msg: pb.Entry) -> Entry:
    return Entry(msg.path, msg.is_dir, msg.size, msg.mtime, msg.kind, msg.sha256, msg.generation, msg.chunk_count)


def node_from_proto(msg: pb.Node, last_seen: float) -> NodeRecord:
    if not msg.node_id or not msg.address:
        raise errors.InvalidArgument("a node needs a node_id and an address")
    return NodeRecord(
        node_id=msg.node_id,
        address=msg.address,
        capacity=msg.capacity,
        role=msg.role or "memory",
        host_id=msg.host_id,
        pool_dir=msg.pool_dir,
        used=msg.used,
        chunks=msg.chunks,
        last_seen=last_seen,
        zone=check_zone(msg.zone),
    )


def node_to_proto(n: NodeRecord, alive: bool) -> pb.Node:
    return pb.Node(
        node_id=n.node_id,
        address=n.address,
        capacity=n.capacity,
        role=n.role,
        host_id=n.host_id,
        pool_dir=n.pool_dir,
        used=n.used,
        chunks=n.chunks,
        last_seen=n.last_seen,
        alive=alive,
        zone=n.zone,
    )


def node_info_from_proto(n: pb.Node) -> NodeInfo:
    """The placement view of a listed node."""
    return NodeInfo(node_id=n.node_id, address=n.address, capacity=n.capacity, role=n.role, host_id=n.host_id,
                    pool_dir=n.pool_dir, used=n.used, zone=n.zone)


def token_to_proto(t: TokenRecord) -> pb.TokenInfo:
    return pb.TokenInfo(name=t.name, role=t.role, created=t.created, expires=t.expires, revoked=t.revoked)


def status_of(exc: errors.SdcacheError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """``(code, details, trailing_metadata)`` that carry *exc* over gRPC."""
    return grpc.StatusCode[exc.grpc_code], str(exc), ((ERROR_TRAILER, errors.error_name(exc)),)


def error_from_rpc(exc: grpc.RpcError) -> errors.SdcacheError:
    """Rebuild the sdcache error a failed call carried (exact class when named)."""
    trailer = dict(exc.trailing_metadata() or ()).get(ERROR_TRAILER)  # type: ignore[attr-defined]
    code = exc.code()  # type: ignore[attr-defined]
    return errors.from_wire(trailer, exc.details() or code.name, grpc_code=code.name)  # type: ignore[attr-defined]
