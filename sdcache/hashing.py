"""Content hashes: xxh3-128 names chunks, sha256 names whole files."""

from __future__ import annotations

import hashlib

import xxhash

CHUNK_ID_HEX_LEN = 32


def chunk_id(data: bytes | bytearray | memoryview) -> str:
    """Lowercase hex xxh3-128 of *data*: the name of a chunk."""
    return xxhash.xxh3_128_hexdigest(data)


def verify(data: bytes | bytearray | memoryview, expected: str) -> bool:
    return xxhash.xxh3_128_hexdigest(data) == expected


def is_chunk_id(text: str) -> bool:
    return len(text) == CHUNK_ID_HEX_LEN and all(c in "0123456789abcdef" for c in text)


def sha256() -> "hashlib._Hash":
    return hashlib.sha256()
