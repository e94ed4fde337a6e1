from collections import Counter

from bastion.upstream.balancer import SmoothWeightedRoundRobin


class P:
    def __init__(self, name, weight=1):
        self.name = name
        self.weight = weight


def picks(peers, n):
    rr = SmoothWeightedRoundRobin(peers)
    return [rr.pick().name for _ in range(n)]


def test_equal_weights_rotate_in_order():
    assert picks([P("a"), P("b"), P("c")], 6) == ["a", "b", "c", "a", "b", "c"]


def test_smooth_weighted_order_matches_nginx():
    # nginx's documented sequence for weights 5, 1, 1
    assert picks([P("a", 5), P("b", 1), P("c", 1)], 7) == ["a", "a", "b", "a", "c", "a", "a"]


def test_weighted_shares_are_exact_over_a_cycle():
    counts = Counter(picks([P("a", 3), P("b", 2), P("c", 1)], 600))
    assert counts == {"a": 300, "b": 200, "c": 100}


def test_no_peers_gives_none():
    assert SmoothWeightedRoundRobin([]).pick() is None
