"""The FUSE mount: real cluster, real ``sdcache mount`` daemon, real kernel mount, real programs."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdcache.client.metaclient import MetaClient
from sdcache.cluster import LocalCluster
from sdcache.manifest import Manifest
from sdcache.synth import write_sd_checkpoint

from ._requirements import import_required
from .conftest import corrupt_everywhere, run_cli


# The `fuse` marker requires FUSE (tests/_requirements.py): each test skips where mounts
# cannot work, or fails where this machine must have them (CI, or root with /dev/fuse).
pytestmark = [pytest.mark.fuse]

SCALE = 0.05  # ~120 MB, SD-shaped
DEADLINE = 20.0


@dataclass
class Mount:
    path: Path
    pid: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _sha(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _gone(pid: int) -> bool:
    """The process exited, all its threads too (a zombie leader can outlive its threads' exit)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().rpartition(")")[2].split()[0] == "Z"
        return zombie and os.listdir(f"/proc/{pid}/task") == [str(pid)]
    except OSError:
        return True


def _wait(cond: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _is_stale(path: Path) -> bool:
    """A mount whose daemon is gone (getxattr always reaches the daemon; stat may be cached)."""
    try:
        os.stat(path)
        os.getxattr(path, "user.sdcache.probe")
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _mount(meta: str, mp: Path, log: Path, *extra: str) -> Mount:
    proc = run_cli("mount", str(mp), "--attr-timeout", "0.5", "--log", str(log), *extra, meta=meta)
    assert proc.returncode == 0, proc.stderr
    assert os.path.ismount(mp)
    return Mount(mp, int(re.search(r"pid (\d+)", proc.stdout).group(1)), log)  # type: ignore[union-attr]


def _cleanup(m: Mount) -> None:
    if os.path.ismount(m.path) or _is_stale(m.path):
        run_cli("umount", "--lazy", str(m.path))
    if not _gone(m.pid):
        os.kill(m.pid, signal.SIGTERM)
        _wait(lambda: _gone(m.pid), "the mount daemon to exit")


@contextmanager
def mounted(meta: str, mp: Path, *extra: str) -> Iterator[Mount]:
    mp.mkdir(exist_ok=True)
    m = _mount(meta, mp, mp.parent / f"{mp.name}.log", *extra)
    try:
        yield m
    finally:
        _cleanup(m)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    path = str(tmp_path_factory.mktemp("fuse-models") / "sd15-fuse.safetensors")
    write_sd_checkpoint(path, SCALE, unet_seed=11)
    return path, _sha(path)


@pytest.fixture(scope="module")
def mnt(cluster: LocalCluster, checkpoint: tuple[str, str],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """The session cluster, mounted once for this module, holding the checkpoint at /fuse/sd15.safetensors."""
    src, _ = checkpoint
    run_cli("import", src, "/fuse/sd15.safetensors", meta=cluster.meta_addr, check=True)
    with mounted(cluster.meta_addr, tmp_path_factory.mktemp("fuse") / "mnt") as m:
        yield m


# -- reading -----------------------------------------------------------------------------
def test_namespace_is_listed_with_sizes_and_read_only_modes(mnt, checkpoint):
    src, _ = checkpoint
    assert "fuse" in os.listdir(mnt.path)
    st = os.stat(mnt.path / "fuse" / "sd15.safetensors")
    assert st.st_size == os.path.getsize(src)
    assert oct(st.st_mode & 0o777) == "0o444" and not os.access(mnt.path / "fuse", os.W_OK)
    out = subprocess.run(["ls", "-l", str(mnt.path / "fuse")], capture_output=True, text=True, check=True).stdout
    assert "sd15.safetensors" in out and str(st.st_size) in out


def test_open_read_is_byte_exact_sequential_and_random(mnt, checkpoint):
    src, digest = checkpoint
    path = mnt.path / "fuse" / "sd15.safetensors"
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(3 << 20):  # 3 MiB reads straddle chunk boundaries
            h.update(data)
    assert h.hexdigest() == digest
    size = os.path.getsize(src)
    with open(src, "rb") as ref, open(path, "rb", buffering=0) as f:
        for off, n in ((0, 8), (4_194_300, 10), (size // 2, 5 << 20), (size - 7, 100), (size + 5, 10), (123_457, 1)):
            assert os.pread(f.fileno(), n, off) == os.pread(ref.fileno(), n, off), (off, n)


def test_mmap_is_byte_exact(mnt, checkpoint):
    _, digest = checkpoint
    with open(mnt.path / "fuse" / "sd15.safetensors", "rb") as f, \
            mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert hashlib.sha256(mm).hexdigest() == digest


def test_cp_copies_byte_exact(mnt, checkpoint, tmp_path):
    _, digest = checkpoint
    subprocess.run(["cp", str(mnt.path / "fuse" / "sd15.safetensors"), str(tmp_path / "copy")], check=True)
    assert _sha(tmp_path / "copy") == digest


def test_safetensors_safe_open_loads_every_tensor_equal(mnt, checkpoint):
    torch = import_required("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

    src, _ = checkpoint
    want = load_file(src)
    with safe_open(str(mnt.path / "fuse" / "sd15.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(want)
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), want[k]), k


def test_xattrs_give_hash_kind_source_and_cached_fraction(mnt, checkpoint):
    src, digest = checkpoint
    path = mnt.path / "fuse" / "sd15.safetensors"
    assert set(os.listxattr(path)) >= {"user.sdcache.sha256", "user.sdcache.kind", "user.sdcache.source",
                                       "user.sdcache.cached"}
    assert os.getxattr(path, "user.sdcache.sha256").decode() == digest
    assert os.getxattr(path, "user.sdcache.kind") == b"checkpoint"
    assert os.getxattr(path, "user.sdcache.source").decode() == os.path.abspath(src)
    _sha(path)  # reading it pulls every chunk into the pool
    assert float(os.getxattr(path, "user.sdcache.cached")) == 1.0
    with pytest.raises(OSError) as exc:
        os.getxattr(path, "user.sdcache.nope")
    assert exc.value.errno == errno.ENODATA


def test_writes_are_erofs_and_missing_names_enoent(mnt):
    f = mnt.path / "fuse" / "sd15.safetensors"
    attempts = [
        lambda: open(f, "r+b"),
        lambda: open(mnt.path / "fuse" / "new.safetensors", "wb"),
        lambda: os.unlink(f),
        lambda: os.rename(f, mnt.path / "fuse" / "moved"),
        lambda: os.mkdir(mnt.path / "newdir"),
        lambda: os.chmod(f, 0o644),
        lambda: os.truncate(f, 0),
        lambda: os.setxattr(f, "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EROFS
    for missing in (mnt.path / "nope.safetensors", mnt.path / "fuse" / "nope", mnt.path / "no" / "such" / "dir"):
        with pytest.raises(FileNotFoundError):
            os.stat(missing)
        with pytest.raises(FileNotFoundError):
            open(missing, "rb")


def test_statfs_reports_pool_capacity_and_use(mnt, cluster):
    st = os.statvfs(mnt.path)
    stats = MetaClient(cluster.meta_addr).stats()
    assert st.f_blocks * st.f_frsize == stats.capacity // 4096 * 4096
    assert st.f_bfree <= st.f_blocks


def test_reimported_path_shows_new_version_to_new_opens_only(mnt, cluster, tmp_path):
    v1, v2 = tmp_path / "v1.safetensors", tmp_path / "v2.safetensors"
    write_sd_checkpoint(str(v1), 0.002, unet_seed=21)
    write_sd_checkpoint(str(v2), 0.003, unet_seed=22)
    run_cli("import", str(v1), "/fuse/ver.safetensors", meta=cluster.meta_addr, check=True)
    path = mnt.path / "fuse" / "ver.safetensors"
    _wait(lambda: path.exists() and os.path.getsize(path) == v1.stat().st_size, "the first version")
    with open(path, "rb") as old:
        head = old.read(1000)
        run_cli("import", str(v2), "/fuse/ver.safetensors", meta=cluster.meta_addr, check=True)
        _wait(lambda: os.path.getsize(path) == v2.stat().st_size, "the new size after the attribute timeout")
        assert _sha(path) == _sha(v2)
        assert hashlib.sha256(head + old.read()).hexdigest() == _sha(v1)  # the open file kept its version
        assert os.fstat(old.fileno()).st_size == v1.stat().st_size


def test_path_reimported_before_its_first_open_reads_one_whole_version(cluster, tmp_path):
    v1, v2 = tmp_path / "v1.safetensors", tmp_path / "v2.safetensors"
    write_sd_checkpoint(str(v1), 0.002, unet_seed=31)
    write_sd_checkpoint(str(v2), 0.003, unet_seed=32)
    run_cli("import", str(v1), "/late/m.safetensors", meta=cluster.meta_addr, check=True)
    with mounted(cluster.meta_addr, tmp_path / "mnt", "--attr-timeout", "60") as m:
        path = m.path / "late" / "m.safetensors"
        assert os.path.getsize(path) == v1.stat().st_size  # the kernel now holds this name for 60 s
        run_cli("import", str(v2), "/late/m.safetensors", meta=cluster.meta_addr, check=True)
        with open(path, "rb") as f:  # first open of the inode the kernel still holds
            data = f.read()
            assert os.fstat(f.fileno()).st_size == len(data)
        assert hashlib.sha256(data).hexdigest() == _sha(v2)  # all of the new version, not a mix


def test_large_directory_lists_every_entry(mnt, cluster):
    meta = MetaClient(cluster.meta_addr)
    empty = hashlib.sha256(b"").hexdigest()
    n = 1500
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: meta.commit(Manifest(f"/fuse-many/lora-{i:05d}.safetensors", 0, 0.0, "", "",
                                                     empty, [], kind="lora")), range(n)))
    t0 = time.monotonic()
    out = subprocess.run(["ls", "-l", str(mnt.path / "fuse-many")], capture_output=True, text=True, check=True)
    elapsed = time.monotonic() - t0
    names = [line.split()[-1] for line in out.stdout.splitlines()[1:]]
    assert names == [f"lora-{i:05d}.safetensors" for i in range(n)]
    assert elapsed < 5.0, f"ls -l of {n} files took {elapsed:.2f}s"


def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def test_concurrent_readers_of_many_files_stay_under_the_memory_limit(cluster, tmp_path):
    import threading

    files = []
    for i in range(4):
        src = tmp_path / f"m{i}.safetensors"
        write_sd_checkpoint(str(src), 0.01, unet_seed=100 + i, shared_seed=200 + 2 * i)  # no shared chunks
        run_cli("import", str(src), f"/mem/m{i}.safetensors", meta=cluster.meta_addr, check=True)
        files.append((f"m{i}.safetensors", _sha(src), src.stat().st_size))
    limit_mib = 32
    with mounted(cluster.meta_addr, tmp_path / "mnt", "--max-memory", f"{limit_mib}MiB") as m:
        assert sorted(os.listdir(m.path / "mem")) == [name for name, _, _ in files]
        baseline = _rss_kib(m.pid, "VmRSS")
        results: dict[str, str] = {}

        def read(name: str, use_mmap: bool) -> None:
            with open(m.path / "mem" / name, "rb") as f:
                if use_mmap:
                    with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
                        results[name] = hashlib.sha256(mm).hexdigest()
                else:
                    results[name] = hashlib.file_digest(f, "sha256").hexdigest()

        threads = [threading.Thread(target=read, args=(name, i % 2 == 0)) for i, (name, _, _) in enumerate(files)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {name: digest for name, digest, _ in files}
        total_mib = sum(size for _, _, size in files) / 2**20
        grew_mib = (_rss_kib(m.pid, "VmHWM") - baseline) / 1024
        assert total_mib > limit_mib
        assert grew_mib < limit_mib + 24, f"daemon grew {grew_mib:.0f} MiB reading {total_mib:.0f} MiB"


# -- failures and lifecycle ------------------------------------------------------------------
def test_node_killed_during_read_still_yields_correct_bytes(own_cluster, checkpoint, tmp_path, monkeypatch):
    src, digest = checkpoint
    monkeypatch.setenv("SDCACHE_SHORT_CIRCUIT", "0")  # chunks over HTTP, so the dead node is really missed
    run_cli("import", src, "/m/a.safetensors", "--warm", meta=own_cluster.meta_addr, check=True)
    with mounted(own_cluster.meta_addr, tmp_path / "mnt") as m:
        h = hashlib.sha256()
        with open(m.path / "m" / "a.safetensors", "rb", buffering=0) as f:
            h.update(f.read(20 << 20))
            own_cluster.node_children[1].signal(signal.SIGKILL)
            own_cluster.node_children[1].proc.wait()
            while data := f.read(1 << 20):
                h.update(data)
        assert h.hexdigest() == digest
        # Again by mmap, the page cache dropped: every chunk pushed or answered with the node gone.
        with open(m.path / "m" / "a.safetensors", "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
                assert hashlib.sha256(mm).hexdigest() == digest
    pushed = re.search(r"page cache: ([\d.]+) (\w+) pushed for (\d+) file loads", m.log_text())
    assert pushed and float(pushed[1]) > 0 and int(pushed[3]) == 2, m.log_text()  # both reads were pushed


def test_chunks_corrupted_in_every_pool_on_this_host_are_never_served(own_cluster, checkpoint, tmp_path):
    """The mount reads same-host pools directly (no node in between): a bad copy there is caught by its hash."""
    src, digest = checkpoint
    meta = own_cluster.meta_addr
    run_cli("import", src, "/m/c.safetensors", "--warm", meta=meta, check=True)
    m = MetaClient(meta).manifest("/m/c.safetensors")
    assert sum(corrupt_everywhere(own_cluster, ref.id) for ref in m.chunks[::3]) >= len(m.chunks) // 3
    for extra in (["--push-memory", "0"], []):  # read requests only; then pushes into the page cache as well
        with mounted(meta, tmp_path / "mnt", *extra) as mt:
            path = mt.path / "m" / "c.safetensors"
            with open(path, "rb", buffering=0) as f:
                assert hashlib.sha256(f.read()).hexdigest() == digest
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
                    assert hashlib.sha256(mm).hexdigest() == digest


def test_unreachable_cluster_answers_eio_within_the_timeout(own_cluster, tmp_path):
    small = tmp_path / "small.safetensors"
    write_sd_checkpoint(str(small), 0.002, unet_seed=5)
    run_cli("import", str(small), "/u/a.safetensors", meta=own_cluster.meta_addr, check=True)
    run_cli("import", str(small), "/u/b.safetensors", meta=own_cluster.meta_addr, check=True)
    with mounted(own_cluster.meta_addr, tmp_path / "mnt", "--timeout", "2") as m:
        assert sorted(os.listdir(m.path / "u")) == ["a.safetensors", "b.safetensors"]
        own_cluster.stop()
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            open(m.path / "u" / "a.safetensors", "rb")  # its version must come from the metadata service
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:
            os.stat(m.path / "u" / "never-seen.safetensors")
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - t0 < 10
        _wait(lambda: "unreachable" in m.log_text(), "a log line about the unreachable cluster", 5)


def test_sigterm_unmounts_and_a_crashed_daemon_leaves_no_hung_mount(cluster, checkpoint, tmp_path):
    src, digest = checkpoint
    run_cli("import", src, "/fuse/life.safetensors", meta=cluster.meta_addr, check=True)
    mp = tmp_path / "mnt"
    with mounted(cluster.meta_addr, mp) as m:
        os.kill(m.pid, signal.SIGTERM)
        _wait(lambda: _gone(m.pid) and not os.path.ismount(mp), "SIGTERM to unmount and stop the daemon")
    crashed = _mount(cluster.meta_addr, mp, tmp_path / "crashed.log")
    try:
        os.kill(crashed.pid, signal.SIGKILL)
        _wait(lambda: _gone(crashed.pid), "the killed daemon to go")
        _wait(lambda: _is_stale(mp), "the kernel mount to outlive its daemon, stale")
        m = _mount(cluster.meta_addr, mp, tmp_path / "again.log")  # the next mount clears it
        try:
            assert _sha(mp / "fuse" / "life.safetensors") == digest
            proc = run_cli("umount", str(mp))
            assert proc.returncode == 0, proc.stderr
            assert not os.path.ismount(mp) and _gone(m.pid)
        finally:
            _cleanup(m)
    finally:
        _cleanup(crashed)
    assert not _is_stale(mp) and os.listdir(mp) == []


def test_mount_errors_are_one_clear_line(tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = run_cli("mount", str(mp), "--timeout", "1", meta="127.0.0.1:1")
    assert proc.returncode != 0 and "cannot reach the metadata service" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not os.path.ismount(mp)
    proc = run_cli("umount", str(mp))
    assert proc.returncode != 0 and "not an sdcache mount" in proc.stderr
    proc = run_cli("mount", str(tmp_path / "missing"))
    assert proc.returncode != 0 and "not a directory" in proc.stderr
