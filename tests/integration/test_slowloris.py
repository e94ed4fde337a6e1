"""1,000 slowloris connections (request heads a byte at a time) and 200 slow-body uploads against Bastion,
bounded in time, while a normal client keeps asking: the normal client gets every answer, the attackers
are cut off by the header timeout and the body minimum rate. The normal client's latency figures are
printed (and written to slowloris-figures.json in the test's folder) for the record: timing is not asserted
(the machine is shared), see docs/security.md for measured figures."""

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

SLOWLORIS = str(Path(__file__).resolve().parents[1] / "support" / "slowloris.py")


def p99(samples):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def measure(port, count=None, until=None):
    """Sequential requests, each on a new connection: (latencies, failures)."""
    latencies, failures = [], 0
    n = 0
    while (count is None or n < count) and (until is None or time.monotonic() < until) and n < 20_000:
        n += 1
        start = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/echo/normal")
            response = conn.getresponse()
            response.read()
            conn.close()
            if response.status != 200:
                failures += 1
                continue
        except (OSError, http.client.HTTPException):
            failures += 1
            continue
        latencies.append(time.perf_counter() - start)
        time.sleep(0.005)
    return latencies, failures


def test_slowloris_and_slow_bodies_do_not_hurt_a_normal_client(bastion, backend, tmp_path):
    b = bastion({"access_log": {"enabled": False},
                 "timeouts": {"client_header": "3s", "client_body": "10s", "keepalive": "5s"},
                 "limits": {"body_min_rate": 500, "body_min_rate_after": "3s"},
                 "routes": [{"upstream": {"servers": [backend.address]}}]}, workers=2)
    measure(b.port, count=50)  # warm-up: backend connections, code paths
    baseline, base_failures = measure(b.port, count=400)
    assert base_failures == 0
    attack_seconds = 15
    attacker = subprocess.Popen([sys.executable, SLOWLORIS, "--port", str(b.port), "--headers", "1000", "--bodies", "200",
                                 "--seconds", str(attack_seconds), "--interval", "1.0"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(attacker.stdout.readline())["ready"]
        time.sleep(2)  # let the connections pile up
        under_attack, failures = measure(b.port, until=time.monotonic() + attack_seconds - 4)
        stats = json.loads(attacker.stdout.readline())
        attacker.wait(30)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait(5)
    figures = {
        "baseline_requests": len(baseline), "baseline_p50_ms": round(sorted(baseline)[len(baseline) // 2] * 1000, 2),
        "baseline_p99_ms": round(p99(baseline) * 1000, 2),
        "attack_requests": len(under_attack) + failures, "attack_failures": failures,
        "attack_p50_ms": round(sorted(under_attack)[len(under_attack) // 2] * 1000, 2),
        "attack_p99_ms": round(p99(under_attack) * 1000, 2), "attacker": stats,
    }
    (tmp_path / "slowloris-figures.json").write_text(json.dumps(figures, indent=2))
    print("\nslowloris figures:", json.dumps(figures))
    assert failures == 0
    assert len(under_attack) > 100
    assert stats["max_open"] >= 1000, stats  # the attack really held its connections open
    # Bastion cut the attackers: the header timeout and the body rate closed them (answering 408).
    assert stats["closed_by_server"] >= 1200, stats
    assert stats["answered_408"] >= 1000, stats
