"""The per-request object every phase and filter sees, and the Response a filter may answer with."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping

from bastion.http.headers import Headers

if TYPE_CHECKING:
    from bastion.proxy.runtime import CompiledRoute
    from bastion.upstream.pool import Peer
    from bastion.http.known_heads import KnownRequest


_ID_PREFIX = [os.urandom(6).hex().encode()]
_NOTHING: tuple = ()  # the empty default of fields that are replaced, never appended to
_id_counter = [0]


def reseed_request_ids() -> None:
    """Called in each worker after fork so that workers never hand out the same id."""
    _ID_PREFIX[0] = os.urandom(6).hex().encode()
    _id_counter[0] = 0


def new_request_id() -> bytes:
    _id_counter[0] += 1
    return b"%s%08x" % (_ID_PREFIX[0], _id_counter[0])


class Response:
    """An answer produced by Bastion itself (a filter's early answer, a redirect, an error page)."""

    __slots__ = ("status", "headers", "body", "wire", "whole")

    def __init__(
        self,
        status: int = 200,
        body: bytes | str = b"",
        headers: Mapping[str, str] | list[tuple[bytes, bytes]] | None = None,
        content_type: str | None = None,
    ):
        self.status = status
        self.body: bytes | FileBody = body.encode() if isinstance(body, str) else body  # a FileBody: the disk cache
        items: list[tuple[bytes, bytes]] = []
        if isinstance(headers, list):
            items = list(headers)
        elif headers:
            items = [(k.encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]
        if content_type is not None:
            items.append((b"Content-Type", content_type.encode("latin-1")))
        self.headers = Headers(items)
        # Optional prebuilt head: status line and header lines (Content-Length included, no Connection, no
        # final empty line). Such a
        # response is written as is, without the response phase. Only for a filter that knows no other
        # response filter is on the route (the cache's hits).
        self.wire: bytes | None = None
        # With `wire`, optionally: the whole HTTP/1.1 keep-alive answer (wire, the blank line, the body).
        self.whole: bytes | None = None


class FileBody:
    """A local response's body that stays in a file and is sent in pieces as the client takes them (the
    disk cache's large objects): `size` bytes from `offset`."""

    __slots__ = ("path", "offset", "size")

    def __init__(self, path: str, offset: int, size: int):
        self.path = path
        self.offset = offset
        self.size = size

    def __len__(self) -> int:
        return self.size


class Exchange:
    """One request through every phase: the request as received, the route, the peer, the response,
    timings and per-filter state. Hot fields are bytes; the str properties are for filter authors."""

    __slots__ = (
        "conn",
        "method",
        "target",
        "path",
        "query",
        "http_version",
        "headers",
        "host",
        "host_header",
        "client_ip",
        "scheme",
        "keep_alive",
        "upgrade",
        "expect_continue",
        "content_length",
        "chunked",
        "_request_id",
        "route",
        "peer",
        "upstream_path",
        "start",
        "status",
        "response_headers_raw",
        "bytes_in",
        "bytes_out",
        "upstream_start",
        "upstream_time",
        "error",
        "_state",
        "incoming_request_id",
        "body_chunks",
        "body_buffered",
        "body_sent",
        "request_complete",
        "discard_body",
        "waiting_body",
        "upstream_head",
        "via_proxy",
        "end",
        "attempting",
        "tried",
        "retries",
        "error_detail",
        "replacement",
        "raw_headers",
        "body_waiter",
        "known",
    )

    def __init__(self, conn: Any, start: float, client_ip: str = "", scheme: str = "http",
                 known: KnownRequest | None = None) -> None:
        self.conn = conn
        self.start = start
        self.client_ip = client_ip
        self.scheme = scheme
        if known is None:
            self.method = b""
            self.target = b""
            self.path = b""
            self.query = b""
            self.host_header = b""
            self.host = b""
            self.headers: list[tuple[bytes, bytes]] = []
            self.raw_headers: Any = _NOTHING  # every field as received (read-only)
            self.via_proxy = False
            self.incoming_request_id: Any = None
            self.request_complete = False
        else:
            # a remembered request head (bastion.http.known_heads.KnownRequest): what parsing it gave
            self.method = known.method
            self.target = known.target
            self.path = known.path
            self.query = known.query
            self.host_header = known.host_header
            self.host = known.host
            self.headers = list(known.headers)  # filters may change them
            self.raw_headers = known.raw_headers
            self.via_proxy = known.via_proxy
            self.incoming_request_id = known.incoming_request_id
            self.request_complete = True  # remembered heads have no body
        # The remembered head this request repeats, if any: filters may keep what they derive from the head
        # alone in its `memo`.
        # (route, peer and known are set once, never back to None: typed, for the compiled hot path; other
        # fields that calls may change are typed Any, see ClientConnection)
        self.known: KnownRequest | None = known
        self.http_version = "1.1"
        self.keep_alive = True
        self.upgrade: Any = None
        self.expect_continue = False
        self.content_length: Any = None
        self.chunked = False
        self._request_id: Any = None
        self.route: CompiledRoute | None = None
        self.peer: Peer | None = None
        self.upstream_path: Any = None
        self.status = 0
        self.response_headers_raw: Any = _NOTHING  # a list once there is a response
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_start = 0.0
        self.upstream_time: Any = None
        self.error: Any = None
        self._state: Any = None
        self.body_chunks: Any = None
        self.body_buffered = 0
        self.body_sent = False
        self.discard_body = False
        self.waiting_body = False
        self.upstream_head: Any = None
        self.end = 0.0
        self.attempting = False
        self.tried: Any = None
        self.retries = 0
        self.error_detail: Any = None
        self.replacement: Any = None  # a response filter's answer in place of the backend's
        self.body_waiter: Any = None  # (future, limit) while a filter awaits the whole body (read_body)

    # -- identity -------------------------------------------------------------------------------------
    @property
    def request_id_bytes(self) -> bytes:
        rid = self._request_id
        if rid is None:
            rid = self._request_id = self.incoming_request_id or new_request_id()
        return rid

    @property
    def request_id(self) -> str:
        return self.request_id_bytes.decode("latin-1")

    # -- for filter authors -----------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, Any]:
        """Free-form per-request storage shared by the filters of this request."""
        if self._state is None:
            self._state = {}
        return self._state

    @property
    def request_headers(self) -> Headers:
        return Headers(self.headers)

    @property
    def response_headers(self) -> Headers:
        return Headers(self.response_headers_raw)

    @property
    def method_str(self) -> str:
        return self.method.decode("latin-1")

    @property
    def path_str(self) -> str:
        return self.path.decode("latin-1")

    @property
    def query_str(self) -> str:
        return self.query.decode("latin-1")

    @property
    def host_str(self) -> str:
        return self.host.decode("latin-1")

    def read_body(self, limit: int):
        """Awaitable: the whole request body (b"" when there is none) once it has arrived, or None when it
        is larger than `limit` bytes (what arrived stays buffered and is still forwarded). For request
        filters that must see the body before the request goes on, e.g. a WAF; others never pay for it."""
        return self.conn.read_body(self, limit)

    def set_upstream_path(self, path: str | bytes) -> None:
        """Change the path (and query, if it contains '?') sent to the backend."""
        self.upstream_path = path.encode("latin-1") if isinstance(path, str) else path

    def upstream_target(self) -> bytes:
        if self.upstream_path is not None:
            return self.upstream_path
        return self.path + b"?" + self.query if self.query else self.path
