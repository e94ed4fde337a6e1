"""X-Forwarded-For/Proto/Host, RFC 7239 Forwarded, Via and the request id, and the Host sent upstream.

Incoming forwarding headers are believed only when the direct peer is in `trusted_proxies`; otherwise
they are replaced, so a client cannot forge its address towards the backend.
"""

from __future__ import annotations

from bastion.filters.trust import TrustedProxies

_XFF = b"x-forwarded-for"
_XFP = b"x-forwarded-proto"
_XFH = b"x-forwarded-host"
_FORWARDED = b"forwarded"
_VIA = b"via"
_HOST = b"host"
_MANAGED = frozenset({_XFF, _XFP, _XFH, _FORWARDED, _VIA})
# Via names the protocol version the request was received with (RFC 9110 7.6.3); HTTP/2 is "2".
_VIA_VERSION = {"1.1": b"1.1 ", "1.0": b"1.0 ", "2.0": b"2 "}


_NONE: dict = {}


def _forwarded_node(ip: str) -> bytes:
    if ":" in ip:
        return b'"[%s]"' % ip.encode()
    return ip.encode()


class ForwardingHeaders:
    def __init__(self, trusted: TrustedProxies, x_forwarded: bool = True, forwarded: bool = False,
                 via: str | None = "bastion", request_id_header: str | None = "X-Request-ID",
                 preserve_host: bool = True):
        self.trusted = trusted
        self.x_forwarded = x_forwarded
        self.forwarded = forwarded
        self.via = b"1.1 " + via.encode() if via else None
        self.via_by_version = {v: prefix + via.encode() for v, prefix in _VIA_VERSION.items()} if via else {}
        self.request_id_header = request_id_header.encode() if request_id_header else None
        self.request_id_lower = self.request_id_header.lower() if self.request_id_header else None
        self.preserve_host = preserve_host
        managed = set()
        if x_forwarded:
            managed |= {_XFF, _XFP, _XFH}
        if forwarded:
            managed.add(_FORWARDED)
        if self.via:
            managed.add(_VIA)
        if not preserve_host:
            managed.add(_HOST)
        self.managed = frozenset(managed)
        # x_forwarded on, Forwarded off, Host kept: the shape of most deployments, served by a fast path.
        self.simple = x_forwarded and not forwarded and preserve_host
        # With every header off and Host kept the filter has nothing to do, and routes leave it out.
        self.active = bool(managed) or self.request_id_header is not None
        # client address -> the fixed header lines, per scheme; other HTTP versions than 1.1 (their Via
        # differs) have tables of their own, so HTTP/1.1 pays nothing for them.
        self._fixed: dict[str, dict[str, tuple]] = {"http": {}, "https": {}}
        if self.request_id_header is None:
            self.response_filter = None  # nothing to add to responses: keep out of the response phase

    def _fixed_for(self, client_ip: str, scheme: str, version: str = "1.1") -> tuple:
        fixed = [(b"X-Forwarded-For", client_ip.encode()), (b"X-Forwarded-Proto", scheme.encode())]
        if self.via:
            fixed.append((b"Via", self.via_by_version.get(version, self.via)))
        result = tuple(fixed)
        cache = self._fixed.setdefault(scheme if version == "1.1" else scheme + version, {})
        if len(cache) >= 4096:
            cache.clear()
        cache[client_ip] = result
        return result

    def upstream_request_filter(self, ex) -> None:
        if self.simple and not ex.via_proxy:
            # The common case: a direct client. Its fixed header lines are built once per address.
            if ex.http_version == "1.1":
                fixed = self._fixed[ex.scheme].get(ex.client_ip)
            else:
                fixed = self._fixed.get(ex.scheme + ex.http_version, _NONE).get(ex.client_ip)
            if fixed is None:
                fixed = self._fixed_for(ex.client_ip, ex.scheme, ex.http_version)
            headers = ex.headers
            headers += fixed
            if ex.host_header:
                headers.append((b"X-Forwarded-Host", ex.host_header))
            if self.request_id_header is not None and ex.incoming_request_id is None:
                headers.append((self.request_id_header, ex.request_id_bytes))
            return
        if ex.via_proxy or not self.preserve_host:
            # Only requests that came through another proxy carry headers to take apart.
            kept, xff, xfp, xfh, fwd, via = self._take_incoming(ex)
            trusted = self.trusted.contains(ex.client_ip)
        else:
            kept, xff, xfp, xfh, fwd, via = ex.headers, None, None, None, None, None
            trusted = False
        self._append(ex, kept, trusted, xff, xfp, xfh, fwd, via)
        ex.headers = kept

    def _take_incoming(self, ex) -> tuple:
        managed = self.managed
        kept = []
        xff = xfp = xfh = fwd = via = None
        for name, value in ex.headers:
            lname = name.lower()
            if lname in managed:
                if lname == _XFF:
                    xff = value if xff is None else xff + b", " + value
                elif lname == _XFP:
                    xfp = value
                elif lname == _XFH:
                    xfh = value
                elif lname == _FORWARDED:
                    fwd = value if fwd is None else fwd + b", " + value
                elif lname == _VIA:
                    via = value if via is None else via + b", " + value
                continue
            kept.append((name, value))
        return kept, xff, xfp, xfh, fwd, via

    def _append(self, ex, kept, trusted, xff, xfp, xfh, fwd, via) -> None:
        client = ex.client_ip.encode()
        if not self.preserve_host and ex.peer is not None:
            kept.append((b"Host", ex.peer.address_bytes))
        if self.x_forwarded:
            kept.append((b"X-Forwarded-For", xff + b", " + client if trusted and xff else client))
            kept.append((b"X-Forwarded-Proto", xfp if trusted and xfp else ex.scheme.encode()))
            host = xfh if trusted and xfh else ex.host_header
            if host:
                kept.append((b"X-Forwarded-Host", host))
        if self.forwarded:
            element = b"for=" + _forwarded_node(ex.client_ip) + b";proto=" + ex.scheme.encode()
            if ex.host_header:
                element += b';host="' + ex.host_header.replace(b'"', b"") + b'"'
            kept.append((b"Forwarded", fwd + b", " + element if trusted and fwd else element))
        if self.via:
            own = self.via if ex.http_version == "1.1" else self.via_by_version.get(ex.http_version, self.via)
            kept.append((b"Via", via + b", " + own if via else own))
        if self.request_id_header is not None and ex.incoming_request_id is None:
            kept.append((self.request_id_header, ex.request_id_bytes))

    def response_filter(self, ex) -> None:
        if self.request_id_header is not None:
            ex.response_headers_raw.append((self.request_id_header, ex.request_id_bytes))
