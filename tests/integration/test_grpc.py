"""gRPC end to end through Bastion: a real grpcio server behind a route with `protocol: h2`, a real grpcio
client in front (h2c with prior knowledge, and h2 over TLS); unary and streaming calls, metadata, trailers
(grpc-status, grpc-message, custom trailing metadata) intact."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest
import trustme

from tests.support.ports import free_port

SERVICE = "bastion.test.Echo"
NO_PROXY = [("grpc.enable_http_proxy", 0)]


def _echo(request: bytes, context) -> bytes:
    metadata = dict(context.invocation_metadata())
    context.set_trailing_metadata((("x-trailer", "t-" + metadata.get("x-tag", "")),))
    return b"echo:" + request


def _fail(request: bytes, context) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())


def _count(request: bytes, context):
    for i in range(int(request)):
        yield b"%d" % i


def _sum(requests, context) -> bytes:
    return b"%d" % sum(int(r) for r in requests)


def _chat(requests, context):
    for r in requests:
        yield r.upper()


def _big(request: bytes, context) -> bytes:
    return bytes(range(256)) * (int(request) // 256)


@pytest.fixture(scope="module")
def grpc_backend():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)])
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
        "Sum": grpc.stream_unary_rpc_method_handler(_sum),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
        "Big": grpc.unary_unary_rpc_method_handler(_big),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def grpc_config(address: str) -> dict:
    return {"routes": [{"match": {"headers": {"content-type": {"regex": "^application/grpc"}}},
                        "upstream": {"servers": [address], "protocol": "h2"}}]}


def calls(channel):
    method = lambda kind, name: getattr(channel, kind)(f"/{SERVICE}/{name}")  # noqa: E731
    return {
        "echo": method("unary_unary", "Echo"),
        "fail": method("unary_unary", "Fail"),
        "count": method("unary_stream", "Count"),
        "sum": method("stream_unary", "Sum"),
        "chat": method("stream_stream", "Chat"),
        "big": method("unary_unary", "Big"),
    }


def exercise(channel) -> None:
    c = calls(channel)
    reply, call = c["echo"].with_call(b"hello", metadata=[("x-tag", "abc")], timeout=10)
    assert reply == b"echo:hello"
    assert call.code() == grpc.StatusCode.OK
    assert ("x-trailer", "t-abc") in call.trailing_metadata()  # custom trailers came through
    with pytest.raises(grpc.RpcError) as failure:
        c["fail"](b"thing", timeout=10)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND  # grpc-status in the trailers
    assert failure.value.details() == "no such thing: thing"
    assert list(c["count"](b"50", timeout=10)) == [b"%d" % i for i in range(50)]
    assert c["sum"](iter([b"1", b"2", b"3", b"40"]), timeout=10) == b"46"
    assert list(c["chat"](iter([b"a", b"bc", b"def"]), timeout=10)) == [b"A", b"BC", b"DEF"]
    big = c["big"](b"3000000", timeout=30)  # more than every flow-control window on the way
    assert big == bytes(range(256)) * (3000000 // 256)
    upload = bytes(range(256)) * 12000  # and a request that large, both ways
    assert c["echo"](upload, timeout=30) == b"echo:" + upload


def test_grpc_over_h2c(bastion, grpc_backend):
    b = bastion(grpc_config(grpc_backend))
    with grpc.insecure_channel(f"127.0.0.1:{b.port}", options=NO_PROXY) as channel:
        exercise(channel)
    log = b.wait_access_log(7)
    assert {line["status"] for line in log} == {200}
    assert all(line["upstream"] == grpc_backend for line in log)


def test_grpc_over_tls(bastion, grpc_backend, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    port = free_port()
    config = grpc_config(grpc_backend)
    config["listeners"] = [{"address": f"127.0.0.1:{port}",
                            "tls": {"certificates": [{"cert": str(cert_file), "key": str(key_file)}]}}]
    bastion(config)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    with grpc.secure_channel(f"localhost:{port}", credentials, options=NO_PROXY) as channel:
        exercise(channel)


def test_grpc_backend_down_is_unavailable(bastion):
    b = bastion(grpc_config(f"127.0.0.1:{free_port()}"))
    with grpc.insecure_channel(f"127.0.0.1:{b.port}", options=NO_PROXY) as channel:
        with pytest.raises(grpc.RpcError) as failure:
            calls(channel)["echo"](b"x", timeout=10)
    # Bastion's 502 maps to UNAVAILABLE in gRPC's HTTP-status mapping
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_many_concurrent_calls_share_a_connection(bastion, grpc_backend):
    b = bastion(grpc_config(grpc_backend))
    with grpc.insecure_channel(f"127.0.0.1:{b.port}", options=NO_PROXY) as channel:
        echo = calls(channel)["echo"]
        pending = [echo.future(b"%d" % i, timeout=20) for i in range(200)]
        deadline = time.monotonic() + 30
        results = [f.result(timeout=max(1, deadline - time.monotonic())) for f in pending]
    assert results == [b"echo:%d" % i for i in range(200)]
    # the calls shared Bastion's connection to the server instead of opening one each
    assert 1 <= established_to(grpc_backend) <= 2


def established_to(address: str) -> int:
    """Open TCP connections to address (as seen in /proc/net/tcp: both ends are on this machine)."""
    port = int(address.rsplit(":", 1)[1])
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if remote_port == port and fields[3] == "01":  # ESTABLISHED
                count += 1
    return count


def test_http1_client_to_an_h2_backend(bastion, grpc_backend):
    """An HTTP/1.1 client on a `protocol: h2` route: Bastion speaks HTTP/2 to the backend and answers
    in HTTP/1.1 (chunked; the trailers have no place there and are dropped)."""
    import http.client
    import struct

    b = bastion(grpc_config(grpc_backend))
    message = b"from http/1.1"
    framed = b"\x00" + struct.pack(">I", len(message)) + message  # one gRPC message, uncompressed
    conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
    conn.request("POST", f"/{SERVICE}/Echo", body=framed,
                 headers={"Content-Type": "application/grpc", "TE": "trailers"})
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200
    assert response.getheader("content-type") == "application/grpc"
    reply = b"echo:" + message
    assert body == b"\x00" + struct.pack(">I", len(reply)) + reply
    conn.close()


def test_the_grpc_example(grpc_backend, backend, tmp_path):
    """examples/grpc.yaml as documented: gRPC calls to the gRPC server, other requests to the web backend."""
    import os
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from tests.conftest import wait_port

    root = Path(__file__).resolve().parents[2]
    port = free_port()
    env = dict(os.environ, BASTION_LISTEN=f"127.0.0.1:{port}", BASTION_GRPC_UPSTREAM=grpc_backend,
               BASTION_UPSTREAM=backend.address, BASTION_WORKERS="1")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "bastion"), "run", "-c", str(root / "examples" / "grpc.yaml")],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_port(port, 15, proc), proc.stderr.read() if proc.poll() is not None else "not listening"
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) as channel:
            assert calls(channel)["echo"](b"example", timeout=10) == b"echo:example"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/echo/x", timeout=5) as r:
            assert b'"name": "backend"' in r.read()
    finally:
        proc.terminate()
        proc.wait(20)
