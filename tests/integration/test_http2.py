"""HTTP/2 towards clients: h2c with prior knowledge and h2 over TLS (ALPN), driven with curl, h2load and a
small client built on the h2 library; flow control, multiplexing, GOAWAY on reload and shutdown, and the
protections (concurrent streams, header list size, HPACK table size, rapid reset, CONTINUATION flood)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import time

import h2.config
import h2.connection
import h2.events
import pytest
import trustme
from hpack import Decoder, Encoder
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame

from tests.support.certs import server_cert_files
from tests.support.ports import free_port

PATTERN = b"0123456789abcdef" * 4096

pytestmark = pytest.mark.skipif(shutil.which("curl") is None or shutil.which("h2load") is None,
                                reason="curl and h2load (nghttp2-client) are installed by make test")


def expected_bytes(n: int) -> bytes:
    out = (PATTERN * (n // len(PATTERN) + 1))[:n]
    return out


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args], capture_output=True, timeout=timeout + 10)


class H2Client:
    """A blocking HTTP/2 client over one socket, on the h2 library (for what curl cannot show: several
    streams at once, flow control with a small window, GOAWAY)."""

    def __init__(self, port: int, window: int | None = None, tls_context: ssl.SSLContext | None = None):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls_context is not None:
            sock = tls_context.wrap_socket(sock, server_hostname="localhost")
            assert sock.selected_alpn_protocol() == "h2"
        self.sock = sock
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.sock.sendall(self.conn.data_to_send())
        self.responses: dict[int, dict] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.order: list[int] = []

    def request(self, path: str, method: str = "GET", body: bytes | None = None, headers=()) -> int:
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"http"),
                (b":authority", b"localhost")] + [(n.encode(), v.encode()) for n, v in headers]
        self.conn.send_headers(sid, hdrs, end_stream=body is None)
        self.sock.sendall(self.conn.data_to_send())
        self.responses[sid] = {"status": None, "headers": [], "body": b"", "trailers": None, "done": False, "reset": None}
        while body is not None:
            room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if room <= 0:
                self.pump(lambda: self.conn.local_flow_control_window(sid) > 0)
                continue
            piece, body = body[:room], body[room:]
            self.conn.send_data(sid, piece, end_stream=not body)
            self.sock.sendall(self.conn.data_to_send())
            if not body:
                break
        return sid

    def pump(self, until, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not until() and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
                break
            for event in self.conn.receive_data(data):
                self._event(event)
            out = self.conn.data_to_send()
            if out:
                try:
                    self.sock.sendall(out)
                except OSError:
                    pass

    def _event(self, event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            r = self.responses[event.stream_id]
            r["headers"] = event.headers
            r["status"] = int(dict(event.headers)[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.responses[event.stream_id]["body"] += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            self.responses[event.stream_id]["trailers"] = event.headers
        elif isinstance(event, h2.events.StreamEnded):
            self.responses[event.stream_id]["done"] = True
            self.order.append(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self.responses[event.stream_id]["reset"] = event.error_code
            self.responses[event.stream_id]["done"] = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    def wait(self, sid: int, timeout: float = 15) -> dict:
        self.pump(lambda: self.responses[sid]["done"], timeout)
        return self.responses[sid]

    def close(self) -> None:
        self.sock.close()


class RawH2:
    """Frames written by hand, for the attacks a well-behaved client library refuses to produce."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
        self.encoder = Encoder()
        self.buffer = b""

    def send(self, *frames: Frame) -> None:
        try:
            self.sock.sendall(b"".join(f.serialize() for f in frames))
        except OSError:
            pass  # the server may already have closed: what it sent before is still read below

    def headers(self, sid: int, path: str = "/echo", end_stream: bool = True, extra=()) -> HeadersFrame:
        frame = HeadersFrame(sid)
        frame.data = self.encoder.encode([(":method", "GET"), (":path", path), (":scheme", "http"),
                                          (":authority", "localhost"), *extra])
        frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame

    def read_frames(self, until, timeout: float = 15) -> tuple[list, bool]:
        """Frames until `until(frames)` is true or the connection closes (then True)."""
        frames: list = []
        deadline = time.monotonic() + timeout
        while not until(frames):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only got {frames}")
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return frames, True
            if not data:
                return frames, True
            self.buffer += data
            while len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                self.buffer = self.buffer[9 + length :]
                frames.append(frame)
        return frames, False

    def read_until_goaway(self, timeout: float = 15):
        """Frames until a GOAWAY, and whether the connection was closed after it."""
        deadline = time.monotonic() + timeout
        goaway = None
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                return goaway, True
            if not data:
                return goaway, True
            self.buffer += data
            while len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                self.buffer = self.buffer[9 + length :]
                if isinstance(frame, GoAwayFrame):
                    goaway = frame
        return goaway, False


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def tls_files(ca, tmp_path):
    cert_file, key_file = server_cert_files(ca, tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return cert_file, key_file, str(ca_file)


def plain_config(backend, **http2):
    config = {"routes": [{"match": {"path": "/local"}, "respond": {"body": "local answer\n"}},
                         {"upstream": {"servers": [backend.address]}}]}
    if http2:
        config["http2"] = http2
    return config


# -- the basics, with the tools a user has --------------------------------------------------------------------


def test_curl_prior_knowledge_on_cleartext(bastion, backend):
    b = bastion(plain_config(backend))
    r = curl("--http2-prior-knowledge", "-w", "\n%{http_version}", f"{b.url}/echo/a?x=1", "-H", "X-Test: yes")
    body, _, version = r.stdout.rpartition(b"\n")
    assert r.returncode == 0, r.stderr
    assert version == b"2"
    echoed = json.loads(body)
    assert echoed["path"] == "/echo/a?x=1"
    headers = {n.lower(): v for n, v in echoed["headers"]}
    assert headers["host"] == f"127.0.0.1:{b.port}"  # :authority became Host for the HTTP/1.1 backend
    assert headers["x-test"] == "yes"
    assert "te" not in headers and "connection" not in headers
    # a local answer, and plain HTTP/1.1 on the same listener still works
    r = curl("--http2-prior-knowledge", f"{b.url}/local")
    assert r.stdout == b"local answer\n"
    r = curl("--http1.1", "-w", "%{http_version}", "-o", "/dev/null", f"{b.url}/echo")
    assert r.stdout == b"1.1"
    log = b.wait_access_log(3)
    assert [line["status"] for line in log][:3] == [200, 200, 200]


def test_a_repeated_request_gets_the_same_answer_every_time(bastion, backend):
    # The same request and the same backend answer, one after the other on one connection: from the second time
    # on, the backend's head is one Bastion has seen before (bastion.http.known_heads), and a stream must still
    # get it as HTTP/2 frames. (Not with curl: 7.88 cannot reuse an h2c prior-knowledge connection.)
    b = bastion(plain_config(backend))
    client = H2Client(b.port)
    try:
        for _ in range(5):
            r = client.wait(client.request("/bytes/1000"))
            assert r["status"] == 200 and r["body"] == expected_bytes(1000)
    finally:
        client.close()


def test_curl_h2_over_tls_alpn_with_bodies(bastion, backend, tls_files, tmp_path):
    cert, key, ca_file = tls_files
    port = free_port()
    b = bastion({"listeners": [{"address": f"127.0.0.1:{port}", "tls": {"certificates": [{"cert": cert, "key": key}]}}],
                 "routes": [{"upstream": {"servers": [backend.address]}}]})
    url = f"https://localhost:{port}"
    resolve = f"localhost:{port}:127.0.0.1"
    upload = tmp_path / "upload.bin"
    upload.write_bytes(expected_bytes(3_000_000))
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    # with a Content-Length
    r = curl("--http2", "--cacert", ca_file, "--resolve", resolve, "-w", "\n%{http_version}", "--data-binary",
             f"@{upload}", f"{url}/upload")
    body, _, version = r.stdout.rpartition(b"\n")
    assert version == b"2", r.stderr
    assert json.loads(body) == {"length": 3_000_000, "sha256": digest}
    # without one (read from stdin): chunked towards the HTTP/1.1 backend
    with open(upload, "rb") as f:
        r = subprocess.run(["curl", "-sS", "--http2", "--cacert", ca_file, "--resolve", resolve, "-T", "-",
                            f"{url}/upload"], stdin=f, capture_output=True, timeout=60)
    assert json.loads(r.stdout) == {"length": 3_000_000, "sha256": digest}
    # a large download
    r = curl("--http2", "--cacert", ca_file, "--resolve", resolve, f"{url}/bytes/5000000")
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(expected_bytes(5_000_000)).hexdigest()
    # HTTP/1.1 clients still get HTTP/1.1 over the same TLS listener
    r = curl("--http1.1", "--cacert", ca_file, "--resolve", resolve, "-w", "%{http_version}", "-o", "/dev/null",
             f"{url}/echo")
    assert r.stdout == b"1.1"


def test_h2load_many_multiplexed_requests(bastion, backend, tls_files):
    cert, key, _ = tls_files
    port = free_port()
    b = bastion({"listeners": [f"127.0.0.1:{free_port()}",
                               {"address": f"127.0.0.1:{port}", "tls": {"certificates": [{"cert": cert, "key": key}]}}],
                 "routes": [{"upstream": {"servers": [backend.address]}}]})
    for url in (f"{b.url}/echo", f"https://127.0.0.1:{port}/echo"):
        out = subprocess.run(["h2load", "-n", "1000", "-c", "4", "-m", "10", url], capture_output=True, text=True,
                             timeout=120).stdout
        assert "1000 succeeded, 0 failed" in out, out
        assert "status codes: 1000 2xx" in out, out


def test_streams_are_multiplexed_and_flow_controlled(bastion, backend):
    b = bastion(plain_config(backend))
    client = H2Client(b.port, window=16384)  # a small window: Bastion must wait for WINDOW_UPDATEs
    try:
        slow = client.request("/delay/1.5")
        big = client.request("/bytes/1000000")
        fast = client.request("/local")
        assert client.wait(fast)["body"] == b"local answer\n"
        assert not client.responses[slow]["done"]  # the slow one did not hold up the others
        r = client.wait(big)
        assert r["status"] == 200 and r["body"] == expected_bytes(1_000_000)
        assert client.wait(slow)["body"] == b"ok"
        assert client.order.index(slow) == 2
        # a POST body in DATA frames
        body = expected_bytes(200_000)
        sid = client.request("/upload", "POST", body)
        assert json.loads(client.wait(sid)["body"]) == {"length": 200_000, "sha256": hashlib.sha256(body).hexdigest()}
    finally:
        client.close()


def _settled(raw: RawH2) -> RawH2:
    """Once the server's SETTINGS arrived, the preface has been read: what follows is read as frames
    alone (the frames of the first read, preface included, are all h2's)."""
    raw.read_frames(lambda fs: any(isinstance(f, SettingsFrame) for f in fs))
    return raw


def _answers(raw: RawH2, sids) -> dict[int, bytes]:
    """The body each stream got, once every one of `sids` has ended."""
    frames, _ = raw.read_frames(lambda fs: {f.stream_id for f in fs if "END_STREAM" in f.flags} >= set(sids))
    bodies: dict[int, bytes] = {sid: b"" for sid in sids}
    for f in frames:
        if isinstance(f, DataFrame):
            bodies[f.stream_id] += f.data
    return bodies


def test_request_streams_opened_in_one_read_with_every_header_frame_form(bastion, backend):
    """Bastion opens streams from plain HEADERS frames itself and leaves every other frame to h2: requests
    with PRIORITY or PADDED flags, in HEADERS + CONTINUATION, or with a body in DATA, sent in one write,
    are all answered, each on its stream."""
    b = bastion(plain_config(backend))
    raw = _settled(RawH2(b.port))
    plain = raw.headers(1, "/echo/plain")
    prioritized = raw.headers(3, "/echo/prioritized")
    prioritized.flags.add("PRIORITY")
    prioritized.depends_on, prioritized.stream_weight = 1, 15
    padded = raw.headers(5, "/echo/padded")
    padded.flags.add("PADDED")
    padded.pad_length = 7
    split = raw.headers(7, "/echo/split")
    split.flags.discard("END_HEADERS")
    cont = ContinuationFrame(7)
    cont.data, split.data = split.data[4:], split.data[:4]
    cont.flags.add("END_HEADERS")
    with_body = raw.headers(9, "/echo/body", end_stream=False, extra=[("content-length", "5")])
    data = DataFrame(9)
    data.data = b"hello"
    data.flags.add("END_STREAM")
    after = raw.headers(11, "/echo/after")
    raw.send(plain, prioritized, padded, split, cont, with_body, data, after)
    bodies = _answers(raw, [1, 3, 5, 7, 9, 11])
    for sid, name in [(1, "plain"), (3, "prioritized"), (5, "padded"), (7, "split"), (11, "after")]:
        assert json.loads(bodies[sid])["path"] == f"/echo/{name}", sid
    echoed = json.loads(bodies[9])
    assert echoed["method"] == "GET" and echoed["path"] == "/echo/body"


@pytest.mark.parametrize("sids", [(2,), (5, 3)], ids=["even id", "id going down"])
def test_a_bad_stream_id_is_a_connection_error(bastion, backend, sids):
    b = bastion(plain_config(backend))
    raw = _settled(RawH2(b.port))
    raw.send(*[raw.headers(sid, "/echo/x") for sid in sids])
    goaway, closed = raw.read_until_goaway()
    assert goaway is not None and goaway.error_code == 1  # PROTOCOL_ERROR
    assert closed


def test_a_stream_depending_on_itself_is_an_error(bastion, backend):
    b = bastion(plain_config(backend))
    raw = _settled(RawH2(b.port))
    frame = raw.headers(1, "/echo/x")
    frame.flags.add("PRIORITY")
    frame.depends_on = 1
    raw.send(frame)
    frames, closed = raw.read_frames(lambda fs: any(isinstance(f, (GoAwayFrame, RstStreamFrame)) for f in fs))
    error = next(f for f in frames if isinstance(f, (GoAwayFrame, RstStreamFrame)))
    assert error.error_code == 1  # PROTOCOL_ERROR (RFC 9113 5.3.1)
    assert not any(isinstance(f, DataFrame) for f in frames)


def test_request_header_limits_answer_on_the_stream(bastion, backend):
    b = bastion({**plain_config(backend), "limits": {"header_count": 10}})
    client = H2Client(b.port)
    try:
        sid = client.request("/echo", headers=[(f"x-h{i}", "v") for i in range(20)])
        assert client.wait(sid)["status"] == 431
        sid = client.request("/echo")  # the connection stays usable
        assert client.wait(sid)["status"] == 200
    finally:
        client.close()


# -- GOAWAY on reload and shutdown ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["reload", "shutdown"])
def test_goaway_lets_inflight_streams_finish(bastion, backend, how):
    b = bastion(plain_config(backend))
    raw = RawH2(b.port)  # frame by frame: the h2 library itself stops reading at a GOAWAY
    raw.send(raw.headers(1, "/delay/1.5"))
    time.sleep(0.3)  # the request is at the backend
    if how == "reload":
        b.reload()
    else:
        b.proc.send_signal(15)
    frames, closed = raw.read_frames(lambda fs: any(isinstance(f, GoAwayFrame) for f in fs))
    goaway = [f for f in frames if isinstance(f, GoAwayFrame)][0]
    assert goaway.error_code == 0 and goaway.last_stream_id == 1
    # a stream opened after the GOAWAY is refused; the one in flight finishes
    raw.send(raw.headers(3, "/echo"))
    more, closed = raw.read_frames(lambda fs: any("END_STREAM" in f.flags and f.stream_id == 1 for f in fs))
    frames += more
    data = b"".join(f.data for f in frames if f.type == 0 and f.stream_id == 1)
    assert data == b"ok"
    headers = [f for f in frames if isinstance(f, HeadersFrame) and f.stream_id == 1]
    assert headers and dict(Decoder().decode(headers[0].data, raw=True))[b":status"] == b"200"
    rest, closed = raw.read_frames(lambda fs: False, timeout=10)  # then the connection closes
    assert closed
    refused = [f for f in frames + rest if isinstance(f, RstStreamFrame) and f.stream_id == 3]
    assert refused and refused[0].error_code == 7  # REFUSED_STREAM: safe for the client to retry


# -- protection -------------------------------------------------------------------------------------------------


def test_concurrent_stream_limit(bastion, backend):
    b = bastion(plain_config(backend, max_concurrent_streams=2))
    raw = RawH2(b.port)
    raw.send(raw.headers(1, "/delay/2"), raw.headers(3, "/delay/2"), raw.headers(5, "/delay/2"))
    goaway, closed = raw.read_until_goaway()
    assert goaway is not None and goaway.error_code != 0
    assert closed


def test_header_list_size_limit(bastion, backend):
    b = bastion(plain_config(backend, max_header_list_size=4096))
    raw = RawH2(b.port)
    raw.send(raw.headers(1, extra=[("x-big", "v" * 8000)]))
    goaway, closed = raw.read_until_goaway()
    assert goaway is not None and goaway.error_code != 0
    assert closed


def test_hpack_table_size_limit(bastion, backend):
    b = bastion(plain_config(backend, header_table_size=4096))
    raw = RawH2(b.port)
    raw.encoder.header_table_size = 65536  # the next block announces a table larger than Bastion allows
    raw.send(raw.headers(1))
    goaway, closed = raw.read_until_goaway()
    assert goaway is not None and goaway.error_code in (1, 9)  # PROTOCOL_ERROR or COMPRESSION_ERROR
    assert closed


def test_rapid_reset_closes_the_connection(bastion, backend):
    b = bastion(plain_config(backend, max_client_resets=50))
    raw = RawH2(b.port)
    frames = []
    for i in range(200):
        sid = 1 + 2 * i
        frames.append(raw.headers(sid, "/delay/5", end_stream=False))
        rst = RstStreamFrame(sid)
        rst.error_code = 8  # CANCEL
        frames.append(rst)
    raw.send(*frames)
    goaway, closed = raw.read_until_goaway()
    assert goaway is not None and goaway.error_code == 11  # ENHANCE_YOUR_CALM
    assert closed
    # the proxy is fine afterwards
    r = curl("--http2-prior-knowledge", f"{b.url}/local")
    assert r.stdout == b"local answer\n"


def test_continuation_flood_closes_the_connection(bastion, backend):
    b = bastion(plain_config(backend))
    raw = RawH2(b.port)
    first = raw.headers(1)
    first.flags.discard("END_HEADERS")
    frames = [first]
    for _ in range(500):
        cont = ContinuationFrame(1)
        cont.data = raw.encoder.encode([("x-flood", "x" * 100)])
        frames.append(cont)
    raw.send(*frames)
    goaway, closed = raw.read_until_goaway()
    assert goaway is not None and goaway.error_code != 0
    assert closed


def test_http2_can_be_turned_off(bastion, backend):
    b = bastion(plain_config(backend, cleartext=False))
    r = curl("--http2-prior-knowledge", f"{b.url}/local")
    assert r.returncode != 0 or r.stdout != b"local answer\n"


def test_a_stalled_request_body_times_out_on_its_stream(bastion, backend):
    b = bastion({**plain_config(backend), "timeouts": {"client_body": "1s"}})
    raw = RawH2(b.port)
    raw.send(raw.headers(1, "/upload", end_stream=False))  # a body is announced, and never sent
    started = time.monotonic()
    frames, closed = raw.read_frames(lambda fs: any(isinstance(f, HeadersFrame) and f.stream_id == 1 for f in fs))
    head = [f for f in frames if isinstance(f, HeadersFrame) and f.stream_id == 1][0]
    assert dict(Decoder().decode(head.data, raw=True))[b":status"] == b"408"
    assert 0.9 < time.monotonic() - started < 10
    assert not closed  # only the stream ended
    raw.send(raw.headers(3, "/local"))
    frames, _ = raw.read_frames(lambda fs: any("END_STREAM" in f.flags and f.stream_id == 3 for f in fs))
    assert b"".join(f.data for f in frames if f.type == 0 and f.stream_id == 3) == b"local answer\n"


@pytest.mark.parametrize("fields", [
    [("X-Upper", "v")],                     # names are lower case on HTTP/2
    [("x-bad", "a\r\nx-injected: 1")],      # CR/LF would split the header towards an HTTP/1.1 backend
    [("connection", "close")],              # connection-specific
    [("te", "gzip")],                       # TE other than "trailers"
    [(":path", "/again")],                  # a pseudo-header twice
    [("x-a", "1"), (":custom", "x")],       # an unknown pseudo-header, after a regular field
])
def test_malformed_requests_get_400_and_are_not_forwarded(bastion, backend, fields):
    b = bastion(plain_config(backend))
    backend.reset()
    raw = RawH2(b.port)
    frame = HeadersFrame(1)
    frame.data = raw.encoder.encode([(":method", "GET"), (":path", "/echo"), (":scheme", "http"),
                                     (":authority", "localhost"), *fields])
    frame.flags.add("END_HEADERS")
    frame.flags.add("END_STREAM")
    raw.send(frame)
    frames, closed = raw.read_frames(lambda fs: any(isinstance(f, HeadersFrame) and f.stream_id == 1 for f in fs))
    head = [f for f in frames if isinstance(f, HeadersFrame) and f.stream_id == 1][0]
    assert dict(Decoder().decode(head.data, raw=True))[b":status"] == b"400"
    assert backend.stats() == 0
    raw.send(raw.headers(3, "/local"))  # the connection goes on
    frames, _ = raw.read_frames(lambda fs: any("END_STREAM" in f.flags and f.stream_id == 3 for f in fs))
    assert b"".join(f.data for f in frames if f.type == 0 and f.stream_id == 3) == b"local answer\n"


def test_a_bad_content_length_is_a_connection_error(bastion, backend):
    b = bastion(plain_config(backend))
    backend.reset()
    raw = RawH2(b.port)
    raw.send(raw.headers(1, "/upload", end_stream=False, extra=[("content-length", "12x")]))
    goaway, closed = raw.read_until_goaway()
    assert goaway is not None and goaway.error_code == 1 and closed  # PROTOCOL_ERROR, from h2
    assert backend.stats() == 0


def test_via_names_the_protocol_version_received(bastion, backend):
    b = bastion(plain_config(backend))
    client = H2Client(b.port)
    first = client.request("/echo/h2")
    relayed = client.request("/echo/h2", headers=[("via", "1.1 cdn")])
    seen = {}
    for sid in (first, relayed):
        r = client.wait(sid)
        assert r["status"] == 200
        seen[sid] = [v for n, v in json.loads(r["body"])["headers"] if n.lower() == "via"]
    client.close()
    assert seen[first] == ["2 bastion"]
    assert seen[relayed] == ["1.1 cdn, 2 bastion"]
    # HTTP/1.0 and HTTP/1.1 clients on the same process keep their own version
    for version in ("1.0", "1.1"):
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as sock:
            sock.sendall(f"GET /echo/h1 HTTP/{version}\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        headers = json.loads(raw.split(b"\r\n\r\n", 1)[1])["headers"]
        assert [v for n, v in headers if n.lower() == "via"] == [f"{version} bastion"]


def test_a_header_block_trickled_in_continuation_frames_times_out(bastion, backend):
    """HEADERS without END_HEADERS, then one CONTINUATION a second, never ending: the connection gets a
    GOAWAY once timeouts.client_header has passed (long before h2's 64-frame limit would stop it)."""
    b = bastion({**plain_config(backend), "timeouts": {"client_header": "2s"}})
    backend.reset()
    raw = RawH2(b.port)
    first = raw.headers(1, end_stream=True)
    first.flags.discard("END_HEADERS")
    raw.send(first)
    started = time.monotonic()
    goaway = None
    closed = False
    for _ in range(30):  # bounded: 30 s at most
        cont = ContinuationFrame(1)
        cont.data = raw.encoder.encode([("x-slow", "y")])
        raw.send(cont)
        goaway, closed = raw.read_until_goaway(timeout=1.0)
        if goaway is not None or closed:
            break
    waited = time.monotonic() - started
    if goaway is not None and not closed:
        _, closed = raw.read_until_goaway(timeout=5)
    assert goaway is not None and goaway.error_code == 1  # PROTOCOL_ERROR
    assert closed
    assert 1.5 < waited < 8
    assert backend.stats() == 0
    r = curl("--http2-prior-knowledge", f"{b.url}/local")  # the proxy serves the next client
    assert r.stdout == b"local answer\n"


def test_client_goaway_while_remembered_responses_arrive(bastion, backend):
    """A client that sends GOAWAY with streams in flight (as h2load does when it stops): the backend's
    answers to those streams, whose heads Bastion already knows, meet a connection that takes no more data.
    Each such stream ends quietly, its backend connection is let go, and everything after is served."""
    b = bastion(plain_config(backend))
    for _ in range(3):
        raw = RawH2(b.port)
        raw.send(raw.headers(1, "/bytes/1024"))  # the backend's head is remembered from here on
        raw.read_frames(lambda fs: any("END_STREAM" in f.flags and f.stream_id == 1 for f in fs))
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = 1
        raw.send(*[raw.headers(sid, "/bytes/1024") for sid in range(3, 43, 2)], goaway)
        raw.read_frames(lambda fs: False, timeout=3)
        raw.sock.close()
    client = H2Client(b.port)
    for sid in [client.request("/bytes/1024") for _ in range(40)]:
        r = client.wait(sid, timeout=5)
        assert r["status"] == 200 and len(r["body"]) == 1024
    client.close()
    for _ in range(20):
        assert curl(f"{b.url}/bytes/1024").stdout == PATTERN[:1024]
    err = b.stderr()
    assert "Traceback" not in err and "Fatal error" not in err, err[-3000:]
