"""Raw-socket helpers: send exact bytes, and a backend that records every byte it receives."""

from __future__ import annotations

import socket
import threading
import time


def http_raw(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send `data`, read until the peer closes or `timeout` passes; returns what came back."""
    return closed_after(port, data, timeout)[0]


def closed_after(port: int, data: bytes, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Like http_raw, and also whether the server closed the connection (EOF) within the timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.settimeout(timeout)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return out, False
            except ConnectionResetError:
                return out, True
            if not chunk:
                return out, True
            out += chunk
        return out, False


def parse_response(raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """The first response in `raw`: status, headers, and the body as delimited by Content-Length
    (or everything after the head when there is none)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    length = next((int(v) for n, v in headers if n.lower() == "content-length"), None)
    body = rest[:length] if length is not None else rest
    return status, headers, body


class RecordingServer:
    """A TCP server on 127.0.0.1 that records all bytes received and answers each connection with a
    canned response once it has seen a request head."""

    def __init__(self, response: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"):
        self.response = response
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.connections = 0
        self._data = bytearray()
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(5)
        seen = b""
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                with self._lock:
                    self._data += chunk
                seen += chunk
                while b"\r\n\r\n" in seen:
                    _, _, seen = seen.partition(b"\r\n\r\n")
                    conn.sendall(self.response)
        except OSError:
            pass
        finally:
            conn.close()

    def received(self) -> bytes:
        with self._lock:
            return bytes(self._data)

    def close(self):
        self._stop = True
        self.sock.close()


class ThreadedServer:
    """A TCP server on 127.0.0.1 that hands each connection to `serve(conn)` in a thread of its own (the
    connection is closed when serve returns); for backends a test scripts byte by byte."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        try:
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
        except OSError:
            pass  # closed

    def _serve(self, conn):
        with conn:
            try:
                self.serve(conn)
            except OSError:
                pass

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self):
        self.sock.close()


class ResettingServer(ThreadedServer):
    """Accepts connections, reads the request, and resets the connection without answering."""

    def serve(self, conn):
        conn.settimeout(10)
        conn.recv(65536)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
