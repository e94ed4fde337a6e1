"""HTTPS connections as a client lives them, over Bastion's own TLS transport (OpenSSL on the socket):
large bodies both ways with a reader that falls behind, pipelined requests, WebSocket over TLS, a
client that never finishes its handshake, and a client that closes mid-response."""

import asyncio
import hashlib
import json
import socket
import ssl
import time

import pytest
import trustme
import websockets

from tests.support.certs import server_cert_files
from tests.support.ports import free_port

PATTERN = b"0123456789abcdef" * 4096


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def https(bastion, backend, ca, tmp_path):
    cert_file, key_file = server_cert_files(ca, tmp_path)
    port = free_port()
    b = bastion({"listeners": [{"address": f"127.0.0.1:{port}",
                                "tls": {"certificates": [{"cert": cert_file, "key": key_file}]}}],
                 "timeouts": {"client_header": 2},
                 "routes": [{"upstream": {"servers": [backend.address]}}]})
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["http/1.1"])
    b.tls_port = port
    b.client_context = context
    return b


def tls_socket(b) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", b.tls_port), timeout=15)
    return b.client_context.wrap_socket(raw, server_hostname="localhost")


def read_response(sock, buffer: bytes = b"", slow: bool = False) -> tuple[bytes, bytes, bytes]:
    """(head, body, what was read beyond it) of one response with a Content-Length."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the head"
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    body = bytearray(rest)
    reads = 0
    while len(body) < length:
        chunk = sock.recv(16384)
        assert chunk, f"connection closed after {len(body)} of {length} bytes"
        body += chunk
        reads += 1
        if slow and reads < 40:
            time.sleep(0.02)  # fall behind: Bastion's writes must wait for the socket, not drop bytes
    return head, bytes(body[:length]), bytes(body[length:])


def test_large_download_to_a_slow_reader_and_large_upload(https):
    size = 24 * 1024 * 1024
    with tls_socket(https) as s:
        s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % size)
        head, body, _ = read_response(s, slow=True)
        assert head.startswith(b"HTTP/1.1 200")
        assert body == (PATTERN * (size // len(PATTERN) + 1))[:size]
        upload = PATTERN * 256  # 16 MiB
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(upload) + upload)
        head, body, _ = read_response(s)
        assert head.startswith(b"HTTP/1.1 200")
        assert json.loads(body) == {"length": len(upload), "sha256": hashlib.sha256(upload).hexdigest()}


def test_pipelined_requests_in_one_write_are_answered_in_order(https):
    with tls_socket(https) as s:
        s.sendall(b"".join(b"GET /echo/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % i for i in range(20)))
        rest = b""
        for i in range(20):
            head, body, rest = read_response(s, rest)
            assert head.startswith(b"HTTP/1.1 200")
            assert json.loads(body)["path"] == f"/echo/{i}"


def test_websocket_over_tls(https):
    async def session():
        async with websockets.connect(f"wss://localhost:{https.tls_port}/ws", ssl=https.client_context,
                                      max_size=None, compression=None) as ws:
            for message in ["hello", bytes(range(256)) * 8192]:
                await ws.send(message)
                assert await ws.recv() == message

    asyncio.run(session())


def test_a_handshake_that_never_finishes_is_closed(https):
    with socket.create_connection(("127.0.0.1", https.tls_port), timeout=15) as s:
        s.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, and nothing more
        started = time.monotonic()
        assert s.recv(1024) == b""
        assert time.monotonic() - started < 10  # client_header (2 s) bounds the handshake too
    # and a complete one still works
    with tls_socket(https) as s:
        s.sendall(b"GET /echo/after HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(s)[0].startswith(b"HTTP/1.1 200")


def test_a_client_gone_mid_download_leaves_the_proxy_serving(https):
    for _ in range(3):
        s = tls_socket(https)
        s.sendall(b"GET /bytes/50000000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        s.close()
    with tls_socket(https) as s:
        s.sendall(b"GET /echo/still HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, body, _ = read_response(s)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["path"] == "/echo/still"


def test_in_flight_https_requests_survive_a_reload(bastion, backend, ca, tmp_path):
    import threading

    cert_file, key_file = server_cert_files(ca, tmp_path)
    port = free_port()

    def config(version):
        return {"workers": 2,
                "listeners": [{"address": f"127.0.0.1:{port}",
                               "tls": {"certificates": [{"cert": cert_file, "key": key_file}]}}],
                "routes": [{"match": {"path": {"exact": "/version"}}, "respond": {"body": version}},
                           {"upstream": {"servers": [backend.address]}}]}

    b = bastion(config("one"))
    b.tls_port = port
    b.client_context = ssl.create_default_context()
    ca.configure_trust(b.client_context)

    def get(path):
        with tls_socket(b) as s:
            s.sendall(b"GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % path.encode())
            head, body, _ = read_response(s)
            return head.split(b" ")[1], body

    result = {}
    slow = threading.Thread(target=lambda: result.update(answer=get("/delay/2")))
    slow.start()
    time.sleep(0.5)
    b.write_config(config("two"))
    b.reload()
    deadline = time.monotonic() + 15
    while get("/version") != (b"200", b"two"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    slow.join(15)
    assert result["answer"] == (b"200", b"ok")  # begun under the old workers, finished by them
