"""The client side of HTTP/2 (RFC 9113), with the `h2` state machine: one asyncio.Protocol per connection
(`H2ServerConnection`) and one small object per stream (`H2Stream`).

A stream is, towards the phase engine and the backend connection, exactly what an HTTP/1.1
`ClientConnection` is for one exchange: it inherits the forwarding code (pooled HTTP/1.1 backend
connections, retries, response replacement, body filters) and replaces only the output side (HEADERS
and DATA frames instead of a status line and chunks) and the request-body input (DATA frames with flow
control instead of httptools callbacks). Every filter therefore works on HTTP/2 unchanged.

A connection arrives here from `ClientConnection`: on TLS listeners when ALPN chose "h2", on cleartext
ones when the first bytes are the prior-knowledge preface ("PRI * HTTP/2.0").

WebSockets over HTTP/2 (RFC 8441 extended CONNECT) are `WebSocketStream`s, offered when a route passes
WebSocket to an HTTP/1.1 upstream: see that class.

Protection: SETTINGS limit concurrent streams, header list size, HPACK table and frame size; h2 itself
closes the connection on a CONTINUATION flood (more than 64 frames in one header block), and a header block
not ended within `timeouts.client_header` closes it too; streams the client opens and cancels faster than
`http2.max_client_resets` per `http2.reset_window` (the "rapid reset" attack) get the connection closed
with ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
import struct
from time import monotonic

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import hyperframe.frame
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from h2.stream import StreamClosedBy, StreamInputs, StreamState
from hpack import Decoder
from hyperframe.frame import GoAwayFrame

from bastion.http.h1_server import (
    BODY_BUFFER_PAUSE,
    BODY_PREFETCH,
    DL_NONE,
    PAUSE_BUFFER,
    ClientConnection,
)
from bastion.http import h2_upstream
from bastion.http.headers import HOP_BY_HOP
from bastion.http.paths import normalize_path
from bastion.proxy import engine
from bastion.proxy.exchange import Exchange

log = logging.getLogger("bastion.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CONNECTION_WINDOW = 16 * 1024 * 1024  # request bodies of all streams together; per stream: initial_window_size
PENDING_PAUSE = 256 * 1024  # response bytes waiting for the client's window before the backend is paused

_STATUS = {code: b"%d" % code for code in range(100, 600)}
# Connection-specific fields never go out on HTTP/2 (RFC 9113 8.2.2); Host becomes :authority.
_NOT_ON_H2 = HOP_BY_HOP | {b"host"}
_VIA_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"via"})
_REQUEST_SPECIAL = _VIA_HEADERS | {b"host", b"content-length", b"cookie", b"te", b"x-request-id", b"expect"}
_CHUNK_END = b"0\r\n\r\n"

# Request fields are checked here rather than by h2 (whose generator chain costs more than the rest of the
# request head): RFC 9113 8.2.1 (names: lower-case tokens; values: no NUL/CR/LF, no surrounding
# whitespace), 8.2.2 (no connection-specific fields; TE only "trailers"), 8.3 (known pseudo-headers,
# once each, before the regular fields). A malformed request gets 400 on its stream, nothing forwarded.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z").match
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z").search
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})
_valid_fields: set = set()  # (name, value) pairs already checked; headers repeat across requests
_VALID_FIELDS_MAX = 8192


def field_is_valid(name: bytes, value: bytes) -> bool:
    pair = (name, value)
    if pair in _valid_fields:
        return True
    if not _FIELD_NAME(name) or _BAD_VALUE(value) or name in _CONNECTION_SPECIFIC:
        return False
    if name == b"te" and value != b"trailers":
        return False
    if len(_valid_fields) >= _VALID_FIELDS_MAX:
        _valid_fields.clear()
    _valid_fields.add(pair)
    return True


class CachingDecoder(Decoder):
    """hpack's decoder, remembering what a header block decoded to while the dynamic table stays the same.
    Clients repeat blocks made only of table references (the same call again, the same headers on the next
    request); those then cost a dictionary lookup. Any change to the table forgets everything."""

    def __init__(self, max_header_list_size: int):
        super().__init__(max_header_list_size=max_header_list_size)
        self.blocks: dict = {}
        self.changes = 0
        add = self.header_table.add

        def counting_add(name, value):
            self.changes += 1
            return add(name, value)

        self.header_table.add = counting_add

    def decode(self, data, raw: bool = False):
        blocks = self.blocks
        if raw:
            hit = blocks.get(data)
            if hit is not None:
                return list(hit)
        before = self.changes
        headers = super().decode(data, raw)
        if self.changes != before or (data and data[0] & 0xE0 == 0x20):  # an insertion or a table size update
            blocks.clear()
        elif raw and len(data) <= 2048:
            if len(blocks) >= 256:
                blocks.clear()
            blocks[bytes(data)] = tuple(headers)
        return headers


def settings_for(config, extended_connect: bool = False) -> dict:
    http2 = config.http2
    settings = {
        SettingCodes.MAX_CONCURRENT_STREAMS: http2.max_concurrent_streams,
        SettingCodes.MAX_HEADER_LIST_SIZE: http2.max_header_list_size,
        SettingCodes.HEADER_TABLE_SIZE: http2.header_table_size,
        SettingCodes.INITIAL_WINDOW_SIZE: http2.initial_window_size,
        SettingCodes.MAX_FRAME_SIZE: http2.max_frame_size,
        SettingCodes.ENABLE_PUSH: 0,
    }
    if extended_connect:
        settings[SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1  # WebSockets over HTTP/2 (RFC 8441)
    return settings


_UNIQUE_VALUES = frozenset({b"x-request-id", b"x-correlation-id", b"traceparent", b"set-cookie"})  # not cached


class StaticTableEncoder:
    """An HPACK encoder that uses only the static table (literals "without indexing" otherwise), in place
    of hpack's: no dynamic-table search per field, and since the output depends on nothing but the field,
    encoded fields are cached for the whole process. Costs some bytes on the wire, saves most of the CPU
    time hpack spends on a response head. The first block announces a dynamic table of size 0."""

    __slots__ = ("announce",)
    _cache: dict = {}
    _CACHE_MAX = 4096

    def __init__(self):
        self.announce = True

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self.announce = True

    def encode(self, headers, huffman: bool = True) -> bytes:
        cache = self._cache
        parts = [b"\x20"] if self.announce else []  # dynamic table size update: 0
        self.announce = False
        for field in headers:
            if len(field) != 2:
                field = (field[0], field[1])
            encoded = cache.get(field)
            if encoded is None:
                encoded = _encode_field(field[0], field[1])
                if field[0] not in _UNIQUE_VALUES:
                    if len(cache) >= self._CACHE_MAX:
                        cache.clear()
                    cache[field] = encoded
            parts.append(encoded)
        return b"".join(parts)


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    if value < (1 << prefix_bits) - 1:
        return bytes((value,))
    from hpack.hpack import encode_integer

    return bytes(encode_integer(value, prefix_bits))


def _encode_field(name: bytes, value: bytes) -> bytes:
    from hpack.table import HeaderTable

    if isinstance(name, str):
        name = name.encode("utf-8")
    if isinstance(value, str):
        value = value.encode("utf-8")
    found = HeaderTable.STATIC_TABLE_MAPPING.get(name)
    if found is not None:
        index = found[1].get(value)
        if index is not None:
            return bytes((0x80 | index,)) if index < 127 else b"\xff" + _hpack_int(index - 127, 8)
        return _hpack_int(found[0], 4) + _hpack_int(len(value), 7) + value  # literal, indexed name
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


# -- the two frames every response sends, without h2's frame objects ------------------------------------------
# h2 builds a hyperframe object per frame, serializes it and logs on the way; for a response's HEADERS (one
# frame) and DATA (within the window, one frame) Bastion drives the same state machines h2 would and
# appends the serialized frame to h2's output buffer itself. Checked against h2 4.x internals at import;
# with another h2 the public calls are used.
_FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length, type, flags, stream id (RFC 9113 4.1)
_FAST_FRAMES = (
    h2.__version__.split(".")[0] == "4"
    and hasattr(h2.connection.H2Connection(), "_data_to_send")
    and hasattr(h2.connection.H2Connection, "_get_stream_by_id")
    # and for the frames that open a stream (H2ServerConnection._open_streams)
    and all(hasattr(h2.frame_buffer.FrameBuffer(server=True), name) for name in ("_data", "_preamble_len", "_headers_buffer"))
    and hasattr(h2.connection.H2Connection, "_begin_new_stream")
    and hasattr(h2.connection, "_decode_headers")
    and hasattr(h2.stream.H2Stream, "_initialize_content_length")
)


def send_response_headers(conn, sid: int, headers, end_stream: bool) -> None:
    stream = conn.streams.get(sid) if _FAST_FRAMES else None
    if stream is None:
        conn.send_headers(sid, headers, end_stream=end_stream)
        return
    encoder = conn.encoder
    announce = encoder.announce
    block = encoder.encode(headers)
    size = len(block)
    if size > conn.max_outbound_frame_size:
        encoder.announce = announce
        conn.send_headers(sid, headers, end_stream=end_stream)  # HEADERS + CONTINUATION, by h2
        return
    conn.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
    machine = stream.state_machine
    machine.process_input(StreamInputs.SEND_HEADERS)
    flags = 0x4  # END_HEADERS
    if end_stream:
        machine.process_input(StreamInputs.SEND_END_STREAM)
        flags = 0x5
    conn._data_to_send += _FRAME_HEADER.pack(size >> 8, size & 0xFF, 0x1, flags, sid) + block


def send_data_frame(conn, sid: int, data: bytes, end_stream: bool = False) -> None:
    """One DATA frame the caller knows fits in the windows and the frame size."""
    stream = conn.streams.get(sid) if _FAST_FRAMES else None
    if stream is None:
        conn.send_data(sid, data, end_stream=end_stream)
        return
    size = len(data)
    conn.state_machine.process_input(ConnectionInputs.SEND_DATA)
    machine = stream.state_machine
    machine.process_input(StreamInputs.SEND_DATA)
    flags = 0
    if end_stream:
        machine.process_input(StreamInputs.SEND_END_STREAM)
        flags = 0x1
    stream.outbound_flow_control_window -= size
    conn.outbound_flow_control_window -= size
    conn._data_to_send += _FRAME_HEADER.pack(size >> 8, size & 0xFF, 0x0, flags, sid) + data


_OPENING_STATES = (ConnectionState.IDLE, ConnectionState.SERVER_OPEN)

# Where h2 keeps a header block until its END_HEADERS (checked by the sweep, see _check_header_block).
_HEADER_BLOCKS = hasattr(h2.connection.H2Connection(h2.config.H2Configuration(client_side=False)).incoming_buffer,
                         "_headers_buffer")


def _short_frame_repr(frame) -> str:
    return f"<{type(frame).__name__} stream_id={frame.stream_id}>"


# h2 formats `repr(frame)` for a trace log line on every frame it receives, before it asks the logger, so
# with logging off every request still paid 1.4 µs per frame for hyperframe's detailed repr (about 3% of
# an HTTP/2 request's CPU under h2load). Bastion never logs frames; their repr is made short.
hyperframe.frame.Frame.__repr__ = _short_frame_repr

_SERVER_CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,
    # Bastion checks request fields itself (field_is_valid, H2Stream.begin) and lower-cases and filters
    # what it sends (H2Stream._write_head).
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)


class H2ServerConnection(asyncio.Protocol):
    """One client connection speaking HTTP/2; owns the h2 state machine and the streams."""

    __slots__ = (
        "worker", "runtime", "listener", "loop", "transport", "client_ip", "tls_client", "h2", "streams",
        "closed", "write_paused", "last_active", "resets", "reset_window_start", "goaway_sent", "last_stream",
        "max_resets", "reset_window", "dead", "receiving", "flush_pending", "holding", "origin", "max_streams",
        "header_block", "header_block_since",
    )

    def __init__(self, worker, runtime, listener, client_ip: str, tls_client=False):
        self.worker = worker
        self.runtime = runtime
        self.listener = listener
        self.loop = worker.loop
        self.transport = None
        self.client_ip = client_ip
        self.tls_client = tls_client
        config = runtime.config
        conn = h2.connection.H2Connection(_SERVER_CONFIG)
        conn.encoder = StaticTableEncoder()
        conn.decoder = CachingDecoder(config.http2.max_header_list_size)
        values = settings_for(config, runtime.websocket_over_h2)
        conn.local_settings = h2.settings.Settings(client=False, initial_values=values)
        # Settings take effect when the client acknowledges them; the decoder's limits hold from the start.
        conn.decoder.max_allowed_table_size = config.http2.header_table_size
        conn.max_inbound_frame_size = config.http2.max_frame_size
        self.h2 = conn
        self.streams: dict[int, H2Stream] = {}
        self.closed = False
        self.dead = False  # h2's state is closed: no more frames may be produced
        self.receiving = False  # frames are being handled: output is written once, at the end
        self.flush_pending = False
        self.holding: list = []  # streams with a DATA chunk held back (see H2Stream.held)
        self.write_paused = False
        self.last_active = monotonic()
        self.resets = 0
        self.reset_window_start = self.last_active
        self.max_resets = config.http2.max_client_resets
        self.reset_window = config.http2.reset_window
        self.goaway_sent = False
        self.last_stream = 0
        self.origin = None  # the ClientConnection that accepted the connection and handed it over
        self.max_streams = config.http2.max_concurrent_streams
        self.header_block = None  # the first frame of a header block still waiting for its END_HEADERS
        self.header_block_since = 0.0

    # -- lifecycle ------------------------------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        conn = self.h2
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.worker.connection_opened(self)
        self.flush()

    def connection_lost(self, exc):
        self.closed = True
        self.worker.connection_closed(self)
        origin = self.origin
        if origin is not None and getattr(origin, "guard_slot", -1) >= 0:
            # per-client connection counters (connection-level security) were taken by the accepting
            # connection, whose connection_lost never runs after the hand-over
            self.runtime.connection_guard.release(origin)
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream._lost("client_closed")

    def eof_received(self):
        return False

    def pause_writing(self):
        # A client that does not read what it asks for (PING, SETTINGS or reset floods that make the
        # server answer) is not read from either until it does, so the output buffer stays bounded.
        self.write_paused = True
        if not self.closed:
            self.transport.pause_reading()
        for stream in self.streams.values():
            stream.write_paused = True
            up = stream.upstream or stream.tunnel
            if up is not None:
                up.pause()

    def resume_writing(self):
        self.write_paused = False
        if not self.closed:
            self.transport.resume_reading()
        for stream in self.streams.values():
            stream.write_paused = False
            up = stream.upstream
            if up is not None and stream.pending_size < PENDING_PAUSE:
                up.resume()
            tunnel = stream.tunnel
            if tunnel is not None and not stream.pending:
                tunnel.resume()
            if stream.drained is not None:
                stream.wake_file_sender()

    def flush(self) -> None:
        if self.dead and self.closed:
            return
        holding = self.holding
        if holding:
            self.holding = []
            for stream in holding:
                stream.release_held()
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def write(self, _data: bytes = b"") -> None:
        self.flush()

    def flush_soon(self) -> None:
        """Answers of several streams that finish in one loop iteration leave in one write."""
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self.flush_pending = False
        self.flush()

    def client_certificate(self):
        if self.tls_client is False:
            from bastion.tls.contexts import client_certificate_info

            self.tls_client = client_certificate_info(self.transport.get_extra_info("ssl_object"))
        return self.tls_client

    # -- incoming frames ------------------------------------------------------------------------------------
    def data_received(self, data: bytes):
        if self.dead:
            return
        self.last_active = monotonic()
        self.receiving = True
        try:
            if _FAST_FRAMES and self.h2.state_machine.state in _OPENING_STATES:
                data = self._open_streams(data)
                if self.dead:
                    return
            events = self.h2.receive_data(data) if data else ()
            for event in events:
                handler = _HANDLERS.get(type(event))
                if handler is not None:
                    handler(self, event)
                    if self.dead:
                        return
        except h2.exceptions.ProtocolError as exc:
            self.fail(getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR), f"protocol error: {exc}")
            return
        except Exception:  # noqa: BLE001 - a bug must cost this connection, not the worker
            log.exception("error while handling HTTP/2 frames")
            self.fail(ErrorCodes.INTERNAL_ERROR, "internal error")
            return
        finally:
            self.receiving = False
        self.flush()

    def fail(self, error_code, reason: str) -> None:
        """A connection error: GOAWAY with the code, then close; every open exchange ends."""
        if self.dead:
            return
        log.info("closing HTTP/2 connection from %s: %s", self.client_ip, reason)
        self.dead = True
        try:
            self.h2.close_connection(error_code=error_code)
            data = self.h2.data_to_send()
            if data and not self.closed:
                self.transport.write(data)
        except h2.exceptions.ProtocolError:
            pass
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream._lost("http2_" + (error_code.name.lower() if isinstance(error_code, ErrorCodes) else str(error_code)))
        if not self.closed:
            self.transport.close()

    def _on_request(self, event) -> None:
        self._begin_stream(event.stream_id, event.headers, event.stream_ended is not None)

    def _begin_stream(self, sid: int, headers, ended: bool) -> None:
        if self.goaway_sent and sid > self.last_stream:
            # Opened after our GOAWAY: refused, so the client may safely retry it elsewhere.
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        stream = H2Stream(self, sid)
        self.streams[sid] = stream
        stream.begin(headers, ended)

    def _open_streams(self, data: bytes) -> bytes:
        """The frames that open a request stream in one HEADERS frame (nearly every request) are handled
        here, reaching the state h2 would reach (its frame objects, events and generic state-machine walk
        cost a third of an HTTP/2 request); anything else, and everything after it, goes to h2. Returns
        what h2 still has to read."""
        conn = self.h2
        incoming = conn.incoming_buffer
        if incoming._data or incoming._preamble_len or incoming._headers_buffer:
            return data
        size = len(data)
        offset = 0
        streams = conn.streams
        while size - offset >= 9:
            length = int.from_bytes(data[offset:offset + 3], "big")
            start = offset + 9
            end = start + length
            flags = data[offset + 4]
            sid = int.from_bytes(data[offset + 5:start], "big") & 0x7FFFFFFF
            # HEADERS, END_HEADERS, not PADDED; a new client stream; room for it under the stream limit
            if (data[offset + 3] != 0x1 or flags & 0x0C != 0x04 or end > size or length > conn.max_inbound_frame_size
                    or not sid & 1 or sid <= conn.highest_inbound_stream_id or len(streams) >= self.max_streams):
                break
            if flags & 0x20:  # PRIORITY: deprecated (RFC 9113 5.3.2), only checked
                if length < 5 or int.from_bytes(data[start:start + 4], "big") & 0x7FFFFFFF == sid:
                    break  # h2 reports the error
                start += 5
            headers = h2.connection._decode_headers(conn.decoder, data[start:end])
            offset = end
            if conn.state_machine.state is not ConnectionState.SERVER_OPEN:
                conn.state_machine.process_input(ConnectionInputs.RECV_HEADERS)  # the first request
            stream = conn._begin_new_stream(sid, AllowedStreamIDs.ODD)
            machine = stream.state_machine
            machine.client = False
            machine.headers_received = True
            ended = flags & 0x1
            if ended:
                machine.state = StreamState.HALF_CLOSED_REMOTE
                machine.stream_closed_by = StreamClosedBy.RECV_END_STREAM
            else:
                machine.state = StreamState.OPEN
                stream._initialize_content_length(headers)
            self._begin_stream(sid, headers, bool(ended))
            if self.dead:
                return b""
        return data[offset:] if offset else data

    def _on_data(self, event) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            self._ack(event.flow_controlled_length, event.stream_id)
            return
        stream.body_received(event.data, event.flow_controlled_length)

    def _ack(self, size: int, sid: int) -> None:
        if size:
            try:
                self.h2.acknowledge_received_data(size, sid)
            except (h2.exceptions.StreamClosedError, KeyError):
                # The stream is gone; the connection window still needs the bytes back.
                self.h2.increment_flow_control_window(size)

    def _on_trailers(self, event) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.request_trailers = [(n, v) for n, v in event.headers if n[:1] != b":" and field_is_valid(n, v)]

    def _on_stream_ended(self, event) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.request_ended()

    def _on_reset(self, event) -> None:
        stream = self.streams.pop(event.stream_id, None)
        if event.remote_reset:
            now = monotonic()
            if now - self.reset_window_start > self.reset_window:
                self.reset_window_start = now
                self.resets = 0
            self.resets += 1
            if self.resets > self.max_resets:
                if stream is not None:
                    stream._lost("client_reset")
                self.fail(ErrorCodes.ENHANCE_YOUR_CALM, "too many streams cancelled by the client (rapid reset)")
                return
        if stream is not None:
            stream._lost("client_reset")

    def _on_window(self, event) -> None:
        sid = event.stream_id
        if sid == 0:
            for stream in list(self.streams.values()):
                if stream.pending:
                    stream.send_pending()
        else:
            stream = self.streams.get(sid)
            if stream is not None and stream.pending:
                stream.send_pending()

    def _on_settings(self, event) -> None:
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            for stream in list(self.streams.values()):
                if stream.pending:
                    stream.send_pending()

    def _on_goaway(self, event) -> None:
        # The client will open no more streams; finish the ones it has and close.
        self.goaway_sent = True
        self.last_stream = self.h2.highest_inbound_stream_id
        if not self.streams:
            self.close()

    # -- streams --------------------------------------------------------------------------------------------
    def stream_done(self, stream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        if not self.streams and self.goaway_sent and not self.closed:
            self.loop.call_soon(self._close_if_idle)

    def _close_if_idle(self) -> None:
        if not self.streams:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.transport.close()

    # -- timers and draining (called by the worker) -----------------------------------------------------------
    def check_deadline(self, now: float) -> None:
        if _HEADER_BLOCKS and self.h2.incoming_buffer._headers_buffer:
            self._check_header_block(now)
            if self.dead:
                return
        elif self.header_block is not None:
            self.header_block = None
        streams = self.streams
        if streams:
            for stream in list(streams.values()):
                stream._check_upstream(now)
            return
        idle = now - self.last_active
        if idle >= self.runtime.config.timeouts.keepalive or (self.goaway_sent and idle >= 1.0):
            self.drain(now)
            self.close()

    def _check_header_block(self, now: float) -> None:
        """A header block sent in pieces (HEADERS, then CONTINUATION frames) gets `timeouts.client_header`
        to end, as an HTTP/1.1 request head does: a client trickling CONTINUATION frames would otherwise
        hold the connection (and h2's buffer) until its 64-frame limit. Seen by the sweep, so the cost
        is nothing per frame; the block is known by its first frame."""
        first = self.h2.incoming_buffer._headers_buffer[0]
        if first is not self.header_block:
            self.header_block = first
            self.header_block_since = now
        elif now - self.header_block_since >= self.runtime.config.timeouts.client_header:
            self.header_block = None
            self.fail(ErrorCodes.PROTOCOL_ERROR, "header block not completed within timeouts.client_header")

    def drain(self, now: float) -> None:
        """GOAWAY: streams the client already opened finish, new ones are refused, then the connection
        closes. h2's own close_connection() would forbid answering the open streams, so the frame is sent
        by hand and h2 stays open for them."""
        if self.goaway_sent or self.dead or self.closed:
            return
        self.goaway_sent = True
        self.last_stream = self.h2.highest_inbound_stream_id
        self.flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.last_stream
        frame.error_code = 0
        self.transport.write(frame.serialize())
        if not self.streams:
            self.loop.call_later(0.2, self._close_if_idle)


_HANDLERS = {
    h2.events.RequestReceived: H2ServerConnection._on_request,
    h2.events.DataReceived: H2ServerConnection._on_data,
    h2.events.TrailersReceived: H2ServerConnection._on_trailers,
    h2.events.StreamEnded: H2ServerConnection._on_stream_ended,
    h2.events.StreamReset: H2ServerConnection._on_reset,
    h2.events.WindowUpdated: H2ServerConnection._on_window,
    h2.events.RemoteSettingsChanged: H2ServerConnection._on_settings,
    h2.events.ConnectionTerminated: H2ServerConnection._on_goaway,
}


def _stream_guard(method):
    """h2 refuses frames for a stream it already closed (a reset crossing our answer): that ends the stream
    here too, instead of an exception in the middle of a backend read."""

    def guarded(self, *args):
        try:
            return method(self, *args)
        except h2.exceptions.ProtocolError as exc:
            log.debug("HTTP/2 stream %d: %s", self.stream_id, exc)
            self._lost("http2_stream_error")

    guarded.__name__ = method.__name__
    guarded.__doc__ = method.__doc__
    return guarded


class H2Stream(ClientConnection):
    """One request/response on an HTTP/2 connection, seen by the engine and the backend connection as a
    connection of its own. It is its own `transport` for the inherited code: write() flushes, abort()
    resets the stream, pause_reading()/resume_reading() hold back flow-control credit."""

    __slots__ = (
        "conn", "stream_id", "pending", "pending_size", "ending", "head_pending", "response_trailers",
        "request_trailers", "unacked", "done", "held",
    )

    def __init__(self, conn: H2ServerConnection, stream_id: int):
        # Every inherited attribute starts as on a new HTTP/1.1 connection (so code added to
        # ClientConnection finds its fields here too); then what differs for a stream.
        ClientConnection.__init__(self, conn.worker, conn.runtime, conn.listener)
        # (set here, not as a class attribute: the compiled ClientConnection reads its own field)
        self.writes_h1 = False
        self.transport = self
        self.client_ip = conn.client_ip
        self.write_paused = conn.write_paused
        self.conn = conn
        self.stream_id = stream_id
        self.pending: list | None = None
        self.pending_size = 0
        self.ending = False
        self.head_pending = None
        self.response_trailers = None
        self.request_trailers = None
        self.unacked = 0
        self.done = False
        self.held = None  # the last DATA of a backend read, kept so that it can carry END_STREAM

    def client_certificate(self):
        return self.conn.client_certificate()

    # -- the request ----------------------------------------------------------------------------------------
    def begin(self, headers, ended: bool) -> None:
        now = monotonic()
        ex = Exchange(self, now, self.client_ip, self.scheme)
        ex.http_version = "2.0"
        self.active = ex
        method = target = authority = scheme = protocol = None
        kept = []
        cookies = None
        size = 0
        limits = self.limits
        malformed = False
        regular = False
        valid = _valid_fields
        for pair in headers:
            name, value = pair
            if name[:1] == b":":
                if pair not in valid:
                    if _BAD_VALUE(value):
                        malformed = True
                    elif len(valid) < _VALID_FIELDS_MAX:
                        valid.add(pair)
                if regular or name not in _PSEUDO:
                    if name == b":protocol" and not regular and protocol is None and self.runtime.websocket_over_h2:
                        protocol = value  # extended CONNECT (RFC 8441), offered in our SETTINGS
                    else:
                        malformed = True
                elif name == b":method":
                    malformed = malformed or method is not None
                    method = value
                elif name == b":path":
                    malformed = malformed or target is not None
                    target = value
                elif name == b":authority":
                    malformed = malformed or authority is not None
                    authority = value
                else:
                    malformed = malformed or scheme is not None
                    scheme = value
                continue
            regular = True
            if pair not in valid and not field_is_valid(name, value):
                malformed = True
                continue
            size += len(name) + len(value) + 4
            if name not in _REQUEST_SPECIAL:
                kept.append(pair)
            elif name == b"cookie":
                cookies = [value] if cookies is None else cookies + [value]
            elif name == b"host":
                if not ex.host_header:
                    ex.host_header = value
            elif name == b"content-length":
                if not value.isdigit() or ex.content_length is not None:
                    malformed = True
                    continue
                ex.content_length = int(value)
                kept.append((name, value))
            elif name == b"te":
                pass  # hop-by-hop; HTTP/2 backends get Bastion's own "te: trailers"
            elif name == b"x-request-id":
                if 0 < len(value) <= 200:
                    ex.incoming_request_id = value
                    kept.append((name, value))
            elif name == b"expect":
                if value.lower() == b"100-continue":
                    ex.expect_continue = True
            else:
                ex.via_proxy = True
                kept.append((name, value))
        ex.method = method or b"GET"
        ex.target = target or b""
        if cookies is not None:
            # Cookie crumbs are one header again for HTTP/1.1 backends (RFC 9113 8.2.3).
            kept.append((b"cookie", b"; ".join(cookies)))
        if authority:
            ex.host_header = authority
        if ex.host_header:
            kept.insert(0, (b"host", ex.host_header))
            host = ex.host_header.strip().lower()
            ex.host = host if host.endswith(b"]") or b":" not in host else host.rpartition(b":")[0]
        ex.headers = kept
        ex.raw_headers = headers  # every field as received, for filters that inspect them all (the WAF)
        if ended:
            ex.request_complete = True
        else:
            self.parsing = ex
            self.deadline = now + self.timeouts.client_body
            ex.body_chunks = []
            if ex.content_length is None:
                ex.chunked = True  # the body's length is unknown: chunked towards HTTP/1.1 backends
        if malformed or method is None or scheme is None:
            if method == b"CONNECT" and not malformed and protocol is None and target is None:
                # A plain CONNECT (RFC 9113 8.5: only :method and :authority): a TCP tunnel Bastion does not
                # open for anyone.
                self.reject(501, "connect_not_supported")
            else:
                self.reject(400, "malformed_request")
            return
        if len(kept) > self.max_headers:
            self.reject(431, "too_many_headers")
            return
        if size > limits.header_bytes:
            self.reject(431, "header_too_large")
            return
        if ex.method == b"CONNECT" or protocol is not None:
            if protocol is None:
                self.reject(501, "connect_not_supported")
                return
            if ex.method != b"CONNECT" or target is None or not authority:
                self.reject(400, "malformed_request")  # RFC 8441 4: :protocol only on CONNECT, with :path
                return
            if protocol.lower() != b"websocket":
                self.reject(501, "connect_protocol_not_supported")
                return
            if type(self) is H2Stream:
                # The stream becomes a WebSocket stream (its own class, so that plain streams carry no
                # tunnel logic); the head is read again by it.
                stream = WebSocketStream(self.conn, self.stream_id)
                self.conn.streams[self.stream_id] = stream
                stream.begin(headers, ended)
                return
            self.prepare_websocket(ex, ended)
        if target is None or not (target[:1] == b"/" or (target == b"*" and ex.method == b"OPTIONS")):
            self.reject(400, "bad_target")
            return
        if not ex.host_header:
            self.reject(400, "missing_host")
            return
        path, _, ex.query = target.partition(b"?")
        if b"/." in path:
            path = normalize_path(path)
        ex.path = path
        engine.start(self, ex, self.runtime)

    def body_received(self, data: bytes, flow_length: int) -> None:
        ex = self.parsing
        if ex is None or ex.discard_body or self.closed:
            self.conn._ack(flow_length, self.stream_id)
            return
        ex.bytes_in += len(data)
        self.deadline = self.conn.last_active + self.timeouts.client_body
        if ex.route is not None and ex.bytes_in > ex.route.body_limit:
            self.conn._ack(flow_length, self.stream_id)
            self.reject(413, "body_too_large")
            return
        if self.paused:
            self.unacked += flow_length
        else:
            self.conn._ack(flow_length, self.stream_id)
        if not data:
            return
        self._take_body(ex, data)

    def request_ended(self) -> None:
        ex = self.parsing
        if ex is None:
            return
        self.parsing = None
        self.deadline = 0.0
        ex.request_complete = True
        if ex.body_waiter is not None:
            self._answer_body_waiter(ex, b"".join(ex.body_chunks))
        if ex is self.active and not self.closed:
            if self.upstream_ready:
                if ex.chunked:
                    self.upstream.transport.write(_CHUNK_END)
                elif ex.route.upstream.http2:
                    self.upstream.end_request(self.request_trailers)
            elif ex.waiting_body:
                ex.waiting_body = False
                self._connect_or_attach(ex, ex.peer)

    # -- "transport" for the inherited code -----------------------------------------------------------------
    def pause_reading(self) -> None:
        pass  # flow-control credit is held back in body_received while self.paused is set

    def resume_reading(self) -> None:
        unacked = self.unacked
        if unacked and not self.closed:
            self.unacked = 0
            self.conn._ack(unacked, self.stream_id)
            self._flush_soon()

    def write(self, _data: bytes = b"") -> None:
        """Called where a backend read ends (see UpstreamConnection.data_received): one socket write."""
        if not self.closed:
            if self.head_pending is not None:
                self._send_head(False)
            held = self.held
            if held is not None:
                self.held = None
                self._send_data(held)
        self.conn.flush_soon()

    def writelines(self, _parts) -> None:
        self.write()

    def abort(self) -> None:
        """A response cut short (the backend failed mid-body): the stream is reset, the rest goes on."""
        if self.closed:
            return
        if not self.conn.dead:
            try:
                self.conn.h2.reset_stream(self.stream_id, ErrorCodes.INTERNAL_ERROR)
            except h2.exceptions.ProtocolError:
                pass
        self._lost(None)
        self.conn.flush()

    close = abort

    def get_extra_info(self, name, default=None):
        return self.conn.transport.get_extra_info(name, default)

    def can_write_eof(self) -> bool:
        return False

    # -- output ---------------------------------------------------------------------------------------------
    def _touch(self) -> None:
        out = self.out
        if out is not None:
            if not out:
                out.append(b"")
        elif not self.conn.receiving:
            self.write()

    def _flush_soon(self) -> None:
        if self.out is None and not self.conn.receiving:
            self.conn.flush()

    def send_continue(self) -> None:
        if not self.closed:
            self.conn.h2.send_headers(self.stream_id, [(b":status", b"100")])
            self._touch()

    def _write_head(self, ex, headers, chunked: bool, upgrade: bool = False) -> None:
        head = [(b":status", _STATUS.get(ex.status) or b"%d" % ex.status)]
        for name, value in headers:
            lname = name.lower()
            if lname not in _NOT_ON_H2:
                head.append((lname, value))
        self.head_pending = head
        out = self.out
        if out is not None and not out:
            out.append(b"")

    def _send_head(self, end: bool) -> None:
        head = self.head_pending
        self.head_pending = None
        send_response_headers(self.conn.h2, self.stream_id, head, end)

    def _send(self, data: bytes) -> None:
        if self.closed:
            return
        if self.head_pending is not None:
            self._send_head(False)
        if data:
            if self.pending:
                self.pending.append(data)
                self.pending_size += len(data)
            elif self.out is not None or self.conn.receiving:
                # Inside a backend read or a client read: the chunk waits for the read's end (write(),
                # conn.flush()), or goes out with END_STREAM if the response ends in the same read.
                held = self.held
                if held is not None:
                    self.held = None
                    self._send_data(held)
                if self.pending:
                    self.pending.append(data)
                    self.pending_size += len(data)
                else:
                    self.held = data
                    if held is None:
                        self.conn.holding.append(self)
            else:
                self._send_data(data)
            if self.pending_size >= PENDING_PAUSE:
                up = self.upstream
                if up is not None:
                    up.pause()
        self._touch()

    def _sendv(self, parts) -> None:
        self._send(b"".join(parts))

    def _send_data(self, data: bytes) -> None:
        """Send what the windows allow now; keep the rest for WINDOW_UPDATE."""
        conn = self.conn.h2
        sid = self.stream_id
        window = conn.local_flow_control_window(sid)
        frame = conn.max_outbound_frame_size
        size = len(data)
        if size <= window and size <= frame:
            send_data_frame(conn, sid, data)
            return
        view = memoryview(data)
        offset = 0
        while offset < size and window > 0:
            n = min(window, frame, size - offset)
            conn.send_data(sid, view[offset : offset + n].tobytes())
            offset += n
            window -= n
        if offset < size:
            rest = data[offset:]
            self.pending = [rest]
            self.pending_size = len(rest)

    def release_held(self) -> None:
        held = self.held
        if held is not None and not self.closed:
            self.held = None
            self._send_data(held)

    def send_pending(self) -> None:
        if self.closed:
            return
        pending = self.pending
        self.pending = None
        self.pending_size = 0
        for i, data in enumerate(pending):
            if self.pending:
                self.pending.extend(pending[i:])
                self.pending_size += sum(len(d) for d in pending[i:])
                break
            self._send_data(data)
        if not self.pending:
            if self.drained is not None:
                self.wake_file_sender()
            if self.ending:
                self._finish_stream()
            up = self.upstream
            if up is not None and up.paused and not self.write_paused:
                up.resume()
        self._flush_soon()

    write = _stream_guard(write)
    _send = _stream_guard(_send)
    release_held = _stream_guard(release_held)
    send_pending = _stream_guard(send_pending)
    send_continue = _stream_guard(send_continue)

    def _output_full(self) -> bool:
        # A file body (a large object from the disk cache) waits for the stream's window and the socket.
        return bool(self.pending) or self.conn.write_paused

    def wake_file_sender(self) -> None:
        drained = self.drained
        if drained is not None and not drained.done() and (self.closed or not (self.pending or self.conn.write_paused)):
            drained.set_result(None)

    def write_local_wire(self, ex, response) -> None:
        """A prebuilt HTTP/1.1 head (a cache hit) means nothing here: the answer goes out as HEADERS and DATA
        like any local answer (its headers copied: the cache reuses the Response for later hits)."""
        ex.response_headers_raw = list(response.headers.raw)
        self.write_local_response(ex, response.body)

    def upstream_trailers(self, up, trailers) -> None:
        self.response_trailers = trailers

    # -- the end of an exchange -----------------------------------------------------------------------------
    def _end_exchange(self, ex, now: float = 0.0) -> None:
        self.active = None
        ex.end = now or monotonic()
        if not self.closed:
            if self.pending:
                self.ending = True
            else:
                self._finish_stream()
        engine.finish(ex)

    def _finish_stream(self) -> None:
        conn = self.conn.h2
        sid = self.stream_id
        self.ending = False
        trailers = self.response_trailers
        held = self.held
        ended = False
        if self.head_pending is not None:
            ended = held is None and trailers is None
            self._send_head(ended)
        if held is not None:
            self.held = None
            if trailers is None and len(held) <= min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size):
                send_data_frame(conn, sid, held, True)
                ended = True
            else:
                self._send_data(held)
                if self.pending:
                    self.ending = True  # the rest, and the end, when the client's window opens
                    if not self.conn.receiving:
                        self.conn.flush_soon()
                    return
        if not ended:
            if trailers is not None:
                conn.send_headers(sid, [(n.lower(), v) for n, v in trailers], end_stream=True)
            else:
                conn.end_stream(sid)
        if self.parsing is not None:
            # Answered before the request body ended: the client may stop sending (RFC 9113 8.1).
            self.parsing.discard_body = True
            self.parsing = None
            conn.reset_stream(sid, ErrorCodes.NO_ERROR)
        self.done = True
        self.closed = True  # the owner of a backend read sees this and leaves the flush to us
        self.conn.stream_done(self)
        if not self.conn.receiving:
            self.conn.flush_soon()

    _finish_stream = _stream_guard(_finish_stream)

    def _lost(self, reason: str | None) -> None:
        """The stream ended without a complete response (reset by the client, the connection gone)."""
        if self.done:
            return
        self.done = True
        self.closed = True
        self.pending = None
        self.held = None
        self.conn.stream_done(self)
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.abort()
        self._drop_body_waiter(self.parsing)
        self._drop_body_waiter(self.active)
        if self.drained is not None:
            self.wake_file_sender()
        ex = self.active
        if ex is not None:
            self.active = None
            engine.end_attempt(ex)
            if reason is not None:
                if not self.resp_started:
                    ex.status = 499
                ex.error = ex.error or reason
            ex.end = monotonic()
            engine.finish(ex)

    def reject(self, status: int, reason: str) -> None:
        """A request Bastion will not process: an error answer on this stream, nothing forwarded."""
        if self.closed:
            return
        ex = self.active
        if ex is None:
            return  # already answered; the stream ends with it
        up = self.upstream
        if up is not None:
            self.upstream = None
            self.upstream_ready = False
            up.abort()
            engine.end_attempt(ex)
        if ex.route is None:
            ex.route = self.runtime.fallback_route
        if not ex.method:
            ex.method = b"-"
        ex.error = reason
        if self.resp_started:
            self.abort()
            return
        engine.respond_error(self, ex, status)

    def lingering_close(self) -> None:
        pass  # the connection, not the stream, decides about closing

    def drain(self, now: float) -> None:
        pass

    def _check_upstream(self, now: float) -> None:
        if self.parsing is not None and self.deadline and now >= self.deadline:
            # A request body that stopped arriving (the slow-body attack, one stream at a time)
            self.deadline = 0.0
            self.reject(408, "client_body_timeout")
            if self.parsing is not None and not self.closed:
                self.abort()
            self.conn.flush()
            return
        up = self.upstream
        if up is None:
            return
        if up.reads != up.seen_reads:
            up.seen_reads = up.reads
            up.deadline = now + up.read_timeout
        elif up.deadline and now >= up.deadline:
            self.upstream = None
            self.upstream_ready = False
            up.abort()
            ex = self.active
            if ex is not None:
                self._upstream_error(ex, 504, "upstream_timeout")
                self.conn.flush()


_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_NOT_FROM_H2_CLIENT = frozenset({b"sec-websocket-key"})  # Bastion makes its own for the backend
_NOT_TO_H2_CLIENT = frozenset({b"sec-websocket-accept"})  # RFC 8441 5: no key, no accept on HTTP/2


def websocket_accept(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept a server must answer to `key` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest())


class WebSocketStream(H2Stream):
    """A WebSocket over HTTP/2 (RFC 8441): an extended CONNECT with `:protocol websocket`. It is routed and
    filtered as the equivalent GET; the backend gets an HTTP/1.1 Upgrade (GET, `Upgrade: websocket`, a fresh
    `Sec-WebSocket-Key`, the client's version, subprotocols and extensions). When the backend switches
    (101 with the right Sec-WebSocket-Accept) the client gets `:status 200` and from then on the stream's
    DATA frames and the backend's bytes are piped both ways: the client gets credit only as fast as the
    backend takes the bytes, and the backend is not read while the stream's window is used up.
    END_STREAM from the client half-closes the backend socket; the backend closing ends the stream;
    RST_STREAM (or the connection's end) closes the backend socket. Any other answer of the backend goes
    to the client as a normal response (a 2xx without switching is a 502: the client would take it for
    an open tunnel)."""

    __slots__ = ("ws_accept", "client_done")

    def __init__(self, conn: H2ServerConnection, stream_id: int):
        H2Stream.__init__(self, conn, stream_id)
        self.ws_accept = b""
        self.client_done = False

    def prepare_websocket(self, ex, ended: bool) -> None:
        """Called by begin() for the extended CONNECT, before the exchange starts."""
        ex.method = b"GET"
        ex.upgrade = b"websocket"
        ex.request_complete = True  # DATA frames are the tunnel's bytes, not a request body
        ex.body_chunks = None
        ex.chunked = False
        self.parsing = None
        self.deadline = 0.0
        self.client_done = ended
        key = base64.b64encode(os.urandom(16))
        self.ws_accept = websocket_accept(key)
        headers = [pair for pair in ex.headers if pair[0] not in _NOT_FROM_H2_CLIENT]
        headers.append((b"sec-websocket-key", key))
        ex.headers = headers
        self.upgrading = True  # bytes from the client wait (without credit) until the backend switches
        self.tunnel_pending = []

    # -- towards the backend --------------------------------------------------------------------------------
    def forward(self, ex, peer) -> None:
        route = ex.route
        if route.upstream.http2 or not route.allows_upgrade(ex.upgrade):
            # Passed on as a plain GET, a 200 from the backend would look like an open tunnel to the client.
            engine.end_attempt(ex)
            ex.error = "websocket_not_allowed"
            engine.respond_error(self, ex, 501)
            return
        ClientConnection.forward(self, ex, peer)

    def upstream_head(self, up, status: int, headers, framing: int) -> None:
        if status == 101 or 200 <= status < 300:
            accept = None
            for name, value in headers:
                if len(name) == 20 and name.lower() == b"sec-websocket-accept":
                    accept = value.strip()
            if status != 101 or accept != self.ws_accept:
                self.upstream = None
                self.upstream_ready = False
                up.abort()
                self._upstream_error(self.active, 502, "websocket_handshake_failed")
                return
        ClientConnection.upstream_head(self, up, status, headers, framing)

    def _write_head(self, ex, headers, chunked: bool, upgrade: bool = False) -> None:
        if upgrade:
            ex.status = 200  # what the client gets for an open tunnel, and what the access log shows
            headers = [pair for pair in headers if pair[0].lower() not in _NOT_TO_H2_CLIENT]
        H2Stream._write_head(self, ex, headers, chunked)

    def upstream_switched(self, up, rest: bytes) -> None:
        ex = self.active
        self.upstream = None
        self.upstream_ready = False
        self.upgrading = False
        pending = self.tunnel_pending or []
        self.tunnel_pending = None
        if ex.replacement is not None:
            # A response filter answered in place of the 101: no tunnel.
            up.abort()
            engine.end_attempt(ex)
            self.write_local_response(ex, ex.replacement.body)
            return
        self.tunnel = up
        up.deadline = 0.0
        self.last_active = monotonic()
        self.worker.tunnel_opened(self)
        if rest:
            self.tunnel_from_upstream(rest)
        for data in pending:
            up.transport.write(data)
        if self.client_done:
            self._half_close_backend()
        if self.write_paused:
            up.pause()
        if not self.paused:
            self.resume_reading()  # credit for what the client sent before the switch

    def write_local_response(self, ex, body: bytes) -> None:
        if 200 <= ex.status < 300:
            # A 2xx on an extended CONNECT says the tunnel is open (RFC 8441 5): a local 2xx (a `respond`
            # route, a cached GET) cannot be the answer to a WebSocket.
            ex.error = "websocket_not_allowed"
            engine.respond_error(self, ex, 501)
            return
        H2Stream.write_local_response(self, ex, body)

    def resume_reading(self) -> None:
        if not self.upgrading:  # before the switch, credit waits: the bytes have nowhere to go yet
            H2Stream.resume_reading(self)

    def _half_close_backend(self) -> None:
        transport = self.tunnel.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()

    # -- the client's side of the tunnel --------------------------------------------------------------------
    def body_received(self, data: bytes, flow_length: int) -> None:
        if self.closed:
            self.conn._ack(flow_length, self.stream_id)
            return
        tunnel = self.tunnel
        if tunnel is not None:
            if data:
                self.last_active = self.conn.last_active
                self.active.bytes_in += len(data)
                tunnel.transport.write(data)
            if self.paused:  # the backend is not taking bytes: the client gets no credit until it does
                self.unacked += flow_length
            else:
                self.conn._ack(flow_length, self.stream_id)
        elif self.upgrading:
            if data:
                self.active.bytes_in += len(data)
                self.tunnel_pending.append(data)
            self.unacked += flow_length
        else:
            self.conn._ack(flow_length, self.stream_id)  # refused: the answer is on its way, bytes dropped

    def request_ended(self) -> None:
        self.client_done = True
        if self.tunnel is not None:
            self._half_close_backend()

    # -- the backend's side of the tunnel -------------------------------------------------------------------
    def tunnel_from_upstream(self, data: bytes) -> None:
        self.last_active = monotonic()
        self.active.bytes_out += len(data)
        self._send(data)
        if self.pending:  # the stream's window is used up: the backend waits for WINDOW_UPDATE
            tunnel = self.tunnel
            if tunnel is not None:
                tunnel.pause()

    def send_pending(self) -> None:
        H2Stream.send_pending(self)
        tunnel = self.tunnel
        if tunnel is not None and tunnel.paused and not self.pending and not self.write_paused and not self.closed:
            tunnel.resume()

    def tunnel_closed_by_upstream(self) -> None:
        if self.tunnel is None or self.done:
            return
        self.tunnel = None
        self.worker.tunnel_closed(self)
        ex = self.active
        engine.end_attempt(ex)
        self._end_exchange(ex)  # END_STREAM once what the backend sent has gone out

    # -- the end ---------------------------------------------------------------------------------------------
    def _finish_stream(self) -> None:
        H2Stream._finish_stream(self)
        if self.done:
            self._release()
            if not self.client_done and not self.conn.dead:
                # The client may still be sending: it is told to stop, without error (RFC 9113 8.1).
                self.client_done = True
                try:
                    self.conn.h2.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
                except h2.exceptions.ProtocolError:
                    pass

    def _lost(self, reason: str | None) -> None:
        if self.done:
            return
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.abort()
            self.worker.tunnel_closed(self)
            if reason in ("client_reset", "client_closed"):
                reason = None  # how clients end a WebSocket over HTTP/2, not an error
        self._release()
        H2Stream._lost(self, reason)

    def _release(self) -> None:
        """Credit held back for bytes that will never reach the backend goes back to the connection."""
        self.tunnel_pending = None
        unacked = self.unacked
        if unacked and not self.conn.dead and not self.conn.closed:
            self.unacked = 0
            self.conn._ack(unacked, self.stream_id)

    def _check_upstream(self, now: float) -> None:
        tunnel = self.tunnel
        if tunnel is None:
            H2Stream._check_upstream(self, now)
            return
        if now - self.last_active >= self.active.route.websocket_idle:
            tunnel.owner = None
            tunnel.close()
            self.tunnel_closed_by_upstream()
            self.conn.flush()


def start_h2(client, data: bytes) -> None:
    """Hand a ClientConnection's transport to HTTP/2 (after ALPN chose h2, or on the preface)."""
    conn = H2ServerConnection(client.worker, client.runtime, client.listener, client.client_ip, client.tls_client)
    conn.origin = client
    transport = client.transport
    client.closed = True
    client.worker.connections.discard(client)
    transport.set_protocol(conn)
    conn.connection_made(transport)
    if data:
        conn.data_received(data)
