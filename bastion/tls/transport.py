"""TLS to clients with OpenSSL reading and writing the connection's socket itself.

uvloop's TLS transport keeps OpenSSL behind two memory buffers: every read copies the encrypted bytes
into one, then asks OpenSSL for records until it raises `SSLWantReadError` — an exception with a
formatted message, 1.7 µs, on every read. Here the `SSLSocket` is non-blocking and watched by the event
loop: a readable socket gets one `read` (plus whatever OpenSSL already holds, which `pending()` tells
without an exception), and a write goes straight to `SSL_write` on the socket. The protocols see an
ordinary asyncio transport.

Used for every HTTPS listener (PROXY protocol, whose header would precede the handshake, is refused on
TLS listeners by the configuration). The handshake must finish within `timeouts.client_header`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl

log = logging.getLogger("bastion.tls")

READ_SIZE = 16 * 1024  # one TLS record at most per read; the bytes object is allocated at this size first
ACCEPTS_PER_WAKEUP = 64
HIGH_WATER = 64 * 1024

_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_CLOSED_BY_PEER = (ssl.SSLZeroReturnError, ssl.SSLEOFError)


class TLSServer:
    """Accepts connections on a listening socket and hands each, after its handshake, to a new protocol.
    `close()` stops accepting (and closes the socket, so the kernel sends new connections to the other
    workers)."""

    def __init__(self, loop, sock: socket.socket, context: ssl.SSLContext, protocol_factory, handshake_timeout: float):
        self.loop = loop
        self.sock = sock
        self.context = context
        self.protocol_factory = protocol_factory
        self.handshake_timeout = handshake_timeout
        self.closed = False
        # Connections still in their handshake: a draining worker waits for them as for any connection.
        self.handshaking: set[TLSTransport] = set()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors: stop accepting for a moment instead of spinning on the error.
                log.warning("accept failed: %s", exc)
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(0.5, self._resume_accepting)
                return
            try:
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                TLSTransport(self.loop, conn, address, self.context, self.protocol_factory, self.handshake_timeout,
                             self.handshaking)
            except OSError:
                conn.close()

    def _resume_accepting(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    async def wait_closed(self) -> None:
        return None


class TLSTransport(asyncio.Transport):
    __slots__ = (
        "loop", "sock", "fd", "ssl", "protocol", "protocol_factory", "peername", "closing", "closed", "reading",
        "buffer", "buffered", "high_water", "low_water", "protocol_paused", "handshake_timer", "writer_on",
        "handshaking",
    )

    def __init__(self, loop, sock: socket.socket, address, context: ssl.SSLContext, protocol_factory, handshake_timeout: float,
                 handshaking: set):
        self.loop = loop
        self.fd = sock.fileno()
        self.ssl = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        self.sock = self.ssl._sslobj  # OpenSSL's connection object: read/write/pending without the Python layer
        self.peername = address
        self.protocol = None
        self.protocol_factory = protocol_factory
        self.closing = False
        self.closed = False
        self.reading = False
        self.buffer: collections.deque = collections.deque()
        self.buffered = 0
        self.high_water = HIGH_WATER
        self.low_water = HIGH_WATER // 4
        self.protocol_paused = False
        self.writer_on = False
        self.handshake_timer = loop.call_later(handshake_timeout, self._handshake_expired)
        self.handshaking = handshaking
        handshaking.add(self)
        self._handshake()

    # -- the handshake --------------------------------------------------------------------------------------
    def _handshake(self) -> None:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._wait_for(write=False, callback=self._handshake)
            return
        except ssl.SSLWantWriteError:
            self._wait_for(write=True, callback=self._handshake)
            return
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", self.peername, exc)
            self._teardown(None)
            return
        self.handshake_timer.cancel()
        self.handshake_timer = None
        self.handshaking.discard(self)
        self._wait_for(write=False, callback=self._on_readable)
        self.reading = True
        self.protocol = protocol = self.protocol_factory()
        protocol.connection_made(self)
        if self.sock.pending() and self.reading and not self.closed:
            self._on_readable()

    def _wait_for(self, write: bool, callback) -> None:
        loop = self.loop
        if write:
            loop.remove_reader(self.fd)
            loop.add_writer(self.fd, callback)
            self.writer_on = True
        else:
            if self.writer_on:
                loop.remove_writer(self.fd)
                self.writer_on = False
            loop.add_reader(self.fd, callback)

    def _handshake_expired(self) -> None:
        self.handshake_timer = None
        if self.protocol is None and not self.closed:
            log.debug("TLS handshake with %s timed out", self.peername)
            self._teardown(None)

    # -- reading ---------------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        sock = self.sock
        try:
            data = sock.read(READ_SIZE)
            if sock.pending():
                parts = [data]
                while sock.pending():
                    parts.append(sock.read(READ_SIZE))
                data = b"".join(parts)
        except _WANT:
            return  # a partial record, or one without application data (a TLS 1.3 ticket, a key update)
        except _CLOSED_BY_PEER:
            data = b""
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)
            return
        if data:
            self.protocol.data_received(data)
            return
        self.pause_reading()
        if not self.protocol.eof_received():
            self.close()

    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            if not self.closed:
                self.loop.remove_reader(self.fd)

    def resume_reading(self) -> None:
        if not self.reading and not self.closing and self.protocol is not None:
            self.reading = True
            self.loop.add_reader(self.fd, self._on_readable)
            if self.sock.pending():
                self.loop.call_soon(self._read_held)

    def _read_held(self) -> None:
        """Records OpenSSL decrypted before reading was paused: the socket will not signal them."""
        if self.reading and not self.closed:
            self._on_readable()

    def is_reading(self) -> bool:
        return self.reading

    # -- writing ---------------------------------------------------------------------------------------------
    def write(self, data) -> None:
        if self.closing or not data:
            return
        if self.buffer:
            self._hold(data)
            return
        try:
            self.sock.write(data)
            return
        except _WANT:
            pass  # SSL_write must be called again with the same bytes once the socket takes more
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)
            return
        self._hold(data)
        self.loop.add_writer(self.fd, self._on_writable)
        self.writer_on = True

    def writelines(self, parts) -> None:
        self.write(b"".join(parts))

    def _hold(self, data) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)
        self.buffer.append(data)
        self.buffered += len(data)
        if not self.protocol_paused and self.buffered > self.high_water:
            self.protocol_paused = True
            try:
                self.protocol.pause_writing()
            except Exception:  # noqa: BLE001 - as asyncio's transports do
                log.exception("pause_writing failed")

    def _on_writable(self) -> None:
        buffer = self.buffer
        sock = self.sock
        while buffer:
            head = buffer[0]
            try:
                sock.write(head)
            except _WANT:
                return
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            buffer.popleft()
            self.buffered -= len(head)
            if len(buffer) > 1:
                # only after the retried bytes are out may the rest be joined into one write
                rest = b"".join(buffer)
                buffer.clear()
                buffer.append(rest)
        self.loop.remove_writer(self.fd)
        self.writer_on = False
        if self.protocol_paused and self.buffered <= self.low_water:
            self.protocol_paused = False
            try:
                self.protocol.resume_writing()
            except Exception:  # noqa: BLE001
                log.exception("resume_writing failed")
        if self.closing and not self.closed:
            self._shutdown()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.low_water, self.high_water

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.high_water = HIGH_WATER if high is None else high
        self.low_water = self.high_water // 4 if low is None else low

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections are closed with close_notify")

    # -- closing ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.pause_reading()
        if not self.buffer:
            self._shutdown()

    def _shutdown(self) -> None:
        try:
            self.sock.shutdown()  # close_notify; the peer's is not waited for
        except (ssl.SSLError, OSError, ValueError):
            pass
        self._teardown(None)

    def abort(self) -> None:
        self.closing = True
        self._teardown(None)

    def _fatal(self, exc) -> None:
        log.debug("TLS connection with %s failed: %s", self.peername, exc)
        self.closing = True
        self._teardown(exc if isinstance(exc, OSError) else None)

    def _teardown(self, exc) -> None:
        if self.closed:
            return
        self.closed = True
        self.closing = True
        self.handshaking.discard(self)
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None
        loop = self.loop
        loop.remove_reader(self.fd)
        if self.writer_on:
            loop.remove_writer(self.fd)
            self.writer_on = False
        self.reading = False
        self.buffer.clear()
        self.buffered = 0
        try:
            self.ssl.close()
        except OSError:
            pass
        if self.protocol is not None:
            loop.call_soon(self.protocol.connection_lost, exc)

    def is_closing(self) -> bool:
        return self.closing

    # -- what the protocols ask about the connection ---------------------------------------------------------
    def get_extra_info(self, name, default=None):
        if name == "peername":
            return self.peername
        if name == "ssl_object" or name == "socket":
            return self.ssl
        if name == "sockname":
            try:
                return self.ssl.getsockname()
            except OSError:
                return default
        if name == "sslcontext":
            return self.ssl.context
        if name == "peercert":
            return self.ssl.getpeercert()
        if name == "cipher":
            return self.ssl.cipher()
        if name == "compression":
            return self.ssl.compression()
        return default

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def get_protocol(self):
        return self.protocol
