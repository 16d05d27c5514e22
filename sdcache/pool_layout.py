"""Where a chunk lives inside a node's shared-memory pool directory.

Shared by the node (which writes it) and same-host clients (which read it
directly, the short-circuit path)::

    <pool_dir>/<id[:2]>/<id>     one file per chunk, exactly its bytes
    <pool_dir>/.tmp/             partial writes, renamed into place when whole
"""

from __future__ import annotations

import os

TMP_DIR = ".tmp"


def chunk_path(pool_dir: str, chunk_id: str) -> str:
    return os.path.join(pool_dir, chunk_id[:2], chunk_id)
