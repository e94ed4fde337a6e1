from bastion.config.compile import compile_config
from bastion.config.schema import Config
from bastion.proxy.exchange import Exchange


def runtime(routes):
    return compile_config(Config.model_validate({"listeners": ["127.0.0.1:1"], "routes": routes}))


def request(host=b"example.com", path=b"/", method=b"GET", headers=()):
    ex = Exchange(None, 0.0)
    ex.host, ex.path, ex.method = host, path, method
    ex.headers = list(headers)
    return ex


UP = {"servers": ["127.0.0.1:9"]}


def match(rt, **kw):
    route = rt.router.match(request(**kw))
    return route.name if route else None


def test_first_match_in_file_order():
    rt = runtime([{"name": "api", "match": {"path": "/api"}, "upstream": UP}, {"name": "all", "upstream": UP}])
    assert match(rt, path=b"/api/x") == "api"
    assert match(rt, path=b"/other") == "all"


def test_priority_beats_file_order():
    rt = runtime([{"name": "all", "upstream": UP}, {"name": "api", "priority": 10, "match": {"path": "/api"}, "upstream": UP}])
    assert match(rt, path=b"/api") == "api"
    assert match(rt, path=b"/x") == "all"


def test_exact_and_wildcard_hosts():
    rt = runtime([
        {"name": "exact", "match": {"host": "example.com"}, "upstream": UP},
        {"name": "wild", "match": {"host": "*.example.com"}, "upstream": UP},
    ])
    assert match(rt, host=b"example.com") == "exact"
    assert match(rt, host=b"a.example.com") == "wild"
    assert match(rt, host=b"a.b.example.com") == "wild"
    assert match(rt, host=b"badexample.com") is None
    assert match(rt, host=b"other.org") is None


def test_path_exact_prefix_regex_method_header():
    rt = runtime([
        {"name": "exact", "match": {"path": {"exact": "/ping"}}, "upstream": UP},
        {"name": "regex", "match": {"path": {"regex": r"^/v\d+/"}}, "upstream": UP},
        {"name": "post", "match": {"methods": ["POST"]}, "upstream": UP},
        {"name": "canary", "match": {"headers": {"X-Canary": "yes"}}, "upstream": UP},
        {"name": "any-token", "match": {"headers": {"X-Token": "*"}}, "upstream": UP},
    ])
    assert match(rt, path=b"/ping") == "exact"
    assert match(rt, path=b"/ping/x") is None
    assert match(rt, path=b"/v2/items") == "regex"
    assert match(rt, path=b"/x", method=b"POST") == "post"
    assert match(rt, path=b"/x", headers=[(b"x-canary", b"yes")]) == "canary"
    assert match(rt, path=b"/x", headers=[(b"X-Canary", b"no")]) is None
    assert match(rt, path=b"/x", headers=[(b"X-Token", b"abc")]) == "any-token"
