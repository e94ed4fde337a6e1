from bastion.filters.forwarding import ForwardingHeaders
from bastion.filters.header_ops import RequestHeaders, ResponseHeaders
from bastion.filters.rewrite import PathRewrite
from bastion.filters.trust import TrustedProxies
from bastion.config.schema import HeaderOps
from bastion.http.headers import Headers
from bastion.proxy.exchange import Exchange


def exchange(path=b"/", query=b"", headers=(), client="10.1.2.3"):
    ex = Exchange(None, 0.0)
    ex.path, ex.query, ex.client_ip = path, query, client
    ex.headers = list(headers)
    ex.host_header = b"example.com"
    ex.via_proxy = any(n.lower() in (b"x-forwarded-for", b"via", b"forwarded", b"x-forwarded-proto", b"x-forwarded-host") for n, _ in headers)
    return ex


def test_untrusted_forwarding_headers_are_replaced():
    f = ForwardingHeaders(TrustedProxies(["192.168.0.0/16"]))
    ex = exchange(headers=[(b"X-Forwarded-For", b"6.6.6.6"), (b"X-Forwarded-Proto", b"https")])
    f.upstream_request_filter(ex)
    h = Headers(ex.headers)
    assert h.get_all("x-forwarded-for") == ["10.1.2.3"]
    assert h.get("x-forwarded-proto") == "http"
    assert h.get("x-forwarded-host") == "example.com"
    assert h.get("via") == "1.1 bastion"
    assert h.get("x-request-id")


def test_trusted_forwarding_headers_are_extended():
    f = ForwardingHeaders(TrustedProxies(["10.0.0.0/8"]), forwarded=True)
    ex = exchange(headers=[(b"X-Forwarded-For", b"6.6.6.6"), (b"X-Forwarded-Proto", b"https"), (b"Via", b"1.1 cdn")])
    f.upstream_request_filter(ex)
    h = Headers(ex.headers)
    assert h.get("x-forwarded-for") == "6.6.6.6, 10.1.2.3"
    assert h.get("x-forwarded-proto") == "https"
    assert h.get("via") == "1.1 cdn, 1.1 bastion"
    assert h.get("forwarded") == 'for=10.1.2.3;proto=http;host="example.com"'


def test_via_names_the_version_received_on_both_paths():
    for forwarded in (False, True):  # the fast path (x-forwarded only) and the general one
        f = ForwardingHeaders(TrustedProxies([]), forwarded=forwarded)
        for version, expected in (("1.1", "1.1 bastion"), ("1.0", "1.0 bastion"), ("2.0", "2 bastion"), ("1.1", "1.1 bastion")):
            ex = exchange()
            ex.http_version = version
            f.upstream_request_filter(ex)
            assert Headers(ex.headers).get("via") == expected, (forwarded, version)
        ex = exchange(headers=[(b"Via", b"1.1 cdn")])
        ex.http_version = "2.0"
        f.upstream_request_filter(ex)
        assert Headers(ex.headers).get("via") == "1.1 cdn, 2 bastion"


def test_rewrite_strip_regex_add_keeps_query():
    ex = exchange(path=b"/api/users/7", query=b"a=1")
    PathRewrite(strip_prefix="/api", add_prefix="/v2").upstream_request_filter(ex)
    assert ex.upstream_target() == b"/v2/users/7?a=1"
    ex = exchange(path=b"/old/thing")
    PathRewrite(regex=r"^/old/(.*)", replacement=r"/new/$1").upstream_request_filter(ex)
    assert ex.upstream_target() == b"/new/thing"
    ex = exchange(path=b"/api")
    PathRewrite(strip_prefix="/api").upstream_request_filter(ex)
    assert ex.upstream_target() == b"/"


def test_header_ops_set_add_remove():
    ops = HeaderOps(set={"X-A": "1"}, add={"X-B": "2"}, remove=["X-C"])
    ex = exchange(headers=[(b"x-a", b"old"), (b"X-C", b"gone"), (b"X-B", b"first")])
    RequestHeaders(ops).upstream_request_filter(ex)
    h = Headers(ex.headers)
    assert h.get_all("x-a") == ["1"] and h.get_all("x-b") == ["first", "2"] and "x-c" not in h
    ex.response_headers_raw = [(b"X-C", b"1")]
    ResponseHeaders(ops).response_filter(ex)
    assert Headers(ex.response_headers_raw).get("x-c") is None
