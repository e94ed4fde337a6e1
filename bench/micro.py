"""In-process micro-benchmark of the HTTP/1.1 hot path: a client connection and a pooled backend
connection driven with fake transports, so only Bastion's own Python work is measured (no sockets,
no kernel). Usage: python bench/micro.py [N] [--profile] [--defaults] [--log] [--cache] [--h2] [--varied] [--targets] [--fresh]

By default the route is configured as `make bench` runs it (examples/bench.yaml: no forwarding headers, no
access log); --defaults measures Bastion's default forwarding headers and request id instead; --cache
measures cache hits (examples/bench-cache.yaml: the response is stored once, then every request is a hit);
--varied makes every request head and every response head differ from the last thousand (other paths and
User-Agents, other ETags), so neither is one Bastion has seen before (see docs/performance.md, "Repeated
heads"); --targets makes only the request target differ (Bastion knows such a head by its shape); --fresh makes the
request head differ in its target and a field (as `make bench`'s scenario 1c) while the response repeats; --h2 measures
HTTP/2 (h2c): a client connection gets h2load's pattern, 10 streams per read, each proxied over
its own pooled backend connection; the time counted is the server side's only."""

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

    if "--varied" in sys.argv:
        requests = [REQUEST.replace(b"/index.html", b"/index%d.html" % i).replace(b"wrk", b"wrk/%d" % i)
                     for i in range(1000)]
        responses = [RESPONSE.replace(b'"abc-400"', b'"abc-%d"' % i) for i in range(1000)]
        turn = [0]

        def one():  # noqa: F811
            i = turn[0] = (turn[0] + 1) % 1000
            client.data_received(requests[i])
            upstream.data_received(responses[i])

    if "--targets" in sys.argv or "--fresh" in sys.argv:
        requests = [REQUEST.replace(b"/index.html", b"/index%d.html" % i) for i in range(1000)]
        if "--fresh" in sys.argv:
            requests = [r.replace(b"\r\n\r\n", b"\r\nX-Seq: %d\r\n\r\n" % i) for i, r in enumerate(requests)]
        turn = [0]

        def one():  # noqa: F811
            i = turn[0] = (turn[0] + 1) % 1000
            client.data_received(requests[i])
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

    if "--h2" in sys.argv:
        one = h2_driver(runtime, worker, peer)

    for _ in range(1000):
        one()
    if "--profile" in sys.argv:
        import cProfile
        import pstats

        cProfile.runctx("for _ in range(n): one()", globals(), {"n": n, "one": one}, "/tmp/micro.prof")
        pstats.Stats("/tmp/micro.prof").sort_stats("tottime").print_stats(25)
        return
    if "--h2" in sys.argv:
        one.spent[0] = 0.0
        one.transport.written = 0
    start = time.perf_counter()
    for _ in range(n):
        one()
    elapsed = time.perf_counter() - start
    if "--h2" in sys.argv:
        elapsed = one.spent[0]
        n *= 10
        if one.transport.written < n * 1024:
            raise SystemExit(f"HTTP/2: only {one.transport.written} bytes answered for {n} requests")
    print(f"{n} requests: {elapsed / n * 1e6:.2f} us of Python per proxied request (no I/O)")


def h2_driver(runtime, worker, peer, streams_per_read: int = 10):
    """h2load -m 10: each read from the client opens 10 streams (HPACK with the dynamic table, as h2load
    encodes), then every backend answers once."""
    from hpack import Encoder
    from hyperframe.frame import SettingsFrame, WindowUpdateFrame

    from bastion.http.h2_server import H2ServerConnection

    server = H2ServerConnection(worker, runtime, None, "127.0.0.1")
    transport = FakeTransport()
    server.connection_made(transport)
    big = 2**31 - 1
    settings = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: big})
    server.data_received(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings.serialize()
                         + WindowUpdateFrame(0, window_increment=big - 65535).serialize())
    backends = []
    for _ in range(streams_per_read):
        up = UpstreamConnection(peer)
        up.connection_made(FakeTransport(("127.0.0.1", 9001)))
        peer.release(up, time.monotonic())
        backends.append(up)
    encoder = Encoder()
    fields = [(b":method", b"GET"), (b":path", b"/index.html"), (b":scheme", b"http"),
              (b":authority", b"127.0.0.1:8080"), (b"user-agent", b"h2load nghttp2/1.52.0")]
    blocks = [encoder.encode(fields), encoder.encode(fields)]  # then indexed from the dynamic table
    next_id = [1]
    spent = [0.0]

    def one():
        frames = []
        for _ in range(streams_per_read):
            block = blocks[0 if next_id[0] == 1 else 1]
            # HEADERS with END_STREAM | END_HEADERS
            frames.append(len(block).to_bytes(3, "big") + b"\x01\x05" + next_id[0].to_bytes(4, "big") + block)
            next_id[0] += 2
        data = b"".join(frames)
        started = time.perf_counter()
        server.data_received(data)
        for up in backends:
            up.data_received(RESPONSE)
        spent[0] += time.perf_counter() - started
        worker.loop.run_until_complete(asyncio.sleep(0))  # the coalesced write of the answers

    one.spent = spent
    one.transport = transport
    return one


if __name__ == "__main__":
    main()
