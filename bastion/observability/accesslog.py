"""The access log: one line per exchange, JSON (default) or the combined format, written in batches.

Lines are collected in memory and written with one os.write per batch (at most every tick of the
worker's timer, or when 256 lines are waiting), so logging costs a string format per request, not a
system call.
"""

from __future__ import annotations

import json
from time import monotonic
import os
import time

_BATCH = 256
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _json_str(value: str | None) -> str:
    if value is None:
        return "null"
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return '"' + value + '"'
    return json.dumps(value)


class AccessLog:
    def __init__(self, fmt: str = "json", path: str = "stdout"):
        self.format = fmt
        self.path = path
        self.fd: int | None = None
        self.lines: list[bytes] = []
        self._second = -1
        self._stamp = ""

    def _open(self) -> int:
        if self.path == "stdout":
            return 1
        if self.path == "stderr":
            return 2
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _now(self, wall: float) -> tuple[str, int]:
        second = int(wall)
        if second != self._second:
            self._second = second
            t = time.gmtime(second)
            if self.format == "json":
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", t)
            else:
                self._stamp = f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
        return self._stamp, int((wall - second) * 1000)

    def logging(self, ex) -> None:
        wall = time.time()
        duration = (ex.end or monotonic()) - ex.start
        if self.format == "json":
            line = self._json_line(ex, wall, duration)
        else:
            line = self._combined_line(ex, wall)
        self.lines.append(line.encode("utf-8", "replace"))
        if len(self.lines) >= _BATCH:
            self.flush()

    def _json_line(self, ex, wall: float, duration: float) -> str:
        stamp, ms = self._now(wall)
        target = (ex.target or ex.path).decode("latin-1")
        peer = ex.peer
        up_time = ex.upstream_time
        route = ex.route.name if ex.route is not None else None
        return (
            f'{{"time":"{stamp}.{ms:03d}Z","client":"{ex.client_ip}","method":{_json_str(ex.method.decode("latin-1"))},'
            f'"target":{_json_str(target)},"status":{ex.status},"bytes_in":{ex.bytes_in},"bytes_out":{ex.bytes_out},'
            f'"duration":{duration:.6f},"upstream":{_json_str(peer.address) if peer is not None else "null"},'
            f'"upstream_duration":{"null" if up_time is None else format(up_time, ".6f")},'
            f'"route":{_json_str(route)},"request_id":{_json_str(ex.request_id)},"error":{_json_str(ex.error)}}}\n'
        )

    def _combined_line(self, ex, wall: float) -> str:
        stamp, _ = self._now(wall)
        referer = user_agent = b"-"
        for name, value in ex.headers:
            lname = name.lower()
            if lname == b"referer":
                referer = value
            elif lname == b"user-agent":
                user_agent = value
        target = (ex.target or ex.path).decode("latin-1")
        request = f"{ex.method.decode('latin-1')} {target} HTTP/{ex.http_version}"
        esc = lambda s: s.replace("\\", "\\\\").replace('"', '\\"')  # noqa: E731
        return (
            f'{ex.client_ip} - - [{stamp}] "{esc(request)}" {ex.status} {ex.bytes_out} '
            f'"{esc(referer.decode("latin-1"))}" "{esc(user_agent.decode("latin-1"))}"\n'
        )

    def flush(self) -> None:
        if not self.lines:
            return
        data = b"".join(self.lines)
        self.lines = []
        if self.fd is None:
            self.fd = self._open()
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                continue
            except OSError:
                return
            view = view[written:]
