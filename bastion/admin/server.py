"""The admin listener (127.0.0.1 by default), served by every worker from the shared socket.

GET /metrics   Prometheus text, summed over all workers (prometheus_client multiprocess mode)
GET /healthz   200 "ok" while the worker is not draining
POST /reload   asks the master to reload the configuration (same as SIGHUP)
GET /bans      the clients banned on this node, as JSON (see docs/security.md)
POST /bans/IP  bans IP (query: seconds=N, default the auto-ban's ban_time or 600); with Redis, on every node
DELETE /bans/IP  lifts a ban, on this node and (with Redis) on every node
POST /cache/purge?url=URL | ?prefix=URL-PREFIX | ?tag=TAG | ?all=1
               purges cached responses in every worker (see docs/caching.md); JSON answer
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

from httptools import HttpParserError, HttpRequestParser

from bastion.http.headers import status_line


def render_metrics() -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry)


class AdminConnection(asyncio.Protocol):
    def __init__(self, worker):
        self.worker = worker
        self.transport = None
        self.parser = HttpRequestParser(self)
        self.url = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            self._send(400, b"bad request\n", b"text/plain")

    def on_url(self, url: bytes):
        self.url += url

    def on_message_complete(self):
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        if path == b"/metrics" and method in (b"GET", b"HEAD"):
            # Flush this worker's pending counts first so a scrape sees every answered request.
            metrics = getattr(self.worker.runtime, "metrics", None)
            if metrics is not None:
                metrics.flush()
            self._send(200, render_metrics(), b"text/plain; version=0.0.4; charset=utf-8")
        elif path == b"/healthz" and method in (b"GET", b"HEAD"):
            if self.worker.draining:
                self._send(503, b"draining\n", b"text/plain")
            else:
                self._send(200, b"ok\n", b"text/plain")
        elif path == b"/bans" or path.startswith(b"/bans/"):
            self._bans(method, path)
        elif path == b"/cache/purge" and method in (b"POST", b"PURGE"):
            self._purge()
        elif path == b"/reload" and method == b"POST":
            os.kill(self.worker.master_pid, signal.SIGHUP)
            self._send(202, b"reload requested\n", b"text/plain")
        else:
            self._send(404, b"not found\n", b"text/plain")

    def _bans(self, method: bytes, path: bytes) -> None:
        from urllib.parse import parse_qs, unquote

        security = getattr(self.worker.runtime, "security", None)
        bans = security.bans if security is not None else None
        if bans is None:
            self._send(404, b"bans are off: configure security.auto_ban (or security.redis)\n", b"text/plain")
            return
        if path == b"/bans" and method in (b"GET", b"HEAD"):
            self._send(200, json.dumps({"bans": bans.listing()}).encode() + b"\n", b"application/json")
            return
        ip = unquote(path[len(b"/bans/"):].decode("latin-1"))
        try:
            from bastion.security.bans import normalize_ip

            ip = normalize_ip(ip)
        except ValueError as exc:
            self._send(400, f"{exc}\n".encode(), b"text/plain")
            return
        if method == b"DELETE":
            async def lift():
                found = await bans.lift_everywhere(ip)
                self._send(200 if found else 404, json.dumps({"ip": ip, "lifted": found}).encode() + b"\n",
                           b"application/json")

            asyncio.get_running_loop().create_task(lift())
        elif method == b"POST":
            query = parse_qs(self.url.partition(b"?")[2].decode("latin-1"))
            default = security.spec.auto_ban.ban_time if security.spec.auto_ban is not None else 600.0
            try:
                seconds = float(query.get("seconds", [default])[0])
            except ValueError:
                self._send(400, b"seconds must be a number\n", b"text/plain")
                return
            until = bans.ban(ip, seconds, "through the admin API")
            self._send(200, json.dumps({"ip": ip, "until": round(until, 3)}).encode() + b"\n", b"application/json")
        else:
            self._send(405, b"use GET /bans, POST /bans/IP or DELETE /bans/IP\n", b"text/plain")
    def _purge(self) -> None:
        import json
        from urllib.parse import parse_qsl

        cache = getattr(self.worker.runtime, "cache", None)
        if cache is None:
            self._send(404, b'{"error": "no route has a cache"}\n', b"application/json")
            return
        query = self.url.partition(b"?")[2].decode("latin-1")
        args = dict(parse_qsl(query, keep_blank_values=True))
        for kind in ("url", "prefix", "tag", "all"):
            if kind in args:
                value = args[kind]
                if kind == "url" or kind == "prefix":
                    value = _normalize_url(value)
                asyncio.get_event_loop().create_task(self._purge_and_answer(cache, kind, value))
                return
        self._send(400, b'{"error": "give url=, prefix=, tag= or all=1"}\n', b"application/json")

    async def _purge_and_answer(self, cache, kind: str, value: str) -> None:
        import json

        here, shared = await cache.purge_and_wait(kind, value)
        body = {"purged_here": here, kind: value,
                "note": "purged in this worker; the others apply it before their next cache lookup"}
        if shared is not None:
            body["purged_in_redis"] = shared
        if self.transport is not None and not self.transport.is_closing():
            self._send(200, (json.dumps(body) + "\n").encode(), b"application/json")

    def _send(self, status: int, body: bytes, content_type: bytes) -> None:
        head = (
            status_line(status)
            + b"Content-Type: " + content_type + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(head + body)
        self.transport.close()


def _normalize_url(url: str) -> str:
    """Scheme and host lower-cased, as the cache indexes them."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}"
