"""PROXY protocol headers, IP lists and the real client address: pure logic."""

import pytest

from bastion.filters.trust import TrustedProxies
from bastion.security import proxy_protocol as pp
from bastion.security.access import IpList
from bastion.security.bans import normalize_ip
from bastion.security.clientip import ClientAddress


def test_proxy_v1_tcp4_and_tcp6():
    head = b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\nGET / HTTP/1.1\r\n"
    assert pp.parse(head) == ("203.0.113.7", head.index(b"GET"))
    assert pp.parse(b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n") == ("2001:db8::1", 32)
    assert pp.parse(b"PROXY UNKNOWN\r\n") == (None, 15)


def test_proxy_v1_needs_more_bytes_then_completes():
    assert pp.parse(b"PRO") is None
    assert pp.parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2") is None


@pytest.mark.parametrize("bad", [b"GET / HTTP/1.1\r\n", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
                                 b"PROXY TCP4 ::1 ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
                                 b"PROXY " + b"x" * 200])
def test_proxy_v1_refuses_garbage(bad):
    with pytest.raises(pp.ProxyProtocolError):
        pp.parse(bad)


def test_proxy_v2_ipv4_ipv6_local():
    header = pp.build_v2("198.51.100.9", "10.0.0.1", 4000, 80)
    assert pp.parse(header + b"GET") == ("198.51.100.9", len(header))
    header6 = pp.build_v2("2001:db8::5", "2001:db8::1", 4000, 80)
    assert pp.parse(header6) == ("2001:db8::5", len(header6))
    local = pp.V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])
    assert pp.parse(local) == (None, 16)
    assert pp.parse(header[:20]) is None


def test_proxy_v2_refuses_bad_version():
    header = bytearray(pp.build_v2("198.51.100.9", "10.0.0.1", 4000, 80))
    header[12] = 0x31
    with pytest.raises(pp.ProxyProtocolError):
        pp.parse(bytes(header))


def test_ip_lists_v4_v6_deny_wins():
    lst = IpList(["10.0.0.0/8", "2001:db8::/32"], ["10.9.0.0/16"])
    assert lst.admits("10.1.2.3")
    assert not lst.admits("10.9.1.1")
    assert lst.admits("2001:db8::42")
    assert not lst.admits("192.0.2.1")
    assert lst.admits("::ffff:10.1.2.3")
    deny_only = IpList([], ["192.0.2.0/24"])
    assert deny_only.admits("198.51.100.1") and not deny_only.admits("192.0.2.77")
    assert not IpList([], [])


class Ex:
    def __init__(self, client_ip, headers):
        self.client_ip = client_ip
        self.headers = headers
        self.via_proxy = bool(headers)
        self.state = {}


def test_real_client_address_walks_trusted_hops_from_the_right():
    addr = ClientAddress(TrustedProxies(["10.0.0.0/8"]))
    ex = Ex("10.0.0.2", [(b"X-Forwarded-For", b"6.6.6.6, 203.0.113.5, 10.0.0.9")])
    assert addr.of(ex) == "203.0.113.5"
    # A client that is not a trusted proxy cannot pick its address.
    assert addr.of(Ex("198.51.100.1", [(b"X-Forwarded-For", b"1.1.1.1")])) == "198.51.100.1"
    assert addr.of(Ex("10.0.0.2", [])) == "10.0.0.2"


def test_normalize_ip():
    assert normalize_ip("::ffff:1.2.3.4") == "1.2.3.4"
    assert normalize_ip("[2001:DB8::1]") == "2001:db8::1"
    with pytest.raises(ValueError):
        normalize_ip("nope")
