"""Malformed or ambiguous requests get a 4xx, the connection is closed, and nothing reaches the backend."""

import pytest

from tests.support.raw import closed_after, parse_response

H = b"Host: example.com\r\n"

CASES = [
    ("cl-and-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("two-different-cl", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    ("two-equal-cl", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    ("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("cl-plus-sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    ("te-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc", 400),
    ("te-chunked-then-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    ("te-twice", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("te-in-http10", b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-space-before-colon", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("bad-chunk-size", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-overflow", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n", 400),
    ("bad-chunk-extension", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;\x01\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-bare-lf", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", 400),
    ("chunk-data-too-long", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", 400),
    ("bare-lf-request-line", b"GET / HTTP/1.1\n" + H + b"\r\n", 400),
    ("bare-lf-header", b"GET / HTTP/1.1\r\nHost: example.com\nX-A: b\r\n\r\n", 400),
    ("bare-cr", b"GET / HTTP/1.1\r\nHost: example.com\rX-A: b\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n", 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : example.com\r\n\r\n", 400),
    ("invalid-header-name", b"GET / HTTP/1.1\r\n" + H + b"X(A): b\r\n\r\n", 400),
    ("empty-header-name", b"GET / HTTP/1.1\r\n" + H + b": b\r\n\r\n", 400),
    ("nul-in-header-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    ("ctl-in-header-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", 400),
    ("nul-in-target", b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("http2-version-on-http1", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 400),
    ("http09-request-line", b"GET /\r\n\r\n", 400),
    ("unknown-version", b"GET / HTTP/1.7\r\n" + H + b"\r\n", 400),
    ("lowercase-method", b"get / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("missing-host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two-hosts", b"GET / HTTP/1.1\r\n" + H + b"Host: other.example\r\n\r\n", 400),
    ("absolute-form-other-host", b"GET http://evil.example/ HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    ("authority-form-target", b"GET example.com:80 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("expect-unknown", b"POST / HTTP/1.1\r\n" + H + b"Expect: teapot\r\nContent-Length: 0\r\n\r\n", 417),
    ("request-line-too-long", b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("header-section-too-large", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 5000 + b"\r\n\r\n", 431),
    ("too-many-headers", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(30)) + b"\r\n", 431),
    ("body-over-limit", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5000\r\n\r\n" + b"a" * 5000, 413),
    ("chunked-body-over-limit", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + b"800\r\n" + b"a" * 2048 + b"\r\n0\r\n\r\n", 413),
]

CONFIG = {
    "limits": {"request_line": "1k", "header_bytes": "4k", "header_count": 20, "body": "1k"},
    "routes": [{"name": "only", "upstream": {"servers": []}}],
}


@pytest.fixture(scope="module")
def proxy(request, tmp_path_factory):
    # One Bastion for the whole table; its only backend records every byte it receives.
    from tests.conftest import BastionProcess
    from tests.support.raw import RecordingServer

    server = RecordingServer()
    config = {**CONFIG, "routes": [{"name": "only", "upstream": {"servers": [server.address]}}]}
    b = BastionProcess(tmp_path_factory.mktemp("malformed"), config)
    b.wait_ready()
    yield b, server
    b.stop()
    b.close_files()
    server.close()


@pytest.mark.parametrize("raw, expected", [pytest.param(raw, status, id=name) for name, raw, status in CASES])
def test_rejected_and_nothing_forwarded(proxy, raw, expected):
    b, server = proxy
    before = len(server.received())
    answer, closed = closed_after(b.port, raw)
    assert answer, "no response at all"
    status, headers, _ = parse_response(answer)
    assert status == expected
    assert ("Connection", "close") in headers
    assert closed, "Bastion kept the connection open after rejecting the request"
    assert len(server.received()) == before, "bytes reached the backend"


def test_valid_request_does_reach_the_backend(proxy):
    """The control row: the same setup forwards a good request, so the table above can fail."""
    b, server = proxy
    before = len(server.received())
    answer, _ = closed_after(b.port, b"POST /ok HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nConnection: close\r\n\r\nabc")
    status, _, body = parse_response(answer)
    assert status == 200 and body == b"ok"
    forwarded = server.received()[before:]
    assert forwarded.startswith(b"POST /ok HTTP/1.1\r\n") and forwarded.endswith(b"\r\n\r\nabc")


def test_rejection_is_logged_with_reason(proxy):
    b, _ = proxy
    closed_after(b.port, b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n")
    lines = b.wait_access_log(1)
    assert any(line["status"] == 400 and line["error"] for line in lines)
