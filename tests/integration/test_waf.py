"""The WAF (OWASP CRS on libmodsecurity3) through a real Bastion: modes, paranoia, thresholds, exclusions,
per-route settings, request bodies and their limit, the audit log, and that a slow inspection does not hold
up other connections."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.raw import http_raw, parse_response

SQLI = "/echo?id=1%27%20or%201=1--"
XSS_FORM = b"comment=%3Cscript%3Ealert(1)%3C%2Fscript%3E"
PL2_ONLY = "/echo?q=%3Ca%20href=x%3E"  # CRS rules 941150/941320: paranoia level 2
BASTION = str(Path(sys.executable).parent / "bastion")


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def audit_lines(path: Path, n: int = 1, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def start(bastion, backend, tmp_path, waf: dict | None = None, routes: list | None = None, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    audit = tmp_path / "audit.log"
    config = {"routes": routes or [{"upstream": {"servers": [backend.address]}}], **extra}
    if waf is not None:
        config["waf"] = {"audit_log": str(audit), **waf}
    return bastion(config), audit


def test_block_mode_blocks_an_attack_and_logs_it_by_request_id(bastion, backend, tmp_path):
    b, audit = start(bastion, backend, tmp_path, {"mode": "block"})
    before = backend.stats()
    status, headers, body = request(b.url + SQLI, headers={"Accept": "application/json"})
    assert status == 403
    assert backend.stats() == before  # nothing reached the backend
    request_id = json.loads(body)["request_id"]
    [line] = audit_lines(audit)
    assert line["request_id"] == request_id
    assert line["action"] == "blocked" and line["status"] == 403 and line["mode"] == "block"
    ids = [r["id"] for r in line["rules"]]
    assert "942100" in ids and "949110" in ids  # libinjection SQLi, then CRS's anomaly score verdict
    sqli = next(r for r in line["rules"] if r["id"] == "942100")
    assert "1' or 1=1--" in sqli["data"] and "SQL Injection" in sqli["msg"] and sqli["paranoia_level"] == 1
    access = b.wait_access_log(1)
    assert access[-1]["error"] == "waf_blocked" and access[-1]["request_id"] == request_id


def test_clean_requests_pass_and_leave_no_audit_line(bastion, backend, tmp_path):
    b, audit = start(bastion, backend, tmp_path, {"mode": "block"})
    for path in ("/echo/hello", "/echo?page=2&sort=name", "/echo/a/b.css"):
        status, _, body = request(b.url + path, headers={"Host": "example.com", "User-Agent": "Mozilla/5.0",
                                                         "Accept": "text/html"})
        assert status == 200 and json.loads(body)["path"] == path
    status, _, body = request(b.url + "/echo/form", "POST", b"name=Ada+Lovelace&lang=en",
                              {"Host": "example.com", "User-Agent": "Mozilla/5.0", "Accept": "*/*",
                               "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and json.loads(body)["body_length"] == 25
    b.wait_access_log(4)
    assert audit_lines(audit, timeout=0.5) == []


def test_detect_mode_logs_but_passes(bastion, backend, tmp_path):
    b, audit = start(bastion, backend, tmp_path, {"mode": "detect"})
    status, _, body = request(b.url + SQLI)
    assert status == 200 and json.loads(body)["path"] == SQLI
    [line] = audit_lines(audit)
    assert line["action"] == "detected" and line["mode"] == "detect"
    assert {"942100", "949110"} <= {r["id"] for r in line["rules"]}


def test_mode_off_and_no_waf_section_do_not_inspect(bastion, backend, tmp_path):
    b, audit = start(bastion, backend, tmp_path, {"mode": "off"})
    assert request(b.url + SQLI)[0] == 200
    b2 = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]})
    assert request(b2.url + SQLI)[0] == 200
    assert audit_lines(audit, timeout=0.3) == []


def test_paranoia_level_and_anomaly_threshold(bastion, backend, tmp_path):
    b1, _ = start(bastion, backend, tmp_path, {"paranoia_level": 1})
    assert request(b1.url + PL2_ONLY)[0] == 200
    b2, _ = start(bastion, backend, tmp_path / "pl2", {"paranoia_level": 2})
    assert request(b2.url + PL2_ONLY)[0] == 403
    # A threshold above the request's score lets it through, logged with its matches.
    b3, audit3 = start(bastion, backend, tmp_path / "lenient", {"inbound_anomaly_threshold": 100})
    assert request(b3.url + SQLI)[0] == 200
    [line] = audit_lines(audit3)
    assert line["action"] == "logged" and "942100" in {r["id"] for r in line["rules"]}


def test_exclusions_by_id_tag_and_path(bastion, backend, tmp_path):
    by_id, _ = start(bastion, backend, tmp_path / "id", {"exclusions": [{"rule_ids": ["942100", "942000-942999"]}]})
    assert request(by_id.url + SQLI)[0] == 200
    assert request(by_id.url + "/echo?x=%3Cscript%3Ealert(1)%3C/script%3E")[0] == 403  # XSS rules still on
    by_tag, _ = start(bastion, backend, tmp_path / "tag", {"exclusions": [{"tags": ["attack-sqli"]}]})
    assert request(by_tag.url + SQLI)[0] == 200
    by_path, _ = start(bastion, backend, tmp_path / "path",
                       {"exclusions": [{"rule_ids": [942100], "path": "/echo/search"}]})
    assert request(by_path.url + "/echo/search?id=1%27%20or%201=1--")[0] == 200
    assert request(by_path.url + SQLI)[0] == 403


def test_per_route_settings(bastion, backend, tmp_path):
    routes = [
        {"name": "open", "match": {"path": "/echo/open"}, "upstream": {"servers": [backend.address]}, "waf": False},
        {"name": "watch", "match": {"path": "/echo/watch"}, "upstream": {"servers": [backend.address]},
         "waf": {"mode": "detect"}},
        {"name": "rest", "upstream": {"servers": [backend.address]}},
    ]
    b, audit = start(bastion, backend, tmp_path, {"mode": "block"}, routes)
    attack = "?id=1%27%20or%201=1--"
    assert request(b.url + "/echo/open" + attack)[0] == 200
    assert request(b.url + "/echo/watch" + attack)[0] == 200
    assert request(b.url + "/echo/other" + attack)[0] == 403
    lines = audit_lines(audit, 2)
    assert [(l["route"], l["action"]) for l in lines] == [("watch", "detected"), ("rest", "blocked")]


def test_route_enables_waf_without_a_global_section(bastion, backend, tmp_path):
    routes = [
        {"match": {"path": "/echo/guarded"}, "upstream": {"servers": [backend.address]}, "waf": {"enabled": True}},
        {"upstream": {"servers": [backend.address]}},
    ]
    b = bastion({"routes": routes})
    assert request(b.url + "/echo/guarded?id=1%27%20or%201=1--")[0] == 403
    assert request(b.url + "/echo/free?id=1%27%20or%201=1--")[0] == 200


def test_request_bodies_are_inspected(bastion, backend, tmp_path):
    b, audit = start(bastion, backend, tmp_path, {"mode": "block"})
    before = backend.stats()
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert request(b.url + "/echo/form", "POST", XSS_FORM, form)[0] == 403
    json_body = json.dumps({"user": {"name": "x' or 1=1--"}}).encode()
    assert request(b.url + "/echo/api", "POST", json_body, {"Content-Type": "application/json"})[0] == 403
    # Chunked: the engine sees the decoded body.
    raw = (b"POST /echo/chunked HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\n"
           b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           + b"%x\r\n" % len(XSS_FORM) + XSS_FORM + b"\r\n0\r\n\r\n")
    assert parse_response(http_raw(b.port, raw, timeout=10))[0] == 403
    # The body in several packets, with Expect: 100-continue: Bastion asks for it, then inspects it.
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
        s.sendall(b"POST /echo/slow HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\n"
                  b"Content-Type: application/x-www-form-urlencoded\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(XSS_FORM))
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        for i in range(0, len(XSS_FORM), 10):
            s.sendall(XSS_FORM[i:i + 10])
            time.sleep(0.02)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert parse_response(answer)[0] == 403
    assert backend.stats() == before
    assert len(audit_lines(audit, 4)) == 4
    # A clean body still reaches the backend whole.
    body = b"name=" + b"a" * 50000
    status, _, echoed = request(b.url + "/echo/ok", "POST", body, form)
    assert status == 200 and json.loads(echoed)["body_length"] == len(body)


def test_body_over_the_limit_rejected_or_passed(bastion, backend, tmp_path):
    big = b"data=" + b"a" * 20000 + b"&x=%3Cscript%3Ealert(1)%3C%2Fscript%3E"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    strict, audit = start(bastion, backend, tmp_path / "reject", {"body_limit": "16KiB", "on_body_limit": "reject"})
    assert request(strict.url + "/echo/big", "POST", big, form)[0] == 413
    assert request(strict.url + "/echo/small", "POST", XSS_FORM, form)[0] == 403
    lax, audit2 = start(bastion, backend, tmp_path / "pass", {"body_limit": "16KiB", "on_body_limit": "pass"})
    status, _, echoed = request(lax.url + "/echo/big", "POST", big, form)
    assert status == 200 and json.loads(echoed)["body_length"] == len(big)  # forwarded whole, uninspected
    [line] = audit_lines(audit2)
    assert "not inspected" in line["note"]
    # Chunked bodies have no length up front: the limit applies as they arrive.
    raw = (b"POST /echo/chunked HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\n"
           b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           + b"".join(b"1000\r\n" + b"a" * 4096 + b"\r\n" for _ in range(6)) + b"0\r\n\r\n")
    assert parse_response(http_raw(strict.port, raw, timeout=10))[0] == 413
    status, _, echoed = parse_response(http_raw(lax.port, raw, timeout=10))
    assert status == 200 and json.loads(echoed)["body_length"] == 6 * 4096


def test_slow_inspection_does_not_hold_up_other_connections(bastion, backend, tmp_path):
    """A 4 MiB form body takes CRS seconds; meanwhile other clients of the same (single) worker are served."""
    b, _ = start(bastion, backend, tmp_path, {"body_limit": "16MiB", "threads": 2},
                 routes=[{"match": {"path": "/echo/nowaf"}, "upstream": {"servers": [backend.address]}, "waf": False},
                         {"upstream": {"servers": [backend.address]}}], workers=1)
    body = b"a=" + b"x y " * (1024 * 1024)
    slow_done: list[float] = []
    sent = threading.Event()

    def slow():
        with socket.create_connection(("127.0.0.1", b.port), timeout=120) as s:
            s.sendall(b"POST /echo/big HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\n"
                      b"Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            sent.set()
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        slow_done.append(time.monotonic())
        assert parse_response(answer)[0] == 200

    t = threading.Thread(target=slow)
    t.start()
    assert sent.wait(60)
    time.sleep(0.2)
    fast_done = []
    for path in ("/echo/one", "/echo/nowaf", "/echo/two", "/echo/nowaf", "/echo/three"):
        assert request(b.url + path)[0] == 200
        fast_done.append(time.monotonic())
    t.join(120)
    assert slow_done, "the large request got no answer"
    assert max(fast_done) < slow_done[0], "other requests waited for the slow inspection"


def test_bad_waf_config_is_a_clear_error(tmp_path):
    cases = [
        ("waf:\n  exclusions: [{tags: []}]\n", "waf.exclusions.0", "rule_ids or tags"),
        ("waf:\n  exclusions: [{rule_ids: [abc]}]\n", "waf.exclusions.0.rule_ids", "not a rule id"),
        ("waf:\n  paranoia_level: 5\n", "waf.paranoia_level", "less than or equal to 4"),
        ("waf:\n  extra_rules: [/nonexistent/rules.conf]\n", "waf", "cannot load the WAF rules"),
    ]
    for text, field, problem in cases:
        path = tmp_path / "bad.yaml"
        path.write_text('listeners: ["127.0.0.1:1"]\nroutes:\n  - respond: {body: x}\n' + text)
        result = subprocess.run([BASTION, "check", "-c", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (text, result.stderr)
        out = result.stderr + result.stdout
        assert field.replace(".0", "[0]") in out or field in out, (field, out)
        assert problem in out, (problem, out)


def test_pipelined_requests_with_bodies_are_each_inspected(bastion, backend, tmp_path):
    b, _ = start(bastion, backend, tmp_path, {"mode": "block"})
    head = (b"POST /echo/%d HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n")
    clean = b"name=Ada"
    raw = (head % (1, len(clean)) + clean + head % (2, len(XSS_FORM)) + XSS_FORM
           + b"GET /echo/3 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\nConnection: close\r\n\r\n")
    answer = http_raw(b.port, raw, timeout=15)
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
    assert statuses == [200, 403, 200]
    assert b'"path": "/echo/1"' in answer and b'"path": "/echo/3"' in answer and b"/echo/2" not in answer


def test_reload_changes_the_waf_settings(bastion, backend, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = {"routes": [{"upstream": {"servers": [backend.address]}}], "waf": {"mode": "detect", "audit_log": None}}
    b = bastion(config)
    assert request(b.url + SQLI)[0] == 200
    b.write_config({**config, "waf": {"mode": "block", "audit_log": None}})
    b.reload()
    deadline = time.monotonic() + 20
    while request(b.url + SQLI)[0] != 403:
        assert time.monotonic() < deadline, "the reload did not switch the WAF to block mode"
        time.sleep(0.2)
    assert request(b.url + "/echo/fine")[0] == 200


def test_inspections_beyond_max_pending_get_503(bastion, backend, tmp_path):
    # One inspection thread, at most one inspection queued: clients arriving together while it is busy are
    # turned away at once (503) instead of waiting; the one being inspected is answered normally.
    b, _ = start(bastion, backend, tmp_path, {"body_limit": "16MiB", "threads": 1, "max_pending": 1}, workers=1)
    body = b"a=" + b"x y " * (1024 * 1024)
    answers: list[int] = []

    def slow():
        raw = (b"POST /echo/big HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\n"
               b"Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body) + body)
        answers.append(parse_response(http_raw(b.port, raw, timeout=120))[0])

    statuses: list[int] = []
    deadline = time.monotonic() + 30
    gate = threading.Barrier(12)

    def burst():
        while time.monotonic() < deadline and 503 not in statuses:
            try:
                gate.wait(timeout=5)
            except threading.BrokenBarrierError:
                return
            statuses.append(request(b.url + "/echo/other")[0])

    t = threading.Thread(target=slow)
    t.start()
    clients = [threading.Thread(target=burst) for _ in range(12)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(60)
    gate.abort()
    t.join(120)
    assert 503 in statuses, "no request was turned away while the one inspection slot was busy"
    assert set(statuses) <= {200, 503} and answers in ([200], [503])
    assert request(b.url + "/echo/after")[0] == 200