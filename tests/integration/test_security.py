"""Access lists, PROXY protocol, bans and auto-ban (node-wide and through Redis), connection and concurrency
limits, slow bodies, per-route size limits, security headers and hidden backend addresses: real Bastion
processes, real sockets."""

import json
import socket
import threading
import time
import urllib.request
from urllib.error import HTTPError, URLError

import pytest

from bastion.security.proxy_protocol import build_v1, build_v2


def get(url, headers=None, method="GET", timeout=10):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except HTTPError as e:
        return e.code, e.headers, e.read()


def raw(port, data: bytes, timeout=5.0) -> bytes:
    """Send bytes on a new connection, read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
                if b"\r\n\r\n" in out and b"Connection: close" not in out and _complete(out):
                    break
        except (ConnectionResetError, socket.timeout):
            pass
        return out


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def refused(url) -> bool:
    try:
        get(url)
    except (URLError, ConnectionError, OSError):
        return True
    return False


def upstream(backend):
    return {"servers": [backend.address]}


# -- access lists ---------------------------------------------------------------------------------------------

def test_global_deny_refuses_the_connection(bastion, backend):
    b = bastion({"security": {"access": {"deny": ["127.0.0.0/8", "::1/128"]}},
                 "routes": [{"upstream": upstream(backend)}]})
    assert refused(b.url + "/echo/x")


def test_route_allow_and_deny_with_real_address_from_trusted_proxy(bastion, backend):
    b = bastion({"trusted_proxies": ["127.0.0.1/32"],
                 "routes": [{"name": "admin", "match": {"path": "/admin"}, "upstream": upstream(backend),
                             "security": {"access": {"allow": ["10.0.0.0/8", "2001:db8::/32"], "deny": ["10.6.6.0/24"]}}},
                            {"name": "rest", "upstream": upstream(backend)}]})
    assert get(b.url + "/admin", {"X-Forwarded-For": "10.1.2.3"})[0] == 200
    assert get(b.url + "/admin", {"X-Forwarded-For": "2001:db8::7"})[0] == 200
    assert get(b.url + "/admin", {"X-Forwarded-For": "10.6.6.6"})[0] == 403
    assert get(b.url + "/admin", {"X-Forwarded-For": "192.0.2.1"})[0] == 403
    assert get(b.url + "/admin")[0] == 403  # the proxy itself is not in the allow list
    assert get(b.url + "/elsewhere", {"X-Forwarded-For": "192.0.2.1"})[0] == 200


def test_ipv6_clients_are_judged_by_ipv6_networks(bastion, backend):
    from tests.support.ports import free_port

    port = free_port()
    b = bastion({"listeners": [f"[::1]:{port}"],
                 "routes": [{"name": "v6", "match": {"path": "/open"}, "upstream": upstream(backend),
                             "security": {"access": {"allow": ["::1/128"]}}},
                            {"upstream": upstream(backend), "security": {"access": {"deny": ["::/0"]}}}]}, wait=False)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("::1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, b.stderr()
            time.sleep(0.1)
    assert get(f"http://[::1]:{port}/open")[0] == 200
    assert get(f"http://[::1]:{port}/closed")[0] == 403


def test_requests_no_route_matches_count_towards_auto_ban(bastion, backend):
    b = bastion({"security": {"auto_ban": {"max_4xx": 3}},
                 "routes": [{"match": {"host": "only.example"}, "upstream": upstream(backend)}]})
    assert [get(b.url + "/scan")[0] for _ in range(3)] == [404, 404, 404]
    assert refused(b.url + "/scan")


def test_an_untrusted_client_cannot_forge_its_address(bastion, backend):
    b = bastion({"routes": [{"upstream": upstream(backend),
                             "security": {"access": {"allow": ["10.0.0.0/8"]}}}]})
    assert get(b.url + "/echo", {"X-Forwarded-For": "10.1.2.3"})[0] == 403


# -- PROXY protocol -------------------------------------------------------------------------------------------

def test_proxy_protocol_v1_and_v2_give_the_client_address(bastion, backend, tmp_path):
    from tests.support.ports import free_port

    port = free_port()
    b = bastion({"listeners": [{"address": f"127.0.0.1:{port}", "proxy_protocol": True}],
                 "security": {"access": {"deny": ["203.0.113.66/32"]}},
                 "routes": [{"upstream": upstream(backend)}]})
    request = b"GET /echo/pp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for header in (build_v1("198.51.100.7", "127.0.0.1", 5555, port), build_v2("198.51.100.7", "127.0.0.1", 5555, port),
                   build_v2("2001:db8::9", "::1", 5555, port)):
        answer = raw(port, header + request)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        seen = dict(json.loads(answer.partition(b"\r\n\r\n")[2])["headers"])
        assert seen["X-Forwarded-For"] in ("198.51.100.7", "2001:db8::9")
    # The denied address, given by the PROXY header, is refused before any HTTP.
    assert raw(port, build_v1("203.0.113.66", "127.0.0.1", 5555, port) + request) == b""
    # Without a PROXY header the connection is closed.
    assert raw(port, request) == b""


# -- bans -------------------------------------------------------------------------------------------------------

def test_auto_ban_after_too_many_4xx_holds_on_every_worker_and_is_lifted_by_admin(bastion, backend):
    b = bastion({"security": {"auto_ban": {"max_4xx": 5, "window": "30s", "ban_time": "60s"}},
                 "routes": [{"upstream": upstream(backend)}]}, workers=2)
    for _ in range(5):
        assert get(b.url + "/status/404")[0] == 404
    # Every new connection is refused, whichever worker accepts it.
    for _ in range(6):
        assert refused(b.url + "/echo/ok")
    listing = json.loads(get(b.admin_url + "/bans")[2])["bans"]
    assert [x["ip"] for x in listing] == ["127.0.0.1"] and 50 < listing[0]["remaining_seconds"] <= 60
    status, _, body = get(b.admin_url + "/bans/127.0.0.1", method="DELETE")
    assert status == 200 and json.loads(body)["lifted"] is True
    assert json.loads(get(b.admin_url + "/bans")[2])["bans"] == []
    assert get(b.url + "/echo/ok")[0] == 200


def test_auto_ban_counts_rate_limit_refusals_and_waf_blocks_by_error_name(bastion, backend, tmp_path):
    # A stand-in for the WAF: any filter that sets exchange.error = "waf_blocked" is counted.
    module = tmp_path / "wafstub.py"
    module.write_text("from bastion.proxy import Response\n"
                      "class Block:\n"
                      "    def request_filter(self, ex):\n"
                      "        if 'attack' in ex.path_str:\n"
                      "            ex.error = 'waf_blocked'\n"
                      "            return Response(403, 'blocked')\n")
    b = bastion({"security": {"auto_ban": {"max_4xx": None, "max_waf_blocks": 3, "max_rate_limited": 4}},
                 "routes": [{"match": {"path": "/limited"}, "upstream": upstream(backend),
                             "security": {"rate_limits": [{"key": ["client_ip", "header:X-Who"], "rate": "1/m"}]}},
                            {"upstream": upstream(backend), "filters": [{"use": "wafstub:Block"}]}]},
                env={"PYTHONPATH": str(tmp_path)})
    for _ in range(2):
        assert get(b.url + "/attack")[0] == 403
    assert get(b.url + "/fine")[0] == 200
    assert get(b.url + "/attack")[0] == 403
    assert refused(b.url + "/fine")
    get(b.admin_url + "/bans/127.0.0.1", method="DELETE")
    codes = [get(b.url + "/limited", {"X-Who": "me"})[0] for _ in range(5)]
    assert codes == [200, 429, 429, 429, 429]
    assert refused(b.url + "/limited")


def test_manual_ban_through_admin_api(bastion, backend):
    b = bastion({"security": {"auto_ban": {}}, "trusted_proxies": ["127.0.0.1/32"],
                 "routes": [{"upstream": upstream(backend)}]})
    status, _, body = get(b.admin_url + "/bans/192.0.2.44?seconds=30", method="POST")
    assert status == 200
    # Behind a trusted proxy the ban is judged per request on the forwarded address.
    assert get(b.url + "/echo", {"X-Forwarded-For": "192.0.2.44"})[0] == 403
    assert get(b.url + "/echo", {"X-Forwarded-For": "192.0.2.45"})[0] == 200
    assert get(b.admin_url + "/bans/not-an-ip", method="DELETE")[0] == 400


def test_bans_are_shared_by_two_bastions_through_redis(bastion, backend, redis_server):
    redis_server.flush()
    config = {"trusted_proxies": ["127.0.0.1/32"],
              "security": {"redis": {"url": redis_server.url}, "auto_ban": {"max_4xx": 3, "ban_time": "60s"}},
              "routes": [{"upstream": upstream(backend)}]}
    one, two = bastion(config), bastion(config)
    who = {"X-Forwarded-For": "198.51.100.23"}
    for _ in range(3):
        assert get(one.url + "/status/401", who)[0] == 401
    assert get(one.url + "/echo", who)[0] == 403
    deadline = time.monotonic() + 10
    while get(two.url + "/echo", who)[0] != 403:
        assert time.monotonic() < deadline, "the ban did not reach the second node"
        time.sleep(0.2)
    assert "198.51.100.23" in [x["ip"] for x in json.loads(get(two.admin_url + "/bans")[2])["bans"]]
    # Lifted on one node: lifted on every node.
    assert get(one.admin_url + "/bans/198.51.100.23", method="DELETE")[0] == 200
    assert get(one.url + "/echo", who)[0] == 200
    deadline = time.monotonic() + 10
    while get(two.url + "/echo", who)[0] != 200:
        assert time.monotonic() < deadline, "the lift did not reach the second node"
        time.sleep(0.2)
    assert json.loads(get(two.admin_url + "/bans")[2])["bans"] == []


# -- connection and concurrency limits --------------------------------------------------------------------------

def test_connections_per_ip_and_in_total(bastion, backend):
    b = bastion({"security": {"connections": {"max_per_ip": 4}}, "routes": [{"upstream": upstream(backend)}]},
                workers=2)
    held = [socket.create_connection(("127.0.0.1", b.port), timeout=5) for _ in range(4)]
    try:
        for s in held:
            # answered, so surely accepted and counted by whichever worker took it (a fixed pause was not
            # enough on a loaded machine); the connections stay open (keep-alive)
            s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        answer = raw(b.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") or answer == b"", answer
        metrics = get(b.admin_url + "/metrics")[2].decode()
    finally:
        for s in held:
            s.close()
    # Once the held connections are closed, new ones are let in again; until the worker that counted them
    # has seen them close, a new one is still refused, and counted.
    refused = 1
    deadline = time.monotonic() + 5
    while (status := get(b.url + "/echo")[0]) != 200:
        assert status == 503
        refused += 1
        assert time.monotonic() < deadline
        time.sleep(0.1)
    counted = f'bastion_security_refusals_total{{kind="connection_limit_ip"}} {float(refused)}'
    deadline = time.monotonic() + 5
    while counted not in metrics and time.monotonic() < deadline:
        time.sleep(0.3)
        metrics = get(b.admin_url + "/metrics")[2].decode()
    assert counted in metrics, [line for line in metrics.splitlines() if "refusals_total" in line]


def test_total_connection_limit(bastion, backend):
    b = bastion({"security": {"connections": {"max_total": 3}}, "routes": [{"upstream": upstream(backend)}]})
    held = [socket.create_connection(("127.0.0.1", b.port), timeout=5) for _ in range(3)]
    try:
        time.sleep(0.3)
        assert raw(b.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 503")
    finally:
        for s in held:
            s.close()


def test_route_max_concurrent_refuses_fast_with_503(bastion, backend):
    b = bastion({"routes": [{"name": "slow", "upstream": upstream(backend), "security": {"max_concurrent": 2}}]},
                workers=2)
    results = []

    def slow():
        results.append(get(b.url + "/delay/1.5")[0])

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    start = time.monotonic()
    status = get(b.url + "/delay/1.5")[0]
    quick = time.monotonic() - start
    for t in threads:
        t.join(10)
    assert status == 503 and quick < 1.0
    assert results == [200, 200]
    assert get(b.url + "/delay/0")[0] == 200  # the places were given back


# -- slow clients, sizes ------------------------------------------------------------------------------------------

def test_a_trickling_body_is_cut_by_the_minimum_rate(bastion, backend):
    b = bastion({"limits": {"body_min_rate": 1000, "body_min_rate_after": "1s"},
                 "routes": [{"upstream": upstream(backend)}]})
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        start = time.monotonic()
        answer = b""
        try:
            while time.monotonic() - start < 8:
                s.sendall(b"x" * 10)
                s.settimeout(0.5)
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    break
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - start < 5
    # A body at a normal speed is untouched.
    req = urllib.request.Request(b.url + "/upload", data=b"y" * 200_000, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.load(r)["length"] == 200_000


def test_per_route_size_limits(bastion, backend):
    b = bastion({"routes": [{"name": "small", "match": {"path": "/small"}, "upstream": upstream(backend),
                             "limits": {"request_line": 64, "header_bytes": 300, "header_count": 5, "body": 10}},
                            {"upstream": upstream(backend)}]})
    assert get(b.url + "/small")[0] == 200
    assert get(b.url + "/small/" + "a" * 100)[0] == 414
    assert get(b.url + "/small", {"X-Big": "v" * 400})[0] == 431
    assert get(b.url + "/small", {f"X-H{i}": "v" for i in range(6)})[0] == 431
    req = urllib.request.Request(b.url + "/small", data=b"z" * 11, method="POST")
    with pytest.raises(HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 413
    assert get(b.url + "/big/" + "a" * 100, {"X-Big": "v" * 400})[0] == 200


def test_route_limits_looser_than_global_are_a_config_error(bastion, backend, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"listeners": ["127.0.0.1:1"], "limits": {"request_line": 100},
                                    "routes": [{"upstream": upstream(backend), "limits": {"request_line": 200}}]}))
    result = subprocess.run([str(Path(sys.executable).parent / "bastion"), "check", str(path)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "can only be tighter" in result.stderr


# -- headers, hidden backends ---------------------------------------------------------------------------------------

def test_security_headers_global_and_per_route(bastion, backend):
    b = bastion({"security": {"headers": {"content_security_policy": "default-src 'self'"}},
                 "routes": [{"name": "framed", "match": {"path": "/framed"}, "upstream": upstream(backend),
                             "security": {"headers": {"frame_options": "SAMEORIGIN", "override": True}}},
                            {"upstream": upstream(backend)}]})
    _, h, _ = get(b.url + "/echo")
    assert h["X-Content-Type-Options"] == "nosniff" and h["X-Frame-Options"] == "DENY"
    assert h["Referrer-Policy"] == "strict-origin-when-cross-origin"
    assert h["Content-Security-Policy"] == "default-src 'self'"
    # The backend's own value wins by default...
    _, h, _ = get(b.url + "/headers?X-Frame-Options=SAMEORIGIN")
    assert h.get_all("X-Frame-Options") == ["SAMEORIGIN"]
    # ...unless the route overrides.
    _, h, _ = get(b.url + "/framed/headers?X-Frame-Options=ALLOW-FROM%20x")
    assert h.get_all("X-Frame-Options") == ["SAMEORIGIN"] and "Content-Security-Policy" not in h
    # Bastion's own answers carry them too.
    status, h, _ = get(b.url.replace("127.0.0.1", "localhost") + "/echo", {"Host": "nohost"})
    assert h["X-Content-Type-Options"] == "nosniff"


def test_location_naming_a_backend_is_rewritten_to_the_public_host(bastion, backend):
    b = bastion({"routes": [{"name": "app", "upstream": upstream(backend)}]})
    leak = f"http://{backend.address}/login?next=%2F"
    opener = urllib.request.build_opener(NoRedirect)
    status, h, _ = open_no_redirect(opener, b.url + "/redirect?to=" + urllib.request.quote(leak, safe=""))
    assert status == 302
    assert h["Location"] == f"http://127.0.0.1:{b.port}/login?next=%2F"
    status, h, _ = open_no_redirect(opener, b.url + "/redirect?status=201&to=" + urllib.request.quote(leak, safe=""))
    assert status == 201 and h["Location"] == f"http://127.0.0.1:{b.port}/login?next=%2F"
    status, h, _ = open_no_redirect(opener, b.url + "/redirect?to=" + urllib.request.quote("https://example.org/x", safe=""))
    assert h["Location"] == "https://example.org/x"  # not a backend: untouched
    assert "Server" not in h and "X-Powered-By" not in h


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def open_no_redirect(opener, url):
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, r.headers, r.read()
    except HTTPError as e:
        return e.code, e.headers, e.read()


def test_the_security_example_limits_and_sets_headers(backend, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import wait_port
    from tests.support.ports import free_port

    root = Path(__file__).resolve().parents[2]
    port = free_port()
    env = dict(os.environ, BASTION_LISTEN=f"127.0.0.1:{port}", BASTION_UPSTREAM=backend.address, BASTION_RATE="5",
               BASTION_WORKERS="2", BASTION_ADMIN=f"127.0.0.1:{free_port()}")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "bastion"), "run", "-c", str(root / "examples" / "security.yaml")],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_port(port, 15, proc)
        codes = [get(f"http://127.0.0.1:{port}/echo/example")[0] for _ in range(70)]
        assert codes.count(200) >= 51 and codes[-1] == 429, codes  # burst 50 + 1, then 5/s
        _, h, _ = get(f"http://127.0.0.1:{port}/echo/example")
        assert h["Content-Security-Policy"] == "default-src 'self'" and h["X-Frame-Options"] == "DENY"
        assert h["RateLimit-Policy"] == '"per-ip";q=5;w=1'
        time.sleep(2.5)  # a few tokens back for the attack below
        before = backend.stats()
        status, h, _ = get(f"http://127.0.0.1:{port}/echo/x?id=1%27%20or%201=1--")
        assert status == 403 and backend.stats() == before, "the WAF blocks a SQL injection before the backend"
        blocked_id = h["X-Request-ID"] if "X-Request-ID" in h else None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    audit = [json.loads(line) for line in err.decode(errors="replace").splitlines() if line.startswith("{")]
    blocked = [a for a in audit if a.get("action") == "blocked"]
    assert blocked, audit
    if blocked_id:
        assert any(a.get("request_id") == blocked_id for a in blocked)


def test_bans_and_rate_limit_state_survive_a_reload(bastion, backend):
    config = {"trusted_proxies": ["127.0.0.1/32"],
              "security": {"auto_ban": {}, "rate_limits": [{"name": "r", "rate": "1/m"}]},
              "routes": [{"upstream": upstream(backend)}]}
    b = bastion(config, workers=2)
    assert get(b.admin_url + "/bans/192.0.2.50?seconds=120", method="POST")[0] == 200
    assert get(b.url + "/echo", {"X-Forwarded-For": "192.0.2.51"})[0] == 200
    assert get(b.url + "/echo", {"X-Forwarded-For": "192.0.2.51"})[0] == 429
    old = set(b.worker_pids())
    b.reload()
    deadline = time.monotonic() + 15
    while set(b.worker_pids()) & old or len(b.worker_pids()) < 2:
        assert time.monotonic() < deadline, "the new generation did not take over"
        time.sleep(0.2)
    assert get(b.url + "/echo", {"X-Forwarded-For": "192.0.2.50"})[0] == 403
    assert get(b.url + "/echo", {"X-Forwarded-For": "192.0.2.51"})[0] == 429
    assert get(b.url + "/echo", {"X-Forwarded-For": "192.0.2.52"})[0] == 200


def test_a_ban_made_while_redis_is_down_reaches_the_other_node_later(bastion, backend, redis_server):
    redis_server.flush()
    config = {"trusted_proxies": ["127.0.0.1/32"],
              "security": {"redis": {"url": redis_server.url, "timeout": "200ms", "retry_interval": "1s"},
                           "auto_ban": {"max_4xx": 2, "ban_time": "60s"}},
              "routes": [{"upstream": upstream(backend)}]}
    one, two = bastion(config), bastion(config)
    who = {"X-Forwarded-For": "198.51.100.77"}
    redis_server.pause()
    try:
        for _ in range(2):
            assert get(one.url + "/status/404", who)[0] == 404
        assert get(one.url + "/echo", who)[0] == 403  # held on its own node at once
        assert get(two.url + "/echo", who)[0] == 200
    finally:
        redis_server.resume()
    deadline = time.monotonic() + 15
    while get(two.url + "/echo", who)[0] != 403:
        assert time.monotonic() < deadline, "the ban never reached the second node"
        time.sleep(0.3)
