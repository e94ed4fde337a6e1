"""The disk store: one copy per node shared by the workers, kept across restarts, large bodies streamed."""

import hashlib
import json
import os
import time
import urllib.parse
import urllib.request

from tests.integration.test_cache import hits, q, request, url, wait_until


def disk_config(backend, folder, **cache):
    return {
        "cache": {"disk": {"path": str(folder), "size": "64m"}},
        "routes": [{"name": "app", "upstream": {"servers": [backend.address]},
                    "cache": {"store": "disk", "purge_from": ["127.0.0.1"], **cache}}],
    }


def objects(folder):
    return [os.path.join(d, f) for d, _, files in os.walk(os.path.join(folder, "o")) for f in files]


def test_workers_share_one_copy_on_disk(bastion, backend, tmp_path):
    folder = tmp_path / "cache"
    b = bastion(disk_config(backend, folder), workers=2)
    path = url(q(cc="max-age=600"))
    _, _, body = request(b, path)
    workers = set()

    def both_workers_hit():
        _, h, got = request(b, path, {"Connection": "close"})
        assert got == body
        if "hit" in h["cache-status"]:
            workers.add(h["x-request-id"][:12])
        return len(workers) == 2

    assert wait_until(both_workers_hit, timeout=20, interval=0.01)
    assert hits(backend, path) == 1  # the second worker read the first one's file
    assert len(objects(folder)) == 1


def test_the_disk_store_survives_a_restart(bastion, backend, tmp_path):
    folder = tmp_path / "cache"
    first = bastion(disk_config(backend, folder))
    path = url(q(cc="max-age=600", etag='"d"'))
    site = {"Host": "site.example"}  # the restarted Bastion listens on another port; the site is the same
    _, _, body = request(first, path, site)
    first.stop()
    second = bastion(disk_config(backend, folder))
    status, h, got = request(second, path, site)
    assert status == 200 and got == body and "hit" in h["cache-status"]
    assert hits(backend, path) == 1


def test_large_bodies_stream_to_disk_and_are_served_from_it(bastion, backend, tmp_path):
    folder = tmp_path / "cache"
    b = bastion(disk_config(backend, folder), workers=1)
    size = 3 << 20
    path = url(q(cc="max-age=600", size=str(size)))
    _, _, body = request(b, path)
    assert len(body) == size
    status, h, again = request(b, path)
    assert status == 200 and "hit" in h["cache-status"]
    assert hashlib.sha256(again).digest() == hashlib.sha256(body).digest()
    assert hits(backend, path) == 1
    assert any(os.path.getsize(p) > size for p in objects(folder))
    status, h, part = request(b, path, {"Range": f"bytes={size - 10}-"})
    assert status == 206 and part == body[-10:] and h["content-range"] == f"bytes {size - 10}-{size - 1}/{size}"
    status, h, empty = request(b, path, method="HEAD")
    assert status == 200 and empty == b"" and h["content-length"] == str(size)
    assert hits(backend, path) == 1


def test_purge_removes_the_file(bastion, backend, tmp_path):
    folder = tmp_path / "cache"
    b = bastion(disk_config(backend, folder), workers=2)
    path = url(q(cc="max-age=600", h_Cache_Tag="t-disk"))
    request(b, path)
    assert len(objects(folder)) == 1
    req = urllib.request.Request(b.admin_url + "/cache/purge?tag=t-disk", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.load(r)["purged_here"] >= 1
    assert objects(folder) == []
    for _ in range(6):
        _, h, _ = request(b, path, {"Connection": "close"})
        if "fwd=uri-miss" in h["cache-status"]:
            break
    assert hits(backend, path) == 2
