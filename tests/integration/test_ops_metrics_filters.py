"""Metrics summed over workers, the admin listener, access-log formats and user filters."""

import json
import re
import socket
import textwrap
import time
import urllib.request
from urllib.error import HTTPError


def fetch(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except HTTPError as e:
        return e.code, dict(e.headers), e.read()


def one_request_new_connection(port, path="/echo"):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
        while s.recv(65536):
            pass


def metric(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_are_summed_over_workers(bastion, backend):
    import threading

    b = bastion({"routes": [{"name": "app", "upstream": {"servers": [backend.address]}}]}, workers=2)
    sent = 0
    # Concurrent connections until both workers have answered some (they share one accept queue, so
    # which worker takes a connection is up to the kernel), bounded in count.
    while sent < 600:
        threads = [threading.Thread(target=one_request_new_connection, args=(b.port,)) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        sent += 20
        workers = {line["request_id"][:12] for line in b.wait_access_log(sent, timeout=3)}
        if len(workers) == 2:
            break
    assert len(workers) == 2, "both workers should have served requests"
    for _ in range(7):
        one_request_new_connection(b.port, "/status/404")
    deadline = time.monotonic() + 5
    while True:
        _, _, body = fetch(b.admin_url + "/metrics")
        text = body.decode()
        ok = metric(text, "bastion_requests_total", route="app", status_class="2xx")
        not_found = metric(text, "bastion_requests_total", route="app", status_class="4xx")
        # each worker publishes its counts once a second: wait until both have
        if (ok, not_found) == (sent, 7) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ok == sent
    assert metric(text, "bastion_requests_total", route="app", status_class="4xx") == 7
    assert metric(text, "bastion_request_duration_seconds_count", route="app") == sent + 7
    assert metric(text, "bastion_open_connections") is not None
    status, _, body = fetch(b.admin_url + "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert fetch(b.admin_url + "/nope")[0] == 404


def test_access_log_json_fields(bastion, backend):
    b = bastion({"routes": [{"name": "app", "upstream": {"servers": [backend.address]}}]})
    req = urllib.request.Request(b.url + "/upload?x=1", data=b"12345", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        rid = r.headers["X-Request-ID"]
    line = b.wait_access_log(1)[-1]
    assert set(line) >= {"time", "client", "method", "target", "status", "bytes_in", "bytes_out", "duration",
                         "upstream", "upstream_duration", "route", "request_id", "error"}
    assert line["method"] == "POST" and line["target"] == "/upload?x=1" and line["status"] == 200
    assert line["bytes_in"] == 5 and line["bytes_out"] > 0 and line["upstream"] == backend.address
    assert line["route"] == "app" and line["request_id"] == rid and line["error"] is None
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", line["time"])
    assert 0 <= line["upstream_duration"] <= line["duration"]


def test_access_log_combined_format_to_file(bastion, backend, tmp_path):
    path = tmp_path / "access.log"
    b = bastion({"access_log": {"format": "combined", "path": str(path)},
                 "routes": [{"upstream": {"servers": [backend.address]}}]})
    fetch(b.url + "/echo/c", {"User-Agent": "tester/1", "Referer": "http://ref.example/"})
    deadline = time.monotonic() + 5
    while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    line = path.read_text().strip()
    assert re.match(r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /echo/c HTTP/1\.1" 200 \d+ '
                    r'"http://ref\.example/" "tester/1"$', line), line
    assert "{" not in b.stdout()


FILTERS = '''
import asyncio
from bastion.proxy import Filter, Response


class AddHeader(Filter):
    def __init__(self, name, value):
        self.name, self.value = name, value

    def upstream_request_filter(self, exchange):
        exchange.request_headers.set(self.name, self.value)


class Deny(Filter):
    def request_filter(self, exchange):
        if exchange.request_headers.get("X-Deny"):
            return Response(403, "denied by filter\\n", content_type="text/plain")


class SlowCheck(Filter):
    async def request_filter(self, exchange):
        await asyncio.sleep(0.05)
        if exchange.path_str.startswith("/echo/blocked"):
            return Response(451, "blocked\\n")
        exchange.state["checked"] = True


class Stamp(Filter):
    def response_filter(self, exchange):
        exchange.response_headers.set("X-Checked", str(exchange.state.get("checked", False)))
'''


def test_user_filters_from_a_module(bastion, backend, tmp_path):
    (tmp_path / "myfilters.py").write_text(textwrap.dedent(FILTERS))
    b = bastion({"routes": [{"upstream": {"servers": [backend.address]}, "filters": [
        {"use": "myfilters:Deny"},
        {"use": "myfilters:SlowCheck"},
        {"use": "myfilters:AddHeader", "with": {"name": "X-Added", "value": "yes"}},
        {"use": "myfilters:Stamp"},
    ]}]}, env={"PYTHONPATH": str(tmp_path)})
    status, headers, body = fetch(b.url + "/echo/ok")
    assert status == 200 and headers["X-Checked"] == "True"
    assert ["X-Added", "yes"] in json.loads(body)["headers"]
    assert fetch(b.url + "/echo/ok", {"X-Deny": "1"})[:1] == (403,)
    status, _, body = fetch(b.url + "/echo/blocked")
    assert (status, body) == (451, b"blocked\n")
    before = backend.stats()
    fetch(b.url + "/echo/ok", {"X-Deny": "1"})
    assert backend.stats() == before, "a request answered by a filter must not reach the backend"


BODY_FILTERS = '''
from bastion.proxy import Filter, Response


class Upper(Filter):
    """Changes the body's length: drops Content-Length so the response goes out chunked."""

    def response_filter(self, exchange):
        exchange.response_headers.remove("Content-Length")

    def response_body_filter(self, exchange, data, end):
        out = data.upper()
        return out + b"<END>" if end else out


class Replace304(Filter):
    """Answers a backend's 304 with a stored object, as a cache does after revalidation."""

    def response_filter(self, exchange):
        if exchange.status == 304:
            return Response(200, "from the store\\n", {"X-Replaced": "yes"}, content_type="text/plain")
'''


def test_response_body_filter_and_replacement(bastion, backend, tmp_path):
    (tmp_path / "bodyfilters.py").write_text(textwrap.dedent(BODY_FILTERS))
    b = bastion({"routes": [
        {"name": "upper", "match": {"path": "/bytes/"}, "upstream": {"servers": [backend.address]},
         "filters": [{"use": "bodyfilters:Upper"}]},
        {"name": "replace", "upstream": {"servers": [backend.address]}, "filters": [{"use": "bodyfilters:Replace304"}]},
    ]}, env={"PYTHONPATH": str(tmp_path)})
    status, headers, body = fetch(b.url + "/bytes/3000")
    assert status == 200 and "Content-Length" not in headers and headers.get("Transfer-Encoding") == "chunked"
    assert body.endswith(b"<END>") and len(body) == 3005 and body[:-5] == body[:-5].upper()
    # The replaced 304 keeps the backend connection: the same keep-alive client sees both answers.
    with socket.create_connection(("127.0.0.1", b.port), timeout=5) as s:
        for path in (b"/status/304", b"/status/304"):
            s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
            data = b""
            while b"from the store\n" not in data:
                chunk = s.recv(65536)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 ") and b"X-Replaced: yes" in data and b"Content-Length: 15" in data
    assert fetch(b.url + "/status/200")[2] == b"status 200\n"


STATUS_FILTERS = '''
from bastion.proxy import Filter


class MarkNotFound(Filter):
    response_statuses = {404}

    def response_filter(self, exchange):
        exchange.response_headers.set("X-Not-Found-Seen", "yes")


class MarkAll(Filter):
    def response_filter(self, exchange):
        exchange.response_headers.set("X-Seen", str(exchange.status))
'''


def test_response_filter_called_only_for_its_statuses(bastion, backend, tmp_path):
    """A filter with `response_statuses` sees only those responses, whether or not Bastion knows the
    backend's head already (repeated requests take the remembered-head path)."""
    (tmp_path / "statusfilters.py").write_text(textwrap.dedent(STATUS_FILTERS))
    b = bastion({"routes": [
        {"name": "only", "match": {"path": {"prefix": "/only/"}}, "upstream": {"servers": [backend.address]},
         "rewrite": {"strip_prefix": "/only"}, "filters": [{"use": "statusfilters:MarkNotFound"}]},
        {"name": "both", "upstream": {"servers": [backend.address]},
         "filters": [{"use": "statusfilters:MarkNotFound"}, {"use": "statusfilters:MarkAll"}]},
    ]}, env={"PYTHONPATH": str(tmp_path)})
    for prefix in ("/only", ""):
        for _ in range(5):
            status, headers, body = fetch(b.url + prefix + "/bytes/100")
            assert status == 200 and len(body) == 100
            assert "X-Not-Found-Seen" not in headers
            assert headers.get("X-Seen") == (None if prefix else "200")
        for _ in range(3):
            status, headers, _ = fetch(b.url + prefix + "/status/404")
            assert status == 404 and headers["X-Not-Found-Seen"] == "yes"
            assert headers.get("X-Seen") == (None if prefix else "404")
