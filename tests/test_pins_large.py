"""Pins of more chunk ids than one 4 MiB gRPC message holds reach every node.

A real cluster (metadata service and two nodes as subprocesses). The pinned
tree holds 280,000 distinct chunks: 4.48 MB of ids, over the 4 MiB a node's
channel receives in one message, so the list only arrives paged.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import urllib.parse
import urllib.request

from sdcache import auth
from sdcache._proto import meta_pb2 as pb
from sdcache.chunking import ChunkRef
from sdcache.client.metaclient import MetaClient
from sdcache.hashing import chunk_id
from sdcache.manifest import Manifest

from .conftest import wait_for

FILES = 4
CHUNKS_PER_FILE = 70_000
CHUNK_BYTES = 16  # tiny real chunks: the nodes can read a sample of them through
PAGE_IDS = 65_536  # the service's default and largest PinnedChunks page
DEADLINE = 60.0


def _http(address: str, path: str) -> bytes:
    req = urllib.request.Request(f"http://{address}{path}")
    token = auth.resolve_token()
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def _write_files(root: str) -> tuple[list[Manifest], dict[str, tuple[str, str, int]]]:
    """Source files of distinct 16-byte chunks, their manifests, and where each
    chunk lies: id -> (cache path, source path, offset)."""
    salt = os.urandom(8)
    manifests: list[Manifest] = []
    where: dict[str, tuple[str, str, int]] = {}
    for f in range(FILES):
        data = b"".join(salt + f.to_bytes(2, "big") + i.to_bytes(6, "big") for i in range(CHUNKS_PER_FILE))
        src = os.path.join(root, f"model{f}.bin")
        with open(src, "wb") as out:
            out.write(data)
        path = f"/pins-large/model{f}.bin"
        chunks = []
        for i in range(CHUNKS_PER_FILE):
            off = i * CHUNK_BYTES
            cid = chunk_id(data[off : off + CHUNK_BYTES])
            chunks.append(ChunkRef(off, CHUNK_BYTES, cid))
            where[cid] = (path, src, off)
        st = os.stat(src)
        manifests.append(Manifest(path=path, size=len(data), mtime=st.st_mtime, source=src,
                                  version_tag=f"{st.st_mtime}:{st.st_size}",
                                  sha256=hashlib.sha256(data).hexdigest(), chunks=chunks))
    return manifests, where


def _page(client: MetaClient, token: str = "", size: int = 0) -> pb.PinnedChunksResponse:
    return client._call("PinnedChunks", pb.PinnedChunksRequest(page_token=token, page_size=size))


def _ids(blob: bytes) -> list[str]:
    assert len(blob) % 16 == 0
    return [blob[i : i + 16].hex() for i in range(0, len(blob), 16)]


def test_pins_larger_than_one_message_reach_every_node(make_cluster, tmp_path) -> None:
    cluster = make_cluster(nodes=2, capacity=64 << 20)
    client = MetaClient(cluster.meta_addr, timeout=60)
    try:
        manifests, where = _write_files(str(tmp_path))
        assert len(where) == FILES * CHUNKS_PER_FILE  # all distinct
        assert 16 * len(where) > 4 << 20  # more than gRPC's default receive limit
        for m in manifests:
            client.commit(m)
        assert client.pin("/pins-large", recursive=True) == FILES

        # Paging through the RPC: every id exactly once, no page over the cap.
        first = _page(client)
        generation, token, pages = first.generation, first.next_page_token, [first]
        while token:
            pages.append(_page(client, token))
            assert pages[-1].generation == generation
            token = pages[-1].next_page_token
        assert [len(p.ids) // 16 for p in pages] == [PAGE_IDS] * 4 + [len(where) - 4 * PAGE_IDS]
        listed = [i for p in pages for i in _ids(p.ids)]
        assert len(listed) == len(set(listed)) == len(where)
        assert set(listed) == set(where)
        assert len(_page(client, size=10 * PAGE_IDS).ids) == 16 * PAGE_IDS  # asking for more is capped
        small = _page(client, size=1000)
        assert _ids(small.ids) == listed[:1000]
        assert _ids(_page(client, small.next_page_token, 1000).ids) == listed[1000:2000]

        # Every node holds the whole list: a sample from every page (page edges
        # included), once cached, counts as pinned (/stats counts only pinned
        # chunks the pool holds), and no node ever failed to load the list.
        edges = {0, len(listed) - 1} | {k * PAGE_IDS + d for k in range(1, 5) for d in (-1, 0)}
        sample = [listed[i] for i in sorted(edges | set(random.Random(7).sample(range(len(listed)), 14)))]
        for child in cluster.node_children:
            for cid in sample:
                path = where[cid][0]
                query = urllib.parse.urlencode({"path": path})
                assert chunk_id(_http(child.address, f"/chunks/{cid}?{query}")) == cid
            wait_for(lambda address=child.address: json.loads(_http(address, "/stats"))["pinned_ids"] == len(where),
                     f"{child.name} to hold every pinned id", timeout=DEADLINE, step=0.05)
            wait_for(lambda address=child.address: json.loads(_http(address, "/stats"))["pinned"] == len(sample),
                     f"{child.name} to count the sampled chunks as pinned", timeout=DEADLINE, step=0.05)
            with open(child.log_path, encoding="utf-8", errors="replace") as log:
                assert "cannot load pinned chunks" not in log.read()

        # A token from before the pins changed starts over at the new first page.
        assert client.unpin(manifests[-1].path) == 1
        restarted = _page(client, pages[2].next_page_token)
        assert restarted.generation > generation
        assert _ids(restarted.ids) == sorted(c.id for m in manifests[:-1] for c in m.chunks)[:PAGE_IDS]
    finally:
        client.close()
