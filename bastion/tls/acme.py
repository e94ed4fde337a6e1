"""Automatic certificates over ACME (HTTP-01), with the `acme` library.

One ACME manager process per node (forked by the master when a listener asks for ACME certificates)
obtains and renews them; workers only answer the HTTP-01 challenges, from files the manager writes.
Certificates and the account key live in `acme.storage`:

    account.key                 the ACME account key (created once)
    certs/<name>.pem, .key      the certificate chain and key for a listener's names (<name> = first name)
    challenges/<token>          HTTP-01 key authorizations, while a challenge is pending

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
        from acme import challenges, crypto_util

        acme = self._client()
        key_pem = _new_key_pem()
        csr = crypto_util.make_csr(key_pem, names)
        order = acme.new_order(csr)
        written = []
        try:
            for authz in order.authorizations:
                if authz.body.status.name == "valid":
                    continue  # already proven (servers may reuse authorizations)
                challenge = next(c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01))
                response, validation = challenge.response_and_validation(acme.net.key)
                token_file = self.challenges / challenge.chall.encode("token")
                _write(str(token_file), validation.encode())
                written.append(token_file)
                acme.answer_challenge(challenge, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.settings.timeout)
            order = acme.poll_and_finalize(order, deadline=deadline)
        finally:
            for token_file in written:
                token_file.unlink(missing_ok=True)
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
