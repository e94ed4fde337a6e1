"""The Python floor: the bare forwarder the developers' brief describes, for `make bench` to measure beside
Bastion. uvloop + httptools, asyncio.Protocol, one backend connection per client connection, no routing,
no header work, no checks, no error handling, no logs or metrics. It is not a proxy anyone should run; it
shows what CPython and uvloop cost per request before any proxy work is done.
Usage: python bench/bare_forwarder.py LISTEN_PORT BACKEND_PORT"""

import asyncio
import sys

import httptools
import uvloop


class Backend(asyncio.Protocol):
    def __init__(self, client):
        self.client = client
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.parser.feed_data(data)  # finds where each response ends, as a proxy must
        self.client.transport.write(data)

    def connection_lost(self, exc):
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, backend_port):
        self.backend_port = backend_port
        self.backend = None
        self.pending = []
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport):
        self.transport = transport
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self):
        loop = asyncio.get_running_loop()
        _, self.backend = await loop.create_connection(lambda: Backend(self), "127.0.0.1", self.backend_port)
        self.backend.transport.writelines(self.pending)
        self.pending = None

    def data_received(self, data):
        self.parser.feed_data(data)  # finds where each request ends, as a proxy must
        if self.pending is None:
            self.backend.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc):
        if self.backend is not None:
            self.backend.transport.close()


async def main(listen_port, backend_port):
    server = await asyncio.get_running_loop().create_server(lambda: Client(backend_port), "127.0.0.1", listen_port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
