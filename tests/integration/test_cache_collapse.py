"""Request collapsing beyond one worker: the disk store's workers share one fetch per key (a record lock on
the store's lock file), Bastion nodes sharing a Redis share one fetch per key (a Redis lock); a holder that
is stuck or dead blocks the others no longer than collapse_timeout. And Cache-Status' fwd=uri-miss /
fwd=vary-miss (RFC 9211)."""

import os
import signal
import socket
import struct
import threading
import time

import redis

from tests.integration import test_cache
from tests.integration.test_cache import cache_events as events
from tests.integration.test_cache import config, hits, q, url, wait_until
from tests.integration.test_cache_disk import disk_config
from tests.support.ports import free_port

HOST = "shared.example"


def request(b, path, headers=None):
    return test_cache.request(b, path, {"Connection": "close", **(headers or {})})


def concurrent(targets, path, headers=None):
    """One request per target (a Bastion), each on its own connection, all sent at the same moment."""
    results = [None] * len(targets)
    barrier = threading.Barrier(len(targets))

    def one(i, b):
        try:
            barrier.wait(10)
        except threading.BrokenBarrierError:
            pass
        results[i] = request(b, path, headers)

    threads = [threading.Thread(target=one, args=(i, b)) for i, b in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def concurrent_on_both_workers(b, query: str, n: int, attempts: int = 6):
    """`n` requests at once to a new URL each try, until they have reached both workers: the kernel spreads
    connections over the workers' sockets by a hash, so 8 connections land on one worker about once in a
    hundred tries."""
    for _ in range(attempts):
        path = url(query)
        results = concurrent([b] * n, path)
        if len({worker_of(r) for r in results if r is not None}) == 2:
            return path, results
    raise AssertionError(f"{attempts} tries of {n} connections never reached both workers")


def worker_of(response) -> str:
    return response[1]["x-request-id"][:12]  # the request id starts with the worker's own prefix


def all_workers_serving(b, workers=2) -> None:
    """Wait until every worker accepts connections (the port answers as soon as the first one does). With
    PURGE, which Bastion answers itself: no worker gets a pooled connection to the backend from this."""
    seen = set()

    def serving():
        seen.add(worker_of(test_cache.request(b, "/warm-up", {"Connection": "close"}, method="PURGE")))
        return len(seen) == workers

    assert wait_until(serving, timeout=20, interval=0.01)


def redis_node(bastion, backend, redis_server, prefix, workers=1, **cache):
    return bastion({
        "cache": {"redis": {"url": redis_server.url, "prefix": prefix}},
        "routes": [{"name": "app", "upstream": {"servers": [backend.address]},
                    "cache": {"store": "redis", **cache}}],
    }, workers=workers)


def locks(redis_server, prefix) -> list:
    client = redis.Redis.from_url(redis_server.url)
    try:
        return client.keys(prefix + "l:*")
    finally:
        client.close()


def holder_worker(b, backend_port: int) -> int | None:
    """The worker process with a connection open to the backend (the one fetching)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == backend_port and fields[3] == "01":  # ESTABLISHED
                inodes.add(fields[9])
    for pid in b.worker_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    return None


# -- the disk store: every worker of the node --------------------------------------------------------------------

def test_disk_store_collapses_misses_across_workers(bastion, backend, tmp_path):
    b = bastion(disk_config(backend, tmp_path / "cache"), workers=2)
    all_workers_serving(b)
    path = url(q(cc="max-age=600", delay="1"))
    results = concurrent([b] * 20, path)
    assert all(r is not None and r[0] == 200 for r in results)
    assert len({r[2] for r in results}) == 1 and results[0][2]
    assert hits(backend, path) == 1
    assert len({worker_of(r) for r in results}) == 2, "the connections should have reached both workers"
    stored = [r for r in results if "stored" in r[1]["cache-status"]]
    assert len(stored) == 1
    collapsed = [r for r in results if "collapsed" in r[1]["cache-status"]]
    # Requests in the other worker waited for the holder's fetch through the lock file.
    assert any(worker_of(r) != worker_of(stored[0]) for r in collapsed)
    assert all("hit" in r[1]["cache-status"] for r in results if r is not stored[0])
    assert wait_until(lambda: events(b).get("collapsed", 0) >= len(collapsed), timeout=10, interval=0.3)
    assert events(b)["collapsed"] == len(collapsed)


def test_disk_store_waiters_go_upstream_when_the_holder_is_slower_than_collapse_timeout(bastion, backend, tmp_path):
    b = bastion(disk_config(backend, tmp_path / "cache", collapse_timeout="300ms"), workers=2)
    all_workers_serving(b)
    path, results = concurrent_on_both_workers(b, q(cc="max-age=600", delay="3"), 8)
    assert all(r is not None and r[0] == 200 for r in results)
    assert hits(backend, path) == 8  # nobody waited for the slow fetch beyond 300 ms


def test_disk_store_uncacheable_answer_releases_the_other_workers(bastion, backend, tmp_path):
    # (With the lock kept, the other worker's requests would wait the 30 s and time out here.)
    b = bastion(disk_config(backend, tmp_path / "cache", collapse_timeout="30s"), workers=2)
    all_workers_serving(b)
    path, results = concurrent_on_both_workers(b, q(cc="private", delay="0.5"), 8)
    assert all(r is not None and r[0] == 200 for r in results)
    assert hits(backend, path) == 8  # as within a worker: released waiters fetch for themselves


def test_stale_copies_are_refreshed_once_for_the_node(bastion, backend, tmp_path):
    b = bastion(disk_config(backend, tmp_path / "cache"), workers=2)
    all_workers_serving(b)
    path = url(q(cc="max-age=2, stale-while-revalidate=60", etag='"s"', delay="0.3"))
    request(b, path)
    warm = set()

    def in_both_memories():  # each worker reads the file once into its memory level
        r = request(b, path)
        if "hit" in r[1]["cache-status"]:
            warm.add(worker_of(r))
        return len(warm) == 2

    assert wait_until(in_both_memories, timeout=20, interval=0.01)
    assert hits(backend, path) == 1
    time.sleep(2.5)  # both memory copies are stale now
    results = concurrent([b] * 12, path)
    assert all(r is not None and r[0] == 200 for r in results)
    assert len({worker_of(r) for r in results}) == 2
    assert wait_until(lambda: hits(backend, path) >= 2, timeout=10)
    fresh = set()

    def fresh_in_both():  # a worker whose copy is stale finds the refreshed one on disk
        r = request(b, path)
        if "stale" not in r[1]["cache-status"]:
            fresh.add(worker_of(r))
        return len(fresh) == 2

    assert wait_until(fresh_in_both, timeout=10, interval=0.01)
    assert hits(backend, path) == 2  # one background refresh for the node, not one per worker


def test_a_dead_worker_does_not_hold_the_key(bastion, backend, tmp_path):
    # The lock is a record lock: the kernel drops it with the process, long before collapse_timeout.
    b = bastion(disk_config(backend, tmp_path / "cache", collapse_timeout="30s"), workers=2)
    all_workers_serving(b)
    path = url(q(cc="max-age=600", delay="3"))
    first = threading.Thread(target=lambda: _quiet(request, b, path))
    first.start()
    assert wait_until(lambda: hits(backend, path) == 1, timeout=10)
    port = int(backend.address.rsplit(":", 1)[1])
    holder = wait_until(lambda: holder_worker(b, port), timeout=5)
    assert holder is not None
    os.kill(holder, signal.SIGKILL)
    assert wait_until(lambda: holder not in b.worker_pids(), timeout=10)
    started = time.monotonic()
    result = None
    for _ in range(5):  # a connection queued on the dead worker's socket is reset: try again
        result = _quiet(request, b, path)
        if result is not None:
            break
        time.sleep(0.2)
    assert result is not None and result[0] == 200
    assert "collapsed" not in result[1]["cache-status"] and "stored" in result[1]["cache-status"]
    assert time.monotonic() - started < 25  # not the 30 s collapse_timeout
    assert hits(backend, path) == 2
    first.join(10)


def _quiet(fn, *args):
    try:
        return fn(*args)
    except OSError:
        return None


# -- the Redis store: every node ---------------------------------------------------------------------------------

def test_redis_store_collapses_misses_across_nodes(bastion, backend, redis_server):
    prefix = f"collapse-{time.monotonic_ns()}:"
    a = redis_node(bastion, backend, redis_server, prefix)
    b = redis_node(bastion, backend, redis_server, prefix)
    path = url(q(cc="max-age=600", delay="1"))
    results = concurrent([a, b] * 8, path, {"Host": HOST})
    assert all(r is not None and r[0] == 200 for r in results)
    assert len({r[2] for r in results}) == 1 and results[0][2]
    assert hits(backend, path) == 1
    stored = [i for i, r in enumerate(results) if "stored" in r[1]["cache-status"]]
    assert len(stored) == 1
    assert all("hit" in r[1]["cache-status"] for i, r in enumerate(results) if i != stored[0])
    other_node = [r for i, r in enumerate(results) if i % 2 != stored[0] % 2]
    assert any("collapsed" in r[1]["cache-status"] for r in other_node)  # waited for the other node's fetch
    collapsed = sum("collapsed" in r[1]["cache-status"] for r in results)

    def counted():
        return events(a).get("collapsed", 0) + events(b).get("collapsed", 0)

    assert wait_until(lambda: counted() >= collapsed, timeout=10, interval=0.3)
    assert counted() == collapsed


def test_redis_store_waiters_go_upstream_when_the_holder_is_slower_than_collapse_timeout(bastion, backend,
                                                                                        redis_server):
    prefix = f"collapse-{time.monotonic_ns()}:"
    a = redis_node(bastion, backend, redis_server, prefix, collapse_timeout="300ms")
    b = redis_node(bastion, backend, redis_server, prefix, collapse_timeout="300ms")
    path = url(q(cc="max-age=600", delay="3"))
    results = concurrent([a, b] * 3, path, {"Host": HOST})
    assert all(r is not None and r[0] == 200 for r in results)
    assert hits(backend, path) == 6


def test_stale_copies_are_refreshed_once_for_all_nodes(bastion, backend, redis_server):
    prefix = f"collapse-{time.monotonic_ns()}:"
    a = redis_node(bastion, backend, redis_server, prefix)
    b = redis_node(bastion, backend, redis_server, prefix)
    path = url(q(cc="max-age=2, stale-while-revalidate=60", etag='"s"', delay="0.3"))
    host = {"Host": HOST}
    request(a, path, host)
    assert wait_until(lambda: "hit" in request(b, path, host)[1]["cache-status"], timeout=10)
    assert hits(backend, path) == 1
    time.sleep(2.5)  # both nodes' memory copies are stale now
    results = concurrent([a, b] * 6, path, host)
    assert all(r is not None and r[0] == 200 for r in results)
    assert wait_until(lambda: hits(backend, path) >= 2, timeout=10)
    for node in (a, b):
        assert wait_until(lambda: "stale" not in request(node, path, host)[1]["cache-status"], timeout=10)
    assert hits(backend, path) == 2  # one background refresh, not one per node


def test_a_dead_node_holds_the_key_no_longer_than_collapse_timeout(bastion, backend, redis_server):
    prefix = f"collapse-{time.monotonic_ns()}:"
    a = redis_node(bastion, backend, redis_server, prefix, collapse_timeout="1s")
    b = redis_node(bastion, backend, redis_server, prefix, collapse_timeout="1s")
    path = url(q(cc="max-age=600", delay="3"))
    first = threading.Thread(target=lambda: _quiet(request, a, path, {"Host": HOST}))
    first.start()
    assert wait_until(lambda: hits(backend, path) == 1, timeout=10)
    for pid in a.worker_pids():
        os.kill(pid, signal.SIGKILL)  # the holder dies with its lock still in Redis
    assert wait_until(lambda: locks(redis_server, prefix) == [], timeout=5, interval=0.05)
    status, h, _ = request(b, path, {"Host": HOST})
    assert status == 200 and "collapsed" not in h["cache-status"] and "stored" in h["cache-status"]
    assert hits(backend, path) == 2
    first.join(10)


def test_the_lock_is_released_when_the_fetch_ends(bastion, backend, redis_server):
    prefix = f"collapse-{time.monotonic_ns()}:"
    a = redis_node(bastion, backend, redis_server, prefix, collapse_timeout="30s")
    for cc in ("max-age=600", "no-store"):  # stored, and not cacheable
        status, _, _ = request(a, url(q(cc=cc)), {"Host": HOST})
        assert status == 200
        assert wait_until(lambda: locks(redis_server, prefix) == [], timeout=5, interval=0.05)
    # No backend answers: Bastion's own 502.
    dead = bastion({"cache": {"redis": {"url": redis_server.url, "prefix": prefix}},
                    "routes": [{"name": "app", "upstream": {"servers": [f"127.0.0.1:{free_port()}"]},
                                "cache": {"store": "redis", "collapse_timeout": "30s"}}]})
    assert request(dead, url(q(cc="max-age=600")), {"Host": HOST})[0] == 502
    assert wait_until(lambda: locks(redis_server, prefix) == [], timeout=5, interval=0.05)
    # The client goes away (a reset: a plain close may be a half-close, which still gets its answer)
    # while the backend is still answering (for 10 s).
    path = url(q(cc="max-age=600", delay="10"))
    with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert wait_until(lambda: hits(backend, path) == 1, timeout=10)
        assert len(locks(redis_server, prefix)) == 1
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert wait_until(lambda: locks(redis_server, prefix) == [], timeout=5, interval=0.05)


# -- Cache-Status: fwd=uri-miss and fwd=vary-miss ----------------------------------------------------------------

VARY = {"cc": "max-age=600", "h_Vary": "Accept-Language"}


def test_cache_status_tells_a_uri_miss_from_a_vary_miss(bastion, backend):
    b = bastion(config(backend))
    path = url(q(**VARY))
    _, h, _ = request(b, path, {"Accept-Language": "en"})
    assert "fwd=uri-miss" in h["cache-status"] and "stored" in h["cache-status"]
    _, h, _ = request(b, path, {"Accept-Language": "fr"})
    assert "fwd=vary-miss" in h["cache-status"]
    _, h, _ = request(b, path, {"Accept-Language": "en"})
    assert "hit" in h["cache-status"]
    _, h, _ = request(b, url(q(**VARY)), {"Accept-Language": "fr"})
    assert "fwd=uri-miss" in h["cache-status"]


def test_vary_miss_is_known_from_the_disk_store(bastion, backend, tmp_path):
    folder = tmp_path / "cache"
    path = url(q(**VARY))
    first = bastion(disk_config(backend, folder))
    _, h, _ = request(first, path, {"Host": HOST, "Accept-Language": "en"})
    assert "fwd=uri-miss" in h["cache-status"]
    first.stop()
    second = bastion(disk_config(backend, folder))  # an empty memory level: the disk says the URL varies
    _, h, _ = request(second, path, {"Host": HOST, "Accept-Language": "fr"})
    assert "fwd=vary-miss" in h["cache-status"]


def test_vary_miss_is_known_from_redis(bastion, backend, redis_server):
    prefix = f"collapse-{time.monotonic_ns()}:"
    a = redis_node(bastion, backend, redis_server, prefix)
    b = redis_node(bastion, backend, redis_server, prefix)
    path = url(q(**VARY))
    _, h, _ = request(a, path, {"Host": HOST, "Accept-Language": "en"})
    assert "fwd=uri-miss" in h["cache-status"]
    assert wait_until(lambda: "hit" in request(b, path, {"Host": HOST, "Accept-Language": "en"})[1]["cache-status"],
                      timeout=5)
    _, h, _ = request(b, path, {"Host": HOST, "Accept-Language": "fr"})
    assert "fwd=vary-miss" in h["cache-status"]
