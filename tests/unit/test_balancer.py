"""Balancer choices and upstream-group health rules, as pure logic (no sockets)."""

import random
from collections import Counter

import pytest

from bastion.config.schema import Upstream
from bastion.upstream.balancer import (
    ConsistentHash,
    LeastConnections,
    LeastTime,
    PowerOfTwoChoices,
    SmoothWeightedRoundRobin,
)
from bastion.upstream.pool import Peer, RetryBudget, UpstreamGroup


def peers(*weights):
    return [Peer("10.0.0.%d" % (i + 1), 80, w, 8, 60) for i, w in enumerate(weights)]


def names(seq):
    return [p.host.rsplit(".", 1)[1] for p in seq]


def test_equal_weights_rotate_in_order():
    ps = peers(1, 1, 1)
    rr = SmoothWeightedRoundRobin(ps)
    assert names(rr.pick(ps) for _ in range(6)) == ["1", "2", "3", "1", "2", "3"]


def test_smooth_weighted_order_matches_nginx():
    ps = peers(5, 1, 1)
    rr = SmoothWeightedRoundRobin(ps)
    assert names(rr.pick(ps) for _ in range(7)) == ["1", "1", "2", "1", "3", "1", "1"]


def test_weighted_shares_are_exact_over_cycles():
    ps = peers(3, 2, 1)
    rr = SmoothWeightedRoundRobin(ps)
    assert Counter(names(rr.pick(ps) for _ in range(600))) == {"1": 300, "2": 200, "3": 100}


def test_least_connections_prefers_idle_and_respects_weight():
    a, b, c = peers(1, 1, 2)
    a.active, b.active, c.active = 3, 1, 3
    lc = LeastConnections([a, b, c])
    assert lc.pick([a, b, c]) is b
    b.active = 3  # a: 3/1, b: 3/1, c: 3/2 -> c
    assert lc.pick([a, b, c]) is c
    a.active = b.active = c.active = 0  # all idle: ties rotate
    assert len({id(lc.pick([a, b, c])) for _ in range(3)}) == 3


def test_least_time_sends_less_to_a_slow_peer():
    fast, slow = peers(1, 1)
    fast.observe_time(0.010, 1.0)
    slow.observe_time(0.100, 1.0)
    lt = LeastTime([fast, slow])
    picks = Counter()
    for _ in range(1000):
        p = lt.pick([fast, slow])
        picks[p.host] += 1
        p.active += 1
        if p.active > 5:
            p.active = 0
    assert picks[fast.host] > 3 * picks[slow.host]


def test_peak_ewma_jumps_up_and_decays():
    p = peers(1)[0]
    p.observe_time(0.01, 0.0)
    p.observe_time(1.0, 1.0)
    assert p.ewma == 1.0  # a spike counts at once
    for t in range(2, 60):
        p.observe_time(0.01, float(t))
    assert p.ewma < 0.05


def test_p2c_balances_within_tolerance():
    ps = peers(1, 1, 1, 1)
    rng = random.Random(7)
    p2c = PowerOfTwoChoices(ps, rng)
    counts = Counter()
    for _ in range(4000):
        p = p2c.pick(ps)
        counts[p.host] += 1
        p.active += 1
        if rng.random() < 0.5:  # requests finish at random
            for q in ps:
                q.active = max(0, q.active - 1)
    assert all(800 <= n <= 1200 for n in counts.values()), counts


def test_consistent_hash_is_stable_and_remaps_about_one_nth():
    ps = peers(1, 1, 1, 1, 1)
    ring = ConsistentHash(ps)
    keys = [b"client-%d" % i for i in range(5000)]
    before = {k: ring.pick_key(k, ps) for k in keys}
    assert all(ring.pick_key(k, ps) is before[k] for k in keys[:500])  # deterministic
    # spread: each of 5 peers gets 20% +- 6%
    share = Counter(p.host for p in before.values())
    assert all(700 <= n <= 1300 for n in share.values()), share
    # remove one peer: only its keys move (about 1/5 of all keys)
    survivors = ps[:-1]
    moved = sum(1 for k in keys if ring.pick_key(k, survivors) is not before[k])
    owned = sum(1 for k in keys if before[k] is ps[-1])
    assert moved == owned
    assert 0.12 * len(keys) <= moved <= 0.28 * len(keys)


def group(**upstream):
    spec = Upstream.model_validate({"servers": ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], **upstream})
    peers_ = [Peer(*s.host_port, s.weight, 8, 60, backup=s.backup, drain=s.drain) for s in spec.servers]
    return UpstreamGroup("g", peers_, spec)


def test_passive_ejection_with_doubling_backoff_and_cap():
    g = group(health={"passive": {"consecutive_failures": 2, "base_ejection": 10, "max_ejection": 25,
                                  "max_ejected_percent": 100}})
    a = g.peers[0]
    g.record_failure(a, 100.0)
    assert a.ejected_until == 0
    g.record_failure(a, 100.0)
    assert a.ejected_until == 110.0 and a not in g.available
    g.refresh(111.0)
    assert a in g.available
    g.record_failure(a, 111.0)
    g.record_failure(a, 111.0)
    assert a.ejected_until == 131.0  # 20 s the second time
    g.refresh(132.0)
    g.record_failure(a, 132.0)
    g.record_failure(a, 132.0)
    assert a.ejected_until == 157.0  # capped at 25 s


def test_never_eject_more_than_the_allowed_share():
    g = group(health={"passive": {"consecutive_failures": 1, "max_ejected_percent": 50}})
    now = 10.0
    g.record_failure(g.peers[0], now)
    g.record_failure(g.peers[1], now)
    g.record_failure(g.peers[2], now)
    assert sum(1 for p in g.peers if p.ejected_until > now) == 1


def test_backups_only_when_no_primary_and_drain_takes_none():
    spec = Upstream.model_validate({"servers": ["10.0.0.1:80", {"address": "10.0.0.2:80", "drain": True},
                                               {"address": "10.0.0.9:80", "backup": True}]})
    ps = [Peer(*s.host_port, s.weight, 8, 60, backup=s.backup, drain=s.drain) for s in spec.servers]
    g = UpstreamGroup("g", ps, spec)
    assert g.available == [ps[0]]
    ps[0].active_ok = False
    g.refresh(1.0)
    assert g.available == [ps[2]]
    ps[2].active_ok = False
    g.refresh(2.0)
    assert g.available == [] and g.select(None) is None


def test_retry_skips_tried_peers():
    g = group()
    first = g.select(None)
    second = g.select(None, [first])
    third = g.select(None, [first, second])
    assert len({first.host, second.host, third.host}) == 3
    assert g.select(None, list(g.peers)) is None


def test_slow_start_ramps_weight_after_recovery():
    g = group(health={"slow_start": 10, "passive": {"consecutive_failures": 1, "base_ejection": 5}})
    a = g.peers[0]
    assert a.eff_weight == 1.0  # no ramp at start
    g.record_failure(a, 100.0)
    g.refresh(105.0)  # ejection over: back, ramping
    assert a in g.available and a.eff_weight < 0.1
    g.refresh(110.0)
    assert 0.45 < a.eff_weight < 0.55
    g.refresh(115.5)
    assert a.eff_weight == 1.0


def test_retry_budget_caps_retries_to_a_share():
    budget = RetryBudget(percent=20, min_per_second=0)
    allowed = 0
    for second in range(20):
        for _ in range(100):
            budget.requests += 1
            if budget.allow_retry():
                allowed += 1
        budget.tick()
    assert 380 <= allowed <= 400  # 20% of 2,000 requests


def test_retry_budget_floor_allows_a_few_retries_at_low_traffic():
    budget = RetryBudget(percent=20, min_per_second=3)
    assert sum(budget.allow_retry() for _ in range(50)) == 30  # 3 per second over the 10 s window


def test_locality_levels_and_proportional_spill():
    from bastion.config.schema import ClientLocality, UpstreamLocality
    from bastion.filters.trust import TrustedProxies
    from bastion.proxy.exchange import Exchange
    from bastion.upstream.locality import ClientLocator, LocalityChooser

    spec = Upstream.model_validate({"servers": [
        {"address": "10.0.0.1:80", "region": "eu", "zone": "eu-1"},
        {"address": "10.0.0.2:80", "region": "eu", "zone": "eu-1"},
        {"address": "10.0.0.3:80", "region": "eu", "zone": "eu-2"},
        {"address": "10.0.0.4:80", "region": "us", "zone": "us-1"},
    ]})
    ps = []
    for s in spec.servers:
        p = Peer(*s.host_port, s.weight, 8, 60)
        p.region, p.zone = s.region, s.zone
        ps.append(p)
    g = UpstreamGroup("g", ps, spec)
    chooser = LocalityChooser(g, UpstreamLocality(spill_threshold=0.7), random.Random(3))
    locator = ClientLocator(ClientLocality(cidrs={"192.168.1.0/24": "eu/eu-1", "192.168.2.0/24": "us"}), TrustedProxies([]))
    ex = Exchange(None, 0.0)
    ex.client_ip = "192.168.1.9"
    assert [names(level) for level in chooser.levels("eu", "eu-1")] == [["1", "2"], ["3"], ["4"]]
    assert all(set(names(chooser.candidates(ex, locator, 0))) == {"1", "2"} for _ in range(50))
    # half the zone down: it keeps 0.5 / 0.7 = 71% of its traffic, the rest goes to the region
    ps[0].active_ok = False
    g.refresh(1.0)
    picks = Counter(tuple(names(chooser.candidates(ex, locator, 0))) for _ in range(2000))
    assert 0.66 < picks[("2",)] / 2000 < 0.77 and picks[("3",)] + picks[("2",)] == 2000
    ps[1].active_ok = ps[2].active_ok = False
    g.refresh(2.0)
    assert names(chooser.candidates(ex, locator, 0)) == ["4"]  # the whole region is down: the next one
    ex.client_ip = "192.168.2.7"
    ps[0].active_ok = ps[1].active_ok = ps[2].active_ok = True
    g.refresh(3.0)
    assert names(chooser.candidates(ex, locator, 0)) == ["4"]  # a US client goes to the US server


def test_error_rate_ejects_a_server_failing_half_its_requests():
    g = group(health={"passive": {"consecutive_failures": 0, "error_rate_percent": 50, "error_rate_min_requests": 10,
                                  "max_ejected_percent": 100}})
    a, b_ = g.peers[0], g.peers[1]
    for i in range(10):
        if i % 2:
            g.record_failure(a, 1.0)
        else:
            g.record_success(a, 200, 0.01, 1.0)
        g.record_success(b_, 500 if i == 0 else 200, 0.01, 1.0)
    assert a.ejected_until > 1.0 and b_.ejected_until == 0.0
