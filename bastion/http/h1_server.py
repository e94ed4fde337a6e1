"""The client side of HTTP/1.1: one asyncio.Protocol per accepted connection, parsed by httptools (llhttp
in strict mode), with the body streamed to the backend and the response streamed back.

Parsing rules beyond llhttp's own (which already rejects CL+TE, duplicate Content-Length, bad chunking,
bare LF/CR, obs-fold, whitespace before ':', invalid names and values): HTTP/1.0 with Transfer-Encoding,
missing or repeated Host, absolute-form targets for another host, versions other than 1.0/1.1, and the
configured size limits. Any of these gets a 4xx, `Connection: close`, and nothing reaches a backend.
"""

from __future__ import annotations

import asyncio
from time import monotonic
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser
from mypy_extensions import mypyc_attr

from bastion.http import h2_upstream
from bastion.http.h1_upstream import (
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_LENGTH,
    FRAMING_NONE,
    UpstreamConnection,
    connect_failure,
)
from bastion.http.headers import HOP_BY_HOP, status_line
from bastion.http.known_heads import KnownRequest
from bastion.http.splice import SPLICE_MIN, BodySplice, plain_tcp
from bastion.proxy import engine
from bastion.proxy.exchange import Exchange, FileBody
from bastion.http.paths import normalize_path
from bastion.proxy.runtime import CompiledRoute
from bastion.upstream.pool import Peer, UpstreamGroup

if TYPE_CHECKING:
    from bastion.proxy.runtime import Runtime

log = logging.getLogger("bastion.http")

# Why the client's socket is not being read; reading resumes when no reason is left.
PAUSE_UPSTREAM = 1  # the backend is not taking the body as fast as the client sends it
PAUSE_BUFFER = 2  # body bytes are waiting for a backend connection
PAUSE_PIPELINE = 4  # a pipelined request waits for the one before it
PAUSE_HOLD = 8  # an async filter is working on the request
PAUSE_TUNNEL = 16  # the backend side of a tunnel is not taking bytes

# What the connection's deadline means when it passes.
DL_NONE = 0
DL_IDLE = 1
DL_HEADER = 2
DL_BODY = 3
DL_TUNNEL = 4
DL_LINGER = 5

# Bodies up to this size are read whole before the request goes to a backend, so a malformed body
# (bad chunking) is refused before anything is forwarded; larger bodies stream after this much.
BODY_PREFETCH = 64 * 1024
BODY_BUFFER_PAUSE = 256 * 1024

# Headers saying the request already passed a proxy; the forwarding filter only rewrites when one is there.
_VIA_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"via"})
_SPECIAL = HOP_BY_HOP | _VIA_HEADERS | {b"host", b"expect", b"content-length", b"x-request-id"}
_NOT_PROXY_TOKENS = {b"close", b"keep-alive", b"upgrade", b""}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_HEADERS: list = []  # placeholder until a request begins; never appended to (on_header needs a begun message)
_CHUNK_END = b"0\r\n\r\n"


class RequestRejected(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@mypyc_attr(allow_interpreted_subclasses=True)
class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "worker",
        "runtime",
        "listener",
        "tls_client",
        "loop",
        "limits",
        "max_headers",
        "timeouts",
        "scheme",
        "transport",
        "parser",
        "client_ip",
        "parsing",
        "active",
        "queue",
        "upstream",
        "upstream_ready",
        "url",
        "in_head",
        "head_seen",
        "raw_headers",
        "trailers",
        "host_count",
        "connection_tokens",
        "paused",
        "write_paused",
        "close_after",
        "closed",
        "resp_started",
        "resp_chunked",
        "requests",
        "head_read",
        "known_heads",
        "deadline",
        "deadline_kind",
        "last_active",
        "tunnel",
        "tunnel_pending",
        "upgrading",
        "out",
        "guard_slot",
        "drained",
        "writes_h1",
        "last_head",
        "last_known",
        "splice",
    )

    waits_for_proxy_header = False

    def __init__(self, worker: Any, runtime: Runtime, listener: Any = None) -> None:
        self.worker = worker
        self.runtime = runtime
        self.listener = listener
        self.tls_client: Any = False  # the verified client certificate's (subject, fingerprint), once asked
        scheme = listener.scheme if listener is not None else "http"
        self.loop = worker.loop
        config = runtime.config
        self.limits = runtime.limits
        self.max_headers = config.limits.header_count
        self.timeouts = runtime.timeouts
        self.scheme = scheme
        self.transport: Any = None
        self.parser: Any = None
        self.client_ip = ""
        # State that the calls a method makes may change under it is typed Any: mypy (and so mypyc) would
        # otherwise take a value assigned before a call as still there after it (see docs/performance.md).
        self.parsing: Any = None  # an Exchange while a request head or body is being parsed
        self.active: Any = None  # the Exchange being answered
        self.queue: Any = None  # a deque of pipelined Exchanges
        self.upstream: Any = None  # an UpstreamConnection, or an HTTP/2 backend stream (h2_upstream)
        self.upstream_ready = False
        self.url = b""
        self.in_head = False
        self.head_seen = 0
        self.raw_headers: list = _NO_HEADERS
        self.trailers: list = []
        self.host_count = 0
        self.connection_tokens: Any = None
        self.paused = 0
        self.write_paused = False
        self.close_after = False
        self.closed = False
        self.resp_started = False
        self.resp_chunked = False
        self.requests = 0
        self.head_read: Any = None
        self.known_heads = runtime.known_requests if scheme == "http" else runtime.known_requests_https
        self.deadline = 0.0
        self.deadline_kind = DL_NONE
        self.last_active = 0.0
        self.tunnel: Any = None  # an UpstreamConnection, or an HTTP/2 backend stream
        self.tunnel_pending: Any = None
        self.upgrading = False
        self.out: Any = None
        self.guard_slot = -1  # this connection's place in the node's connection counters (security)
        self.writes_h1 = True  # its answers are HTTP/1.1 heads (an HTTP/2 stream writes frames)
        self.drained: Any = None  # a file body waits here while the client is slow
        # The last remembered head this client sent, and what it gave: a client that repeats itself is
        # known by comparing bytes, without hashing them (a KnownRequest stays true once made).
        self.last_head = b""
        self.last_known: Any = None
        self.splice: Any = None  # a BodySplice while a response body goes around Python (bastion/http/splice.py)

    def client_certificate(self):
        """(subject, SHA-256 fingerprint) of the client's verified certificate, or None; read once."""
        if self.tls_client is False:
            from bastion.tls.contexts import client_certificate_info

            self.tls_client = client_certificate_info(self.transport.get_extra_info("ssl_object"))
        return self.tls_client

    # -- output ---------------------------------------------------------------------------------------------
    # While the backend's bytes are being parsed, everything for the client is collected in `out` and
    # sent with one write when parsing ends: a small response leaves in one system call, not two.
    def _send(self, data: bytes) -> None:
        out = self.out
        if out is not None:
            out.append(data)
        else:
            self.transport.write(data)

    def _sendv(self, parts) -> None:
        out = self.out
        if out is not None:
            out.extend(parts)
        else:
            self.transport.writelines(parts)

    def _flush(self) -> None:
        out = self.out
        if out is not None:
            self.out = None
            if out and not self.closed:
                self.transport.write(b"".join(out))
            out.clear()

    # -- connection lifecycle ---------------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.parser = HttpRequestParser(self)
        now = monotonic()
        self.last_active = now
        self.deadline = now + self.timeouts.client_header
        self.deadline_kind = DL_HEADER
        self.worker.connection_opened(self)
        guard = self.runtime.connection_guard
        if guard is not None and not self.waits_for_proxy_header and not self.admit(guard):
            return
        if self.scheme == "https" and self.runtime.config.http2.enabled:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                from bastion.http.h2_server import start_h2

                start_h2(self, b"")

    def admit(self, guard) -> bool:
        """Connection-level security (deny lists, bans, connection limits); False when refused and closed."""
        refusal = guard.admit(self)
        if refusal is None:
            return True
        self.deadline_kind = DL_LINGER
        self.deadline = monotonic() + 1.0
        if refusal:
            self.transport.write(refusal)
            self.transport.close()
        else:
            self.transport.abort()
        return False

    def connection_lost(self, exc):
        self.closed = True
        splice = self.splice
        if splice is not None:
            splice.cancel()
            self._splice_over(splice)
        drained = self.drained
        if drained is not None and not drained.done():
            drained.set_result(None)  # a file body being sent stops
        self.worker.connection_closed(self)
        if self.guard_slot >= 0:
            self.runtime.connection_guard.release(self)
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.abort()
            self._finish_tunnel()
            return
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.abort()
        ex = self.active
        self._drop_body_waiter(self.parsing)
        if ex is not None:
            self._drop_body_waiter(ex)
            self.active = None
            engine.end_attempt(ex)
            if not ex.status:
                ex.status = 499
                ex.error = ex.error or "client_closed"
            engine.finish(ex)

    def eof_received(self):
        # A client that half-closes after its request still gets the answer; nginx does the same.
        if self.active is None and self.tunnel is None:
            return False
        return True

    def pause_writing(self):
        self.write_paused = True
        up = self.tunnel or self.upstream
        if up is not None:
            up.pause()

    def resume_writing(self):
        self.write_paused = False
        up = self.tunnel or self.upstream
        if up is not None and self.splice is None:  # (a spliced body's backend stays paused: see splice.py)
            up.resume()
        drained = self.drained
        if drained is not None:
            self.drained = None
            if not drained.done():
                drained.set_result(None)

    # -- reading control --------------------------------------------------------------------------------
    def _pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    def hold_reading(self) -> None:
        self._pause(PAUSE_HOLD)

    def release_reading(self) -> None:
        self._resume(PAUSE_HOLD)

    def pause_reading_for_upstream(self) -> None:
        self._pause(PAUSE_UPSTREAM if self.tunnel is None else PAUSE_TUNNEL)

    def resume_reading_for_upstream(self) -> None:
        self._resume(PAUSE_UPSTREAM | PAUSE_TUNNEL)

    # -- incoming bytes ---------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.last_active = monotonic()
            self.active.bytes_in += len(data)
            self.tunnel.transport.write(data)
            return
        if self.deadline_kind == DL_LINGER:
            return
        if self.upgrading:
            self.tunnel_pending.append(data)
            self._pause(PAUSE_TUNNEL)
            return
        if self.parsing is None and self.active is None:
            heads = self.known_heads
            if data == self.last_head:
                known = self.last_known
            elif heads.paused:
                heads.paused -= 1
                known = None
            else:
                known = heads.entries.get(data)
                if known is not None:
                    self.last_head = data
                    self.last_known = known
            if known is not None:
                heads.hits += 1
            elif data[-4:] == b"\r\n\r\n":
                # a whole request head: a remembered one with another target (a read with more after its
                # first head cannot be: what is remembered is one whole head and nothing else), or one to
                # remember, when it is the only thing in the read
                known = heads.shaped(data, self.runtime.request_line_limit)
                if (known is None and not (heads.paused and heads.shapes.paused)
                        and not data.partition(b"\r\n\r\n")[2]):
                    self.head_read = data
            if known is not None:
                # a remembered head: what on_message_begin, on_headers_complete and on_message_complete
                # would give (inline here: this is the hot path)
                ex = Exchange(self, monotonic(), self.client_ip, self.scheme, known)
                self.requests += 1
                if self.requests >= self.runtime.requests_per_connection:
                    self.close_after = True
                self.active = ex
                self.deadline = 0.0
                self.deadline_kind = DL_NONE
                # an answer given at once (a cache hit) sets the idle deadline in _end_exchange
                engine.start(self, ex, self.runtime)
                return
        was_in_head = self.in_head
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self._after_upgrade_request(data[upgrade.args[0] :])
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, RequestRejected):
                self.reject(cause.status, cause.reason)
            else:
                log.error("error while parsing a request", exc_info=cause or exc)
                self.reject(500, "internal_error")
        except HttpParserError as exc:
            if self.requests == 0 and data[:14] == b"PRI * HTTP/2.0" and self._h2_prior_knowledge(data):
                return
            self.reject(400, _parser_reason(exc))
        else:
            if self.in_head and was_in_head:
                # llhttp keeps no limit on one header line: bound the whole head here.
                self.head_seen += len(data)
                if self.head_seen > self.limits.header_bytes + self.limits.request_line:
                    self.reject(431, "header_too_large")
        finally:
            self.head_read = None

    def _h2_prior_knowledge(self, data: bytes) -> bool:
        """llhttp stops at the HTTP/2 preface; on a cleartext listener that allows it, HTTP/2 takes over."""
        http2 = self.runtime.config.http2
        if self.scheme != "http" or not http2.enabled or not http2.cleartext:
            return False
        from bastion.http.h2_server import start_h2

        self.parsing = None
        start_h2(self, data)
        return True

    # -- httptools callbacks ----------------------------------------------------------------------------
    def on_message_begin(self):
        now = monotonic()
        ex = Exchange(self, now, self.client_ip, self.scheme)
        self.parsing = ex
        self.in_head = True
        self.head_seen = 0
        self.url = b""
        self.raw_headers = []
        self.trailers.clear()
        self.host_count = 0
        self.connection_tokens = None
        if self.active is None:
            self.deadline = now + self.timeouts.client_header
            self.deadline_kind = DL_HEADER

    def on_url(self, url: bytes):
        self.url += url
        if len(self.url) > self.runtime.request_line_limit:
            raise RequestRejected(414, "request_line_too_long")

    def on_header(self, name: bytes, value: bytes):
        # Only collect here: one pass over the list at the end of the head is cheaper than work per call.
        raw = self.raw_headers
        if len(raw) >= self.max_headers:
            raise RequestRejected(431, "too_many_headers")
        raw.append((name, value))

    def _take_headers(self, ex) -> None:
        raw = ex.raw_headers = self.raw_headers
        self.raw_headers = self.trailers  # fields after the body (trailers) are not forwarded
        limits = self.limits
        size = 0
        kept = []
        for pair in raw:
            name, value = pair
            size += len(name) + len(value) + 4
            lname = name.lower()
            if lname not in _SPECIAL:
                kept.append(pair)
                continue
            if lname == b"host":
                self.host_count += 1
                ex.host_header = value
                kept.append(pair)
            elif lname == b"content-length":
                ex.content_length = int(value)
                kept.append(pair)
            elif lname == b"transfer-encoding":
                ex.chunked = True  # llhttp accepts only a final "chunked"
            elif lname == b"connection":
                tokens = value.lower()
                self.connection_tokens = tokens if self.connection_tokens is None else self.connection_tokens + b"," + tokens
            elif lname == b"upgrade":
                ex.upgrade = value.strip().lower()
            elif lname == b"expect":
                if value.strip().lower() != b"100-continue":
                    raise RequestRejected(417, "bad_expect")
                ex.expect_continue = True
            elif lname == b"x-request-id":
                if 0 < len(value) <= 200:
                    ex.incoming_request_id = value
                    kept.append(pair)
            elif lname in _VIA_HEADERS:
                ex.via_proxy = True
                kept.append(pair)
            # the remaining hop-by-hop headers are dropped here
        if size > limits.header_bytes:
            raise RequestRejected(431, "header_too_large")
        ex.headers = kept

    def on_headers_complete(self):
        self.in_head = False
        ex = self.parsing
        self._take_headers(ex)
        parser = self.parser
        keep_alive = ex.keep_alive = parser.should_keep_alive()
        tokens = self.connection_tokens
        if keep_alive and tokens is None:
            # llhttp accepts only 0.9, 1.0, 1.1 and 2.0, and without a Connection header only 1.1 keeps the
            # connection alive; get_http_version() formats a string and is ten times slower than this.
            version = "1.1"
        else:
            version = parser.get_http_version()
        if version != "1.1":
            if version == "1.0":
                if ex.chunked:
                    raise RequestRejected(400, "transfer_encoding_in_http10")
            elif version.startswith("0."):
                raise RequestRejected(400, "http09")
            else:
                raise RequestRejected(400, "http_version")
            ex.http_version = version
        ex.method = parser.get_method()
        if tokens is not None:
            named = {t.strip() for t in tokens.split(b",")} - _NOT_PROXY_TOKENS
            if named:
                ex.headers = [(n, v) for n, v in ex.headers if n.lower() not in named]
            if ex.upgrade is not None and b"upgrade" not in tokens:
                ex.upgrade = None
        elif ex.upgrade is not None:
            ex.upgrade = None
        if self.host_count > 1:
            raise RequestRejected(400, "duplicate_host")
        target = ex.target = self.url
        if target[:1] == b"/":
            path, _, ex.query = target.partition(b"?")
        elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            path = self._absolute_form(ex, target)
        elif target == b"*" and ex.method == b"OPTIONS":
            path = b"*"
        else:
            raise RequestRejected(400, "bad_target")
        # (partition, not `in` or find: `in` on bytes first tries its operand as an int and formats a TypeError;
        # find, endswith and the like parse their arguments through PyArg_ParseTuple; partition does neither)
        if path.partition(b"/.")[1]:
            path = normalize_path(path)
        ex.path = path
        if self.host_count == 0:
            if version == "1.1":
                raise RequestRejected(400, "missing_host")
        else:
            host = ex.host_header.strip().lower()
            name, colon, _ = host.rpartition(b":")
            ex.host = name if colon and host[-1:] != b"]" else host  # without its port
        self.requests += 1
        if self.requests >= self.runtime.requests_per_connection:
            self.close_after = True
        if ex.content_length or ex.chunked:
            ex.body_chunks = []
        elif not parser.should_upgrade():
            ex.request_complete = True
        if self.head_read is not None:
            self._remember_request(ex)
        if self.active is None:
            self.active = ex
            if ex.body_chunks is not None:
                self.deadline = monotonic() + self.timeouts.client_body
                self.deadline_kind = DL_BODY
            else:
                self.deadline = 0.0
                self.deadline_kind = DL_NONE
            engine.start(self, ex, self.runtime)
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)

    # -- request heads seen before ---------------------------------------------------------------------
    # Clients repeat their request heads byte for byte (API clients, health checks, load balancers); a read
    # that is exactly a head seen before takes what parsing and checking it gave (the parser, which never
    # sees it, stays between messages). Only plain cases are remembered: HTTP/1.1 keep-alive, origin-form
    # target, one Host, no Connection, Upgrade, Expect or body.
    def _remember_request(self, ex) -> None:
        data = self.head_read
        self.head_read = None
        if (ex.keep_alive and ex.http_version == "1.1" and self.connection_tokens is None and ex.upgrade is None
                and not ex.expect_continue and not ex.content_length and not ex.chunked and self.host_count == 1
                and ex.target[:1] == b"/" and self.active is None):
            lines = b"".join([name + b": " + value + b"\r\n" for name, value in ex.headers])
            self.known_heads.remember_request(data, KnownRequest(ex, lines))

    def _absolute_form(self, ex, target: bytes) -> bytes:
        rest = target.split(b"://", 1)[1]
        authority, slash, remainder = rest.partition(b"/")
        if not authority or (ex.host_header and authority.lower() != ex.host_header.strip().lower()):
            raise RequestRejected(400, "absolute_form_other_host")
        if not ex.host_header:
            ex.host_header = authority
            ex.headers.append((b"Host", authority))
            self.host_count = 1
        path, _, ex.query = (b"/" + remainder).partition(b"?")
        return path

    def on_body(self, body: bytes):
        ex = self.parsing
        if ex is None or ex.discard_body:
            return
        ex.bytes_in += len(body)
        if ex.route is not None and ex.bytes_in > ex.route.body_limit:
            raise RequestRejected(413, "body_too_large")
        if ex is self.active:
            self.deadline = monotonic() + self.timeouts.client_body
        self._take_body(ex, body)

    def _take_body(self, ex, body: bytes) -> None:
        """A piece of a request body (HTTP/1.1 or an HTTP/2 stream): on to the backend once one is attached,
        else kept, for a filter awaiting the whole body, for the prefetch, or until a backend is ready."""
        if ex is self.active and self.upstream_ready:
            up = self.upstream
            if ex.chunked:
                up.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
            else:
                up.transport.write(body)
            ex.body_sent = True
            return
        ex.body_chunks.append(body)
        ex.body_buffered += len(body)
        if ex.body_waiter is not None:
            if ex.body_buffered > ex.body_waiter[1]:
                self._answer_body_waiter(ex, None)
            return
        if ex is self.active and ex.waiting_body and ex.body_buffered >= BODY_PREFETCH:
            ex.waiting_body = False
            self._connect_or_attach(ex, ex.peer)
        elif ex.body_buffered >= BODY_BUFFER_PAUSE:
            self._pause(PAUSE_BUFFER)

    def on_message_complete(self):
        ex = self.parsing
        if ex is None:
            return
        self.parsing = None
        ex.request_complete = True
        if ex.body_waiter is not None:
            self._answer_body_waiter(ex, b"".join(ex.body_chunks))
        if self.active is None:
            # Answered before its end arrived (a local response): now the connection is idle.
            if not self.close_after and not self.closed and self.deadline_kind != DL_LINGER:
                self.deadline = monotonic() + self.timeouts.keepalive
                self.deadline_kind = DL_IDLE
            return
        if ex is self.active:
            if self.deadline_kind == DL_BODY:
                self.deadline = 0.0
                self.deadline_kind = DL_NONE
            if self.upstream_ready:
                if ex.chunked:
                    self.upstream.transport.write(_CHUNK_END)
                elif ex.body_chunks is not None and ex.route.upstream.http2:
                    self.upstream.end_request()
            elif ex.waiting_body:
                ex.waiting_body = False
                self._connect_or_attach(ex, ex.peer)
        else:
            # A pipelined request waits its turn; read no further until it has one.
            self._pause(PAUSE_PIPELINE)

    def _after_upgrade_request(self, rest: bytes) -> None:
        ex = self.active
        if ex is not None and ex.upgrade is not None and ex.route is not None and ex.route.allows_upgrade(ex.upgrade):
            self.upgrading = True
            self.tunnel_pending = [rest] if rest else []
            self._pause(PAUSE_TUNNEL)
        elif rest:
            self.data_received(rest)

    # -- a request filter waiting for the whole body ----------------------------------------------------
    def read_body(self, ex, limit: int):
        """See Exchange.read_body. The async filter holds reading (PAUSE_HOLD); it is let go while the
        body arrives and taken again once the waiter has its answer."""
        future = self.loop.create_future()
        if ex.body_chunks is None:
            future.set_result(b"")
        elif ex.body_buffered > limit or (ex.content_length is not None and ex.content_length > limit):
            future.set_result(None)
        elif ex.request_complete:
            future.set_result(b"".join(ex.body_chunks))
        else:
            ex.body_waiter = (future, limit)
            if ex.expect_continue:
                ex.expect_continue = False
                self.send_continue()
            # Reading may also have stopped because much of the body was buffered before the filter asked.
            self._resume(PAUSE_HOLD | PAUSE_BUFFER)
        return future

    def _answer_body_waiter(self, ex, body) -> None:
        future = ex.body_waiter[0]
        ex.body_waiter = None
        if not self.closed:
            self._pause(PAUSE_HOLD)
        if not future.done():
            future.set_result(body)

    def _drop_body_waiter(self, ex) -> None:
        if ex is not None and ex.body_waiter is not None:
            future = ex.body_waiter[0]
            ex.body_waiter = None
            future.cancel()

    # -- forwarding -------------------------------------------------------------------------------------
    def send_continue(self) -> None:
        self._send(_CONTINUE)

    def forward(self, ex: Exchange, peer: Peer) -> None:
        """Called by the engine once filters ran and a peer is chosen."""
        route: CompiledRoute = ex.route
        group: UpstreamGroup = route.upstream
        if group.http2:
            h2_upstream.forward(self, ex, peer)
            return
        if not ex.request_complete:
            if ex.expect_continue:
                self.send_continue()
            if ex.body_chunks is not None and ex.body_buffered < BODY_PREFETCH:
                ex.waiting_body = True
                return
        now = monotonic()
        up = peer.acquire(now) if peer.idle else None
        if up is not None:
            self._attach(ex, up, True, now)
        else:
            self._new_connection(ex, peer)

    def _new_connection(self, ex, peer) -> None:
        group = ex.route.upstream
        if not group.may_connect():
            engine.end_attempt(ex)
            ex.error = "circuit_open"
            engine.respond_error(self, ex, 503, retry_after=1)
            return
        group.pending += 1
        self.loop.create_task(self._connect(ex, peer))

    def _connect_or_attach(self, ex, peer, fresh: bool = False) -> None:
        if ex.route.upstream.http2:
            h2_upstream.forward(self, ex, peer)
            return
        up = None if fresh else peer.acquire(monotonic())
        if up is not None:
            self._attach(ex, up, True)
        else:
            self._new_connection(ex, peer)

    async def _connect(self, ex, peer) -> None:
        try:
            await self._open(ex, peer)
        finally:
            ex.route.upstream.pending -= 1

    async def _open(self, ex, peer) -> None:
        route = ex.route
        try:
            if peer.tls is None:
                connecting = self.loop.create_connection(lambda: UpstreamConnection(peer), peer.host, peer.port)
            else:
                connecting = self.loop.create_connection(lambda: UpstreamConnection(peer), peer.host, peer.port,
                                                         ssl=peer.tls, server_hostname=peer.server_name)
            _, up = await asyncio.wait_for(connecting, route.connect_timeout)
        except (asyncio.TimeoutError, OSError) as exc:
            self._upstream_error(ex, *connect_failure(exc, peer))
            return
        if self.closed or self.active is not ex:
            up.close()
            return
        self._attach(ex, up, False)

    def _attach(self, ex: Exchange, up: UpstreamConnection, reused: bool, now: float = 0.0) -> None:
        self.upstream = up
        up.reused = reused
        up.owner = self
        up.got_bytes = False
        up.head_done = False
        up.head_bytes = 0
        up.head_request = ex.method == b"HEAD"
        if not now:
            now = monotonic()
        ex.upstream_start = now
        route: CompiledRoute = ex.route
        up.read_timeout = route.try_timeout
        up.deadline = now + up.read_timeout
        head = ex.upstream_head
        if head is None:
            head = ex.upstream_head = self._build_upstream_head(ex)
        chunks = ex.body_chunks
        if chunks:
            if ex.chunked:
                parts = [head]
                for c in chunks:
                    parts.append(b"%x\r\n" % len(c))
                    parts.append(c)
                    parts.append(b"\r\n")
                if ex.request_complete:
                    parts.append(_CHUNK_END)
                up.transport.write(b"".join(parts))
            else:
                up.transport.write(head + b"".join(chunks))
            ex.body_sent = True
            if not ex.request_complete:
                ex.body_chunks = []
                ex.body_buffered = 0
            # complete bodies stay buffered (they are small) so a stale pooled connection can be retried
        elif ex.chunked and ex.request_complete:
            up.transport.write(head + _CHUNK_END)
        else:
            up.transport.write(head)
        self.upstream_ready = True
        if self.paused:
            self._resume(PAUSE_BUFFER)
        if self.write_paused:
            up.pause()

    def _build_upstream_head(self, ex: Exchange) -> bytes:
        known = ex.known
        if known is not None and ex.headers == known.headers:
            # a remembered request head whose fields the filters left as they were: its lines are written
            # out (remembered heads have no body, Upgrade or Connection), and the whole head is kept for
            # the next time, when nothing a filter may change was changed
            peer: Peer = ex.peer
            keep_alive = peer.max_idle != 0
            kept = (keep_alive and ex.upstream_path is None and ex.path is known.path and ex.query is known.query
                    and ex.method is known.method)
            if kept and known.upstream_head is not None:
                return known.upstream_head
            head = (ex.method + b" " + ex.upstream_target() + b" HTTP/1.1\r\n" + known.lines
                    + (b"\r\n" if keep_alive else b"Connection: close\r\n\r\n"))
            if kept:
                known.upstream_head = head
            return head
        parts = [ex.method, b" ", ex.upstream_target(), b" HTTP/1.1\r\n"]
        for name, value in ex.headers:
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        if ex.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if ex.upgrade is not None and ex.route.allows_upgrade(ex.upgrade):
            parts.append(b"Connection: upgrade\r\nUpgrade: ")
            parts.append(ex.upgrade)
            parts.append(b"\r\n")
        elif ex.peer.max_idle == 0:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    # -- events from the backend connection ---------------------------------------------------------------
    def upstream_interim(self, up, status: int, headers) -> None:
        ex = self.active
        if ex is None or ex.http_version != "1.1" or status == 100:
            return  # Bastion answers Expect itself; other 1xx go to HTTP/1.1 clients only
        parts = [status_line(status)]
        for n, v in headers:
            parts += (n, b": ", v, b"\r\n")
        parts.append(b"\r\n")
        self._send(b"".join(parts))

    def upstream_head(self, up, status: int, headers, framing: int) -> None:
        ex = self.active
        if status >= 502 and ex.attempting and ex.route.upstream.retry_on and str(status) in ex.route.upstream.retry_on:
            peer = engine.next_peer_for_retry(ex, str(status), sent=True)
            if peer is not None:
                # Drop this answer (and its connection: its body will not be read) and try the next peer.
                self.upstream = None
                self.upstream_ready = False
                up.owner = None
                up.abort()
                engine.end_attempt(ex)
                group = ex.route.upstream
                group.record_success(ex.peer, status, None, monotonic())
                log.info("retrying %s on %s after status %d", ex.request_id, peer.address, status)
                engine.begin_attempt(ex, peer, group)
                self._connect_or_attach(ex, peer)
                return
        ex.status = status
        ex.response_headers_raw = headers
        if engine.run_response_filters(ex) is not None:
            # A filter answered in place of the backend (its Response is in ex.replacement): the backend's
            # body is read and dropped, and the replacement goes out when that body is over.
            return
        if framing == FRAMING_LENGTH and ex.route.on_response_body and not _has_content_length(ex.response_headers_raw):
            framing = FRAMING_CHUNKED  # a body filter changes the length
        if framing == FRAMING_NONE or ex.method == b"HEAD":
            chunked = False
        elif framing == FRAMING_CHUNKED or framing == FRAMING_CLOSE:
            chunked = ex.http_version == "1.1"
            if not chunked:
                self.close_after = True
        else:
            chunked = False
        if ex.upgrade is not None and status != 101:
            self.close_after = True
        self.resp_chunked = chunked
        self.resp_started = True
        if (framing == FRAMING_LENGTH and isinstance(up, UpstreamConnection) and up.content_length >= SPLICE_MIN
                and not chunked and not ex.route.on_response_body and ex.method != b"HEAD" and self.writes_h1):
            up.bulk = True  # its body may go around Python once this read is written (try_splice)
        known = up.known_head
        if known is not None and self.writes_h1 and (not ex.route.on_response or ex.response_headers_raw == known[1]):
            # a known backend head that the response filters left as it was: its lines are written out
            self._write_head_lines(ex, known[4], chunked)
            return
        self._write_head(ex, ex.response_headers_raw, chunked, status == 101)

    def upstream_known(self, up: UpstreamConnection, known: tuple, body: bytes) -> None:
        """A whole response from the backend whose head is known (see UpstreamConnection.data_received):
        upstream_head, upstream_body and upstream_complete in one, for the common case; anything else
        takes those three as for a parsed response. (Known heads are 2xx: never retried for their status.)"""
        ex: Exchange = self.active
        route: CompiledRoute = ex.route
        if route.on_response_body or ex.upgrade is not None or not ex.request_complete or not self.writes_h1:
            self.out = []
            up.report_known(self, known, body)
            self._flush()
            return
        ex.status = status = known[0]
        changed = False
        if route.on_response and route.response_phase_runs(status):
            ex.response_headers_raw = list(known[1])  # filters may change the list they are given
            if engine.run_response_filters(ex) is not None:
                # a filter's answer in place of the backend's: the body is dropped, the answer goes out
                self.upstream_complete(up, known[3])
                return
            changed = ex.response_headers_raw != known[1]
        else:
            ex.response_headers_raw = known[1]  # only read from now on (in the log phase)
        if changed:
            self._write_head(ex, ex.response_headers_raw, False)
            head = b""
        elif (ex.status == status and ex.keep_alive and ex.http_version == "1.1" and not self.close_after
                and not self.runtime.draining):
            head = known[5]  # the whole head, as _head_end would end it
        else:
            head = status_line(ex.status) + known[4] + self._head_end(ex)
        self.resp_started = True
        # (resp_chunked stays False: a known head has a Content-Length)
        if body:
            ex.bytes_out += len(body)
            head += body
        if head and not self.closed:
            self.transport.write(head)
        self._end_exchange(ex, self._upstream_done(ex, up, known[3]))

    def _write_head_lines(self, ex, lines: bytes, chunked: bool) -> None:
        """_write_head for header lines written out before (a known backend head; never an upgrade)."""
        if chunked:
            lines += b"Transfer-Encoding: chunked\r\n"
        self._send(status_line(ex.status) + lines + self._head_end(ex))

    def _head_end(self, ex) -> bytes:
        """The end of a response head written from prebuilt lines: the Connection field, then the blank line."""
        if self.close_after or not ex.keep_alive or self.runtime.draining:
            self.close_after = True
            return b"Connection: close\r\n\r\n"
        if ex.http_version == "1.0":
            return b"Connection: keep-alive\r\n\r\n"
        return b"\r\n"

    def _write_head(self, ex, headers, chunked: bool, upgrade: bool = False) -> None:
        parts = [status_line(ex.status)]
        for name, value in headers:
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        if chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if upgrade:
            parts.append(b"Connection: upgrade\r\n")
        elif self.close_after or not ex.keep_alive or self.runtime.draining:
            self.close_after = True
            parts.append(b"Connection: close\r\n")
        elif ex.http_version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self._send(b"".join(parts))

    def upstream_body(self, body: bytes) -> None:
        ex = self.active
        if ex.route.on_response_body:
            if ex.replacement is not None:
                return
            body = engine.run_body_filters(ex, body, False)
            if not body:
                return
        elif ex.replacement is not None:
            return
        ex.bytes_out += len(body)
        if self.resp_chunked:
            self._sendv((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            self._send(body)

    def try_splice(self, up: UpstreamConnection) -> None:
        """Called after a backend read that wrote part of a large body (see upstream_head): the rest of the
        body goes from socket to socket in the kernel (bastion/http/splice.py) when both are plain TCP."""
        ex = self.active
        if ex is None or up is not self.upstream or self.closed or up.between or ex.replacement is not None:
            up.bulk = False
            return
        remaining = up.content_length - ex.bytes_out
        if remaining < SPLICE_MIN or not plain_tcp(self.transport) or not plain_tcp(up.transport):
            up.bulk = False
            return
        if self.transport.get_write_buffer_size():
            return  # what was written must leave first; asked again after the next read
        up.bulk = False
        splice = BodySplice(self, up, remaining)
        self.splice = splice
        if not splice.start():
            self.splice = None

    def splice_finished(self, splice: BodySplice, error: str | None) -> None:
        """The spliced body is over (error None), or one side failed ("upstream_reset_midway" for the
        backend, "client_closed" for the client)."""
        if self.splice is not splice:
            return
        self._splice_over(splice)
        up = splice.up
        if error is None:
            up.spliced()
            self.upstream_complete(up, up.keep_alive)
        elif error == "client_closed":
            self.transport.abort()  # connection_lost follows, and lets the backend connection go
        else:
            self.upstream_failed(up, error)
            up.close()

    def _splice_over(self, splice: BodySplice) -> None:
        """What a splice moved is counted, for the exchange and the metric."""
        self.splice = None
        ex = self.active
        if ex is not None:
            ex.bytes_out += splice.moved
        metrics = self.runtime.metrics
        if metrics is not None:
            metrics.spliced_bytes += splice.moved

    def upstream_complete(self, up, reusable: bool) -> None:
        ex = self.active
        if ex is None or up is not self.upstream:
            return
        if ex.route.on_response_body and ex.replacement is None and self.resp_started:
            tail = engine.run_body_filters(ex, b"", True)
            if tail and ex.method != b"HEAD":
                ex.bytes_out += len(tail)
                if self.resp_chunked:
                    self._sendv((b"%x\r\n" % len(tail), tail, b"\r\n"))
                else:
                    self._send(tail)
        if self.resp_chunked:
            self._send(_CHUNK_END)
        now = self._upstream_done(ex, up, reusable and ex.request_complete)
        if not ex.request_complete:
            # The backend answered before the body was in; the rest of it is not worth reading.
            self.close_after = True
            ex.discard_body = True
        if ex.replacement is not None:
            self.write_local_response(ex, ex.replacement.body)
            return
        self._end_exchange(ex, now)

    def _upstream_done(self, ex: Exchange, up: Any, reusable: bool) -> float:
        """The backend connection owes nothing more for this exchange: it is let go (to the pool when
        `reusable`), and the attempt ends (in-flight counts, passive health). Returns the time."""
        self.upstream = None
        self.upstream_ready = False
        now = monotonic()
        ex.upstream_time = now - ex.upstream_start
        if isinstance(up, UpstreamConnection):
            h1: UpstreamConnection = up  # (typed: its fields are read natively, not looked up by name)
            h1.owner = None
            h1.deadline = 0.0
            if h1.paused:
                h1.resume()
            alive = h1.alive
        else:  # an HTTP/2 backend stream (bastion/http/h2_upstream.py)
            up.owner = None
            up.deadline = 0.0
            if up.paused:
                up.resume()
            alive = up.alive
        if ex.attempting:
            ex.attempting = False
            peer: Peer = ex.peer
            peer.active -= 1
            route: CompiledRoute = ex.route
            group: UpstreamGroup = route.upstream
            group.active -= 1
            if group.watch_success:
                group.record_success(peer, ex.status, ex.upstream_time, now)
            elif peer.fails:
                peer.fails = 0
        if reusable and alive:
            peer = ex.peer
            peer.release(up, now)
        else:
            up.close()
        return now

    def upstream_failed(self, up, reason: str) -> None:
        ex = self.active
        if ex is None or up is not self.upstream:
            return
        self.upstream = None
        self.upstream_ready = False
        up.detach()
        if (
            not up.got_bytes
            and up.reused
            and reason == "upstream_reset"
            and engine.retryable(ex)
            and (ex.request_complete and (not ex.body_sent or ex.body_chunks))
        ):
            # The backend closed a pooled connection just as we reused it: try once on a new one.
            self._connect_or_attach(ex, ex.peer, fresh=True)
            return
        if reason == "upstream_timeout":
            status = 504
        else:
            status = 502
        self._upstream_error(ex, status, reason)

    def _upstream_error(self, ex, status: int, reason: str) -> None:
        if self.active is not ex or self.closed:
            return
        now = monotonic()
        group = ex.route.upstream
        if ex.attempting:
            engine.end_attempt(ex)
            group.record_failure(ex.peer, now)
            kind = engine.RETRY_KINDS.get(reason)
            if kind is not None and not self.resp_started:
                peer = engine.next_peer_for_retry(ex, kind, sent=kind != "connect_failure")
                if peer is not None:
                    log.info("retrying %s on %s after %s", ex.request_id, peer.address, reason)
                    engine.begin_attempt(ex, peer, group)
                    self._connect_or_attach(ex, peer)
                    return
        ex.upstream_time = now - ex.upstream_start if ex.upstream_start else None
        if ex.replacement is not None and not self.resp_started:
            # The head that was replaced arrived; only its (dropped) body failed: the replacement stands.
            if not ex.request_complete:
                self.close_after = True
                ex.discard_body = True
            self.write_local_response(ex, ex.replacement.body)
            return
        ex.error = reason
        if self.resp_started:
            # Part of the response is out: the only honest signal left is to cut the connection.
            if self.out is not None:
                self.out.clear()
                self.out = None
            self.transport.abort()
            return
        if not ex.request_complete:
            self.close_after = True
            ex.discard_body = True
        engine.respond_error(self, ex, status)

    def upstream_switched(self, up, rest: bytes) -> None:
        """The backend agreed to an Upgrade: from now on bytes flow both ways untouched."""
        ex = self.active
        self.tunnel = up
        self.upstream = None
        self.upgrading = False
        self.deadline = 0.0
        self.deadline_kind = DL_TUNNEL
        self.last_active = monotonic()
        if rest:
            self._send(rest)
        pending = self.tunnel_pending or []
        self.tunnel_pending = None
        for data in pending:
            up.transport.write(data)
        self._resume(PAUSE_TUNNEL | PAUSE_PIPELINE | PAUSE_BUFFER)
        self.worker.tunnel_opened(self)

    def tunnel_from_upstream(self, data: bytes) -> None:
        self.last_active = monotonic()
        self.active.bytes_out += len(data)
        self._send(data)

    def tunnel_closed_by_upstream(self) -> None:
        self._flush()
        self.tunnel = None
        self._finish_tunnel()
        self.transport.close()

    def _finish_tunnel(self) -> None:
        ex = self.active
        self.worker.tunnel_closed(self)
        if ex is not None:
            self.active = None
            engine.end_attempt(ex)
            engine.finish(ex)

    # -- local answers and the end of an exchange ----------------------------------------------------------
    def write_local_response(self, ex, body: bytes | FileBody) -> None:
        status = ex.status
        headers = ex.response_headers_raw
        if status >= 200 and status not in (204, 304):
            headers.append((b"Content-Length", b"%d" % len(body)))
        if not ex.request_complete:
            ex.discard_body = True
            self.close_after = True
        self.resp_started = True
        self._write_head(ex, headers, False)
        if body and ex.method != b"HEAD":
            if type(body) is FileBody:
                self.loop.create_task(self._send_file(ex, body))
                return
            self._send(body)
            ex.bytes_out += len(body)
        if self.upgrading:
            self.upgrading = False
            self.close_after = True
        self._end_exchange(ex)

    def _output_full(self) -> bool:
        """Whether a file body must wait before sending more (resume_writing wakes it)."""
        return self.write_paused

    async def _send_file(self, ex, body: FileBody) -> None:
        """Send a file body in pieces, waiting whenever the client's socket buffer is full."""
        self._flush()
        try:
            with open(body.path, "rb") as f:
                f.seek(body.offset)
                left = body.size
                while left > 0 and not self.closed:
                    piece = f.read(min(left, 256 * 1024))
                    if not piece:
                        break  # the file shrank under us: the client sees a short body and a close
                    left -= len(piece)
                    ex.bytes_out += len(piece)
                    self._send(piece)
                    if self._output_full():
                        self.drained = self.loop.create_future()
                        await self.drained
        except OSError as exc:
            log.warning("reading %s for a response failed: %s", body.path, exc)
            left = 1
        if self.closed:
            return
        if left > 0:
            ex.error = "file_read_failed"
            self.transport.abort()
            return
        if self.upgrading:
            self.upgrading = False
            self.close_after = True
        self._end_exchange(ex)

    def write_local_wire(self, ex, response) -> None:
        """A local response whose header lines are prebuilt (a cache hit): one write, nothing rebuilt."""
        whole = response.whole
        if (whole is not None
                # a remembered head is a complete HTTP/1.1 keep-alive request
                and (ex.known is not None or (ex.request_complete and ex.keep_alive and ex.http_version == "1.1"))
                and ex.method != b"HEAD" and not self.close_after and not self.upgrading
                and not self.runtime.draining):
            # the common case, written in one piece as it was prepared
            ex.bytes_out += len(response.body)
            out = self.out
            if out is None:
                self.transport.write(whole)
            else:
                out.append(whole)
            self._end_exchange(ex)
            return
        if not ex.request_complete:
            ex.discard_body = True
            self.close_after = True
        self.resp_started = True
        end = self._head_end(ex)
        body = response.body
        if body and ex.method != b"HEAD":
            ex.bytes_out += len(body)
            if len(body) <= 16384:
                self._send(response.wire + end + body)
            else:
                self._sendv((response.wire + end, body))
        else:
            self._send(response.wire + end)
        if self.upgrading:
            self.upgrading = False
            self.close_after = True
        self._end_exchange(ex)

    def _end_exchange(self, ex: Exchange, now: float = 0.0) -> None:
        self.active = None
        self.resp_started = False
        self.resp_chunked = False
        ex.end = now or monotonic()
        route = ex.route
        if route is not None:
            for f in route.on_log:  # the log phase (engine.finish), inline: it runs for every request
                try:
                    f(ex)
                except Exception:
                    log.exception("logging filter %r failed", f)
        if self.closed:
            return
        if self.close_after:
            self.lingering_close()
            return
        queue = self.queue
        if queue:
            nxt = queue.popleft()
            self.active = nxt
            self.deadline = 0.0
            self.deadline_kind = DL_NONE
            self._resume(PAUSE_PIPELINE)
            engine.start(self, nxt, self.runtime)
            return
        if self.paused:
            self._resume(PAUSE_PIPELINE)
        if self.runtime.draining and self.parsing is None:
            self.lingering_close()
            return
        now = ex.end
        self.last_active = now
        if self.parsing is None:
            self.deadline = now + self.runtime.keepalive_timeout
            self.deadline_kind = DL_IDLE

    def reject(self, status: int, reason: str) -> None:
        """A request Bastion will not process: answer, close, forward nothing."""
        if self.closed or self.deadline_kind == DL_LINGER:
            return
        up = self.upstream
        if up is not None:
            self.upstream = None
            self.upstream_ready = False
            up.abort()
        self.queue = None
        ex = self.parsing or self.active
        self._drop_body_waiter(ex)
        if ex is None:
            ex = Exchange(self, monotonic(), self.client_ip, self.scheme)
        if self.active is not None and self.active is not ex:
            self.active.error = "connection_rejected"
            engine.finish(self.active)
        self.active = ex
        self.parsing = None
        if ex.route is None:
            ex.route = self.runtime.fallback_route
        if not ex.method:
            ex.method = b"-"
            ex.target = self.url
        ex.error = reason
        ex.keep_alive = False
        self.close_after = True
        if self.resp_started:
            self.transport.abort()
            return
        engine.respond_error(self, ex, status)

    def lingering_close(self) -> None:
        """Close without losing what was written: stop sending, read and drop what the client still
        sends for a moment, then close. Closing with unread input would send a reset."""
        if self.closed or self.deadline_kind == DL_LINGER:
            return
        self._flush()
        self.deadline_kind = DL_LINGER
        self.deadline = monotonic() + 2.0
        self.paused = 0
        try:
            self.transport.resume_reading()
        except Exception:  # noqa: BLE001 - a closing transport cannot be resumed; nothing to do
            pass
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()

    # -- timers (called by the worker's sweep) --------------------------------------------------------------
    def check_deadline(self, now: float) -> None:
        kind = self.deadline_kind
        if kind == DL_BODY and not self.paused:
            ex = self.active
            rate = ex.route.body_min_rate if ex is not None and ex.route is not None else 0
            if rate:
                # A body that trickles in (slow-body attacks) is cut once its average rate, counted from
                # the end of the grace period, falls below the minimum.
                late = now - ex.start - self.limits.body_min_rate_after
                if late > 0 and ex.bytes_in < rate * late:
                    from bastion.security.stats import node_stats

                    node_stats().count("client_body_too_slow")
                    self.reject(408, "client_body_too_slow")
                    return
        if kind == DL_TUNNEL:
            ex = self.active
            idle = ex.route.websocket_idle if ex is not None and ex.route is not None else self.timeouts.websocket_idle
            if now - self.last_active >= idle:
                tunnel = self.tunnel
                self.tunnel = None
                if tunnel is not None:
                    tunnel.owner = None
                    tunnel.close()
                self._finish_tunnel()
                self.transport.close()
            return
        if self.deadline and now >= self.deadline:
            if kind == DL_IDLE:
                self.lingering_close()
            elif kind == DL_LINGER:
                self.transport.close()
            elif kind == DL_HEADER:
                if self.parsing is not None:
                    self.reject(408, "client_header_timeout")
                else:
                    self.transport.close()
            elif kind == DL_BODY:
                self.reject(408, "client_body_timeout")
            return
        up = self.upstream
        if up is not None and up.reads != up.seen_reads:
            # The backend sent something since the last sweep: its read timeout starts again.
            up.seen_reads = up.reads
            up.deadline = now + up.read_timeout
        elif up is not None and up.deadline and now >= up.deadline:
            self.upstream = None
            self.upstream_ready = False
            up.abort()
            ex = self.active
            if ex is not None:
                self._upstream_error(ex, 504, "upstream_timeout")

    def drain(self, now: float) -> None:
        """Stop keeping this connection alive: idle ones close now, busy ones after their response."""
        self.close_after = True
        if self.active is None and self.parsing is None and self.tunnel is None:
            if now - self.last_active > 0.2:
                self.lingering_close()
            else:
                # A request may be in flight towards us: give it a moment before closing.
                self.deadline = min(self.deadline or now + 1.0, now + 1.0)
                self.deadline_kind = DL_IDLE


def _has_content_length(headers) -> bool:
    for name, _ in headers:
        if len(name) == 14 and name.lower() == b"content-length":
            return True
    return False


def _parser_reason(exc: Exception) -> str:
    text = str(exc).lower()
    if "content-length" in text:
        return "bad_content_length"
    if "transfer-encoding" in text:
        return "bad_transfer_encoding"
    if "chunk" in text:
        return "bad_chunk"
    if "header" in text:
        return "bad_header"
    if "method" in text:
        return "bad_method"
    if "url" in text:
        return "bad_target"
    return "bad_request"


class ProxyProtocolConnection(ClientConnection):
    """A connection on a listener with `proxy_protocol`: a PROXY v1/v2 header comes first and gives the
    client's address; HTTP starts after it. Connection-level security waits for that address."""

    __slots__ = ("proxy_buffer",)

    waits_for_proxy_header = True

    def __init__(self, worker, runtime, listener=None):
        super().__init__(worker, runtime, listener)
        self.proxy_buffer: bytes | None = b""

    def data_received(self, data: bytes):
        buffer = self.proxy_buffer
        if buffer is None:
            ClientConnection.data_received(self, data)
            return
        from bastion.security import proxy_protocol

        buffer += data
        try:
            result = proxy_protocol.parse(buffer)
        except proxy_protocol.ProxyProtocolError as exc:
            log.info("closing a connection from %s: %s", self.client_ip, exc)
            self.transport.abort()
            return
        if result is None:
            self.proxy_buffer = buffer
            return
        address, used = result
        self.proxy_buffer = None
        if address is not None:
            self.client_ip = address
        guard = self.runtime.connection_guard
        if guard is not None and not self.admit(guard):
            return
        rest = buffer[used:]
        if rest:
            ClientConnection.data_received(self, rest)
