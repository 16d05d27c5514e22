"""What every metadata store computes the same way, whatever the database under it.

What a commit may hold (:func:`pack_valid`), the key range of a directory's
subtree (:func:`subtree`), how a chunk table turns into chunk reference
counts (:func:`chunk_counts`), and the objects a file row becomes
(:func:`file_entry`, :func:`manifest_of`: both stores select the same
columns in the same order). Pure: no database here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..chunking import CHUNK_SIZE
from ..errors import InvalidArgument
from ..hashing import is_chunk_id
from ..manifest import CHUNK_ENTRY, Entry, Manifest, pack_chunks, unpack_chunks

#: The 16-byte digest inside one packed chunk-table entry.
ID_SLICE = slice(12, 28)
#: Sizes and counters are signed 64-bit integers in every store.
MAX_INT64 = (1 << 63) - 1


def subtree(directory: str) -> tuple[str, str]:
    """Bounds (exclusive) of every path strictly under *directory*.

    ``'0'`` is the character after ``'/'``, so ``lo < p < hi`` is exactly
    "p starts with directory + '/'" in code-point (byte) order.
    """
    prefix = "" if directory == "/" else directory
    return prefix + "/", prefix + "0"


def chunk_counts(blobs: Iterable[bytes]) -> tuple[Counter[bytes], dict[bytes, int]]:
    """Occurrences and length of every chunk digest in packed chunk tables."""
    counts: Counter[bytes] = Counter()
    lengths: dict[bytes, int] = {}
    for blob in blobs:
        for _, length, digest in CHUNK_ENTRY.iter_unpack(blob):
            counts[digest] += 1
            lengths[digest] = length
    return counts, lengths


def pack_valid(manifest: Manifest) -> bytes:
    """The packed chunk table of *manifest*, or :class:`InvalidArgument` why not.

    Text fields may not hold NUL (PostgreSQL's text cannot, and no URL,
    hash or kind has one; metadata is stored as JSON, which escapes it);
    sizes must fit a signed 64-bit integer. Both stores refuse the same
    manifests.
    """
    where = manifest.path
    if manifest.size < 0:
        raise InvalidArgument(f"{where}: negative size {manifest.size}")
    if manifest.size > MAX_INT64:
        raise InvalidArgument(f"{where}: size {manifest.size} is over the largest file a store records")
    try:
        manifest.validate()
    except ValueError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    for c in manifest.chunks:
        if c.length > CHUNK_SIZE:
            raise InvalidArgument(f"{where}: chunk at byte {c.offset} is {c.length} bytes, over the 4 MiB limit")
        if not is_chunk_id(c.id):
            raise InvalidArgument(f"{where}: chunk at byte {c.offset} has an invalid id {c.id!r}")
    for name in ("source", "version_tag", "sha256", "kind", "base"):
        if "\x00" in getattr(manifest, name):
            raise InvalidArgument(f"{where}: {name} contains a NUL character")
    return pack_chunks(manifest.chunks)


def file_entry(row: Iterable[Any]) -> Entry:
    """A file's listing entry from its (path, size, mtime, kind, sha256, generation, chunk_count) columns."""
    path, size, mtime, kind, sha256, generation, chunk_count = row
    return Entry(path, False, size, mtime, kind, sha256, generation, chunk_count)


def manifest_of(row: Iterable[Any]) -> Manifest:
    """A file's manifest from its (path, size, mtime, source, version_tag, sha256, kind, base, metadata,
    generation, chunks) columns."""
    path, size, mtime, source, tag, sha256, kind, base, metadata, generation, blob = row
    return Manifest(
        path=path,
        size=size,
        mtime=mtime,
        source=source,
        version_tag=tag,
        sha256=sha256,
        chunks=unpack_chunks(bytes(blob)),
        kind=kind,
        base=base,
        metadata=json.loads(metadata),
        generation=generation,
    )
