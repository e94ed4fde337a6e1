"""The backend side of HTTP/1.1: one asyncio.Protocol per upstream TCP connection, parsed by httptools.

It knows nothing about routes or filters: it reports the response head, body chunks, completion and
failure to the client connection that currently owns it (`owner`), which decides what to do.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from bastion.http.headers import status_line

if TYPE_CHECKING:
    from bastion.http.h1_server import ClientConnection
    from bastion.upstream.pool import Peer


# Response framing as the client side needs to know it.
FRAMING_LENGTH = 0  # Content-Length given
FRAMING_CHUNKED = 1  # chunked from the backend
FRAMING_CLOSE = 2  # body ends when the backend closes
FRAMING_NONE = 3  # no body (HEAD, 1xx, 204, 304)

MAX_RESPONSE_HEAD = 64 * 1024
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade", b""})


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "peer",
        "transport",
        "parser",
        "owner",
        "alive",
        "idle_since",
        "reused",
        "got_bytes",
        "headers",
        "chunked",
        "content_length",
        "keep_alive",
        "status",
        "head_done",
        "head_request",
        "deadline",
        "tunnel",
        "paused",
        "reads",
        "seen_reads",
        "head_bytes",
        "read_timeout",
        "between",
        "known_head",
        "last_head",
        "last_known",
        "bulk",
    )

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.transport: Any = None
        self.parser = HttpResponseParser(self)
        self.owner: Any = None  # the ClientConnection this connection answers (see the note in ClientConnection)
        self.alive = True
        self.idle_since = 0.0
        self.reused = False
        self.got_bytes = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.content_length = -1
        self.keep_alive = True
        self.status = 0
        self.head_done = False
        self.head_request = False
        self.deadline = 0.0
        self.tunnel = False
        self.paused = False
        self.head_bytes = 0
        self.reads = 0  # counted per read; the worker's sweep restarts the read timeout when it moves
        self.seen_reads = 0
        self.read_timeout = 60.0
        self.between = True  # no response begun: the next read starts with a response head
        self.known_head: Any = None  # while a known head is handed to the client side (see report_known)
        # The last known head this connection brought, with its blank line, and what it gave: a backend
        # that repeats itself is known by comparing bytes, without splitting the read or hashing the head.
        self.last_head = b""
        self.last_known: Any = None
        self.bulk = False  # the client side may splice the rest of this body (ClientConnection.try_splice)

    # -- asyncio.Protocol ------------------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.peer.connections += 1

    def connection_lost(self, exc):
        if self.alive:
            self.alive = False
            self.peer.connections -= 1
        owner = self.owner
        if owner is None:
            self.peer.forget(self)
            return
        self.owner = None
        if self.tunnel:
            owner.tunnel_closed_by_upstream()
        elif self.head_done and not self.chunked and self.content_length < 0 and not self.head_request:
            # A body delimited by the connection's end is complete now.
            owner.upstream_complete(self, reusable=False)
        else:
            owner.upstream_failed(self, "upstream_reset" if not self.got_bytes else "upstream_reset_midway")

    def eof_received(self):
        return False

    def pause_writing(self):
        owner = self.owner
        if owner is not None:
            owner.pause_reading_for_upstream()

    def resume_writing(self):
        owner = self.owner
        if owner is not None:
            owner.resume_reading_for_upstream()

    def data_received(self, data: bytes) -> None:
        owner: ClientConnection | None = self.owner
        if owner is None:
            # Bytes from an idle backend connection cannot belong to any request.
            self.close()
            return
        if self.tunnel:
            self.reads += 1
            owner.tunnel_from_upstream(data)
            return
        head = None
        if self.between and not self.head_request:
            heads = self.peer.known_heads
            last = self.last_head
            if last and data.startswith(last):
                known = self.last_known
                if len(data) - len(last) == known[2]:
                    heads.hits += 1
                    owner.upstream_known(self, known, data[len(last) :])
                    return
            if heads.paused:
                heads.paused -= 1
            else:
                # A whole response in one read whose head is byte for byte one this backend sent before
                # (bastion/http/known_heads.py): what parsing that head gave is known, so the parser is
                # skipped; it stays between messages for the next read. (partition, not find: find parses
                # its arguments the slow way.)
                head, blank, body = data.partition(b"\r\n\r\n")
                if blank:
                    known = heads.entries.get(head)
                    if known is not None and len(body) == known[2]:
                        heads.hits += 1
                        self.last_head = data[: len(head) + 4]
                        self.last_known = known
                        owner.upstream_known(self, known, body)  # (the exchange ends in it)
                        return
                else:
                    head = None
        self.got_bytes = True
        self.reads += 1
        # Everything for the client while this read is parsed leaves in one write (see ClientConnection.out).
        owner.out = out = []
        try:
            self.parser.feed_data(data)
            if (head is not None and self.between and self.head_done and len(body) == self.content_length
                    and 200 <= self.status < 300 and data[9:12] == b"%d" % self.status):
                self._remember_head(head)  # (the status check: not an interim 1xx head before it)
        except HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :]
            if self.status == 101 and self.owner is not None:
                self.tunnel = True
                self.owner.upstream_switched(self, rest)
            else:
                self.fail("invalid_response")
        except HttpParserError:
            self.fail("invalid_response")
        else:
            if not self.head_done and self.owner is not None:
                # A backend's response head is bounded, as a client's request head is.
                self.head_bytes += len(data)
                if self.head_bytes > MAX_RESPONSE_HEAD:
                    self.fail("invalid_response")
        finally:
            if owner.out is out:
                owner.out = None
            if out and not owner.closed:
                owner.transport.write(out[0] if len(out) == 1 else b"".join(out))
            if self.bulk:
                owner.try_splice(self)

    def report_known(self, owner: ClientConnection, known: tuple, body: bytes) -> None:
        """The callbacks' work for a known head (see data_received), with the same calls to the owner."""
        self.status, headers, self.content_length, self.keep_alive = known[:4]
        self.known_head = known
        self.chunked = False
        self.head_done = True
        self.headers = headers = list(headers)  # filters may change the list they are given
        owner.upstream_head(self, self.status, headers, FRAMING_LENGTH if self.content_length else FRAMING_NONE)
        self.known_head = None
        if self.owned_by(owner):
            if self.content_length:
                owner.upstream_body(body)
            if self.owned_by(owner):
                owner.upstream_complete(self, self.keep_alive)

    def owned_by(self, owner: Any) -> bool:
        """Whether `owner` still owns this connection. (A method, not `self.owner is owner` inline: mypy would
        take `self.owner` as `owner`'s type from then on, and the compiled code would check a later read of
        it, which the calls in between may have set to None, against that type.)"""
        return self.owner is owner

    def _remember_head(self, head: bytes) -> None:
        """Remember a response head (without its blank line) and what parsing it gave."""
        headers = self.headers
        lines = b"".join([name + b": " + value + b"\r\n" for name, value in headers])
        # (the list is never changed: an exchange takes a copy, and compares with it)
        status = self.status
        whole = status_line(status) + lines + b"\r\n"  # the head to a keep-alive HTTP/1.1 client
        self.peer.known_heads.remember(head, (status, list(headers), self.content_length, self.keep_alive, lines, whole))

    # -- httptools callbacks ---------------------------------------------------------------------------
    def on_message_begin(self):
        self.between = False
        self.headers = []
        self.chunked = False
        self.content_length = -1
        self.head_done = False

    def on_header(self, name: bytes, value: bytes):
        self.headers.append((name, value))

    def on_headers_complete(self):
        parser = self.parser
        self.status = status = parser.get_status_code()
        self.keep_alive = parser.should_keep_alive()
        # One pass: drop hop-by-hop and hidden headers, note the framing and Connection's tokens.
        special = self.peer.response_special
        kept = []
        tokens = None
        upgrade = None
        for pair in self.headers:
            lname = pair[0].lower()
            if lname not in special:
                kept.append(pair)
            elif lname == b"content-length":
                self.content_length = int(pair[1])
                kept.append(pair)
            elif lname == b"transfer-encoding":
                self.chunked = pair[1].lower().rstrip().endswith(b"chunked")
            elif lname == b"connection":
                tokens = pair[1].lower() if tokens is None else tokens + b"," + pair[1].lower()
            elif lname == b"upgrade":
                upgrade = pair
        if tokens is not None and tokens not in _CONNECTION_OPTIONS:
            named = {t.strip() for t in tokens.split(b",")} - _CONNECTION_OPTIONS
            if named:
                kept = [(n, v) for n, v in kept if n.lower() not in named]
        if status == 101 and upgrade is not None:
            kept.append(upgrade)
        self.headers = kept
        headers = kept
        owner = self.owner
        if owner is None:
            return
        if 100 <= status < 200 and status != 101:
            owner.upstream_interim(self, status, headers)
            return
        self.head_done = True
        if self.head_request or status == 204 or status == 304 or status == 101:
            framing = FRAMING_NONE
        elif self.chunked:
            framing = FRAMING_CHUNKED
        elif self.content_length >= 0:
            framing = FRAMING_LENGTH if self.content_length else FRAMING_NONE
        else:
            framing = FRAMING_CLOSE
        owner.upstream_head(self, status, headers, framing)
        if self.head_request and self.owner is not None:
            # httptools cannot be told a response has no body; a HEAD reply ends at its head, and the
            # connection is not reused because the parser would wait for Content-Length bytes.
            self.keep_alive = False
            self.owner.upstream_complete(self, reusable=False)

    def on_body(self, body: bytes):
        owner = self.owner
        if owner is not None:
            owner.upstream_body(body)

    def on_message_complete(self):
        self.between = True
        owner = self.owner
        if owner is None or not self.head_done or self.status == 101 or self.head_request:
            return
        owner.upstream_complete(self, self.keep_alive)

    # -- used by the client side ------------------------------------------------------------------------
    def spliced(self) -> None:
        """The rest of the body went around the parser (bastion/http/splice.py), which is still waiting for
        it: the next response starts with a new parser."""
        self.parser = HttpResponseParser(self)
        self.between = True
        self.bulk = False

    def detach(self) -> None:
        self.owner = None
        self.deadline = 0.0
        if self.paused:
            self.paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def fail(self, reason: str) -> None:
        owner = self.owner
        self.owner = None
        self.close()
        if owner is not None:
            owner.upstream_failed(self, reason)

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.alive:
            self.alive = False
            self.peer.connections -= 1
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.owner = None
        if self.alive:
            self.alive = False
            self.peer.connections -= 1
        if self.transport is not None:
            self.transport.abort()


log = logging.getLogger("bastion.upstream")


def connect_failure(exc: BaseException, peer) -> tuple[int, str]:
    """The status and the reason for a connection to a backend that could not be made (HTTP/1.1 and h2)."""
    if isinstance(exc, asyncio.TimeoutError):
        return 504, "connect_timeout"
    if isinstance(exc, ConnectionRefusedError):
        return 502, "connect_refused"
    if isinstance(exc, ssl.SSLError):
        log.warning("TLS to %s failed: %s", peer.address, exc)
        return 502, "tls_error"
    log.info("connecting to %s failed: %s", peer.address, exc)
    return 502, "connect_error"
