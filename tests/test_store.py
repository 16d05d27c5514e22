"""Contract suite for :class:`sdcache.store.MetaStore` implementations.

Every test runs against each implementation in ``STORES``: the embedded
SQLite store and PostgreSQL, on a real server the tests start themselves
(``tests/_postgres.py``; a fresh database per test). A new backend joins by
adding a factory there.
"""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sdcache import errors
from sdcache.chunking import CHUNK_SIZE, ChunkRef
from sdcache.hashing import chunk_id
from sdcache.manifest import Manifest, pack_chunks
from sdcache.store import MAX_PAGE_SIZE, MetaStore, NodeRecord, SqliteStore, StoreStats
from sdcache.store.base import TokenRecord
from sdcache.store.sqlite import SCHEMA_VERSION

from ._postgres import PostgresServer, pg_url, postgres_server  # noqa: F401 - fixtures

StoreFactory = Callable[[], MetaStore]


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    return lambda: SqliteStore(tmp_path / "meta.db")


def _postgres(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    from sdcache.store.postgres import PostgresStore

    url = request.getfixturevalue("pg_url")
    return lambda: PostgresStore(url)


STORES = {"sqlite": _sqlite, "postgres": _postgres}


@pytest.fixture(params=sorted(STORES))
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """A factory opening the same store again each call (for reopen tests)."""
    opened: list[MetaStore] = []
    factory = STORES[request.param](request, tmp_path)

    def open_() -> MetaStore:
        opened.append(factory())
        return opened[-1]

    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store: StoreFactory) -> MetaStore:
    return open_store()


def manifest(path: str, lengths: tuple[int, ...] = (100,), *, seed: str = "", ids: list[str] | None = None) -> Manifest:
    """A valid manifest whose chunk ids derive from *seed* (default: the path)."""
    chunks, pos = [], 0
    for i, n in enumerate(lengths):
        cid = ids[i] if ids else chunk_id(f"{seed or path}#{i}".encode())
        chunks.append(ChunkRef(pos, n, cid))
        pos += n
    return Manifest(
        path=path,
        size=pos,
        mtime=1700000000.5,
        source=f"file:///src{path}",
        version_tag=f"1700000000.5:{pos}",
        sha256="ab" * 32,
        chunks=chunks,
        kind="lora",
        base="sd1",
        metadata={"ss_network_dim": "16"},
    )


# -- namespace ---------------------------------------------------------------


def test_commit_then_manifest_round_trips_every_field(store: MetaStore) -> None:
    m = manifest("/models/a.safetensors", (CHUNK_SIZE, 10))
    gen = store.commit(m)
    got = store.get_manifest("models/a.safetensors")
    assert got.generation == gen == m.generation > 0
    for field in ("path", "size", "mtime", "source", "version_tag", "sha256", "chunks", "kind", "base", "metadata"):
        assert getattr(got, field) == getattr(m, field), field
    entry = store.stat("sdcache://models/a.safetensors")
    assert (entry.is_dir, entry.size, entry.kind) == (False, CHUNK_SIZE + 10, "lora")
    assert (entry.chunk_count, entry.generation) == (2, gen)


def test_generations_increase_and_recommit_replaces(store: MetaStore) -> None:
    g1 = store.commit(manifest("/a"))
    g2 = store.commit(manifest("/b"))
    g3 = store.commit(manifest("/a", (5, 7), seed="v2"))
    assert g1 < g2 < g3
    assert store.stat("/a").size == 12
    assert store.get_manifest("/a").chunks[1].id == chunk_id(b"v2#1")
    assert [e.path for e in store.list_dir("/")[0]] == ["/a", "/b"]


def test_directories_are_implicit(store: MetaStore) -> None:
    store.commit(manifest("/m/sd15/x.safetensors", (10,)))
    store.commit(manifest("/m/sd15/y.safetensors", (20,)))
    store.commit(manifest("/m/z.bin", (5,)))
    assert store.stat("/m").is_dir and store.stat("/m/sd15").is_dir
    assert store.stat("/m").size == 35 and store.stat("/").size == 35
    entries, token = store.list_dir("/m")
    assert [(e.path, e.is_dir) for e in entries] == [("/m/sd15", True), ("/m/z.bin", False)] and token == ""
    store.delete("/m/sd15/x.safetensors")
    assert store.stat("/m/sd15").size == 20
    store.delete("/m/sd15/y.safetensors")
    with pytest.raises(errors.NotFound):
        store.stat("/m/sd15")
    assert [e.path for e in store.list_dir("/m")[0]] == ["/m/z.bin"]
    store.delete("/m/z.bin")
    with pytest.raises(errors.NotFound):
        store.stat("/m")
    assert store.stat("/").is_dir and store.list_dir("/") == ([], "")


def test_list_pages_by_name_over_many_entries(store: MetaStore) -> None:
    names = [f"f{i:05d}" for i in range(2500)]
    todo = [manifest(f"/big/{n}/inner" if i % 10 == 0 else f"/big/{n}", (1,)) for i, n in enumerate(names)]
    with ThreadPoolExecutor(8) as pool:  # concurrent writers share fsyncs
        assert len(set(pool.map(store.commit, todo))) == 2500
    seen, token, pages = [], "", 0
    while True:
        entries, token = store.list_dir("/big", token, 300)
        assert len(entries) <= 300
        seen.extend(entries)
        pages += 1
        if not token:
            break
        assert token == entries[-1].path.rsplit("/", 1)[1]
    assert pages == 9
    assert [e.path for e in seen] == [f"/big/{n}" for n in names]
    assert [e.is_dir for e in seen] == [i % 10 == 0 for i in range(2500)]
    assert len(store.list_dir("/big", "", 10**9)[0]) == min(2500, MAX_PAGE_SIZE)
    assert len(store.list_dir("/big")[0]) == 1000  # the default page


def test_list_of_a_file_is_that_file_and_missing_is_not_found(store: MetaStore) -> None:
    store.commit(manifest("/d/f"))
    entries, token = store.list_dir("/d/f")
    assert [e.path for e in entries] == ["/d/f"] and token == ""
    with pytest.raises(errors.NotFound):
        store.list_dir("/nope")
    with pytest.raises(errors.NotFound):
        store.stat("/d/nope")
    with pytest.raises(errors.NotFound):
        store.get_manifest("/d/nope")
    with pytest.raises(errors.IsADirectory):
        store.get_manifest("/d")


def test_file_and_directory_cannot_share_a_path(store: MetaStore) -> None:
    store.commit(manifest("/a/b/c"))
    with pytest.raises(errors.IsADirectory):
        store.commit(manifest("/a/b"))
    with pytest.raises(errors.NotADirectory):
        store.commit(manifest("/a/b/c/d"))
    with pytest.raises(errors.IsADirectory):
        store.commit(manifest("/"))
    assert [e.path for e in store.list_dir("/a/b")[0]] == ["/a/b/c"]
    assert store.stats().files == 1


@pytest.mark.parametrize("bad", ["../x", "a//b", "/a/./b", "a\x00b"])
def test_invalid_paths_are_rejected_everywhere(store: MetaStore, bad: str) -> None:
    for call in (
        lambda: store.stat(bad),
        lambda: store.get_manifest(bad),
        lambda: store.list_dir(bad),
        lambda: store.commit(manifest(bad)),
        lambda: store.delete(bad),
        lambda: store.pin(bad),
        lambda: store.resolve_files(bad),
    ):
        with pytest.raises(errors.InvalidPath):
            call()


def test_invalid_manifests_are_rejected(store: MetaStore) -> None:
    gap = manifest("/gap", (10, 10))
    gap.chunks[1] = ChunkRef(11, 9, gap.chunks[1].id)
    short = manifest("/short", (10,))
    short.size = 11
    big = manifest("/big", (CHUNK_SIZE + 1,))
    bad_id = manifest("/badid", (10,), ids=["XYZ"])
    for m in (gap, short, big, bad_id):
        with pytest.raises(errors.InvalidArgument):
            store.commit(m)
    with pytest.raises(errors.NotFound):
        store.stat("/gap")
    assert store.stats().files == 0


def test_empty_file_is_a_valid_manifest(store: MetaStore) -> None:
    store.commit(manifest("/empty", ()))
    assert store.stat("/empty").size == 0 and store.get_manifest("/empty").chunks == []


def test_delete_file_directory_and_root(store: MetaStore) -> None:
    for p in ("/x/1", "/x/2", "/x/y/3", "/xa", "/z"):
        store.commit(manifest(p))
    with pytest.raises(errors.IsADirectory):
        store.delete("/x")
    assert store.delete("/x", recursive=True) == 3
    assert [e.path for e in store.list_dir("/")[0]] == ["/xa", "/z"]  # a sibling sharing the prefix survives
    with pytest.raises(errors.NotFound):
        store.delete("/x")
    assert store.delete("/z") == 1
    assert store.delete("/", recursive=True) == 1
    assert store.delete("/") == 0  # the empty root
    assert store.stats().files == 0 and store.stat("/").size == 0


def test_resolve_files(store: MetaStore) -> None:
    for p in ("/r/b", "/r/a", "/r/s/c"):
        store.commit(manifest(p))
    assert [m.path for m in store.resolve_files("/r", recursive=True)] == ["/r/a", "/r/b", "/r/s/c"]
    assert [m.path for m in store.resolve_files("/r/a")] == ["/r/a"]
    with pytest.raises(errors.IsADirectory):
        store.resolve_files("/r")
    with pytest.raises(errors.NotFound):
        store.resolve_files("/q", recursive=True)


# -- pins --------------------------------------------------------------------


def test_pins_and_pinned_chunks(store: MetaStore) -> None:
    shared = chunk_id(b"shared")
    store.commit(manifest("/p/a", (10, 10), ids=[shared, chunk_id(b"a")]))
    store.commit(manifest("/p/b", (10, 10), ids=[shared, chunk_id(b"b")]))
    store.commit(manifest("/q", (10,)))
    g0, ids = store.pinned_chunks()
    assert ids == b"" and g0 == store.pins_generation()
    with pytest.raises(errors.IsADirectory):
        store.pin("/p")
    assert store.pin("/p", recursive=True) == 2
    g1, ids = store.pinned_chunks()
    assert g1 > g0
    assert sorted(ids[i : i + 16] for i in range(0, len(ids), 16)) == sorted(
        bytes.fromhex(c) for c in (shared, chunk_id(b"a"), chunk_id(b"b"))
    )
    assert store.pin("/p/a") == 1 and store.pins_generation() == g1  # already pinned: no change
    store.commit(manifest("/q", (3,), seed="q2"))
    assert store.pins_generation() == g1  # an unpinned file changing does not matter
    store.commit(manifest("/p/a", (10,), ids=[chunk_id(b"a2")]))
    g2 = store.pins_generation()
    assert g2 > g1
    assert bytes.fromhex(chunk_id(b"a2")) in store.pinned_chunks()[1]
    assert store.unpin("/p/b") == 1
    g3 = store.pins_generation()
    assert g3 > g2 and bytes.fromhex(chunk_id(b"b")) not in store.pinned_chunks()[1]
    assert store.unpin("/p/b") == 0 and store.pins_generation() == g3
    assert store.stats().pinned_files == 1
    store.delete("/p", recursive=True)
    assert store.pins_generation() > g3
    assert store.pinned_chunks()[1] == b"" and store.stats().pinned_files == 0
    store.commit(manifest("/p/a", (10,)))
    assert store.pinned_chunks()[1] == b""  # a pin goes with its file


# -- totals ------------------------------------------------------------------


def test_stats_count_unique_chunks_across_files(store: MetaStore) -> None:
    shared = chunk_id(b"vae")
    store.commit(manifest("/m1", (1000, 10), ids=[shared, chunk_id(b"m1")]))
    store.commit(manifest("/m2", (1000, 20), ids=[shared, chunk_id(b"m2")]))
    s = store.stats()
    assert (s.files, s.bytes, s.unique_chunks, s.unique_bytes) == (2, 2030, 3, 1030)
    store.commit(manifest("/m2", (20,), ids=[chunk_id(b"m2")]))  # a new version drops the shared chunk
    s = store.stats()
    assert (s.files, s.bytes, s.unique_chunks, s.unique_bytes) == (2, 1030, 3, 1030)
    store.delete("/m1")
    s = store.stats()
    assert (s.files, s.bytes, s.unique_chunks, s.unique_bytes) == (1, 20, 1, 20)


# -- nodes -------------------------------------------------------------------


def test_node_registry(store: MetaStore) -> None:
    store.register_node(NodeRecord("n2", "10.0.0.2:7071", 8 << 30, "gpu", "h2", "/dev/shm/p", last_seen=100.0))
    store.register_node(NodeRecord("n1", "10.0.0.1:7071", 4 << 30, last_seen=100.0))
    assert store.heartbeat("n1", 123, 4, 105.0) is True
    assert store.heartbeat("ghost", 0, 0, 105.0) is False
    nodes = store.list_nodes()
    assert [n.node_id for n in nodes] == ["n1", "n2"]
    assert (nodes[0].used, nodes[0].chunks, nodes[0].last_seen) == (123, 4, 105.0)
    assert nodes[1].info().role == "gpu" and nodes[1].pool_dir == "/dev/shm/p"
    # a node restarted under a new id at the same address replaces the old entry
    store.register_node(NodeRecord("n1b", "10.0.0.1:7071", 4 << 30, last_seen=110.0))
    assert [n.node_id for n in store.list_nodes()] == ["n1b", "n2"]


# -- tokens ------------------------------------------------------------------


def test_tokens_are_recorded_listed_and_revoked(open_store: StoreFactory) -> None:
    store = open_store()
    g0 = store.auth_generation()
    assert store.list_tokens() == []
    store.add_token(TokenRecord("writer", "admin", 100.0))
    store.add_token(TokenRecord("reader", "read", 101.0, expires=200.0))
    with pytest.raises(errors.AlreadyExists):
        store.add_token(TokenRecord("reader", "node", 102.0))  # a name is issued once
    assert store.list_tokens() == [TokenRecord("reader", "read", 101.0, 200.0, 0.0),
                                   TokenRecord("writer", "admin", 100.0, 0.0, 0.0)]  # by name
    assert store.auth_generation() == g0  # issuing revokes nothing

    assert store.revoke_token("reader", 150.0) == TokenRecord("reader", "read", 101.0, 200.0, 150.0)
    g1 = store.auth_generation()
    assert g1 > g0
    assert store.revoke_token("reader", 160.0).revoked == 150.0  # the first revocation stands
    assert store.auth_generation() == g1
    ghost = store.revoke_token("minted-elsewhere", 170.0)  # signed with the shared key, never recorded
    assert (ghost.name, ghost.revoked) == ("minted-elsewhere", 170.0)
    g2 = store.auth_generation()
    assert g2 > g1
    with pytest.raises(errors.AlreadyExists):
        store.add_token(TokenRecord("minted-elsewhere", "read", 180.0))  # a revoked name is never reused
    assert [(t.name, t.revoked) for t in store.list_tokens()] == [
        ("minted-elsewhere", 170.0), ("reader", 150.0), ("writer", 0.0)]

    store.close()
    again = open_store()
    assert again.auth_generation() == g2
    assert [(t.name, t.role, t.revoked) for t in again.list_tokens()] == [
        ("minted-elsewhere", "", 170.0), ("reader", "read", 150.0), ("writer", "admin", 0.0)]


def test_concurrent_revocations_each_bump_the_auth_generation(store: MetaStore) -> None:
    for i in range(8):
        store.add_token(TokenRecord(f"t{i}", "read", 1.0))
    g0 = store.auth_generation()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.revoke_token(f"t{i % 8}", 2.0), range(16)))  # each name twice
    assert store.auth_generation() == g0 + 8
    assert all(t.revoked == 2.0 for t in store.list_tokens())


# -- schema versions (SQLite) ---------------------------------------------------

#: ``_SCHEMA`` of sdcache/store/sqlite.py at schema version 1 (before tokens),
#: frozen here so the migration stays tested however the current schema moves.
SCHEMA_V1 = """
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO counters VALUES ('generation', 0), ('pins_generation', 0);
CREATE TABLE files (
    path TEXT PRIMARY KEY,
    parent TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    source TEXT NOT NULL,
    version_tag TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    kind TEXT NOT NULL,
    base TEXT NOT NULL,
    metadata TEXT NOT NULL,
    generation INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    chunks BLOB NOT NULL
);
-- covers the listing columns, so a page is one index range scan
CREATE INDEX files_by_parent ON files (parent, name, path, size, mtime, kind, sha256, generation, chunk_count);
CREATE TABLE dirs (
    path TEXT PRIMARY KEY,
    parent TEXT,
    name TEXT NOT NULL,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX dirs_by_parent ON dirs (parent, name, bytes);
INSERT INTO dirs VALUES ('/', NULL, '', 0, 0);
CREATE TABLE chunks (id BLOB PRIMARY KEY, length INTEGER NOT NULL, refs INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE pins (path TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    role TEXT NOT NULL,
    host_id TEXT NOT NULL,
    pool_dir TEXT NOT NULL,
    used INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    last_seen REAL NOT NULL
);
"""


def _user_version(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def test_sqlite_migrates_a_version_1_database(tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    cid = chunk_id(b"old")
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA_V1)
    # one pinned file /old/f.bin at generation 7 and one node, as version 1 kept them
    conn.execute("UPDATE counters SET value = 7 WHERE name = 'generation'")
    conn.execute("UPDATE counters SET value = 3 WHERE name = 'pins_generation'")
    conn.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 ("/old/f.bin", "/old", "f.bin", 10, 1.5, "file:///src/f.bin", "1.5:10", "ab" * 32, "lora", "sd1",
                  '{"k": "v"}', 7, 1, pack_chunks([ChunkRef(0, 10, cid)])))
    conn.execute("UPDATE dirs SET files = 1, bytes = 10 WHERE path = '/'")
    conn.execute("INSERT INTO dirs VALUES ('/old', '/', 'old', 1, 10)")
    conn.execute("INSERT INTO chunks VALUES (?, 10, 1)", (bytes.fromhex(cid),))
    conn.execute("INSERT INTO pins VALUES ('/old/f.bin')")
    conn.execute("INSERT INTO nodes VALUES ('n', 'h:1', 10, 'memory', '', '', 0, 0, 1.0)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    store = SqliteStore(db)
    m = store.get_manifest("/old/f.bin")
    assert (m.size, m.generation, m.chunks, m.metadata, m.base) == (10, 7, [ChunkRef(0, 10, cid)], {"k": "v"}, "sd1")
    assert [e.path for e in store.list_dir("/")[0]] == ["/old"]
    assert store.stats() == StoreStats(files=1, bytes=10, unique_chunks=1, unique_bytes=10, pinned_files=1)
    assert store.pinned_chunks() == (3, bytes.fromhex(cid))
    assert [n.node_id for n in store.list_nodes()] == ["n"]
    assert store.list_tokens() == [] and store.auth_generation() == 0  # the new tables, empty
    store.add_token(TokenRecord("admin", "admin", 5.0))
    store.revoke_token("admin", 6.0)
    assert store.auth_generation() == 1
    assert store.commit(manifest("/new")) == 8  # the generation counter carried over
    store.close()
    assert _user_version(db) == SCHEMA_VERSION == 3

    again = SqliteStore(db)  # migrated once: opening again changes nothing
    assert again.auth_generation() == 1 and [t.name for t in again.list_tokens()] == ["admin"]
    assert again.stat("/old/f.bin").generation == 7 and again.stats().files == 2
    again.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    db = tmp_path / "future.db"
    store = SqliteStore(db)
    store.commit(manifest("/kept"))
    store.close()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(errors.SchemaTooNew) as info:
        SqliteStore(db)
    assert str(db) in str(info.value) and "\n" not in str(info.value)  # one line naming the database
    assert _user_version(db) == SCHEMA_VERSION + 1  # left as it was
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT path FROM files").fetchall() == [("/kept",)]


# -- durability and concurrency ---------------------------------------------


def test_data_survives_reopen(open_store: StoreFactory) -> None:
    first = open_store()
    gen = first.commit(manifest("/keep/me", (7,)))
    first.pin("/keep/me")
    first.register_node(NodeRecord("n", "h:1", 10, last_seen=1.0))
    first.close()
    second = open_store()
    assert second.stat("/keep/me").generation == gen
    assert second.stats().pinned_files == 1 and [n.node_id for n in second.list_nodes()] == ["n"]
    assert second.commit(manifest("/keep/other")) > gen


def test_concurrent_commits_get_distinct_generations(store: MetaStore) -> None:
    gens: list[int] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for i in range(25):
            g = store.commit(manifest(f"/t{t}/f{i}"))
            assert store.stat(f"/t{t}/f{i}").generation == g  # read-your-write from another thread
            with lock:
                gens.append(g)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(set(gens)) == 100 and store.stats().files == 100


# -- what both stores refuse or keep alike ------------------------------------


def test_text_with_nul_is_refused(store: MetaStore) -> None:
    for field in ("source", "version_tag", "kind", "base"):
        m = manifest(f"/nul/{field}")
        setattr(m, field, "a\x00b")
        with pytest.raises(errors.InvalidArgument):
            store.commit(m)
    m = manifest("/nul/metadata")
    m.metadata = {"k\x00": "v\x00"}  # stored as JSON, which escapes it
    store.commit(m)
    assert store.get_manifest("/nul/metadata").metadata == {"k\x00": "v\x00"}
    assert [e.path for e in store.list_dir("/nul")[0]] == ["/nul/metadata"]


def test_listing_order_is_code_point_order_whatever_the_database_collation(store: MetaStore) -> None:
    # A database created under en_US (or ICU) would sort these case- and punctuation-blind.
    names = ["Zeta", "alpha", "_under", "a-b", "a.b", "ab", "a b", "\u00e9t\u00e9", "10", "9", "B", "~"]
    for n in names:
        store.commit(manifest(f"/order/{n}"))
    store.commit(manifest("/order/a/inside"))  # a directory named a sorts among the files
    want = sorted([*names, "a"])
    assert [e.path.rsplit("/", 1)[1] for e in store.list_dir("/order")[0]] == want
    seen, token = [], ""
    while True:
        entries, token = store.list_dir("/order", token, 2)
        seen += [e.path.rsplit("/", 1)[1] for e in entries]
        if not token:
            break
    assert seen == want
    assert store.delete("/order/a", recursive=True) == 1  # "/order/a-b", "/order/a.b" are not under /order/a
    assert store.stat("/order").size == 100 * len(names)


def test_two_stores_over_one_database_agree(open_store: StoreFactory) -> None:
    """Two processes' stores over one database (here: two instances) see each other's writes,
    and their namespace checks never both pass for a file and a directory at one path."""
    one, two = open_store(), open_store()
    g1 = one.commit(manifest("/shared/a"))
    assert two.stat("/shared/a").generation == g1
    g2 = two.commit(manifest("/shared/b"))
    assert g2 > g1 and [e.path for e in one.list_dir("/shared")[0]] == ["/shared/a", "/shared/b"]
    assert two.pin("/shared/a") == 1 and one.pins_generation() == two.pins_generation()
    one.add_token(TokenRecord("t", "read", 1.0))
    two.revoke_token("t", 2.0)
    assert one.auth_generation() == two.auth_generation() and one.list_tokens()[0].revoked == 2.0

    def commit(store: MetaStore, path: str) -> bool:
        try:
            store.commit(manifest(path))
            return True
        except (errors.IsADirectory, errors.NotADirectory):
            return False

    pairs = [((one, f"/race/{i}"), (two, f"/race/{i}/f")) for i in range(40)]
    with ThreadPoolExecutor(8) as pool:  # each pair's two commits in flight at once, one per store
        futures = [(pool.submit(commit, *a), pool.submit(commit, *b)) for a, b in pairs]
        results = [(fa.result(), fb.result()) for fa, fb in futures]
    assert all(a != b for a, b in results)  # exactly one of each file/directory pair
    files = [e for e in one.list_dir("/race", "", MAX_PAGE_SIZE)[0]]
    assert len(files) == 40 and two.stats().files == 2 + 40


# -- schema versions (PostgreSQL) ------------------------------------------------


def test_postgres_migrates_once_however_many_open_at_once(pg_url):
    """Services starting together over an empty database: one migrates, all open, nothing twice."""
    import psycopg

    from sdcache.store.postgres import SCHEMA_VERSION as PG_VERSION
    from sdcache.store.postgres import PostgresStore

    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: PostgresStore(pg_url), range(4)))
    try:
        assert len({s.commit(manifest(f"/m/{i}")) for i, s in enumerate(stores)}) == 4
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
            counters = conn.execute("SELECT name FROM counters ORDER BY name").fetchall()
        assert [r[0] for r in rows] == list(range(1, PG_VERSION + 1))
        assert [r[0] for r in counters] == ["auth_generation", "generation", "pins_generation"]
    finally:
        for s in stores:
            s.close()


def test_postgres_refuses_a_newer_schema(pg_url):
    import psycopg

    from sdcache.store.postgres import SCHEMA_VERSION as PG_VERSION
    from sdcache.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    store.commit(manifest("/kept"))
    store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, description) VALUES (%s, 'from the future')",
                     (PG_VERSION + 1,))
    with pytest.raises(errors.SchemaTooNew) as info:
        PostgresStore(pg_url)
    message = str(info.value)
    assert f"version {PG_VERSION + 1}" in message and "\n" not in message
    assert pg_url.split("@")[0].rsplit(":", 1)[1] not in message  # never the password
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT path FROM files").fetchall() == [("/kept",)]  # left as it was


def test_postgres_store_carries_on_after_the_database_restarts(postgres_server, pg_url):
    """Every pooled connection dies with the server; the next calls reconnect instead of failing."""
    from sdcache.store.postgres import PostgresStore

    store = PostgresStore(pg_url, pool_wait=1.0)
    try:
        gen = store.commit(manifest("/before"))
        store.register_node(NodeRecord("n", "h:1", 10, last_seen=1.0))
        postgres_server.kill()
        with pytest.raises(errors.Unavailable):
            store.stat("/before")  # down: one clear error, not a hang
        postgres_server.start()
        assert store.stat("/before").generation == gen
        assert store.commit(manifest("/after")) > gen
        assert store.heartbeat("n", 1, 1, 2.0) is True
        assert [e.path for e in store.list_dir("/")[0]] == ["/after", "/before"]
    finally:
        store.close()
