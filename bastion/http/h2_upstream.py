"""The backend side of HTTP/2, for upstreams with `protocol: h2` (gRPC and other HTTP/2-only services):
h2 over TLS (ALPN "h2") for https:// servers, h2c with prior knowledge for http:// ones.

One `H2UpstreamConnection` carries many exchanges at once, one stream each; the exchange's client side
holds an `H2UpstreamStream`, which has the attributes and methods the forwarding code uses on an HTTP/1.1
`UpstreamConnection` (owner, pause/resume, abort/close/detach, read-timeout counters) and reports to its
owner through the same calls (upstream_head, upstream_body, upstream_complete, upstream_failed), plus
`upstream_trailers` before completion, so trailers (grpc-status) reach the client.

Connections are kept per peer in this module (not in the HTTP/1.1 idle list, which holds connections
that carry one request at a time) and closed after the upstream's keep-alive idle_timeout without streams.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from bastion.http.h1_upstream import FRAMING_CHUNKED, FRAMING_LENGTH, FRAMING_NONE, connect_failure
from bastion.http.headers import HOP_BY_HOP
from bastion.proxy import engine

log = logging.getLogger("bastion.http2.upstream")

STREAM_WINDOW = 1024 * 1024  # response bytes per stream before Bastion must acknowledge them
CONNECTION_WINDOW = 16 * 1024 * 1024
PENDING_PAUSE = 256 * 1024  # request-body bytes waiting for the backend's window before the client is paused

_CLIENT_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_inbound_headers=True,
    normalize_inbound_headers=True,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)

_pools: dict = {}  # Peer -> [H2UpstreamConnection]
_NOT_FORWARDED = HOP_BY_HOP | {b"host"}  # connection-specific on HTTP/2; Host becomes :authority


def acquire(peer):
    """A connection to this peer that can take one more stream now, or None."""
    conns = _pools.get(peer)
    if conns:
        for conn in conns:
            if conn.has_room():
                return conn
    return None


_connecting: dict = {}  # Peer -> Future of the connection being opened


async def connect(peer, loop, timeout: float):
    """A connection with room for one more stream: exchanges that arrive while one is being opened wait
    for it rather than each opening its own."""
    pending = _connecting.get(peer)
    if pending is not None:
        try:
            await asyncio.wait_for(asyncio.shield(pending), timeout)
        except Exception:  # noqa: BLE001 - that attempt failed; this exchange makes its own below
            pass
        conn = acquire(peer)
        if conn is not None:
            return conn
    future = loop.create_future()
    _connecting[peer] = future
    try:
        conn = await _open(peer, loop, timeout)
    except BaseException as exc:
        if isinstance(exc, Exception):
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
        else:
            future.cancel()
        raise
    else:
        future.set_result(conn)
        return conn
    finally:
        if _connecting.get(peer) is future:
            del _connecting[peer]


async def _open(peer, loop, timeout: float):
    conns = _pools.setdefault(peer, [])
    if peer.tls is None:
        connecting = loop.create_connection(lambda: H2UpstreamConnection(peer, loop), peer.host, peer.port)
    else:
        connecting = loop.create_connection(lambda: H2UpstreamConnection(peer, loop), peer.host, peer.port,
                                            ssl=peer.tls, server_hostname=peer.server_name)
    _, conn = await asyncio.wait_for(connecting, timeout)
    conns.append(conn)
    return conn


# -- forwarding one exchange (for the client side: an HTTP/2 stream or an HTTP/1.1 connection) -------------------


def forward(client, ex, peer) -> None:
    """In place of the HTTP/1.1 forwarding: a stream on a shared connection to the peer, opened now; the
    request body follows in DATA frames as it arrives."""
    ex.chunked = False  # the body goes in DATA frames, not chunks
    if not ex.request_complete and ex.expect_continue:
        client.send_continue()
    conn = acquire(peer)
    if conn is not None:
        attach(client, ex, conn)
        return
    group = ex.route.upstream
    if not group.may_connect():
        engine.end_attempt(ex)
        ex.error = "circuit_open"
        engine.respond_error(client, ex, 503, retry_after=1)
        return
    group.pending += 1
    client.loop.create_task(_connect(client, ex, peer))


async def _connect(client, ex, peer) -> None:
    route = ex.route
    try:
        conn = acquire(peer) or await connect(peer, client.loop, route.connect_timeout)
    except (asyncio.TimeoutError, OSError) as exc:
        client._upstream_error(ex, *connect_failure(exc, peer))
        return
    finally:
        route.upstream.pending -= 1
    if client.closed or client.active is not ex:
        return
    attach(client, ex, conn)


def attach(client, ex, conn) -> None:
    from bastion.http.h1_server import PAUSE_BUFFER

    authority = None
    headers = []
    for name, value in ex.headers:
        lname = name.lower()
        if lname in _NOT_FORWARDED:
            if lname == b"host" and authority is None:
                authority = value
            continue
        headers.append((lname, value))
    # TE is hop-by-hop: on this hop Bastion is the one that takes trailers (gRPC servers insist on it)
    headers.append((b"te", b"trailers"))
    peer = ex.peer
    head = [(b":method", ex.method), (b":scheme", b"https" if peer.tls is not None else b"http"),
            (b":authority", authority or peer.address_bytes), (b":path", ex.upstream_target())]
    trailers = getattr(client, "request_trailers", None)
    chunks = ex.body_chunks
    end = ex.request_complete and not chunks and not trailers
    up = conn.open_stream(client, head + headers, end)
    now = monotonic()
    ex.upstream_start = now
    up.head_request = ex.method == b"HEAD"
    up.read_timeout = ex.route.try_timeout
    up.deadline = now + up.read_timeout
    client.upstream = up
    if chunks:
        for chunk in chunks:
            up.write(chunk)
        ex.body_sent = True
        if not ex.request_complete:
            ex.body_chunks = []
            ex.body_buffered = 0
    if ex.request_complete and not end:
        up.end_request(trailers)
    conn.flush()
    client.upstream_ready = True
    if client.paused:
        client._resume(PAUSE_BUFFER)
    if client.write_paused:
        up.pause()


class H2UpstreamConnection(asyncio.Protocol):
    __slots__ = ("peer", "loop", "transport", "h2", "streams", "alive", "goaway", "idle_timer", "write_paused")

    def __init__(self, peer, loop):
        self.peer = peer
        self.loop = loop
        self.transport = None
        conn = h2.connection.H2Connection(_CLIENT_CONFIG)
        from bastion.http.h2_server import StaticTableEncoder

        conn.encoder = StaticTableEncoder()
        conn.local_settings = h2.settings.Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_CONCURRENT_STREAMS: 100,
            SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
        })
        self.h2 = conn
        self.streams: dict[int, H2UpstreamStream] = {}
        self.alive = True
        self.goaway = False
        self.idle_timer = None
        self.write_paused = False

    # -- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.peer.connections += 1
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()
        self.idle_timer = self.loop.call_later(self.peer.idle_timeout, self._close_if_idle)

    def connection_lost(self, exc):
        self._gone()
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream._failed("upstream_reset")

    def eof_received(self):
        return False

    def pause_writing(self):
        self.write_paused = True
        for stream in self.streams.values():
            owner = stream.owner
            if owner is not None:
                owner.pause_reading_for_upstream()

    def resume_writing(self):
        self.write_paused = False
        for stream in self.streams.values():
            owner = stream.owner
            if owner is not None and not stream.pending:
                owner.resume_reading_for_upstream()

    def _gone(self) -> None:
        if self.alive:
            self.alive = False
            self.peer.connections -= 1
        conns = _pools.get(self.peer)
        if conns is not None:
            try:
                conns.remove(self)
            except ValueError:
                pass
            if not conns:
                _pools.pop(self.peer, None)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.alive:
            self.transport.write(data)

    def has_room(self) -> bool:
        if not self.alive or self.goaway:
            return False
        return self.h2.open_outbound_streams < self.h2.remote_settings.max_concurrent_streams

    def close(self) -> None:
        self._gone()
        if self.transport is not None:
            try:
                self.h2.close_connection()
                self.transport.write(self.h2.data_to_send())
            except h2.exceptions.ProtocolError:
                pass
            self.transport.close()

    def _close_if_idle(self) -> None:
        self.idle_timer = None
        if not self.alive:
            return
        if self.streams:
            self.idle_timer = self.loop.call_later(self.peer.idle_timeout, self._close_if_idle)
        else:
            self.close()

    # -- streams ------------------------------------------------------------------------------------------
    def open_stream(self, owner, headers, end_stream: bool) -> "H2UpstreamStream":
        sid = self.h2.get_next_available_stream_id()
        stream = H2UpstreamStream(self, sid, owner)
        self.streams[sid] = stream
        self.h2.send_headers(sid, headers, end_stream=end_stream)
        if end_stream:
            stream.request_done = True
        return stream

    def data_received(self, data: bytes):
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("HTTP/2 protocol error from %s: %s", self.peer.address, exc)
            self.flush()
            self.close()
            streams = list(self.streams.values())
            self.streams.clear()
            for stream in streams:
                stream._failed("invalid_response")
            return
        for event in events:
            kind = type(event)
            if kind is h2.events.WindowUpdated or kind is h2.events.RemoteSettingsChanged:
                for stream in list(self.streams.values()):
                    if stream.pending:
                        stream.send_pending()
                continue
            if kind is h2.events.ConnectionTerminated:
                self.goaway = True
                last = event.last_stream_id
                for sid, stream in list(self.streams.items()):
                    if last is not None and sid > last:
                        del self.streams[sid]
                        stream._failed("upstream_reset")  # never processed: safe to retry
                continue
            sid = getattr(event, "stream_id", 0)
            stream = self.streams.get(sid) if sid else None
            if stream is None:
                if kind is h2.events.DataReceived:
                    self._ack(event.flow_controlled_length, sid)
                continue
            owner = stream.owner
            if owner is None:
                if kind is h2.events.DataReceived:
                    self._ack(event.flow_controlled_length, sid)
                continue
            # Everything for the client from one event leaves in one write (see ClientConnection.out).
            owner.out = out = []
            try:
                stream.event(event, kind)
            finally:
                if owner.out is out:
                    owner.out = None
                if out and not owner.closed:
                    owner.transport.write(out[0] if len(out) == 1 else b"".join(out))
        self.flush()

    def _ack(self, size: int, sid: int) -> None:
        if size:
            try:
                self.h2.acknowledge_received_data(size, sid)
            except (h2.exceptions.StreamClosedError, KeyError, h2.exceptions.ProtocolError):
                try:
                    self.h2.increment_flow_control_window(size)
                except h2.exceptions.ProtocolError:
                    pass

    def stream_closed(self, stream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]


class H2UpstreamStream:
    """One exchange's stream on a backend HTTP/2 connection, shaped like an UpstreamConnection."""

    __slots__ = (
        "conn", "stream_id", "owner", "alive", "reused", "got_bytes", "head_done", "head_bytes", "head_request",
        "deadline", "read_timeout", "reads", "seen_reads", "paused", "unacked", "pending", "request_done",
        "trailers", "ended", "transport", "peer",
    )
    known_head = None  # (an HTTP/1.1 backend connection's; never here)

    def __init__(self, conn: H2UpstreamConnection, stream_id: int, owner):
        self.conn = conn
        self.peer = conn.peer
        self.stream_id = stream_id
        self.owner = owner
        self.alive = True
        self.reused = False
        self.got_bytes = False
        self.head_done = False
        self.head_bytes = 0
        self.head_request = False
        self.deadline = 0.0
        self.read_timeout = 60.0
        self.reads = 0
        self.seen_reads = 0
        self.paused = False
        self.unacked = 0
        self.pending: list | None = None  # request body waiting for the backend's window
        self.request_done = False
        self.trailers = None  # request trailers to send once pending body bytes are out
        self.ended = False
        self.transport = self  # the client side writes request-body bytes to up.transport

    # -- request body from the client ---------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not data or self.ended:
            return
        if self.pending:
            self.pending.append(data)
        else:
            try:
                self._send(data)
            except h2.exceptions.ProtocolError:
                self.ended = True  # the backend closed the stream meanwhile; its StreamReset tells the owner
                return
        if self.pending and sum(len(p) for p in self.pending) >= PENDING_PAUSE and self.owner is not None:
            self.owner.pause_reading_for_upstream()
        self.conn.flush()

    def writelines(self, parts) -> None:
        self.write(b"".join(parts))

    def _send(self, data: bytes) -> None:
        h2c = self.conn.h2
        sid = self.stream_id
        offset = 0
        size = len(data)
        window = h2c.local_flow_control_window(sid)
        frame = h2c.max_outbound_frame_size
        while offset < size and window > 0:
            n = min(window, frame, size - offset)
            h2c.send_data(sid, data[offset : offset + n])
            offset += n
            window -= n
        if offset < size:
            self.pending = [data[offset:]]

    def end_request(self, trailers=None) -> None:
        """The client's body is complete (with its trailers, if any)."""
        if self.request_done or self.ended:
            return
        self.request_done = True
        if self.pending:
            self.trailers = trailers or []
            return
        try:
            self._end(trailers)
        except h2.exceptions.ProtocolError:
            self.ended = True
            return
        self.conn.flush()

    def _end(self, trailers) -> None:
        h2c = self.conn.h2
        if trailers:
            h2c.send_headers(self.stream_id, [(n.lower(), v) for n, v in trailers], end_stream=True)
        else:
            h2c.end_stream(self.stream_id)

    def send_pending(self) -> None:
        if self.ended:
            self.pending = None
            return
        pending = self.pending
        self.pending = None
        try:
            for i, data in enumerate(pending):
                if self.pending:
                    self.pending.extend(pending[i:])
                    break
                self._send(data)
            if not self.pending and self.request_done and self.trailers is not None:
                trailers, self.trailers = self.trailers, None
                self._end(trailers)
        except h2.exceptions.ProtocolError:
            self.ended = True
            self.pending = None
            return
        if not self.pending:
            owner = self.owner
            if owner is not None and not self.conn.write_paused:
                owner.resume_reading_for_upstream()

    # -- events from the backend ------------------------------------------------------------------------
    def event(self, event, kind) -> None:
        owner = self.owner
        self.reads += 1
        if kind is h2.events.DataReceived:
            self.got_bytes = True
            if self.paused:
                self.unacked += event.flow_controlled_length
            else:
                self.conn._ack(event.flow_controlled_length, self.stream_id)
            if event.data:
                owner.upstream_body(event.data)
        elif kind is h2.events.ResponseReceived:
            self.got_bytes = True
            status = 0
            kept = []
            special = self.peer.response_special
            content_length = False
            for name, value in event.headers:
                if name[:1] == b":":
                    if name == b":status":
                        status = int(value)
                    continue
                if name in special:
                    if name != b"content-length":
                        continue
                    content_length = True
                kept.append((name, value))
            self.head_done = True
            if event.stream_ended is not None or self.head_request:
                framing = FRAMING_NONE
            else:
                framing = FRAMING_LENGTH if content_length else FRAMING_CHUNKED
            owner.upstream_head(self, status, kept, framing)
            if event.stream_ended is not None and self.owner is owner:
                # Headers only (gRPC's "trailers-only" answer): completed here, in the same write, so the
                # client gets one HEADERS frame with END_STREAM as the backend sent it.
                self.ended = True
                self.conn.stream_closed(self)
                owner.upstream_complete(self, False)
        elif kind is h2.events.InformationalResponseReceived:
            status = int(dict(event.headers).get(b":status", b"100"))
            owner.upstream_interim(self, status, [(n, v) for n, v in event.headers if n[:1] != b":"])
        elif kind is h2.events.TrailersReceived:
            trailers = [(n, v) for n, v in event.headers if n[:1] != b":"]
            handler = getattr(owner, "upstream_trailers", None)
            if handler is not None:
                handler(self, trailers)
        elif kind is h2.events.StreamEnded:
            if self.ended:
                return
            self.ended = True
            self.conn.stream_closed(self)
            if self.head_done:
                owner.upstream_complete(self, False)
            else:
                self._failed("invalid_response")
        elif kind is h2.events.StreamReset:
            self.ended = True
            self.conn.stream_closed(self)
            self._failed("upstream_reset" if not self.head_done else "upstream_reset_midway")

    def _failed(self, reason: str) -> None:
        self.ended = True
        owner = self.owner
        self.owner = None
        if owner is not None:
            owner.upstream_failed(self, reason)

    # -- used by the client side --------------------------------------------------------------------------
    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            unacked = self.unacked
            if unacked and not self.ended:
                self.unacked = 0
                self.conn._ack(unacked, self.stream_id)
                self.conn.flush()

    def detach(self) -> None:
        self.owner = None
        self.deadline = 0.0

    def abort(self) -> None:
        """The exchange no longer wants this stream: cancel it, the connection stays."""
        self.owner = None
        if not self.ended:
            self.ended = True
            self.conn.stream_closed(self)
            if self.conn.alive:
                try:
                    self.conn.h2.reset_stream(self.stream_id, ErrorCodes.CANCEL)
                except h2.exceptions.ProtocolError:
                    pass
                self.conn.flush()

    def close(self) -> None:
        self.abort()
