"""Inputs past the parsers' own limits, and output that a terminal or a console library would rewrite.

Found by an independent bad-input review (2026-12-07); each test failed on 16e2338:

* a TOML integer over Python's 4300-digit limit, or arrays nested thousands deep, raise ``ValueError`` /
  ``RecursionError`` from ``tomllib``, not ``TOMLDecodeError``: every TOML reader (policy, ranges,
  ``-c`` items, a received app's ``pyproject.toml``) let them escape as "unexpected error" (and a
  hostile app bundle then left no quarantined copy and no ``app-refused`` audit entry);
* a damaged checkpoint's metadata, and a deeply nested audit-log line, gave bare exceptions;
* ``audit verify`` printed a damaged line's terminal escapes raw; rich turned ``:CD:`` / ``:AB:`` in a
  SHA-256 fingerprint into emoji;
* the "--site not in --data" error listed every value of the file's site column (record values
  when the wrong column is mapped to it); a Parquet list in a text column gave no column name.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GENERIC = "its message is not shown"  # the safety net's wording for an unexpected exception
HUGE = "9" * 5000
DEEP = "[" * 3000 + "]" * 3000
MARK = "987654.321"


def cli(name: str, *args, timeout: int = 180) -> tuple[int, str]:
    """Run a console script as a user would; ``(exit code, stdout + stderr)``."""
    exe = Path(sys.executable).parent / name
    p = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**os.environ, "COLUMNS": "200", "FLWR_TELEMETRY_ENABLED": "0"})
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def health_csv(tmp_path_factory) -> Path:
    from citydata import load_department

    return load_department("health").export(tmp_path_factory.mktemp("data") / "health.csv", sites=["Cleveland"])


# ----------------------------------------------------------------------------- TOML limits


@pytest.mark.parametrize("value", [HUGE, DEEP], ids=["huge-int", "deep-array"])
def test_a_policy_with_a_huge_or_deeply_nested_value_is_refused_naming_the_file(tmp_path, value):
    from clients.cli import SetupError, check_policy

    p = tmp_path / "policy.toml"
    p.write_text(f"zz = {value}\n" + (ROOT / "examples/policies/health.toml").read_text())
    with pytest.raises(SetupError) as err:
        check_policy(p, "health")
    msg = str(err.value)
    assert str(p) in msg and "not valid TOML" in msg and GENERIC not in msg, msg[:300]
    assert ("4300 digits" in msg) if value == HUGE else ("nested" in msg), msg[:300]


@pytest.mark.parametrize("value", [HUGE, DEEP], ids=["huge-int", "deep-array"])
def test_a_ranges_file_with_a_huge_or_deeply_nested_value_is_blamed_on_ranges(health_csv, tmp_path, value):
    from clients.cli import SetupError, check_data

    r = tmp_path / "ranges.toml"
    r.write_text(f"[age]\nmax = {value}\n")
    with pytest.raises(SetupError) as err:
        check_data("health", str(health_csv), "Cleveland", ranges=str(r))
    msg = str(err.value)
    assert msg.startswith(f"--ranges {r}") and "not valid TOML" in msg, msg[:300]


@pytest.mark.parametrize("value", [HUGE, DEEP], ids=["huge-int", "deep-array"])
def test_a_run_config_item_with_a_huge_or_deeply_nested_value_exits_2(tmp_path, value):
    code, out = cli("fl-server", "run", "--department", "health", "--state-dir", tmp_path / "st", "--name", "t1",
                    "-c", f"num-rounds={value}")
    assert code == 2 and GENERIC not in out and "num-rounds" in out, out[-400:]
    assert not (tmp_path / "st" / "runs" / "t1").exists()


def test_toml_reader_names_the_line_of_a_too_long_number():
    import tomllib

    from contract.text_files import load_toml

    with pytest.raises(tomllib.TOMLDecodeError, match=r"4300 digits \(at line 3\)"):
        load_toml(f'a = 1\nb = "x"\nc = {HUGE}\n')
    with pytest.raises(tomllib.TOMLDecodeError, match="nested"):
        load_toml(f"a = {DEEP}\n")
    assert load_toml('a = [[1, 2], {b = "9"}]\nc = 12345678901234567890\n') == {
        "a": [[1, 2], {"b": "9"}], "c": 12345678901234567890}


# ----------------------------------------------------------------------------- a hostile app bundle


def _fab(tmp_path: Path, pyproject_tail: bytes) -> bytes:
    from clients import pinning

    path = tmp_path / "hostile.fab"
    with zipfile.ZipFile(path, "w") as z:
        for name, p in pinning.release_files().items():
            if name != "pyproject.toml":
                z.writestr(name, Path(p).read_bytes())
        z.writestr("pyproject.toml", (ROOT / "pyproject.toml").read_bytes() + pyproject_tail)
    return path.read_bytes()


@pytest.mark.parametrize("tail", [f"\nzz = {HUGE}\n".encode(), f"\nzz = {DEEP}\n".encode()], ids=["huge-int", "deep-array"])
def test_a_hostile_app_bundle_is_refused_quarantined_and_audited(tmp_path, tail):
    from clients import pinning

    home = tmp_path / "node"
    home.mkdir()
    verdict = pinning.admit_fab(_fab(tmp_path, tail), run_id=7, home=home)
    assert not verdict.accepted
    assert any(home.rglob("*.fab")), "the refused bundle was not kept for review"
    entries = [line for p in home.rglob("audit.jsonl") for line in p.read_text().splitlines()]
    assert any("app-refused" in e for e in entries), entries


def test_app_review_of_a_hostile_bundle_says_what_is_wrong(tmp_path):
    fab = tmp_path / "h.fab"
    fab.write_bytes(_fab(tmp_path, f"\nzz = {HUGE}\n".encode()))
    (tmp_path / "st" / "apps").mkdir(parents=True)
    code, out = cli("fl-client", "app", "review", fab, "--state-dir", tmp_path / "st")
    assert GENERIC not in out and "pyproject.toml" in out and "4300 digits" in out, out[-400:]


# ----------------------------------------------------------------------------- checkpoint and audit log


@pytest.mark.parametrize("meta", ["{not json", "[]", '{"format": 1}', "[" * 100000 + "]" * 100000, '{"format": 1, "blob": 5, "array-names": []}',
                                  '{"format": 1, "blob": {}, "array-names": ["v"]}'],
                         ids=["bad-json", "not-object", "no-blob", "deep", "blob-not-object", "array-missing"])
def test_damaged_checkpoint_metadata_is_an_artefact_error_naming_the_file(tmp_path, meta):
    from safetensors.numpy import save_file

    from server.artefacts import _META_KEY, ArtefactError, read_checkpoint

    path = tmp_path / "checkpoint.safetensors"
    save_file({"arrays/w": np.zeros(3, np.float32)}, str(path), metadata={_META_KEY: meta})
    with pytest.raises(ArtefactError) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value), err.value


def test_audit_verify_of_a_deeply_nested_line_names_the_line(tmp_path):
    log = tmp_path / "audit.jsonl"
    log.write_text("[" * 5000 + "]" * 5000 + "\n")
    code, out = cli("fl-client", "audit", "verify", "--log", log, "--chain-only")
    assert code != 0 and "RecursionError" not in out and "line 1" in out, out[-300:]


def test_audit_verify_never_prints_a_damaged_lines_control_bytes(tmp_path):
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b'{"seq": 1, "x": "\x1b]0;owned\x07\x1b[2J"\n')
    code, out = cli("fl-client", "audit", "verify", "--log", log, "--chain-only")
    assert code != 0 and "line 1" in out, out[-300:]
    assert "\x1b" not in out and "\x07" not in out, repr(out[-300:])


# ----------------------------------------------------------------------------- fingerprints


def test_fl_pki_show_prints_a_fingerprint_verbatim(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.datetime.now(datetime.timezone.utc)
    for serial in range(1, 5000):  # a certificate whose fingerprint has ':CD:' or ':AB:' (rich's emoji codes)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(serial).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
                .sign(key, hashes.SHA256()))
        groups = [f"{b:02X}" for b in cert.fingerprint(hashes.SHA256())]
        # rich reads ':XX:' codes left to right, so groups 1, 3, 5, ... are the ones it can take
        if any(groups[i] in ("CD", "AB") for i in range(1, len(groups) - 1, 2)):
            break
    else:
        pytest.fail("no certificate with such a fingerprint in 5000 tries")
    shown = ":".join(groups)
    crt = tmp_path / "x.crt"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    code, out = cli("fl-pki", "show", crt)
    assert code == 0 and shown in out, [line for line in out.splitlines() if "SHA" in line]


# ----------------------------------------------------------------------------- records in messages


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_the_site_error_never_lists_values_of_the_users_site_column(health_csv, tmp_path, suffix):
    """A column-mapping slip (cholesterol values in the site column): the error lists none of them."""
    from clients.cli import SetupError, check_data

    df = pd.read_csv(health_csv)
    df["dataset"] = df["chol"].astype(str)
    df.loc[7, "dataset"] = MARK
    bad = tmp_path / f"swapped{suffix}"
    df.to_csv(bad, index=False) if suffix == ".csv" else df.to_parquet(bad, index=False)
    with pytest.raises(SetupError) as err:
        check_data("health", str(bad), "Cleveland")
    msg = str(err.value)
    assert MARK not in msg and "233.0" not in msg and "'dataset'" in msg, msg[:400]
    assert "distinct" in msg and "fix:" in msg, msg[:400]


def test_the_site_error_suggests_the_close_name_the_user_meant(health_csv):
    from clients.cli import SetupError, check_data

    with pytest.raises(SetupError, match="did you mean 'Cleveland'"):
        check_data("health", str(health_csv), "cleveland")


def test_unknown_sites_of_bundled_public_data_are_still_listed():
    from citydata import load_department

    with pytest.raises(ValueError, match="Cleveland, Hungary, Switzerland"):
        load_department("health").site_data("Atlantis")


def test_unknown_sites_of_a_users_file_are_not_listed(health_csv, tmp_path):
    from citydata import load_department

    ds = load_department("health", health_csv)
    for call in (lambda: ds.site_data("Atlantis"), lambda: ds.export(tmp_path / "x.csv", sites=["Atlantis"])):
        with pytest.raises(ValueError) as err:
            call()
        assert "Atlantis" in str(err.value) and "Cleveland" not in str(err.value), err.value


def test_a_parquet_list_in_a_text_column_names_the_column(health_csv, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clients.cli import SetupError, check_data

    df = pd.read_csv(health_csv)
    table = pa.Table.from_pandas(df, preserve_index=False)
    for column, value in (("sex", ["Male"]), ("dataset", {"a": "Cleveland"})):
        i = list(df.columns).index(column)
        bad = table.set_column(i, column, pa.array([value] * len(df)))
        p = tmp_path / f"{column}.parquet"
        pq.write_table(bad, p)
        with pytest.raises(SetupError) as err:
            check_data("health", str(p), "Cleveland")
        msg = str(err.value)
        assert f"'{column}'" in msg and GENERIC not in msg and "fix" in msg, msg[:300]
