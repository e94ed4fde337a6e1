"""The Redis store: several Bastion "nodes" (separate processes) sharing one real redis-server."""

import json
import time
import urllib.parse
import urllib.request

from tests.integration import test_cache
from tests.integration.test_cache import hits, q, url, wait_until

HOST = "shared.example"  # the nodes listen on different ports; clients name the site the same way


def request(b, path, headers=None, method="GET"):
    return test_cache.request(b, path, {"Host": HOST, **(headers or {})}, method=method)


def node(bastion, backend, redis_server, prefix, **cache):
    return bastion({
        "cache": {"redis": {"url": redis_server.url, "prefix": prefix}},
        "routes": [{"name": "app", "upstream": {"servers": [backend.address]},
                    "cache": {"store": "redis", "purge_from": ["127.0.0.1"], **cache}}],
    })


def admin_purge(b, **params):
    req = urllib.request.Request(b.admin_url + "/cache/purge?" + urllib.parse.urlencode(params), method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def test_a_response_stored_by_one_node_is_served_by_another(bastion, backend, redis_server):
    prefix = f"t{time.monotonic_ns()}:"
    a = node(bastion, backend, redis_server, prefix)
    b = node(bastion, backend, redis_server, prefix)
    path = url(q(cc="max-age=60", etag='"s"'))
    _, _, body = request(a, path)

    def served_by_b():
        _, h, got = request(b, path)
        return "hit" in h["cache-status"] and got == body

    assert wait_until(served_by_b, timeout=5)  # the store to Redis is asynchronous
    assert hits(backend, path) == 1


def test_vary_variants_are_shared(bastion, backend, redis_server):
    prefix = f"t{time.monotonic_ns()}:"
    a = node(bastion, backend, redis_server, prefix)
    b = node(bastion, backend, redis_server, prefix)
    path = url(q(cc="max-age=60", vary="Accept-Language"))
    _, _, en = request(a, path, {"Accept-Language": "en"})
    _, _, fr = request(a, path, {"Accept-Language": "fr"})
    time.sleep(0.3)
    assert wait_until(lambda: request(b, path, {"Accept-Language": "fr"})[2] == fr, timeout=5)
    assert request(b, path, {"Accept-Language": "en"})[2] == en
    assert hits(backend, path) == 2


def test_purge_on_one_node_reaches_the_others(bastion, backend, redis_server):
    prefix = f"t{time.monotonic_ns()}:"
    a = node(bastion, backend, redis_server, prefix)
    b = node(bastion, backend, redis_server, prefix)
    tagged = url(q(cc="max-age=600", h_Surrogate_Key="group-1"))
    plain = url(q(cc="max-age=600"))
    for path in (tagged, plain):
        request(a, path)
        assert wait_until(lambda: "hit" in request(b, path)[1]["cache-status"], timeout=5)  # b holds it too now
    answer = admin_purge(a, tag="group-1")
    assert answer["purged_in_redis"] == 1
    assert wait_until(lambda: "fwd=uri-miss" in request(b, tagged)[1]["cache-status"], timeout=5)
    status, _, body = request(b, plain, method="PURGE")
    assert status == 200 and json.loads(body)["purged_in_redis"] == 1
    assert wait_until(lambda: "fwd=uri-miss" in request(a, plain)[1]["cache-status"], timeout=5)


def test_the_shared_store_survives_a_restart(bastion, backend, redis_server):
    prefix = f"t{time.monotonic_ns()}:"
    first = node(bastion, backend, redis_server, prefix)
    path = url(q(cc="max-age=600"))
    request(first, path)
    time.sleep(0.5)
    first.stop()
    second = node(bastion, backend, redis_server, prefix)
    _, h, _ = request(second, path)
    assert "hit" in h["cache-status"] and hits(backend, path) == 1


def test_redis_down_means_misses_not_errors(bastion, backend, redis_server):
    prefix = f"t{time.monotonic_ns()}:"
    b = node(bastion, backend, redis_server, prefix)
    path = url(q(cc="max-age=600"))
    redis_server.pause()
    try:
        status, h, _ = request(b, path)
        assert status == 200 and "fwd=uri-miss" in h["cache-status"]
        status, _, _ = request(b, path)  # this worker's memory still serves
        assert status == 200
    finally:
        redis_server.resume()
