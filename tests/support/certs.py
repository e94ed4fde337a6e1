"""Test certificates from a trustme CA, written as the PEM files a Bastion listener is configured with."""

from __future__ import annotations

from pathlib import Path


def server_cert_files(ca, directory: Path, *hosts: str) -> tuple[str, str]:
    """(chain file, key file) of a certificate for `hosts` (default: localhost and 127.0.0.1)."""
    cert = ca.issue_cert(*(hosts or ("localhost", "127.0.0.1")))
    cert_file, key_file = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return str(cert_file), str(key_file)
