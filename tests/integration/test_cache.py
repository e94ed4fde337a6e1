"""The HTTP cache end to end: a real Bastion in front of the test backend's /cache/ endpoints, whose caching
headers each test chooses (tests/support/cache_origin.py), and which counts what reaches it."""

import http.client
import json
import threading
import time
import urllib.parse
import urllib.request
import uuid

import pytest


def request(b, path, headers=None, method="GET", port=None, fresh=False):
    conn = http.client.HTTPConnection("127.0.0.1", port or b.port, timeout=15)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    finally:
        conn.close()


def hits(backend, path):
    with urllib.request.urlopen(backend.url + "/__cache/hits", timeout=5) as r:
        return json.load(r).get(path.split("?")[0], 0)


def seen_requests(backend, path):
    with urllib.request.urlopen(backend.url + "/__cache/requests?path=" + urllib.parse.quote(path.split("?")[0]),
                                timeout=5) as r:
        return [{k.lower(): v for k, v in h} for h in json.load(r)]


def set_fail(backend, status):
    req = urllib.request.Request(backend.url + f"/__cache/fail?status={status}", method="POST")
    urllib.request.urlopen(req, timeout=5).read()


def url(query="", name=None):
    path = f"/cache/{name or uuid.uuid4().hex}"
    return path + ("?" + query if query else "")


def q(**params):
    return urllib.parse.urlencode({k.replace("_", "-") if k[:2] in ("h_", "l_") else k: v
                                   for k, v in params.items()})


def cache_events(b) -> dict:
    """bastion_cache_events_total by event, summed over routes (from the admin /metrics)."""
    with urllib.request.urlopen(b.admin_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("bastion_cache_events_total{"):
            event = line.split('event="')[1].split('"')[0]
            found[event] = found.get(event, 0) + float(line.rsplit(" ", 1)[1])
    return found


def config(backend, **cache):
    return {"routes": [{"name": "app", "upstream": {"servers": [backend.address]},
                        "cache": cache or True}]}


def wait_until(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


@pytest.fixture
def cached(bastion, backend):
    return bastion(config(backend, purge_from=["127.0.0.1"]))


# -- freshness ----------------------------------------------------------------------------------------------------

def test_fresh_response_is_served_from_the_cache(cached, backend):
    path = url(q(cc="max-age=60"))
    status, h1, body1 = request(cached, path)
    assert status == 200 and "fwd=uri-miss" in h1["cache-status"] and "stored" in h1["cache-status"]
    status, h2, body2 = request(cached, path)
    assert status == 200 and body2 == body1
    assert h2["cache-status"].startswith("Bastion; hit; ttl=")
    assert int(h2["age"]) >= 0 and h2["content-length"] == str(len(body1))
    assert hits(backend, path) == 1


def test_age_from_upstream_counts_against_freshness(cached, backend):
    path = url(q(cc="max-age=62", age="60"))
    request(cached, path)
    _, h, _ = request(cached, path)
    assert int(h["age"]) >= 60
    # Two seconds later it is stale (60 + 2 >= 62): the next request goes to the origin.
    assert wait_until(lambda: (request(cached, path), hits(backend, path))[1] >= 2, timeout=6)


def test_s_maxage_wins_over_max_age(cached, backend):
    path = url(q(cc="max-age=0, s-maxage=60"))
    request(cached, path)
    _, h, _ = request(cached, path)
    assert "hit" in h["cache-status"] and hits(backend, path) == 1


def test_expires_gives_freshness_and_an_invalid_one_does_not(cached, backend):
    good = url(q(expires="60"))
    request(cached, good)
    request(cached, good)
    assert hits(backend, good) == 1
    bad = url(q(expires="0", etag='"e"'))
    request(cached, bad)
    _, h, _ = request(cached, bad)
    assert hits(backend, bad) == 2 and "fwd=stale" in h["cache-status"]


def test_heuristic_freshness_from_last_modified(cached, backend):
    path = url(q(lm="10000"))  # 10% of 10000 s: fresh for 1000 s
    request(cached, path)
    _, h, _ = request(cached, path)
    assert "hit" in h["cache-status"] and hits(backend, path) == 1


def test_no_freshness_information_means_no_cache_by_default(cached, backend):
    path = url()
    request(cached, path)
    request(cached, path)
    assert hits(backend, path) == 2


@pytest.mark.parametrize("directive", ["no-store", "private", "max-age=60, private"])
def test_no_store_and_private_are_not_cached(cached, backend, directive):
    path = url(q(cc=directive))
    request(cached, path)
    _, h, _ = request(cached, path)
    assert hits(backend, path) == 2 and "stored" not in h["cache-status"]


def test_qualified_no_cache_stores_the_response_without_the_listed_fields(cached, backend):
    path = url(q(cc='max-age=60, no-cache="X-Secret"', h_X_Secret="s3", h_X_Kept="k"))
    _, first, _ = request(cached, path)
    assert first["x-secret"] == "s3"  # the response itself is untouched
    _, h, _ = request(cached, path)
    assert "hit" in h["cache-status"] and "x-secret" not in h and h["x-kept"] == "k"


def test_a_304_updates_the_stored_headers(cached, backend):
    path = url(q(cc="max-age=1", etag='"u"', h_X_Version="a", l_X_Version="b", l_Cache_Control="max-age=600",
                  l_Content_Type="text/x-updated", l_Set_Cookie="c=1"))
    _, h, _ = request(cached, path)
    assert h["x-version"] == "a"
    time.sleep(1.5)
    _, h, body = request(cached, path)  # stale: revalidated, and the 304 carries new values
    assert "fwd-status=304" in h["cache-status"] and h["x-version"] == "b" and h["content-type"] == "text/x-updated"
    assert h["set-cookie"] == "c=1"  # to this client only
    _, h, _ = request(cached, path)
    assert "hit" in h["cache-status"] and h["x-version"] == "b" and "set-cookie" not in h
    assert hits(backend, path) == 2


def test_must_understand_lets_an_understood_status_be_stored_despite_no_store(cached, backend):
    understood = url(q(cc="must-understand, no-store, max-age=60"))
    request(cached, understood)
    _, h, _ = request(cached, understood)
    assert "hit" in h["cache-status"]
    unknown = url(q(cc="must-understand, no-store, max-age=60", status="299"))
    request(cached, unknown)
    request(cached, unknown)
    assert hits(backend, unknown) == 2


def test_request_no_store_bypasses_the_cache(cached, backend):
    path = url(q(cc="max-age=60"))
    request(cached, path)
    _, h, _ = request(cached, path, {"Cache-Control": "no-store"})
    assert "fwd=request" in h["cache-status"] and hits(backend, path) == 2


@pytest.mark.parametrize("directive", ["proxy-revalidate", "s-maxage=1"])
def test_shared_cache_revalidation_directives_forbid_stale_serving(cached, backend, directive):
    path = url(q(cc=f"max-age=1, {directive}"))
    request(cached, path)
    time.sleep(1.5)
    request(cached, path, {"Cache-Control": "max-stale=600"})
    assert hits(backend, path) == 2


# -- revalidation --------------------------------------------------------------------------------------------------

def test_no_cache_response_is_revalidated_on_every_use(cached, backend):
    path = url(q(cc="no-cache", etag='"v1"'))
    _, _, first = request(cached, path)
    status, h, body = request(cached, path)
    assert status == 200 and body == first  # the stored body, after the origin's 304
    assert "fwd-status=304" in h["cache-status"]
    sent = seen_requests(backend, path)
    assert len(sent) == 2 and sent[1]["if-none-match"] == '"v1"'


def test_stale_entry_is_revalidated_with_if_modified_since(cached, backend):
    path = url(q(cc="max-age=1", lm="3600"))
    _, _, first = request(cached, path)
    wait_until(lambda: "fwd=stale" in request(cached, path)[1]["cache-status"], timeout=6)
    sent = seen_requests(backend, path)
    assert "if-modified-since" in sent[-1]
    status, h, body = request(cached, path)
    assert status == 200 and body == first and "hit" in h["cache-status"]  # freshened by the 304


def test_client_conditional_is_answered_304_from_a_fresh_entry(cached, backend):
    path = url(q(cc="max-age=60", etag='"abc"'))
    request(cached, path)
    status, h, body = request(cached, path, {"If-None-Match": 'W/"abc"'})
    assert status == 304 and body == b"" and h["etag"] == '"abc"' and "hit" in h["cache-status"]
    status, _, _ = request(cached, path, {"If-None-Match": '"other"'})
    assert status == 200
    assert hits(backend, path) == 1


def test_client_conditional_on_a_revalidation_gets_304(cached, backend):
    path = url(q(cc="no-cache", etag='"z"'))
    request(cached, path)
    status, h, _ = request(cached, path, {"If-None-Match": '"z"'})
    assert status == 304 and "fwd-status=304" in h["cache-status"]


# -- request directives ---------------------------------------------------------------------------------------------

def test_request_no_cache_and_max_age_0_revalidate(cached, backend):
    path = url(q(cc="max-age=60", etag='"r"'))
    request(cached, path)
    _, h, _ = request(cached, path, {"Cache-Control": "no-cache"})
    assert "fwd=request" in h["cache-status"]
    request(cached, path, {"Cache-Control": "max-age=0"})
    request(cached, path, {"Pragma": "no-cache"})
    assert hits(backend, path) == 4
    assert all(r.get("if-none-match") == '"r"' for r in seen_requests(backend, path)[1:])


def test_request_min_fresh_and_max_stale(cached, backend):
    path = url(q(cc="max-age=60"))
    request(cached, path)
    request(cached, path, {"Cache-Control": "min-fresh=120"})
    assert hits(backend, path) == 2
    stale = url(q(cc="max-age=1"))
    request(cached, stale)
    time.sleep(1.5)
    _, h, _ = request(cached, stale, {"Cache-Control": "max-stale=60"})
    assert "max-stale" in h["cache-status"] and hits(backend, stale) == 1


def test_must_revalidate_forbids_max_stale(cached, backend):
    path = url(q(cc="max-age=1, must-revalidate"))
    request(cached, path)
    time.sleep(1.5)
    request(cached, path, {"Cache-Control": "max-stale=60"})
    assert hits(backend, path) == 2


def test_only_if_cached(cached, backend):
    path = url(q(cc="max-age=60"))
    status, _, _ = request(cached, path, {"Cache-Control": "only-if-cached"})
    assert status == 504 and hits(backend, path) == 0
    request(cached, path)
    status, _, _ = request(cached, path, {"Cache-Control": "only-if-cached"})
    assert status == 200 and hits(backend, path) == 1


# -- Vary ---------------------------------------------------------------------------------------------------------

def test_vary_keeps_one_variant_per_request_value(cached, backend):
    path = url(q(cc="max-age=60", vary="Accept-Language"))
    _, _, en = request(cached, path, {"Accept-Language": "en"})
    _, _, fr = request(cached, path, {"Accept-Language": "fr"})
    assert en != fr
    _, h, again = request(cached, path, {"Accept-Language": "en"})
    assert again == en and "hit" in h["cache-status"]
    assert hits(backend, path) == 2


def test_vary_accept_encoding_is_normalised(cached, backend):
    path = url(q(cc="max-age=60", vary="Accept-Encoding"))
    request(cached, path, {"Accept-Encoding": "gzip, br"})
    _, h, _ = request(cached, path, {"Accept-Encoding": "br;q=0.8,GZIP"})
    assert "hit" in h["cache-status"] and hits(backend, path) == 1


def test_vary_star_is_never_served_from_cache(cached, backend):
    path = url(q(cc="max-age=60", vary="*"))
    request(cached, path)
    request(cached, path)
    assert hits(backend, path) == 2


# -- invalidation --------------------------------------------------------------------------------------------------

def test_unsafe_request_invalidates_the_uri_and_same_origin_locations(cached, backend):
    name = uuid.uuid4().hex
    target = url(q(cc="max-age=60"), name)
    other = url(q(cc="max-age=60"))
    foreign = url(q(cc="max-age=60"))
    for path in (target, other, foreign):
        request(cached, path)
    host = f"127.0.0.1:{cached.port}"
    post = f"/cache/{name}?" + q(cc="max-age=60", h_Location=other, h_Content_Location=f"http://elsewhere{foreign}")
    # The POST's own URI is the GET's URI with the same query.
    status, _, _ = request(cached, target, method="POST")
    assert status == 200
    request(cached, post, method="POST", headers={"Host": host})
    request(cached, target)
    request(cached, other)
    request(cached, foreign)
    assert hits(backend, target) >= 2  # invalidated by the POST to it
    assert hits(backend, other) == 2  # by the same-origin Location
    assert hits(backend, foreign) == 1  # another origin is not ours to invalidate


def test_a_method_of_unknown_safety_invalidates(cached, backend):
    path = url(q(cc="max-age=60"))
    request(cached, path)
    request(cached, path, method="M-SEARCH")
    _, h, _ = request(cached, path)
    assert "fwd=uri-miss" in h["cache-status"]


def test_failed_unsafe_request_does_not_invalidate(cached, backend):
    path = url(q(cc="max-age=60", status="200"))
    request(cached, path)
    failing = path.replace("status=200", "status=500")
    request(cached, path, method="DELETE")  # a success: invalidates
    request(cached, path)
    request(cached, failing, method="DELETE")  # another URI anyway; and a failure
    _, h, _ = request(cached, path)
    assert "hit" in h["cache-status"]


# -- stale serving ----------------------------------------------------------------------------------------------------

def test_stale_while_revalidate_serves_stale_and_refreshes_once(cached, backend):
    path = url(q(cc="max-age=1, stale-while-revalidate=60"))
    _, _, first = request(cached, path)
    time.sleep(1.6)
    status, h, body = request(cached, path)
    assert status == 200 and body == first and "stale-while-revalidate" in h["cache-status"]
    assert wait_until(lambda: hits(backend, path) == 2)
    _, h, body = request(cached, path)
    assert body != first  # the refreshed copy
    assert hits(backend, path) <= 3


def test_stale_while_revalidate_refreshes_once_for_many_requests(cached, backend):
    path = url(q(cc="max-age=3, stale-while-revalidate=60", delay="0.3"))
    request(cached, path)
    time.sleep(3.5)
    results = _concurrent(cached, path, 6)  # all inside the refresh's 0.3 s
    assert all(r is not None and r[0] == 200 for r in results)
    assert wait_until(lambda: hits(backend, path) >= 2)
    time.sleep(0.5)
    assert hits(backend, path) == 2


def test_stale_if_error_on_5xx_and_on_a_dead_backend(bastion, backend_factory):
    origin = backend_factory("origin")
    b = bastion(config(origin))
    path = url(q(cc="max-age=1, stale-if-error=60"))
    _, _, first = request(b, path)
    time.sleep(1.5)
    set_fail(origin, 503)
    status, h, body = request(b, path)
    assert status == 200 and body == first and "fwd-status=503" in h["cache-status"]
    origin.stop()
    status, h, body = request(b, path)
    assert status == 200 and body == first and "fwd=stale" in h["cache-status"]


def test_without_stale_if_error_the_error_goes_through(bastion, backend_factory):
    origin = backend_factory("origin")
    b = bastion(config(origin))
    path = url(q(cc="max-age=1"))
    request(b, path)
    time.sleep(1.5)
    set_fail(origin, 503)
    status, _, _ = request(b, path)
    assert status == 503


def test_grace_serves_stale_when_all_backends_are_down(bastion, backend_factory):
    origin = backend_factory("origin")
    b = bastion(config(origin, grace="1h"))
    path = url(q(cc="max-age=1"))
    _, _, first = request(b, path)
    time.sleep(1.5)
    origin.stop()
    status, h, body = request(b, path)
    assert status == 200 and body == first and "detail=grace" in h["cache-status"]
    other = url(q(cc="max-age=1"))
    status, _, _ = request(b, other)
    assert status == 502  # nothing stored to fall back on


# -- collapsing -------------------------------------------------------------------------------------------------------

def _concurrent(b, path, n):
    results = [None] * n

    def one(i):
        results[i] = request(b, path)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_misses_make_one_upstream_request(cached, backend):
    path = url(q(cc="max-age=60", delay="1"))
    results = _concurrent(cached, path, 8)
    assert all(r is not None and r[0] == 200 for r in results)
    assert len({r[2] for r in results}) == 1
    assert hits(backend, path) == 1
    assert any("collapsed" in r[1]["cache-status"] for r in results)


def test_concurrent_revalidations_make_one_conditional_request(cached, backend):
    path = url(q(cc="max-age=1", etag='"c"', delay="0.5"))
    _, _, first = request(cached, path)
    time.sleep(1.5)
    results = _concurrent(cached, path, 6)
    assert all(r is not None and r[0] == 200 and r[2] == first for r in results)
    assert hits(backend, path) == 2
    assert seen_requests(backend, path)[1]["if-none-match"] == '"c"'


def test_collapsed_waiters_give_up_after_the_bounded_wait(bastion, backend):
    b = bastion(config(backend, collapse_timeout="200ms"))
    path = url(q(cc="max-age=60", delay="1.5"))
    results = _concurrent(b, path, 4)
    assert all(r is not None and r[0] == 200 for r in results)
    assert hits(backend, path) > 1  # the waiters went upstream themselves


def test_uncacheable_answer_releases_the_waiters(cached, backend):
    path = url(q(cc="no-store", delay="0.5"))
    results = _concurrent(cached, path, 4)
    assert all(r is not None and r[0] == 200 for r in results)
    assert hits(backend, path) == 4


# -- HEAD and Range ---------------------------------------------------------------------------------------------------

def test_head_is_answered_from_a_cached_get(cached, backend):
    path = url(q(cc="max-age=60"))
    _, _, body = request(cached, path)
    status, h, head_body = request(cached, path, method="HEAD")
    assert status == 200 and head_body == b"" and h["content-length"] == str(len(body))
    assert "hit" in h["cache-status"] and hits(backend, path) == 1


def test_a_range_request_on_a_stale_entry_refreshes_it_whole(cached, backend):
    path = url(q(cc="max-age=1", etag='"rr"', body="abcdefghij"))
    request(cached, path)
    time.sleep(1.5)
    status, h, body = request(cached, path, {"Range": "bytes=0-2"})
    assert status == 206 and body == b"abc" and "fwd-status=304" in h["cache-status"]
    assert "range" not in seen_requests(backend, path)[-1]  # the cache asked for the whole object


def test_range_is_answered_206_from_a_cached_full_response(cached, backend):
    path = url(q(cc="max-age=60", etag='"r1"', body="0123456789"))
    request(cached, path)
    status, h, body = request(cached, path, {"Range": "bytes=2-5"})
    assert status == 206 and body == b"2345" and h["content-range"] == "bytes 2-5/10"
    status, h, body = request(cached, path, {"Range": "bytes=-3"})
    assert status == 206 and body == b"789"
    status, h, _ = request(cached, path, {"Range": "bytes=20-"})
    assert status == 416 and h["content-range"] == "bytes */10"
    status, _, body = request(cached, path, {"Range": "bytes=0-1", "If-Range": '"other"'})
    assert status == 200 and body == b"0123456789"
    status, _, body = request(cached, path, {"Range": "bytes=0-1", "If-Range": '"r1"'})
    assert status == 206 and body == b"01"
    assert hits(backend, path) == 1


# -- defaults a user expects -----------------------------------------------------------------------------------------

def test_authorization_requests_are_not_served_from_a_shared_cache(cached, backend):
    path = url(q(cc="max-age=60"))
    request(cached, path, {"Authorization": "Bearer a"})
    request(cached, path, {"Authorization": "Bearer a"})
    assert hits(backend, path) == 2
    public = url(q(cc="public, max-age=60"))
    request(cached, public, {"Authorization": "Bearer a"})
    _, h, _ = request(cached, public, {"Authorization": "Bearer b"})
    assert "hit" in h["cache-status"] and hits(backend, public) == 1


def test_set_cookie_responses_are_not_stored_unless_configured(bastion, backend):
    path = url(q(cc="max-age=60", h_Set_Cookie="session=secret"))
    b = bastion(config(backend))
    request(b, path)
    request(b, path)
    assert hits(backend, path) == 2
    b2 = bastion(config(backend, store_set_cookie=True))
    _, h1, _ = request(b2, path)
    _, h2, _ = request(b2, path)
    assert h1.get("set-cookie") == "session=secret"
    assert "set-cookie" not in h2 and "hit" in h2["cache-status"]  # never replayed to another client
    assert hits(backend, path) == 3


# -- configuration ----------------------------------------------------------------------------------------------------

def test_cache_key_ignores_and_sorts_query_parameters(bastion, backend):
    b = bastion(config(backend, key={"query_ignore": ["utm_source"], "query": "sorted"}))
    name = uuid.uuid4().hex
    request(b, f"/cache/{name}?cc=max-age%3D60&a=1&utm_source=x")
    _, h, _ = request(b, f"/cache/{name}?a=1&utm_source=y&cc=max-age%3D60")
    assert "hit" in h["cache-status"] and hits(backend, f"/cache/{name}") == 1


def test_cache_key_with_a_header(bastion, backend):
    b = bastion(config(backend, key={"headers": ["X-Tenant"]}))
    path = url(q(cc="max-age=60"))
    request(b, path, {"X-Tenant": "a"})
    request(b, path, {"X-Tenant": "b"})
    request(b, path, {"X-Tenant": "a"})
    assert hits(backend, path) == 2


def test_cache_key_with_a_cookie_and_without_the_query(bastion, backend):
    b = bastion(config(backend, key={"cookies": ["lang"], "query": "none"}))
    name = uuid.uuid4().hex
    first = f"/cache/{name}?cc=max-age%3D60&x=1"
    request(b, first, {"Cookie": "session=a; lang=en"})
    _, h, _ = request(b, f"/cache/{name}?cc=max-age%3D60&x=2", {"Cookie": "lang=en; session=b"})
    assert "hit" in h["cache-status"]  # same lang cookie, query ignored
    request(b, first, {"Cookie": "lang=fr"})
    assert hits(backend, f"/cache/{name}") == 2


def test_methods_option_limits_what_is_answered_from_the_cache(bastion, backend):
    b = bastion(config(backend, methods=["GET"]))
    path = url(q(cc="max-age=60"))
    request(b, path)
    status, h, _ = request(b, path, method="HEAD")
    assert status == 200 and "cache-status" not in h and hits(backend, path) == 2


def test_default_and_max_ttl(bastion, backend):
    b = bastion(config(backend, default_ttl="60s", max_ttl="1s"))
    plain = url()
    request(b, plain)
    _, h, _ = request(b, plain)
    assert "hit" in h["cache-status"]
    capped = url(q(cc="max-age=3600"))
    request(b, capped)
    assert wait_until(lambda: (request(b, capped), hits(backend, capped))[1] >= 2, timeout=6)


def test_statuses_and_max_object_size(bastion, backend):
    b = bastion(config(backend, max_object_size="1k"))
    not_found = url(q(cc="max-age=60", status="404"))
    request(b, not_found)
    status, h, _ = request(b, not_found)
    assert status == 404 and "hit" in h["cache-status"]
    error = url(q(cc="max-age=60", status="500"))
    request(b, error)
    status, h, _ = request(b, error)
    assert status == 500 and "hit" in h["cache-status"]  # explicit freshness makes any status storable
    no_heuristic = url(q(lm="10000", status="500"))
    request(b, no_heuristic)
    request(b, no_heuristic)
    assert hits(backend, no_heuristic) == 2
    restricted = bastion(config(backend, statuses="200,404"))
    request(restricted, error)
    request(restricted, error)
    assert hits(backend, error) == 3
    big = url(q(cc="max-age=60", size="5000"))
    request(b, big)
    _, _, body = request(b, big)
    assert len(body) == 5000 and hits(backend, big) == 2


# -- purge -------------------------------------------------------------------------------------------------------------

def admin_purge(b, **params):
    req = urllib.request.Request(b.admin_url + "/cache/purge?" + urllib.parse.urlencode(params), method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def test_admin_purge_by_url_prefix_and_tag(cached, backend):
    base = f"http://127.0.0.1:{cached.port}"
    one = url(q(cc="max-age=60"))
    prefix_name = uuid.uuid4().hex
    two = f"/cache/{prefix_name}/a?" + q(cc="max-age=60")
    three = f"/cache/{prefix_name}/b?" + q(cc="max-age=60")
    tagged = url(q(cc="max-age=60", h_Surrogate_Key="product-1 list"))
    tagged2 = url(q(cc="max-age=60", h_Cache_Tag="product-1"))
    for path in (one, two, three, tagged, tagged2):
        request(cached, path)
    assert admin_purge(cached, url=base + one)["purged_here"] == 1
    assert admin_purge(cached, prefix=f"{base}/cache/{prefix_name}/")["purged_here"] == 2
    assert admin_purge(cached, tag="product-1")["purged_here"] == 2
    for path in (one, two, three, tagged, tagged2):
        request(cached, path)
        assert hits(backend, path) == 2


def test_purge_method_only_from_allowed_addresses(bastion, backend):
    b = bastion(config(backend, purge_from=["127.0.0.1"]))
    path = url(q(cc="max-age=60"))
    request(b, path)
    status, _, body = request(b, path, method="PURGE")
    assert status == 200 and json.loads(body)["purged"] == 1
    request(b, path)
    assert hits(backend, path) == 2
    closed = bastion(config(backend, purge_from=["10.0.0.0/8"]))
    request(closed, path)
    status, _, _ = request(closed, path, method="PURGE")
    assert status == 405


def test_purge_reaches_every_worker(bastion, backend):
    b = bastion(config(backend), workers=2)
    path = url(q(cc="max-age=600"))
    workers_hit = {}

    def fill():
        _, h, body = request(b, path)
        if "hit" in h["cache-status"]:
            workers_hit[h["x-request-id"][:12]] = body
        return len(workers_hit) == 2

    assert wait_until(lambda: all(fill() for _ in range(1)) or len(workers_hit) == 2, timeout=20, interval=0.01), \
        "both workers should have the entry"
    old = set(workers_hit.values())
    admin_purge(b, url=f"http://127.0.0.1:{b.port}{path}")
    after = {}
    deadline = time.monotonic() + 20
    while len(after) < 2 and time.monotonic() < deadline:
        _, h, body = request(b, path)
        after.setdefault(h["x-request-id"][:12], body)
    assert len(after) == 2
    assert not (set(after.values()) & old), "no worker may answer with the purged copy"


# -- Cache-Status and metrics ----------------------------------------------------------------------------------------

def test_metrics_count_cache_events(cached, backend):
    path = url(q(cc="max-age=60"))
    request(cached, path)
    request(cached, path)
    request(cached, path, {"Cache-Control": "no-cache"})

    def events():
        found = cache_events(cached)
        return found if found.get("hit", 0) >= 1 and found.get("miss", 0) >= 1 and found.get("stored", 0) >= 1 else None

    assert wait_until(events, timeout=10, interval=0.3)


def test_routes_without_cache_get_no_cache_status(bastion, backend):
    b = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]})
    _, h, _ = request(b, url(q(cc="max-age=60")))
    assert "cache-status" not in h


def test_hits_carry_security_headers_and_hidden_backend_locations(bastion, backend):
    # Security headers and backend-Location hiding are applied before the response is stored, so a hit,
    # which skips the response phase, still has them.
    b = bastion({"security": {"headers": {"content_security_policy": "default-src 'self'"}},
                 "proxy": {"request_id_header": None},
                 "routes": [{"name": "app", "upstream": {"servers": [backend.address]}, "cache": True}]})
    path = url(q(cc="max-age=60", status="301", h_Location=f"http://{backend.address}/elsewhere"))
    for attempt in ("miss", "hit"):
        status, h, _ = request(b, path, headers={"Host": "www.example.test"})
        assert status == 301 and attempt in h["cache-status"], (attempt, h)
        assert h["location"] == "http://www.example.test/elsewhere", (attempt, h)
        assert h["content-security-policy"] == "default-src 'self'" and h["x-frame-options"] == "DENY"
    assert hits(backend, path) == 1
