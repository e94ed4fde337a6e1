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


def client_cert_files(ca, tmp_path, name):
    cert = ca.issue_cert(f"{name}@example.com", common_name=name)
    cert_file, key_file = tmp_path / f"client-{name}.pem", tmp_path / f"client-{name}.key"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return str(cert_file), str(key_file)


def test_client_certificates_required_optional_and_passed_on(bastion, backend, ca, tmp_path):
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    alice = client_cert_files(ca, tmp_path, "alice")
    stranger_ca = trustme.CA()
    mallory = client_cert_files(stranger_ca, tmp_path, "mallory")

    def get(port, cert=None, headers=None):
        ctx = client_context(ca)
        ctx.check_hostname = False
        if cert:
            ctx.load_cert_chain(*cert)
        req = urllib.request.Request(f"https://127.0.0.1:{port}/echo", headers=headers or {})
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return {k.lower(): v for k, v in json.loads(r.read())["headers"]}

    required, optional = free_port(), free_port()
    config = tls_config(tmp_path, ca, backend, required, client_auth={"mode": "required", "ca": str(ca_file)})
    opt = tls_config(tmp_path, ca, backend, optional, client_auth={"mode": "optional", "ca": str(ca_file)})
    config["listeners"] += opt["listeners"]
    bastion(config)
    seen = get(required, alice, {"X-Client-Subject": "CN=admin"})
    assert seen["x-client-subject"].startswith("CN=alice,") and len(seen["x-client-fingerprint"]) == 64
    with pytest.raises(OSError):
        get(required)  # no certificate
    with pytest.raises(OSError):
        get(required, mallory)  # a certificate from another CA
    seen = get(optional, headers={"X-Client-Subject": "CN=admin", "X-Client-Fingerprint": "00"})
    assert "x-client-subject" not in seen and "x-client-fingerprint" not in seen  # forged headers are dropped
    assert get(optional, alice)["x-client-subject"].startswith("CN=alice,")


def test_https_to_backends_verified_with_sni_and_client_certificate(bastion, backend_factory, ca, tmp_path):
    server = write_cert(ca, tmp_path, "backend", "backend.internal")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    bastion_client = client_cert_files(ca, tmp_path, "bastion")
    secure = backend_factory("secure", extra=["--cert", server[0], "--key", server[1], "--client-ca", str(ca_file)])
    base = {"servers": [f"https://{secure.address}"]}
    good = bastion({"upstreams": {"app": {**base, "tls": {"ca": str(ca_file), "server_name": "backend.internal",
                                                          "client_cert": bastion_client[0], "client_key": bastion_client[1]}}},
                    "routes": [{"upstream": "app"}]})
    with urllib.request.urlopen(good.url + "/echo", timeout=10) as r:
        assert json.loads(r.read())["name"] == "secure"
    # the wrong name is refused (verification is on by default)
    wrong = bastion({"upstreams": {"app": {**base, "tls": {"ca": str(ca_file), "server_name": "other.internal",
                                                           "client_cert": bastion_client[0], "client_key": bastion_client[1]}}},
                     "routes": [{"upstream": "app"}]})
    with pytest.raises(urllib.error.HTTPError) as failure:
        urllib.request.urlopen(wrong.url + "/echo", timeout=10)
    assert failure.value.code == 502 and wrong.wait_access_log(1)[-1]["error"] == "tls_error"
    # insecure_skip_verify connects anyway, and says so at start-up
    lax = bastion({"upstreams": {"app": {**base, "tls": {"insecure_skip_verify": True, "client_cert": bastion_client[0],
                                                         "client_key": bastion_client[1]}}},
                   "routes": [{"upstream": "app"}]})
    with urllib.request.urlopen(lax.url + "/echo", timeout=10) as r:
        assert r.status == 200
    assert "insecure_skip_verify is on" in lax.stderr()
