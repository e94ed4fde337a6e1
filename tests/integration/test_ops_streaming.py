"""1 GiB through Bastion in each direction with the worker's memory flat: bodies stream with
backpressure, nothing buffers a whole body."""

import hashlib
import socket
import threading
import time

GIB = 1 << 30
PATTERN = b"0123456789abcdef" * 4096  # what the backend's /bytes sends, 64 KiB


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class PeakRss(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.running = True

    def run(self):
        while self.running:
            try:
                self.peak = max(self.peak, rss_kb(self.pid))
            except OSError:
                return
            time.sleep(0.05)


def single_worker(b) -> int:
    deadline = time.monotonic() + 10
    while not b.worker_pids():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (pid,) = b.worker_pids()
    return pid


def test_1gib_download_streams_with_flat_memory(bastion, backend):
    b = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]})
    pid = single_worker(b)
    before = rss_kb(pid)
    watch = PeakRss(pid)
    watch.start()
    digest = hashlib.sha256()
    received = 0
    with socket.create_connection(("127.0.0.1", b.port), timeout=30) as s:
        s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % GIB)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        head, _, body = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % GIB in head
        digest.update(body)
        received = len(body)
        slow_until = time.monotonic() + 2.0
        while received < GIB:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
            if time.monotonic() < slow_until:
                time.sleep(0.01)  # a slow reader for a while: Bastion must stop reading the backend
    watch.running = False
    watch.join()
    expected = hashlib.sha256()
    for _ in range(GIB // len(PATTERN)):
        expected.update(PATTERN)
    assert received == GIB and digest.hexdigest() == expected.hexdigest()
    growth_mib = (watch.peak - before) / 1024
    print(f"download: worker RSS {before / 1024:.1f} MiB, peak {watch.peak / 1024:.1f} MiB")
    assert growth_mib < 64, f"worker RSS grew by {growth_mib:.0f} MiB"


def test_1gib_upload_streams_with_flat_memory(bastion, backend):
    b = bastion({"limits": {"body": "2g"}, "routes": [{"upstream": {"servers": [backend.address]}}]})
    pid = single_worker(b)
    before = rss_kb(pid)
    watch = PeakRss(pid)
    watch.start()
    block = bytes(range(256)) * 4096  # 1 MiB
    expected = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", b.port), timeout=60) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % GIB)
        for _ in range(GIB // len(block)):
            s.sendall(block)
            expected.update(block)
        answer = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    watch.running = False
    watch.join()
    assert answer.startswith(b"HTTP/1.1 200")
    assert f'"length": {GIB}'.encode() in answer and expected.hexdigest().encode() in answer
    growth_mib = (watch.peak - before) / 1024
    print(f"upload: worker RSS {before / 1024:.1f} MiB, peak {watch.peak / 1024:.1f} MiB")
    assert growth_mib < 64, f"worker RSS grew by {growth_mib:.0f} MiB"
