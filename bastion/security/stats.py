"""Counts of what the security filters refused, per worker in a plain dict, published on the worker's tick
as `bastion_security_refusals_total{kind=...}` (summed over workers by the admin endpoint)."""

from __future__ import annotations

KINDS = ("access_denied", "banned", "rate_limited", "rate_limit_delayed", "connection_limit_ip",
         "connection_limit_total", "route_concurrency", "client_body_too_slow", "bans_added", "redis_fallback")


class SecurityStats:
    def __init__(self):
        self.counts: dict[str, int] = {}
        self._counter = None

    def count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n

    def flush(self) -> None:
        if not self.counts:
            return
        counter = self._counter
        if counter is None:
            from prometheus_client import Counter

            counter = self._counter = Counter("bastion_security_refusals", "Requests and connections refused "
                                              "(or delayed) by security limits, by kind", ["kind"])
        counts, self.counts = self.counts, {}
        for kind, n in counts.items():
            counter.labels(kind).inc(n)


_STATS: list[SecurityStats] = []


def node_stats() -> SecurityStats:
    """One per process: prometheus_client refuses a second metric of the same name in one registry."""
    if not _STATS:
        _STATS.append(SecurityStats())
    return _STATS[0]
