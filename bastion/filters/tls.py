"""Listener-level HTTPS behaviours, as filters: redirecting plain HTTP to HTTPS, and HSTS."""

from __future__ import annotations

from bastion.proxy.exchange import Response


class ListenerInfo:
    """What a connection knows about the listener that accepted it."""

    __slots__ = ("address", "name", "scheme", "tls", "redirect_port", "hsts", "client_auth", "proxy_protocol")

    def __init__(self, spec):
        self.address = spec.address
        self.name = spec.name or spec.address
        self.scheme = "https" if spec.tls is not None else "http"
        self.tls = None
        port = spec.redirect_https
        self.redirect_port = (443 if port is True else int(port)) if port and spec.tls is None else 0
        self.hsts = None
        self.proxy_protocol = spec.proxy_protocol
        self.client_auth = spec.tls.client_auth if spec.tls is not None else None
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


class ClientCertificateHeaders:
    """Pass the verified client certificate's subject and fingerprint to the backend in the configured
    headers, and never let a client set those headers itself."""

    def __init__(self, names: set[bytes]):
        self.names = frozenset(n.lower() for n in names)

    def upstream_request_filter(self, ex) -> None:
        names = self.names
        ex.headers = [(n, v) for n, v in ex.headers if n.lower() not in names]
        listener = ex.conn.listener
        auth = listener.client_auth if listener is not None else None
        if auth is None:
            return
        info = ex.conn.client_certificate()
        if info is None:
            return
        subject, fingerprint = info
        if auth.subject_header:
            ex.headers.append((auth.subject_header.encode(), subject))
        if auth.fingerprint_header:
            ex.headers.append((auth.fingerprint_header.encode(), fingerprint))
