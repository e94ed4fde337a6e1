"""Peers, their keep-alive connection pools, and upstream groups with their balancer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bastion.http.headers import HOP_BY_HOP
from bastion.upstream.balancer import SmoothWeightedRoundRobin

if TYPE_CHECKING:
    from bastion.http.h1_upstream import UpstreamConnection


class Peer:
    """One backend address. Holds the idle keep-alive connections of this worker to it."""

    __slots__ = ("host", "port", "address", "address_bytes", "weight", "max_idle", "idle_timeout", "idle", "connections",
                 "response_special")

    def __init__(self, host: str, port: int, weight: int, max_idle: int, idle_timeout: float,
                 hidden_response_headers: frozenset = frozenset()):
        self.host = host
        self.port = port
        self.address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.address_bytes = self.address.encode()
        self.weight = weight
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: list[UpstreamConnection] = []
        self.connections = 0
        # Response headers that need a look: hop-by-hop ones, Content-Length, and the configured hidden
        # ones (proxy.hide_headers, as nginx's proxy_hide_header), which are never passed on.
        self.response_special = HOP_BY_HOP | {b"content-length"} | hidden_response_headers

    def acquire(self, now: float) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.alive and now - conn.idle_since < self.idle_timeout:
                return conn
            conn.close()
        return None

    def release(self, conn: UpstreamConnection, now: float) -> None:
        if len(self.idle) < self.max_idle and conn.alive:
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

    def __repr__(self) -> str:
        return f"Peer({self.address}, weight={self.weight})"


class UpstreamGroup:
    """A named set of peers and the balancer that picks among them."""

    __slots__ = ("name", "peers", "balancer")

    def __init__(self, name: str, peers: list[Peer]):
        self.name = name
        self.peers = peers
        self.balancer = SmoothWeightedRoundRobin(peers)

    def select(self, exchange) -> Peer | None:
        return self.balancer.pick()

    def sweep(self, now: float) -> None:
        for peer in self.peers:
            peer.sweep(now)

    def close_idle(self) -> None:
        for peer in self.peers:
            peer.close_idle()
