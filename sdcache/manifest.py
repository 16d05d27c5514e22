"""A file's identity: its manifest.

A manifest maps a cache path to the ordered chunks of one version of one
source file. A changed source is a new manifest with a new ``generation``;
an open file keeps the manifest it opened with.
"""

from __future__ import annotations

import bisect
import json
import struct
from dataclasses import dataclass, field

from .chunking import ChunkRef

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
        """Raise ValueError unless the chunks tile [0, size) exactly."""
        pos = 0
        for c in self.chunks:
            if c.offset != pos or c.length <= 0:
                raise ValueError(f"chunk table has a gap or overlap at byte {pos}")
            pos += c.length
        if pos != self.size:
            raise ValueError(f"chunk table covers {pos} bytes, file has {self.size}")


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
