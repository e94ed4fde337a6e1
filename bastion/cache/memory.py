"""The memory store: one per worker process, bounded by bytes, with S3-FIFO admission and eviction.

S3-FIFO (Yang et al., SOSP 2023): new objects enter a small FIFO (10% of the bytes); those hit again
while there move to the main FIFO, the others leave and are remembered in a ghost list, so that a scan
of one-hit objects never pushes the popular ones out. A hit only bumps a 2-bit counter on the entry:
no list is reordered on the hit path (LRU would move the entry on every hit).
tests/unit/test_cache_store.py compares it with LRU on a skewed trace with scans.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class Entry:
    """One stored response (one variant of one URL)."""

    __slots__ = (
        "key", "variant", "url", "status", "headers", "body", "request_time", "response_time", "date",
        "initial_age", "lifetime", "fresh_until", "cc", "etag", "last_modified", "vary", "tags", "size",
        "freq", "dead", "queue", "hit_until", "hit_response", "auth_ok", "needs_check", "swr", "sie",
        "refreshing", "head_bytes", "hit_filter", "file",
    )

    def __init__(self):
        self.key = b""
        self.variant = None  # the secondary key (tuple of normalised request values) when the URL varies
        self.url = ""
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.request_time = 0.0
        self.response_time = 0.0
        self.date: float | None = None
        self.initial_age = 0.0
        self.lifetime = 0.0
        self.fresh_until = 0.0  # wall time when it turns stale: response_time + lifetime - initial_age
        self.cc: dict = {}
        self.etag: str | None = None
        self.last_modified: float | None = None
        self.vary: tuple = ()
        self.tags: tuple = ()
        self.size = 0
        self.freq = 0
        self.dead = False
        self.queue = 0  # 1 small, 2 main
        self.hit_until = 0.0  # hit_response answers until then: the end of its second, at most fresh_until
        self.hit_response = None
        self.auth_ok = False  # may answer requests that carry Authorization
        self.needs_check = False  # no-cache: revalidate on every use
        self.swr = 0.0
        self.sie = 0.0
        self.refreshing = False
        self.head_bytes = b""
        self.file = None  # (path, offset, length) when the body stays in the disk store's file
        self.hit_filter = None  # the route filter whose hit_response this is (routes may share an entry)


class VaryGroup:
    """The variants of one URL whose responses carry Vary: the field names and variant -> Entry."""

    __slots__ = ("names", "variants")

    def __init__(self, names: tuple):
        self.names = names
        self.variants: dict = {}


class MemoryStore:
    kind = "memory"

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.small_capacity = max(1, capacity // 10)
        self.slots: dict = {}  # primary key -> Entry | VaryGroup
        self.small: deque = deque()
        self.main: deque = deque()
        self.ghost: OrderedDict = OrderedDict()
        self.small_bytes = 0
        self.main_bytes = 0
        self.count = 0
        self.by_url: dict[str, set] = {}
        self.by_tag: dict[str, set] = {}
        self.evictions = 0

    @property
    def bytes(self) -> int:
        return self.small_bytes + self.main_bytes

    # -- lookups ---------------------------------------------------------------------------------------------
    def get(self, key: bytes):
        return self.slots.get(key)

    # -- inserting -------------------------------------------------------------------------------------------
    def put(self, entry: Entry) -> bool:
        if entry.size > self.capacity:
            return False
        key = entry.key
        slot = self.slots.get(key)
        if entry.vary:
            if type(slot) is VaryGroup and slot.names == entry.vary:
                old = slot.variants.get(entry.variant)
                if old is not None:
                    self._unlink(old)
            else:
                if slot is not None:
                    self._drop_slot(slot)
                slot = self.slots[key] = VaryGroup(entry.vary)
            slot.variants[entry.variant] = entry
        else:
            if slot is not None:
                self._drop_slot(slot)
            self.slots[key] = entry
        self._index(entry)
        self.count += 1
        if key in self.ghost:
            del self.ghost[key]
            entry.queue = 2
            self.main.append(entry)
            self.main_bytes += entry.size
        else:
            entry.queue = 1
            self.small.append(entry)
            self.small_bytes += entry.size
        while self.small_bytes + self.main_bytes > self.capacity:
            if not self._evict_one():
                break
        return not entry.dead

    def _index(self, entry: Entry) -> None:
        self.by_url.setdefault(entry.url, set()).add(entry)
        for tag in entry.tags:
            self.by_tag.setdefault(tag, set()).add(entry)

    def _evict_one(self) -> bool:
        if self.small_bytes > self.small_capacity or not self.main:
            return self._evict_small() or self._evict_main()
        return self._evict_main() or self._evict_small()

    def _evict_small(self) -> bool:
        small = self.small
        while small:
            entry = small.popleft()
            if entry.dead:
                continue
            self.small_bytes -= entry.size
            if entry.freq > 0:
                entry.freq = 0
                entry.queue = 2
                self.main.append(entry)
                self.main_bytes += entry.size
                return True
            self.ghost[entry.key] = None
            while len(self.ghost) > max(1024, self.count):
                self.ghost.popitem(last=False)
            self._remove(entry, evicted=True)
            return True
        return False

    def _evict_main(self) -> bool:
        main = self.main
        while main:
            entry = main.popleft()
            if entry.dead:
                continue
            if entry.freq > 0:
                entry.freq -= 1
                main.append(entry)
                continue
            self.main_bytes -= entry.size
            self._remove(entry, evicted=True)
            return True
        return False

    # -- removing --------------------------------------------------------------------------------------------
    def _unlink(self, entry: Entry) -> None:
        """Forget an entry that is being replaced or purged (its queue slot is skipped later)."""
        if entry.dead or entry.queue == 0:
            return  # gone already, or never held here (a disk or Redis copy)
        entry.dead = True
        self.count -= 1
        if entry.queue == 1:
            self.small_bytes -= entry.size
        elif entry.queue == 2:
            self.main_bytes -= entry.size
        entry.queue = 0
        self._unindex(entry)

    def _unindex(self, entry: Entry) -> None:
        urls = self.by_url.get(entry.url)
        if urls is not None:
            urls.discard(entry)
            if not urls:
                del self.by_url[entry.url]
        for tag in entry.tags:
            tagged = self.by_tag.get(tag)
            if tagged is not None:
                tagged.discard(entry)
                if not tagged:
                    del self.by_tag[tag]

    def _remove(self, entry: Entry, evicted: bool = False) -> None:
        """Take an entry (already out of its queue's byte count when evicted) out of the slots."""
        if evicted:
            self.evictions += 1
            entry.dead = True
            entry.queue = 0
            self.count -= 1
            self._unindex(entry)
        else:
            self._unlink(entry)
        slot = self.slots.get(entry.key)
        if slot is entry:
            del self.slots[entry.key]
        elif type(slot) is VaryGroup and slot.variants.get(entry.variant) is entry:
            del slot.variants[entry.variant]
            if not slot.variants:
                del self.slots[entry.key]

    def _drop_slot(self, slot) -> None:
        if type(slot) is VaryGroup:
            for entry in list(slot.variants.values()):
                self._unlink(entry)
            slot.variants.clear()
        else:
            self._unlink(slot)

    def remove(self, entry: Entry) -> None:
        self._remove(entry)

    def remove_key(self, key: bytes) -> int:
        slot = self.slots.pop(key, None)
        if slot is None:
            return 0
        n = len(slot.variants) if type(slot) is VaryGroup else 1
        self._drop_slot(slot)
        return n

    # -- purge -----------------------------------------------------------------------------------------------
    def purge_url(self, url: str) -> int:
        entries = list(self.by_url.get(url, ()))
        for entry in entries:
            self._remove(entry)
        return len(entries)

    def purge_prefix(self, prefix: str) -> int:
        urls = [u for u in self.by_url if u.startswith(prefix)]
        n = 0
        for url in urls:
            n += self.purge_url(url)
        return n

    def purge_tag(self, tag: str) -> int:
        entries = list(self.by_tag.get(tag, ()))
        for entry in entries:
            self._remove(entry)
        return len(entries)

    def purge_all(self) -> int:
        n = self.count
        self.slots.clear()
        self.small.clear()
        self.main.clear()
        self.by_url.clear()
        self.by_tag.clear()
        self.small_bytes = self.main_bytes = self.count = 0
        return n


class LruStore:
    """Plain LRU over the same interface subset, only for comparing hit ratios in the tests."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: OrderedDict = OrderedDict()
        self.bytes = 0

    def get(self, key):
        entry = self.items.get(key)
        if entry is not None:
            self.items.move_to_end(key)
        return entry

    def put(self, entry) -> None:
        old = self.items.pop(entry.key, None)
        if old is not None:
            self.bytes -= old.size
        self.items[entry.key] = entry
        self.bytes += entry.size
        while self.bytes > self.capacity and self.items:
            _, gone = self.items.popitem(last=False)
            self.bytes -= gone.size
