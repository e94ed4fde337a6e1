"""WebSocket (and other allowed Upgrades) become a two-way tunnel after the backend's 101."""

import asyncio
import time

import pytest
import websockets

from tests.support.raw import http_raw


def test_websocket_echo_text_binary_and_large(bastion, backend):
    b = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]})

    async def session():
        async with websockets.connect(f"ws://127.0.0.1:{b.port}/ws", max_size=None, compression=None) as ws:
            for message in ["hello", b"\x00\x01\x02binary", "x" * 100, bytes(range(256)) * 4096]:
                await ws.send(message)
                assert await ws.recv() == message

    asyncio.run(session())
    line = b.wait_access_log(1)[-1]
    assert line["status"] == 101 and line["bytes_out"] > 1_000_000 and line["bytes_in"] > 1_000_000


def test_upgrade_not_allowed_by_route_is_not_performed(bastion, backend):
    b = bastion({"routes": [{"upgrade": [], "upstream": {"servers": [backend.address]}}]})
    raw = http_raw(b.port, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", timeout=2)
    assert not raw.startswith(b"HTTP/1.1 101")

    async def attempt():
        async with websockets.connect(f"ws://127.0.0.1:{b.port}/ws"):
            pass

    with pytest.raises(websockets.exceptions.InvalidStatus):
        asyncio.run(attempt())


def test_idle_tunnel_is_closed(bastion, backend):
    b = bastion({"routes": [{"timeouts": {"websocket_idle": 1}, "upstream": {"servers": [backend.address]}}]})

    async def session():
        async with websockets.connect(f"ws://127.0.0.1:{b.port}/ws", ping_interval=None) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            started = time.monotonic()
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return time.monotonic() - started

    waited = asyncio.run(session())
    assert 0.5 < waited < 3
