"""Load balancing, health checks and failover with real backend processes."""

import json
import socket
import threading
import time
import urllib.request
from collections import Counter
from urllib.error import HTTPError

from tests.support.ports import free_port
from tests.support.raw import ResettingServer


def fetch(url, headers=None, method="GET", data=None, timeout=10):
    req = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except HTTPError as e:
        return e.code, dict(e.headers), e.read()


def eventually(check, timeout=10.0):
    """Poll until `check()` is true: health decisions take a check interval plus a worker tick, which a
    loaded CI machine can stretch; a fixed sleep would make the test flaky."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def who(b, path="/echo", headers=None):
    status, _, body = fetch(b.url + path, headers)
    assert status == 200, (status, body)
    return json.loads(body)["name"]


def metric(b, name, **labels):
    with urllib.request.urlopen(b.admin_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


def test_killed_backend_under_load_loses_no_request(bastion, backend_factory):
    a, b_, c = backend_factory("a"), backend_factory("b"), backend_factory("c")
    px = bastion({"upstreams": {"app": {"servers": [a.address, b_.address, c.address],
                                        "retries": {"attempts": 3, "retry_on": ["connect_failure", "reset", "502"]},
                                        "health": {"passive": {"consecutive_failures": 2, "base_ejection": 30}}}},
                  "routes": [{"upstream": "app"}]})
    failures, served = [], Counter()
    stop = time.monotonic() + 8

    def client():
        while time.monotonic() < stop:
            try:
                status, _, body = fetch(px.url + "/echo/load", timeout=5)
            except OSError as exc:
                failures.append(repr(exc))
                continue
            if status != 200:
                failures.append(status)
            else:
                served[json.loads(body)["name"]] += 1

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(2)
    b_.proc.kill()  # a hard crash: refused connections and resets from now on
    killed_at = sum(served.values())
    for t in threads:
        t.join(20)
    assert failures == [], failures[:5]
    assert served["a"] > 0 and served["c"] > 0 and sum(served.values()) > killed_at + 50
    lines = px.access_log()
    assert any(line["error"] is None and line["upstream"] != b_.address for line in lines[-20:])
    assert metric(px, "bastion_upstream_peer_up", peer=b_.address) == 0.0


def test_active_checks_take_a_backend_out_and_back_after_rise(bastion, backend_factory):
    a, b_ = backend_factory("a"), backend_factory("b")
    px = bastion({"upstreams": {"app": {"servers": [a.address, b_.address],
                                        "health": {"active": {"path": "/__health", "interval": 0.3, "timeout": 1,
                                                              "rise": 2, "fall": 2}}}},
                  "routes": [{"upstream": "app"}]}, workers=2)
    assert {who(px) for _ in range(6)} == {"a", "b"}
    b_.set_health(False)
    eventually(lambda: {who(px) for _ in range(10)} == {"a"})  # fall checks, then the workers' tick
    assert {who(px) for _ in range(10)} == {"a"}
    assert "b is down" not in px.stderr() and f"{b_.address} is down: status 503" in px.stderr()
    b_.set_health(True)
    eventually(lambda: {who(px) for _ in range(10)} == {"a", "b"})
    assert f"{b_.address} is up again" in px.stderr()


def test_all_servers_down_is_503_at_once_with_retry_after(bastion, backend_factory):
    a = backend_factory("a")
    px = bastion({"upstreams": {"app": {"servers": [a.address],
                                        "health": {"active": {"path": "/__health", "interval": 0.3, "fall": 1}}}},
                  "routes": [{"upstream": "app"}]})
    a.set_health(False)
    eventually(lambda: fetch(px.url + "/echo")[0] == 503)
    started = time.monotonic()
    status, headers, _ = fetch(px.url + "/echo")
    assert status == 503 and time.monotonic() - started < 0.5
    assert int(headers["Retry-After"]) >= 1
    eventually(lambda: any(line["status"] == 503 and line["error"] == "no_server" for line in px.access_log()))


def test_backup_serves_only_when_primaries_are_down_and_drain_gets_nothing(bastion, backend_factory):
    a, d, bk = backend_factory("a"), backend_factory("drained"), backend_factory("backup")
    px = bastion({"upstreams": {"app": {"servers": [a.address, {"address": d.address, "drain": True},
                                                    {"address": bk.address, "backup": True}],
                                        "retries": {"attempts": 2},
                                        "health": {"passive": {"consecutive_failures": 1, "max_ejected_percent": 100}}}},
                  "routes": [{"upstream": "app"}]})
    assert {who(px) for _ in range(8)} == {"a"}
    a.proc.kill()
    assert {who(px) for _ in range(8)} == {"backup"}  # the first one is retried there, the rest go straight


def test_passive_ejection_backs_off(bastion, backend_factory):
    a, b_ = backend_factory("a"), backend_factory("b")
    dead = f"127.0.0.1:{free_port()}"
    px = bastion({"upstreams": {"app": {"servers": [a.address, b_.address, dead],
                                        "retries": {"attempts": 3},
                                        "health": {"passive": {"consecutive_failures": 1, "base_ejection": 1,
                                                               "max_ejected_percent": 50}}}},
                  "routes": [{"upstream": "app"}]})
    for _ in range(6):
        who(px)
    first = metric(px, "bastion_upstream_ejections_total", peer=dead)
    assert first == 1.0  # one failure ejected it; the following requests did not touch it
    time.sleep(1.3)  # the first ejection (1 s) is over: one try fails, ejected again, now for 2 s
    for _ in range(6):
        who(px)
    time.sleep(1.3)
    for _ in range(6):
        who(px)
    assert metric(px, "bastion_upstream_ejections_total", peer=dead) == 2.0  # still out: backoff doubled


def test_circuit_breaker_answers_503_beyond_max_requests(bastion, backend_factory):
    a = backend_factory("a")
    px = bastion({"upstreams": {"app": {"servers": [a.address], "limits": {"max_requests": 2}}},
                  "routes": [{"upstream": "app"}]})
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetch(px.url + "/delay/1.5")[0])) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    started = time.monotonic()
    status, headers, _ = fetch(px.url + "/echo")
    assert status == 503 and time.monotonic() - started < 0.5 and "Retry-After" in headers
    for t in threads:
        t.join()
    assert results == [200, 200]
    assert fetch(px.url + "/echo")[0] == 200
    assert metric(px, "bastion_upstream_errors_total", kind="circuit_open") == 1.0


def test_circuit_breaker_on_connections(bastion, backend_factory):
    a = backend_factory("a")
    px = bastion({"upstreams": {"app": {"servers": [a.address], "limits": {"max_connections": 1}}},
                  "routes": [{"upstream": "app"}]})
    slow = threading.Thread(target=lambda: fetch(px.url + "/delay/1.5"))
    slow.start()  # holds the only connection
    time.sleep(0.4)
    status, headers, _ = fetch(px.url + "/echo")
    slow.join()
    assert status == 503 and headers["Retry-After"] == "1"
    assert fetch(px.url + "/echo")[0] == 200  # the connection is free again (and reused)


def test_retry_budget_limits_retries_when_every_server_fails(bastion, backend_factory):
    a, b_ = backend_factory("a"), backend_factory("b")
    px = bastion({"upstreams": {"app": {"servers": [a.address, b_.address],
                                        "retries": {"attempts": 2, "retry_on": ["503"], "budget_percent": 20,
                                                    "budget_min_per_second": 0},
                                        "health": {"passive": {"consecutive_failures": 0}}}},
                  "routes": [{"upstream": "app"}]})
    statuses = Counter(fetch(px.url + "/status/503")[0] for _ in range(100))
    assert statuses == {503: 100}
    retries = metric(px, "bastion_upstream_retries_total") or 0
    deadline = time.monotonic() + 3
    while retries == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        retries = metric(px, "bastion_upstream_retries_total") or 0
    assert 1 <= retries <= 21, retries
    assert a.stats() + b_.stats() == 100 + retries


def test_post_is_not_retried_after_it_may_have_reached_a_backend(bastion, backend_factory):
    a = backend_factory("a")
    resetter = ResettingServer()
    try:
        px = bastion({"upstreams": {"app": {"servers": [resetter.address, a.address],
                                            "balance": "round_robin", "retries": {"attempts": 2},
                                            "health": {"passive": {"consecutive_failures": 0}}}},
                      "routes": [{"upstream": "app"}]})
        posts = Counter(fetch(px.url + "/echo", method="POST", data=b"x")[0] for _ in range(4))
        gets = Counter(fetch(px.url + "/echo")[0] for _ in range(4))
        assert posts == {502: 2, 200: 2}  # the ones sent to the resetting server are not replayed
        assert gets == {200: 4}  # idempotent requests are retried on the other server
    finally:
        resetter.close()


def test_hash_balancer_keeps_a_key_on_one_server(bastion, backend_factory):
    backends = [backend_factory(n) for n in ("a", "b", "c")]
    px = bastion({"upstreams": {"app": {"servers": [x.address for x in backends], "balance": "hash",
                                        "hash_on": {"source": "header", "name": "X-User"}}},
                  "routes": [{"upstream": "app"}]})
    owners = {user: {who(px, headers={"X-User": user}) for _ in range(3)} for user in (f"user-{i}" for i in range(30))}
    assert all(len(s) == 1 for s in owners.values())  # a key always goes to the same server
    assert len({next(iter(s)) for s in owners.values()}) == 3  # and the keys are spread over all of them


def test_least_conn_avoids_a_busy_server(bastion, backend_factory):
    a, b_ = backend_factory("a"), backend_factory("b")

    def run(balance):
        px = bastion({"upstreams": {"app": {"servers": [a.address, b_.address], "balance": balance}},
                      "routes": [{"upstream": "app"}]})
        slow = threading.Thread(target=lambda: fetch(px.url + "/delay/1.5"))
        slow.start()  # one request in flight on one of the two servers
        time.sleep(0.3)
        names = Counter(who(px) for _ in range(6))
        slow.join()
        return names

    assert len(run("least_conn")) == 1  # every quick request goes to the idle server
    assert len(run("round_robin")) == 2  # (round robin alternates: the check above can fail)


def test_locality_prefers_the_clients_zone_and_spills_over(bastion, backend_factory):
    z1a, z1b, z2, us = (backend_factory(n) for n in ("eu1-a", "eu1-b", "eu2", "us"))

    def server(b, region, zone):
        return {"address": b.address, "region": region, "zone": zone}

    px = bastion({
        "trusted_proxies": ["127.0.0.0/8"],
        "locality": {"header": "X-Client-Locality", "default": "us/us-1"},
        "upstreams": {"app": {
            "servers": [server(z1a, "eu", "eu-1"), server(z1b, "eu", "eu-1"), server(z2, "eu", "eu-2"),
                        server(us, "us", "us-1")],
            "locality": {"spill_threshold": 0.7},
            "health": {"active": {"path": "/__health", "interval": 0.3, "fall": 1, "rise": 1}},
        }},
        "routes": [{"upstream": "app"}]})
    eu = {"X-Client-Locality": "eu/eu-1"}
    assert Counter(who(px, headers=eu) for _ in range(20)).keys() == {"eu1-a", "eu1-b"}
    assert {who(px) for _ in range(5)} == {"us"}  # no header: the default locality
    z1a.set_health(False)
    eventually(lambda: "eu2" in {who(px, headers=eu) for _ in range(20)})  # spilling has begun
    spread = Counter(who(px, headers=eu) for _ in range(200))
    assert set(spread) == {"eu1-b", "eu2"}  # the zone keeps ~71%, the rest spills to the region
    assert 110 <= spread["eu1-b"] <= 170, spread
    z1b.set_health(False)
    z2.set_health(False)
    eventually(lambda: {who(px, headers=eu) for _ in range(10)} == {"us"})  # the whole region is down


def test_cookie_sticky_sessions_move_when_the_server_goes(bastion, backend_factory):
    backends = {n: backend_factory(n) for n in ("a", "b", "c")}
    px = bastion({"upstreams": {"app": {"servers": [x.address for x in backends.values()], "balance": "cookie",
                                        "sticky": {"cookie": "srv"},
                                        "retries": {"attempts": 3},
                                        "health": {"passive": {"consecutive_failures": 1, "max_ejected_percent": 100}}}},
                  "routes": [{"upstream": "app"}]})
    status, headers, body = fetch(px.url + "/echo")
    first = json.loads(body)["name"]
    cookie = headers["Set-Cookie"].split(";")[0]
    assert cookie.startswith("srv=") and "HttpOnly" in headers["Set-Cookie"]
    for _ in range(6):
        status, headers, body = fetch(px.url + "/echo", {"Cookie": cookie})
        assert json.loads(body)["name"] == first and "Set-Cookie" not in headers
    # a forged cookie (another server's name, wrong signature) is ignored and replaced
    other = next(n for n in backends if n != first)
    forged = "srv=" + __import__("base64").urlsafe_b64encode(backends[other].address.encode()).decode().rstrip("=") + ".0000"
    _, headers, _ = fetch(px.url + "/echo", {"Cookie": forged})
    assert "Set-Cookie" in headers
    # the server goes away: the client moves and gets a new cookie naming its new server
    backends[first].proc.kill()
    status, headers, body = fetch(px.url + "/echo", {"Cookie": cookie})
    moved = json.loads(body)["name"]
    assert status == 200 and moved != first and "Set-Cookie" in headers
    new_cookie = headers["Set-Cookie"].split(";")[0]
    assert {json.loads(fetch(px.url + "/echo", {"Cookie": new_cookie})[2])["name"] for _ in range(4)} == {moved}


def test_recovered_server_ramps_up_with_slow_start(bastion, backend_factory):
    a, b_ = backend_factory("a"), backend_factory("b")
    px = bastion({"upstreams": {"app": {"servers": [a.address, b_.address],
                                        "health": {"slow_start": 6,
                                                   "active": {"path": "/__health", "interval": 0.3, "fall": 1, "rise": 1}}}},
                  "routes": [{"upstream": "app"}]})
    b_.set_health(False)
    eventually(lambda: {who(px) for _ in range(6)} == {"a"})
    b_.set_health(True)
    eventually(lambda: "b" in {who(px) for _ in range(20)})  # back, at the start of its 6 s ramp
    back = time.monotonic()
    early = Counter(who(px) for _ in range(60))
    assert time.monotonic() - back < 2.5, "too slow to observe the ramp"
    time.sleep(max(0.0, 6.5 - (time.monotonic() - back)))  # ramp over
    late = Counter(who(px) for _ in range(60))
    assert 0 < early["b"] < 22, early  # a fraction of its share while warming up
    assert 27 <= late["b"] <= 33, late  # the full, equal share afterwards


def test_per_try_timeout_moves_a_slow_try_to_another_server(bastion, backend_factory):
    slow_srv = socket.socket()
    slow_srv.bind(("127.0.0.1", 0))
    slow_srv.listen(16)  # accepts, never answers
    a = backend_factory("a")
    try:
        px = bastion({"upstreams": {"app": {"servers": [f"127.0.0.1:{slow_srv.getsockname()[1]}", a.address],
                                            "retries": {"attempts": 2, "retry_on": ["timeout"], "per_try_timeout": 0.5},
                                            "health": {"passive": {"consecutive_failures": 0}}}},
                      "routes": [{"upstream": "app"}]})
        started = time.monotonic()
        results = [who(px) for _ in range(2)]  # one of them tries the silent server first
        assert results == ["a", "a"] and time.monotonic() - started < 3
    finally:
        slow_srv.close()
