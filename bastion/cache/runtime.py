"""The node's cache as the compiled runtime holds it: the store, the purge journal shared by the workers,
and the event counts that go to Prometheus."""

from __future__ import annotations

from bastion.cache.memory import MemoryStore
from bastion.cache.purge import PurgeJournal


class _Prom:
    def __init__(self):
        from prometheus_client import Counter, Gauge

        self.events = Counter("bastion_cache_events", "Cache events by route: hit, miss, stale (stale served), "
                              "revalidation (conditional requests sent), revalidated (304s that refreshed an "
                              "entry), collapsed (requests that waited for another's fetch), stored, eviction, "
                              "purged, invalidated, bypass", ["route", "event"])
        self.bytes = Gauge("bastion_cache_bytes", "Bytes held by the memory store", multiprocess_mode="livesum")
        self.entries = Gauge("bastion_cache_entries", "Responses held by the memory store",
                             multiprocess_mode="livesum")


class CacheRuntime:
    def __init__(self, settings):
        self.name = settings.name
        self.store = MemoryStore(settings.memory_size)
        self.redis = None
        if settings.redis is not None:
            from bastion.cache.redis_store import RedisStore

            self.redis = RedisStore(settings.redis.url, settings.redis.prefix, settings.redis.timeout)
        self.disk = None
        if settings.disk is not None:
            from bastion.cache.disk_store import DiskStore

            self.disk = DiskStore(settings.disk.path, settings.disk.size)
        self.journal = PurgeJournal()
        self.journal_mm = self.journal.mm
        self.counts: dict[str, dict] = {}
        self._prom = None

    def counts_for(self, route: str) -> dict:
        from bastion.cache.filter import Counts

        counts = self.counts.get(route)
        if counts is None:
            counts = self.counts[route] = Counts().values
        return counts

    # -- purge ---------------------------------------------------------------------------------------------
    def purge(self, kind: str, value: str) -> int:
        """Purge here now and tell the other workers (and, with Redis, start purging it and the other
        nodes); the number purged in this worker."""
        n = self._apply(kind, value)
        self.journal.publish(kind, value)
        if self.disk is not None:
            n += self.disk.purge(kind, value)  # once, by this worker: the files are the node's
        if self.redis is not None:
            import asyncio

            asyncio.get_event_loop().create_task(self.redis.purge(kind, value))
        return n

    async def purge_and_wait(self, kind: str, value: str) -> tuple[int, int | None]:
        """As purge, but done in Redis (and announced to the other nodes) before it returns."""
        n = self._apply(kind, value)
        self.journal.publish(kind, value)
        if self.disk is not None:
            n += self.disk.purge(kind, value)
        shared = await self.redis.purge(kind, value) if self.redis is not None else None
        return n, shared

    def apply_remote(self, kind: str, value: str) -> None:
        """A purge announced over Redis (by any worker of any node, this one included)."""
        self._apply(kind, value)

    def _apply(self, kind: str, value: str) -> int:
        store = self.store
        if kind == "url":
            n = store.purge_url(value)
        elif kind == "prefix":
            n = store.purge_prefix(value)
        elif kind == "tag":
            n = store.purge_tag(value)
        else:
            n = store.purge_all()
        if n:
            counts = self.counts_for("")
            counts["purged"] += n
        return n

    def poll(self) -> None:
        for kind, value in self.journal.pending():
            self._apply(kind, value)

    # -- metrics (runtime tick) ----------------------------------------------------------------------------------
    def flush(self) -> None:
        self.poll()
        if self.disk is not None:
            from time import time

            try:
                removed = self.disk.maybe_sweep(time())
            except OSError:
                removed = 0
            if removed:
                self.counts_for("")["eviction"] += removed
        prom = self._prom
        if prom is None:
            prom = self._prom = _Prom()
        for route, counts in self.counts.items():
            for event, n in counts.items():
                if n:
                    prom.events.labels(route, event).inc(n)
                    counts[event] = 0
        prom.bytes.set(self.store.bytes)
        prom.entries.set(self.store.count)
