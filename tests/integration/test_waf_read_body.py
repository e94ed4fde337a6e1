"""exchange.read_body(limit), the core hook the WAF uses, from a filter of the user's own."""

from __future__ import annotations

import json
import socket
import time

from tests.support.raw import http_raw, parse_response

FILTER = '''
import hashlib
from bastion.proxy import Response


class BodyGate:
    """Answers 422 when the body contains 'forbidden', 413 past 1000 bytes; otherwise lets it through."""

    async def request_filter(self, ex):
        body = await ex.read_body(1000)
        if body is None:
            return Response(413, "too large for the gate\\n")
        ex.state["gate_sha"] = hashlib.sha256(body).hexdigest()
        if b"forbidden" in body:
            return Response(422, "forbidden word\\n")
        return None

    def upstream_request_filter(self, ex):
        ex.request_headers.set("X-Gate-Sha", ex.state["gate_sha"])
'''


def start(bastion, backend, tmp_path):
    (tmp_path / "gatefilters.py").write_text(FILTER)
    return bastion({"routes": [{"upstream": {"servers": [backend.address]}, "filters": [{"use": "gatefilters:BodyGate"}]}]},
                   env={"PYTHONPATH": str(tmp_path)})


def post(port: int, path: str, body: bytes, extra: bytes = b"", pieces: int = 1) -> tuple[int, dict, bytes]:
    head = (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n" % (path.encode(), len(body))
            + extra + b"\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        if b"100-continue" in extra:
            assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        step = max(1, len(body) // pieces)
        for i in range(0, len(body), step):
            s.sendall(body[i:i + step])
            time.sleep(0.01)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    status, headers, payload = parse_response(out)
    return status, dict(headers), payload


def test_a_filter_reads_the_whole_body_before_the_request_goes_on(bastion, backend, tmp_path):
    import hashlib

    b = start(bastion, backend, tmp_path)
    body = b"x" * 900
    status, _, payload = post(b.port, "/echo/ok", body, pieces=9)
    echoed = json.loads(payload)
    assert status == 200 and echoed["body_length"] == 900
    assert ["X-Gate-Sha", hashlib.sha256(body).hexdigest()] in echoed["headers"]
    assert post(b.port, "/echo/no", b"a forbidden body", pieces=4)[0] == 422
    assert post(b.port, "/echo/big", b"y" * 1001)[0] == 413
    assert post(b.port, "/echo/cont", b"z" * 500, b"Expect: 100-continue\r\n", pieces=5)[0] == 200
    # Without a body the filter gets b"" at once.
    status, _, payload = parse_response(http_raw(b.port, b"GET /echo/get HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert status == 200 and ["X-Gate-Sha", hashlib.sha256(b"").hexdigest()] in json.loads(payload)["headers"]
