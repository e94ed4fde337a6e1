"""Large response bodies between plain-TCP sockets go around Python (splice(2), bastion/http/splice.py):
the client gets every byte, both connections stay usable afterwards, a failure on either side ends the
other as a streamed response's failure does, and nothing is left open behind it."""

import hashlib
import os
import re
import socket
import threading
import time
import urllib.request

import trustme

from tests.support.certs import server_cert_files
from tests.support.raw import ThreadedServer

MIB = 1 << 20
PATTERN = b"0123456789abcdef" * 4096  # what the test backend's /bytes/N repeats


def expected_body(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


def metric(b, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(b.admin_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + (labels and "{")) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_metric(b, name: str, at_least: float, labels: str = "", timeout: float = 5) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = metric(b, name, labels)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def read_response(s: socket.socket) -> tuple[bytes, bytes]:
    """One response on a keep-alive connection, its body read to its Content-Length."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
    parts = [body]
    got = len(body)
    while got < length:
        chunk = s.recv(min(1 << 20, length - got))
        assert chunk, f"connection closed after {got} of {length} body bytes"
        parts.append(chunk)
        got += len(chunk)
    return head, b"".join(parts)


def worker_fds(b) -> int:
    """The worker's open sockets and pipes (the metrics' files open on their first flush, and are not counted)."""
    (pid,) = b.worker_pids()
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return sum(link.startswith(("socket:", "pipe:")) for link in links)


def test_large_bodies_arrive_whole_and_both_connections_stay_usable(bastion, backend):
    backend.reset()
    b = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]})
    sizes = [8 * MIB, 100, 8 * MIB + 12345]
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
        for n in sizes:  # one client connection, and (after the first) one pooled backend connection
            s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
            head, body = read_response(s)
            assert head.startswith(b"HTTP/1.1 200")
            assert len(body) == n and hashlib.sha256(body).digest() == hashlib.sha256(expected_body(n)).digest()
    # The backend saw a single connection: after a spliced body, the next response on it parsed cleanly.
    assert backend.connections() == 1
    logged = b.wait_access_log(3)[-3:]
    assert [e["bytes_out"] for e in logged] == sizes and all(e["status"] == 200 and not e["error"] for e in logged)
    # Most of the two large bodies went around Python (the first read of each is written as usual).
    spliced = wait_metric(b, "bastion_spliced_response_bytes_total", 14 * MIB)
    assert 14 * MIB <= spliced <= 16 * MIB + 12345


class TruncatingBackend(ThreadedServer):
    """Answers every request with a head promising `promised` body bytes, sends `sent` of them, and closes."""

    def __init__(self, promised: int, sent: int):
        self.head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % promised
        self.sent = sent
        super().__init__()

    def serve(self, conn):
        conn.settimeout(5)
        while b"\r\n\r\n" not in conn.recv(65536):
            pass
        conn.sendall(self.head + expected_body(self.sent))


def test_backend_closing_during_a_spliced_body_cuts_the_client(bastion, backend):
    truncating = TruncatingBackend(promised=16 * MIB, sent=4 * MIB)
    try:
        b = bastion({"routes": [
            {"name": "truncated", "match": {"path": "/cut"}, "upstream": {"servers": [truncating.address]}},
            {"name": "fine", "upstream": {"servers": [backend.address]}}]})
        got = b""
        closed = False
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
            s.sendall(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                while True:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        closed = True
                        break
                    got += chunk
            except ConnectionResetError:
                closed = True
        head, _, body = got.partition(b"\r\n\r\n")
        # The client cannot take a cut body for a whole one: its connection ends short of the length.
        assert closed and head.startswith(b"HTTP/1.1 200") and b"Content-Length: 16777216" in head
        assert len(body) <= 4 * MIB and body == expected_body(len(body))
        entry = next(e for e in reversed(b.wait_access_log(1)) if e["route"] == "truncated")
        assert entry["error"] == "upstream_reset_midway"
        assert wait_metric(b, "bastion_upstream_errors_total", 1, 'kind="upstream_reset_midway"') == 1
        assert wait_metric(b, "bastion_spliced_response_bytes_total", MIB) >= MIB  # (it was spliced)
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:  # the worker is fine
            s.sendall(b"GET /bytes/1000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = read_response(s)
            assert head.startswith(b"HTTP/1.1 200") and body == expected_body(1000000)
    finally:
        truncating.close()


class EndlessBackend(ThreadedServer):
    """Answers with a head promising 1 GiB, then either sends body bytes until its connection is taken
    away, or (`stall_after`) sends that many and then nothing; for at most 20 s. `ended` is set when the
    proxy let go of the connection (sending failed, or the connection was closed)."""

    def __init__(self, stall_after: int | None = None):
        self.stall_after = stall_after
        self.ended = threading.Event()
        super().__init__()

    def serve(self, conn):
        conn.settimeout(1)
        while b"\r\n\r\n" not in conn.recv(65536):
            pass
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
        if self.stall_after is not None:
            conn.sendall(expected_body(self.stall_after))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if self.stall_after is None:
                    conn.sendall(PATTERN * 4)
                elif not conn.recv(65536):
                    break
            except socket.timeout:
                continue  # nothing taken, or nothing heard: keep trying until the deadline
            except OSError:
                break
        else:
            return
        self.ended.set()


def test_client_leaving_during_a_spliced_body_lets_the_backend_go(bastion):
    # streaming: the client closes or resets while the backend sends; stalled: the client resets after
    # reading all the backend sent, while Bastion waits for the backend's next bytes
    for how, stall_after in (("close", None), ("reset", None), ("reset", 6 * MIB)):
        endless = EndlessBackend(stall_after)
        try:
            b = bastion({"routes": [{"upstream": {"servers": [endless.address]}}]})
            time.sleep(0.3)
            fds_before = worker_fds(b)
            s = socket.create_connection(("127.0.0.1", b.port), timeout=10)
            s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(65536)
            got = len(head.partition(b"\r\n\r\n")[2])
            while got < (stall_after or 4 * MIB):
                got += len(s.recv(1 << 20))
            if how == "reset":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
            # The backend connection is closed: it was not left open behind the client's.
            assert endless.ended.wait(10), f"backend connection still open after the client's {how} ({stall_after=})"
            assert wait_metric(b, "bastion_spliced_response_bytes_total", MIB) >= MIB
            deadline = time.monotonic() + 5
            while worker_fds(b) > fds_before and time.monotonic() < deadline:
                time.sleep(0.1)
            assert worker_fds(b) <= fds_before, "descriptors left open"  # (no pipe or duplicate left behind)
            entry = b.wait_access_log(1)[-1]
            assert entry["status"] == 200 and MIB <= entry["bytes_out"] < (1 << 30)
            b.stop()
        finally:
            endless.close()


def test_body_from_an_https_backend_is_not_spliced(bastion, backend_factory, tmp_path):
    ca = trustme.CA()
    cert, key = server_cert_files(ca, tmp_path, "localhost")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    secure = backend_factory("secure", extra=["--cert", cert, "--key", key])
    b = bastion({"routes": [{"upstream": {"servers": [f"https://{secure.address}"],
                                          "tls": {"ca": str(ca_file), "server_name": "localhost"}}}]})
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
        s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (4 * MIB))
        head, body = read_response(s)
    assert head.startswith(b"HTTP/1.1 200") and body == expected_body(4 * MIB)  # plaintext, not TLS records
    time.sleep(1.5)  # (metrics are flushed every second)
    assert metric(b, "bastion_spliced_response_bytes_total") == 0


class H2LengthBackend(ThreadedServer):
    """A cleartext HTTP/2 server (prior knowledge, written with the h2 library) answering every request with
    a body of `size` bytes and a Content-Length, as nginx or Envoy do for a file."""

    def __init__(self, size: int):
        self.body = expected_body(size)
        super().__init__()

    def serve(self, sock):
        import h2.config
        import h2.connection
        import h2.events

        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        pending: dict[int, bytes] = {}  # stream -> body bytes the flow-control window has not let out yet
        sock.settimeout(10)
        sock.sendall(conn.data_to_send())
        while data := sock.recv(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    conn.send_headers(event.stream_id, [(":status", "200"), ("content-length", str(len(self.body))),
                                                        ("content-type", "application/octet-stream")])
                    pending[event.stream_id] = self.body
            for stream_id, rest in list(pending.items()):
                allowed = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                while rest and allowed > 0:
                    conn.send_data(stream_id, rest[:allowed])
                    rest = rest[allowed:]
                    allowed = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                if rest:
                    pending[stream_id] = rest
                else:
                    conn.end_stream(stream_id)
                    del pending[stream_id]
            sock.sendall(conn.data_to_send())


def test_body_with_a_length_from_an_http2_backend_is_streamed(bastion):
    # (an HTTP/2 backend's body is never spliced: it comes in DATA frames; the choice must not trip on it)
    for size in (1000, 3 * MIB):
        h2_backend = H2LengthBackend(size)
        try:
            b = bastion({"routes": [{"upstream": {"servers": [h2_backend.address], "protocol": "h2"}}]})
            with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
                s.sendall(b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n")
                head, body = read_response(s)
            assert head.startswith(b"HTTP/1.1 200") and body == expected_body(size)
            b.stop()
        finally:
            h2_backend.close()
