"""A file's identity: its manifest.

A manifest maps a cache path to the ordered chunks of one version of one
source file. A changed source is a new manifest with a new ``generation``;
an open file keeps the manifest it opened with.
"""

from __future__ import annotations

import bisect
import json
import math
import struct
from dataclasses import dataclass, field

from .chunking import CHUNK_SIZE, ChunkRef
from .errors import InvalidArgument
from .hashing import is_chunk_id

# One packed chunk-table entry.
CHUNK_ENTRY = struct.Struct(
    "<Q"  # offset of the chunk in the file
    "I"  # length in bytes (<= CHUNK_SIZE)
    "16s"  # xxh3-128 digest, big-endian bytes of the hex id
)


def pack_chunks(chunks: list[ChunkRef]) -> bytes:
    """Encode a chunk table compactly (28 bytes an entry) for the store and the wire."""
    out = bytearray(CHUNK_ENTRY.size * len(chunks))
    for i, c in enumerate(chunks):
        CHUNK_ENTRY.pack_into(out, i * CHUNK_ENTRY.size, c.offset, c.length, bytes.fromhex(c.id))
    return bytes(out)


def unpack_chunks(blob: bytes) -> list[ChunkRef]:
    """Decode a packed chunk table; :class:`InvalidArgument` unless it is whole entries.

    Only the layout is checked here; :meth:`Manifest.validate` checks that the
    entries tile the file.
    """
    if len(blob) % CHUNK_ENTRY.size:
        raise InvalidArgument(f"chunk table is {len(blob)} bytes, not a multiple of {CHUNK_ENTRY.size}")
    return [ChunkRef(o, n, d.hex()) for o, n, d in CHUNK_ENTRY.iter_unpack(blob)]


@dataclass(slots=True)
class Manifest:
    path: str
    size: int
    mtime: float
    source: str  # URL of the under-store object ("" = cluster store)
    version_tag: str  # etag, or "mtime:size" for plain files
    sha256: str
    chunks: list[ChunkRef]
    kind: str = "other"
    base: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    generation: int = 0  # assigned by the store on commit; increases per commit
    #: Owners per chunk under the replica policy when this manifest was read
    #: (placement, not identity: never stored with the file, ignored on commit).
    replicas: int = 1
    _offsets: list[int] = field(default_factory=list, repr=False)

    def chunk_index(self, offset: int) -> int:
        """Index of the chunk holding byte *offset*."""
        if not self._offsets:
            self._offsets = [c.offset for c in self.chunks]
        return bisect.bisect_right(self._offsets, offset) - 1

    def chunks_for(self, start: int, end: int) -> range:
        """Indices of the chunks overlapping bytes [start, end)."""
        if end <= start or start >= self.size:
            return range(0)
        return range(self.chunk_index(start), self.chunk_index(min(end, self.size) - 1) + 1)

    def metadata_json(self) -> str:
        return json.dumps(self.metadata, sort_keys=True)

    def validate(self) -> None:
        """Raise :class:`InvalidArgument` unless the manifest describes one readable file.

        The chunks must tile [0, size) exactly, each at most 4 MiB and named by
        a chunk id; the size must not be negative and the mtime must be finite.
        (:class:`InvalidArgument` is a :class:`ValueError`.)
        """
        if self.size < 0:
            raise InvalidArgument(f"negative size {self.size}")
        if not math.isfinite(self.mtime):
            raise InvalidArgument(f"mtime {self.mtime} is not a finite number")
        pos = 0
        for c in self.chunks:
            if c.offset != pos or c.length <= 0:
                raise InvalidArgument(f"chunk table has a gap or overlap at byte {pos}")
            if c.length > CHUNK_SIZE:
                raise InvalidArgument(f"chunk at byte {c.offset} is {c.length} bytes, over the 4 MiB limit")
            if not is_chunk_id(c.id):
                raise InvalidArgument(f"chunk at byte {c.offset} has an invalid id {c.id!r:.40}")
            pos += c.length
            if pos > self.size:
                raise InvalidArgument(f"chunk at byte {c.offset} runs past the end of the {self.size}-byte file")
        if pos != self.size:
            raise InvalidArgument(f"chunk table covers {pos} bytes, file has {self.size}")


@dataclass(slots=True)
class Entry:
    """One listing row: a file (with its summary) or an implicit directory."""

    path: str
    is_dir: bool
    size: int = 0
    mtime: float = 0.0
    kind: str = ""
    sha256: str = ""
    generation: int = 0
    chunk_count: int = 0
