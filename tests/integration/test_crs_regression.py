"""CRS's own regression tests (go-ftw YAML, /work/shared/waf/crs-3.3.4-regression) replayed through Bastion
with the WAF in block mode at paranoia level 1.

Each stage's request is sent as raw bytes on its own connection (many are deliberately odd). What counts:
- an attack: a stage whose `log_contains` names a rule CRS runs at paranoia level 1. It is blocked when
  Bastion answers 4xx without forwarding it (the WAF's 403, or the strict HTTP parser's 400 before the WAF)
  or closes the connection on it. At least 97.8% must be (what nginx + ModSecurity + this CRS block).
- a clean request: a stage with only `no_log_contains`. It must reach the backend, and the named rule must
  not be in Bastion's WAF audit log.
Stages aimed at rules of higher paranoia levels are not counted. Which rules matched is read from the audit
log by request id (each request carries X-Request-ID).
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from bastion.security.waf import crs_paranoia_levels

REGRESSION = Path(os.environ.get("CRS_REGRESSION_DIR", "/work/shared/waf/crs-3.3.4-regression"))
CRS_RULES = "/usr/share/modsecurity-crs/rules"
NGINX_BLOCK_RATE = 0.978

pytestmark = pytest.mark.skipif(not REGRESSION.is_dir(), reason=f"no CRS regression tests at {REGRESSION}")


class MarkingBackend:
    """Answers every request with 200 and a marker header, one request per connection, so a response
    tells whether the request reached the backend."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nX-Backend: reached\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(5)
        seen = b""
        try:
            while b"\r\n\r\n" not in seen:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                seen += chunk
            conn.sendall(self.RESPONSE)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stopped = True
        self.sock.close()


def _stages():
    out = []
    for path in sorted(REGRESSION.glob("*/*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for test in doc.get("tests") or []:
            for index, item in enumerate(test.get("stages") or []):
                stage = item.get("stage", item)
                out.append((f"{test.get('test_title', path.stem)}#{index}", stage["input"], stage.get("output") or {}))
    return out


_RULE = re.compile(r"id \"(\d+)\"")


def build_request(inp: dict, request_id: str) -> bytes:
    marker = f"X-Request-ID: {request_id}\r\n".encode()
    if inp.get("encoded_request"):
        raw = base64.b64decode(inp["encoded_request"])
        line, sep, rest = raw.partition(b"\r\n")
        return line + sep + marker + rest
    if inp.get("raw_request"):
        raw = inp["raw_request"].encode("latin-1")
        line, sep, rest = raw.partition(b"\r\n")
        return line + sep + marker + rest
    method = str(inp.get("method", "GET"))
    uri = str(inp.get("uri", "/"))
    version = str(inp.get("version", "HTTP/1.1"))
    headers = {str(k): str(v) for k, v in (inp.get("headers") or {}).items()}
    data = inp.get("data")
    if isinstance(data, list):
        data = "\r\n".join(str(d) for d in data)
    body = data.encode("utf-8") if data else b""
    # What the test tools add unless told not to (stop_magic): a form Content-Type for data, Content-Length,
    # Connection: close. Content-Length is added even then: without it a body could not be sent at all.
    magic = not inp.get("stop_magic")
    if body and magic and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in headers):
        headers["Content-Length"] = str(len(body))
    if magic and not any(k.lower() == "connection" for k in headers):
        headers["Connection"] = "close"
    head = f"{method} {uri} {version}\r\n" if version else f"{method} {uri}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("utf-8") + marker + b"\r\n" + body


def send(port: int, data: bytes, timeout: float = 10.0) -> tuple[int | None, bool]:
    """(status or None, whether the backend's marker came back)."""
    out = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            try:
                s.sendall(data)
            except OSError:
                pass
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    chunk = s.recv(65536)
                except (socket.timeout, OSError):
                    break
                if not chunk:
                    break
                out += chunk
                head, sep, rest = out.partition(b"\r\n\r\n")
                if sep:
                    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
                    if match and len(rest) >= int(match.group(1)):
                        break
    except OSError:
        pass
    if not out.startswith(b"HTTP/"):
        return None, False
    status = int(out.split(b" ", 2)[1])
    head = out.partition(b"\r\n\r\n")[0]
    return status, b"\r\nx-backend: reached" in head.lower()


def read_audit(path: Path) -> dict[str, set[str]]:
    matched: dict[str, set[str]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            matched.setdefault(record["request_id"], set()).update(r["id"] for r in record["rules"])
    return matched


def test_crs_regression_suite_at_paranoia_1(bastion, tmp_path):
    levels = crs_paranoia_levels(CRS_RULES)
    backend = MarkingBackend()
    audit = tmp_path / "waf-audit.log"
    try:
        b = bastion({
            "access_log": {"enabled": False},
            "limits": {"requests_per_connection": 1},
            "waf": {"mode": "block", "paranoia_level": 1, "audit_log": str(audit), "threads": 2},
            "routes": [{"upstream": {"servers": [backend.address]}}],
        })
        stages = _stages()
        assert len(stages) > 400
        requests = [(f"ftw-{i:04d}", title, inp, out) for i, (title, inp, out) in enumerate(stages)]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda r: send(b.port, build_request(r[2], r[0])), requests))
        # Audit lines are written before each response goes out; nothing more can arrive now.
        matched = read_audit(audit)
    finally:
        backend.close()

    attacks = blocked = by_parser = by_waf = rule_seen = 0
    clean = false_positives = wrongly_logged = 0
    status_checks = status_ok = 0
    missed, fps, status_misses = [], [], []
    for (rid, title, inp, out), (status, reached) in zip(requests, answers):
        rules = matched.get(rid, set())
        wanted = _RULE.findall(str(out.get("log_contains", "")))
        unwanted = _RULE.findall(str(out.get("no_log_contains", "")))
        if wanted:
            if any(levels.get(r, 1) > 1 for r in wanted):
                continue  # aimed at a higher paranoia level
            attacks += 1
            stopped = not reached and (status is None or 400 <= status < 500)
            if stopped:
                blocked += 1
                if status == 403 and rules:
                    by_waf += 1
                else:
                    by_parser += 1
            else:
                missed.append((title, status, sorted(rules)))
            if set(wanted) <= rules:
                rule_seen += 1
        elif unwanted:
            clean += 1
            if not reached:
                false_positives += 1
                fps.append((title, status, sorted(rules)))
            if set(unwanted) & rules:
                wrongly_logged += 1
                fps.append((title, "logged", sorted(set(unwanted) & rules)))
        elif "status" in out or out.get("expect_error"):
            status_checks += 1
            expected = out.get("status")
            expected = expected if isinstance(expected, list) else [expected] if expected is not None else []
            if (status in expected or (status is None and out.get("expect_error"))
                    or (not reached and status is not None and 400 <= status < 500
                        and any(400 <= int(e) < 500 for e in expected))):
                status_ok += 1
            else:
                status_misses.append((title, status, expected))

    rate = blocked / attacks if attacks else 0.0
    print(f"\nCRS 3.3.4 regression, paranoia 1: {blocked}/{attacks} attacks blocked ({rate:.1%}; "
          f"{by_waf} by the WAF, {by_parser} by the HTTP parser), expected rule logged for {rule_seen}")
    print(f"clean requests: {clean}, false positives: {false_positives}, expected-absent rule logged: {wrongly_logged}")
    print(f"status-only checks: {status_ok}/{status_checks}")
    for item in missed:
        print("  missed:", item)
    for item in fps:
        print("  false positive:", item)
    for item in status_misses:
        print("  status:", item)
    assert attacks > 250
    assert rate >= NGINX_BLOCK_RATE, missed
    assert false_positives == 0 and wrongly_logged == 0, fps
