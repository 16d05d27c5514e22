"""The mount's page-cache push: a loaded file reaches the reader without requests, and nothing is lost on the way.

Real cluster, real ``sdcache mount`` daemon, real kernel page cache: every
check reads through the kernel, with ``read`` and with ``mmap``.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdcache.client.importer import import_file
from sdcache.client.metaclient import MetaClient
from sdcache.cluster import LocalCluster
from sdcache.synth import write_sd_checkpoint
from sdcache.units import parse_size

from .test_fuse import Mount, _gone, _rss_kib, _sha, _wait, mounted
from .test_metrics import parse, value

pytestmark = [pytest.mark.fuse]

PUSHED = "sdcache_fuse_page_cache_pushed_bytes_total"
READ_BYTES = "sdcache_fuse_read_size_bytes_sum"


def _import(meta: str, src: Path, dest: str) -> None:
    client = MetaClient(meta)
    try:
        import_file(client, str(src), dest)
    finally:
        client.close()


def _metrics(m: Mount) -> dict:
    """The mount's own metrics, from the address it logged (it listens on a free loopback port)."""
    import urllib.request

    found = re.search(r"metrics on http://(\S+)/metrics", m.log_text())
    assert found, m.log_text()
    with urllib.request.urlopen(f"http://{found.group(1)}/metrics", timeout=30) as resp:
        return parse(resp.read().decode())


def _digest(path: Path, *, use_mmap: bool) -> str:
    with open(path, "rb") as f:
        if not use_mmap:
            return hashlib.file_digest(f, "sha256").hexdigest()
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            return hashlib.sha256(mm).hexdigest()


def _drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def models(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Two ~24 MB checkpoints in the cluster, /push/a and /push/b: source path and sha256."""
    root = tmp_path_factory.mktemp("push-models")
    out = {}
    for name, seed in (("a", 41), ("b", 42)):
        src = root / f"{name}.safetensors"
        write_sd_checkpoint(str(src), 0.01, unet_seed=seed, shared_seed=seed + 100)
        _import(cluster.meta_addr, src, f"/push/{name}.safetensors")
        out[name] = (src, _sha(src))
    return out


@pytest.fixture(scope="module")
def mnt(cluster: LocalCluster, models: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(cluster.meta_addr, tmp_path_factory.mktemp("push") / "mnt", "--metrics-listen", "127.0.0.1:0") as m:
        yield m


def test_a_loader_gets_the_file_pushed_and_a_header_reader_gets_nothing_pushed(mnt, models):
    from safetensors import safe_open

    a, b = mnt.path / "push" / "a.safetensors", mnt.path / "push" / "b.safetensors"
    before = _metrics(mnt)
    with open(b, "rb") as f:  # what a model listing reads: the header, by read() and by mmap
        (n,) = __import__("struct").unpack("<Q", f.read(8))
        assert f.read(n).startswith(b"{")
    with safe_open(str(b), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    listed = _metrics(mnt)
    assert value(listed, PUSHED) == value(before, PUSHED)  # a listing costs the page cache nothing

    _drop_page_cache(a)
    size = os.path.getsize(a)
    assert _digest(a, use_mmap=False) == models["a"][1]
    after = _metrics(mnt)
    pushed = value(after, PUSHED) - value(listed, PUSHED)
    requested = value(after, READ_BYTES) - value(listed, READ_BYTES)
    assert pushed + requested >= size
    # How much the push gets ahead of the reader depends on how the two threads are scheduled (on a busy
    # 2-core host the reader can take most of it by requests): that the push ran is what is certain.
    assert pushed > 0, f"nothing pushed for a whole-file reader; {requested} bytes by requests"
    assert value(after, "sdcache_fuse_page_cache_pushed_open_bytes") == 0  # closed: no longer counted
    assert value(after, "sdcache_fuse_page_cache_push_limit_bytes") > 0


def test_pushed_pages_are_right_for_every_reader_and_every_alignment(mnt, models):
    a = mnt.path / "push" / "a.safetensors"
    src, digest = models["a"]
    for use_mmap in (True, False):
        _drop_page_cache(a)
        assert _digest(a, use_mmap=use_mmap) == digest
    # Pages the push assembled from two chunks (chunk edges fall inside pages) and the tail page.
    _drop_page_cache(a)
    _digest(a, use_mmap=True)
    size = os.path.getsize(a)
    with open(src, "rb") as ref, open(a, "rb", buffering=0) as f:
        for off in (0, 4095, 4096, size // 3 - 1, size // 2 + 4093, size - 4097, size - 1):
            assert os.pread(f.fileno(), 8193, off) == os.pread(ref.fileno(), 8193, off), off


def test_after_a_reimport_the_page_cache_never_holds_the_old_version(cluster, mnt, tmp_path):
    v1, v2 = tmp_path / "v1.safetensors", tmp_path / "v2.safetensors"
    write_sd_checkpoint(str(v1), 0.01, unet_seed=51, shared_seed=61)
    write_sd_checkpoint(str(v2), 0.01, unet_seed=52, shared_seed=62)
    assert v1.stat().st_size == v2.stat().st_size  # same size, same header: only the pages tell them apart
    d1, d2 = _sha(v1), _sha(v2)
    _import(cluster.meta_addr, v1, "/push/ver.safetensors")
    path = mnt.path / "push" / "ver.safetensors"
    _wait(lambda: path.exists() and os.getxattr(path, "user.sdcache.sha256").decode() == d1, "the first version")
    assert _digest(path, use_mmap=True) == d1  # v1 now fills the page cache of its inode
    with open(path, "rb") as old, mmap.mmap(old.fileno(), 0, prot=mmap.PROT_READ) as old_map:
        assert hashlib.sha256(old_map).hexdigest() == d1
        old_head = old.read(8 << 20)  # the reader is loading v1: its push is under way
        _import(cluster.meta_addr, v2, "/push/ver.safetensors")
        _wait(lambda: os.getxattr(path, "user.sdcache.sha256").decode() == d2, "the new version after the timeout")
        assert _digest(path, use_mmap=True) == d2
        assert _digest(path, use_mmap=False) == d2
        assert hashlib.sha256(old_head + old.read()).hexdigest() == d1  # the open file kept its version
        assert hashlib.sha256(old_map).hexdigest() == d1
    _drop_page_cache(path)
    assert _digest(path, use_mmap=True) == d2


def test_eight_readers_of_eight_files_stay_within_the_memory_and_push_limits(cluster, tmp_path):
    files = []
    for i in range(8):
        src = tmp_path / f"m{i}.safetensors"
        write_sd_checkpoint(str(src), 0.006, unet_seed=300 + i, shared_seed=400 + i)  # no shared chunks
        _import(cluster.meta_addr, src, f"/many/m{i}.safetensors")
        files.append((f"m{i}.safetensors", _sha(src), src.stat().st_size))
    memory_mib, push_mib = 32, 40
    total_mib = sum(size for _, _, size in files) / 2**20
    assert total_mib > 2 * push_mib
    with mounted(cluster.meta_addr, tmp_path / "mnt", "--max-memory", f"{memory_mib}MiB",
                 "--push-memory", f"{push_mib}MiB") as m:
        assert sorted(os.listdir(m.path / "many")) == sorted(name for name, _, _ in files)
        baseline = _rss_kib(m.pid, "VmRSS")
        results: dict[str, str] = {}

        def read(name: str, use_mmap: bool) -> None:
            results[name] = _digest(m.path / "many" / name, use_mmap=use_mmap)

        threads = [threading.Thread(target=read, args=(name, i % 2 == 0)) for i, (name, _, _) in enumerate(files)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {name: digest for name, digest, _ in files}
        grew_mib = (_rss_kib(m.pid, "VmHWM") - baseline) / 1024
        # chunk buffers, plus one 4 MiB buffer per push thread, plus request buffers and the interpreter
        assert grew_mib < memory_mib + 2 * 4 + 24, f"daemon grew {grew_mib:.0f} MiB reading {total_mib:.0f} MiB"
    size = r"([\d.]+ \w+)"
    found = re.search(rf"page cache: {size} pushed for (\d+) file loads, at most {size} of open files at once, "
                      rf"limit {size}\)", m.log_text())
    assert found, m.log_text()
    pushed, loads, peak, limit = parse_size(found[1]), int(found[2]), parse_size(found[3]), parse_size(found[4])
    assert limit == push_mib << 20 and 0 < peak <= limit
    assert loads == 8 and pushed > 0


def test_sigterm_while_a_push_is_under_way_unmounts_cleanly(cluster, models, tmp_path):
    src, digest = models["b"]
    with mounted(cluster.meta_addr, tmp_path / "mnt", "--push-threads", "1") as m:
        path = m.path / "push" / "b.safetensors"
        f = open(path, "rb", buffering=0)
        try:
            assert f.read(8 << 20) == src.read_bytes()[: 8 << 20]  # a loader: the push starts
            os.kill(m.pid, signal.SIGTERM)
            _wait(lambda: _gone(m.pid) and not os.path.ismount(m.path), "SIGTERM to unmount and stop the daemon")
        finally:
            try:
                f.close()
            except OSError:
                pass
    assert "unmounted" in m.log_text() and "Traceback" not in m.log_text()
