"""Hostile input to the pure core: safetensors headers, chunk tables, paths, chunking.

Every decoder here reads bytes someone else wrote (a file on an under-store, a
gRPC message, a path typed by a user). The properties: it either returns a
value that satisfies the invariants the rest of the code relies on, or raises
the one documented error class; never another exception, never a hang, never
an allocation sized by a number in the input.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import tracemalloc

import pytest
import xxhash
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sdcache import errors, paths
from sdcache._proto import meta_pb2 as pb
from sdcache.chunking import CHUNK_SIZE, ChunkRef, chunk_file
from sdcache.manifest import CHUNK_ENTRY, Manifest, pack_chunks, unpack_chunks
from sdcache.meta.convert import manifest_from_proto, manifest_to_proto
from sdcache.safetensors_header import (
    DTYPE_SIZES,
    HEADER_LEN,
    MAX_HEADER,
    Header,
    HeaderError,
    detect_kind,
    parse_header,
    read_header,
)

# No example database: the working tree is shared, and these tests must not leave files in it.
# The deadline is what "no hang" means per example; it is generous because two cores are shared.
FAST = settings(max_examples=150, deadline=2000, database=None)
FEW = settings(max_examples=12, deadline=10_000, database=None)  # examples of tens of MiB


# -- safetensors headers -----------------------------------------------------


def check_header(h: Header, blob: bytes, file_size: int) -> None:
    """The invariants chunking and the loaders rely on when a header validates."""
    assert h.data_start == HEADER_LEN.size + len(blob) <= file_size
    prev_end = h.data_start
    for t in h.tensors:
        assert t.dtype in DTYPE_SIZES
        assert all(type(d) is int and d >= 0 for d in t.shape)
        assert t.nbytes == math.prod(t.shape) * DTYPE_SIZES[t.dtype]
        assert prev_end <= t.begin <= t.end <= file_size  # sorted, disjoint, inside the file
        prev_end = t.end
        t.name.encode("utf-8")  # carried on the wire later: must be real Unicode
    for k, v in h.metadata.items():
        assert type(k) is str and type(v) is str
        (k + v).encode("utf-8")


def header_outcome(blob: bytes, file_size: int) -> Header | None:
    """Parse, asserting that the only failure is :class:`HeaderError`."""
    try:
        h = parse_header(blob, file_size)
    except HeaderError:
        return None
    check_header(h, blob, file_size)
    return h


# JSON values of every shape, including ones the schema never expects.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(list(DTYPE_SIZES))
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def valid_docs(draw: st.DrawFn) -> tuple[dict, int]:
    """A valid header document (tensors laid out in order, with gaps) and its data length."""
    doc: dict = {}
    pos = 0
    for i in range(draw(st.integers(0, 6))):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        pos += draw(st.sampled_from([0, 0, 0, 1, 7]))  # padding before the tensor
        n = math.prod(shape) * DTYPE_SIZES[dtype]
        name = draw(st.sampled_from(["model.diffusion_model.", "first_stage_model.", "lora_unet_", ""])) + str(i)
        doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    if draw(st.booleans()):
        doc["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    return doc, pos


@st.composite
def mutated_docs(draw: st.DrawFn) -> tuple[dict, int]:
    """A valid document with one field replaced by something hostile."""
    doc, data_len = draw(valid_docs())
    names = [k for k in doc if k != "__metadata__"]
    what = draw(st.sampled_from(["field", "entry", "offsets", "metadata", "extra"]))
    if what == "field" and names:
        entry = doc[draw(st.sampled_from(names))]
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
    elif what == "entry" and names:
        doc[draw(st.sampled_from(names))] = draw(json_values)
    elif what == "offsets" and names:
        # Shift, stretch or swap offsets: overlap, out of range, reversed, negative.
        b, e = doc[draw(st.sampled_from(names))]["data_offsets"]
        db, de = draw(st.integers(-20, 20)), draw(st.integers(-20, 20))
        doc[draw(st.sampled_from(names))]["data_offsets"] = draw(
            st.sampled_from([[b + db, e + de], [e, b], [b + db, e + db], [b, 2**64 + e], [b - 2**63, e]])
        )
    elif what == "metadata":
        doc["__metadata__"] = draw(json_values)
    else:
        doc[draw(st.text(max_size=6))] = draw(json_values)
    return doc, data_len


def _file(doc: dict, data_len: int, tail: int = 0) -> bytes:
    blob = json.dumps(doc).encode()
    return HEADER_LEN.pack(len(blob)) + blob + b"\xab" * (data_len + tail)


@FAST
@given(st.binary(max_size=300), st.integers(0, 2**64))
def test_parse_header_of_arbitrary_bytes_fails_only_with_header_error(blob: bytes, extra: int) -> None:
    header_outcome(blob, HEADER_LEN.size + len(blob) + extra)


@FAST
@given(st.binary(max_size=300))
def test_read_header_of_arbitrary_files_fails_only_with_header_error(data: bytes) -> None:
    try:
        h = read_header(io.BytesIO(data), len(data))
    except HeaderError:
        return
    (n,) = HEADER_LEN.unpack_from(data)
    check_header(h, data[HEADER_LEN.size : HEADER_LEN.size + n], len(data))


@FAST
@given(json_values, st.integers(0, 1000))
def test_json_of_the_wrong_shape_fails_only_with_header_error(value: object, data_len: int) -> None:
    blob = json.dumps(value).encode()
    h = header_outcome(blob, HEADER_LEN.size + len(blob) + data_len)
    if not isinstance(value, dict):
        assert h is None


@FAST
@given(valid_docs(), st.integers(0, 10))
def test_valid_headers_parse_to_their_tensors(case: tuple[dict, int], tail: int) -> None:
    doc, data_len = case
    data = _file(doc, data_len, tail)
    h = read_header(io.BytesIO(data), len(data))
    check_header(h, data[HEADER_LEN.size : h.data_start], len(data))
    assert {t.name for t in h.tensors} == set(doc) - {"__metadata__"}
    assert h.metadata == doc.get("__metadata__", {})


@FAST
@given(mutated_docs(), st.integers(0, 10))
def test_mutated_headers_parse_or_fail_with_header_error(case: tuple[dict, int], tail: int) -> None:
    doc, data_len = case
    blob = json.dumps(doc).encode()
    h = header_outcome(blob, HEADER_LEN.size + len(blob) + data_len + tail)
    if h is not None:
        # What validated is exactly what the document says, not a coerced reading of it.
        for t in h.tensors:
            entry = doc[t.name]
            assert entry["dtype"] == t.dtype and entry["shape"] == list(t.shape)
            assert [t.begin - h.data_start, t.end - h.data_start] == entry["data_offsets"]


@FAST
@given(valid_docs(), st.data())
def test_truncated_files_fail_with_header_error(case: tuple[dict, int], data: st.DataObject) -> None:
    doc, data_len = case
    whole = _file(doc, data_len)
    blob_end = HEADER_LEN.size + len(json.dumps(doc).encode())
    last_end = blob_end + max((e["data_offsets"][1] for k, e in doc.items() if k != "__metadata__"), default=0)
    cut = data.draw(st.integers(0, len(whole)))
    short = whole[:cut]
    try:
        h = read_header(io.BytesIO(short), len(short))
    except HeaderError:
        assert cut < last_end
        return
    assert cut >= last_end
    check_header(h, short[HEADER_LEN.size : blob_end], len(short))


@FAST
@given(valid_docs(), st.integers(1, 16), st.integers(0, 1 << 40))
def test_a_file_shorter_than_its_stated_size_fails_with_header_error(
    case: tuple[dict, int], pad: int, lie: int
) -> None:
    """The caller's size can be stale (the source changed under us).

    Writers pad the JSON with spaces, so a read cut short inside the padding
    is still JSON; taking it would misplace every tensor by the missing bytes.
    """
    doc, data_len = case
    blob = json.dumps(doc).encode() + b" " * pad
    data = HEADER_LEN.pack(len(blob)) + blob[: len(blob) - pad]  # the file ends inside the padding
    with pytest.raises(HeaderError, match="truncated"):
        read_header(io.BytesIO(data), HEADER_LEN.size + len(blob) + data_len + lie)


class _CountingFile(io.BytesIO):
    """A file that records the largest read asked of it."""

    largest = 0

    def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
        self.largest = max(self.largest, -1 if n is None else n)
        return super().read(n)


@pytest.mark.parametrize("declared", [2**60, 2**63, 2**64 - 1, MAX_HEADER + 1, MAX_HEADER])
def test_a_huge_declared_header_length_allocates_nothing(declared: int) -> None:
    # The stated file size lies too, so only the MAX_HEADER bound and the short read protect us.
    f = _CountingFile(HEADER_LEN.pack(declared) + b'{"a": 1}')
    tracemalloc.start()
    try:
        with pytest.raises(HeaderError):
            read_header(f, 2**62)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert f.largest <= MAX_HEADER


@pytest.mark.timeout(30)
@pytest.mark.parametrize("blob", [
    b"[" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"__metadata__": {"k": ' + b"[" * 5_000 + b"]" * 5_000 + b"}}",
    b'{"a": {"dtype": "F32", "shape": ' + b"[" * 5_000 + b"]" * 5_000 + b', "data_offsets": [0, 0]}}',
])
def test_deep_nesting_fails_with_header_error(blob: bytes) -> None:
    with pytest.raises(HeaderError):
        parse_header(blob, HEADER_LEN.size + len(blob))


@pytest.mark.parametrize("doc", [
    {"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},  # unhashable dtype
    {"a": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}},
    {"a": {"dtype": "F32", "shape": [float("inf")], "data_offsets": [0, 4]}},  # int(inf) overflows
    {"a": {"dtype": "F32", "shape": [float("nan")], "data_offsets": [0, 4]}},
    {"a": {"dtype": "F32", "shape": [1.9], "data_offsets": [0, 4]}},  # was truncated to 1
    {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},  # was read as 1
    {"a": {"dtype": "U8", "shape": "12", "data_offsets": [0, 2]}},  # was read as (1, 2)
    {"a": {"dtype": "U8", "shape": [3], "data_offsets": "03"}},  # was read as [0, 3]
    {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3.0]}},
    {"a": {"dtype": "U8", "shape": [3], "data_offsets": {"0": 1, "3": 2}}},
    {"a": {"dtype": "U8", "shape": [0], "data_offsets": [-4, -4]}},
    {"a": {"dtype": "U8", "shape": [2**64], "data_offsets": [0, 2**64]}},
    {"\ud800": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}},  # lone surrogate name
    {"__metadata__": {"k": "\udfff"}},
    {"__metadata__": ["not", "an", "object"]},
])
def test_wrong_types_fail_with_header_error(doc: dict) -> None:
    blob = json.dumps(doc).encode()
    with pytest.raises(HeaderError):
        parse_header(blob, HEADER_LEN.size + len(blob) + 100)


@pytest.mark.parametrize("blob", [
    b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1' + b"0" * 5000 + b"]}}",  # past int digit limit
    '{"a": 1}'.encode("utf-16"),  # JSON, but not UTF-8 as the format requires
    '{"a": 1}'.encode("utf-32"),
    b"\xef\xbb\xbf{}",  # a byte-order mark
    b"\xff\xfe\x00",
])
def test_non_json_and_non_utf8_fail_with_header_error(blob: bytes) -> None:
    with pytest.raises(HeaderError):
        parse_header(blob, HEADER_LEN.size + len(blob) + 100)


@pytest.mark.timeout(10)
def test_a_shape_of_huge_dims_is_refused_quickly() -> None:
    """The element count of 2000 dims of 4000 digits would take minutes to multiply out."""
    big = "1" + "0" * 4000
    blob = ('{"a": {"dtype": "U8", "shape": [' + ", ".join([big] * 2000) + '], "data_offsets": [0, 4]}}').encode()
    with pytest.raises(HeaderError):
        parse_header(blob, HEADER_LEN.size + len(blob) + 4)
    # A zero anywhere still makes an empty tensor, however large the other dims.
    blob = ('{"a": {"dtype": "U8", "shape": [' + big + ', 0], "data_offsets": [0, 0]}}').encode()
    assert parse_header(blob, HEADER_LEN.size + len(blob)).tensors[0].nbytes == 0


# -- chunk tables and manifests ----------------------------------------------


def tiles(size: int, chunks: list[ChunkRef]) -> bool:
    """The oracle: entries in order, contiguous from 0 to *size*, each 1 byte to 4 MiB."""
    pos = 0
    for c in chunks:
        if c.offset != pos or not 0 < c.length <= CHUNK_SIZE:
            return False
        pos += c.length
    return pos == size


@FAST
@given(st.binary(max_size=28 * 6))
def test_unpack_of_arbitrary_bytes_is_whole_entries_or_invalid_argument(blob: bytes) -> None:
    try:
        chunks = unpack_chunks(blob)
    except errors.InvalidArgument:
        assert len(blob) % CHUNK_ENTRY.size
        return
    assert len(chunks) * CHUNK_ENTRY.size == len(blob)
    assert all(len(c.id) == 32 and int(c.id, 16) >= 0 for c in chunks)
    assert pack_chunks(chunks) == blob


def _wire(size: int, chunks: bytes, **kw: object) -> pb.Manifest:
    return pb.Manifest(path=kw.pop("path", "/m/x.bin"), size=size, chunks=chunks, **kw)  # type: ignore[arg-type]


def decode(msg: pb.Manifest) -> Manifest | None:
    """manifest_from_proto, asserting it fails only with a clear sdcache error."""
    try:
        m = manifest_from_proto(msg)
    except (errors.InvalidArgument, errors.InvalidPath) as exc:
        assert str(exc)
        return None
    m.validate()
    assert tiles(m.size, m.chunks)
    assert m.path == paths.normalize(m.path)
    assert manifest_from_proto(manifest_to_proto(m)) == m
    return m


@FAST
@given(st.integers(0, 2**64 - 1), st.binary(max_size=28 * 4 + 3), st.floats())
def test_arbitrary_wire_manifests_decode_or_fail_clearly(size: int, blob: bytes, mtime: float) -> None:
    m = decode(_wire(size, blob, mtime=mtime))
    if m is not None:
        assert math.isfinite(mtime) and len(blob) % CHUNK_ENTRY.size == 0


@st.composite
def valid_tables(draw: st.DrawFn) -> tuple[int, list[ChunkRef]]:
    """A tiling of a file, with lengths near the 4 MiB bound too."""
    lengths = draw(st.lists(st.one_of(st.integers(1, 100), st.sampled_from([CHUNK_SIZE - 1, CHUNK_SIZE])), max_size=5))
    chunks, pos = [], 0
    for n in lengths:
        chunks.append(ChunkRef(pos, n, draw(st.binary(min_size=16, max_size=16)).hex()))
        pos += n
    return pos, chunks


@st.composite
def chunk_tables(draw: st.DrawFn) -> tuple[int, list[ChunkRef]]:
    """A tiling of a file, then perhaps one defect."""
    size, chunks = draw(valid_tables())
    defect = draw(st.sampled_from(["none", "size", "offset", "length", "drop", "dup", "swap", "huge"]))
    i = draw(st.integers(0, max(0, len(chunks) - 1)))
    if defect == "size":
        size = max(0, size + draw(st.integers(-5, 5)))
    elif chunks and defect == "offset":  # an overlap or a gap
        c = chunks[i]
        chunks[i] = ChunkRef(max(0, c.offset + draw(st.integers(-5, 5))), c.length, c.id)
    elif chunks and defect == "length":  # zero, over 4 MiB, past the end
        c = chunks[i]
        chunks[i] = ChunkRef(c.offset, draw(st.sampled_from([0, CHUNK_SIZE + 1, 2**32 - 1, c.length + 1])), c.id)
    elif chunks and defect == "drop":
        del chunks[i]
    elif chunks and defect == "dup":
        chunks.insert(i, chunks[i])
    elif len(chunks) > 1 and defect == "swap":
        chunks[0], chunks[-1] = chunks[-1], chunks[0]
    elif defect == "huge":  # offsets far beyond the size
        chunks.append(ChunkRef(2**64 - 1, 1, "0" * 32))
    return size, chunks


@FAST
@given(chunk_tables(), st.integers(0, 27))
def test_wire_manifests_decode_exactly_when_their_chunks_tile_the_file(
    table: tuple[int, list[ChunkRef]], torn: int
) -> None:
    size, chunks = table
    blob = pack_chunks(chunks)
    blob = blob[: len(blob) - torn] if torn <= len(blob) else blob
    whole = len(blob) == CHUNK_ENTRY.size * len(chunks)
    m = decode(_wire(size, blob, mtime=1.5))
    assert (m is not None) == (whole and tiles(size, chunks))
    if m is not None:
        assert m.chunks == chunks and m.size == size


@FAST
@given(valid_tables(), st.data())
def test_chunks_for_a_valid_manifest_cover_the_range(table: tuple[int, list[ChunkRef]], data: st.DataObject) -> None:
    size, chunks = table
    assume(size > 0)
    m = Manifest("/x", size, 0.0, "", "", "", chunks)
    start = data.draw(st.integers(0, size - 1))
    end = data.draw(st.integers(start + 1, size + 10))
    idx = m.chunks_for(start, end)
    got = [m.chunks[i] for i in idx]
    assert got[0].offset <= start < got[0].offset + got[0].length
    assert got[-1].offset < min(end, size) <= got[-1].offset + got[-1].length


@pytest.mark.parametrize("mtime", [float("nan"), float("inf"), float("-inf")])
def test_a_manifest_with_a_non_finite_mtime_is_invalid(mtime: float) -> None:
    # SQLite stores NaN as NULL, so such a commit used to fail with IntegrityError.
    with pytest.raises(errors.InvalidArgument):
        manifest_from_proto(_wire(0, b"", mtime=mtime))


@pytest.mark.parametrize("path", ["../x", "/a//b", "\ud800", "/a\x00"])
def test_a_wire_manifest_with_a_bad_path_is_invalid_path(path: str) -> None:
    msg = pb.Manifest(size=0)
    try:
        msg.path = path
    except (ValueError, TypeError):  # protobuf itself refuses it: nothing hostile gets in
        return
    with pytest.raises(errors.InvalidPath):
        manifest_from_proto(msg)


# -- paths -------------------------------------------------------------------

components = st.one_of(
    st.sampled_from(["", ".", "..", "...", "a", "sdcache:", "\x00", "a\x00b", "\ud800", "é", "\u200b", "\\", " "]),
    st.text(max_size=10),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=250, max_size=260),
)
path_texts = st.one_of(
    st.text(),
    st.tuples(
        st.sampled_from(["", "/", "//", "sdcache://", "sdcache:///", "sdcache:/"]),
        st.lists(components, max_size=8),
        st.sampled_from(["/", "//", "/./", "/../"]),
        st.sampled_from(["", "/", "//"]),
    ).map(lambda t: t[0] + t[2].join(t[1]) + t[3]),
    st.integers(1, 300).map(lambda n: "/" + "/".join(["abcdefghijklmn"] * n)),  # around 4096 bytes
)


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8"))


@FAST
@given(path_texts)
def test_normalize_returns_a_canonical_path_or_invalid_path(raw: str) -> None:
    try:
        p = paths.normalize(raw)
    except errors.InvalidPath:
        return
    assert p.startswith("/") and "\x00" not in p
    assert _utf8_len(p) <= paths.MAX_PATH  # also: encodable, so it fits on the wire
    parts = p.split("/")[1:] if p != "/" else []
    assert all(part not in ("", ".", "..") and _utf8_len(part) <= paths.MAX_NAME for part in parts)
    assert paths.normalize(p) == p
    # Validation, not resolution: the components are the ones given, unchanged.
    given_text = raw[len("sdcache://"):] if raw.startswith("sdcache://") else raw
    assert p.strip("/") == given_text.strip("/")


@FAST
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=5)
                .filter(lambda s: s not in (".", "..")), min_size=1, max_size=5),
       st.integers(0, 4), st.sampled_from(["..", ".", "", "a\x00", "\udc80", "n" * 256, "é" * 128]))
def test_one_bad_component_makes_the_path_invalid(good: list[str], at: int, bad: str) -> None:
    assert paths.normalize("/" + "/".join(good)) == "/" + "/".join(good)
    parts = list(good)
    parts.insert(min(at, len(parts)), bad)
    with pytest.raises(errors.InvalidPath):
        paths.normalize("/" + "/".join(parts) + "/x")


def test_path_length_bounds_are_linux_ones() -> None:
    name = "n" * paths.MAX_NAME
    assert paths.normalize("/" + name) == "/" + name
    with pytest.raises(errors.InvalidPath):
        paths.normalize("/" + name + "n")
    with pytest.raises(errors.InvalidPath):
        paths.normalize("/" + "é" * 128)  # 128 characters, 256 bytes
    deep = "/" + "/".join(["d" * 15] * 256)  # 4096 bytes exactly
    assert paths.normalize(deep) == deep
    with pytest.raises(errors.InvalidPath):
        paths.normalize(deep + "x")


@pytest.mark.timeout(10)
def test_a_huge_path_is_refused_quickly_with_a_short_message() -> None:
    for raw in ("/a" * 5_000_000, "x" * 10_000_000, "sdcache://" + "\x00" * 1_000_000):
        with pytest.raises(errors.InvalidPath) as exc:
            paths.normalize(raw)
        assert len(str(exc.value)) < 200


# -- chunking safetensors files with hostile headers --------------------------

hostile_headers = st.one_of(
    st.binary(max_size=64),  # with no valid length prefix, mostly
    st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=64)).map(lambda t: HEADER_LEN.pack(t[0]) + t[1]),
    st.tuples(mutated_docs(), st.integers(0, 40)).map(lambda t: _file(*t[0], t[1])),
    st.tuples(json_values, st.binary(max_size=40)).map(
        lambda t: HEADER_LEN.pack(len(json.dumps(t[0]))) + json.dumps(t[0]).encode() + t[1]
    ),
    st.tuples(valid_docs(), st.integers(0, 40)).map(lambda t: _file(*t[0], t[1])),
)


def check_chunks(data: bytes, name: str = "x.safetensors") -> None:
    """Chunking *data* tiles it with verifiable chunks, whatever its header says."""
    r = chunk_file(io.BytesIO(data), len(data), name=name)
    assert tiles(len(data), r.chunks)
    for c in r.chunks:
        assert c.id == xxhash.xxh3_128_hexdigest(data[c.offset : c.offset + c.length])
    assert r.sha256 == hashlib.sha256(data).hexdigest()
    try:
        h = read_header(io.BytesIO(data), len(data))
    except HeaderError:
        assert r.kind == "other" and r.warning
        assert [c.length for c in r.chunks] == [CHUNK_SIZE] * (len(data) // CHUNK_SIZE) + (
            [len(data) % CHUNK_SIZE] if len(data) % CHUNK_SIZE else []
        )
        return
    assert not r.warning
    assert (r.kind, r.base) == detect_kind([t.name for t in h.tensors])
    assert r.chunks[0] == ChunkRef(0, min(h.data_start, CHUNK_SIZE), r.chunks[0].id)  # the header is cut alone
    starts = {c.offset for c in r.chunks}
    assert h.data_start == len(data) or h.data_start in starts


@FAST
@given(hostile_headers)
def test_chunking_hostile_safetensors_tiles_the_file(data: bytes) -> None:
    check_chunks(data)


@FEW
@given(valid_docs(), st.sampled_from([0, 1, CHUNK_SIZE - 3, CHUNK_SIZE + 5]), st.sampled_from([0, 9, CHUNK_SIZE + 1]))
def test_chunking_tiles_files_with_huge_padding_or_tail(case: tuple[dict, int], pad: int, tail: int) -> None:
    """Gaps between tensors and junk after them may each be over 4 MiB; still one tiling."""
    doc, data_len = case
    shift = 0
    for k, e in doc.items():
        if k != "__metadata__":
            shift += pad
            e["data_offsets"] = [e["data_offsets"][0] + shift, e["data_offsets"][1] + shift]
    check_chunks(_file(doc, data_len + shift, tail))


@pytest.mark.parametrize("valid", [True, False])
@pytest.mark.parametrize("meta_len", [CHUNK_SIZE - 20, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 7])
def test_chunking_tiles_files_with_a_header_over_4_mib(meta_len: int, valid: bool) -> None:
    doc = {"__metadata__": {"k": "v" * meta_len}, "t": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}
    data = _file(doc, 3 if valid else 0)  # invalid: the tensor runs past the end
    check_chunks(data)


def test_a_safetensors_header_that_crashed_the_parser_now_falls_back_to_other() -> None:
    """Each of these raised TypeError, OverflowError, ValueError or RecursionError out of chunk_file."""
    for blob in [
        b'{"a":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}',
        b'{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}',
        b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,' + b"9" * 5000 + b"]}}",
        b"[" * 100_000,
    ]:
        data = struct.pack("<Q", len(blob)) + blob + b"\0" * 8
        r = chunk_file(io.BytesIO(data), len(data), name="m.safetensors")
        assert r.kind == "other" and "not a valid safetensors" in r.warning
        assert tiles(len(data), r.chunks)
