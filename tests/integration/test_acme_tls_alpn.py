"""ACME TLS-ALPN-01 (RFC 8737) against Debian's pebble: the validation handshake goes to Bastion's HTTPS
listener itself, no plain port needed."""

import json
import os
import shutil
import subprocess
import time

import pytest
import trustme

from tests.conftest import wait_port
from tests.integration.test_acme import served
from tests.support.ports import free_port

pytestmark = pytest.mark.skipif(shutil.which("pebble") is None, reason="pebble is installed by `make test`")


def test_issuance_with_tls_alpn_01(bastion, backend, tmp_path):
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.private_key_pem.write_to_path(str(tmp_path / "pebble.key"))
    (tmp_path / "pebble.pem").write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    ca.cert_pem.write_to_path(str(tmp_path / "pebble-ca.pem"))
    port, management, tls = free_port(), free_port(), free_port()
    (tmp_path / "pebble.json").write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{port}", "managementListenAddress": f"127.0.0.1:{management}",
        "certificate": str(tmp_path / "pebble.pem"), "privateKey": str(tmp_path / "pebble.key"),
        "httpPort": free_port(), "tlsPort": tls, "ocspResponderURL": "",
        "externalAccountBindingRequired": False}}))
    env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
    log = tmp_path / "pebble.log"
    proc = subprocess.Popen(["pebble", "-config", str(tmp_path / "pebble.json"), "-strict=false"], env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        assert wait_port(port, 15, proc), log.read_text()
        b = bastion({
            "listeners": [{"address": f"127.0.0.1:{tls}", "tls": {"certificates": [{"acme": ["localhost"]}]}}],
            "acme": {"directory": f"https://127.0.0.1:{port}/dir", "ca_file": str(tmp_path / "pebble-ca.pem"),
                     "storage": str(tmp_path / "acme"), "challenge": "tls-alpn-01", "check_interval": 1,
                     "retry_initial": 1},
            "routes": [{"upstream": {"servers": [backend.address]}}]})
        assert served(tls)[0] == "CN=localhost"  # the placeholder until the certificate is issued
        deadline = time.monotonic() + 40
        while "Pebble" not in served(tls)[0]:
            assert time.monotonic() < deadline, b.stderr() + log.read_text()[-3000:]
            time.sleep(0.5)
        assert "issued" in b.stderr()  # and Bastion has no plain listener: only TLS-ALPN-01 could prove it
        assert not list((tmp_path / "acme" / "challenges" / "tls-alpn-01").glob("*.pem"))  # cleaned up
    finally:
        proc.terminate()
        proc.wait(5)
