"""Message heads seen before, byte for byte, with what parsing and checking them gave.

Clients repeat their request heads (API clients, health checks, load balancers, benchmarks) and backends
repeat their response heads (apart from `Date`, once a second). For a read that is exactly such a head,
the parse result is taken from here instead of from the parser's callbacks (ClientConnection and
UpstreamConnection). Identical bytes parse identically, so nothing is skipped but the parsing itself:
every phase and filter still runs.

Many clients repeat their header fields but not their request target (an API client asking for one
item after another, a crawler). So request heads are also remembered by their shape: the method and the
fields, without the target. A head of a known shape whose target is plain (origin-form, only the
characters of RFC 3986's unreserved, sub-delims, ':', '@', '/', '?' and '%', no longer than the
request-line limit) takes what parsing the remembered head gave, with its own target, path and query;
any other target goes to the parser.

Remembering costs a little on each new head; for traffic whose heads do not repeat, that is pure loss.
So each table counts its hits: when a full table (SIZE heads) was hit fewer times than it holds, it is
emptied and nothing is looked up or remembered for the next PAUSE heads, then it tries again.
"""

from __future__ import annotations

from typing import Any

from bastion.http.paths import normalize_path

SIZE = 256
PAUSE = 4096

# A plain request target: these bytes only (RFC 3986's unreserved and sub-delims, ':', '@', '/', '?', '%').
# translate() maps every other byte to 0, so `0 in target.translate(_PLAIN)` finds any.
_PLAIN_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?%"
_PLAIN = bytes(c if c in _PLAIN_BYTES else 0 for c in range(256))


class KnownHeads:
    __slots__ = ("entries", "hits", "paused")

    def __init__(self) -> None:
        self.entries: dict[bytes, Any] = {}
        self.hits = 0
        self.paused = 0  # heads still to let by without looking or remembering

    def remember(self, head: bytes, parsed: Any) -> None:
        entries = self.entries
        if len(entries) >= SIZE:
            entries.clear()
            worth_it = self.hits >= SIZE
            self.hits = 0
            if not worth_it:
                self.paused = PAUSE
                return
        entries[head] = parsed


class KnownRequest:
    """What parsing and checking one remembered request head gave. Identical bytes on a listener of the same
    scheme always give the same, so a filter may keep in `memo` what it derives from the head alone (its
    cache key, say), under a key of its own, and find it again the next time the head arrives."""

    __slots__ = ("method", "target", "path", "query", "host_header", "host", "headers", "raw_headers",
                 "via_proxy", "incoming_request_id", "lines", "upstream_head", "memo")

    def __init__(self, ex, lines: bytes):
        self.method = ex.method
        self.target = ex.target
        self.path = ex.path
        self.query = ex.query
        self.host_header = ex.host_header
        self.host = ex.host
        self.headers = list(ex.headers)  # never changed: an exchange takes a copy, and compares with it
        self.raw_headers = tuple(ex.raw_headers)
        self.via_proxy = ex.via_proxy
        self.incoming_request_id = ex.incoming_request_id
        self.lines = lines  # the header lines as Bastion writes them to a backend
        self.upstream_head: bytes | None = None  # the whole head to a keep-alive backend, once written out
        self.memo: dict = {}

    def retarget(self, target: bytes) -> KnownRequest:
        """The same head with another plain origin-form target (see KnownRequests.shaped)."""
        other = KnownRequest(self, self.lines)  # every field as here (a fresh memo: it may depend on the target)
        other.target = target
        path, _, other.query = target.partition(b"?")
        if path.partition(b"/.")[1]:  # (not `in` or find: see ClientConnection.on_headers_complete)
            path = normalize_path(path)
        other.path = path
        return other


def split_head(head: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(method, target, the fields after the request line) of a head whose request line is
    "METHOD SP target SP HTTP/1.1", else None."""
    line, _, fields = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        return None
    return parts[0], parts[1], fields


class KnownRequests(KnownHeads):
    """Request heads seen before: whole (in `entries`), and by shape (in `shapes`, see the module's doc)."""

    __slots__ = ("shapes",)

    def __init__(self) -> None:
        super().__init__()
        self.shapes = KnownHeads()

    def shaped(self, head: bytes, max_target: int) -> KnownRequest | None:
        """What parsing `head` (one whole request head) gives, when a head of its shape (its method and
        fields) was remembered and its target is plain; otherwise None, and the parser decides."""
        shapes = self.shapes
        if shapes.paused:
            shapes.paused -= 1
            return None
        line, _, fields = head.partition(b"\r\n")  # (split_head, inline)
        template: KnownRequest | None = shapes.entries.get(fields)
        if template is None:
            return None
        parts = line.split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1":
            return None
        method, target, _ = parts
        if template.method != method or target[:1] != b"/" or len(target) > max_target or 0 in target.translate(_PLAIN):
            return None
        shapes.hits += 1
        return template.retarget(target)

    def remember_request(self, head: bytes, known: KnownRequest) -> None:
        """Remember a parsed head whole and by shape (each table unless it is paused)."""
        if not self.paused:
            self.remember(head, known)
        shapes = self.shapes
        if not shapes.paused:
            split = split_head(head)
            if split is not None:
                shapes.remember(split[2], known)  # by its fields; the method is checked on a hit
