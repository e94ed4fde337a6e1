"""The memory store: byte bound, Vary groups, purge indexes, and S3-FIFO against LRU on a skewed trace."""

import random

from bastion.cache.memory import Entry, LruStore, MemoryStore, VaryGroup
from bastion.cache.purge import PurgeJournal, SLOTS


def entry(key, size=100, url=None, tags=(), vary=(), variant=None):
    e = Entry()
    e.key = key if isinstance(key, bytes) else key.encode()
    e.url = url or "http://h" + e.key.decode()
    e.size = size
    e.tags = tuple(tags)
    e.vary = tuple(vary)
    e.variant = variant
    return e


def test_store_stays_within_its_bytes():
    store = MemoryStore(10_000)
    for i in range(1000):
        store.put(entry(f"/{i}", 100))
        assert store.bytes <= 10_000
    assert store.count == len([s for s in store.slots.values()])
    assert store.evictions == 1000 - store.count


def test_an_object_larger_than_the_store_is_refused():
    store = MemoryStore(1000)
    assert not store.put(entry("/big", 2000))
    assert store.get(b"/big") is None


def test_replacing_a_key_frees_the_old_bytes():
    store = MemoryStore(10_000)
    store.put(entry("/a", 500))
    store.put(entry("/a", 300))
    assert store.bytes == 300 and store.count == 1


def test_vary_variants_live_under_one_key():
    store = MemoryStore(10_000)
    store.put(entry("/v", vary=("accept-encoding",), variant=("gzip",)))
    store.put(entry("/v", vary=("accept-encoding",), variant=("br",)))
    slot = store.get(b"/v")
    assert isinstance(slot, VaryGroup) and set(slot.variants) == {("gzip",), ("br",)}
    # A response that varies on something else replaces the whole group.
    store.put(entry("/v", vary=("accept-language",), variant=("en",)))
    assert set(store.get(b"/v").variants) == {("en",)}
    assert store.count == 1
    # And one without Vary replaces it too.
    store.put(entry("/v"))
    assert isinstance(store.get(b"/v"), Entry) and store.count == 1


def test_purge_by_url_prefix_and_tag():
    store = MemoryStore(100_000)
    store.put(entry("/a/1", url="http://h/a/1", tags=("t1", "t2")))
    store.put(entry("/a/2", url="http://h/a/2", tags=("t2",)))
    store.put(entry("/b/1", url="http://h/b/1"))
    assert store.purge_tag("t2") == 2
    assert store.get(b"/a/1") is None and store.get(b"/b/1") is not None
    store.put(entry("/a/3", url="http://h/a/3"))
    assert store.purge_prefix("http://h/a/") == 1
    assert store.purge_url("http://h/b/1") == 1
    assert store.count == 0 and store.bytes == 0


def test_purged_entries_are_skipped_by_eviction():
    store = MemoryStore(1000)
    for i in range(5):
        store.put(entry(f"/{i}", 100, url=f"u{i}"))
    store.purge_url("u0")
    for i in range(5, 14):
        store.put(entry(f"/{i}", 100, url=f"u{i}"))
    assert store.bytes <= 1000
    assert store.bytes == sum(e.size for e in store.slots.values())


def _hit_ratio(store, trace, size=100):
    hits = 0
    for key in trace:
        found = store.get(key)
        if found is not None:
            hits += 1
            if isinstance(found, Entry) and found.freq < 3:
                found.freq += 1
        else:
            store.put(entry(key, size))
    return hits / len(trace)


def test_s3fifo_resists_scans_better_than_lru():
    rng = random.Random(7)
    popular = [b"/hot/%d" % i for i in range(200)]
    weights = [1 / (i + 1) for i in range(len(popular))]
    trace = []
    for round_ in range(40):
        trace += rng.choices(popular, weights, k=500)
        trace += [b"/scan/%d/%d" % (round_, i) for i in range(300)]  # one-hit wonders
    s3 = _hit_ratio(MemoryStore(150 * 100), trace)
    lru = _hit_ratio(LruStore(150 * 100), trace)
    assert s3 > lru, (s3, lru)


def test_purge_journal_reaches_another_process_view():
    journal = PurgeJournal()
    other_seen = journal.seen
    journal.publish("url", "http://h/x")
    journal.publish("tag", "t1")
    assert journal.pending() == []  # the publisher applied its own
    journal.seen = other_seen  # as a forked worker that has seen nothing
    assert journal.pending() == [("url", "http://h/x"), ("tag", "t1")]
    assert journal.pending() == []


def test_purge_journal_overflow_purges_everything():
    journal = PurgeJournal()
    for i in range(SLOTS + 5):
        journal.publish("url", f"u{i}")
    journal.seen = 0
    assert journal.pending() == [("all", "")]


def test_disk_store_sweep_keeps_the_bound_and_the_recent(tmp_path):
    import os
    import time as _time

    from bastion.cache.disk_store import DiskStore

    store = DiskStore(str(tmp_path), 50_000)
    written = []
    for i in range(20):
        e = entry(f"/d/{i}", url=f"http://h/d/{i}")
        e.body = b"x" * 5000
        writer = store.begin(e)
        writer.write(e.body)
        writer.commit()
        written.append(e)
    old = _time.time() - 1000
    for e in written[:10]:
        from bastion.cache.disk_store import object_id

        path = store._object_path(object_id(e.key, e.variant))
        os.utime(path, (old, old))
    assert store.sweep() > 0
    assert store.bytes_used() <= 45_000
    assert store.get(b"/d/19", lambda names: None) is not None  # recent ones stay
    assert store.get(b"/d/0", lambda names: None) is None  # old ones went first


def test_disk_store_writes_an_object_once(tmp_path):
    from bastion.cache.disk_store import DiskStore

    store = DiskStore(str(tmp_path), 1 << 20)
    e = entry("/once", url="http://h/once")
    first = store.begin(e)
    assert store.begin(e) is None  # another worker is writing it
    first.write(b"body")
    first.commit()
    got = store.get(b"/once", lambda names: None)
    assert got.body == b"body" and got.url == "http://h/once"
    assert store.purge("url", "http://h/once") == 1
    assert store.get(b"/once", lambda names: None) is None
