"""Routes that answer without a backend: redirects and fixed responses."""

from __future__ import annotations

import string

from bastion.proxy.exchange import Response

PLACEHOLDERS = ("scheme", "host", "path", "query", "request_uri")


def check_template(template: str) -> None:
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None and field not in PLACEHOLDERS:
            raise ValueError(f"unknown placeholder {{{field}}}; known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")


class Redirect:
    def __init__(self, to: str, status: int = 301):
        check_template(to)
        self.template = to
        self.status = status

    def request_filter(self, ex) -> Response:
        target = ex.target or (ex.path + (b"?" + ex.query if ex.query else b""))
        location = self.template.format(
            scheme=ex.scheme,
            host=ex.host_header.decode("latin-1"),
            path=ex.path.decode("latin-1"),
            query=ex.query.decode("latin-1"),
            request_uri=target.decode("latin-1"),
        )
        return Response(self.status, b"", [(b"Location", location.encode("latin-1"))])


class FixedResponse:
    def __init__(self, status: int, body: str, content_type: str, headers: dict[str, str]):
        self.response = Response(status, body, headers, content_type=content_type)

    def request_filter(self, ex) -> Response:
        return self.response
