"""Message heads seen before, byte for byte, with what parsing and checking them gave.

Clients repeat their request heads (API clients, health checks, load balancers, benchmarks) and backends
repeat their response heads (apart from `Date`, once a second). For a read that is exactly such a head,
the parse result is taken from here instead of from the parser's callbacks (ClientConnection and
UpstreamConnection). Identical bytes parse identically, so nothing is skipped but the parsing itself:
every phase and filter still runs.

Remembering costs a little on each new head; for traffic whose heads do not repeat, that is pure loss.
So each table counts its hits: when a full table (SIZE heads) was hit fewer times than it holds, it is
emptied and nothing is looked up or remembered for the next PAUSE heads, then it tries again.
"""

from __future__ import annotations

SIZE = 256
PAUSE = 4096


class KnownHeads:
    __slots__ = ("entries", "hits", "paused")

    def __init__(self):
        self.entries: dict[bytes, tuple] = {}
        self.hits = 0
        self.paused = 0  # heads still to let by without looking or remembering

    def remember(self, head: bytes, parsed: tuple) -> None:
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
                 "via_proxy", "incoming_request_id", "lines", "memo")

    def __init__(self, ex, lines: bytes):
        self.method = ex.method
        self.target = ex.target
        self.path = ex.path
        self.query = ex.query
        self.host_header = ex.host_header
        self.host = ex.host
        self.headers = tuple(ex.headers)
        self.raw_headers = tuple(ex.raw_headers)
        self.via_proxy = ex.via_proxy
        self.incoming_request_id = ex.incoming_request_id
        self.lines = lines  # the header lines as Bastion writes them to a backend
        self.memo: dict = {}
