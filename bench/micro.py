"""In-process micro-benchmark of the HTTP/1.1 hot path: a client connection and a pooled backend
connection driven with fake transports, so only Bastion's own Python work is measured (no sockets,
no kernel). Usage: python bench/micro.py [N] [--profile] [--defaults] [--log] [--cache]

By default the route is configured as `make bench` runs it (examples/bench.yaml: no forwarding headers, no
access log); --defaults measures Bastion's default forwarding headers and request id instead; --cache
measures cache hits (examples/bench-cache.yaml: the response is stored once, then every request is a hit)."""

from __future__ import annotations

import asyncio
import sys
import time

from bastion.config.compile import compile_config
from bastion.config.schema import Config
from bastion.http.h1_server import ClientConnection
from bastion.http.h1_upstream import UpstreamConnection

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 24 Nov 2026 02:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 1024\r\nLast-Modified: Tue, 24 Nov 2026 01:00:00 GMT\r\n"
    b"Connection: keep-alive\r\nETag: \"abc-400\"\r\nAccept-Ranges: bytes\r\n\r\n" + b"a" * 1024
)


class FakeTransport:
    def __init__(self, peer=("127.0.0.1", 40000)):
        self.peer = peer
        self.written = 0

    def get_extra_info(self, name, default=None):
        return self.peer if name == "peername" else default

    def write(self, data):
        self.written += len(data)

    def writelines(self, parts):
        for p in parts:
            self.written += len(p)

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        pass

    def abort(self):
        pass

    def is_closing(self):
        return False

    def can_write_eof(self):
        return True

    def write_eof(self):
        pass


class FakeWorker:
    def __init__(self, loop):
        self.loop = loop
        self.draining = False

    def connection_opened(self, conn):
        pass

    def connection_closed(self, conn):
        pass


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 200_000
    bench_proxy = {} if "--defaults" in sys.argv else {"proxy": {"x_forwarded": False, "via": None, "request_id_header": None}}
    config = Config.model_validate({
        **bench_proxy,
        "listeners": ["127.0.0.1:8080"],
        "access_log": {"enabled": "--log" in sys.argv},
        "limits": {"requests_per_connection": 100_000_000},
        "routes": [{"name": "default", "upstream": {"servers": ["127.0.0.1:9001"]}, "cache": "--cache" in sys.argv}],
    })
    runtime = compile_config(config)
    loop = asyncio.new_event_loop()
    worker = FakeWorker(loop)
    client = ClientConnection(worker, runtime)
    client.connection_made(FakeTransport())
    peer = runtime.routes[0].upstream.peers[0]
    upstream = UpstreamConnection(peer)
    upstream.connection_made(FakeTransport(("127.0.0.1", 9001)))
    peer.release(upstream, time.monotonic())

    def one():
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)

    if "--cache" in sys.argv:
        from email.utils import formatdate

        cacheable = RESPONSE.replace(b"Connection: keep-alive\r\n", b"Cache-Control: public, max-age=600\r\n")
        cacheable = cacheable.replace(b"Tue, 24 Nov 2026 02:00:00 GMT", formatdate(usegmt=True).encode())
        client.data_received(REQUEST)
        upstream.data_received(cacheable)
        loop.run_until_complete(asyncio.sleep(0))

        def one():  # noqa: F811 - every request after the first is a hit
            client.data_received(REQUEST)

    for _ in range(1000):
        one()
    if "--profile" in sys.argv:
        import cProfile
        import pstats

        cProfile.runctx("for _ in range(n): one()", globals(), {"n": n, "one": one}, "/tmp/micro.prof")
        pstats.Stats("/tmp/micro.prof").sort_stats("tottime").print_stats(25)
        return
    start = time.perf_counter()
    for _ in range(n):
        one()
    elapsed = time.perf_counter() - start
    print(f"{n} requests: {elapsed / n * 1e6:.2f} us of Python per proxied request (no I/O)")


if __name__ == "__main__":
    main()
