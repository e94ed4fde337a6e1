"""Open N keep-alive connections to PORT, one request each, keep them idle, and report how much the
resident memory of process PID grew per connection (JSON on the last line)."""

import asyncio
import json
import sys


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def one(port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n")
    await writer.drain()
    data = b""
    while b"\r\n\r\n" not in data:
        data += await reader.read(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += await reader.read(65536)
    return writer


async def main(port: int, pid: int, n: int) -> None:
    before = rss_kb(pid)
    writers = []
    try:
        for start in range(0, n, 500):
            writers += await asyncio.wait_for(asyncio.gather(*[one(port) for _ in range(min(500, n - start))]), 60)
        await asyncio.sleep(1.0)
        after = rss_kb(pid)
        print(json.dumps({"connections": len(writers), "rss_before_kb": before, "rss_after_kb": after,
                          "bytes_per_connection": round((after - before) * 1024 / max(1, len(writers)))}))
    finally:
        for w in writers:
            w.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 10000))
