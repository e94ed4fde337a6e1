"""Automatic certificates: a real issuance and a renewal from Debian's pebble (Let's Encrypt's test ACME
server), with the HTTP-01 challenge answered by Bastion's own plain listener."""

import json
import os
import shutil
import socket
import ssl
import subprocess
import time

import pytest
import trustme

from tests.conftest import wait_port
from tests.support.ports import free_port

pytestmark = pytest.mark.skipif(shutil.which("pebble") is None, reason="pebble is installed by `make test`")


@pytest.fixture
def pebble(tmp_path):
    """A pebble ACME server whose HTTP-01 validations go to `http_port` (Bastion's plain listener)."""
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.private_key_pem.write_to_path(str(tmp_path / "pebble.key"))
    (tmp_path / "pebble.pem").write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    ca.cert_pem.write_to_path(str(tmp_path / "pebble-ca.pem"))
    port, management, http_port = free_port(), free_port(), free_port()
    (tmp_path / "pebble.json").write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{port}", "managementListenAddress": f"127.0.0.1:{management}",
        "certificate": str(tmp_path / "pebble.pem"), "privateKey": str(tmp_path / "pebble.key"),
        "httpPort": http_port, "tlsPort": free_port(), "ocspResponderURL": "",
        "externalAccountBindingRequired": False, "certificateValidityPeriod": 45}}))
    env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
    proc = subprocess.Popen(["pebble", "-config", str(tmp_path / "pebble.json"), "-strict=false"], env=env,
                            stdout=open(tmp_path / "pebble.log", "wb"), stderr=subprocess.STDOUT)
    assert wait_port(port, 15, proc), (tmp_path / "pebble.log").read_text()
    yield {"directory": f"https://127.0.0.1:{port}/dir", "ca_file": str(tmp_path / "pebble-ca.pem"),
           "http_port": http_port, "log": tmp_path / "pebble.log"}
    proc.terminate()
    proc.wait(5)


def served(port):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            from cryptography import x509

            cert = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
            return cert.issuer.rfc4514_string(), cert.serial_number


def test_issuance_and_renewal_from_pebble(bastion, backend, pebble, tmp_path):
    tls = free_port()
    b = bastion({
        "listeners": [{"address": f"127.0.0.1:{tls}", "tls": {"certificates": [{"acme": ["localhost"]}]}},
                      {"address": f"127.0.0.1:{pebble['http_port']}", "redirect_https": tls}],
        "acme": {"directory": pebble["directory"], "ca_file": pebble["ca_file"], "storage": str(tmp_path / "acme"),
                 "email": "ops@example.com", "renew_before": 35, "check_interval": 1, "retry_initial": 1},
        "routes": [{"upstream": {"servers": [backend.address]}}]})
    # at first a self-signed placeholder, so HTTPS works at once
    issuer, _ = served(tls)
    assert issuer == "CN=localhost"
    deadline = time.monotonic() + 40
    while "Pebble" not in served(tls)[0]:
        assert time.monotonic() < deadline, b.stderr() + pebble["log"].read_text()[-2000:]
        time.sleep(0.5)
    first_issuer, first_serial = served(tls)
    assert "issued" in b.stderr()
    # 45 s validity, renewal 35 s before expiry: a new certificate some 10 s later, without a restart
    deadline = time.monotonic() + 40
    while served(tls)[1] == first_serial:
        assert time.monotonic() < deadline, b.stderr()
        time.sleep(0.5)
    assert "Pebble" in served(tls)[0]
    # and the proxy kept working over HTTPS throughout
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    import urllib.request

    with urllib.request.urlopen(f"https://127.0.0.1:{tls}/echo", timeout=10, context=ctx) as r:
        assert r.status == 200
