"""Large response bodies moved from the backend's socket to the client's inside the kernel (splice(2)).

A plain-TCP HTTP/1.1 response with a Content-Length, no body filter (no cache store, no compression) and
a plain-TCP HTTP/1.1 client does not need its body in Python at all. Once the head and the first read of
the body are out, the backend connection stops reading (its transport is paused), and the rest of the
body goes backend socket -> pipe -> client socket with splice(2): no copy into user space and no Python
per chunk, only per pipe-full (up to 1 MiB).

uvloop has no sendfile or splice of its own, and refuses to watch a descriptor that one of its transports
owns, so readiness is watched on duplicates of the two sockets (the same open sockets under other
numbers). The duplicates are taken out of the event loop before they are closed: epoll tracks an open
socket, not a number, and a closed duplicate left registered would keep reporting under a number that may
be reused.

When the body is over, the backend connection gets a new parser (the old one is still in the middle of a
body it will never see) and goes back to the pool as after any response. If either side fails, the
response is cut as a streamed response that fails midway is.
"""

from __future__ import annotations

import fcntl
import logging
import os
from typing import Any

log = logging.getLogger("bastion.http")

# Below this many body bytes still to come, a body is streamed as usual: setting up the pipe and the two
# watches costs about as much as copying a few hundred KiB.
SPLICE_MIN = 256 * 1024
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
_MORE = getattr(os, "SPLICE_F_MORE", 4)
# Rounds of (backend -> pipe, pipe -> client) per wake-up before the loop serves other connections.
_ROUNDS = 8

try:
    from uvloop.loop import TCPTransport as _PLAIN_TCP
except ImportError:  # pragma: no cover - Bastion runs on uvloop; without it bodies are streamed
    _PLAIN_TCP = None

AVAILABLE = _PLAIN_TCP is not None and hasattr(os, "splice")


def plain_tcp(transport: Any) -> bool:
    """Whether the transport writes what it is given to a TCP socket as is (not TLS, not a test double)."""
    return AVAILABLE and type(transport) is _PLAIN_TCP


class BodySplice:
    """One response body in flight from `up` (an UpstreamConnection) to `client` (a ClientConnection)."""

    __slots__ = ("client", "up", "loop", "src", "dst", "pipe_r", "pipe_w", "capacity", "in_pipe", "remaining",
                 "moved", "reading", "writing", "open")

    def __init__(self, client: Any, up: Any, remaining: int) -> None:
        self.client = client
        self.up = up
        self.loop = client.loop
        self.remaining = remaining  # body bytes still in (or on their way to) the backend socket
        self.in_pipe = 0
        self.moved = 0  # body bytes written to the client
        self.reading = False
        self.writing = False
        self.open = False
        self.src = self.dst = self.pipe_r = self.pipe_w = -1
        self.capacity = 0

    def start(self) -> bool:
        """Take over the body; False (and nothing changed) when the descriptors cannot be had."""
        try:
            src_sock = self.up.transport.get_extra_info("socket")
            dst_sock = self.client.transport.get_extra_info("socket")
            if src_sock is None or dst_sock is None:
                return False
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.open = True
            self.src = os.dup(src_sock.fileno())
            self.dst = os.dup(dst_sock.fileno())
        except OSError as exc:
            log.debug("splice not started: %s", exc)
            self._close_descriptors()
            return False
        try:
            fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # (a user's pipe pages are capped: the default size works, with more wake-ups)
        self.capacity = fcntl.fcntl(self.pipe_w, _F_GETPIPE_SZ)
        self.up.pause()
        self.pump()
        return True

    def pump(self) -> None:
        if not self.open:
            return
        up = self.up
        want_read = want_write = False
        for _ in range(_ROUNDS):
            progressed = False
            room = self.capacity - self.in_pipe
            if self.remaining and room > 0:
                try:
                    n = os.splice(self.src, self.pipe_w, min(self.remaining, room), flags=_MOVE | _NONBLOCK)
                except BlockingIOError:
                    want_read = True
                except OSError as exc:
                    self._backend_failed(str(exc))
                    return
                else:
                    if n == 0:
                        self._backend_failed("closed")
                        return
                    self.in_pipe += n
                    self.remaining -= n
                    up.reads += 1  # (the backend is moving: its read timeout starts again at the next sweep)
                    progressed = True
                    want_read = False
            if self.in_pipe:
                try:
                    n = os.splice(self.pipe_r, self.dst, self.in_pipe,
                                  flags=_MOVE | _NONBLOCK | (_MORE if self.remaining else 0))
                except BlockingIOError:
                    want_write = True
                except OSError:
                    self._client_failed()
                    return
                else:
                    self.in_pipe -= n
                    self.moved += n
                    progressed = True
                    want_write = False
            if not self.remaining and not self.in_pipe:
                self._finish()
                return
            if not progressed:
                break
        else:
            # Out of rounds with work left: come back once the loop has served the others.
            want_read = bool(self.remaining) and self.in_pipe < self.capacity
            want_write = self.in_pipe > 0
        try:
            self._watch(want_read and self.in_pipe < self.capacity, want_write and self.in_pipe > 0)
        except (OSError, RuntimeError) as exc:  # (not expected: the loop would not watch a descriptor)
            log.error("splice: cannot watch the sockets: %s", exc)
            self._backend_failed("unwatchable")

    def _watch(self, read: bool, write: bool) -> None:
        if read != self.reading:
            self.reading = read
            if read:
                self.loop.add_reader(self.src, self.pump)
            else:
                self.loop.remove_reader(self.src)
        if write != self.writing:
            self.writing = write
            if write:
                self.loop.add_writer(self.dst, self.pump)
            else:
                self.loop.remove_writer(self.dst)

    def _close_descriptors(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src)
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst)
        for fd in (self.src, self.dst, self.pipe_r, self.pipe_w):
            if fd >= 0:
                os.close(fd)
        self.src = self.dst = self.pipe_r = self.pipe_w = -1
        self.open = False

    def cancel(self) -> None:
        """The client connection is going away: stop, and let go of the sockets."""
        self._close_descriptors()

    def _finish(self) -> None:
        self._close_descriptors()
        self.client.splice_finished(self, None)

    def _backend_failed(self, why: str) -> None:
        log.info("backend %s failed during a spliced body (%s)", self.up.peer.address, why)
        self._close_descriptors()
        self.client.splice_finished(self, "upstream_reset_midway")

    def _client_failed(self) -> None:
        self._close_descriptors()
        self.client.splice_finished(self, "client_closed")
