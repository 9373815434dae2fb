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
