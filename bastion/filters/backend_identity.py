"""Hide what the backend is: drop Server, X-Powered-By and friends from responses (optionally set our
own Server), and any X-Request-ID the backend echoes, since Bastion sets its own."""

from __future__ import annotations


class HideBackendHeaders:
    def __init__(self, names: list[str], server_header: str | None = None, request_id_header: str | None = None):
        hidden = {n.lower().encode() for n in names}
        if request_id_header:
            hidden.add(request_id_header.lower().encode())
        self.hidden = frozenset(hidden)
        self.server = server_header.encode() if server_header else None

    def response_filter(self, ex) -> None:
        hidden = self.hidden
        headers = ex.response_headers_raw
        for name, _ in headers:
            if name.lower() in hidden:
                ex.response_headers_raw = headers = [(n, v) for n, v in headers if n.lower() not in hidden]
                break
        if self.server is not None:
            headers.append((b"Server", self.server))
