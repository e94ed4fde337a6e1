"""PROXY protocol v1 (text) and v2 (binary) headers, as HAProxy's spec defines them: a sans-IO parser.

`parse(buffer)` returns None while more bytes are needed, raises ProxyProtocolError for anything that is
not a valid header, and otherwise gives (client address or None, bytes consumed). A LOCAL command (v2) or
UNKNOWN family (v1) is a health check from the balancer itself: the address is None and the connection's
own peer stands.
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107
_V2_HEAD = struct.Struct("!12sBBH")


class ProxyProtocolError(Exception):
    pass


def parse(buffer: bytes) -> tuple[str | None, int] | None:
    if buffer[:1] == b"\r":
        return _parse_v2(buffer)
    if buffer[:1] == b"P":
        return _parse_v1(buffer)
    if buffer:
        raise ProxyProtocolError("no PROXY protocol header")
    return None


def _parse_v1(buffer: bytes):
    if len(buffer) < len(V1_PREFIX):
        if not V1_PREFIX.startswith(buffer):
            raise ProxyProtocolError("no PROXY protocol header")
        return None
    if not buffer.startswith(V1_PREFIX):
        raise ProxyProtocolError("no PROXY protocol header")
    end = buffer.find(b"\r\n", 0, V1_MAX + 1)
    if end < 0:
        if len(buffer) > V1_MAX:
            raise ProxyProtocolError("PROXY v1 line too long")
        return None
    parts = buffer[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return None, end + 2
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("malformed PROXY v1 line")
    try:
        source = ipaddress.ip_address(parts[2])
        ipaddress.ip_address(parts[3])
        sport, dport = int(parts[4]), int(parts[5])
    except ValueError:
        raise ProxyProtocolError("malformed PROXY v1 addresses") from None
    if (source.version == 4) != (parts[1] == "TCP4") or not (0 <= sport < 65536 and 0 <= dport < 65536):
        raise ProxyProtocolError("malformed PROXY v1 addresses")
    return str(source), end + 2


def _parse_v2(buffer: bytes):
    if len(buffer) < 16:
        if not V2_SIGNATURE.startswith(buffer[:12]):
            raise ProxyProtocolError("no PROXY protocol header")
        return None
    signature, version_command, family, length = _V2_HEAD.unpack_from(buffer)
    if signature != V2_SIGNATURE or version_command >> 4 != 2:
        raise ProxyProtocolError("bad PROXY v2 signature or version")
    total = 16 + length
    if len(buffer) < total:
        return None
    command = version_command & 0x0F
    if command == 0:  # LOCAL
        return None, total
    if command != 1:
        raise ProxyProtocolError("unknown PROXY v2 command")
    body = buffer[16:total]
    transport_family = family >> 4
    if transport_family == 1 and len(body) >= 12:
        return str(ipaddress.IPv4Address(body[:4])), total
    if transport_family == 2 and len(body) >= 36:
        address = ipaddress.IPv6Address(body[:16])
        return str(address.ipv4_mapped or address), total
    if transport_family in (0, 3):  # UNSPEC, UNIX: no IP to take
        return None, total
    raise ProxyProtocolError("malformed PROXY v2 address block")


def build_v1(source: str, dest: str, sport: int, dport: int) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {dest} {sport} {dport}\r\n".encode()


def build_v2(source: str, dest: str, sport: int, dport: int) -> bytes:
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(dest)
    if src.version == 4:
        body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
        family = 0x11
    else:
        body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
        family = 0x21
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
