"""What the backend sees and what the client gets back: forwarding headers, hop-by-hop headers, backend
identity, routing, rewrites, header edits, redirects and fixed responses."""

import json
import urllib.request
from urllib.error import HTTPError

from tests.support.raw import http_raw, parse_response


def get(url, headers=None, method="GET", data=None):
    req = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except HTTPError as e:
        return e.code, dict(e.headers), e.read()


def echoed(body):
    data = json.loads(body)
    headers = {}
    for name, value in data["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    return data, headers


def test_forwarding_headers_replace_untrusted_values(bastion, backend):
    b = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]})
    status, resp_headers, body = get(b.url + "/echo/x?q=1", {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https",
                                                             "Host": "app.example:8080"})
    assert status == 200
    data, seen = echoed(body)
    assert data["path"] == "/echo/x?q=1"
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["app.example:8080"]
    assert seen["host"] == ["app.example:8080"]
    assert seen["via"] == ["1.1 bastion"]
    rid = seen["x-request-id"][0]
    assert len(rid) >= 16
    assert resp_headers["X-Request-ID"] == rid
    assert "forwarded" not in seen
    lines = b.wait_access_log(1)
    assert lines[-1]["request_id"] == rid


def test_trusted_proxies_extend_forwarding_headers_and_forwarded(bastion, backend):
    b = bastion({"trusted_proxies": ["127.0.0.0/8"], "proxy": {"forwarded": True},
                 "routes": [{"upstream": {"servers": [backend.address]}}]})
    _, _, body = get(b.url + "/echo", {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "Via": "1.1 cdn"})
    _, seen = echoed(body)
    assert seen["x-forwarded-for"] == ["6.6.6.6, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["via"] == ["1.1 cdn, 1.1 bastion"]
    assert seen["forwarded"][0].startswith("for=127.0.0.1;proto=http")


def test_client_request_id_is_kept(bastion, backend):
    b = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]})
    _, headers, body = get(b.url + "/echo", {"X-Request-ID": "abc-123"})
    _, seen = echoed(body)
    assert seen["x-request-id"] == ["abc-123"]
    assert headers["X-Request-ID"] == "abc-123"


def test_hop_by_hop_headers_removed_both_ways(bastion, backend):
    b = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]})
    raw = (b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
           b"TE: trailers\r\nTrailer: X-T\r\nProxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\n"
           b"Upgrade: h2c\r\nX-Kept: yes\r\n\r\n")
    status, _, body = parse_response(http_raw(b.port, raw, timeout=2))
    assert status == 200
    _, seen = echoed(body)
    for name in ("x-secret", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection", "upgrade"):
        assert name not in seen, name
    assert seen["x-kept"] == ["yes"]
    # and from the response
    raw = b"GET /headers?Keep-Alive=timeout%3D9&X-Powered-By=php&Server=gunicorn&X-Fine=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, headers, _ = parse_response(http_raw(b.port, raw, timeout=2))
    names = {n.lower() for n, _ in headers}
    assert status == 200
    assert "keep-alive" not in names and "x-powered-by" not in names and "server" not in names
    assert ("X-Fine", "1") in headers


def test_server_header_can_be_set(bastion, backend):
    b = bastion({"proxy": {"server_header": "bastion"}, "routes": [{"upstream": {"servers": [backend.address]}}]})
    _, headers, _ = get(b.url + "/echo")
    assert headers["Server"] == "bastion"


def test_routing_by_host_path_method_header_priority(bastion, backend_factory):
    names = ["exact", "wild", "prefix", "regex", "post", "canary", "prio", "default"]
    backends = {n: backend_factory(n) for n in names}

    def up(n):
        return {"servers": [backends[n].address]}

    b = bastion({"routes": [
        {"name": "exact", "match": {"host": "app.example", "path": "/echo"}, "upstream": up("exact")},
        {"name": "wild", "match": {"host": "*.example.org"}, "upstream": up("wild")},
        {"name": "v6", "match": {"host": "[2001:db8::1]"}, "upstream": up("wild")},
        {"name": "prefix", "match": {"path": "/api/"}, "upstream": up("prefix")},
        {"name": "regex", "match": {"path": {"regex": "^/v[0-9]+/"}}, "upstream": up("regex")},
        {"name": "post", "match": {"methods": ["POST"]}, "upstream": up("post")},
        {"name": "canary", "match": {"headers": {"X-Canary": "yes"}}, "upstream": up("canary")},
        {"name": "prio", "priority": 5, "match": {"path": {"exact": "/api/special"}}, "upstream": up("prio")},
        {"name": "default", "upstream": up("default")},
    ]})

    def who(path, headers=None, method="GET", data=None):
        status, _, body = get(b.url + path, headers, method, data)
        assert status == 200
        return json.loads(body)["name"]

    assert who("/echo", {"Host": "app.example"}) == "exact"
    assert who("/echo", {"Host": "APP.example:80"}) == "exact"
    assert who("/other", {"Host": "app.example"}) == "default"
    assert who("/x", {"Host": "a.b.example.org"}) == "wild"
    assert who("/x", {"Host": "example.org"}) == "default"
    assert who("/x", {"Host": "[2001:db8::1]"}) == who("/x", {"Host": "[2001:db8::1]:8080"}) == "wild"
    assert who("/x", {"Host": "[2001:db8::2]:8080"}) == "default"
    assert who("/api/users") == "prefix"
    assert who("/api/special") == "prio"
    assert who("/v2/items") == "regex"
    assert who("/x", method="POST", data=b"1") == "post"
    assert who("/x", {"X-Canary": "yes"}) == "canary"
    assert who("/x", {"X-Canary": "no"}) == "default"
    assert who("/a/../api/x") == "prefix"  # dot segments are resolved before matching


def test_rewrites_and_header_edits(bastion, backend):
    b = bastion({"routes": [
        {"name": "api", "match": {"path": "/api"}, "upstream": {"servers": [backend.address]},
         "rewrite": {"strip_prefix": "/api", "add_prefix": "/echo"},
         "request_headers": {"set": {"X-Set": "1"}, "add": {"X-Add": "2"}, "remove": ["X-Drop"]},
         "response_headers": {"set": {"X-Resp": "yes"}, "remove": ["X-Backend"]}},
        {"name": "old", "match": {"path": "/old/"}, "upstream": {"servers": [backend.address]},
         "rewrite": {"regex": {"pattern": "^/old/(.*)$", "replacement": "/echo/new/$1"}}},
    ]})
    status, headers, body = get(b.url + "/api/users/7?x=1", {"X-Drop": "1", "X-Set": "old", "X-Add": "1"})
    assert status == 200
    data, seen = echoed(body)
    assert data["path"] == "/echo/users/7?x=1"
    assert seen["x-set"] == ["1"] and seen["x-add"] == ["1", "2"] and "x-drop" not in seen
    assert headers["X-Resp"] == "yes" and "X-Backend" not in headers
    _, _, body = get(b.url + "/old/thing?y=2")
    assert json.loads(body)["path"] == "/echo/new/thing?y=2"


def test_redirect_and_fixed_response(bastion):
    b = bastion({"routes": [
        {"name": "r", "match": {"path": "/old"}, "redirect": {"to": "https://{host}/new{path}?{query}", "status": 308}},
        {"name": "ping", "match": {"path": {"exact": "/ping"}},
         "respond": {"status": 200, "body": "pong\n", "content_type": "text/plain", "headers": {"X-Ping": "1"}}},
        {"name": "gone", "respond": {"status": 410, "body": "gone"}},
    ]})
    status, headers, body = parse_response(http_raw(b.port, b"GET /old/a?b=1 HTTP/1.1\r\nHost: site.example\r\nConnection: close\r\n\r\n"))
    assert status == 308
    assert dict(headers)["Location"] == "https://site.example/new/old/a?b=1"
    status, headers, body = get(b.url + "/ping")
    assert (status, body, headers["X-Ping"], headers["Content-Type"]) == (200, b"pong\n", "1", "text/plain")
    status, _, body = get(b.url + "/anything")
    assert (status, body) == (410, b"gone")


def test_no_matching_route_is_404(bastion, backend):
    b = bastion({"routes": [{"match": {"host": "only.example"}, "upstream": {"servers": [backend.address]}}]})
    status, headers, body = get(b.url + "/", {"Accept": "application/json"})
    assert status == 404
    assert json.loads(body)["request_id"] == headers["X-Request-ID"]
