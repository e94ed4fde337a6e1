"""Automatic certificates: real issuances from Debian's pebble (Let's Encrypt's test ACME server), with
the HTTP-01 challenge answered by Bastion's own plain listener, and with the TLS-ALPN-01 challenge
answered in the handshake on Bastion's HTTPS listener."""

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
    """A pebble ACME server whose HTTP-01 validations go to `http_port` (Bastion's plain listener) and
    TLS-ALPN-01 validations to `tls_port` (Bastion's HTTPS listener). Validations are real."""
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.private_key_pem.write_to_path(str(tmp_path / "pebble.key"))
    (tmp_path / "pebble.pem").write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    ca.cert_pem.write_to_path(str(tmp_path / "pebble-ca.pem"))
    port, management, http_port, tls_port = free_port(), free_port(), free_port(), free_port()
    (tmp_path / "pebble.json").write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{port}", "managementListenAddress": f"127.0.0.1:{management}",
        "certificate": str(tmp_path / "pebble.pem"), "privateKey": str(tmp_path / "pebble.key"),
        "httpPort": http_port, "tlsPort": tls_port, "ocspResponderURL": "",
        "externalAccountBindingRequired": False, "certificateValidityPeriod": 45}}))
    env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
    proc = subprocess.Popen(["pebble", "-config", str(tmp_path / "pebble.json"), "-strict=false"], env=env,
                            stdout=open(tmp_path / "pebble.log", "wb"), stderr=subprocess.STDOUT)
    assert wait_port(port, 15, proc), (tmp_path / "pebble.log").read_text()
    yield {"directory": f"https://127.0.0.1:{port}/dir", "ca_file": str(tmp_path / "pebble-ca.pem"),
           "http_port": http_port, "tls_port": tls_port, "management": f"https://127.0.0.1:{management}",
           "log": tmp_path / "pebble.log"}
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


def pebble_root(pebble) -> str:
    """The root that signs pebble's certificates (new at every start), from its management interface."""
    import urllib.request

    ctx = ssl.create_default_context(cafile=pebble["ca_file"])
    with urllib.request.urlopen(pebble["management"] + "/roots/0", timeout=10, context=ctx) as r:
        return r.read().decode()


def handshake(port, name="localhost", alpn=None, cadata=None, maximum=None):
    """(certificate, negotiated ALPN) that Bastion serves to a client sending SNI `name` and offering
    `alpn`; with `cadata`, the certificate must verify against it for `name`."""
    from cryptography import x509

    ctx = ssl.create_default_context(cadata=cadata) if cadata else ssl._create_unverified_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum:
        ctx.maximum_version = maximum
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as s:
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)), s.selected_alpn_protocol()


def https_get(port, path, cadata):
    """A request over a verified connection to `localhost`; returns the status line."""
    ctx = ssl.create_default_context(cadata=cadata)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.split(b"\r\n", 1)[0].decode()


def test_issuance_over_tls_alpn_01_from_pebble(bastion, backend, pebble, tmp_path):
    # Only an HTTPS listener, on the port pebble validates TLS-ALPN-01 on: no HTTP-01 is possible.
    tls = pebble["tls_port"]
    storage = tmp_path / "acme"
    b = bastion({
        "listeners": [{"address": f"127.0.0.1:{tls}", "tls": {"certificates": [{"acme": ["localhost"]}]}}],
        "acme": {"directory": pebble["directory"], "ca_file": pebble["ca_file"], "storage": str(storage),
                 "challenge": "tls-alpn-01", "renew_before": 1, "check_interval": 1, "retry_initial": 1},
        "routes": [{"upstream": {"servers": [backend.address]}}]}, workers=2)  # either worker may get a validation
    assert handshake(tls)[0].issuer.rfc4514_string() == "CN=localhost"  # the placeholder, at once
    deadline = time.monotonic() + 40
    while "Pebble" not in handshake(tls)[0].issuer.rfc4514_string():
        assert time.monotonic() < deadline, b.stderr() + pebble["log"].read_text()[-3000:]
        time.sleep(0.5)
    assert "issued" in b.stderr()
    # the issued certificate verifies for localhost against pebble's root, and the proxy serves with it
    root = pebble_root(pebble)
    cert, protocol = handshake(tls, cadata=root)
    assert "Pebble" in cert.issuer.rfc4514_string()
    assert https_get(tls, "/echo", root) == "HTTP/1.1 200 OK"
    # the validation certificate is gone once the order is done
    assert list((storage / "tls-alpn-01").iterdir()) == []


def test_validation_handshakes_get_the_validation_certificate_others_the_usual_one(bastion, backend, tmp_path):
    """While a TLS-ALPN-01 challenge is pending, only a client offering ALPN acme-tls/1 for that name
    sees the validation certificate; browsers and other clients of the same name are not disturbed."""
    from cryptography import x509

    from bastion.tls.acme import ACME_IDENTIFIER_OID, tls_alpn_file, validation_certificate_pem

    tls = free_port()
    storage = tmp_path / "acme"
    b = bastion({
        "listeners": [{"address": f"127.0.0.1:{tls}", "tls": {"certificates": [{"acme": ["localhost", "alt.localhost"]}]}}],
        # an ACME server that is not there: the manager keeps retrying, the placeholder is served
        "acme": {"directory": f"https://127.0.0.1:{free_port()}/dir", "storage": str(storage),
                 "challenge": "tls-alpn-01", "retry_initial": 60},
        "routes": [{"upstream": {"servers": [backend.address]}}]})
    b.wait_ready()
    placeholder = handshake(tls)[0]
    assert placeholder.issuer.rfc4514_string() == "CN=localhost"
    # no challenge pending: an acme-tls/1 client gets the usual certificate and no ALPN
    cert, protocol = handshake(tls, alpn=["acme-tls/1"])
    assert cert.serial_number == placeholder.serial_number and protocol is None
    # a pending challenge for localhost, written as the manager writes it
    path = tls_alpn_file(str(storage), "localhost")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(validation_certificate_pem("localhost", "token.thumbprint"))
    cert, protocol = handshake(tls, alpn=["acme-tls/1"], maximum=ssl.TLSVersion.TLSv1_2)
    assert protocol == "acme-tls/1" and cert.serial_number != placeholder.serial_number  # over TLS 1.2 too
    cert, protocol = handshake(tls, alpn=["acme-tls/1"])
    assert protocol == "acme-tls/1"
    extension = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(ACME_IDENTIFIER_OID))
    assert extension.critical
    import hashlib

    assert extension.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()
    # ... while normal clients of the same name, with or without ALPN, keep the usual certificate
    for alpn in (None, ["h2", "http/1.1"], ["http/1.1"]):
        for maximum in (None, ssl.TLSVersion.TLSv1_2):
            cert, protocol = handshake(tls, alpn=alpn, maximum=maximum)
            assert cert.serial_number == placeholder.serial_number, (alpn, maximum)
            assert protocol != "acme-tls/1"
    # and requests still work
    with socket.create_connection(("127.0.0.1", tls), timeout=5) as raw:
        with ssl._create_unverified_context().wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    # the other name has no pending challenge
    cert, protocol = handshake(tls, name="alt.localhost", alpn=["acme-tls/1"])
    assert cert.serial_number == placeholder.serial_number and protocol is None
    # a new challenge file is picked up (workers do not keep a stale validation certificate)
    time.sleep(0.05)
    with open(path + ".tmp", "wb") as f:
        f.write(validation_certificate_pem("localhost", "other.thumbprint"))
    os.replace(path + ".tmp", path)
    cert, _ = handshake(tls, alpn=["acme-tls/1"])
    assert cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(ACME_IDENTIFIER_OID)).value.value[2:] == \
        hashlib.sha256(b"other.thumbprint").digest()
    # once the challenge is over, validation clients get the usual certificate again
    os.unlink(path)
    cert, protocol = handshake(tls, alpn=["acme-tls/1"])
    assert cert.serial_number == placeholder.serial_number and protocol is None


@pytest.mark.parametrize("tls, expected", [
    ({"certificates": [{"acme": ["*.example.com"]}]}, "cannot prove wildcard names"),
    # the validation server has no client certificate
    ({"certificates": [{"acme": ["example.com"]}], "client_auth": {"mode": "required", "ca": "CA"}},
     "client_auth mode required"),
])
def test_tls_alpn_01_configurations_it_cannot_answer(backend, tmp_path, tls, expected):
    from tests.conftest import BASTION

    if "client_auth" in tls:
        import trustme

        trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        tls["client_auth"]["ca"] = str(tmp_path / "ca.pem")
    f = tmp_path / "bad.yaml"
    f.write_text(json.dumps({
        "listeners": [{"address": f"127.0.0.1:{free_port()}", "tls": tls}],
        "acme": {"storage": str(tmp_path / "acme"), "challenge": "tls-alpn-01"},
        "routes": [{"upstream": {"servers": [backend.address]}}]}))
    result = subprocess.run([BASTION, "check", "-c", str(f)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "listeners[0].tls.certificates" in result.stderr and expected in result.stderr, result.stderr
    # the same listener is fine with http-01
    f.write_text(f.read_text().replace("tls-alpn-01", "http-01"))
    assert subprocess.run([BASTION, "check", "-c", str(f)], capture_output=True, text=True, timeout=20).returncode == 0


def test_unknown_challenge_type_is_a_config_error(backend, tmp_path):
    from tests.conftest import BASTION

    f = tmp_path / "bad.yaml"
    f.write_text(json.dumps({
        "listeners": [{"address": f"127.0.0.1:{free_port()}", "tls": {"certificates": [{"acme": ["example.com"]}]}}],
        "acme": {"storage": str(tmp_path / "acme"), "challenge": "dns-01"},
        "routes": [{"upstream": {"servers": [backend.address]}}]}))
    result = subprocess.run([BASTION, "check", "-c", str(f)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "acme.challenge" in result.stderr and "tls-alpn-01" in result.stderr, result.stderr
