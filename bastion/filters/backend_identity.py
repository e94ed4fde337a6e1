"""Bastion's own Server header, when `proxy.server_header` is set. (The backend's Server, X-Powered-By
and the other `proxy.hide_headers` are dropped by the upstream connection while it reads the response
head, in the pass that drops hop-by-hop headers, so hiding them costs nothing extra.)"""

from __future__ import annotations


class ServerHeader:
    def __init__(self, value: str):
        self.value = value.encode("latin-1")

    def response_filter(self, ex) -> None:
        ex.response_headers_raw.append((b"Server", self.value))
