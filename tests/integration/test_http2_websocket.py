"""WebSockets over HTTP/2 (RFC 8441, extended CONNECT): a client on the h2 library opens `:method CONNECT`
`:protocol websocket` streams through a real Bastion to real backends (the aiohttp WebSocket echo, and raw
socket backends where the test must see or control the backend's bytes), and exchanges real WebSocket
frames (built and parsed by the `websockets` library's sans-I/O frame code)."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import ssl
import threading
import time
import urllib.request

import h2.config
import h2.connection
import h2.events
import h2.settings
import trustme
from hyperframe.frame import Frame as HyperFrame, GoAwayFrame
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.streams import StreamReader

from tests.support.certs import server_cert_files
from tests.support.ports import free_port
from tests.support.raw import RecordingServer, ThreadedServer

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class H2WebSocketClient:
    """One HTTP/2 connection (h2c, prior knowledge) with any number of streams, some of them WebSockets."""

    def __init__(self, port: int, window: int | None = None, auto_ack: bool = True, tls: ssl.SSLContext | None = None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
            assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.auto_ack = auto_ack
        self.streams: dict[int, dict] = {}
        self.settings_seen = False
        self.closed = False
        self.goaway = None
        self._send()
        self.pump(lambda: self.settings_seen)

    @property
    def extended_connect(self) -> int:
        return self.conn.remote_settings.enable_connect_protocol

    def _send(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def _new_stream(self, sid: int) -> dict:
        self.streams[sid] = {"status": None, "headers": {}, "body": bytearray(), "ended": False, "reset": None,
                             "frames": [], "reader": StreamReader(), "parser": None, "unacked": 0, "ws": False}
        return self.streams[sid]

    def open_websocket(self, path: str = "/ws", extra=(), protocol: str = "websocket", method: str = "CONNECT",
                       frames: bool = True) -> int:
        """frames: parse what arrives as WebSocket frames (else it is only collected, as bytes)."""
        sid = self.conn.get_next_available_stream_id()
        self._new_stream(sid)["ws"] = frames
        headers = [(b":method", method.encode()), (b":protocol", protocol.encode()), (b":scheme", b"http"),
                   (b":path", path.encode()), (b":authority", b"localhost"), (b"sec-websocket-version", b"13")]
        headers += [(n.encode(), v.encode()) for n, v in extra]
        self.conn.send_headers(sid, headers)
        self._send()
        return sid

    def request(self, path: str, headers=None) -> int:
        sid = self.conn.get_next_available_stream_id()
        self._new_stream(sid)
        self.conn.send_headers(sid, headers or [(b":method", b"GET"), (b":scheme", b"http"), (b":path", path.encode()),
                                                (b":authority", b"localhost")], end_stream=True)
        self._send()
        return sid

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        """DATA within the flow-control windows, waiting for credit when they are used up."""
        while True:
            room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if room <= 0 and data:
                self.pump(lambda: self.conn.local_flow_control_window(sid) > 0)
                continue
            piece, data = data[:room], data[room:]
            self.conn.send_data(sid, piece, end_stream=end and not data)
            self._send()
            if not data:
                return

    def send_message(self, sid: int, message: bytes | str) -> None:
        opcode = Opcode.TEXT if isinstance(message, str) else Opcode.BINARY
        data = message.encode() if isinstance(message, str) else message
        self.send(sid, Frame(opcode, data).serialize(mask=True))

    def reset(self, sid: int) -> None:
        self.conn.reset_stream(sid)
        self._send()

    def ack(self, sid: int) -> None:
        s = self.streams[sid]
        if s["unacked"] and not s["ended"]:
            self.conn.acknowledge_received_data(s["unacked"], sid)
            s["unacked"] = 0
            self._send()

    def pump(self, until, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if self.closed:
                raise ConnectionError("connection closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
                continue
            for event in self.conn.receive_data(data):
                self._event(event)
            self._send()

    def _event(self, event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_seen = True
        elif isinstance(event, h2.events.ResponseReceived):
            s = self.streams[event.stream_id]
            s["headers"] = dict(event.headers)
            s["status"] = int(s["headers"][b":status"])
        elif isinstance(event, h2.events.DataReceived):
            s = self.streams[event.stream_id]
            s["body"] += event.data
            if self.auto_ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                s["unacked"] += event.flow_controlled_length
            if s["ws"] and s["status"] == 200:
                s["reader"].feed_data(event.data)
                self._parse(s)
        elif isinstance(event, h2.events.StreamEnded):
            self.streams[event.stream_id]["ended"] = True
        elif isinstance(event, h2.events.StreamReset):
            s = self.streams[event.stream_id]
            s["reset"] = event.error_code
            s["ended"] = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    @staticmethod
    def _parse(s) -> None:
        while True:
            if s["parser"] is None:
                s["parser"] = Frame.parse(s["reader"].read_exact, mask=False, max_size=None)
            try:
                next(s["parser"])
                return  # the frame is not complete yet
            except StopIteration as done:
                s["parser"] = None
                s["frames"].append(done.value)

    def wait_head(self, sid: int) -> dict:
        self.pump(lambda: self.streams[sid]["status"] is not None or self.streams[sid]["ended"])
        return self.streams[sid]

    def wait_end(self, sid: int, timeout: float = 15) -> dict:
        self.pump(lambda: self.streams[sid]["ended"], timeout)
        return self.streams[sid]

    def receive_frame(self, sid: int, timeout: float = 15) -> Frame:
        s = self.streams[sid]
        self.pump(lambda: s["frames"] or s["ended"], timeout)
        assert s["frames"], f"stream ended: {s['reset']}"
        return s["frames"].pop(0)

    def close(self) -> None:
        self.sock.close()


class TunnelBackend(ThreadedServer):
    """A raw backend: accepts an HTTP/1.1 WebSocket Upgrade with a correct 101 (or `answer`), records the
    request head, then runs `after(sock, self)` on the socket."""

    def __init__(self, after, answer: bytes | None = None):
        self.after = after
        self.answer = answer
        self.heads: list[bytes] = []
        self.events: list[str] = []
        self.sent = 0
        super().__init__()

    def serve(self, conn):
        conn.settimeout(30)
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            self.heads.append(head)
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            conn.sendall(self.answer or (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"))
            if rest:
                self.events.append("early:" + rest.decode())
            self.after(conn, self)
        except OSError as exc:
            self.events.append(f"error:{exc.__class__.__name__}")


def wait_for(condition, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def config_for(address: str, **route) -> dict:
    return {"routes": [{"match": {"path": "/local"}, "respond": {"body": "local answer\n"}},
                       {"upstream": {"servers": [address]}, **route}]}


def test_websocket_over_http2_echoes_through_the_backend(bastion, backend):
    b = bastion(config_for(backend.address))
    client = H2WebSocketClient(b.port, window=16384)  # a small window: the backend's answers must wait for credit
    assert client.extended_connect == 1
    sid = client.open_websocket("/ws", extra=[("sec-websocket-protocol", "chat, other"), ("origin", "http://localhost")])
    head = client.wait_head(sid)
    assert head["status"] == 200
    assert head["headers"][b"sec-websocket-protocol"] == b"chat"
    assert b"sec-websocket-accept" not in head["headers"] and b"upgrade" not in head["headers"]
    big = bytes(range(256)) * 4096  # 1 MiB: many windows' worth, both ways
    for message in ["hello", b"\x00\x01\x02binary", "x" * 70_000, big]:
        client.send_message(sid, message)
        frame = client.receive_frame(sid, timeout=30)
        expected = message.encode() if isinstance(message, str) else message
        assert frame.opcode == (Opcode.TEXT if isinstance(message, str) else Opcode.BINARY)
        assert frame.data == expected
    # The WebSocket closing handshake, then the backend closes: the stream ends
    client.send(sid, Frame(Opcode.CLOSE, Close(CloseCode.NORMAL_CLOSURE, "bye").serialize()).serialize(mask=True))
    frame = client.receive_frame(sid)
    assert frame.opcode == Opcode.CLOSE
    s = client.wait_end(sid)
    assert s["reset"] in (None, 0)
    client.close()
    line = b.wait_access_log(1)[-1]
    assert line["status"] == 200 and line["method"] == "GET" and line["target"] == "/ws"
    assert line["bytes_in"] > 1_000_000 and line["bytes_out"] > 1_000_000


def test_the_backend_gets_an_http11_upgrade_and_bytes_flow_both_ways(bastion):
    def echo_until_eof(sock, server):
        while True:
            data = sock.recv(65536)
            if not data:
                server.events.append("eof")
                sock.sendall(b"bye")  # a half-closed tunnel still carries the other way
                return
            sock.sendall(data)

    server = TunnelBackend(echo_until_eof)
    try:
        b = bastion(config_for(server.address))
        client = H2WebSocketClient(b.port)
        sid = client.open_websocket("/chat?room=1", frames=False, extra=[("sec-websocket-key", "Y2xpZW50LWtleQ=="),
                                                            ("sec-websocket-extensions", "permessage-deflate")])
        assert client.wait_head(sid)["status"] == 200
        lines = server.heads[0].split(b"\r\n")
        assert lines[0] == b"GET /chat?room=1 HTTP/1.1"
        fields = [tuple(p.strip() for p in line.split(b":", 1)) for line in lines[1:]]
        names = [n.lower() for n, _ in fields]
        values = {n.lower(): v for n, v in fields}
        assert values[b"upgrade"].lower() == b"websocket" and values[b"connection"].lower() == b"upgrade"
        assert values[b"sec-websocket-version"] == b"13"
        assert values[b"sec-websocket-extensions"] == b"permessage-deflate"
        assert values[b"host"] == b"localhost"
        assert names.count(b"sec-websocket-key") == 1 and values[b"sec-websocket-key"] != b"Y2xpZW50LWtleQ=="
        assert len(base64.b64decode(values[b"sec-websocket-key"])) == 16
        client.send(sid, b"raw bytes, not even frames")
        client.pump(lambda: client.streams[sid]["body"] == b"raw bytes, not even frames")
        client.send(sid, b"", end=True)  # END_STREAM: the backend sees the end of its input ...
        assert wait_for(lambda: "eof" in server.events)
        s = client.wait_end(sid)  # ... answers, closes, and the stream ends
        assert s["body"].endswith(b"bye") and s["reset"] in (None, 0)
        client.close()
    finally:
        server.close()


def test_rst_stream_closes_the_backend_and_other_streams_go_on(bastion, backend):
    def read_until_closed(sock, server):
        server.events.append("open")
        while sock.recv(65536):
            pass
        server.events.append("closed")

    server = TunnelBackend(read_until_closed)
    try:
        config = config_for(backend.address)
        config["routes"].insert(0, {"match": {"path": {"prefix": "/tunnel"}}, "upstream": {"servers": [server.address]}})
        b = bastion(config)
        client = H2WebSocketClient(b.port)
        echo = client.open_websocket("/ws")
        tunnel = client.open_websocket("/tunnel", frames=False)
        assert client.wait_head(echo)["status"] == 200, server.heads
        assert client.wait_head(tunnel)["status"] == 200, server.heads
        # plain requests on the same connection while two tunnels are open
        for i in range(3):
            sid = client.request(f"/echo/{i}")
            r = client.wait_end(sid)
            assert r["status"] == 200 and json.loads(r["body"])["path"] == f"/echo/{i}"
            client.send_message(echo, f"message {i}")
            assert client.receive_frame(echo).data == f"message {i}".encode()
        local = client.request("/local")
        assert client.wait_end(local)["body"] == b"local answer\n"
        client.reset(tunnel)
        assert wait_for(lambda: "closed" in server.events)
        client.send_message(echo, "still here")
        assert client.receive_frame(echo).data == b"still here"
        client.close()
    finally:
        server.close()


def test_a_backend_refusing_the_upgrade_answers_normally(bastion, backend):
    b = bastion(config_for(backend.address))
    client = H2WebSocketClient(b.port)
    refused = client.open_websocket("/status/403", frames=False)
    s = client.wait_end(refused)
    assert s["status"] == 403 and s["body"] == b"status 403\n"
    # a backend that answers 200 without switching: the client must not take it for an open tunnel
    ignored = client.open_websocket("/echo/not-a-websocket", frames=False)
    s = client.wait_end(ignored)
    assert s["status"] == 502
    # a local 2xx (a `respond` route) would read as an open tunnel: the route cannot do WebSocket
    local = client.open_websocket("/local", frames=False)
    assert client.wait_end(local)["status"] == 501
    ok = client.request("/echo/after")
    assert client.wait_end(ok)["status"] == 200
    client.close()


def test_a_wrong_sec_websocket_accept_is_a_bad_gateway(bastion):
    server = RecordingServer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBvbmU=\r\n\r\n")
    try:
        b = bastion(config_for(server.address))
        client = H2WebSocketClient(b.port)
        sid = client.open_websocket("/ws")
        s = client.wait_end(sid)
        assert s["status"] == 502
        assert b"sec-websocket-key:" in server.received().lower()
        client.close()
    finally:
        server.close()


def test_the_backend_is_not_read_while_the_client_gives_no_credit(bastion):
    total = 32 * 1024 * 1024

    def send_a_lot(sock, server):
        piece = b"z" * 65536
        while server.sent < total:
            sock.sendall(piece)
            server.sent += len(piece)
        server.events.append("all sent")
        sock.recv(1)

    server = TunnelBackend(send_a_lot)
    try:
        b = bastion(config_for(server.address))
        client = H2WebSocketClient(b.port, window=65535, auto_ack=False)
        sid = client.open_websocket("/download", frames=False)
        assert client.wait_head(sid)["status"] == 200
        client.pump(lambda: len(client.streams[sid]["body"]) >= 65535 - 1024)
        time.sleep(1.5)  # whatever Bastion would read from the backend meanwhile, it must not (window used up)
        stalled_at = server.sent
        assert stalled_at < total // 2, stalled_at  # socket buffers hold a few MiB; Bastion holds no more
        assert len(client.streams[sid]["body"]) <= 65535
        # credit for everything: the rest arrives, and the backend gets to send it all
        client.auto_ack = True
        client.ack(sid)
        client.conn.increment_flow_control_window(total, stream_id=sid)
        client.conn.increment_flow_control_window(total)
        client._send()
        client.pump(lambda: len(client.streams[sid]["body"]) >= total, timeout=60)
        assert len(client.streams[sid]["body"]) == total
        assert "all sent" in server.events
        client.close()
    finally:
        server.close()


def test_an_idle_websocket_stream_is_ended(bastion, backend):
    b = bastion(config_for(backend.address, timeouts={"websocket_idle": "1s"}))
    client = H2WebSocketClient(b.port)
    sid = client.open_websocket("/ws")
    assert client.wait_head(sid)["status"] == 200
    client.send_message(sid, "hi")
    assert client.receive_frame(sid).data == b"hi"
    started = time.monotonic()
    client.wait_end(sid, timeout=10)
    assert 0.5 < time.monotonic() - started < 5
    ok = client.request("/local")  # the connection stays usable
    assert client.wait_end(ok)["body"] == b"local answer\n"
    client.close()


def test_extended_connect_is_offered_only_when_a_route_allows_websocket(bastion, backend):
    b = bastion(config_for(backend.address, upgrade=[]))
    client = H2WebSocketClient(b.port)
    assert client.extended_connect == 0
    client.conn.remote_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1  # a client that sends it anyway
    sid = client.open_websocket("/ws")
    assert client.wait_end(sid)["status"] == 400
    client.close()


def test_routes_and_protocols_that_do_not_allow_websocket(bastion, backend):
    config = config_for(backend.address)
    config["routes"].insert(0, {"match": {"path": {"prefix": "/closed"}}, "upgrade": [], "upstream": {"servers": [backend.address]}})
    config["routes"].insert(0, {"match": {"path": {"prefix": "/h2"}}, "upstream": {"servers": [backend.address], "protocol": "h2"}})
    b = bastion(config)
    backend.reset()
    client = H2WebSocketClient(b.port)
    assert client.extended_connect == 1
    assert client.wait_end(client.open_websocket("/closed/ws"))["status"] == 501
    assert client.wait_end(client.open_websocket("/h2/ws"))["status"] == 501  # HTTP/2 backends: not (yet) RFC 8441 to them
    assert client.wait_end(client.open_websocket("/ws", protocol="connect-udp"))["status"] == 501
    # a plain CONNECT (a TCP tunnel to :authority) is not something Bastion opens
    plain = client.request("", headers=[(b":method", b"CONNECT"), (b":authority", b"example.com:443")])
    assert client.wait_end(plain)["status"] == 501
    assert backend.stats() == 0
    client.close()


def test_the_client_gets_no_credit_while_the_backend_does_not_read(bastion):
    total = 32 * 1024 * 1024
    go = threading.Event()

    def read_later(sock, server):
        go.wait(30)
        received = 0
        while received < total:
            data = sock.recv(1 << 20)
            if not data:
                break
            received += len(data)
        server.events.append(f"received {received}")

    server = TunnelBackend(read_later)
    try:
        b = bastion(config_for(server.address))
        client = H2WebSocketClient(b.port)
        sid = client.open_websocket("/upload", frames=False)
        assert client.wait_head(sid)["status"] == 200
        piece = b"u" * 16384
        sent = 0
        last_progress = time.monotonic()
        while time.monotonic() - last_progress < 1.5:  # until the windows stay shut for 1.5 s
            room = min(client.conn.local_flow_control_window(sid), client.conn.max_outbound_frame_size)
            if room >= len(piece) and sent < total:
                client.conn.send_data(sid, piece)
                client._send()
                sent += len(piece)
                last_progress = time.monotonic()
                continue
            try:
                client.pump(lambda: False, timeout=0.2)
            except TimeoutError:
                pass
        assert sent < total // 2, sent  # socket buffers hold a few MiB; past them the client gets no credit
        go.set()
        client.send(sid, b"u" * (total - sent))
        assert wait_for(lambda: f"received {total}" in server.events, timeout=30), server.events
        client.close()
    finally:
        go.set()
        server.close()


def open_tunnels(b) -> float:
    with urllib.request.urlopen(b.admin_url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("bastion_open_tunnels"):
                return float(line.split()[-1])
    return -1.0


def test_websocket_over_http2_over_tls(bastion, backend, tmp_path):
    ca = trustme.CA()
    cert_file, key_file = server_cert_files(ca, tmp_path)
    port = free_port()
    b = bastion({"listeners": [{"address": f"127.0.0.1:{port}",
                                "tls": {"certificates": [{"cert": cert_file, "key": key_file}]}}],
                 "routes": [{"upstream": {"servers": [backend.address]}}]})
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["h2"])
    client = H2WebSocketClient(port, tls=context)
    assert client.extended_connect == 1
    sid = client.open_websocket("/ws")
    assert client.wait_head(sid)["status"] == 200
    for i in range(5):
        client.send_message(sid, f"over tls {i}")
        assert client.receive_frame(sid).data == f"over tls {i}".encode()
    assert open_tunnels(b) == 1
    client.reset(sid)  # the client cancels the stream: the tunnel is gone
    assert wait_for(lambda: open_tunnels(b) == 0)
    line = b.wait_access_log(1)[-1]
    assert line["status"] == 200 and line["target"] == "/ws" and not line.get("error")
    client.close()


def read_raw_frames(sock, until, timeout: float = 15) -> tuple[list, bool]:
    """Frames parsed from the socket without h2 (whose state machine stops at a GOAWAY, although the streams
    it names may go on), until `until(frames)` or the connection closes (then True)."""
    frames: list = []
    buffer = b""
    deadline = time.monotonic() + timeout
    while not until(frames):
        if time.monotonic() > deadline:
            raise TimeoutError(f"only got {frames}")
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return frames, True
        if not data:
            return frames, True
        buffer += data
        while len(buffer) >= 9:
            frame, length = HyperFrame.parse_frame_header(memoryview(buffer[:9]))
            if len(buffer) < 9 + length:
                break
            frame.parse_body(memoryview(buffer[9 : 9 + length]))
            buffer = buffer[9 + length :]
            frames.append(frame)
    return frames, False


def test_a_websocket_stream_outlives_a_reload_until_it_ends(bastion):
    def tick(sock, server):
        for _ in range(15):  # 3 s of ticks, then the backend ends the tunnel
            sock.sendall(b"tick")
            time.sleep(0.2)
        server.events.append("done")

    server = TunnelBackend(tick)
    try:
        b = bastion({**config_for(server.address), "timeouts": {"drain": "20s"}})
        client = H2WebSocketClient(b.port)
        sid = client.open_websocket("/ticks", frames=False)
        assert client.wait_head(sid)["status"] == 200
        received = bytes(client.streams[sid]["body"])
        old_workers = set(b.worker_pids())
        b.reload()
        frames, closed = read_raw_frames(client.sock, lambda fs: any(isinstance(f, GoAwayFrame) for f in fs))
        goaway = [f for f in frames if isinstance(f, GoAwayFrame)][0]
        assert goaway.error_code == 0 and goaway.last_stream_id == sid
        # the open stream goes on until the backend ends it, then the old worker closes the connection
        more, closed = read_raw_frames(client.sock, lambda fs: False, timeout=15)
        frames += more
        assert closed
        data = [f for f in frames if f.type == 0 and f.stream_id == sid]
        assert len([f for f in data if f.data]) > 1 and "END_STREAM" in data[-1].flags
        assert received + b"".join(f.data for f in data) == b"tick" * 15
        assert wait_for(lambda: not (old_workers & set(b.worker_pids())), timeout=15)  # and exits
        fresh = H2WebSocketClient(b.port)  # the new workers serve WebSockets too
        other = fresh.open_websocket("/ticks", frames=False)
        assert fresh.wait_head(other)["status"] == 200
        fresh.close()
    finally:
        server.close()
