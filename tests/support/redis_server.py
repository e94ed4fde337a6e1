"""A real redis-server (Debian's package) on a free loopback port, one per test session, never the
system service."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

from tests.support.ports import free_port


class RedisServer:
    def __init__(self, workdir):
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited at start")
            try:
                if self.command("PING") == "+PONG":
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not answer PING")

    def command(self, *args: str) -> str:
        """One command over a raw socket (RESP), the first line of the answer: for tests' own checks."""
        payload = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(payload)
            return s.recv(65536).split(b"\r\n", 1)[0].decode()

    def flush(self) -> None:
        self.command("FLUSHALL")

    def pause(self) -> None:
        """Make the server unreachable (SIGSTOP) to test what happens when Redis is down."""
        self.proc.send_signal(19)

    def resume(self) -> None:
        self.proc.send_signal(18)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
