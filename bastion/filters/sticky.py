"""Sets the sticky-session cookie when a client was sent to a server its cookie does not name (the first
request, or its server went away). Added by the configuration to routes whose upstream uses
`balance: cookie`."""

from __future__ import annotations


class StickyCookieFilter:
    def __init__(self, group):
        self.group = group

    def response_filter(self, ex) -> None:
        peer = ex.peer
        if peer is None:
            return
        balancer = self.group.balancer
        if balancer.wanted(ex) != peer.address:
            ex.response_headers_raw.append((b"Set-Cookie", balancer.set_cookie(peer)))
