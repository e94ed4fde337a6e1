"""HTTPS termination: certificates by SNI, protocol limits, redirect to HTTPS, HSTS, certificate errors
at start-up, and certificates reloaded when their files change."""

import datetime
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import trustme

from tests.support.ports import free_port
from tests.support.raw import http_raw, parse_response

BASTION = str(Path(sys.executable).parent / "bastion")


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def write_cert(ca, tmp_path, name, *hosts, not_after=None):
    cert = ca.issue_cert(*hosts, not_after=not_after) if not_after else ca.issue_cert(*hosts)
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return str(cert_file), str(key_file)


def client_context(ca):
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def https_get(port, host, ca, path="/echo", context=None):
    ctx = context or client_context(ca)
    req = urllib.request.Request(f"https://{host}:{port}{path}")
    with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
        return r.status, dict(r.headers), r.read(), r.fp.raw._sock.version() if hasattr(r.fp, "raw") else None


def tls_config(tmp_path, ca, backend, port, **tls):
    a = write_cert(ca, tmp_path, "a", "a.example", "localhost")
    w = write_cert(ca, tmp_path, "w", "*.wild.example")
    return {"listeners": [{"address": f"127.0.0.1:{port}",
                           "tls": {"certificates": [{"cert": a[0], "key": a[1]}, {"cert": w[0], "key": w[1]}], **tls}}],
            "routes": [{"upstream": {"servers": [backend.address]}}]}


def served_names(port, server_name):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as s:
            der = s.getpeercert(binary_form=True)
            from cryptography import x509

            cert = x509.load_der_x509_certificate(der)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            return san.get_values_for_type(x509.DNSName), s.version(), s.selected_alpn_protocol()


def test_https_with_sni_certificates_and_forwarded_proto(bastion, backend, ca, tmp_path):
    port = free_port()
    b = bastion(tls_config(tmp_path, ca, backend, port))
    names, version, alpn = served_names(port, "a.example")
    assert "a.example" in names and version in ("TLSv1.2", "TLSv1.3") and alpn in (None, "http/1.1")
    assert served_names(port, "x.wild.example")[0] == ["*.wild.example"]
    assert "a.example" in served_names(port, "unknown.example")[0]  # the first certificate is the default
    ctx = client_context(ca)
    ctx.check_hostname = False
    req = urllib.request.Request(f"https://127.0.0.1:{port}/echo", headers={"Host": "a.example"})
    with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
        seen = {k.lower(): v for k, v in json.loads(r.read())["headers"]}
    assert seen["x-forwarded-proto"] == "https"


def test_protocol_limits_with_openssl(bastion, backend, ca, tmp_path):
    port = free_port()
    bastion(tls_config(tmp_path, ca, backend, port))

    def s_client(*flags):
        result = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "a.example", *flags],
                                input="", capture_output=True, text=True, timeout=20)
        return result.returncode == 0 and "BEGIN CERTIFICATE" in result.stdout

    assert s_client("-tls1_2")
    assert s_client("-tls1_3")
    assert not s_client("-tls1_1")
    assert not s_client("-tls1_2", "-cipher", "AES128-SHA")  # no RSA key exchange, no CBC in "intermediate"
    port2 = free_port()
    b2 = bastion(tls_config(tmp_path, ca, backend, port2, profile="modern"))
    result = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port2}", "-tls1_2"], input="",
                            capture_output=True, text=True, timeout=20)
    assert "BEGIN CERTIFICATE" not in result.stdout  # modern: TLS 1.3 only


def test_redirect_https_and_hsts(bastion, backend, ca, tmp_path):
    plain, tls = free_port(), free_port()
    config = tls_config(tmp_path, ca, backend, tls, hsts={"max_age": 600, "include_subdomains": True})
    config["listeners"].append({"address": f"127.0.0.1:{plain}", "redirect_https": tls})
    b = bastion(config)
    status, headers, _ = parse_response(http_raw(plain, b"GET /a/b?c=1 HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"))
    assert status == 308 and dict(headers)["Location"] == f"https://a.example:{tls}/a/b?c=1"
    ctx = client_context(ca)
    ctx.check_hostname = False
    with urllib.request.urlopen(f"https://127.0.0.1:{tls}/echo", timeout=10, context=ctx) as r:
        assert r.headers["Strict-Transport-Security"] == "max-age=600; includeSubDomains"


@pytest.mark.parametrize("problem", ["missing", "mismatch", "expired", "not-pem"])
def test_certificate_problems_stop_startup_with_a_clear_error(ca, tmp_path, backend, problem):
    cert, key = write_cert(ca, tmp_path, "good", "a.example")
    if problem == "missing":
        cert = str(tmp_path / "nope.pem")
        expected = "cannot read certificate"
    elif problem == "mismatch":
        _, key = write_cert(ca, tmp_path, "other", "b.example")
        expected = "the key does not match the certificate"
    elif problem == "expired":
        cert, key = write_cert(ca, tmp_path, "old", "a.example",
                               not_after=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1))
        expected = "expired on"
    else:
        Path(cert).write_text("hello")
        expected = "not a PEM certificate"
    f = tmp_path / "bad.yaml"
    f.write_text(json.dumps({"listeners": [{"address": f"127.0.0.1:{free_port()}",
                                            "tls": {"certificates": [{"cert": cert, "key": key}]}}],
                             "routes": [{"upstream": {"servers": [backend.address]}}]}))
    result = subprocess.run([BASTION, "run", "-c", str(f)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "listeners[0].tls.certificates" in result.stderr and expected in result.stderr, result.stderr


def test_certificate_files_changing_are_picked_up(bastion, backend, ca, tmp_path):
    port = free_port()
    b = bastion(tls_config(tmp_path, ca, backend, port))
    assert "a.example" in served_names(port, "a.example")[0]
    time.sleep(1.1)
    write_cert(ca, tmp_path, "a", "a.example", "renewed.example")  # the same files, a new certificate
    deadline = time.monotonic() + 10
    while "renewed.example" not in served_names(port, "a.example")[0]:
        assert time.monotonic() < deadline, b.stderr()
        time.sleep(0.3)
    assert "certificate files changed" in b.stderr()
