"""A worker process: one uvloop event loop serving the listening sockets it inherited from the master.

SIGTERM or SIGQUIT: drain (stop accepting, finish in-flight requests and tunnels, close idle
keep-alive connections) up to the drain deadline, then exit. SIGINT: exit now.
"""

from __future__ import annotations

import asyncio
from time import monotonic
import ctypes
import gc
import logging
import os
import signal
import sys

from bastion.http.h1_server import ClientConnection, ProxyProtocolConnection
from bastion.proxy.exchange import reseed_request_ids

log = logging.getLogger("bastion.worker")

SWEEP_INTERVAL = 0.25
TICK_EVERY = 4  # sweeps per runtime tick (pool sweeps, metrics and log flushes)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if the master dies, so no worker is ever orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Worker:
    def __init__(self, runtime, listen_sockets: list, admin_socket, master_pid: int, generation: int):
        self.runtime = runtime
        self.listen_sockets = listen_sockets
        self.admin_socket = admin_socket
        self.master_pid = master_pid
        self.generation = generation
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connections: set[ClientConnection] = set()
        self.tunnels = 0
        self.draining = False
        self.stopping_now = False
        self.drain_deadline = 0.0
        self.servers: list = []
        self.stopped: asyncio.Future | None = None

    # -- called by connections ----------------------------------------------------------------------------
    def connection_opened(self, conn) -> None:
        self.connections.add(conn)
        if self.draining:
            conn.drain(monotonic())

    def connection_closed(self, conn) -> None:
        self.connections.discard(conn)
        if self.draining and not self._busy() and self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(None)

    def tunnel_opened(self, conn) -> None:
        self.tunnels += 1

    def tunnel_closed(self, conn) -> None:
        self.tunnels -= 1

    # -- lifecycle ----------------------------------------------------------------------------------------
    def run(self) -> int:
        _die_with_parent()
        reseed_request_ids()
        # The configuration and imports are long-lived: keep them out of every collection, and collect
        # the young generation less often (the hot path makes few reference cycles).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        import uvloop

        self.loop = loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._loop_exception)
        try:
            return loop.run_until_complete(self._main())
        finally:
            try:
                self.runtime.close()
            except Exception:  # noqa: BLE001 - exiting anyway; the log says why
                log.exception("while closing the runtime")
            loop.close()

    def _loop_exception(self, loop, context) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            return
        loop.default_exception_handler(context)

    async def _main(self) -> int:
        loop = self.loop
        self.stopped = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, self.begin_drain)
        loop.add_signal_handler(signal.SIGQUIT, self.begin_drain)
        loop.add_signal_handler(signal.SIGINT, self._stop_now)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        runtime = self.runtime
        metrics = getattr(runtime, "metrics", None)
        if metrics is not None:
            metrics.set_gauge("open_connections", lambda: len(self.connections))
            metrics.set_gauge("open_tunnels", lambda: self.tunnels)
        from bastion.upstream.discovery import Discovery

        # Discovered servers are looked up before the first request is accepted.
        discovery = Discovery(runtime)
        await discovery.start()
        for address, sock in self.listen_sockets:
            if self.draining:
                break  # told to drain while starting: accept nothing rather than close what we accept
            listener = runtime.listeners.get(address)
            context = listener.tls.default if listener is not None and listener.tls is not None else None
            protocol = ProxyProtocolConnection if listener is not None and listener.proxy_protocol else ClientConnection
            factory = lambda listener=listener, protocol=protocol: protocol(self, runtime, listener)  # noqa: E731
            if context is not None and protocol is ClientConnection:
                from bastion.tls.transport import TLSServer

                server = TLSServer(loop, sock, context, factory, runtime.config.timeouts.client_header)
            else:
                server = await loop.create_server(factory, sock=sock, backlog=4096, ssl=context)
            self.servers.append(server)
            if self.draining:
                server.close()  # the drain began while this server was being created
        if self.admin_socket is not None and not self.draining:
            from bastion.admin.server import AdminConnection

            server = await loop.create_server(lambda: AdminConnection(self), sock=self.admin_socket, backlog=128)
            self.servers.append(server)
            if self.draining:
                server.close()
        sweeper = loop.create_task(self._sweep())
        try:
            await self._drained()
        finally:
            sweeper.cancel()
            discovery.stop()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.abort()
        return 0

    async def _sweep(self) -> None:
        loop = self.loop
        count = 0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = monotonic()
            for conn in list(self.connections):
                try:
                    conn.check_deadline(now)
                except Exception:  # noqa: BLE001 - one broken connection must not stop the timers
                    log.exception("timer of a connection failed")
                    if conn.transport is not None:
                        conn.transport.abort()
            count += 1
            if count % TICK_EVERY == 0 or self.draining:
                try:
                    self.runtime.tick(now)
                except Exception:  # noqa: BLE001
                    log.exception("periodic work failed")
            if os.getppid() != self.master_pid and not self.draining:
                log.warning("master %d is gone; draining", self.master_pid)
                self.begin_drain()
            if self.draining:
                if not self._busy() or now >= self.drain_deadline:
                    if self.connections:
                        log.warning("drain deadline passed with %d connections open; closing them", len(self.connections))
                    if not self.stopped.done():
                        self.stopped.set_result(None)

    def _busy(self) -> bool:
        """Connections open, or TLS connections still in their handshake (not yet connections)."""
        if self.connections:
            return True
        for server in self.servers:
            if getattr(server, "handshaking", None):
                return True
        return False

    async def _drained(self) -> None:
        """Wait until stopped; when draining, also until connections accepted just before the drain are done.

        The event loop accepts a connection in one callback and announces it (connection_made) in the next,
        so a drain that begins between the two sees no connections and would close the unannounced one
        unanswered on the way out."""
        while True:
            await self.stopped
            if self.stopping_now or not self.draining:
                return
            await asyncio.sleep(0)
            if not self._busy() or monotonic() >= self.drain_deadline:
                return
            self.stopped = self.loop.create_future()

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.runtime.draining = True
        now = monotonic()
        self.drain_deadline = now + self.runtime.config.timeouts.drain
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.drain(now)
        if not self._busy() and not self.stopped.done():
            self.stopped.set_result(None)

    def _stop_now(self) -> None:
        self.stopping_now = True
        if not self.stopped.done():
            self.stopped.set_result(None)


def run_worker(runtime, listen_sockets, admin_socket, master_pid: int, generation: int) -> int:
    try:
        return Worker(runtime, listen_sockets, admin_socket, master_pid, generation).run()
    except KeyboardInterrupt:
        return 0
    except Exception:  # noqa: BLE001 - reported by the master as an unexpected worker exit
        log.exception("worker failed")
        return 1
    finally:
        sys.stdout.flush()
