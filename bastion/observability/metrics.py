"""Prometheus metrics, summed across workers with prometheus_client's multiprocess mode.

Per request a worker only bumps plain Python counters; once per tick it adds the totals to the shared
prometheus_client values (memory-mapped files, one set per worker process), which the admin endpoint
of any worker reads and sums. That keeps the per-request cost to a few dictionary operations.
"""

from __future__ import annotations

from bisect import bisect_left
from time import monotonic

from bastion.proxy.exchange import Exchange

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FIRST_BUCKET = BUCKETS[0]
UPSTREAM_ERRORS = frozenset(
    {"connect_refused", "connect_error", "connect_timeout", "upstream_reset", "upstream_reset_midway",
     "upstream_timeout", "invalid_response", "no_server", "circuit_open", "tls_error"}
)
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_STATUS_INDEX = [6] * 100 + [1] * 100 + [2] * 100 + [3] * 100 + [4] * 100 + [5] * 100  # status -> class, 6: other


class _Prom:
    """The prometheus_client objects, made lazily in the worker (after fork) so each process writes
    its own files."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("bastion_requests", "Requests answered, by route and status class",
                                ["route", "status_class"])
        self.duration = Histogram("bastion_request_duration_seconds", "Time from request start to the end of the response",
                                  ["route"], buckets=BUCKETS)
        self.upstream_errors = Counter("bastion_upstream_errors", "Failed upstream exchanges by kind",
                                       ["route", "kind"])
        self.open_connections = Gauge("bastion_open_connections", "Open client connections",
                                      multiprocess_mode="livesum")
        self.open_tunnels = Gauge("bastion_open_tunnels", "Open upgraded (WebSocket) tunnels",
                                  multiprocess_mode="livesum")
        self.retries = Counter("bastion_upstream_retries", "Requests sent again to another server", ["route"])
        self.peer_up = Gauge("bastion_upstream_peer_up", "1 when the server takes requests (healthy, not ejected, "
                             "not draining)", ["upstream", "peer"], multiprocess_mode="livemin")
        self.ejections = Counter("bastion_upstream_ejections", "Servers taken out by passive health checks",
                                 ["upstream", "peer"])
        self.spliced = Counter("bastion_spliced_response_bytes", "Response body bytes moved from backend to client "
                               "inside the kernel (splice), not through Python")


class _RouteCounts:
    __slots__ = ("status", "buckets", "total", "errors", "retries")

    def __init__(self) -> None:
        self.retries = 0
        self.status = [0] * 7  # by status // 100
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.errors: dict[str, int] = {}


class Metrics:
    def __init__(self) -> None:
        self.routes: dict = {}  # route object -> counts since the last flush
        self.gauges: dict[str, object] = {}
        self.groups: list = []
        self.spliced_bytes = 0  # since the last flush (bastion/http/splice.py)
        self._ejections_seen: dict[int, int] = {}
        self._prom: _Prom | None = None

    def logging(self, ex: Exchange) -> None:
        route = ex.route
        counts: _RouteCounts | None = self.routes.get(route)
        if counts is None:
            counts = self.routes[route] = _RouteCounts()
        status = ex.status
        counts.status[_STATUS_INDEX[status] if status < 600 else 6] += 1
        duration = (ex.end or monotonic()) - ex.start
        counts.buckets[0 if duration <= _FIRST_BUCKET else bisect_left(BUCKETS, duration)] += 1
        counts.total += duration
        if ex.retries:
            counts.retries += ex.retries
        error = ex.error
        if error is not None and error in UPSTREAM_ERRORS:
            counts.errors[error] = counts.errors.get(error, 0) + 1

    def set_gauge(self, name: str, source) -> None:
        """`source` is a callable read at every flush (e.g. the worker's open connection count)."""
        self.gauges[name] = source

    def flush(self) -> None:
        prom = self._prom
        if prom is None:
            prom = self._prom = _Prom()
        routes, self.routes = self.routes, {}
        for route_obj, counts in routes.items():
            route = route_obj.name if route_obj is not None else ""
            for status, n in enumerate(counts.status):
                if n:
                    prom.requests.labels(route, _STATUS_CLASS.get(status, "other")).inc(n)
            for kind, n in counts.errors.items():
                prom.upstream_errors.labels(route, kind).inc(n)
            if counts.retries:
                prom.retries.labels(route).inc(counts.retries)
            child = prom.duration.labels(route)
            # prometheus_client has no "observe many"; its per-bucket values take increments directly.
            for index, n in enumerate(counts.buckets):
                if n:
                    child._buckets[index].inc(n)
            child._sum.inc(counts.total)
        if self.spliced_bytes:
            prom.spliced.inc(self.spliced_bytes)
            self.spliced_bytes = 0
        for name, source in self.gauges.items():
            getattr(prom, name).set(source())
        now = monotonic()
        for group in self.groups:
            for peer in group.peers:
                prom.peer_up.labels(group.name, peer.address).set(1 if peer.usable(now) else 0)
                seen = self._ejections_seen.get(id(peer), 0)
                if peer.total_ejections > seen:
                    prom.ejections.labels(group.name, peer.address).inc(peer.total_ejections - seen)
                    self._ejections_seen[id(peer)] = peer.total_ejections
