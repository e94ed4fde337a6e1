"""HTTP/1.1 semantics through Bastion: keep-alive, pipelining, bodies, HEAD, 204/304, 100-continue,
and the keep-alive pool towards the backend."""

import hashlib
import json
import socket
import time

from tests.support.raw import http_raw, parse_response


def read_response(sock, buf=b"", is_head=False):
    """Read one response (Content-Length or chunked) from `sock`; returns (status, headers, body, rest)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response head"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        n, _, v = line.partition(":")
        headers[n.strip().lower()] = v.strip()
    if is_head or status in (204, 304) or 100 <= status < 200:
        return status, headers, b"", rest
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += sock.recv(65536)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += sock.recv(65536)
            body += rest[:size]
            rest = rest[size + 2 :]
            if size == 0:
                return status, headers, body, rest
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        rest += sock.recv(65536)
    return status, headers, rest[:length], rest[length:]


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def test_keep_alive_and_pipelining_in_order(bastion, backend):
    b = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]})
    s = connect(b.port)
    for i in range(3):
        s.sendall(b"GET /echo/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        status, _, body, rest = read_response(s)
        assert status == 200 and body, (status, _, body, rest)
        assert json.loads(body)["path"] == f"/echo/{i}" and rest == b""
    # three pipelined requests in one write, answered in order on the same connection
    s.sendall(b"".join(b"GET /echo/p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(3)))
    rest = b""
    for i in range(3):
        status, _, body, rest = read_response(s, rest)
        assert json.loads(body)["path"] == f"/echo/p{i}"
    s.close()


def test_request_bodies_content_length_and_chunked(bastion, backend):
    b = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]})
    payload = bytes(range(256)) * 1000  # 256 KB: more than one read, streamed after the prefetch
    s = connect(b.port)
    s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
    status, _, body, _ = read_response(s)
    assert status == 200 and json.loads(body) == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    chunks = [payload[i : i + 7000] for i in range(0, len(payload), 7000)]
    s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\nX-Trailer: t\r\n\r\n")
    status, _, body, _ = read_response(s)
    assert status == 200 and json.loads(body)["sha256"] == hashlib.sha256(payload).hexdigest()
    s.close()


def test_chunked_and_close_delimited_responses(bastion, backend):
    b = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]})
    s = connect(b.port)
    s.sendall(b"GET /chunked/100000 HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body, _ = read_response(s)
    assert status == 200 and headers.get("transfer-encoding") == "chunked" and len(body) == 100000
    assert body == (b"0123456789abcdef" * 7000)[:100000]
    # HTTP/1.0 client: no chunking, the end of the body is the end of the connection
    raw = http_raw(b.port, b"GET /chunked/5000 HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower() and b"connection: close" in head.lower() and len(rest) == 5000


def test_head_204_304_have_no_body(bastion, backend):
    b = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]})
    s = connect(b.port)
    s.sendall(b"HEAD /bytes/1000 HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _, rest = read_response(s, is_head=True)
    assert status == 200 and headers["content-length"] == "1000"
    for code in (204, 304):
        s.sendall(b"GET /status/%d HTTP/1.1\r\nHost: x\r\n\r\n" % code)
        status, headers, _, rest = read_response(s, rest)
        assert status == code and "content-length" not in headers and "transfer-encoding" not in headers
    # the connection is still in sync: a following request gets its own answer
    s.sendall(b"GET /echo/after HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    status, _, body, rest = read_response(s, rest)
    assert json.loads(body)["path"] == "/echo/after" and rest == b""


def test_expect_100_continue(bastion, backend):
    b = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]})
    s = connect(b.port)
    s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    interim = s.recv(1024)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(b"hello")
    status, _, body, _ = read_response(s)
    assert status == 200 and json.loads(body)["length"] == 5
    # a body over the limit is refused without waiting for it
    b2 = bastion({"limits": {"body": 10}, "routes": [{"upstream": {"servers": [backend.address]}}]})
    raw = http_raw(b2.port, b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 413")


def test_backend_connections_are_reused(bastion, backend_factory):
    own = backend_factory("pool")
    b = bastion({"routes": [{"upstream": {"servers": [own.address], "keepalive": {"max_idle": 8}}}]})
    conns = set()
    for _ in range(20):
        s = connect(b.port)  # a new client connection each time
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        _, _, body, _ = read_response(s)
        conns.add(json.loads(body)["conn"])
        s.close()
    assert len(conns) == 1, f"20 requests used {len(conns)} backend connections"


def test_stale_pooled_connection_is_retried(bastion, backend_factory):
    own = backend_factory("stale")
    b = bastion({"routes": [{"upstream": {"servers": [own.address]}}]})
    s = connect(b.port)
    s.sendall(b"GET /echo/1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(s)[0] == 200
    # the backend closes its side of the pooled connection after this answer
    s.sendall(b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(s)[0] == 200
    for i in range(5):
        s.sendall(b"GET /echo/again%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        status, _, body, _ = read_response(s)
        assert status == 200 and json.loads(body)["path"] == f"/echo/again{i}"
    s.close()


def test_idle_keepalive_and_slow_header_timeouts(bastion, backend):
    b = bastion({"timeouts": {"keepalive": 1, "client_header": 1}, "routes": [{"upstream": {"servers": [backend.address]}}]})
    s = connect(b.port)
    s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(s)[0] == 200
    started = time.monotonic()
    s.settimeout(5)
    assert s.recv(100) == b""  # closed by Bastion when idle
    assert 0.7 < time.monotonic() - started < 3
    s.close()
    # a client that sends its head too slowly gets 408 and is disconnected
    s = connect(b.port)
    s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
    s.settimeout(5)
    started = time.monotonic()
    data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 408") and 0.7 < time.monotonic() - started < 3
    s.close()
