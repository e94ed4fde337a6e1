"""A failing backend gets a clear answer: 502/503/504 with a plain page carrying the request id, a log
line saying why, and a metric."""

import json
import socket
import time
import urllib.request
from urllib.error import HTTPError

from tests.support.ports import free_port
from tests.support.raw import RecordingServer, ResettingServer


def fetch(url, accept=None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except HTTPError as e:
        return e.code, dict(e.headers), e.read()


def metrics(b) -> str:
    with urllib.request.urlopen(b.admin_url + "/metrics", timeout=5) as r:
        return r.read().decode()


def test_refused_backend_is_502_with_page_log_and_metric(bastion):
    dead = f"127.0.0.1:{free_port()}"
    b = bastion({"routes": [{"name": "dead", "upstream": {"servers": [dead]}}]})
    status, headers, body = fetch(b.url + "/x")
    assert status == 502
    rid = headers["X-Request-ID"]
    assert headers["Content-Type"].startswith("text/html") and rid in body.decode()
    assert dead not in body.decode(), "the error page must not reveal the backend address"
    status, headers, body = fetch(b.url + "/x", accept="application/json")
    assert status == 502 and json.loads(body) == {"status": 502, "error": "Bad Gateway", "request_id": headers["X-Request-ID"]}
    lines = b.wait_access_log(2)
    assert [(line["status"], line["error"]) for line in lines[-2:]] == [(502, "connect_refused")] * 2
    assert 'bastion_upstream_errors_total{kind="connect_refused",route="dead"} 2.0' in metrics(b)


def test_slow_backend_is_504(bastion, backend):
    b = bastion({"routes": [{"name": "slow", "timeouts": {"upstream_read": 0.5}, "upstream": {"servers": [backend.address]}}]})
    started = time.monotonic()
    status, _, _ = fetch(b.url + "/delay/3")
    assert status == 504 and time.monotonic() - started < 2.5
    line = b.wait_access_log(1)[-1]
    assert line["status"] == 504 and line["error"] == "upstream_timeout"


def test_connect_timeout_is_504(bastion):
    # a listening socket whose accept queue is full never completes new handshakes
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    port = s.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    try:
        b = bastion({"routes": [{"timeouts": {"connect": 0.5}, "upstream": {"servers": [f"127.0.0.1:{port}"]}}]})
        status, _, _ = fetch(b.url + "/")
        line = b.wait_access_log(1)[-1]
        assert status == 504 and line["error"] == "connect_timeout"
    finally:
        for c in fillers:
            c.close()
        s.close()


def test_invalid_backend_response_is_502(bastion):
    garbage = RecordingServer(response=b"this is not http\r\n\r\n")
    try:
        b = bastion({"routes": [{"upstream": {"servers": [garbage.address]}}]})
        status, _, _ = fetch(b.url + "/")
        assert status == 502
        assert b.wait_access_log(1)[-1]["error"] == "invalid_response"
    finally:
        garbage.close()


def test_backend_reset_before_answer_is_502(bastion):
    srv = ResettingServer()
    try:
        b = bastion({"routes": [{"upstream": {"servers": [srv.address]}}]})
        status, _, _ = fetch(b.url + "/")
        assert status == 502
        assert b.wait_access_log(1)[-1]["error"] == "upstream_reset"
    finally:
        srv.close()


def test_backend_error_mid_response_cuts_the_client_connection(bastion):
    # the backend promises 1000 bytes, sends 10 and closes: the client must not get a "complete" response
    truncated = RecordingServer(response=b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
    try:
        b = bastion({"routes": [{"timeouts": {"upstream_read": 1}, "upstream": {"servers": [truncated.address]}}]})
        with socket.create_connection(("127.0.0.1", b.port), timeout=5) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            c.settimeout(8)
            try:
                while True:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            except ConnectionResetError:
                pass
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and len(body) < 1000
    finally:
        truncated.close()


def test_endless_backend_head_is_502(bastion):
    endless = RecordingServer(response=b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * 100_000 + b"\r\n")
    try:
        b = bastion({"routes": [{"timeouts": {"upstream_read": 5}, "upstream": {"servers": [endless.address]}}]})
        started = time.monotonic()
        status, _, _ = fetch(b.url + "/")
        assert status == 502 and time.monotonic() - started < 3
        assert b.wait_access_log(1)[-1]["error"] == "invalid_response"
    finally:
        endless.close()
