"""Service discovery against a real DNS server (dnsmasq) and a servers file: changes are picked up
without a reload and without dropping connections."""

import json
import socket
import time
import urllib.request

from tests.support.ports import free_port


def who(b, timeout=5):
    with urllib.request.urlopen(b.url + "/echo", timeout=timeout) as r:
        return json.loads(r.read())["name"]


def wait_for(predicate, timeout=8):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_dns_name_follows_a_record_changes(bastion, backend_factory, dnsmasq_factory):
    port = free_port()
    one = backend_factory("one", "127.0.0.1", port)
    two = backend_factory("two", "127.0.0.2", port)
    dns = dnsmasq_factory()
    dns.set_hosts(["127.0.0.1 app.svc.test"])
    b = bastion({"resolver": {"address": dns.address, "min_ttl": 0.5},
                 "routes": [{"upstream": {"servers": [f"app.svc.test:{port}"]}}]})
    assert who(b) == "one"
    # a client keeps its connection across the change
    conn = socket.create_connection(("127.0.0.1", b.port))
    conn.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.recv(65536).startswith(b"HTTP/1.1 200")
    dns.set_hosts(["127.0.0.2 app.svc.test"])
    assert wait_for(lambda: who(b) == "two")
    conn.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b'"name": "two"' in conn.recv(65536)
    conn.close()
    dns.set_hosts(["127.0.0.1 app.svc.test", "127.0.0.2 app.svc.test"])
    assert wait_for(lambda: {who(b) for _ in range(6)} == {"one", "two"})
    assert "servers now" in b.stderr()
    assert one.stats() > 0 and two.stats() > 0


def test_dns_failure_keeps_the_last_known_servers(bastion, backend_factory, dnsmasq_factory):
    one = backend_factory("one")
    dns = dnsmasq_factory()
    dns.set_hosts([f"127.0.0.1 app.svc.test"])
    b = bastion({"resolver": {"address": dns.address, "min_ttl": 0.5},
                 "routes": [{"upstream": {"servers": [f"app.svc.test:{one.port}"]}}]})
    assert who(b) == "one"
    dns.stop()
    assert wait_for(lambda: "keeping 1 known server" in b.stderr())
    assert who(b) == "one"


def test_srv_records_give_ports_and_weights(bastion, backend_factory, dnsmasq_factory):
    heavy, light = backend_factory("heavy"), backend_factory("light")
    dns = dnsmasq_factory(srv=[f"_http._tcp.svc.test,app.svc.test,{heavy.port},0,3",
                               f"_http._tcp.svc.test,app.svc.test,{light.port},0,1"])
    dns.set_hosts(["127.0.0.1 app.svc.test"])
    b = bastion({"resolver": {"address": dns.address},
                 "routes": [{"upstream": {"servers": [{"srv": "_http._tcp.svc.test"}]}}]})
    counts = {"heavy": 0, "light": 0}
    for _ in range(40):
        counts[who(b)] += 1
    assert counts == {"heavy": 30, "light": 10}


def test_servers_file_is_reread_when_it_changes(bastion, backend_factory, tmp_path):
    one, two = backend_factory("one"), backend_factory("two")
    servers = tmp_path / "servers.txt"
    servers.write_text(f"# the app servers\n{one.address}\n")
    b = bastion({"routes": [{"upstream": {"servers_file": str(servers)}}]})
    assert {who(b) for _ in range(4)} == {"one"}
    time.sleep(1.1)  # a new modification time
    servers.write_text(f"{one.address} drain\n{two.address} weight=2\n")
    assert wait_for(lambda: {who(b) for _ in range(4)} == {"two"})
