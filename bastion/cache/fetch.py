"""A small HTTP/1.1 client for fetches off the request path (stale-while-revalidate refreshes): one
request on a fresh connection to one of the route's servers, the whole response read (up to a limit)."""

from __future__ import annotations

import asyncio

from httptools import HttpResponseParser


class FetchResult:
    __slots__ = ("status", "headers", "body", "done", "too_large", "limit", "_chunks", "_size", "_name")

    def __init__(self, limit: int):
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.done = False
        self.too_large = False
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.limit:
            self.too_large = True
            return
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self.done = True
        self.body = b"".join(self._chunks)


async def fetch(peer, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], timeout: float,
                limit: int) -> FetchResult | None:
    """Send one request to `peer`; the parsed response, or None if it failed or timed out."""
    try:
        return await asyncio.wait_for(_fetch(peer, method, target, headers, limit), timeout)
    except (OSError, asyncio.TimeoutError, ValueError):
        return None
    except Exception:  # noqa: BLE001 - httptools parse errors and the like: the refresh just did not happen
        return None


async def _fetch(peer, method, target, headers, limit) -> FetchResult | None:
    if peer.tls is not None:
        reader, writer = await asyncio.open_connection(peer.host, peer.port, ssl=peer.tls,
                                                       server_hostname=peer.server_name)
    else:
        reader, writer = await asyncio.open_connection(peer.host, peer.port)
    try:
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"Connection: close\r\n\r\n")
        writer.write(b"".join(parts))
        result = FetchResult(limit)
        parser = HttpResponseParser(result)
        while not result.done:
            data = await reader.read(65536)
            if not data:
                parser.feed_data(b"")  # end of a close-delimited body
                break
            parser.feed_data(data)
        if not result.done and not result.too_large:
            result.done = True
            result.body = b"".join(result._chunks)
        result.status = parser.get_status_code()
        return result if result.done and not result.too_large else None
    finally:
        writer.close()
