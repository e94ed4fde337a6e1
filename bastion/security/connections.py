"""Connection and concurrency limits, node-wide: open connections per client address and in total (checked
when a connection is accepted), requests in flight per route. Counters live in shared memory, one row per
worker (see shared.CounterRows): a worker only writes its own row and nobody waits on a lock. Two workers
accepting at the same instant may both pass the last free place: the limits can be overshot by at most
the number of workers, never drift.
"""

from __future__ import annotations

from bastion.proxy.exchange import Response
from bastion.security.shared import key_hash, shared_counters

# Written to a connection refused for being over a connection limit (then closed): a client sees why.
OVER_LIMIT = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 22\r\n"
              b"Retry-After: 1\r\nConnection: close\r\n\r\ntoo many connections\r\n")
ABORT = b""

IP_SLOTS = 65536


class ConnectionGuard:
    """Asked by each new client connection (after the PROXY header, on listeners that use it)."""

    def __init__(self, limits, access, bans, trusted, stats):
        self.max_per_ip = limits.max_per_ip
        self.max_total = limits.max_total
        self.access = access if access else None
        self.bans = bans
        self.trusted = trusted
        self.stats = stats
        self.counters = shared_counters("connections", IP_SLOTS + 1) if (self.max_per_ip or self.max_total) else None

    def admit(self, conn) -> bytes | None:
        """None to go on (the connection's slot is in conn.guard_slot), else what to send before closing."""
        ip = conn.client_ip
        # Addresses behind a trusted proxy are judged per request, on the address the proxy reports.
        direct = not self.trusted.contains(ip)
        if direct:
            if self.access is not None and not self.access.admits(ip):
                self.stats.count("access_denied")
                return ABORT
            if self.bans is not None and self.bans.is_banned(ip):
                self.stats.count("banned")
                return ABORT
        counters = self.counters
        if counters is None:
            return None
        if self.max_total is not None and counters.total(0) >= self.max_total:
            self.stats.count("connection_limit_total")
            return OVER_LIMIT
        slot = 0
        if self.max_per_ip is not None and direct:
            slot = 1 + key_hash(ip) % IP_SLOTS
            if counters.total(slot) >= self.max_per_ip:
                self.stats.count("connection_limit_ip")
                return OVER_LIMIT
            counters.add(slot, 1)
        counters.add(0, 1)
        conn.guard_slot = slot
        return None

    def release(self, conn) -> None:
        slot = conn.guard_slot
        if slot < 0:
            return
        conn.guard_slot = -1
        counters = self.counters
        counters.add(0, -1)
        if slot:
            counters.add(slot, -1)


class ClientGuard:
    """The first request filter of every route when global access lists or bans are on: both are judged
    on the real client address (which, behind a trusted proxy, only the request tells)."""

    keeps_request = True  # never changes the request: the cache may keep keys per repeated head

    def __init__(self, access, bans, client_address, stats, ban_status: int = 403):
        self.access = access if access else None
        self.bans = bans
        self.client_address = client_address
        self.stats = stats
        self.ban_status = ban_status

    def request_filter(self, ex):
        ip = self.client_address.of(ex)
        if self.access is not None and not self.access.admits(ip):
            from bastion.security.access import forbidden

            ex.error = "access_denied"
            ex.conn.close_after = True
            self.stats.count("access_denied")
            return forbidden()
        if self.bans is not None and self.bans.is_banned(ip):
            from bastion.security.bans import banned_response

            ex.error = "banned"
            ex.conn.close_after = True
            self.stats.count("banned")
            return banned_response(self.ban_status)
        return None


class RouteConcurrency:
    """At most `limit` requests of this route in flight on the node; beyond it an immediate 503."""

    keeps_request = True  # never changes the request: the cache may keep keys per repeated head

    def __init__(self, route_name: str, limit: int, stats):
        self.limit = limit
        self.stats = stats
        self.counters = shared_counters("route:" + route_name, 1)

    def request_filter(self, ex):
        counters = self.counters
        if counters.total(0) >= self.limit:
            ex.error = "route_concurrency"
            self.stats.count("route_concurrency")
            return Response(503, "too many requests in progress\n", {"Retry-After": "1", "Cache-Control": "no-store"},
                            content_type="text/plain; charset=utf-8")
        counters.add(0, 1)
        ex.state[self] = True
        return None

    def logging(self, ex) -> None:
        state = ex._state
        if state is not None and state.pop(self, None):
            self.counters.add(0, -1)


class RouteSizeLimits:
    """Request line and header limits tighter than the global ones (which bound parsing itself)."""

    keeps_request = True  # never changes the request: the cache may keep keys per repeated head

    def __init__(self, request_line: int | None, header_bytes: int | None, header_count: int | None):
        self.request_line = request_line
        self.header_bytes = header_bytes
        self.header_count = header_count

    def request_filter(self, ex):
        if self.request_line is not None and len(ex.target) + len(ex.method) + 10 > self.request_line:
            return self._reject(ex, 414, "request_line_too_long")
        headers = ex.headers
        if self.header_count is not None and len(headers) > self.header_count:
            return self._reject(ex, 431, "too_many_headers")
        if self.header_bytes is not None:
            size = 0
            for name, value in headers:
                size += len(name) + len(value) + 4
            if size > self.header_bytes:
                return self._reject(ex, 431, "header_too_large")
        return None

    @staticmethod
    def _reject(ex, status: int, reason: str):
        from bastion.proxy.errors import error_response

        ex.error = reason
        ex.conn.close_after = True
        return error_response(status, ex.request_id)
