"""Long option values are cut in messages, never echoed whole.

Found by the bad-input review of 2026-12-07 (LOW, left then): ``fl-pki init --name``, ``server-cert
--san``, ``verify --host`` and ``node-key --site`` quoted a 400-character value whole in their
error, a screenful per repeat. Messages quote at most :data:`privacy.policy.SHOWN_MAX`-odd
characters of a value (``privacy.policy.shown_value``) and still say what is wrong.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from privacy import pki  # noqa: E402

LONG = "a" * 400


def _message(call) -> str:
    with pytest.raises(pki.PKIError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("value, what", [
    (LONG, "longer than 253 characters"),
    ("x." + "a" * 120 + ".example", "label longer than 63"),
    (LONG + " b", "comma or whitespace"),
    ("*." + LONG, "wildcard"),
    ("https://" + LONG, "URL or host:port"),
])
def test_a_long_san_is_cut_in_its_error(value, what):
    text = _message(lambda: pki.parse_san(value, "--san"))
    assert what in text
    assert LONG not in text and "a" * 100 not in text
    assert "..." in text


def test_a_long_ca_name_is_cut_in_its_error(tmp_path):
    text = _message(lambda: pki.create_ca(tmp_path / "ca", name=LONG))
    assert "1-64 characters" in text
    assert "a" * 100 not in text


def test_a_long_host_to_verify_is_cut_in_its_error(tmp_path):
    pki.create_ca(tmp_path / "ca")
    pki.issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["127.0.0.1"])
    text = _message(lambda: pki.verify_server_cert(tmp_path / "ca" / "ca.crt", tmp_path / "srv" / "server.crt",
                                                   LONG))
    assert "a" * 100 not in text


@pytest.mark.parametrize("site", [LONG, LONG + "\n", "é" * 300])
def test_a_long_node_site_is_cut_in_its_error(tmp_path, site):
    text = _message(lambda: pki.create_node_key(tmp_path / "node", department="health", site=site))
    assert "--site" in text
    assert "a" * 100 not in text and "é" * 100 not in text


# ----------------------------------------------------------------------------- key and certificate files


def test_a_huge_file_given_as_node_pub_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    """A 200 MB "node.pub" was read into memory whole before being refused (LOW, 2026-12-07 review)."""
    big = tmp_path / "node.pub"
    with open(big, "wb") as fh:
        fh.truncate(200 * 1024 * 1024)  # sparse: no disk used
    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or real(self))
    text = _message(lambda: pki.load_public_key(big))
    assert str(big) in text and "MB" in text and "fix" in text
    assert not reads, "the file was read whole"


@pytest.mark.parametrize("encoding", ["der-pkcs8", "der-traditional", "der-pkcs8-encrypted"])
def test_a_der_private_key_given_as_node_pub_is_called_private(tmp_path, encoding):
    """A private key in DER (binary) was "not an OpenSSH public key", with no word that it is secret."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    fmt = serialization.PrivateFormat.PKCS8 if "pkcs8" in encoding else serialization.PrivateFormat.TraditionalOpenSSL
    enc = (serialization.BestAvailableEncryption(b"secret-pass") if "encrypted" in encoding
           else serialization.NoEncryption())
    f = tmp_path / "node.pub"
    f.write_bytes(key.private_bytes(serialization.Encoding.DER, fmt, enc))
    text = _message(lambda: pki.load_public_key(f))
    assert "private key" in text and "never leave" in text


def test_a_node_pub_with_a_megabyte_comment_is_refused_at_once(tmp_path):
    """`fl-pki show` printed a few MB of node.pub comment in a table (4 MB: 13 s; reliability review)."""
    import time

    pki.create_node_key(tmp_path / "node", department="health", site="Cleveland")
    pub = tmp_path / "node" / "node.pub"
    pub.write_text(pub.read_text().rstrip("\n") + "x" * 2_000_000 + "\n")
    t0 = time.monotonic()
    text = _message(lambda: pki.load_public_key(pub))
    assert time.monotonic() - t0 < 5 and "bytes" in text and "fix" in text
