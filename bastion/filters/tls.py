"""Listener-level HTTPS behaviours, as filters: redirecting plain HTTP to HTTPS, and HSTS."""

from __future__ import annotations

from bastion.proxy.exchange import Response


class ListenerInfo:
    """What a connection knows about the listener that accepted it."""

    __slots__ = ("address", "name", "scheme", "tls", "redirect_port", "hsts")

    def __init__(self, spec):
        self.address = spec.address
        self.name = spec.name or spec.address
        self.scheme = "https" if spec.tls is not None else "http"
        self.tls = None
        port = spec.redirect_https
        self.redirect_port = (443 if port is True else int(port)) if port and spec.tls is None else 0
        self.hsts = None
        if spec.tls is not None and spec.tls.hsts is not None:
            h = spec.tls.hsts
            value = b"max-age=%d" % int(h.max_age)
            if h.include_subdomains:
                value += b"; includeSubDomains"
            if h.preload:
                value += b"; preload"
            self.hsts = value


class HttpsRedirect:
    """On listeners with `redirect_https`, answer 308 with the same host and target on https://."""

    def request_filter(self, ex):
        listener = ex.conn.listener
        if listener is None or not listener.redirect_port:
            return None
        host = ex.host.decode("latin-1")
        if ":" in host and not host.endswith("]"):
            host = host.rsplit(":", 1)[0]
        port = "" if listener.redirect_port == 443 else f":{listener.redirect_port}"
        target = ex.target.decode("latin-1") if ex.target.startswith(b"/") else ex.path.decode("latin-1")
        return Response(308, b"", {"Location": f"https://{host}{port}{target}"})


class StrictTransportSecurity:
    """On HTTPS listeners with `hsts`, add Strict-Transport-Security to every response."""

    def response_filter(self, ex) -> None:
        listener = ex.conn.listener
        if listener is not None and listener.hsts is not None:
            ex.response_headers_raw.append((b"Strict-Transport-Security", listener.hsts))
