"""Automatic certificates over ACME (HTTP-01 or TLS-ALPN-01), with the `acme` library.

One ACME manager process per node (forked by the master when a listener asks for ACME certificates)
obtains and renews them; workers only answer the challenges, from files the manager writes.
Certificates and the account key live in `acme.storage`:

    account.key                 the ACME account key (created once)
    certs/<name>.pem, .key      the certificate chain and key for a listener's names (<name> = first name)
    challenges/<token>          HTTP-01 key authorizations, while a challenge is pending
    tls-alpn-01/<name>.pem      TLS-ALPN-01 validation certificate and key (RFC 8737), while pending

Until a first certificate is issued, a self-signed placeholder is served, so that HTTPS starts at once
(documented choice: requests are not held). Renewal starts `renew_before` before expiry; a failed
attempt keeps the current certificate and is retried with exponential backoff. The master notices the
new files and reloads, as for any certificate change.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger("bastion.acme")

CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
ACME_TLS_ALPN = "acme-tls/1"
ACME_IDENTIFIER_OID = "1.3.6.1.5.5.7.1.31"  # id-pe-acmeIdentifier (RFC 8737 section 6.1)
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_ALPN_EXTENSION = 16


def cert_paths(storage: str, names: list[str]) -> tuple[str, str]:
    base = Path(storage) / "certs" / names[0].replace("*", "_wildcard")
    return str(base) + ".pem", str(base) + ".key"


def _new_key_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ensure_placeholder(storage: str, names: list[str]) -> tuple[str, str]:
    """The certificate files for `names`; a one-day self-signed certificate until ACME delivers."""
    cert_file, key_file = cert_paths(storage, names)
    if os.path.exists(cert_file) and os.path.exists(key_file):
        return cert_file, key_file
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    os.makedirs(os.path.dirname(cert_file), exist_ok=True)
    key_pem = _new_key_pem()
    key = serialization.load_pem_private_key(key_pem, None)
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_file, key_pem, 0o600)
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return cert_file, key_file


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def not_after(cert_file: str) -> datetime.datetime | None:
    from cryptography import x509

    try:
        with open(cert_file, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc


def is_placeholder(cert_file: str) -> bool:
    from cryptography import x509

    try:
        with open(cert_file, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return True
    return cert.issuer == cert.subject


def tls_alpn_file(storage: str, name: str) -> str:
    """Where a pending TLS-ALPN-01 validation certificate (key and certificate, PEM) for `name` lives."""
    return str(Path(storage) / "tls-alpn-01" / (name.lower() + ".pem"))


def validation_certificate_pem(name: str, key_authorization: str) -> bytes:
    """The RFC 8737 validation certificate for `name`: self-signed, `name` as its only subject
    alternative name, and the critical acmeIdentifier extension holding SHA-256(key authorization).
    Returns the private key and the certificate in one PEM file."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID, ObjectIdentifier

    key_pem = _new_key_pem()
    key = serialization.load_pem_private_key(key_pem, None)
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # the extension's value is the DER of an OCTET STRING of 32 bytes
        .add_extension(x509.UnrecognizedExtension(ObjectIdentifier(ACME_IDENTIFIER_OID), b"\x04\x20" + digest),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


def offered_alpn(client_hello: bytes) -> list[bytes]:
    """The ALPN protocol names in a TLS ClientHello handshake message (with its 4-byte header);
    [] when there are none or the message is malformed."""
    try:
        pos = 4 + 2 + 32  # handshake header, legacy_version, random
        pos += 1 + client_hello[pos]  # session id
        pos += 2 + int.from_bytes(client_hello[pos:pos + 2], "big")  # cipher suites
        pos += 1 + client_hello[pos]  # compression methods
        end = pos + 2 + int.from_bytes(client_hello[pos:pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            kind = int.from_bytes(client_hello[pos:pos + 2], "big")
            size = int.from_bytes(client_hello[pos + 2:pos + 4], "big")
            pos += 4
            if kind == _ALPN_EXTENSION:
                names, at, stop = [], pos + 2, pos + size
                while at < stop:
                    names.append(bytes(client_hello[at + 1:at + 1 + client_hello[at]]))
                    at += 1 + client_hello[at]
                return names
            pos += size
    except IndexError:
        pass
    return []


class TlsAlpnResponder:
    """Worker side of TLS-ALPN-01: a validation server's handshake gets the validation certificate and
    ALPN `acme-tls/1`; every other handshake gets the listener's usual certificate.

    Python's ssl picks the certificate in the SNI callback, before ALPN is negotiated, and does not show
    the client's ALPN list there. So the listener's first context (`entry`) also has a message callback
    (`SSLContext._msg_callback`, CPython's TLS debugging hook) that sees the raw ClientHello just before
    the SNI callback runs and marks connections that offer `acme-tls/1`. The SNI callback then switches a
    marked connection for a name with a pending challenge to a context holding the validation
    certificate, whose only ALPN protocol is `acme-tls/1`. Every connection is switched away from
    `entry` (the default certificate goes to `serving_default`, a twin of it), so the Python message
    callback runs only for the ClientHello, never for the rest of a connection.

    Without that hook (a Python that dropped it), any handshake for a name with a pending challenge is
    treated as a validation: normal clients of that name then see the validation certificate for the
    seconds a validation lasts."""

    MARK = "_bastion_offers_acme_tls"

    def __init__(self, contexts, serving_default, storage: str, names: list[str]):
        self.contexts = contexts
        self.entry = contexts.default
        self.serving_default = serving_default
        self.storage = storage
        self.names = {n.lower() for n in names}
        self.validation_contexts: dict[str, tuple[tuple[int, int], object]] = {}
        self.sees_client_hello = hasattr(self.entry, "_msg_callback")
        if self.sees_client_hello:
            self.entry._msg_callback = self._client_hello
        self.entry.sni_callback = self._choose

    def _client_hello(self, conn, direction, version, content_type, msg_type, data) -> None:
        if msg_type == _CLIENT_HELLO and content_type == _HANDSHAKE and direction == "read":
            if b"acme-tls/1" in data and ACME_TLS_ALPN.encode() in offered_alpn(data):
                setattr(conn, self.MARK, True)

    def _choose(self, ssl_object, server_name, context) -> None:
        name = server_name.lower() if server_name else ""
        if name in self.names and (getattr(ssl_object, self.MARK, False) or not self.sees_client_hello):
            validation = self._validation_context(name)
            if validation is not None:
                ssl_object.context = validation
                return
        chosen = self.contexts.context_for(server_name)
        ssl_object.context = self.serving_default if chosen is self.entry else chosen

    def _validation_context(self, name: str):
        """The context for a pending challenge of `name` (None when none is pending), loaded again only
        when the manager writes a new file."""
        import ssl

        path = tls_alpn_file(self.storage, name)
        try:
            st = os.stat(path)
        except OSError:
            self.validation_contexts.pop(name, None)
            return None
        version = (st.st_mtime_ns, st.st_ino)
        cached = self.validation_contexts.get(name)
        if cached is not None and cached[0] == version:
            return cached[1]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols([ACME_TLS_ALPN])
        try:
            context.load_cert_chain(path)
        except (OSError, ssl.SSLError) as exc:
            log.warning("acme: cannot load the tls-alpn-01 validation certificate %s: %s", path, exc)
            return None
        self.validation_contexts[name] = (version, context)
        return context


def _tls_alpn_challenge_types():
    """The acme library no longer ships tls-alpn-01 (5.x decodes it as an unrecognized challenge); register
    the type the way the library defines its own, so that orders decode it and it is answered like HTTP-01."""
    from acme import challenges

    if "tls-alpn-01" in challenges.Challenge.TYPES:
        return

    @challenges.ChallengeResponse.register
    class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
        typ = "tls-alpn-01"

    @challenges.Challenge.register
    class TLSALPN01(challenges.KeyAuthorizationChallenge):
        response_cls = TLSALPN01Response
        typ = "tls-alpn-01"

        def validation(self, account_key, **unused):
            return self.key_authorization(account_key)


class AcmeIssuer:
    """Talks to one ACME directory with one account."""

    def __init__(self, settings):
        self.settings = settings
        self.storage = Path(settings.storage)
        self.challenges = self.storage / "challenges"
        self.challenges.mkdir(parents=True, exist_ok=True)
        self.client = None

    def _client(self):
        if self.client is not None:
            return self.client
        import josepy
        from acme import client, messages
        from cryptography.hazmat.primitives import serialization

        key_file = self.storage / "account.key"
        if not key_file.exists():
            _write(str(key_file), _new_key_pem(), 0o600)
        key = josepy.JWKEC(key=serialization.load_pem_private_key(key_file.read_bytes(), None))
        verify = self.settings.ca_file or True
        net = client.ClientNetwork(key, alg=josepy.ES256, user_agent="bastion", verify_ssl=verify)
        directory = client.ClientV2.get_directory(self.settings.directory, net)
        acme = client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(
            email=self.settings.email, terms_of_service_agreed=True)
        try:
            account = acme.new_account(registration)
        except Exception as exc:  # noqa: BLE001 - an existing account answers with its location
            from acme import errors

            if isinstance(exc, errors.ConflictError):
                account = acme.query_registration(messages.RegistrationResource(uri=exc.location, body=registration))
            else:
                raise
        net.account = account
        self.client = acme
        return acme

    def issue(self, names: list[str]) -> None:
        """Obtain a certificate for `names` and write it in place of the current files."""
        from acme import crypto_util

        kind = self.settings.challenge
        if kind == "tls-alpn-01":
            _tls_alpn_challenge_types()
        acme = self._client()
        key_pem = _new_key_pem()
        csr = crypto_util.make_csr(key_pem, names)
        order = acme.new_order(csr)
        written = []
        try:
            for authz in order.authorizations:
                if authz.body.status.name == "valid":
                    continue  # already proven (servers may reuse authorizations)
                name = authz.body.identifier.value.lower()
                challenge = next((c for c in authz.body.challenges if getattr(c.chall, "typ", None) == kind), None)
                if challenge is None:
                    raise RuntimeError(f"the ACME server offers no {kind} challenge for {name}")
                # both challenges prove the same key authorization (token.thumbprint), served differently
                response = challenge.chall.response(acme.net.key)
                key_authorization = challenge.chall.key_authorization(acme.net.key)
                if kind == "tls-alpn-01":
                    if name not in {n.lower() for n in names}:
                        raise RuntimeError(f"the ACME server asks to validate {name!r}, which was not ordered")
                    challenge_file = Path(tls_alpn_file(str(self.storage), name))
                    challenge_file.parent.mkdir(parents=True, exist_ok=True)
                    _write(str(challenge_file), validation_certificate_pem(name, key_authorization), 0o600)
                else:
                    challenge_file = self.challenges / challenge.chall.encode("token")
                    _write(str(challenge_file), key_authorization.encode())
                written.append(challenge_file)
                acme.answer_challenge(challenge, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.settings.timeout)
            order = acme.poll_and_finalize(order, deadline=deadline)
        finally:
            for challenge_file in written:
                challenge_file.unlink(missing_ok=True)
        cert_file, key_file = cert_paths(str(self.storage), names)
        _write(key_file, key_pem, 0o600)
        _write(cert_file, order.fullchain_pem.encode())
        log.warning("acme: certificate for %s issued, valid until %s", ", ".join(names),
                    not_after(cert_file).strftime("%Y-%m-%d %H:%M UTC"))


def run_manager(settings, certificates: list[list[str]]) -> int:
    """The ACME manager process: issue what is missing, renew what expires, back off on failures."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    issuer = AcmeIssuer(settings)
    backoff = {tuple(n): 0.0 for n in certificates}
    retry_at = {tuple(n): 0.0 for n in certificates}
    while not stop:
        now = time.monotonic()
        for names in certificates:
            key = tuple(names)
            cert_file, _ = cert_paths(settings.storage, names)
            expires = not_after(cert_file)
            due = is_placeholder(cert_file) or expires is None or (
                expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds() < settings.renew_before
            if not due or now < retry_at[key]:
                continue
            try:
                issuer.issue(names)
                backoff[key] = 0.0
            except Exception as exc:  # noqa: BLE001 - keep serving the current certificate, try again later
                backoff[key] = min(max(backoff[key] * 2, settings.retry_initial), settings.retry_max)
                retry_at[key] = time.monotonic() + backoff[key]
                issuer.client = None
                log.error("acme: certificate for %s failed: %s; retrying in %.0f s", ", ".join(names), exc, backoff[key])
        for _ in range(int(settings.check_interval * 10)):
            if stop:
                break
            time.sleep(0.1)
    return 0
