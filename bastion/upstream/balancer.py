"""Balancers: pure choice logic over the peers that are available right now. No I/O.

Each balancer's `pick(candidates, exchange, now)` gets the available peers (healthy, not ejected, not
draining; the backups only when no primary is available) and returns one. Peers carry the numbers the
balancers read: `eff_weight` (weight, ramped during slow start), `active` (requests in flight), `ewma`
(response time).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import random
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bastion.upstream.pool import Peer


class Balancer:
    """What every balancer is: `pick` (a common base, so that the compiled hot path calls it directly)."""

    def pick(self, candidates: list[Peer], exchange: Any = None, now: float = 0.0) -> Peer | None:
        raise NotImplementedError


class SmoothWeightedRoundRobin(Balancer):
    """nginx's smooth weighted round robin: with weights 5,1,1 the order is a,a,b,a,c,a,a — spread out,
    never bursts. With equal weights it is plain rotation, which takes a fast path."""

    def __init__(self, peers: list):
        self.current: dict[int, float] = {id(p): 0.0 for p in peers}
        self.index = -1

    def pick(self, candidates: list[Peer], exchange: Any = None, now: float = 0.0) -> Peer | None:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        first = candidates[0].eff_weight
        for p in candidates:
            if p.eff_weight != first:
                break
        else:
            self.index = index = (self.index + 1) % n
            return candidates[index]
        current = self.current
        total = 0.0
        best = None
        best_weight = -math.inf
        for p in candidates:
            key = id(p)
            w = current.get(key, 0.0) + p.eff_weight
            current[key] = w
            total += p.eff_weight
            if w > best_weight:
                best, best_weight = p, w
        current[id(best)] -= total
        return best


class _LeastCost(Balancer):
    """Picks the candidate with the lowest `cost(peer)`; the scan starts one further each time, so that
    ties rotate instead of always going to the first peer."""

    def __init__(self, peers: list):
        self.index = 0

    def pick(self, candidates: list[Peer], exchange: Any = None, now: float = 0.0) -> Peer | None:
        self.index += 1
        n = len(candidates)
        cost = self.cost
        best = None
        best_cost = math.inf
        for i in range(n):
            p = candidates[(self.index + i) % n]
            c = cost(p)
            if c < best_cost:
                best, best_cost = p, c
        return best


class LeastConnections(_LeastCost):
    """Fewest requests in flight relative to weight."""

    @staticmethod
    def cost(p) -> float:
        return p.active / p.eff_weight


class LeastTime(_LeastCost):
    """Peak-EWMA response time times (requests in flight + 1): a slow peer gets less, and a peer whose
    latency jumps is penalised at once (the "peak"), recovering as the average decays (Finagle, Linkerd)."""

    @staticmethod
    def cost(p) -> float:
        return p.ewma * (p.active + 1) / p.eff_weight


class PowerOfTwoChoices(Balancer):
    """Two peers at random, the less loaded wins: nearly as good as least connections, and no herd
    when many balancers (workers, nodes) see the same numbers."""

    def __init__(self, peers: list, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def pick(self, candidates: list[Peer], exchange: Any = None, now: float = 0.0) -> Peer | None:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        a, b = self.rng.sample(candidates, 2)
        return a if a.active / a.eff_weight <= b.active / b.eff_weight else b


def ring_hash(data: bytes) -> int:
    # A stable hash: every worker and every node must map a key to the same peer (Python's hash() is
    # randomised per process).
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class ConsistentHash(Balancer):
    """A hash ring with 160 points per unit of weight. A key goes to the first available peer clockwise
    from its hash, so removing one of N peers moves only the keys that peer had (about 1/N)."""

    POINTS = 160

    def __init__(self, peers: list, key_of=None):
        ring = []
        for p in peers:
            for i in range(self.POINTS * p.weight):
                ring.append((ring_hash(b"%s#%d" % (p.address.encode(), i)), p))
        ring.sort(key=lambda item: item[0])
        self.hashes = [h for h, _ in ring]
        self.peers = [p for _, p in ring]
        self.key_of = key_of or (lambda exchange: exchange.client_ip.encode())

    def pick(self, candidates: list[Peer], exchange: Any = None, now: float = 0.0) -> Peer | None:
        if len(candidates) == 1:
            return candidates[0]
        return self.pick_key(self.key_of(exchange), candidates)

    def pick_key(self, key: bytes, candidates: list):
        allowed = set(map(id, candidates))
        start = bisect_left(self.hashes, ring_hash(key))
        size = len(self.peers)
        for i in range(size):
            p = self.peers[(start + i) % size]
            if id(p) in allowed:
                return p
        return candidates[0]


def hash_key_function(source: str, name: str | None):
    """How the `hash` balancer finds a request's key."""
    if source == "client_ip":
        return lambda ex: ex.client_ip.encode()
    if source == "path":
        return lambda ex: ex.path
    lname = (name or "").lower().encode()
    if source == "header":
        def header_key(ex):
            for n, v in ex.headers:
                if n.lower() == lname:
                    return v
            return ex.client_ip.encode()

        return header_key

    def cookie_key(ex):
        for n, v in ex.headers:
            if n.lower() == b"cookie":
                for part in v.split(b";"):
                    k, _, val = part.strip().partition(b"=")
                    if k.lower() == lname:
                        return val
        return ex.client_ip.encode()

    return cookie_key


# One key per master process (inherited by its workers, kept across reloads) when no secret is configured.
_PROCESS_SECRET = os.urandom(32)


class StickyCookie(Balancer):
    """Sticky sessions: the client carries a signed cookie naming its server. While that server is
    available the client stays on it; otherwise it is balanced (round robin) and the cookie rewritten by
    the route's StickyCookieFilter. The signature stops clients from choosing servers themselves."""

    def __init__(self, peers: list, settings=None):
        self.name = (settings.cookie if settings is not None else "bastion_sticky").encode()
        secret = settings.secret if settings is not None and settings.secret else None
        self.key = secret.encode() if secret else _PROCESS_SECRET
        self.max_age = settings.max_age if settings is not None else None
        self.fallback = SmoothWeightedRoundRobin(peers)

    def sign(self, address: str) -> bytes:
        mac = hmac.new(self.key, address.encode(), hashlib.sha256).hexdigest()[:24]
        return base64.urlsafe_b64encode(address.encode()).rstrip(b"=") + b"." + mac.encode()

    def wanted(self, exchange) -> str | None:
        """The server address the request's cookie names, if the cookie is genuine."""
        for n, v in exchange.headers:
            if n.lower() == b"cookie":
                for part in v.split(b";"):
                    k, _, value = part.strip().partition(b"=")
                    if k == self.name:
                        encoded, _, mac = value.partition(b".")
                        try:
                            address = base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4)).decode()
                        except (ValueError, UnicodeDecodeError):
                            return None
                        if hmac.compare_digest(self.sign(address), value):
                            return address
                        return None
        return None

    def pick(self, candidates: list[Peer], exchange: Any = None, now: float = 0.0) -> Peer | None:
        if exchange is not None:
            address = self.wanted(exchange)
            if address is not None:
                for p in candidates:
                    if p.address == address:
                        return p
        return self.fallback.pick(candidates, exchange)

    def set_cookie(self, peer) -> bytes:
        value = self.name + b"=" + self.sign(peer.address) + b"; Path=/; HttpOnly; SameSite=Lax"
        if self.max_age:
            value += b"; Max-Age=%d" % int(self.max_age)
        return value


def make_balancer(kind: str, peers: list, hash_on=None, sticky=None) -> Balancer:
    if kind in ("round_robin", "weighted"):
        return SmoothWeightedRoundRobin(peers)
    if kind == "least_conn":
        return LeastConnections(peers)
    if kind == "least_time":
        return LeastTime(peers)
    if kind == "p2c":
        return PowerOfTwoChoices(peers)
    if kind == "hash":
        key_of = hash_key_function(hash_on.source, hash_on.name) if hash_on is not None else None
        return ConsistentHash(peers, key_of)
    if kind == "cookie":
        return StickyCookie(peers, sticky)
    raise ValueError(f"unknown balancer {kind!r}")
