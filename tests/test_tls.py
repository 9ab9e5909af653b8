"""TLS on the TCP listener (``--tls-cert/--tls-key``): the API and the web UI over
https with a certificate of the test's own CA, vmctl over https:// (``VMCTL_CA_FILE``),
the session cookie Secure, links that say https, and clear start-up errors. A real
agent, no guest."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import urllib.request

import pytest

from agent_helpers import ROOT, AgentProcess

TOKEN = "tls-operator-token-0123456789abcdef"


def _cert(directory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmagent test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    crt, pem = directory / "agent.crt", directory / "agent.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    pem.chmod(0o600)
    return crt, pem


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory):
    base = tmp_path_factory.mktemp("tls")
    crt, key = _cert(base)
    agent = AgentProcess(base / "state", "--tls-cert", str(crt), "--tls-key", str(key),
                         token=TOKEN).start()
    agent.crt = crt
    try:
        yield agent
    finally:
        agent.cleanup()


def _vmctl(agent, *args, ca=True):
    env = {**os.environ, "VMCTL_TOKEN": TOKEN, "VMCTL_CONFIG": os.devnull}
    env.pop("VMCTL_CA_FILE", None)
    if ca:
        env["VMCTL_CA_FILE"] = str(agent.crt)
    return subprocess.run([sys.executable, "-m", "vmctl", "--host",
                           f"https://127.0.0.1:{agent.port}", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=60)


def test_vmctl_talks_to_the_agent_over_https(tls_agent):
    res = _vmctl(tls_agent, "--json", "list")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["vms"] == []
    link = _vmctl(tls_agent, "ui")
    assert link.returncode == 0, link.stderr
    assert link.stdout.strip().startswith(f"https://127.0.0.1:{tls_agent.port}/ui/link/vml_")


def test_an_untrusted_certificate_is_a_clear_error(tls_agent):
    res = _vmctl(tls_agent, "list", ca=False)
    assert res.returncode == 6 and "TLS" in res.stderr and "VMCTL_CA_FILE" in res.stderr


def test_the_web_ui_over_tls_has_a_secure_cookie(tls_agent):
    ctx = ssl.create_default_context(cafile=str(tls_agent.crt))
    with urllib.request.urlopen(f"https://127.0.0.1:{tls_agent.port}/ui/login",
                                context=ctx, timeout=30) as resp:
        cookie = resp.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]


def test_plain_http_to_the_tls_listener_gets_nothing(tls_agent):
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_agent.port}/v1/host", timeout=10)


@pytest.mark.parametrize("args,message", [
    (["--tls-cert", "/nonexistent.crt"], "go together"),
    (["--tls-cert", "/nonexistent.crt", "--tls-key", "/nonexistent.key", "--listen",
      "127.0.0.1:0"], "no such file"),
    (["--tls-cert", __file__, "--tls-key", __file__, "--listen", "127.0.0.1:0"],
     "cannot load"),
])
def test_tls_start_up_errors_are_clear(tmp_path, args, message):
    res = subprocess.run([sys.executable, "-m", "vmagent.cli", "serve", "--state-dir",
                          str(tmp_path / "s"), "--accel", "tcg", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and message in res.stderr, res.stderr


def test_tls_without_a_tcp_listener_is_refused(tmp_path):
    crt, key = _cert(tmp_path)
    res = subprocess.run([sys.executable, "-m", "vmagent.cli", "serve", "--state-dir",
                          str(tmp_path / "s"), "--accel", "tcg", "--tls-cert", str(crt),
                          "--tls-key", str(key)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1 and "--listen" in res.stderr, res.stderr
