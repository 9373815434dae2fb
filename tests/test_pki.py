"""fl-pki: the city CA, the coordinator's TLS certificate and the departments' Flower node keys."""

from __future__ import annotations

import argparse
import ast
import errno
import hashlib
import ipaddress
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the venv may not have cityfed installed (`make install` does)
    sys.path.insert(0, str(ROOT))

from privacy import pki  # noqa: E402
from privacy.pki_cli import app  # noqa: E402

SANS = ["127.0.0.1", "localhost", "coord.city.example"]
runner = CliRunner(env={"COLUMNS": "200"})


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for SANS, and a second, unrelated CA."""
    base = tmp_path_factory.mktemp("city")
    pki.create_ca(base / "ca", "City of Cleveland FL CA")
    pki.issue_server_cert(base / "ca", base / "srv", SANS)
    pki.create_ca(base / "other", "Some Other City CA")
    return {"ca": base / "ca", "srv": base / "srv", "other": base / "other"}


# --------------------------------------------------------------------------- init


def test_init_writes_a_p384_ca_with_the_right_modes_and_extensions(tmp_path):
    result = _invoke("init", "--out", tmp_path / "ca", "--name", "City of X FL CA", "--days", "3650")
    assert result.exit_code == 0, result.output
    key_path, cert_path = tmp_path / "ca" / "ca.key", tmp_path / "ca" / "ca.crt"
    assert _mode(key_path) == 0o600 and _mode(cert_path) == 0o644
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca.crt", "ca.key"]

    cert = _cert(cert_path)
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key.curve, ec.SECP384R1)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.subject == cert.issuer and "City of X FL CA" in cert.subject.rfc4514_string()
    cert.verify_directly_issued_by(cert)  # self-signed
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    lifetime = cert.not_valid_after_utc - datetime.now(timezone.utc)
    assert timedelta(days=3649) < lifetime <= timedelta(days=3650)


def test_init_p256_option(tmp_path):
    pki.create_ca(tmp_path, curve="p256")
    assert isinstance(_cert(tmp_path / "ca.crt").public_key().curve, ec.SECP256R1)


def test_init_refuses_to_overwrite_and_force_replaces_with_tight_modes(tmp_path):
    out = tmp_path / "ca"
    assert _invoke("init", "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    again = _invoke("init", "--out", out)
    assert again.exit_code == 2
    assert str(out / "ca.key") in again.output and "--force" in again.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    os.chmod(out / "ca.key", 0o644)  # a loosened old key must not pass its mode on
    forced = _invoke("init", "--out", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert (out / "ca.key").read_bytes() != before["ca.key"]
    assert _mode(out / "ca.key") == 0o600 and _mode(out / "ca.crt") == 0o644
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key"]  # no temp files left


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_file_modes_do_not_depend_on_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        key_path, cert_path = pki.create_ca(tmp_path)
    finally:
        os.umask(old)
    assert _mode(key_path) == 0o600 and _mode(cert_path) == 0o644


def test_init_rejects_bad_input_with_exit_2(tmp_path):
    assert _invoke("init", "--out", tmp_path, "--days", "0").exit_code == 2
    result = _invoke("init", "--out", tmp_path, "--name", "x" * 65)
    assert result.exit_code == 2 and "--name" in result.output
    (tmp_path / "afile").write_text("")
    result = _invoke("init", "--out", tmp_path / "afile")
    assert result.exit_code == 2 and "not a directory" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# --------------------------------------------------------------------------- server certificate


def test_server_cert_chains_to_the_ca_and_carries_every_san(tmp_path, city):
    result = _invoke(
        "server-cert", "--ca-dir", city["ca"], "--out", tmp_path,
        "--san", "127.0.0.1", "--san", "localhost", "--san", "coord.city.example", "--san", "::1",
    )
    assert result.exit_code == 0, result.output
    key_path, cert_path = tmp_path / "server.key", tmp_path / "server.crt"
    assert _mode(key_path) == 0o600 and _mode(cert_path) == 0o644

    ca, cert = _cert(city["ca"] / "ca.crt"), _cert(cert_path)
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coord.city.example"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc

    builder = PolicyBuilder().store(Store([ca]))
    for name in [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
                 x509.DNSName("localhost"), x509.DNSName("coord.city.example")]:
        chain = builder.build_server_verifier(name).verify(cert, [])
        assert chain[-1] == ca
    with pytest.raises(VerificationError):  # a name not listed is not covered
        builder.build_server_verifier(x509.DNSName("evil.example")).verify(cert, [])
    with pytest.raises(VerificationError):  # nor does it chain to another CA
        other = PolicyBuilder().store(Store([_cert(city["other"] / "ca.crt")]))
        other.build_server_verifier(x509.DNSName("localhost")).verify(cert, [])


def test_server_cert_bad_input_exits_2_names_the_problem_and_writes_nothing(tmp_path, city):
    out = tmp_path / "srv"
    result = _invoke("server-cert", "--ca-dir", city["ca"], "--out", out, "--san", "localhost", "--san", "256.1.1.1")
    assert result.exit_code == 2 and "'256.1.1.1'" in result.output
    assert not out.exists()

    result = _invoke("server-cert", "--ca-dir", tmp_path / "nowhere", "--out", out, "--san", "localhost")
    assert result.exit_code == 2 and str(tmp_path / "nowhere" / "ca.crt") in result.output and "fl-pki init" in result.output

    with pytest.raises(pki.PKIError, match="expires on .* pass --days"):
        pki.issue_server_cert(city["ca"], out, ["localhost"], days=4000)
    assert not out.exists()


def test_server_cert_refuses_a_world_readable_ca_key(tmp_path):
    pki.create_ca(tmp_path / "ca")
    os.chmod(tmp_path / "ca" / "ca.key", 0o644)
    with pytest.raises(pki.PKIError, match="chmod 600"):
        pki.issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["localhost"])


def _tls_handshake(srv: Path, cafile: Path, server_hostname: str) -> str:
    """One TLS connection over 127.0.0.1: real server socket in a thread, client trusting only cafile."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(srv / "server.crt", srv / "server.key")
    # with cafile given, create_default_context loads no system roots: only cafile is trusted
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    assert client_ctx.check_hostname and client_ctx.verify_mode == ssl.CERT_REQUIRED

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(5)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello")
            except OSError:  # includes ssl.SSLError when the client rejects us
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    assert tls.recv(5) == b"hello"
                    return tls.version()
        finally:
            thread.join(timeout=5)
            assert not thread.is_alive()


def test_real_tls_handshake_on_loopback(city):
    assert _tls_handshake(city["srv"], city["ca"] / "ca.crt", "127.0.0.1").startswith("TLS")
    assert _tls_handshake(city["srv"], city["ca"] / "ca.crt", "localhost").startswith("TLS")
    assert _tls_handshake(city["srv"], city["ca"] / "ca.crt", "coord.city.example").startswith("TLS")


def test_tls_handshake_fails_for_a_client_trusting_another_ca_or_dialling_another_name(city):
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate"):
        _tls_handshake(city["srv"], city["other"] / "ca.crt", "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
        _tls_handshake(city["srv"], city["ca"] / "ca.crt", "evil.example")


# --------------------------------------------------------------------------- verify / show


def test_verify_accepts_the_right_ca_and_every_san(city):
    result = _invoke("verify", "--ca", city["ca"] / "ca.crt", "--cert", city["srv"] / "server.crt")
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "IP:127.0.0.1" in result.output and "DNS:coord.city.example" in result.output
    result = _invoke("verify", "--ca", city["ca"] / "ca.crt", "--cert", city["srv"] / "server.crt", "--host", "127.0.0.1")
    assert result.exit_code == 0, result.output


def test_verify_fails_for_another_ca_or_an_uncovered_host(city):
    result = _invoke("verify", "--ca", city["other"] / "ca.crt", "--cert", city["srv"] / "server.crt")
    assert result.exit_code == 1
    assert "not signed by the CA" in result.output and str(city["other"] / "ca.crt") in result.output

    result = _invoke("verify", "--ca", city["ca"] / "ca.crt", "--cert", city["srv"] / "server.crt", "--host", "10.9.9.9")
    assert result.exit_code == 1 and "does not cover '10.9.9.9'" in result.output and "--san 10.9.9.9" in result.output


def test_verify_bad_input_exits_2(city, tmp_path):
    result = _invoke("verify", "--ca", tmp_path / "missing.crt", "--cert", city["srv"] / "server.crt")
    assert result.exit_code == 2 and str(tmp_path / "missing.crt") in result.output
    # swapped arguments: the server certificate is not a CA
    result = _invoke("verify", "--ca", city["srv"] / "server.crt", "--cert", city["srv"] / "server.crt")
    assert result.exit_code == 2 and "not a CA certificate" in result.output
    (tmp_path / "junk.crt").write_text("not a certificate\n")
    result = _invoke("verify", "--ca", city["ca"] / "ca.crt", "--cert", tmp_path / "junk.crt")
    assert result.exit_code == 2 and "junk.crt" in result.output
    result = _invoke("verify", "--ca", city["ca"] / "ca.crt", "--cert", city["srv"] / "server.crt", "--host", "bad_host")
    assert result.exit_code == 2 and "'bad_host'" in result.output


def test_expired_certificate_is_reported_by_show_and_verify(tmp_path):
    past = datetime.now(timezone.utc) - timedelta(days=400)
    pki.create_ca(tmp_path / "ca", now=past)  # still valid today
    pki.issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["localhost"], days=30, now=past)
    crt = tmp_path / "srv" / "server.crt"

    (info,) = pki.describe_certificates(crt)
    assert info.status == "expired" and info.days_left < -300

    shown = _invoke("show", crt)
    assert shown.exit_code == 0, shown.output
    assert "EXPIRED" in shown.output and str(info.days_left) in shown.output

    verified = _invoke("verify", "--ca", tmp_path / "ca" / "ca.crt", "--cert", crt)
    assert verified.exit_code == 1 and "expired on" in verified.output and "server-cert --force" in verified.output


def test_certificate_close_to_expiry_is_flagged(tmp_path):
    now = datetime.now(timezone.utc)
    pki.create_ca(tmp_path / "ca", now=now - timedelta(days=100))
    pki.issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["localhost"], days=110, now=now - timedelta(days=100))
    (info,) = pki.describe_certificates(tmp_path / "srv" / "server.crt")
    assert info.status == "expiring" and 8 <= info.days_left <= 10
    assert "expires soon" in _invoke("show", tmp_path / "srv" / "server.crt").output
    (ca_info,) = pki.describe_certificates(tmp_path / "ca" / "ca.crt")
    assert ca_info.status == "ok" and ca_info.is_ca


def test_show_certificate_fields(city):
    result = _invoke("show", city["ca"] / "ca.crt", city["srv"] / "server.crt")
    assert result.exit_code == 0, result.output
    for text in ["CN=City of Cleveland FL CA", "IP:127.0.0.1", "DNS:localhost", "DNS:coord.city.example",
                 "Not before", "Not after", "Days left", "(ok)"]:
        assert text in result.output


def test_show_refuses_private_keys_and_names_missing_files(city, tmp_path):
    result = _invoke("show", city["ca"] / "ca.key")
    assert result.exit_code == 2 and "private key" in result.output and "BEGIN" not in result.output
    result = _invoke("show", tmp_path / "nope.crt", city["ca"] / "ca.crt")
    assert result.exit_code == 2 and str(tmp_path / "nope.crt") in result.output
    assert "CN=City of Cleveland FL CA" in result.output  # the good file is still shown


# --------------------------------------------------------------------------- node keys


def _tree(directory: Path) -> dict[str, tuple[int, int, str]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_mode, p.stat().st_mtime_ns,
                                        hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "")
        for p in sorted(directory.rglob("*"))
    }


def test_node_key_adds_exactly_two_files_and_touches_nothing_else(tmp_path):
    (tmp_path / "notes.txt").write_text("department notes\n")
    (tmp_path / "other.pub").write_text("ssh-ed25519 AAAA other\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "node.key").write_text("not this one\n")
    before = _tree(tmp_path)

    result = _invoke("node-key", "--department", "health", "--site", "Cleveland", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    after = _tree(tmp_path)
    assert set(after) - set(before) == {"node.key", "node.pub"}
    assert {k: v for k, v in after.items() if k in before} == before

    # a second run refuses and changes nothing, node key included
    before = _tree(tmp_path)
    again = _invoke("node-key", "--department", "health", "--site", "Cleveland", "--out", tmp_path)
    assert again.exit_code == 2 and "node.key" in again.output and "--force" in again.output
    assert _tree(tmp_path) == before


def test_node_key_format_modes_comment_and_fingerprint(tmp_path):
    result = _invoke("node-key", "--department", "health", "--site", "Cleveland", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    key_path, pub_path = tmp_path / "node.key", tmp_path / "node.pub"
    assert _mode(key_path) == 0o600 and _mode(pub_path) == 0o644
    assert key_path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")

    line = pub_path.read_text()
    assert line.endswith("\n") and line.count("\n") == 1
    kind, blob, comment = line.split()
    assert kind == "ecdsa-sha2-nistp384" and comment == "cityfed:health:Cleveland"

    private = serialization.load_ssh_private_key(key_path.read_bytes(), None)
    public = serialization.load_ssh_public_key(line.encode())
    assert isinstance(private.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()

    fingerprint = pki.ssh_fingerprint(public)
    assert fingerprint.startswith("SHA256:") and not fingerprint.endswith("=")
    assert fingerprint in result.output
    shown = _invoke("show", pub_path)
    assert shown.exit_code == 0 and fingerprint in shown.output and "ecdsa-sha2-nistp384" in shown.output
    assert "cityfed:health:Cleveland" in shown.output

    if shutil.which("ssh-keygen"):  # OpenSSH's own view of the same files
        listed = subprocess.run(["ssh-keygen", "-lf", str(pub_path)], capture_output=True, text=True, timeout=10)
        assert listed.returncode == 0 and fingerprint in listed.stdout
        derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key_path)], capture_output=True, text=True, timeout=10)
        assert derived.returncode == 0 and derived.stdout.split()[:2] == [kind, blob]


@pytest.mark.parametrize("department, site", [("public works", "Cleveland"), ("health", "a:b"), ("", "x"), ("health", "a\nb"),
                                              ("health", "a\u2028b"), ("health", "Cleveland ")])
def test_node_key_rejects_fields_that_would_break_the_comment(tmp_path, department, site):
    result = _invoke("node-key", "--department", department, "--site", site, "--out", tmp_path)
    assert result.exit_code == 2 and "invalid" in result.output
    assert list(tmp_path.iterdir()) == []


def test_node_key_loads_with_flowers_own_loaders(tmp_path, monkeypatch):
    from flower_compat.testing import (
        bytes_to_public_key,
        sign_message,
        try_load_public_key,
        uses_nist_ec_curve,
        verify_signature,
    )
    from flower_compat.testing import try_setup_client_authentication as _try_setup_client_authentication

    key_path, pub_path, _ = pki.create_node_key(tmp_path, "health", "Cleveland")

    # `flwr supernode register node.pub`: the CLI loads the file, the SuperLink's
    # ControlServicer.RegisterNode then deserializes and checks the NIST curve.
    registered = try_load_public_key(pub_path)
    link_key = bytes_to_public_key(registered)
    assert uses_nist_ec_curve(link_key)

    # `flower-supernode --auth-supernode-private-key node.key`
    args = argparse.Namespace(auth_supernode_private_key=str(key_path), auth_supernode_public_key=None)
    node_private, node_public = _try_setup_client_authentication(args)
    assert node_public.public_numbers() == link_key.public_numbers()

    # the node signs, the SuperLink verifies against the registered key
    signature = sign_message(node_private, b"2026-01-01T00:00:00Z")
    assert verify_signature(link_key, b"2026-01-01T00:00:00Z", signature)
    assert not verify_signature(link_key, b"another timestamp", signature)

    # control: the same Flower loaders do reject keys Flower cannot use. They exit through
    # flwr_exit, which also starts a daemon thread that os._exit()s the process a few seconds
    # later: keep that thread from starting, or it kills the rest of the test session.
    import types

    from flower_compat.testing import supercore_exit_exit as flwr_exit_mod

    class _NoThread:
        def __init__(self, *a, **kw):
            pass

        def start(self):
            pass

    monkeypatch.setattr(flwr_exit_mod, "threading", types.SimpleNamespace(Thread=_NoThread))
    ed_pub = tmp_path / "ed.pub"
    ed_pub.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(SystemExit):
        try_load_public_key(ed_pub)
    pem_key = tmp_path / "pkcs8.key"
    pem_key.write_bytes(node_private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(SystemExit):
        _try_setup_client_authentication(argparse.Namespace(auth_supernode_private_key=str(pem_key),
                                                            auth_supernode_public_key=None))


# --------------------------------------------------------------------------- SAN parser


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
        (" 10.0.0.5 ", x509.IPAddress(ipaddress.ip_address("10.0.0.5"))),
        ("::1", x509.IPAddress(ipaddress.ip_address("::1"))),
        ("[2001:db8::1]", x509.IPAddress(ipaddress.ip_address("2001:db8::1"))),
        ("localhost", x509.DNSName("localhost")),
        ("Coord.City.Example.", x509.DNSName("coord.city.example")),
        ("xn--bcher-kva.example", x509.DNSName("xn--bcher-kva.example")),
    ],
)
def test_parse_san_accepts(raw, expected):
    assert pki.parse_san(raw) == expected


@pytest.mark.parametrize(
    "raw, hint",
    [
        ("", "empty"), ("   ", "empty"), ("256.1.1.1", "IP address"), ("010.0.0.1", "IP address"),
        ("*.city.example", "wildcard"), ("https://coord.city.example", "host part"), ("coord:8443", "host part"),
        ("a..b", "empty label"), (".example", "empty label"), ("bad_host", "label"), ("-a.example", "label"),
        ("a" * 64 + ".example", "63"), ("fe80::1%eth0", "zone"), ("[10.0.0.1]", "brackets"), ("[coord]", "bracketed"),
        ("bücher.example", "xn--"), ("a,b", "one --san"), ("a b", "one --san"),
    ],
)
def test_parse_san_rejects_with_a_clear_message(raw, hint):
    with pytest.raises(pki.PKIError) as info:
        pki.parse_san(raw)
    from privacy.policy import shown_value

    assert shown_value(raw) in str(info.value) and hint in str(info.value)


def test_parse_sans_dedupes_and_requires_one():
    assert pki.parse_sans(["localhost", "LOCALHOST", "127.0.0.1", "127.0.0.1"]) == [
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    with pytest.raises(pki.PKIError, match="at least one --san"):
        pki.parse_sans([])


_HOSTNAMEISH = st.from_regex(r"\A[A-Za-z0-9_*.:\[\]-]{1,40}\Z")
_ADDRESSES = st.ip_addresses().map(str)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=80), _HOSTNAMEISH, _ADDRESSES))
def test_parse_san_property_valid_name_or_pkierror(city, raw):
    try:
        name = pki.parse_san(raw)
    except pki.PKIError as err:
        from privacy.policy import shown_value

        assert shown_value(raw) in str(err)  # the value, cut when long
        return
    # whatever is accepted is a name a TLS verifier can check a certificate against
    assert isinstance(name, (x509.IPAddress, x509.DNSName))
    if isinstance(name, x509.IPAddress):
        assert name.value == ipaddress.ip_address(raw.strip().strip("[]"))
    else:
        assert name.value == raw.strip().lower().removesuffix(".")
    PolicyBuilder().store(Store([_cert(city["ca"] / "ca.crt")])).build_server_verifier(name)


@settings(max_examples=60, deadline=None)
@given(_ADDRESSES)
def test_parse_san_accepts_every_ip_address_but_the_unspecified_one(raw):
    if ipaddress.ip_address(raw).is_unspecified:  # 0.0.0.0, ::: a server listens on it, no client dials it
        with pytest.raises(pki.PKIError, match="unspecified address"):
            pki.parse_san(raw)
        return
    assert pki.parse_san(raw) == x509.IPAddress(ipaddress.ip_address(raw))


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command, phrases",
    [
        ([], ["init", "server-cert", "node-key", "show", "verify", "Exit codes"]),
        (["init"], ["ca.key", "0600", "--force", "--root-certificates"]),
        (["server-cert"], ["--san", "--ssl-certfile", "IP"]),
        (["node-key"], ["--auth-supernode-private-key", "fl-server register", "fingerprint"]),
        (["show"], ["yellow", "red", ".pub"]),
        (["verify"], ["Exit 0", "--host"]),
    ],
)
def test_help_answers_the_operators_questions(command, phrases):
    result = _invoke(*command, "--help")
    assert result.exit_code == 0
    for phrase in phrases:
        assert phrase in result.output, phrase


def test_server_cert_without_loopback_san_says_fl_server_start_will_refuse_it(city, tmp_path):
    result = _invoke("server-cert", "--ca-dir", city["ca"], "--out", tmp_path / "named", "--san", "coord.city.example")
    assert result.exit_code == 0, result.output
    assert "no 127.0.0.1 SAN" in " ".join(result.output.split())
    result = _invoke("server-cert", "--ca-dir", city["ca"], "--out", tmp_path / "both", "--san", "127.0.0.1",
                     "--san", "coord.city.example")
    assert result.exit_code == 0 and "127.0.0.1 SAN" not in result.output


# --------------------------------------------------------------------------- bad input (independent tester's findings)
#
# The standard: bad input exits 2 with a message naming the option or file, the value and the fix;
# no traceback; nothing half-written.


def _said(result) -> str:
    """The CLI's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.mark.parametrize("days", ["99999999", "36501", str(10**30)])
def test_init_days_past_the_maximum_exits_2_naming_days(tmp_path, days):
    out = tmp_path / "ca"
    result = _invoke("init", "--out", out, "--days", days)
    assert result.exit_code == 2, (result.output, result.exception)
    said = _said(result)
    assert f"--days {days}" in said and "pass --days 36500 or less" in said, said
    assert not out.exists()
    assert _invoke("init", "--out", out, "--days", "36500").exit_code == 0  # the maximum itself is fine


def test_ca_days_cannot_reach_past_the_year_9999(tmp_path):
    with pytest.raises(pki.PKIError, match=r"--days 3650 .*9999.*pass --days \d+ or less"):
        pki.create_ca(tmp_path, days=3650, now=datetime(9995, 1, 1, tzinfo=timezone.utc))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("days", ["99999999", "36501", "4000", str(10**30)])
def test_server_cert_days_past_the_ca_exits_2_with_the_largest_that_works(tmp_path, city, days):
    out = tmp_path / "srv"
    args = ["server-cert", "--ca-dir", city["ca"], "--out", out, "--san", "127.0.0.1"]
    result = _invoke(*args, "--days", days)
    assert result.exit_code == 2, (result.output, result.exception)
    said = _said(result)
    assert f"--days {days}" in said and "CA" in said, said
    assert not out.exists()
    largest = re.search(r"pass --days (\d+) or less", said)
    assert largest, said
    assert _invoke(*args, "--days", largest.group(1)).exit_code == 0  # the fix works


@pytest.mark.parametrize("command", ["init", "node-key", "server-cert"])
def test_out_below_a_file_exits_2_naming_out(tmp_path, city, command):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "sub"
    extra = {"init": [], "node-key": ["--department", "health", "--site", "Cleveland"],
             "server-cert": ["--ca-dir", city["ca"], "--san", "127.0.0.1"]}[command]
    result = _invoke(command, *extra, "--out", out)
    assert result.exit_code == 2, (result.output, result.exception)
    said = _said(result)
    assert f"--out {out}" in said and "afile" in said and "fix:" in said, said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_node_key_into_a_read_only_folder_exits_2(tmp_path):
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    result = _invoke("node-key", "--department", "health", "--site", "Cleveland", "--out", out)
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"--out {out}" in _said(result) and "fix:" in _said(result)
    assert list(out.iterdir()) == []


def _failing_open(monkeypatch, name: str, error: OSError) -> None:
    """Make ``os.open`` fail for a file whose name contains ``name`` (the final file or its temporary)."""
    real = os.open

    def fake(path, *args, **kwargs):
        if name in os.fspath(path):
            raise error
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake)


def test_node_key_permission_denied_exits_2_and_writes_nothing(tmp_path, monkeypatch):
    _failing_open(monkeypatch, "node.key", PermissionError(errno.EACCES, "Permission denied"))
    result = _invoke("node-key", "--department", "health", "--site", "Cleveland", "--out", tmp_path)
    assert result.exit_code == 2, (result.output, result.exception)
    said = _said(result)
    assert f"--out {tmp_path}" in said and "Permission denied" in said and "fix:" in said, said
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["init", "node-key"])
def test_a_failure_after_the_first_file_leaves_nothing_that_blocks_a_retry(tmp_path, monkeypatch, command):
    args = ["init"] if command == "init" else ["node-key", "--department", "health", "--site", "Cleveland"]
    second = "ca.crt" if command == "init" else "node.pub"
    with monkeypatch.context() as m:
        _failing_open(m, second, OSError(errno.ENOSPC, "No space left on device"))
        result = _invoke(*args, "--out", tmp_path)
    assert result.exit_code == 2, (result.output, result.exception)
    said = _said(result)
    assert f"--out {tmp_path}" in said and "No space left on device" in said and "fix:" in said, said
    assert list(tmp_path.iterdir()) == []  # no lone private key
    assert _invoke(*args, "--out", tmp_path).exit_code == 0  # so the retry works


def test_a_failed_force_keeps_the_old_pair_together(tmp_path, monkeypatch):
    pki.create_ca(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with monkeypatch.context() as m:
        _failing_open(m, "ca.crt", OSError(errno.ENOSPC, "No space left on device"))
        result = _invoke("init", "--out", tmp_path, "--force")
    assert result.exit_code == 2, (result.output, result.exception)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # not a new key with the old certificate

    real_replace, calls = os.replace, []

    def replace_fails_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace_fails_second)
        result = _invoke("init", "--out", tmp_path, "--force")
    assert result.exit_code == 2, (result.output, result.exception)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    pki.load_ca(tmp_path)  # still a matching pair


def test_force_over_a_directory_refuses_before_replacing_anything(tmp_path):
    pki.create_ca(tmp_path)
    key = (tmp_path / "ca.key").read_bytes()
    (tmp_path / "ca.crt").unlink()
    (tmp_path / "ca.crt").mkdir()
    result = _invoke("init", "--out", tmp_path, "--force")
    assert result.exit_code == 2, (result.output, result.exception)
    assert str(tmp_path / "ca.crt") in _said(result) and "directory" in _said(result)
    assert (tmp_path / "ca.key").read_bytes() == key


@pytest.mark.parametrize("site", ["VA Long Beach", "Zürich", "St. Mary's", "Site 12 (north)"])
def test_node_key_accepts_the_site_names_fl_client_accepts(tmp_path, site):
    from clients.cli import check_site_name
    from flower_compat.testing import bytes_to_public_key, try_load_public_key, uses_nist_ec_curve

    check_site_name(site)
    result = _invoke("node-key", "--department", "health", "--site", site, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert pki.load_public_key(tmp_path / "node.pub").comment == f"cityfed:health:{site}"
    assert uses_nist_ec_curve(bytes_to_public_key(try_load_public_key(tmp_path / "node.pub")))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=110))
def test_every_fl_client_site_name_is_accepted_or_gets_a_working_suggestion(site):
    from clients.cli import SetupError, check_site_name

    try:
        check_site_name(site)
    except SetupError:
        return  # fl-client refuses it too
    try:
        pki.check_node_fields("health", site)
    except pki.PKIError as err:
        msg = str(err)
        assert msg.startswith(f"--site {site!r}") and "fix:" in msg, msg
        suggested = re.search(r"fix: pass --site (.+?) instead", msg)
        assert suggested, msg
        better = ast.literal_eval(suggested.group(1))
        pki.check_node_fields("health", better)  # the suggestion is accepted by both tools
        check_site_name(better)


@pytest.mark.parametrize("department, hint", [("healthh", "'health'"), ("Health", "'health'"), ("traffc", "'traffic'"),
                                              ("police", "health, traffic, utility")])
def test_node_key_department_must_be_a_city_department(tmp_path, department, hint):
    result = _invoke("node-key", "--department", department, "--site", "Cleveland", "--out", tmp_path)
    assert result.exit_code == 2, result.output
    said = _said(result)
    assert f"--department {department!r}" in said and hint in said, said
    assert list(tmp_path.iterdir()) == []


def test_node_key_departments_are_the_citys():
    from contract.tasks import TASKS

    assert set(pki.DEPARTMENTS) == set(TASKS)


@pytest.mark.parametrize("san", ["0.0.0.0", "::", "[::]"])
def test_server_cert_refuses_the_unspecified_address(tmp_path, city, san):
    result = _invoke("server-cert", "--ca-dir", city["ca"], "--out", tmp_path / "srv", "--san", "127.0.0.1", "--san", san)
    assert result.exit_code == 2, result.output
    said = _said(result)
    assert f"--san {san!r}" in said and "unspecified" in said and "127.0.0.1" in said, said
    assert not (tmp_path / "srv").exists()


@pytest.mark.parametrize("host, hint", [("bad_host:9092", "host part"), ("bad_host", "label"), ("0.0.0.0", "unspecified"),
                                        ("a b", "one host")])
def test_verify_bad_host_names_the_host_option(city, host, hint):
    result = _invoke("verify", "--ca", city["ca"] / "ca.crt", "--cert", city["srv"] / "server.crt", "--host", host)
    assert result.exit_code == 2, result.output
    said = _said(result)
    assert f"--host {host!r}" in said and hint in said and "SAN" not in said.split(";")[0], said


@pytest.mark.parametrize("which", ["--ca", "--cert"])
def test_verify_refuses_der_like_fl_client_and_says_how_to_convert(city, tmp_path, which):
    src = city["ca"] / "ca.crt" if which == "--ca" else city["srv"] / "server.crt"
    der = tmp_path / (src.stem + ".der")
    der.write_bytes(_cert(src).public_bytes(serialization.Encoding.DER))
    files = {"--ca": city["ca"] / "ca.crt", "--cert": city["srv"] / "server.crt", which: der}
    result = _invoke("verify", "--ca", files["--ca"], "--cert", files["--cert"])
    assert result.exit_code == 2, result.output
    said = _said(result)
    assert f"{which} {der}" in said and "PEM" in said, said
    assert f"openssl x509 -inform der -in {der} -out {tmp_path / src.name}" in said, said
    # the conversion it prints is what fl-client --ca needs
    converted = tmp_path / src.name
    converted.write_bytes(_cert(src).public_bytes(serialization.Encoding.PEM))
    files[which] = converted
    assert _invoke("verify", "--ca", files["--ca"], "--cert", files["--cert"]).exit_code == 0
    if which == "--ca":
        from clients.cli import SetupError, check_ca

        with pytest.raises(SetupError, match="not a PEM"):
            check_ca(der)
        check_ca(converted)


def test_show_still_reads_der(city, tmp_path):
    der = tmp_path / "ca.der"
    der.write_bytes(_cert(city["ca"] / "ca.crt").public_bytes(serialization.Encoding.DER))
    assert _invoke("show", der).exit_code == 0


def test_out_not_writable_is_refused_before_any_key_is_made(tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path and mode & os.W_OK
                        else real(p, mode, **kw))  # a read-only folder, as root cannot have one
    result = _invoke("node-key", "--department", "health", "--site", "Cleveland", "--out", tmp_path)
    assert result.exit_code == 2, (result.output, result.exception)
    said = _said(result)
    assert f"--out {tmp_path}" in said and "permission denied" in said and "fix: pass a --out directory" in said, said
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_into_a_new_folder_removes_the_folder_too(tmp_path, monkeypatch):
    out = tmp_path / "new" / "keys"
    with monkeypatch.context() as m:
        _failing_open(m, "ca.crt", OSError(errno.ENOSPC, "No space left on device"))
        result = _invoke("init", "--out", out)
    assert result.exit_code == 2, (result.output, result.exception)
    assert list(tmp_path.iterdir()) == []  # no empty new/keys left behind either
    assert _invoke("init", "--out", out).exit_code == 0


# --------------------------------------------------------------------------- verifier errors in plain words


def _odd_leaf(ca_dir: Path, out: Path, *, aki: bool = True, extensions=()) -> Path:
    """A leaf for 127.0.0.1 signed by ``ca_dir``'s key, built by hand (not by fl-pki)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    ca_key = serialization.load_pem_private_key((ca_dir / pki.CA_KEY).read_bytes(), None)
    ca_crt = _cert(ca_dir / pki.CA_CERT)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ok")]))
         .issuer_name(ca_crt.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
         .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), True))
    if aki:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)
    for ext, critical in extensions:
        b = b.add_extension(ext, critical)
    out.write_bytes(b.sign(ca_key, hashes.SHA384()).public_bytes(serialization.Encoding.PEM))
    return out


@pytest.mark.parametrize("case, says", [
    ("no-aki", "no Authority Key Identifier extension"),
    ("key-usage", "Key Usage"),
    ("eku", "Extended Key Usage"),
    ("critical", "critical extension 1.2.3.4"),
])
def test_verify_names_a_verifier_refusal_in_plain_words_with_a_fix(city, tmp_path, case, says):
    """cryptography's strict RFC 5280 errors ('invalid extension: 2.5.29.35: ...') become words and a fix."""
    exts = {"no-aki": [], "key-usage": [(x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)],
            "eku": [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
            "critical": [(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"), True)]}[case]
    crt = _odd_leaf(city["ca"], tmp_path / "ok.crt", aki=case != "no-aki", extensions=exts)
    res = _invoke("verify", "--ca", city["ca"] / pki.CA_CERT, "--cert", crt)
    text = " ".join(res.output.split())
    assert res.exit_code == 1, text
    assert says in text and "fix:" in text and "fl-pki server-cert" in text, text
    for raw in ("2.5.29.35", "encountered processing", "<Certificate("):
        assert raw not in text, text


def test_node_key_force_keeps_the_replaced_public_key(tmp_path):
    """`fl-pki node-key --force` (DEPLOYMENT's key rotation) overwrote node.pub: the department lost the only key
    that verifies its audit entries signed before the change. It is kept as node-replaced-<time>.pub."""
    first = _invoke("node-key", "--department", "health", "--site", "Cleveland", "--out", tmp_path)
    assert first.exit_code == 0, first.output
    old = (tmp_path / "node.pub").read_bytes()
    again = _invoke("node-key", "--department", "health", "--site", "Cleveland", "--out", tmp_path, "--force")
    assert again.exit_code == 0, again.output
    kept = sorted(tmp_path.glob("node-replaced-*.pub"))
    assert len(kept) == 1 and kept[0].read_bytes() == old and (tmp_path / "node.pub").read_bytes() != old
    assert _mode(kept[0]) == 0o644 and kept[0].name in " ".join(again.output.split()), again.output
    assert not list(tmp_path.glob("node-replaced-*.key"))  # the old private key is not kept
