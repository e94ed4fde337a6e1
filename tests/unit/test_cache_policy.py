"""RFC 9111 rules of bastion.cache.policy, one group per section of the RFC."""

import pytest

from bastion.cache import policy as p

NOW = 1_800_000_000.0


def cc(text):
    return p.parse_cache_control([text])


def store(status=200, request="", response="", **kw):
    args = dict(has_authorization=False, has_set_cookie=False, has_expires=False, has_validator=False, vary=[])
    args.update(kw)
    return p.storable("GET", status, cc(request), cc(response), **args)


def lifetime(response="", **kw):
    args = dict(date=NOW, expires=None, has_expires=False, last_modified=None, status=200, response_time=NOW)
    args.update(kw)
    return p.freshness_lifetime(cc(response), **args)


# -- Cache-Control parsing ---------------------------------------------------------------------------------

def test_cache_control_names_are_case_insensitive_and_arguments_unquoted():
    assert cc('Max-Age=60, PUBLIC, no-cache="Set-Cookie, X"') == {"max-age": "60", "public": None,
                                                               "no-cache": "Set-Cookie, X"}


def test_cache_control_several_field_lines_combine():
    assert p.parse_cache_control(["max-age=5", "must-revalidate"]) == {"max-age": "5", "must-revalidate": None}


def test_conflicting_max_age_makes_the_response_stale():
    assert lifetime("max-age=60, max-age=3600") == 0
    assert lifetime("max-age=60, max-age=60") == 60


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", ""])
def test_invalid_max_age_is_stale(value):
    assert lifetime(f"max-age={value}") == 0


def test_huge_max_age_is_capped():
    assert lifetime("max-age=99999999999999") == 2**31


def test_quoted_max_age_is_understood():
    assert lifetime('max-age="30"') == 30


# -- storing (RFC 9111 3) ------------------------------------------------------------------------------------

def test_plain_cacheable_response_is_storable():
    assert store(response="max-age=60") is None


@pytest.mark.parametrize("response", ["no-store", "private", "private=\"X\"", "max-age=60, no-store"])
def test_no_store_and_private_are_not_stored(response):
    assert store(response=response) is not None


def test_request_no_store_prevents_storing():
    assert store(request="no-store", response="max-age=60") == "request-no-store"


def test_must_understand_overrides_no_store_for_understood_status():
    assert store(response="must-understand, no-store, max-age=60") is None
    assert store(status=299, response="must-understand, no-store, max-age=60") == "status"


def test_authorization_needs_public_s_maxage_or_must_revalidate():
    assert store(response="max-age=60", has_authorization=True) == "authorization"
    for response in ("public, max-age=60", "s-maxage=60", "max-age=60, must-revalidate"):
        assert store(response=response, has_authorization=True) is None


def test_vary_star_is_never_stored():
    assert store(response="max-age=60", vary=["*"]) == "vary-star"


def test_set_cookie_is_not_stored_unless_configured():
    assert store(response="max-age=60", has_set_cookie=True) == "set-cookie"
    assert store(response="max-age=60", has_set_cookie=True, store_set_cookie=True) is None


def test_no_freshness_and_no_validator_is_not_worth_storing():
    assert store(response="") == "no-freshness"
    assert store(response="", has_validator=True) is None  # heuristic / revalidation possible
    assert store(response="", has_default_ttl=True) is None


def test_non_heuristic_status_needs_explicit_freshness():
    assert store(status=302, response="") == "no-freshness"
    assert store(status=302, response="max-age=60") is None
    assert store(status=302, has_expires=True) is None


def test_any_final_status_with_explicit_freshness_is_storable_except_partial():
    assert store(status=206, response="max-age=60") == "status"
    assert store(status=500, response="max-age=60") is None
    assert store(status=299, response="max-age=60") is None
    assert store(status=500, response="max-age=60", statuses=frozenset({200})) == "status"
    assert store(status=500, response="", has_validator=True) == "no-freshness"  # no heuristic for 500


def test_only_get_is_stored():
    assert p.storable("POST", 200, {}, cc("max-age=60"), has_authorization=False, has_set_cookie=False,
                      has_expires=False, has_validator=False, vary=[]) == "method"


def test_no_cache_response_is_storable():
    assert store(response="no-cache") is None


# -- freshness (RFC 9111 4.2.1, 4.2.2) ------------------------------------------------------------------------

def test_s_maxage_wins_over_max_age_and_expires():
    assert lifetime("max-age=10, s-maxage=20", expires="Thu, 01 Jan 2099 00:00:00 GMT", has_expires=True) == 20


def test_max_age_wins_over_expires():
    assert lifetime("max-age=10", expires="Thu, 01 Jan 2099 00:00:00 GMT", has_expires=True) == 10


def test_expires_minus_date():
    expires = p.format_http_date(NOW + 100)
    assert lifetime(expires=expires, has_expires=True, date=NOW - 20) == 120


@pytest.mark.parametrize("value", ["0", "-1", "garbage", ""])
def test_invalid_expires_is_in_the_past(value):
    assert lifetime(expires=value, has_expires=True) == 0


def test_expires_without_date_uses_response_time():
    assert lifetime(expires=p.format_http_date(NOW + 50), has_expires=True, date=None) == 50


def test_heuristic_is_a_fraction_of_last_modified_age():
    assert lifetime(last_modified=NOW - 1000) == pytest.approx(100)
    assert lifetime(last_modified=NOW - 1000, heuristic_fraction=0.5) == pytest.approx(500)
    assert lifetime(last_modified=NOW - 10 * 86400 * 100) == 86400  # capped


def test_heuristic_only_for_heuristically_cacheable_statuses():
    assert lifetime(last_modified=NOW - 1000, status=302) == 0
    assert lifetime(last_modified=NOW - 1000, status=404) == pytest.approx(100)


def test_default_ttl_only_when_nothing_else_says():
    assert lifetime(default_ttl=30) == 30
    assert lifetime("max-age=5", default_ttl=30) == 5


def test_max_ttl_caps():
    assert lifetime("max-age=500", max_ttl=60) == 60


# -- age (RFC 9111 4.2.3) ------------------------------------------------------------------------------------

def test_age_takes_the_larger_of_apparent_and_corrected_age():
    # Date 10 s before receipt; Age 3 plus 2 s of delay: apparent age (10) wins.
    assert p.corrected_initial_age(age_value=3, date=NOW - 10, request_time=NOW - 2, response_time=NOW) == 10
    # Age 30 from an upstream cache wins over a fresh Date.
    assert p.corrected_initial_age(age_value=30, date=NOW, request_time=NOW - 1, response_time=NOW) == 31


def test_date_in_the_future_gives_no_negative_age():
    assert p.corrected_initial_age(age_value=0, date=NOW + 100, request_time=NOW, response_time=NOW) == 0


def test_current_age_adds_resident_time():
    assert p.current_age(5, NOW, NOW + 7) == 12


@pytest.mark.parametrize("value,expected", [("10", 10), ("abc", 0), (None, 0), ("-3", 0), ("5, 6", 5)])
def test_age_parsing(value, expected):
    assert p.parse_age(value) == expected


# -- using a stored response (RFC 9111 4, 5.2.1) ---------------------------------------------------------------

def decide(age, life=100, response="", request="", pragma=None):
    request_cc = cc(request)
    return p.use_decision(lifetime=life, age=age, response_cc=cc(response), request_cc=request_cc,
                          request_no_cache=p.request_no_cache(request_cc, pragma))


def test_fresh_and_stale():
    assert decide(10) == p.FRESH
    assert decide(100) == p.REVALIDATE
    assert decide(150) == p.REVALIDATE


def test_response_no_cache_always_revalidates():
    assert decide(0, response="no-cache") == p.REVALIDATE


def test_request_no_cache_and_pragma():
    assert decide(0, request="no-cache") == p.REVALIDATE
    assert decide(0, pragma="no-cache") == p.REVALIDATE
    assert decide(0, request="max-stale", pragma="no-cache") == p.FRESH  # Cache-Control present: Pragma ignored


def test_request_max_age():
    assert decide(50, request="max-age=60") == p.FRESH
    assert decide(70, request="max-age=60") == p.REVALIDATE
    assert decide(0, request="max-age=junk") == p.FRESH
    assert decide(1, request="max-age=junk") == p.REVALIDATE


def test_request_min_fresh():
    assert decide(50, request="min-fresh=40") == p.FRESH
    assert decide(70, request="min-fresh=40") == p.REVALIDATE


def test_request_max_stale():
    assert decide(150, request="max-stale=60") == p.STALE_OK
    assert decide(170, request="max-stale=60") == p.REVALIDATE
    assert decide(10_000, request="max-stale") == p.STALE_OK


@pytest.mark.parametrize("response", ["must-revalidate", "proxy-revalidate", "s-maxage=100"])
def test_revalidate_directives_forbid_max_stale(response):
    assert decide(150, response=response, request="max-stale") == p.REVALIDATE


def test_stale_windows():
    assert p.stale_window(cc("max-age=1, stale-while-revalidate=30"), "stale-while-revalidate") == 30
    assert p.stale_window(cc("max-age=1"), "stale-if-error", 60) == 60
    assert p.stale_window(cc("max-age=1, must-revalidate"), "stale-if-error", 60) == 0
    assert p.stale_window(cc("s-maxage=1, stale-if-error=5"), "stale-if-error", 60) == 5


# -- conditional requests (RFC 9110 13) --------------------------------------------------------------------------

def test_if_none_match_weak_comparison():
    assert p.etag_matches_weak('"a"', '"a"')
    assert p.etag_matches_weak('W/"a"', '"a"')
    assert p.etag_matches_weak('"x", "a"', 'W/"a"')
    assert p.etag_matches_weak("*", '"a"')
    assert not p.etag_matches_weak('"b"', '"a"')
    assert not p.etag_matches_weak('"a"', None)


def test_not_modified_prefers_if_none_match():
    lm = NOW - 100
    assert p.not_modified(if_none_match='"a"', if_modified_since=None, etag='"a"', last_modified=lm, date=NOW)
    # If-None-Match present and not matching: If-Modified-Since is ignored.
    assert not p.not_modified(if_none_match='"b"', if_modified_since=p.format_http_date(NOW), etag='"a"',
                              last_modified=lm, date=NOW)
    assert p.not_modified(if_none_match=None, if_modified_since=p.format_http_date(NOW), etag=None,
                          last_modified=lm, date=NOW)
    assert not p.not_modified(if_none_match=None, if_modified_since=p.format_http_date(lm - 10), etag=None,
                              last_modified=lm, date=NOW)
    # No Last-Modified: the Date stands in.
    assert p.not_modified(if_none_match=None, if_modified_since=p.format_http_date(NOW), etag=None,
                          last_modified=None, date=NOW - 5)
    assert not p.not_modified(if_none_match=None, if_modified_since="garbage", etag=None, last_modified=lm, date=NOW)


def test_if_range_needs_a_strong_match():
    assert p.if_range_matches(None, None, None)
    assert p.if_range_matches('"a"', '"a"', None)
    assert not p.if_range_matches('W/"a"', 'W/"a"', None)
    assert not p.if_range_matches('"b"', '"a"', None)
    assert p.if_range_matches(p.format_http_date(NOW), None, NOW)
    assert not p.if_range_matches(p.format_http_date(NOW), None, NOW - 1)


@pytest.mark.parametrize("header,expected", [
    ("bytes=0-3", (0, 3)),
    ("bytes=5-", (5, 9)),
    ("bytes=-4", (6, 9)),
    ("bytes=-40", (0, 9)),
    ("bytes=8-100", (8, 9)),
    ("bytes=10-", "unsatisfiable"),
    ("bytes=-0", "unsatisfiable"),
    ("bytes=0-1,3-4", None),
    ("items=0-1", None),
    ("bytes=3-1", None),
    ("bytes=a-b", None),
])
def test_byte_ranges(header, expected):
    assert p.byte_range(header, 10) == expected


# -- Vary (RFC 9111 4.1) -----------------------------------------------------------------------------------------

def test_accept_encoding_normalisation():
    assert p.normalize_accept_encoding("gzip, br") == p.normalize_accept_encoding("BR;q=0.9,gzip")
    assert p.normalize_accept_encoding("gzip, identity;q=0") == "gzip"
    assert p.normalize_vary_value("accept-encoding", ["gzip", "br"]) == "br,gzip"


def test_vary_values_absent_differs_from_empty_and_whitespace_is_normalised():
    assert p.normalize_vary_value("x", []) != p.normalize_vary_value("x", [""])
    assert p.normalize_vary_value("accept-language", ["en,  fr"]) == p.normalize_vary_value("accept-language", ["en, fr"])


def test_vary_values_combine_lines_and_drop_spaces_around_commas():
    assert p.normalize_vary_value("foo", ["1,2"]) == p.normalize_vary_value("foo", [" 1, 2 "])
    assert p.normalize_vary_value("foo", ["1, 2"]) == p.normalize_vary_value("foo", ["1", "2"])
    assert p.normalize_vary_value("foo", ["1,2"]) != p.normalize_vary_value("foo", ["2,1"])


def test_vary_names():
    assert p.vary_names(["Accept-Encoding, X-Foo", "x-foo"]) == ["accept-encoding", "x-foo"]


# -- invalidation (RFC 9111 4.4) ---------------------------------------------------------------------------------

def test_invalidation_targets_are_same_origin_only():
    assert p.invalidation_targets("http", "example.com", "/a?b", None) == ["/a?b"]
    assert p.invalidation_targets("http", "example.com", "http://EXAMPLE.com/x", "/y") == ["/x", "/y"]
    assert p.invalidation_targets("http", "example.com", "http://other.com/x", None) == []
    assert p.invalidation_targets("http", "example.com", "https://example.com/x", None) == []
    assert p.invalidation_targets("http", "example.com", "//example.com/z#frag", None) == ["/z"]


# -- dates ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
                                  "Sun Nov  6 08:49:37 1994"])
def test_three_date_formats(text):
    assert p.parse_http_date(text) == 784111777


def test_bad_dates():
    assert p.parse_http_date("0") is None
    assert p.parse_http_date(None) is None
    assert p.parse_http_date("yesterday") is None


def test_qualified_no_cache_and_private_only_leave_out_the_listed_fields():
    assert store(response='max-age=60, no-cache="Set-Cookie"') is None
    assert store(response='max-age=60, private="X-User"') is None
    assert decide(0, response='no-cache="a"') == p.FRESH
    assert p.fields_not_stored(cc('no-cache="A, b", private="c"'), ["d"]) == {"a", "b", "c", "d"}
    assert p.fields_not_stored(cc("no-cache, private"), []) == frozenset()
