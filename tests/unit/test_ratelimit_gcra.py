"""GCRA arithmetic and the shared-memory rate-limit table, without sockets."""

import os
import time

import pytest

from bastion.config.schema import RateLimit, parse_rate
from bastion.security import gcra
from bastion.security.shared import KeyedTable, CounterRows, key_hash


def run(n_requests, times, rate, burst):
    interval, tolerance = 1 / rate, burst / rate
    tat, allowed = 0.0, []
    for now in times[:n_requests]:
        ok, new, _ = gcra.decide(tat, now, interval, tolerance)
        if ok:
            tat = new
        allowed.append(ok)
    return allowed


def test_an_idle_key_lets_burst_plus_one_through_at_once():
    assert run(10, [100.0] * 10, rate=10, burst=4) == [True] * 5 + [False] * 5


def test_after_the_burst_one_request_per_interval():
    interval = 0.1
    times = [100.0] * 3 + [100.0 + interval * k + 0.001 for k in range(1, 6)]
    assert run(8, times, rate=10, burst=2) == [True] * 8
    times = [100.0] * 3 + [100.0 + 0.05]
    assert run(4, times, rate=10, burst=2) == [True, True, True, False]


def test_long_run_rate_is_exact():
    rate, burst = 50.0, 5
    times = [i * 0.001 for i in range(10_000)]  # 1000 r/s offered for 10 s
    allowed = sum(run(len(times), times, rate, burst))
    assert abs(allowed - (rate * 10 + burst + 1)) <= 1


def test_refusal_says_how_long_to_wait():
    ok, tat, _ = gcra.decide(0.0, 10.0, 1.0, 0.0)
    assert ok and tat == 11.0
    ok, _, wait = gcra.decide(tat, 10.25, 1.0, 0.0)
    assert not ok and wait == pytest.approx(0.75)


def test_remaining_and_reset():
    interval, tolerance = 0.1, 0.4  # 10/s, burst 4
    assert gcra.remaining(0.0, 0.0, interval, tolerance) == 5
    assert gcra.remaining(0.1, 0.0, interval, tolerance) == 4
    assert gcra.remaining(0.5, 0.0, interval, tolerance) == 0
    assert gcra.reset_after(0.5, 0.0) == 1


def test_delay_like_nginx():
    interval = 0.1
    assert gcra.delay_for(0.0, interval, None) == 0.0
    assert gcra.delay_for(0.3, interval, None) == 0.0  # no delay configured: the burst passes at once
    assert gcra.delay_for(0.3, interval, 0) == pytest.approx(0.3)
    assert gcra.delay_for(0.3, interval, 2) == pytest.approx(0.1)
    assert gcra.delay_for(0.1, interval, 2) == 0.0


@pytest.mark.parametrize("text,expected", [(100, (100.0, 1.0)), ("100/s", (100.0, 1.0)), ("600/m", (600.0, 60.0)),
                                           ("10r/s", (10.0, 1.0)), ("1000/h", (1000.0, 3600.0))])
def test_rates(text, expected):
    assert parse_rate(text) == expected


@pytest.mark.parametrize("bad", ["0", "fast", "10/week", -1])
def test_bad_rates(bad):
    with pytest.raises(ValueError):
        parse_rate(bad)


def test_rate_limit_key_parts_are_checked():
    RateLimit(rate=1, key=["client_ip", "header:X-Api-Key", "cookie:sid", "route"])
    with pytest.raises(ValueError):
        RateLimit(rate=1, key="ip")
    with pytest.raises(ValueError):
        RateLimit(rate=1, key="header:")
    with pytest.raises(ValueError):
        RateLimit(rate=1, burst=2, delay=3)


def test_keyed_table_is_shared_with_forked_children():
    table = KeyedTable(1024, "Qd")
    h = key_hash("client-a")
    bucket = table.bucket_of(h)
    pid = os.fork()
    if pid == 0:
        table.lock(bucket)
        offset, _ = table.find(h)
        table.write(offset, h, 42.5)
        table.unlock(bucket)
        os._exit(0)
    os.waitpid(pid, 0)
    _, record = table.find(h)
    assert record == (h, 42.5)


def test_keyed_table_evicts_the_stalest_slot_of_a_full_bucket():
    table = KeyedTable(4, "Qd")  # one bucket of four
    for i, stamp in enumerate([5.0, 1.0, 7.0, 9.0]):
        offset, record = table.find(100 + i)
        assert record is None
        table.write(offset, 100 + i, stamp)
    offset, record = table.find(999)
    assert record is None
    assert table.record.unpack_from(table.map, offset) == (101, 1.0)


def test_counter_rows_sum_over_workers_and_clear_a_dead_one():
    rows = CounterRows(8, 4)
    rows.row = 0
    rows.add(3, 2)
    rows.row = 2
    rows.add(3, 5)
    assert rows.total(3) == 7
    rows.clear_row(2)
    assert rows.total(3) == 2


def test_cost_of_one_node_wide_decision_is_small():
    """Not a timing assertion: prints the figure for the report (see docs/security.md)."""
    from bastion.security.ratelimit import RateLimitFilter
    from bastion.security.shared import KeyedTable as T
    from bastion.security.stats import SecurityStats

    class Addr:
        def of(self, ex):
            return ex.client_ip

    class Ex:
        client_ip = "10.0.0.1"
        _state = None
        state = {}

    f = RateLimitFilter(RateLimit(rate=1e9, burst=10, headers=False), "bench", T(65536, "Qd"), Addr(), SecurityStats())
    ex = Ex()
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        f.request_filter(ex)
    per = (time.perf_counter() - start) / n * 1e6
    print(f"\nnode-wide rate-limit decision: {per:.2f} us")
