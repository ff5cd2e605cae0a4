"""Transport security: a Unix domain socket (file permissions), TLS, and mTLS with client certificates.
The tests make their own certificate authority and certificates."""
from __future__ import annotations

import datetime
import ipaddress
import os
import stat

import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject_cn, key, issuer_cn, issuer_key, ca=False, san=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    d = tmp_path_factory.mktemp("pki")

    def write(name, cert, key):
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    ca_key = _key()
    write("ca", _cert("kernos-test-ca", ca_key, "kernos-test-ca", ca_key, ca=True), ca_key)
    srv_key = _key()
    write("server", _cert("kernos", srv_key, "kernos-test-ca", ca_key,
                          san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), srv_key)
    cli_key = _key()
    write("client", _cert("agent-client", cli_key, "kernos-test-ca", ca_key), cli_key)
    rogue_ca = _key()
    rogue_key = _key()
    write("rogue", _cert("rogue", rogue_key, "rogue-ca", rogue_ca), rogue_key)
    write("rogue-ca", _cert("rogue-ca", rogue_ca, "rogue-ca", rogue_ca, ca=True), rogue_ca)
    return d


def _kernel(tmp_path, listen, **server):
    from conftest import write_config

    cfg = write_config(tmp_path / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       server={k: str(v) for k, v in server.items()} or {"reflection": True})
    return start_kernel(tmp_path / "data", str(cfg), timeout=120, listen=listen)


def test_unix_socket_with_restricted_permissions(tmp_path):
    sock = tmp_path / "kernos.sock"
    proc, address = _kernel(tmp_path, f"unix:{sock}")
    try:
        assert address == f"unix:{sock}"
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        with kernos.sdk.connect(address, agent="local") as s:
            assert s.llm.chat("over a socket", model="echo").text == "over a socket"
    finally:
        assert stop_kernel(proc) == 0


def test_tls(tmp_path, pki):
    proc, address = _kernel(tmp_path, "127.0.0.1:0", tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    try:
        with kernos.sdk.connect(address, agent="tls-agent", tls_ca=str(pki / "ca.pem")) as s:
            assert s.llm.chat("encrypted", model="echo").text == "encrypted"
        with pytest.raises(kernos.sdk.Unavailable):  # plaintext to a TLS port
            kernos.sdk.connect(address, agent="plain", timeout=2)
        with pytest.raises(kernos.sdk.Unavailable):  # a server the client's CA did not sign
            kernos.sdk.connect(address, agent="wrong-ca", tls_ca=str(pki / "rogue-ca.pem"), timeout=2)
    finally:
        assert stop_kernel(proc) == 0


def test_mutual_tls(tmp_path, pki):
    proc, address = _kernel(tmp_path, "127.0.0.1:0", tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                            tls_client_ca=pki / "ca.pem")
    try:
        with kernos.sdk.connect(address, agent="mtls-agent", tls_ca=str(pki / "ca.pem"),
                                tls_cert=str(pki / "client.pem"), tls_key=str(pki / "client.key")) as s:
            assert s.llm.chat("mutual", model="echo").text == "mutual"
        import subprocess
        import sys
        out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "status", "--address", address,
                              "--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"),
                              "--tls-key", str(pki / "client.key")], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "echo" in out.stdout
        with pytest.raises(kernos.sdk.KernosError):  # no client certificate
            kernos.sdk.connect(address, agent="anon", tls_ca=str(pki / "ca.pem"), timeout=2)
        with pytest.raises(kernos.sdk.KernosError):  # a certificate from another CA
            kernos.sdk.connect(address, agent="rogue", tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "rogue.pem"),
                               tls_key=str(pki / "rogue.key"), timeout=2)
    finally:
        assert stop_kernel(proc) == 0


def test_tls_config_errors_name_the_field(tmp_path, pki):
    from kernos.kernel.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="server"):
        load_config(env={"KERNOS_SERVER__TLS_CERT": str(pki / "server.pem")})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(env={"KERNOS_SERVER__TLS_CERT": "/nope.pem", "KERNOS_SERVER__TLS_KEY": "/nope.key"})
