"""Security response headers and hiding the backends' addresses."""

from __future__ import annotations

from urllib.parse import urlsplit


class SecurityHeaders:
    """X-Content-Type-Options, X-Frame-Options, Referrer-Policy and Content-Security-Policy on every
    response (Bastion's own answers too). The backend's own value wins unless `override` is set."""

    # What it adds depends only on the response, so a cache stores the result and skips it on hits.
    cache_safe_response = True

    def __init__(self, spec):
        fields = []
        if spec.content_type_options:
            fields.append((b"X-Content-Type-Options", b"nosniff"))
        if spec.frame_options:
            fields.append((b"X-Frame-Options", spec.frame_options.encode("latin-1")))
        if spec.referrer_policy:
            fields.append((b"Referrer-Policy", spec.referrer_policy.encode("latin-1")))
        if spec.content_security_policy:
            fields.append((b"Content-Security-Policy", spec.content_security_policy.encode("latin-1")))
        self.fields = tuple(fields)
        self.names = frozenset(n.lower() for n, _ in fields)
        self.override = spec.override

    def response_filter(self, ex) -> None:
        headers = ex.response_headers_raw
        names = self.names
        present = [pair for pair in headers if len(pair[0]) >= 15 and pair[0].lower() in names]
        if present:
            if self.override:
                headers[:] = [pair for pair in headers if not (len(pair[0]) >= 15 and pair[0].lower() in names)]
            else:
                have = {n.lower() for n, _ in present}
                headers.extend(pair for pair in self.fields if pair[0].lower() not in have)
                return
        headers.extend(self.fields)


_LOCATION = (b"location", b"content-location")


class HideBackendLocation:
    """A Location (or Content-Location) that points at one of the route's backend servers is rewritten to
    the public host, so a redirect never tells a client where the backends are."""

    # The result depends on the response and the Host (part of the cache key): a cache stores it as is.
    cache_safe_response = True
    # Redirects and 201 Created carry the Location worth hiding: the response phase calls this filter for
    # those only (and skips itself for a 2xx from a remembered backend head).
    response_statuses = frozenset(range(300, 400)) | {201}

    def __init__(self, group, public_host: str | None, public_scheme: str | None):
        self.group = group
        self.public_host = public_host.encode("latin-1") if public_host else None
        self.public_scheme = public_scheme

    def _backend_authorities(self) -> set[str]:
        names = set()
        for peer in self.group.peers:
            host, port = peer.host.lower(), peer.port
            shown = f"[{host}]" if ":" in host else host
            names.add(f"{shown}:{port}")
            if (port == 80 and not peer.tls) or (port == 443 and peer.tls):
                names.add(shown)
            server_name = getattr(peer, "server_name", None)
            if server_name:
                names.add(f"{server_name.lower()}:{port}")
        return names

    def response_filter(self, ex) -> None:
        headers = ex.response_headers_raw
        backends = None
        for index, (name, value) in enumerate(headers):
            if len(name) < 8 or name.lower() not in _LOCATION:
                continue
            try:
                url = urlsplit(value.decode("latin-1"))
            except ValueError:
                continue
            if not url.netloc:
                continue
            if backends is None:
                backends = self._backend_authorities()
            if url.netloc.lower() not in backends:
                continue
            host = self.public_host or ex.host_header or b""
            if not host:
                continue
            scheme = (self.public_scheme or ex.scheme).encode()
            rest = url.path or "/"
            if url.query:
                rest += "?" + url.query
            if url.fragment:
                rest += "#" + url.fragment
            headers[index] = (name, scheme + b"://" + host + rest.encode("latin-1"))
