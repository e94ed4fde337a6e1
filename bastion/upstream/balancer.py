"""Balancers: pure choice logic over a list of peers, no I/O."""

from __future__ import annotations


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin: with weights 5,1,1 the order is a,a,b,a,c,a,a — spread out,
    never bursts. With equal weights it degenerates to plain rotation, which takes the fast path."""

    __slots__ = ("peers", "weights", "current", "total", "equal", "index")

    def __init__(self, peers: list):
        self.peers = list(peers)
        self.weights = [p.weight for p in self.peers]
        self.current = [0] * len(self.peers)
        self.total = sum(self.weights)
        self.equal = len(set(self.weights)) <= 1
        self.index = -1

    def pick(self):
        peers = self.peers
        if not peers:
            return None
        if self.equal:
            self.index = index = (self.index + 1) % len(peers)
            return peers[index]
        current = self.current
        best = 0
        for i, weight in enumerate(self.weights):
            current[i] += weight
            if current[i] > current[best]:
                best = i
        current[best] -= self.total
        return peers[best]
