"""TLS-ALPN-01 pieces that need no network: reading ALPN from real ClientHellos, the RFC 8737
validation certificate, the challenge option and host-name checks in the schema."""

import hashlib
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from bastion.config.schema import Acme, Certificate
from bastion.tls.acme import ACME_IDENTIFIER_OID, offered_alpn, validation_certificate_pem


def client_hello(alpn=None, maximum=None, server_name="example.com") -> bytes:
    """The ClientHello handshake message Python's ssl sends (record header removed)."""
    ctx = ssl._create_unverified_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum:
        ctx.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    record = outgoing.read()
    assert record[0] == 22  # a handshake record
    return record[5:]


@pytest.mark.parametrize("maximum", [None, ssl.TLSVersion.TLSv1_2])
def test_alpn_names_are_read_from_a_client_hello(maximum):
    assert offered_alpn(client_hello(["acme-tls/1"], maximum)) == [b"acme-tls/1"]
    assert offered_alpn(client_hello(["h2", "http/1.1"], maximum)) == [b"h2", b"http/1.1"]
    assert offered_alpn(client_hello(None, maximum)) == []


def test_a_name_that_looks_like_the_protocol_is_not_an_offer():
    hello = client_hello(["http/1.1"], server_name="acme-tls")
    assert offered_alpn(hello) == [b"http/1.1"]


@pytest.mark.parametrize("cut", [0, 5, 40, 60, 100, -3])
def test_truncated_client_hellos_offer_nothing(cut):
    hello = client_hello(["acme-tls/1"])
    assert offered_alpn(hello[:cut]) in ([], [b"acme-tls/1"])
    assert offered_alpn(b"") == []


def test_validation_certificate_follows_rfc_8737():
    pem = validation_certificate_pem("www.example.com", "tok.thumb")
    key = serialization.load_pem_private_key(pem, None)
    cert = x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE"):])
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["www.example.com"]
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(ACME_IDENTIFIER_OID))
    assert ext.critical
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"tok.thumb").digest()  # DER OCTET STRING (32)
    # the PEM file is what a worker loads into its context
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        f.write(pem)
        f.flush()
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(f.name)


def test_challenge_option():
    assert Acme().challenge == "http-01"
    assert Acme(challenge="tls-alpn-01").challenge == "tls-alpn-01"
    with pytest.raises(ValidationError, match="tls-alpn-01"):
        Acme(challenge="dns-01")


@pytest.mark.parametrize("name", ["example.com", "*.example.com", "localhost", "a-b.c1.example", "EXAMPLE.com"])
def test_acme_names_accepted(name):
    assert Certificate(acme=name).acme == [name]


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "", "-a.example", "a..example", "a b", "x.*.example"])
def test_acme_names_that_are_not_host_names_are_refused(name):
    with pytest.raises(ValidationError, match="is not a host name"):
        Certificate(acme=[name])
