"""A backend repeats its response heads byte for byte (apart from Date once a second); Bastion then reuses
what parsing the head gave (UpstreamConnection.data_received). Every repeat must still be cleaned and
framed as the first one was, and be visible in logs."""

import socket

from tests.support.raw import RecordingServer

CANNED = (b"HTTP/1.1 200 OK\r\nServer: canned/1.0\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
          b"Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nX-App: 1\r\n\r\nhello")


def responses(port: int, requests: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(head, body) for each request, sent one after the other on one keep-alive connection."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        buffer = b""
        for request in requests:
            s.sendall(request)
            while b"\r\n\r\n" not in buffer:
                buffer += s.recv(65536)
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
            while len(buffer) < length:
                buffer += s.recv(65536)
            out.append((head, buffer[:length]))
            buffer = buffer[length:]
    return out


def test_repeated_heads_are_cleaned_and_framed_every_time(bastion):
    canned = RecordingServer(response=CANNED)
    try:
        b = bastion({"routes": [{"upstream": {"servers": [canned.address]}}]})
        got = responses(b.port, [b"GET /r%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(6)])
        assert canned.connections == 1  # one pooled backend connection: the same head six times
        for head, body in got:
            lines = head.split(b"\r\n")
            names = [line.split(b":")[0].lower() for line in lines[1:]]
            assert lines[0] == b"HTTP/1.1 200 OK" and body == b"hello"
            assert b"x-app: 1" in [line.lower() for line in lines]
            # hop-by-hop (Keep-Alive, the one Connection names) and hidden (Server) headers: gone each time
            assert b"x-hop" not in names and b"keep-alive" not in names and b"server" not in names
            assert names.count(b"content-length") == 1
        log = b.wait_access_log(6)
        assert [line["status"] for line in log] == [200] * 6
        assert [line["target"] for line in log] == [f"/r{i}" for i in range(6)]
        assert all(line["bytes_out"] >= 5 for line in log)
    finally:
        canned.close()


def test_a_repeated_head_is_framed_for_an_http10_client_too(bastion):
    canned = RecordingServer(response=CANNED)
    try:
        b = bastion({"routes": [{"upstream": {"servers": [canned.address]}}]})
        got = responses(b.port, [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"])
        assert [body for _, body in got] == [b"hello", b"hello"]
        # an HTTP/1.0 client gets the same response, without keep-alive unless asked
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
            s.sendall(b"GET /c HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == b"hello"
    finally:
        canned.close()
