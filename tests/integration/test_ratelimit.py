"""Rate limits against real traffic: 429 with Retry-After and RateLimit fields, keys, delay, node-wide
exactness with several workers, and cluster-wide budgets in a real redis-server shared by two Bastions."""

import http.client
import threading
import time
import urllib.request
from urllib.error import HTTPError

import pytest


def get(url, headers=None, timeout=10):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except HTTPError as e:
        return e.code, e.headers, e.read()


def statuses(url, n, headers=None):
    return [get(url, headers)[0] for _ in range(n)]


def route(backend, **security):
    return {"name": "app", "upstream": {"servers": [backend.address]}, "security": security}


def test_over_the_limit_is_429_with_retry_after_and_ratelimit_fields(bastion, backend):
    b = bastion({"security": {"rate_limits": [{"name": "per-ip", "rate": "2/s", "burst": 3}]},
                 "routes": [route(backend)]})
    codes = statuses(b.url + "/echo/a", 8)
    assert codes[:4] == [200] * 4, codes  # burst + 1 at once
    assert 429 in codes[4:]
    status, headers, body = get(b.url + "/echo/a")
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert headers["RateLimit-Policy"] == '"per-ip";q=2;w=1'
    assert headers["RateLimit"].startswith('"per-ip";r=0;t=')
    # An allowed request says how much is left.
    time.sleep(1.2)
    status, headers, _ = get(b.url + "/echo/a")
    assert status == 200 and headers["RateLimit-Policy"] == '"per-ip";q=2;w=1'
    assert '"per-ip";r=' in headers["RateLimit"]


def test_header_keys_are_counted_separately_and_missing_keys_are_not_limited(bastion, backend):
    b = bastion({"routes": [route(backend, rate_limits=[{"name": "api-key", "key": "header:X-Api-Key",
                                                          "rate": "1/m", "burst": 1}])]})
    assert statuses(b.url + "/echo/k", 3, {"X-Api-Key": "alpha"}) == [200, 200, 429]
    assert statuses(b.url + "/echo/k", 3, {"X-Api-Key": "beta"}) == [200, 200, 429]
    assert statuses(b.url + "/echo/k", 3) == [200, 200, 200]


def test_combined_key_and_cookie(bastion, backend):
    b = bastion({"routes": [route(backend, rate_limits=[{"key": ["client_ip", "cookie:sid"], "rate": "1/m"}])]})
    assert statuses(b.url + "/echo/c", 2, {"Cookie": "a=1; sid=one"}) == [200, 429]
    assert statuses(b.url + "/echo/c", 2, {"Cookie": "sid=two"}) == [200, 429]


def test_route_limits_apply_to_their_route_only(bastion, backend):
    b = bastion({"routes": [
        {"name": "tight", "match": {"path": "/tight"}, "upstream": {"servers": [backend.address]},
         "security": {"rate_limits": [{"rate": "1/m"}]}},
        {"name": "open", "upstream": {"servers": [backend.address]}},
    ]})
    assert statuses(b.url + "/tight", 3) == [200, 429, 429]
    assert statuses(b.url + "/other", 5) == [200] * 5


def test_delay_instead_of_reject(bastion, backend):
    b = bastion({"security": {"rate_limits": [{"rate": "10/s", "burst": 5, "delay": 0}]},
                 "routes": [route(backend)]})
    start = time.monotonic()
    codes = statuses(b.url + "/echo/d", 6)
    elapsed = time.monotonic() - start
    assert codes == [200] * 6
    # Five requests beyond the steady rate waited their turn: about 0.5 s in all, none refused.
    assert elapsed >= 0.4, elapsed


def hammer(url, seconds, threads=8, headers=None):
    """Keep-alive clients sending as fast as they can for `seconds` (bounded): (ok, limited, failures, the time
    from the first to the last allowed answer)."""
    counts = {"ok": 0, "limited": 0, "other": 0}
    ok_times = []
    lock = threading.Lock()
    host, port = url.split("//")[1].split(":")
    stop_at = time.monotonic() + seconds

    def client():
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        local = {"ok": 0, "limited": 0, "other": 0}
        sent = 0
        while time.monotonic() < stop_at and sent < 100_000:
            sent += 1
            try:
                conn.request("GET", "/echo/h", headers=headers or {})
                r = conn.getresponse()
                r.read()
                local["ok" if r.status == 200 else "limited" if r.status == 429 else "other"] += 1
                if r.status == 200:
                    ok_times.append(time.monotonic())
                if r.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException):
                local["other"] += 1
                conn.close()
        conn.close()
        with lock:
            for k, v in local.items():
                counts[k] += v

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(seconds + 30)
    span = max(ok_times) - min(ok_times) if ok_times else 0.0
    return counts["ok"], counts["limited"], counts["other"], span


@pytest.mark.parametrize("workers", [1, 3])
def test_node_wide_limit_is_exact_whatever_the_number_of_workers(bastion, backend, workers):
    rate, burst, seconds = 40, 40, 4.0  # a one-second burst: a pause of the (GIL-bound) clients loses nothing
    b = bastion({"access_log": {"enabled": False},
                 "security": {"rate_limits": [{"rate": rate, "burst": burst}]}, "routes": [route(backend)]},
                workers=workers)
    ok, limited, other, span = hammer(b.url, seconds)
    # The burst at once, then one per interval from the first allowed answer to the last.
    expected = rate * span + burst + 1
    print(f"\nworkers={workers}: {ok} allowed, {limited} limited over {span:.2f}s (expected {expected:.0f})")
    assert other == 0
    assert limited > ok, "the clients must offer more than the limit for the test to mean anything"
    assert abs(ok - expected) <= 0.05 * expected


def test_cluster_limit_is_one_budget_for_two_bastions(bastion, backend, redis_server):
    redis_server.flush()
    config = {"security": {"redis": {"url": redis_server.url},
                           "rate_limits": [{"name": "shared", "rate": "10/m", "burst": 9, "scope": "cluster"}]},
              "routes": [route(backend)]}
    one, two = bastion(config), bastion(config)
    codes = []
    for _ in range(10):
        codes.append(get(one.url + "/echo/r")[0])
        codes.append(get(two.url + "/echo/r")[0])
    # Ten requests in the budget, wherever they land; every one after that is refused on both nodes.
    assert codes.count(200) == 10, codes
    assert codes[10:] == [429] * 10
    assert get(one.url + "/echo/r")[1]["RateLimit-Policy"] == '"shared";q=10;w=60'


def test_redis_unreachable_falls_back_to_local_limits_and_logs_once(bastion, backend, redis_server):
    redis_server.flush()
    config = {"security": {"redis": {"url": redis_server.url, "timeout": "200ms", "retry_interval": "30s"},
                           "rate_limits": [{"name": "fb", "rate": "1/m", "burst": 2, "scope": "cluster"}]},
              "routes": [route(backend)]}
    b = bastion(config)
    assert get(b.url + "/echo/f")[0] == 200
    redis_server.pause()
    try:
        codes = statuses(b.url + "/echo/f", 6)
        # The node's own limit took over (burst + 1 = 3 on the fresh local budget), not fail-open.
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429] * 3, codes
        deadline = time.monotonic() + 5
        while "unreachable" not in b.stderr() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b.stderr().count("unreachable") == 1
    finally:
        redis_server.resume()


@pytest.mark.parametrize("mode,expected", [("open", 200), ("closed", 503)])
def test_redis_fail_open_and_fail_closed(bastion, backend, redis_server, mode, expected):
    config = {"security": {"redis": {"url": redis_server.url, "timeout": "200ms", "on_error": mode},
                           "rate_limits": [{"name": f"m-{mode}", "rate": "1/m", "scope": "cluster"}]},
              "routes": [route(backend)]}
    b = bastion(config)
    redis_server.pause()
    try:
        assert statuses(b.url + "/echo/o", 3) == [expected] * 3
    finally:
        redis_server.resume()


def test_global_limits_also_apply_to_requests_that_match_no_route(bastion, backend):
    # Scanners probing unknown hosts and paths share the client's budget with its real requests.
    b = bastion({"security": {"rate_limits": [{"name": "per-ip", "rate": "1/m", "burst": 1}]},
                 "routes": [dict(route(backend), match={"path": "/app/"})]})
    assert statuses(b.url + "/nowhere", 3) == [404, 404, 429]
    assert get(b.url + "/app/x")[0] == 429
    before = backend.stats()
    get(b.url + "/nowhere")
    assert backend.stats() == before
