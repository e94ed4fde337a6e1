"""Fixtures that start real processes: test backends and Bastion itself, as a user starts it (the
`bastion` console script of this environment, with a config file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import socket
from pathlib import Path

import pytest
import yaml

from tests.support.ports import free_port
from tests.support.raw import RecordingServer
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
BASTION = str(Path(sys.executable).parent / "bastion")
BACKEND = str(ROOT / "tests" / "support" / "backend.py")


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Backend:
    def __init__(self, name: str = "backend", host: str = "127.0.0.1", port: int | None = None, extra: list | None = None):
        self.name = name
        self.host = host
        self.port = port or free_port()
        self.address = f"{host}:{self.port}"
        self.url = f"http://{self.address}"
        self.proc = subprocess.Popen(
            [sys.executable, BACKEND, "--port", str(self.port), "--name", name, "--host", host, *(extra or [])],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        line = self.proc.stdout.readline()
        if "ready" not in line or not wait_port(self.port, 10, self.proc, host):
            self.stop()
            raise RuntimeError(f"test backend {name} did not start")

    def stats(self) -> int:
        import urllib.request

        with urllib.request.urlopen(self.url + "/__stats", timeout=5) as r:
            return json.load(r)["requests"]

    def connections(self) -> int:
        import urllib.request

        with urllib.request.urlopen(self.url + "/__stats", timeout=5) as r:
            return json.load(r)["connections"]

    def set_health(self, up: bool) -> None:
        import urllib.request

        req = urllib.request.Request(self.url + ("/__health/up" if up else "/__health/down"), method="POST")
        urllib.request.urlopen(req, timeout=5).read()

    def reset(self) -> None:
        import urllib.request

        urllib.request.urlopen(self.url + "/__reset", timeout=5).read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def backend():
    b = Backend("backend")
    yield b
    b.stop()


@pytest.fixture
def backend_factory():
    made = []

    def make(name: str = "backend", host: str = "127.0.0.1", port: int | None = None, extra: list | None = None) -> Backend:
        b = Backend(name, host, port, extra)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


class Dnsmasq:
    """A real DNS server (Debian's dnsmasq) on a loopback port, answering from a hosts file the test
    rewrites (SIGHUP makes it re-read the file) and from fixed SRV records."""

    def __init__(self, tmp: Path, srv: list[str] = ()):
        self.port = free_port()
        self.hosts = tmp / "dns-hosts"
        self.hosts.write_text("")
        args = ["dnsmasq", "--no-daemon", f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                "--no-resolv", "--no-hosts", f"--addn-hosts={self.hosts}", "--log-facility=-", f"--pid-file={tmp}/dnsmasq.pid"]
        args += [f"--srv-host={record}" for record in srv]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.address = f"127.0.0.1:{self.port}"
        time.sleep(0.3)
        if self.proc.poll() is not None:
            raise RuntimeError("dnsmasq did not start (is it installed? make test installs it)")

    def set_hosts(self, lines: list[str]) -> None:
        self.hosts.write_text("\n".join(lines) + "\n")
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@pytest.fixture
def dnsmasq_factory(tmp_path):
    made = []

    def make(srv: list[str] = ()) -> Dnsmasq:
        d = Dnsmasq(tmp_path, srv)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the session; tests flush it (`redis_server.flush()`) as they need."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def recording_server():
    server = RecordingServer()
    yield server
    server.close()


class BastionProcess:
    def __init__(self, tmp: Path, config, workers: int = 1, env: dict | None = None):
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.config_path = tmp / "bastion.yaml"
        self.pid_file = tmp / "bastion.pid"
        self.workers = workers
        self.env = dict(os.environ, **(env or {}))
        self._stdout = open(tmp / "stdout.log", "wb")
        self._stderr = open(tmp / "stderr.log", "wb")
        self.write_config(config)
        self.proc = subprocess.Popen([BASTION, "run", "-c", str(self.config_path)], stdout=self._stdout,
                                     stderr=self._stderr, env=self.env, cwd=str(tmp))
        self.pid = self.proc.pid

    def _complete(self, config) -> dict:
        data = yaml.safe_load(config) if isinstance(config, str) else dict(config)
        data = dict(data or {})
        if data.get("listeners"):
            first = data["listeners"][0]
            address = first["address"] if isinstance(first, dict) else str(first)
            self.port = int(address.rsplit(":", 1)[1])
            self.url = f"{'https' if isinstance(first, dict) and first.get('tls') else 'http'}://127.0.0.1:{self.port}"
        data.setdefault("listeners", [f"127.0.0.1:{self.port}"])
        data.setdefault("admin", {"address": f"127.0.0.1:{self.admin_port}"})
        data.setdefault("pid_file", str(self.pid_file))
        data.setdefault("workers", self.workers)
        return data

    def write_config(self, config) -> None:
        self.config_path.write_text(yaml.safe_dump(self._complete(config), sort_keys=False))

    def wait_ready(self, timeout: float = 15) -> None:
        if not wait_port(self.port, timeout, self.proc):
            self.kill()
            raise RuntimeError(f"bastion did not start:\n{self.stderr()}")

    def worker_pids(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def reload(self) -> None:
        os.kill(self.pid, signal.SIGHUP)

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stdout(self) -> str:
        self._stdout.flush()
        return (self.tmp / "stdout.log").read_text(errors="replace")

    def stderr(self) -> str:
        self._stderr.flush()
        return (self.tmp / "stderr.log").read_text(errors="replace")

    def access_log(self) -> list[dict]:
        lines = []
        for line in self.stdout().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines

    def wait_access_log(self, n: int, timeout: float = 5) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.access_log()
            if len(lines) >= n or time.monotonic() > deadline:
                return lines
            time.sleep(0.1)

    def close_files(self) -> None:
        self._stdout.close()
        self._stderr.close()


@pytest.fixture
def bastion(tmp_path):
    started: list[BastionProcess] = []

    def start(config, *, workers: int = 1, env: dict | None = None, wait: bool = True) -> BastionProcess:
        b = BastionProcess(tmp_path / f"b{len(started)}" if started else tmp_path, config, workers, env)
        started.append(b)
        if wait:
            b.wait_ready()
        return b

    yield start
    for b in started:
        try:
            b.stop(10)
        finally:
            b.close_files()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test")
