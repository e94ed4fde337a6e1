"""TLS contexts for HTTPS listeners: certificates chosen by SNI (exact names and wildcards), Mozilla's
"intermediate" or "modern" profile, session tickets on, and start-up errors that name the problem
(missing or unreadable file, key that does not match, expired certificate)."""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass

# Mozilla's "intermediate" TLS 1.2 cipher list (TLS 1.3 suites are OpenSSL's defaults).
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)


class CertificateError(ValueError):
    pass


@dataclass
class LoadedCertificate:
    context: ssl.SSLContext
    names: list[str]  # DNS names (and the CN when there are none), lower case
    not_after: datetime.datetime


def _names(cert_pem: bytes) -> tuple[list[str], datetime.datetime]:
    from cryptography import x509
    from cryptography.x509.oid import ExtensionOID, NameOID

    cert = x509.load_pem_x509_certificate(cert_pem)
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    if not names:
        names = [a.value.lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return names, cert.not_valid_after_utc


def server_context(cert_file: str, key_file: str, profile: str, client_auth=None, http2: bool = False) -> LoadedCertificate:
    try:
        with open(cert_file, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise CertificateError(f"cannot read certificate {cert_file}: {exc.strerror or exc}") from None
    try:
        open(key_file, "rb").close()
    except OSError as exc:
        raise CertificateError(f"cannot read key {key_file}: {exc.strerror or exc}") from None
    try:
        names, not_after = _names(pem)
    except ValueError as exc:
        raise CertificateError(f"{cert_file} is not a PEM certificate: {exc}") from None
    if not_after < datetime.datetime.now(datetime.timezone.utc):
        raise CertificateError(f"certificate {cert_file} expired on {not_after:%Y-%m-%d %H:%M} UTC")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if profile == "modern":
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(INTERMEDIATE_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        reason = "the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(exc) else str(exc)
        raise CertificateError(f"{cert_file} / {key_file}: {reason}") from None
    if client_auth is not None:
        try:
            context.load_verify_locations(client_auth.ca)
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(f"cannot load client CA {client_auth.ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED if client_auth.mode == "required" else ssl.CERT_OPTIONAL
    return LoadedCertificate(context, names, not_after)


class SniContexts:
    """The listener's default context, switching to the certificate that matches the client's SNI."""

    def __init__(self, loaded: list[LoadedCertificate]):
        self.default = loaded[0].context
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        for item in loaded:
            for name in item.names:
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], item.context)
                else:
                    self.exact.setdefault(name, item.context)
        if len(loaded) > 1:
            self.default.sni_callback = self._choose

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        if not server_name:
            return self.default
        name = server_name.lower()
        found = self.exact.get(name)
        if found is None:
            _, _, parent = name.partition(".")
            found = self.wildcard.get(parent, self.default)
        return found

    def _choose(self, ssl_object, server_name, context) -> None:
        chosen = self.context_for(server_name)
        if chosen is not context:
            ssl_object.context = chosen


def certificate_files(certificate, acme_settings) -> tuple[str, str]:
    """The (cert, key) files of a configured certificate; for ACME ones, where the manager keeps them
    (a self-signed placeholder is written until the first issuance)."""
    if certificate.acme is None:
        return certificate.cert, certificate.key
    if acme_settings is None:
        raise CertificateError("acme certificates need the top-level `acme` section")
    from bastion.tls.acme import ensure_placeholder

    try:
        return ensure_placeholder(acme_settings.storage, certificate.acme)
    except OSError as exc:
        raise CertificateError(f"cannot write to acme storage {acme_settings.storage}: {exc.strerror or exc}") from None


def listener_context(tls, acme_settings=None, http2: bool = False) -> SniContexts:
    loaded = []
    for c in tls.certificates:
        cert, key = certificate_files(c, acme_settings)
        loaded.append(server_context(cert, key, tls.profile, tls.client_auth, http2))
    contexts = SniContexts(loaded)
    answer_tls_alpn_challenges(contexts, tls, acme_settings, http2)
    return contexts


def answer_tls_alpn_challenges(contexts: SniContexts, tls, acme_settings, http2: bool = False) -> None:
    """With `acme.challenge: tls-alpn-01`, a listener holding ACME certificates answers the validation
    handshakes for their names (see bastion.tls.acme.TlsAlpnResponder)."""
    if acme_settings is None or acme_settings.challenge != "tls-alpn-01":
        return
    names = [name for c in tls.certificates if c.acme for name in c.acme]
    if not names:
        return
    wildcards = [name for name in names if name.startswith("*.")]
    if wildcards:
        raise CertificateError(f"tls-alpn-01 cannot prove wildcard names ({', '.join(wildcards)}); "
                               "the ACME server only validates them over DNS-01")
    if tls.client_auth is not None and tls.client_auth.mode == "required":
        # the verify mode of the first context stays with the connection: the ACME server, which has no
        # client certificate, would be refused
        raise CertificateError("tls-alpn-01 cannot be answered with client_auth mode required; "
                               "use client_auth mode optional or acme challenge http-01")
    from bastion.tls.acme import TlsAlpnResponder

    # a twin of the default context, so that no served connection stays on the one with the hook
    cert, key = certificate_files(tls.certificates[0], acme_settings)
    serving_default = server_context(cert, key, tls.profile, tls.client_auth, http2).context
    TlsAlpnResponder(contexts, serving_default, acme_settings.storage, names)


def upstream_context(settings, http2: bool = False) -> ssl.SSLContext:
    """The context Bastion uses towards https:// backends: verification on (system CAs or `ca`), host
    name checked, an optional client certificate for mTLS."""
    context = ssl.create_default_context(cafile=settings.ca if settings is not None and settings.ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"] if http2 else ["http/1.1"])
    if settings is not None and settings.client_cert:
        try:
            context.load_cert_chain(settings.client_cert, settings.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(f"cannot load client certificate {settings.client_cert}: {exc}") from None
    if settings is not None and settings.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def client_certificate_info(ssl_object) -> tuple[bytes, bytes] | None:
    """(subject, SHA-256 fingerprint) of the verified client certificate, or None."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    import hashlib

    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return cert.subject.rfc4514_string().encode("latin-1", "replace"), hashlib.sha256(der).hexdigest().encode()
