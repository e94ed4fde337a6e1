"""Features built on the HTTP/1.1 connection work the same on HTTP/2 streams: cache hits (memory and
disk, whose large bodies are sent from their file), and the WAF's body inspection. Driven with curl."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import urllib.request
import uuid

import pytest

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by make test")


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", str(int(timeout)), "-D", "-", *args],
                          capture_output=True, timeout=timeout + 10)


def split(out: bytes) -> tuple[int, dict, bytes]:
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/2 "), lines[0]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def origin_hits(backend, path):
    with urllib.request.urlopen(backend.url + "/__cache/hits", timeout=5) as r:
        return json.load(r).get(path.split("?")[0], 0)


def test_cache_hits_over_http2_from_memory_and_from_disk(bastion, backend, tmp_path):
    b = bastion({"cache": {"disk": {"path": str(tmp_path / "disk"), "size": "64m"}},
                 "proxy": {"request_id_header": None},
                 "routes": [
                     {"name": "disk", "match": {"path": "/cache/disk-"}, "upstream": {"servers": [backend.address]},
                      "cache": {"store": "disk"}},
                     {"name": "memory", "upstream": {"servers": [backend.address]}, "cache": True}]})
    small = f"/cache/{uuid.uuid4().hex}?cc=max-age%3D60"
    large = f"/cache/disk-{uuid.uuid4().hex}?cc=max-age%3D600&size={3 << 20}"
    for path, size in ((small, None), (large, 3 << 20)):
        status, h, first = split(curl(f"{b.url}{path}").stdout)
        assert status == 200 and "fwd=uri-miss" in h["cache-status"]
        r = curl(f"{b.url}{path}")
        assert r.returncode == 0, r.stderr
        status, h, again = split(r.stdout)
        assert status == 200 and "hit" in h["cache-status"], h
        assert hashlib.sha256(again).digest() == hashlib.sha256(first).digest()
        assert int(h["content-length"]) == len(first) and (size is None or len(first) == size)
        assert origin_hits(backend, path) == 1


def test_waf_inspects_http2_request_bodies(bastion, backend):
    b = bastion({"waf": {"mode": "block", "paranoia_level": 1, "audit_log": None},
                 "routes": [{"upstream": {"servers": [backend.address]}}]})
    before = backend.stats()
    status, _, _ = split(curl("-d", "q=1' or 1=1 union select password from users--", f"{b.url}/echo/form").stdout)
    assert status == 403 and backend.stats() == before
    status, _, body = split(curl("-d", "q=hello world", f"{b.url}/echo/form").stdout)
    assert status == 200 and json.loads(body)["body_length"] == len("q=hello world")
