"""Active health checks: one checker process per node (not per worker), started by the master with each
configuration generation. It probes every actively checked peer and writes the verdict into a table in
shared memory (one byte per peer, created before the fork); every worker reads the table on its timer,
so all workers agree on a peer's health within a second of the checker's decision.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import signal

from bastion.config.schema import parse_status_set

log = logging.getLogger("bastion.health")

UP = 1
DOWN = 0


class HealthTable:
    """One byte per actively checked peer, shared by the master's children."""

    def __init__(self, size: int):
        self.map = mmap.mmap(-1, max(1, size))
        self.map.write(bytes([UP]) * max(1, size))

    def __getitem__(self, index: int) -> int:
        return self.map[index]

    def __setitem__(self, index: int, value: int) -> None:
        self.map[index] = value


def assign_health_table(groups) -> tuple[HealthTable | None, list]:
    """Give each actively checked peer a slot; returns the table and the (group, peer) pairs checked."""
    checked = [(g, p) for g in groups if g.active_check is not None for p in g.peers]
    if not checked:
        return None, []
    for index, (_, peer) in enumerate(checked):
        peer.index = index
    return HealthTable(len(checked)), checked


def carry_over(old_runtime, new_runtime) -> None:
    """On reload, a peer that is still checked keeps its last verdict instead of starting healthy."""
    if old_runtime is None or old_runtime.health_table is None or new_runtime.health_table is None:
        return
    old = {(g.name, p.address): old_runtime.health_table[p.index] for g, p in old_runtime.checked}
    for g, p in new_runtime.checked:
        verdict = old.get((g.name, p.address))
        if verdict is not None:
            new_runtime.health_table[p.index] = verdict
            p.active_ok = verdict == UP


def read_health_table(table: HealthTable, checked: list) -> None:
    """In a worker: take the checker's verdicts over. The groups recompute availability on the same tick."""
    for _, peer in checked:
        peer.active_ok = table[peer.index] == UP


async def probe(peer, check) -> str | None:
    """One check; None when healthy, else why not."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(peer.host, peer.port), check.timeout)
    except asyncio.TimeoutError:
        return "connect timeout"
    except OSError as exc:
        return f"connect failed: {exc.strerror or exc}"
    try:
        if check.type == "tcp":
            return None
        host = check.host or peer.address
        writer.write(
            f"{check.method} {check.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bastion-health-check\r\n"
            f"Connection: close\r\n\r\n".encode("latin-1")
        )
        try:
            data = await asyncio.wait_for(_read_some(reader, 65536), check.timeout)
        except asyncio.TimeoutError:
            return "no answer in time"
        line = data.split(b"\r\n", 1)[0].split()
        if len(line) < 2 or not line[0].startswith(b"HTTP/1.") or not line[1].isdigit():
            return "not an HTTP response"
        status = int(line[1])
        if status not in parse_status_set(check.expect_status):
            return f"status {status}"
        if check.body_contains and check.body_contains.encode() not in data.partition(b"\r\n\r\n")[2]:
            return f"body does not contain {check.body_contains!r}"
        return None
    except OSError as exc:
        return f"error: {exc}"
    finally:
        writer.close()


async def _read_some(reader, limit: int) -> bytes:
    data = b""
    while len(data) < limit:
        chunk = await reader.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def watch(group, peer, table: HealthTable, stop: asyncio.Event) -> None:
    check = group.active_check
    healthy = table[peer.index] == UP
    successes = failures = 0
    while not stop.is_set():
        reason = await probe(peer, check)
        if reason is None:
            successes, failures = successes + 1, 0
            if not healthy and successes >= check.rise:
                healthy = True
                table[peer.index] = UP
                log.warning("upstream %s: %s is up again (%d checks passed)", group.name, peer.address, successes)
        else:
            failures, successes = failures + 1, 0
            if healthy and failures >= check.fall:
                healthy = False
                table[peer.index] = DOWN
                log.warning("upstream %s: %s is down: %s (%d checks failed)", group.name, peer.address, reason, failures)
        try:
            await asyncio.wait_for(stop.wait(), check.interval)
        except asyncio.TimeoutError:
            pass


def run_checker(runtime) -> int:
    """The checker process's main function."""
    from bastion.server.worker import _die_with_parent

    _die_with_parent()
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)

    async def main():
        tasks = [asyncio.ensure_future(watch(g, p, runtime.health_table, stop)) for g, p in runtime.checked]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return 0
