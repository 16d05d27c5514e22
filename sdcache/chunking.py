"""Splitting files into content-hashed chunks; the chunk geometry lives here.

``.safetensors`` files are cut along tensor boundaries so that a tensor shared
by two files (the same VAE or text encoder in two fine-tunes) yields the same
chunk ids in both, whatever the header length or the tensors around it:

* the header (length prefix + JSON) is a chunk of its own;
* a *large* tensor (>= :data:`SMALL_TENSOR`) is split in :data:`CHUNK_SIZE`
  pieces from its own first byte;
* runs of *small* tensors are grouped: a group is cut after a tensor once it
  holds :data:`MIN_GROUP` bytes and the tensor's content hash hits
  :data:`CUT_MASK` (a content-defined rule), before a tensor that would take
  it past :data:`CHUNK_SIZE`, and where the model component changes
  (``first_stage_model`` -> ``model.diffusion_model``), so shared runs line up.

Other files, and safetensors files whose header does not validate, are cut
in fixed :data:`CHUNK_SIZE` pieces. The file is read once; its sha256 is
computed in the same pass.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import xxhash

from .safetensors_header import Header, HeaderError, TensorInfo, detect_kind, read_header

log = logging.getLogger(__name__)

CHUNK_SIZE = 4 << 20  # no chunk is larger (contract)
SMALL_TENSOR = 1 << 20  # tensors below this are grouped with their neighbours
MIN_GROUP = 1 << 20  # a group is not cut by content before it holds this much
CUT_MASK = 0x3  # cut after a small tensor when xxh3_64(bytes) & CUT_MASK == 0

Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One entry of a manifest: bytes [offset, offset+length) are chunk *id*."""

    offset: int
    length: int
    id: str


@dataclass(slots=True)
class ChunkedFile:
    """What one read pass learns about a file."""

    size: int
    sha256: str
    chunks: list[ChunkRef]
    kind: str = "other"
    base: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    warning: str = ""  # why a .safetensors file was stored as kind "other"


def _component(name: str) -> str:
    parts = name.split(".", 2)
    return ".".join(parts[:2]) if parts[0] == "model" and len(parts) > 1 else parts[0]


def safetensors_pieces(header: Header, size: int) -> Iterator[tuple[int, int, str, str]]:
    """Yield ``(start, end, role, component)`` byte extents covering the file.

    *role* is ``header``, ``large`` or ``small``. Padding between tensors
    belongs to the tensor after it; bytes after the last tensor form a final
    ``small`` extent.
    """
    yield 0, header.data_start, "header", ""
    pos = header.data_start
    t: TensorInfo
    for t in header.tensors:
        if t.end <= pos:  # zero-length tensor at the current position
            continue
        role = "large" if t.nbytes >= SMALL_TENSOR else "small"
        yield pos, t.end, role, _component(t.name)
        pos = t.end
    if pos < size:
        yield pos, size, "small", ""


class _Reader:
    """Sequential reads of *f* with sha256 over every byte, through one buffer."""

    def __init__(self, f: BinaryIO, progress: Progress | None) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.buf = bytearray(CHUNK_SIZE)
        self.progress = progress

    def read(self, n: int, into: memoryview) -> memoryview:
        got = 0
        while got < n:
            k = self.f.readinto(into[got:n])  # type: ignore[attr-defined]
            if not k:
                raise EOFError(f"file ended early (wanted {n - got} more bytes)")
            got += k
        view = into[:n]
        self.sha.update(view)
        if self.progress:
            self.progress(n)
        return view


def _fixed_chunks(reader: _Reader, start: int, end: int, out: list[ChunkRef]) -> None:
    mv = memoryview(reader.buf)
    pos = start
    while pos < end:
        n = min(CHUNK_SIZE, end - pos)
        view = reader.read(n, mv)
        out.append(ChunkRef(pos, n, xxhash.xxh3_128_hexdigest(view)))
        pos += n


def _tensor_chunks(reader: _Reader, header: Header, size: int, out: list[ChunkRef]) -> None:
    mv = memoryview(reader.buf)
    group_start = -1
    group_len = 0
    group_component = ""

    def flush() -> None:
        nonlocal group_start, group_len
        if group_len:
            out.append(ChunkRef(group_start, group_len, xxhash.xxh3_128_hexdigest(mv[:group_len])))
        group_start, group_len = -1, 0

    for start, end, role, component in safetensors_pieces(header, size):
        n = end - start
        if role != "small":
            flush()
            _fixed_chunks(reader, start, end, out)
            continue
        if group_len and (group_len + n > CHUNK_SIZE or component != group_component):
            flush()
        if n > CHUNK_SIZE:  # only padding/trailing junk can be this long
            _fixed_chunks(reader, start, end, out)
            continue
        if not group_len:
            group_start, group_component = start, component
        view = reader.read(n, mv[group_len:])
        group_len += n
        if group_len >= MIN_GROUP and xxhash.xxh3_64_intdigest(view) & CUT_MASK == 0:
            flush()
    flush()


def chunk_file(
    f: BinaryIO,
    size: int,
    *,
    name: str = "",
    progress: Progress | None = None,
) -> ChunkedFile:
    """Read *f* (positioned at 0, *size* bytes) once and return its chunks.

    *name* decides the strategy: names ending in ``.safetensors`` are cut
    along tensors when the header validates. *progress* is called with the
    number of bytes read after every read.
    """
    reader = _Reader(f, progress)
    chunks: list[ChunkRef] = []
    result = ChunkedFile(size=size, sha256="", chunks=chunks)
    header: Header | None = None
    if name.endswith(".safetensors"):
        try:
            header = read_header(f, size)
        except HeaderError as exc:
            result.warning = f"not a valid safetensors file ({exc}); stored byte-exact as kind 'other'"
        f.seek(0)
    if header is not None:
        _tensor_chunks(reader, header, size, chunks)
        result.kind, result.base = detect_kind([t.name for t in header.tensors])
        result.metadata = header.metadata
    else:
        _fixed_chunks(reader, 0, size, chunks)
    if f.read(1):
        raise EOFError("file grew while it was being read")
    result.sha256 = reader.sha.hexdigest()
    return result
