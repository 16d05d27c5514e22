"""Hostile input to the real servers: a node's HTTP API and the metadata service's gRPC API.

``tests/test_hostile.py`` feeds the pure parsers; this feeds the processes
that run them, over loopback, on the session cluster. What a user would
notice if these failed: a node or the metadata service that answers a 5xx or
a traceback to a malformed request, that hangs on one, or that stops serving
real chunks after one. The properties:

* every answer of the node is a 4xx with a JSON ``{"error", "message"}`` body,
  or a 200 carrying the exact bytes of a real chunk (nothing else is 200);
* bytes the HTTP parser refuses (a 100 KB request line, a 100 KB header,
  a NUL in a request line) get a 4xx from the parser, never a 5xx or a hang;
* a body over ``node.http.MAX_BODY`` gets 413 without the node reading it
  all, and bodies of the wrong shape get 400 saying why;
* a bad bearer value is 401 whatever it is;
* a gRPC request that is not a protobuf of its method's type gets a non-OK
  status with a message, and an over-large ``page_size`` is capped;
* after all of it, each server still answers a normal request.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import string
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_from_bytes

import grpc
import pytest
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sdcache import errors, paths
from sdcache._proto import meta_pb2 as pb
from sdcache.chunking import CHUNK_SIZE
from sdcache.client.importer import import_file
from sdcache.client.metaclient import MetaClient
from sdcache.store.base import MAX_PAGE_SIZE
from sdcache.meta.grpcauth import SERVICE
from sdcache.node.http import MAX_BODY, MAX_IDS

# No example database (the working tree is shared); the deadline is what "no hang" means per
# example, generous because two cores are shared. Few examples: each is a real request.
FUZZ = settings(max_examples=60, deadline=10_000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TIMEOUT = 10.0  # seconds a single answer may take before it counts as a hang
REAL_PATH = "/hostile-servers/real.bin"
LINE_LIMIT = 8190  # aiohttp's longest request line and header field: longer is refused by its parser


# -- a real committed file, and a client that reconnects when a node closes the connection -----


@pytest.fixture(scope="module")
def real(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A two-chunk file committed at REAL_PATH: its chunk ids and their bytes."""
    src = tmp_path_factory.mktemp("hostile-servers") / "real.bin"
    data = os.urandom(CHUNK_SIZE + 12345)
    src.write_bytes(data)
    meta = MetaClient(cluster.meta_addr)
    try:
        manifest = import_file(meta, str(src), REAL_PATH).manifest
    finally:
        meta.close()
    chunks = {c.id: data[c.offset:c.offset + c.length] for c in manifest.chunks}
    return Real({"ids": list(chunks), "bytes": chunks})


class Real(dict):  # type: ignore[type-arg]
    """The committed file's ids and bytes, shown short in a falsifying example."""

    def __repr__(self) -> str:
        return f"<{REAL_PATH}: chunks {self['ids']}>"


class Http:
    """One persistent HTTP/1.1 connection to a node, reopened if the node closes it."""

    def __init__(self, address: str, token: str) -> None:
        self.host, _, port = address.rpartition(":")
        self.port = int(port)
        self.token = token
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, target: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, *, auth: bool = True) -> tuple[int, dict[str, str], bytes]:
        hdrs = {"Authorization": f"Bearer {self.token}"} if auth else {}
        hdrs.update(headers or {})
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
            try:
                self.conn.request(method, target, body=body, headers=hdrs)
                resp = self.conn.getresponse()
                data = resp.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self.close()
                if attempt:
                    raise
                continue
            if resp.will_close:
                self.close()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@pytest.fixture(scope="module")
def node(cluster: Any) -> Iterator[Http]:
    client = Http(cluster.node_children[0].address, cluster.admin_token)
    yield client
    client.close()


def assert_error(status: int, headers: dict[str, str], body: bytes, *,
                 want: int | tuple[int, ...] | None = None) -> dict[str, Any]:
    """A 4xx (of *want*, if given) with the JSON error body of the contract."""
    assert 400 <= status < 500, (status, body[:300])
    if want is not None:
        assert status in ((want,) if isinstance(want, int) else want), (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:300])
    doc = json.loads(body)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and isinstance(doc.get("message"), str), doc
    assert doc["message"], doc
    return doc


def assert_real_read(node: Http, real: dict[str, Any]) -> None:
    """The node still serves each real chunk, byte for byte."""
    for cid in real["ids"]:
        status, _, body = node.request("GET", f"/chunks/{cid}?path={quote(REAL_PATH)}")
        assert status == 200 and body == real["bytes"][cid], status


# -- 1. query parameters and path segments ----------------------------------------------


HEX = "0123456789abcdef"
hex32 = st.text(HEX, min_size=32, max_size=32)
# A segment as sent: quoted text of any Unicode, or one of the raw forms a parser might trip on.
raw_segments = st.sampled_from([
    "", ".", "..", "%00", "%2e%2e", "%2F", "%2f..%2f", "..%2F..%2Fetc%2Fpasswd", "%", "%zz", "%C0%AE",
    "%ED%A0%80", "%FF" * 16, "a" * 5000, "0" * 31, "0" * 33, "0" * 32 + "%00", "0" * 32 + "/x",
    "0" * 32 + "/", "0" * 32 + ";x", "~", "*", "%u0041",
])
chunk_segments = st.one_of(
    raw_segments,
    st.text(HEX, max_size=64).filter(lambda s: len(s) != 32).map(quote),
    hex32.map(str.upper).filter(lambda s: s != s.lower()),
    hex32,
    st.text(max_size=40).map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")),
    st.binary(max_size=40).map(lambda b: quote_from_bytes(b, safe="")),
)
param_names = st.one_of(st.sampled_from(["path", "src", "off", "len", "PATH", "path[]", "", "x", "id", "ids"]),
                        st.text(max_size=12))
param_values = st.one_of(
    st.sampled_from(["", "/", "..", "/..", "/a/../b", "a//b", "/a/./b", "\x00", "/a\x00b", REAL_PATH,
                     REAL_PATH + "/", "sdcache://" + REAL_PATH[1:], "/" + "a" * 5000, "/" + "é" * 1000,
                     "-1", "0", "18446744073709551616", "1e309", "nan", "file:///etc/passwd",
                     "http://169.254.169.254/"]),
    st.text(max_size=300),
    st.binary(max_size=300),
)


def encode_query(pairs: list[tuple[str, str | bytes]]) -> str:
    out = []
    for k, v in pairs:
        raw = v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass")
        ev = quote_from_bytes(raw, safe="")
        out.append(f"{quote(k.encode('utf-8', 'surrogatepass'), safe='')}={ev}")
    return "&".join(out)


@FUZZ
@given(segment=chunk_segments, extra=st.sampled_from(["", "/", "/x", "/../..", "?"]),
       pairs=st.lists(st.tuples(param_names, param_values), max_size=5),
       real_id=st.booleans(), method=st.sampled_from(["GET", "GET", "HEAD"]))
def test_any_chunk_url_is_4xx_json_or_the_real_chunk(node, real, segment, extra, pairs, real_id, method):
    if real_id:
        segment = real["ids"][0]
    target = f"/chunks/{segment}{extra}"
    if pairs:
        target += ("&" if "?" in target else "?") + encode_query(pairs)
    status, headers, body = node.request(method, target)
    assert status < 500, (target[:200], status, body[:300])
    if len(target) > LINE_LIMIT:
        assert status in (400, 414), (len(target), status)  # the HTTP parser's refusal, before any handler
        return
    if status == 200:
        # A 200 is only ever a real chunk (from the pool, or read through the real path's manifest).
        cid = segment if segment in real["ids"] and extra in ("", "?") else None
        assert cid is not None, (target[:200], body[:200])
        if method == "GET":
            assert body == real["bytes"][cid]
        return
    if method == "HEAD":
        assert status in (400, 404, 405), (target[:200], status)
        return
    doc = assert_error(status, headers, body)
    names = {k for k, _ in pairs}
    if {"src", "off", "len"} & names and segment == real["ids"][0] and extra == "":
        assert status == 400 and doc["error"] == "InvalidArgument", doc


def test_repeated_params_take_the_first_and_refused_params_are_named(node, real):
    cid = real["ids"][1]
    status, _, body = node.request("GET", f"/chunks/{cid}?path={quote(REAL_PATH)}&path=/elsewhere&path=..")
    assert status == 200 and body == real["bytes"][cid]
    status, headers, body = node.request("GET", f"/chunks/{cid}?path={quote(REAL_PATH)}&off=0&len=1&src=/etc/passwd")
    doc = assert_error(status, headers, body, want=400)
    assert "src" in doc["message"] and "off" in doc["message"] and "len" in doc["message"]
    status, headers, body = node.request("GET", f"/chunks/{'0' * 32}?path={quote(REAL_PATH)}&unknown=1&unknown=2")
    assert_error(status, headers, body, want=404)
    assert_real_read(node, real)


def raw_exchange(address: str, data: bytes, *, read_limit: int = 1 << 16) -> bytes:
    """Send *data* on a fresh connection and return what the node answers (until it closes or goes quiet)."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node answered and closed before reading it all
        got = b""
        s.settimeout(2.0)
        try:
            while len(got) < read_limit:
                part = s.recv(65536)
                if not part:
                    break
                got += part
                if b"\r\n\r\n" in got and _complete(got):
                    break
        except socket.timeout:
            pass
        except ConnectionResetError:
            pass
    return got


def _complete(resp: bytes) -> bool:
    head, _, body = resp.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_of(resp: bytes) -> int:
    line = resp.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1."), resp[:200]
    return int(line.split()[1])


def test_raw_request_lines_the_parser_refuses_get_a_4xx(cluster, node, real):
    address = cluster.node_children[0].address
    auth = f"Authorization: Bearer {cluster.admin_token}\r\n".encode()
    cid = real["ids"][0]
    cid = cid.encode()

    def req(line: bytes, *fields: bytes, body: bytes = b"") -> bytes:
        return line + b"\r\nHost: x\r\n" + auth + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body

    chunked = b"Transfer-Encoding: chunked"
    cases = {
        "100 KB URL": req(b"GET /chunks/" + b"a" * 100_000 + b" HTTP/1.1"),
        "100 KB query": req(b"GET /chunks/" + cid + b"?path=/" + b"a" * 100_000 + b" HTTP/1.1"),
        "100 KB header": req(b"GET /stats HTTP/1.1", b"X-Big: " + b"b" * 100_000),
        "10,000 headers": req(b"GET /stats HTTP/1.1", *(b"X-%d: 1" % i for i in range(10_000))),
        "NUL in URL": req(b"GET /chunks/" + cid + b"\x00 HTTP/1.1"),
        "raw UTF-8 and bytes in URL": req(b"GET /chunks/\xc3\xa9\xff\xfe?path=/\xed\xa0\x80 HTTP/1.1"),
        "space in URL": req(b"GET /chunks/a b HTTP/1.1"),
        "not HTTP": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",
        "garbage line": b"GARBAGE\r\n\r\n",
        "no target": b"GET HTTP/1.1\r\nHost: x\r\n\r\n",
        "HTTP/9.9": req(b"GET /stats HTTP/9.9"),
        "header without colon": req(b"GET /stats HTTP/1.1", b"NoColonHere"),
        "bad Content-Length": req(b"POST /has HTTP/1.1", b"Content-Length: -5", body=b"{}"),
        "two Content-Lengths": req(b"POST /has HTTP/1.1", b"Content-Length: 2", b"Content-Length: 9", body=b"{}"),
        "CL and chunked": req(b"POST /has HTTP/1.1", b"Content-Length: 2", chunked, body=b"{}"),
        "bad chunk size": req(b"POST /has HTTP/1.1", chunked, body=b"zz\r\n{}\r\n0\r\n\r\n"),
        "huge chunk size": req(b"POST /has HTTP/1.1", chunked, body=b"f" * 20 + b"\r\n{}\r\n0\r\n\r\n"),
    }
    for what, data in cases.items():
        resp = raw_exchange(address, data)
        assert resp, f"{what}: the node closed the connection without an answer"
        status = status_of(resp)
        assert 400 <= status < 500, (what, resp[:300])
    # HTTP/1.1 without Host is a 400 (RFC 9112, 3.2); HTTP/1.0 needs none and is served.
    resp = raw_exchange(address, b"GET /stats HTTP/1.1\r\n" + auth + b"\r\n")
    assert status_of(resp) == 400, resp[:300]
    resp = raw_exchange(address, b"GET /chunks/" + cid + b"?path=" + quote(REAL_PATH).encode()
                        + b" HTTP/1.0\r\n" + auth + b"\r\n", read_limit=CHUNK_SIZE + 4096)
    assert status_of(resp) == 200 and resp.partition(b"\r\n\r\n")[2] == real["bytes"][cid.decode()]
    assert_real_read(node, real)


# -- 2. bodies -----------------------------------------------------------------------------


def stream_post(address: str, target: str, token: str, total: int, *,
                chunked: bool = False) -> tuple[int, float, int]:
    """POST a *total*-byte body; return (status, seconds to the answer, bytes sent by then).

    The body is sent from a thread while this one waits for the answer, so a
    node that answers before reading it all is seen to.
    """
    host, _, port = address.rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % total
    s.sendall(b"POST " + target.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode()
              + b"\r\nContent-Type: application/json\r\n" + framing + b"\r\n")
    sent = [0]
    stop = threading.Event()
    block = b" " * (1 << 20)  # what the bytes are does not matter: only their number is refused

    def pump() -> None:
        try:
            while sent[0] < total and not stop.is_set():
                piece = block[: min(len(block), total - sent[0])]
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent[0] += len(piece)
            if chunked and not stop.is_set():
                s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the node answered and hung up: what we are waiting for

    t0 = time.monotonic()
    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    try:
        got = b""
        while b"\r\n" not in got:
            part = s.recv(4096)
            if not part:
                break
            got += part
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        try:
            s.shutdown(socket.SHUT_RDWR)  # wakes the sender if it is blocked in sendall
        except OSError:
            pass
        s.close()
        sender.join(TIMEOUT)
    return status_of(got), elapsed, sent[0]


@pytest.mark.parametrize("route", ["/has", "/warm", "/evict"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_max_body_is_413_without_reading_it_all(cluster, node, real, route, chunked):
    total = 100 << 20
    status, elapsed, sent = stream_post(cluster.node_children[0].address, route, cluster.admin_token, total,
                                        chunked=chunked)
    assert status == 413, status
    assert sent < total, "the node read all 100 MB before answering"
    assert elapsed < 5.0, elapsed
    assert_real_read(node, real)


def test_declared_length_over_max_body_is_413_at_once(cluster, node, real):
    address = cluster.node_children[0].address
    for route in ("/has", "/warm", "/evict"):
        resp = raw_exchange(address, b"POST " + route.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                            + cluster.admin_token.encode() + b"\r\nContent-Length: %d\r\n\r\n{" % (MAX_BODY + 1))
        assert status_of(resp) == 413, (route, resp[:300])
        doc = json.loads(resp.partition(b"\r\n\r\n")[2])
        assert doc["error"] == "InvalidArgument" and str(MAX_BODY) in doc["message"], doc
    assert_real_read(node, real)


def test_wrong_method_and_unknown_route_are_json_too(node):
    for method, target, want in [("PUT", "/has", 405), ("DELETE", f"/chunks/{'0' * 32}", 405), ("GET", "/warm", 405),
                                 ("PATCH", "/stats", 405), ("GET", "/nope", 404), ("GET", "/chunks/", 404),
                                 ("POST", "/chunks/" + "0" * 32, 405), ("GET", "/chunks/" + "0" * 32 + "/x", 404)]:
        status, headers, data = node.request(method, target, body=b"{}" if method != "GET" else None)
        assert_error(status, headers, data, want=want)
        if want == 405:
            assert headers.get("allow"), (method, target, headers)


ID = b'"' + b"0" * 32 + b'"'
bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"", b"null", b"[]", b'"ids"', b"1", b"true", b"{", b"{}", b'{"ids": null}', b'{"ids": []}',
                     b'{"ids": "0123"}', b'{"ids": {"a": 1}}', b'{"ids": [1, 2]}', b'{"ids": [null]}',
                     b'{"ids": [[' + ID + b"]]}", b'{"ids": ["' + b"0" * 31 + b'"]}', b'{"ids": [' + ID + b", 7]}",
                     b'{"ids": ["' + b"A" * 32 + b'"]}', b'{"ids": ["\\u0000"]}', b'{"ids": [' + b"1" * 5000 + b"]}",
                     b'{"ids": [1e999]}', b'{"ids": [NaN]}', b"\xff\xfe{}", b"\xef\xbb\xbf{}", b'{"ids": ["\xff"]}',
                     b'{"path": 5, "ids": []}', b'{"path": "/a/../b", "ids": []}', b'{"path": "\\u0000", "ids": []}',
                     b'{"path": "\\ud800", "ids": []}', b'{"path": ["x"], "ids": []}', b'{"path": {}, "ids": []}',
                     b'{"path": "/' + b"a" * 20000 + b'", "ids": []}', b'{"path": "/x"}',
                     b'{"path": "/x", "ids": null}',
                     b'{"chunks": []}', b'{"path": "/x", "ids": [], "chunks": []}', b'{"ids": []}' * 2,
                     b"[" * 100_000 + b"]" * 100_000, b'{"ids": ' * 50_000 + b"[]" + b"}" * 50_000]),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                 lambda c: st.lists(c, max_size=4)
                 | st.dictionaries(st.sampled_from(["ids", "path", "chunks", "x"]), c, max_size=3),
                 max_leaves=12).map(lambda v: json.dumps(v).encode()),
)


def accepts(route: str, body: bytes) -> bool:
    """Whether the contract accepts *body* on *route* (module docstring of ``node/http.py``)."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    if not isinstance(doc, dict):
        return False

    def good_ids(ids: Any) -> bool:
        return isinstance(ids, list) and len(ids) <= MAX_IDS and all(
            isinstance(i, str) and len(i) == 32 and set(i) <= set(HEX) for i in ids)

    def path_of(p: Any) -> str | None | bool:  # False: refused
        if p is None or p == "":
            return None
        try:
            return paths.normalize(p)
        except errors.InvalidPath:
            return False

    if route == "/has":
        return good_ids(doc.get("ids"))
    path = path_of(doc.get("path"))
    if path is False:
        return False
    if route == "/warm":
        return "chunks" not in doc and path is not None and good_ids(doc.get("ids"))
    ids = doc.get("ids")
    return (ids is None or good_ids(ids)) and not (path is None and ids is None)


@FUZZ
@given(route=st.sampled_from(["/has", "/warm", "/evict"]), body=bodies)
def test_bodies_of_the_wrong_shape_are_400_with_a_reason(node, route, body):
    status, headers, data = node.request("POST", route, body=body, headers={"Content-Type": "application/json"})
    if accepts(route, body):
        assert status == 200, (route, body[:200], status, data[:300])
        assert isinstance(json.loads(data), dict)
    else:
        assert_error(status, headers, data, want=400)


def test_a_million_ids_is_refused_with_a_reason(node, real):
    post = {"Content-Type": "application/json"}
    # A million real-looking ids is ~35 MB: over MAX_BODY, refused on its Content-Length.
    million = b'{"ids": [' + b",".join([ID] * 10**6) + b"]}"
    status, headers, data = node.request("POST", "/has", body=million, headers=post)
    assert_error(status, headers, data, want=413)
    # A million short entries (2-3 MB, under MAX_BODY): the count is refused before any entry is looked at.
    for entries in (b"1", b'""', b"null"):
        body = b'{"path": "/x", "ids": [' + b",".join([entries] * 10**6) + b"]}"
        assert len(body) < MAX_BODY
        for route in ("/has", "/warm", "/evict"):
            status, headers, data = node.request("POST", route, body=body, headers=post)
            doc = assert_error(status, headers, data, want=400)
            assert f"at most {MAX_IDS} ids" in doc["message"], doc
    # MAX_IDS + 1 good ids is refused too, MAX_IDS of them is served.
    many = [f"{i:032x}" for i in range(MAX_IDS + 1)]
    for route in ("/has", "/warm", "/evict"):
        body = json.dumps({"path": "/hostile-servers/none", "ids": many}, separators=(",", ":")).encode()
        doc = assert_error(*node.request("POST", route, body=body, headers=post), want=400)
        assert f"at most {MAX_IDS} ids" in doc["message"], doc
    status, _, data = node.request("POST", "/has", body=json.dumps({"ids": many[:MAX_IDS]}).encode(), headers=post)
    assert status == 200 and json.loads(data)["present"] == []
    assert_real_read(node, real)


# -- 3. the Authorization header ---------------------------------------------------------------

# What http.client may send as a field value (no CR/LF), as Latin-1 text.
header_values = st.binary(max_size=1500).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").decode("latin-1"))
auth_values = st.one_of(
    st.sampled_from(["", "Bearer", "Bearer ", "Bearer  ", "bearer", "Basic dXNlcjpwYXNz", "Token abc", "Digest x",
                     "Bearer sdc1..", "Bearer sdc1.e30.", "Bearer sdc1.!!!.???", "Bearer " + "A" * 5000,
                     "Bearer sdc1." + "A" * 1000 + "." + "B" * 86, "Negotiate", "Bearer\tx", "Bearer x y z"]),
    header_values,
    header_values.map(lambda v: "Bearer " + v),
    st.text(string.printable.strip(), max_size=2000).map(lambda v: "Bearer " + v),
)


@FUZZ
@given(value=auth_values, route=st.sampled_from([("GET", "/stats"), ("POST", "/has"), ("POST", "/warm"),
                                                  ("POST", "/evict"), ("GET", "/chunks/" + "0" * 32),
                                                  ("HEAD", "/chunks/" + "0" * 32)]))
def test_any_bad_bearer_value_is_401(cluster, node, value, route):
    assume(value.strip().partition(" ")[2].strip() != cluster.admin_token)
    method, target = route
    body = b'{"ids": []}' if method == "POST" else None
    status, headers, data = node.request(method, target, body=body, headers={"Authorization": value}, auth=False)
    if len(value.encode("latin-1")) > LINE_LIMIT - len("Authorization: ") or not _field_value(value):
        assert status in (400, 401, 431), status  # refused by the HTTP parser (too long, a control character)
        return
    assert status == 401, (value[:200], status, data[:300])
    assert headers.get("www-authenticate", "").startswith("Bearer")
    if method != "HEAD":
        assert_error(status, headers, data, want=401)


def _field_value(value: str) -> bool:
    """Whether *value* is a legal HTTP field value (RFC 9110 5.5): no control character but HTAB."""
    return all(c == "\t" or " " <= c <= "~" or "\x80" <= c <= "\xff" for c in value)


@pytest.mark.parametrize("size", [1025, 8000, 10_000, 100_000])
def test_long_tokens_are_refused_never_5xx(cluster, size):
    address = cluster.node_children[0].address
    token = ("sdc1." + "A" * size)[:size]
    resp = raw_exchange(address, b"GET /stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode()
                        + b"\r\nConnection: close\r\n\r\n")
    status = status_of(resp)
    assert status == 401 if size <= 8000 else status in (400, 401, 431), (size, resp[:300])


@FUZZ
@given(value=st.text(string.printable.strip() + " ", max_size=2000) | st.sampled_from(["Bearer", "Bearer ", "Basic x"]))
def test_any_bad_grpc_bearer_value_is_unauthenticated(channel, cluster, value):
    assume(value.strip().partition(" ")[2].strip() != cluster.admin_token)
    try:
        channel.unary_unary(SERVICE + "Stat")(pb.PathRequest(path="/").SerializeToString(),
                                             metadata=(("authorization", value),), timeout=TIMEOUT)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and e.details(), (value[:100], e.code(), e.details())
    else:
        raise AssertionError(f"Stat with authorization {value[:100]!r} was answered")


def test_tampered_admin_token_is_401(cluster, node):
    tok = cluster.admin_token
    prefix, payload, sig = tok.split(".")
    flipped = {"a": "b", "b": "a"}
    tampered = [
        tok[:-10],  # signature cut short
        f"{prefix}.{payload}",
        f"{prefix}.{payload[:-1]}{'A' if payload[-1] != 'A' else 'B'}.{sig}",  # payload changed
        f"{prefix}.{payload}.{flipped.get(sig[0], 'a')}{sig[1:]}",  # signature changed
        f"SDC1.{payload}.{sig}",
        f"{prefix}.{payload}.{sig}.",
        tok + " " + tok,
    ]
    for t in tampered:
        status, headers, data = node.request("GET", "/stats", headers={"Authorization": "Bearer " + t}, auth=False)
        assert_error(status, headers, data, want=401)
    status, _, _ = node.request("GET", "/stats", headers={"Authorization": "bEaReR  " + tok + "  "}, auth=False)
    assert status == 200  # scheme names are case-insensitive; surrounding space is not part of the token


# -- 4. gRPC -------------------------------------------------------------------------------


METHODS = {m.name: (GetMessageClass(m.input_type), m.server_streaming)
           for m in pb.DESCRIPTOR.services_by_name["Meta"].methods}


@pytest.fixture(scope="module")
def channel(cluster: Any) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(cluster.meta_addr)
    yield ch
    ch.close()


def raw_call(channel: grpc.Channel, cluster: Any, method: str, data: bytes) -> grpc.RpcError | bytes:
    """Call *method* with *data* as the request bytes; the error, or the reply's bytes."""
    md = (("authorization", "Bearer " + cluster.admin_token),)
    try:
        if METHODS[method][1]:
            return b"".join(channel.unary_stream(SERVICE + method)(data, metadata=md, timeout=TIMEOUT))
        return channel.unary_unary(SERVICE + method)(data, metadata=md, timeout=TIMEOUT)
    except grpc.RpcError as e:
        return e


def _parses(method: str, data: bytes) -> bool:
    try:
        METHODS[method][0].FromString(data)
    except DecodeError:
        return False
    return True


# Bytes no protobuf parser accepts: a truncated varint, a length past the end, wire types 6 and 7,
# field number 0, a string field of invalid UTF-8, a group never closed.
NOT_PROTOBUF = [b"\xff", b"\xff" * 11, b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x0e", b"\x0f\x00", b"\x00\x01",
                b"\x0a\x02\xff\xfe", b"\x0b", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"]


def assert_refused(outcome: grpc.RpcError | bytes, method: str, data: bytes) -> None:
    assert isinstance(outcome, grpc.RpcError), (method, data[:50], outcome)
    assert outcome.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL), (
        method, data[:50], outcome.code(), outcome.details())
    assert outcome.details(), (method, data[:50])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_grpc_garbage_is_refused_with_a_status(channel, cluster, method):
    for data in NOT_PROTOBUF:
        if _parses(method, data):
            continue  # e.g. a string field that is bytes in this message
        assert_refused(raw_call(channel, cluster, method, data), method, data)
    assert isinstance(raw_call(channel, cluster, "Stat", pb.PathRequest(path="/").SerializeToString()), bytes)


@settings(max_examples=40, deadline=10_000, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(method=st.sampled_from(sorted(METHODS)), data=st.binary(min_size=1, max_size=300))
def test_grpc_random_bytes_are_refused_with_a_status(channel, cluster, method, data):
    assume(not _parses(method, data))  # bytes that happen to parse are a real request: not sent
    assert_refused(raw_call(channel, cluster, method, data), method, data)


@FUZZ
@given(path=st.text(max_size=300) | st.sampled_from(["", "/..", "\x00", "/" + "a" * 10_000, "a//b"]),
       method=st.sampled_from(["Stat", "GetManifest", "List"]), page_token=st.text(max_size=50),
       page_size=st.integers(0, 2**32 - 1))
def test_grpc_read_requests_of_any_path_answer_ok_or_a_4xx_status(channel, cluster, path, method, page_token,
                                                                  page_size):
    if method == "List":
        req = pb.ListRequest(path=path, page_token=page_token, page_size=page_size)
    else:
        req = pb.PathRequest(path=path)
    outcome = raw_call(channel, cluster, method, req.SerializeToString())
    if isinstance(outcome, grpc.RpcError):
        client_errors = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                         grpc.StatusCode.FAILED_PRECONDITION)
        assert outcome.code() in client_errors, (method, path[:80], outcome.code(), outcome.details())
        assert outcome.details()


def test_list_page_size_is_capped_not_refused(channel, cluster, real):
    outcome = raw_call(channel, cluster, "List",
                       pb.ListRequest(path="/", page_size=2**32 - 1).SerializeToString())
    assert isinstance(outcome, bytes), outcome
    reply = pb.ListResponse.FromString(outcome)
    assert 1 <= len(reply.entries) <= MAX_PAGE_SIZE
    outcome = raw_call(channel, cluster, "PinnedChunks",
                       pb.PinnedChunksRequest(page_size=2**32 - 1).SerializeToString())
    assert isinstance(outcome, bytes), outcome
    for token in ["x", ":", "1:", ":1", "-1:0", "0:-1", "99999999999999999999:1", f"0:{2**64}", "1:2:3", "\x00", "1" * 5000 + ":0", "0:" + "9" * 5000,
                  "\u00b2:1", "1:\u00b2", "\u0661:\u0661", "1:\uff11"]:  # superscript, Arabic-Indic, fullwidth digits
        outcome = raw_call(channel, cluster, "PinnedChunks",
                           pb.PinnedChunksRequest(page_token=token).SerializeToString())
        if isinstance(outcome, grpc.RpcError):
            assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT and outcome.details(), (token, outcome)


def test_meta_and_nodes_still_serve_after_all_of_it(channel, cluster, node, real):
    outcome = raw_call(channel, cluster, "Stat", pb.PathRequest(path=REAL_PATH).SerializeToString())
    assert isinstance(outcome, bytes), outcome
    assert pb.Entry.FromString(outcome).size == sum(len(b) for b in real["bytes"].values())
    for child in cluster.node_children:
        client = Http(child.address, cluster.admin_token)
        try:
            assert_real_read(client, real)
        finally:
            client.close()
