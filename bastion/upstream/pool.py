"""Peers (backend addresses with their keep-alive pools and health), and upstream groups that choose
among the peers that are available.

Availability is recomputed when something changes (an ejection, the worker's timer seeing an active
health check result or an ejection expire, slow start progressing), not per request: a request only
reads a prepared list.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING, Any

from bastion.http.headers import HOP_BY_HOP
from bastion.http.known_heads import KnownHeads
from bastion.upstream.balancer import make_balancer

if TYPE_CHECKING:
    from bastion.http.h1_upstream import UpstreamConnection

log = logging.getLogger("bastion.upstream")

EWMA_DECAY = 10.0  # seconds: how fast the response-time average forgets


class Peer:
    """One backend address in one group. Holds this worker's idle connections to it and its health."""

    __slots__ = (
        "host", "port", "address", "address_bytes", "weight", "eff_weight", "max_idle", "idle_timeout", "idle",
        "connections", "response_special", "backup", "drain", "index", "active_ok", "ejected_until", "ejections",
        "fails", "fives", "last_failure", "up_since", "ramp_until", "active", "ewma", "ewma_at", "total_ejections",
        "region", "zone", "window_requests", "window_failures", "tls", "server_name", "known_heads",
    )

    def __init__(self, host: str, port: int, weight: int, max_idle: int, idle_timeout: float,
                 hidden_response_headers: frozenset = frozenset(), backup: bool = False, drain: bool = False):
        self.host = host
        self.port = port
        self.address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.address_bytes = self.address.encode()
        self.weight = weight
        self.eff_weight = float(weight)
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: list[UpstreamConnection] = []
        self.connections = 0
        # Response headers that need a look: hop-by-hop ones, Content-Length, and the configured hidden
        # ones (proxy.hide_headers, as nginx's proxy_hide_header), which are never passed on.
        self.response_special = HOP_BY_HOP | {b"content-length"} | hidden_response_headers
        # Response heads this backend sent before, byte for byte, with what parsing them gave (see
        # UpstreamConnection.data_received).
        self.known_heads = KnownHeads()
        self.backup = backup
        self.drain = drain
        self.index = -1  # slot in the node's shared health table, when actively checked
        self.active_ok = True
        self.ejected_until = 0.0
        self.ejections = 0
        self.total_ejections = 0
        self.region: str | None = None
        self.zone: str | None = None
        self.tls: Any = None  # an ssl.SSLContext for https:// servers
        self.server_name: str | None = None
        self.window_requests = 0  # for error-rate ejection, reset every error_rate_window
        self.window_failures = 0
        self.fails = 0
        self.fives = 0
        self.last_failure = 0.0
        self.up_since = 0.0
        self.ramp_until = 0.0
        self.active = 0
        self.ewma = 0.0
        self.ewma_at = 0.0

    # -- keep-alive pool ------------------------------------------------------------------------------------
    def acquire(self, now: float) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.alive and now - conn.idle_since < self.idle_timeout:
                return conn
            conn.close()
        return None

    def release(self, conn: UpstreamConnection, now: float) -> None:
        if len(self.idle) < self.max_idle and conn.alive and not self.drain:
            conn.idle_since = now
            self.idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def sweep(self, now: float) -> None:
        if self.idle:
            expired = [c for c in self.idle if now - c.idle_since >= self.idle_timeout or not c.alive]
            for conn in expired:
                self.forget(conn)
                conn.close()

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    # -- health -------------------------------------------------------------------------------------------
    def usable(self, now: float) -> bool:
        return self.active_ok and not self.drain and self.ejected_until <= now

    def observe_time(self, seconds: float, now: float) -> None:
        """Peak EWMA of response times: jumps up at once, decays towards the new average."""
        if seconds > self.ewma:
            self.ewma = seconds
        else:
            w = math.exp(-(now - self.ewma_at) / EWMA_DECAY) if self.ewma_at else 0.0
            self.ewma = self.ewma * w + seconds * (1.0 - w)
        self.ewma_at = now

    def __repr__(self) -> str:
        return f"Peer({self.address}, weight={self.weight})"


class RetryBudget:
    """Retries may add at most `percent` of the requests of the last 10 seconds (plus a small floor),
    as Envoy and Finagle do, so a sick upstream is not flooded with retries. Requests are counted with a
    plain integer; the worker's timer moves the window once a second."""

    WINDOW = 10

    def __init__(self, percent: int, min_per_second: int):
        self.percent = percent
        self.floor = min_per_second * self.WINDOW
        self.requests = 0  # this second
        self.retries = 0
        self.past_requests: deque[int] = deque(maxlen=self.WINDOW - 1)
        self.past_retries: deque[int] = deque(maxlen=self.WINDOW - 1)

    def tick(self) -> None:
        self.past_requests.append(self.requests)
        self.past_retries.append(self.retries)
        self.requests = 0
        self.retries = 0

    def allow_retry(self) -> bool:
        requests = self.requests + sum(self.past_requests)
        retries = self.retries + sum(self.past_retries)
        if retries + 1 > requests * self.percent / 100.0 + self.floor:
            return False
        self.retries += 1
        return True


class UpstreamGroup:
    """A named set of peers, the balancer that picks among the available ones, their health rules and
    the retry policy."""

    def __init__(self, name: str, peers: list[Peer], spec=None, sources: list | None = None, new_peer=None):
        self.name = name
        self.spec = spec
        self.static = list(peers)
        self.dynamic: list[Peer] = []
        self.sources = sources or []  # discovery sources (DNS names, SRV, servers file)
        self.new_peer = new_peer  # makes a Peer for a discovered target
        balance = spec.balance if spec is not None else "round_robin"
        self.balance = balance
        self._set_peers(self.static)
        self.tracks_time = balance == "least_time"
        health = spec.health if spec is not None else None
        self.passive = health.passive if health is not None else None
        # whether a successful answer needs more than resetting the failure count
        self.watch_success = self.tracks_time or bool(
            self.passive is not None and (self.passive.consecutive_5xx or self.passive.error_rate_percent))
        self.slow_start = health.slow_start if health is not None else 0.0
        self.active_check = health.active if health is not None else None
        retries = spec.retries if spec is not None else None
        self.attempts = retries.attempts if retries is not None else 1
        self.retry_on = frozenset(retries.retry_on) if retries is not None else frozenset()
        self.retry_idempotent_only = retries.idempotent_only if retries is not None else True
        self.per_try_timeout = retries.per_try_timeout if retries is not None else None
        self.retry_deadline = retries.deadline if retries is not None else None
        self.rate_window_started = 0.0
        self.budget = RetryBudget(retries.budget_percent, retries.budget_min_per_second) if retries is not None else None
        limits = spec.limits if spec is not None else None
        self.max_requests = limits.max_requests if limits is not None else None
        self.max_connections = limits.max_connections if limits is not None else None
        self.max_pending = limits.max_pending if limits is not None else None
        self.pending = 0  # requests waiting for a new connection
        self.active = 0  # requests in flight to this group, for circuit breaking
        self._refreshed = False
        self.locality: Any = None  # a LocalityChooser when the upstream is region-aware
        self.http2 = False  # HTTP/2 to the servers (set by bastion.config.compile)
        self.locator: Any = None
        self.refresh(monotonic())

    def _set_peers(self, peers: list[Peer]) -> None:
        self.peers = peers
        self.primaries = [p for p in peers if not p.backup]
        self.backups = [p for p in peers if p.backup]
        spec = self.spec
        self.balancer = make_balancer(self.balance, peers, spec.hash_on if spec is not None else None,
                                      spec.sticky if spec is not None else None)
        self.available: list[Peer] = []
        if getattr(self, "locality", None) is not None:
            self.locality.invalidate()

    def replace_dynamic(self, targets: list) -> None:
        """Apply discovered servers: keep the peers that stay (and their pooled connections), add new
        ones, and let removed ones finish what they have in flight."""
        current = {(p.host, p.port): p for p in self.dynamic}
        fresh = []
        for t in targets:
            peer = current.pop((t.host, t.port), None)
            if peer is None:
                peer = self.new_peer(t)
            else:
                peer.weight, peer.backup, peer.drain = t.weight, t.backup, t.drain
            if peer not in fresh:
                fresh.append(peer)
        for gone in current.values():
            gone.drain = True
            gone.close_idle()
        self.dynamic = fresh
        self._set_peers(self.static + fresh)
        self.refresh(monotonic())

    # -- choosing -----------------------------------------------------------------------------------------
    def select(self, exchange: Any, tried: list | None = None) -> Peer | None:
        if self.locality is not None and self.available and self.available[0].backup is False:
            candidates = self.locality.candidates(exchange, self.locator, 0.0, tried)
            if candidates:
                return self.balancer.pick(candidates, exchange)
        candidates = self.available
        if tried:
            candidates = [p for p in candidates if p not in tried]
            if not candidates:
                now = monotonic()
                candidates = [p for p in self.primaries + self.backups if p not in tried and p.usable(now)]
        if not candidates:
            return None
        return self.balancer.pick(candidates, exchange)

    def may_connect(self) -> bool:
        """Circuit breaking on connections: may one more connection be opened right now?"""
        if self.max_pending is not None and self.pending >= self.max_pending:
            return False
        if self.max_connections is not None and sum(p.connections for p in self.peers) + self.pending >= self.max_connections:
            return False
        return True

    def refresh(self, now: float) -> None:
        """Recompute which peers take requests (usable primaries, else usable backups) and the weights
        of peers ramping up after they came back (slow start)."""
        first = not self._refreshed
        self._refreshed = True
        ramp = self.slow_start
        for p in self.peers:
            if p.usable(now):
                if not p.up_since:
                    p.up_since = now
                    p.ramp_until = now + ramp if ramp and not first else 0.0
                if p.ramp_until > now:
                    p.eff_weight = max(p.weight * (1.0 - (p.ramp_until - now) / ramp), p.weight * 0.05)
                else:
                    p.eff_weight = float(p.weight)
            else:
                p.up_since = 0.0
        primaries = [p for p in self.primaries if p.up_since]
        self.available = primaries if primaries else [p for p in self.backups if p.up_since]

    # -- outcomes -----------------------------------------------------------------------------------------
    def record_success(self, peer: Peer, status: int, seconds: float | None, now: float) -> None:
        if peer.fails:
            peer.fails = 0
        passive = self.passive
        if passive is not None and passive.error_rate_percent:
            peer.window_requests += 1
            if status >= 500:
                peer.window_failures += 1
                self._check_error_rate(peer, now)
        if passive is not None and passive.consecutive_5xx and status >= 500:
            peer.fives += 1
            if peer.fives >= passive.consecutive_5xx:
                self.eject(peer, now)
        elif peer.fives:
            peer.fives = 0
        if self.tracks_time and seconds is not None:
            peer.observe_time(seconds, now)

    def record_failure(self, peer: Peer, now: float) -> None:
        peer.fails += 1
        peer.last_failure = now
        if self.tracks_time:
            peer.observe_time(30.0, now)  # a failed peer looks very slow until it answers again
        passive = self.passive
        if passive is not None and passive.error_rate_percent:
            peer.window_requests += 1
            peer.window_failures += 1
            if self._check_error_rate(peer, now):
                return
        if passive is not None and passive.consecutive_failures and peer.fails >= passive.consecutive_failures:
            self.eject(peer, now)

    def _check_error_rate(self, peer: Peer, now: float) -> bool:
        passive = self.passive
        if (peer.window_requests >= passive.error_rate_min_requests
                and peer.window_failures * 100 >= passive.error_rate_percent * peer.window_requests):
            peer.window_requests = peer.window_failures = 0
            return self.eject(peer, now)
        return False

    def eject(self, peer: Peer, now: float) -> bool:
        """Take a peer out for a time that doubles with each ejection (up to the maximum), unless that
        would eject more than the allowed share of the group."""
        passive = self.passive
        if passive is None or peer.ejected_until > now:
            return False
        ejected = sum(1 for p in self.peers if p.ejected_until > now)
        if (ejected + 1) * 100 > passive.max_ejected_percent * len(self.peers):
            return False
        duration = min(passive.base_ejection * (2 ** peer.ejections), passive.max_ejection)
        peer.ejected_until = now + duration
        peer.ejections += 1
        peer.total_ejections += 1
        log.warning("upstream %s: %s ejected for %.0f s after repeated failures", self.name, peer.address, duration)
        peer.fails = 0
        peer.fives = 0
        peer.last_failure = now
        self.refresh(now)
        return True

    def sweep(self, now: float) -> None:
        if self.budget is not None:
            self.budget.tick()
        passive = self.passive
        if passive is not None and passive.error_rate_percent and now - self.rate_window_started >= passive.error_rate_window:
            self.rate_window_started = now
            for peer in self.peers:
                peer.window_requests = peer.window_failures = 0
        for peer in self.peers:
            peer.sweep(now)
            # forgive one past ejection for each quiet period, so that backoff resets after a while
            if (peer.ejections and self.passive is not None and peer.ejected_until <= now
                    and now - peer.last_failure > self.passive.max_ejection):
                peer.ejections = 0
        self.refresh(now)

    def close_idle(self) -> None:
        for peer in self.peers:
            peer.close_idle()
