"""fl-serve on bad input: request bodies, a busy port and damaged package files.

Every bad request body is answered 422 naming the field (never 500), and the server log
holds no traceback and no record value; ``fl-serve`` on a busy port says so before
announcing anything (exit 2); every damaged package file is refused naming the file inside
the package, the field and the fix.
"""

import json
import logging
import os
import socket
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import KEY, health_records, rehash, served, synthetic_package  # noqa: E402

from serving.package import MANIFEST, PackageError, load_package, sha256_file  # noqa: E402

H = {"X-API-Key": KEY, "Content-Type": "application/json"}
SITE = "Hungary"
#: A value no log line may contain (it stands for a private record value).
SECRET = "Zq7xSecretValue"


@pytest.fixture(scope="module")
def health_pkg(tmp_path_factory):
    return synthetic_package(tmp_path_factory.mktemp("bad-input"))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []
        self._seen: list[logging.LogRecord] = []

    def emit(self, record):
        if any(r is record for r in self._seen):  # the same record reaching two of the loggers watched
            return
        self._seen.append(record)
        self.lines.append(self.format(record))  # the formatter appends exc_info (a traceback) when present

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def server_log():
    """Everything the serving and uvicorn loggers write while a test runs (tracebacks included)."""
    h = _Collect()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "cityfed.serve")]
    for lg in loggers:
        lg.addHandler(h)
    yield h
    for lg in loggers:
        lg.removeHandler(h)


def _record(feats, **change):
    return {**health_records(feats)[0], **change}


def _bodies(feats):
    """(name, raw body, field expected, words expected in problem + fix)."""
    def rec(**c):
        return json.dumps({"records": [_record(feats, **c)]})

    return [
        ("huge int", rec(age=10 ** 400), "age", "number too large"),
        ("huge negative int", rec(chol=-(10 ** 400)), "chol", "number too large"),
        ("nested arrays", "[" * 100_000, "body", "nested too deeply"),
        ("nested in records", '{"records": ' + "[" * 100_000, "body", "nested too deeply"),
        ("nested objects", '{"records": [{"age": ' + '{"a": ' * 100_000, "body", "nested too deeply"),
        ("list value", rec(sex=["Male"]), "sex", "single value"),
        ("object value", rec(dataset={"a": 1}), "dataset", "single value"),
        ("list of secret", rec(cp=[SECRET]), "cp", "single value"),
        ("too many digits", '{"records": [{"age": ' + "9" * 5000 + "}]}", "body", "too large"),
        ("records not a list", json.dumps({"records": {"age": 1}}), "records", "list"),
        ("not an object", json.dumps([1, 2]), "records", "records"),
        ("bad utf-8", b'{"records": [{"sex": "\xff"}]}', "body", "utf-8"),
        ("true for a number", rec(age=True), "age", "true/false"),
        ("false for a number", json.dumps({"records": [_record(feats), _record(feats, chol=False)]}), "chol",
         "record 2"),
    ]


BODY_NAMES = ["huge int", "huge negative int", "nested arrays", "nested in records", "nested objects", "list value",
              "object value", "list of secret", "too many digits", "records not a list", "not an object", "bad utf-8",
              "true for a number", "false for a number"]


@pytest.mark.parametrize("name", BODY_NAMES)
def test_bad_bodies_answered_422_naming_the_field_without_traceback(health_pkg, server_log, name):
    server, feats, _ = served(health_pkg, SITE)
    _, body, field, words = next(b for b in _bodies(feats) if b[0] == name)
    with server as url:
        r = httpx.post(f"{url}/predict", content=body, headers=H, timeout=60)
        ok = httpx.post(f"{url}/predict", json={"records": [_record(feats)]}, headers=H, timeout=60)
    assert r.status_code == 422, r.text
    d = r.json()["detail"][0]
    assert d["field"] == field, d
    assert words in (d["problem"] + " " + d["fix"]).lower(), d
    assert d["fix"] and "--debug" not in d["fix"], d  # an HTTP client cannot pass --debug to the server
    assert ok.status_code == 200, ok.text  # the server still answers
    assert "Traceback" not in server_log.text and "Exception in ASGI" not in server_log.text, server_log.text
    assert SECRET not in server_log.text


def test_unexpected_error_logs_one_line_without_traceback_or_values(health_pkg, server_log, monkeypatch):
    """An error the checks did not foresee: 500 with its type, one log line (type and place), no traceback, no value."""
    from serving import features as features_mod

    monkeypatch.delenv("CITYFED_DEBUG", raising=False)  # read when the app is built (fl-serve --debug sets it)
    server, feats, _ = served(health_pkg, SITE)

    def boom(self, outputs, info):
        raise KeyError(SECRET)

    monkeypatch.setattr(features_mod.SiteFeatures, "answer", boom)
    with server as url:
        r = httpx.post(f"{url}/predict", json={"records": [_record(feats)]}, headers=H, timeout=60)
        assert httpx.get(f"{url}/health").status_code == 200
    assert r.status_code == 500 and "KeyError" in r.text and SECRET not in r.text
    assert "Traceback" not in server_log.text and "Exception in ASGI" not in server_log.text, server_log.text
    assert SECRET not in server_log.text
    lines = [ln for ln in server_log.lines if "KeyError" in ln]
    assert len(lines) == 1 and "--debug" in lines[0], server_log.lines


def test_unexpected_error_traceback_with_debug(health_pkg, server_log, monkeypatch):
    from serving import features as features_mod

    monkeypatch.setenv("CITYFED_DEBUG", "1")
    server, feats, _ = served(health_pkg, SITE)

    def boom(self, outputs, info):
        raise KeyError("x")

    monkeypatch.setattr(features_mod.SiteFeatures, "answer", boom)
    with server as url:
        r = httpx.post(f"{url}/predict", json={"records": [_record(feats)]}, headers=H, timeout=60)
    assert r.status_code == 500
    assert "Traceback" in server_log.text


# -- fl-serve on a busy port --------------------------------------------------------------------
def test_fl_serve_on_a_busy_port_says_so_before_announcing(health_pkg, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from serving.cli import KEY_ENV, app

    monkeypatch.setenv(KEY_ENV, KEY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        res = CliRunner().invoke(app, [str(health_pkg), "--site", "Cleveland", "--port", str(port)])
    assert res.exit_code == 2, res.output
    assert f"port {port} on 127.0.0.1 is in use" in res.output and "--port" in res.output, res.output
    assert "serving" not in res.output and "Errno" not in res.output, res.output


def test_fl_serve_on_an_address_not_of_this_machine(health_pkg, tmp_path, monkeypatch):
    """With TLS (plain HTTP off loopback is refused first) the bind check answers, and its fix keeps TLS."""
    crt, key = _self_signed(tmp_path, "good", days_from=-1, days_to=30)
    res, out = _serve_cli(health_pkg, monkeypatch, "--host", "192.0.2.1", "--tls-cert", str(crt), "--tls-key", str(key))
    assert res.exit_code == 2, out
    assert "192.0.2.1 is not an address of this machine" in out and "--host" in out, out
    assert "0.0.0.0 (every interface, with --tls-cert/--tls-key)" in out and "would serve" not in out, out


def test_fl_serve_with_a_bad_tls_file_says_so_before_announcing(health_pkg, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from serving.cli import KEY_ENV, app

    monkeypatch.setenv(KEY_ENV, KEY)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    for args, words in ((["--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(junk)], "nope.crt"),
                        (["--tls-cert", str(junk), "--tls-key", str(junk)], "junk.pem")):
        res = CliRunner().invoke(app, [str(health_pkg), "--site", "Cleveland", "--port", "18997", *args])
        assert res.exit_code == 2, res.output
        assert words in res.output and "fix" in res.output and "serving" not in res.output, res.output




# -- TLS certificate dates, key pairs, missing halves ------------------------------------------------
def _self_signed(folder: Path, name: str, *, days_from: int, days_to: int, key=None):
    """A self-signed certificate for 127.0.0.1 valid from now+days_from to now+days_to; returns (crt, key)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=days_from)).not_valid_after(now + dt.timedelta(days=days_to))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    crt, kf = folder / f"{name}.crt", folder / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    kf.chmod(0o600)
    return crt, kf


def _serve_cli(pkg, monkeypatch, *args):
    from typer.testing import CliRunner

    from serving.cli import KEY_ENV, app

    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: print("uvicorn.run: would serve"))
    res = CliRunner().invoke(app, [str(pkg), "--site", "Cleveland", "--port", "18995", *args])
    return res, " ".join(res.output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())  # rich's box wraps lines


def test_fl_serve_refuses_a_certificate_out_of_date_or_of_another_key(health_pkg, tmp_path, monkeypatch):
    """fl-server start refuses these (exit 2); fl-serve served HTTPS with an expired certificate without a word."""
    expired = _self_signed(tmp_path, "expired", days_from=-30, days_to=-1)
    future = _self_signed(tmp_path, "future", days_from=5, days_to=60)
    good = _self_signed(tmp_path, "good", days_from=-1, days_to=60)
    other = _self_signed(tmp_path, "other", days_from=-1, days_to=60)
    cases = [
        (expired, ["--tls-cert", "expired.crt", "expired on", "fix: "]),
        (future, ["--tls-cert", "future.crt", "not valid before", "fix: "]),
        ((good[0], other[1]), ["--tls-key", "other.key", "does not belong to", "good.crt", "fix: "]),
    ]
    for (crt, key), words in cases:
        res, out = _serve_cli(health_pkg, monkeypatch, "--tls-cert", str(crt), "--tls-key", str(key))
        assert res.exit_code == 2, res.output
        assert all(w in out for w in words), (words, out)
        assert "would serve" not in out and "serving" not in out, out
    res, out = _serve_cli(health_pkg, monkeypatch, "--tls-cert", str(good[0]), "--tls-key", str(good[1]))
    assert res.exit_code == 0 and "would serve" in out and "https://" in out, res.output


def test_fl_serve_names_the_missing_half_and_unusable_tls_paths(health_pkg, tmp_path, monkeypatch):
    crt, key = _self_signed(tmp_path, "good", days_from=-1, days_to=60)
    cases = [
        (["--tls-cert", str(crt)], ["--tls-key", "fix: "]),
        (["--tls-key", str(key)], ["--tls-cert", "fix: "]),
        (["--tls-cert", str(tmp_path), "--tls-key", str(key)], ["--tls-cert", "is a directory", "fix: "]),
        (["--tls-cert", str(crt), "--tls-key", str(tmp_path)], ["--tls-key", "is a directory", "fix: "]),
        (["--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(key)], ["--tls-cert", "nope.crt", "not found",
                                                                              "fix: "]),
    ]
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        locked = tmp_path / "locked.key"
        locked.write_bytes(key.read_bytes())
        locked.chmod(0)
        cases.append((["--tls-cert", str(crt), "--tls-key", str(locked)], ["--tls-key", "locked.key", "cannot read",
                                                                           "fix: "]))
    for args, words in cases:
        res, out = _serve_cli(health_pkg, monkeypatch, *args)
        assert res.exit_code == 2, res.output
        assert all(w in out for w in words), (words, out)
        assert "would serve" not in out and "serving" not in out and "Traceback" not in out, out

# -- --manifest-sha256 ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["xyz", "", "0" * 63, "0" * 65, "g" * 64, "sha512:" + "0" * 64, "0" * 32 + "-" + "0" * 31])
def test_fl_serve_refuses_a_malformed_manifest_sha256(health_pkg, monkeypatch, value):
    """Not a SHA-256 at all: exit 2 naming the option, the value and where the hash comes from (was exit 1
    "MANIFEST.json: SHA-256 ... differs from the expected xyz; the package was replaced or changed")."""
    from typer.testing import CliRunner

    from serving.cli import KEY_ENV, app

    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: print("uvicorn.run: would serve"))  # "" used to serve
    res = CliRunner().invoke(app, [str(health_pkg), "--site", "Cleveland", "--port", "18996",
                                   "--manifest-sha256", value])
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "--manifest-sha256" in out and repr(value) in out and "64 hex" in out, out
    assert "fix: " in out and "MANIFEST.json SHA-256" in out and "export" in out, out
    assert "differs" not in out and "replaced" not in out and "serving" not in out, out


def test_manifest_sha256_accepts_what_the_export_prints(health_pkg):
    """Upper or lower case, a ``sha256:`` prefix, spaces around: the same hash."""
    from serving.cli import check_manifest_sha256

    h = sha256_file(health_pkg / MANIFEST)
    for value in (h, h.upper(), f"  {h}\n", f"sha256:{h}", f"SHA-256:{h}", f"sha256: {h}"):
        assert check_manifest_sha256(value) == h, value
        assert load_package(health_pkg, manifest_sha256=check_manifest_sha256(value)).manifest_sha256 == h
    assert check_manifest_sha256(None) is None

# -- damaged package files ------------------------------------------------------------------------
def _copy(pkg: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "pkg"
    shutil.copytree(pkg, out)
    return out


_rehash = rehash


def _edit_json(pkg: Path, name: str, fn) -> None:
    p = pkg / name
    p.write_text(json.dumps(fn(json.loads(p.read_text()))))


#: (name, change to the package, file named, words in the message)
PACKAGE_DAMAGE = [
    ("config invalid", lambda p: _edit_json(p, "model-config.json", lambda c: {**c, "dropout": 2.0}),
     "model-config.json", "dropout"),
    ("config unknown field", lambda p: _edit_json(p, "model-config.json", lambda c: {**c, "colour": "red"}),
     "model-config.json", "colour"),
    ("config not json", lambda p: (p / "model-config.json").write_text("{oops"), "model-config.json", "not valid json"),
    ("config a list", lambda p: (p / "model-config.json").write_text("[1, 2]"), "model-config.json", "object"),
    ("card not json", lambda p: (p / "model-card.json").write_text(""), "model-card.json", "not valid json"),
    ("schema not json", lambda p: (p / "schema.json").write_text("nope"), "schema.json", "not valid json"),
    ("huge layer", lambda p: _edit_json(p, "model-config.json", lambda c: {**c, "hidden": [10 ** 9]}),
     "model-config.json", "parameters"),
    ("weights do not fit", lambda p: _edit_json(p, "model-config.json", lambda c: {**c, "hidden": [8]}),
     "model.safetensors", "model-config.json"),
    ("features differ from schema", lambda p: _edit_json(p, "model-config.json", lambda c: {**c, "n_features": 9}),
     "model-config.json", "n_features"),
    ("weights not safetensors", lambda p: (p / "model.safetensors").write_bytes(b"not a model"), "model.safetensors",
     "safetensors"),
]


@pytest.mark.parametrize("name", [d[0] for d in PACKAGE_DAMAGE])
def test_damaged_package_file_named_with_field_and_fix(health_pkg, tmp_path, name):
    _, change, fname, words = next(d for d in PACKAGE_DAMAGE if d[0] == name)
    pkg = _copy(health_pkg, tmp_path)
    change(pkg)
    _rehash(pkg)
    with pytest.raises(PackageError) as info:
        load_package(pkg)
    msg = str(info.value)
    assert fname in msg and words in msg.lower() and "fix" in msg.lower(), msg
    assert "\n" not in msg, msg  # one line, not pydantic's multi-line dump


#: (name, manifest JSON text or function of the manifest, words in the message, words it must not contain)
MANIFEST_DAMAGE = [
    ("files null", lambda m: {**m, "files": None}, "files", "expected 'cityfed"),
    ("files a list", lambda m: {**m, "files": list(m["files"])}, "files", "expected 'cityfed"),
    ("a list", lambda m: [1, 2], "json object", None),
    ("department a number", lambda m: {**m, "department": 5}, "department", None),
    ("department unknown", lambda m: {**m, "department": "water"}, "department", None),
    ("format other", lambda m: {**m, "format": "cityfed-model-package/9"}, "format", None),
    ("hash a number", lambda m: {**m, "files": {**m["files"], "schema.json": 5}}, "schema.json", None),
]


@pytest.mark.parametrize("name", [d[0] for d in MANIFEST_DAMAGE])
def test_damaged_manifest_named_with_field_and_fix(health_pkg, tmp_path, name):
    _, change, words, never = next(d for d in MANIFEST_DAMAGE if d[0] == name)
    pkg = _copy(health_pkg, tmp_path)
    _edit_json(pkg, MANIFEST, change)
    with pytest.raises(PackageError) as info:
        load_package(pkg)
    msg = str(info.value)
    assert MANIFEST in msg and words in msg.lower() and "fix" in msg.lower(), msg
    if never:
        assert never not in msg, msg


def test_fl_serve_reports_a_bad_model_config_in_one_line(health_pkg, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from serving.cli import KEY_ENV, app

    pkg = _copy(health_pkg, tmp_path)
    _edit_json(pkg, "model-config.json", lambda c: {**c, "dropout": "lots"})
    _rehash(pkg)
    monkeypatch.setenv(KEY_ENV, KEY)
    res = CliRunner().invoke(app, [str(pkg), "--site", "Cleveland", "--port", "18998"])
    assert res.exit_code == 1, res.output
    assert "model-config.json" in res.output and "dropout" in res.output and "fix" in res.output, res.output
    assert "validation error" not in res.output and "errors.pydantic.dev" not in res.output, res.output


@pytest.mark.parametrize("case", ["missing data", "bad date format variable", "ranges file missing"])
def test_fl_serve_bad_node_input_is_exit_2(health_pkg, tmp_path, monkeypatch, case):
    """The node's own inputs (--data, CITYFED_DATE_FORMAT, --ranges) are bad input: exit 2 naming them,
    as in fl-client and fl-sim (a damaged package stays exit 1); they were exit 1."""
    args, words = {
        "missing data": (["--data", str(tmp_path / "gone.csv")], ["gone.csv", "file not found"]),
        "bad date format variable": ([], ["CITYFED_DATE_FORMAT", "XYZ"]),
        "ranges file missing": (["--ranges", str(tmp_path / "r.toml")], ["r.toml"]),
    }[case]
    if case == "bad date format variable":
        monkeypatch.setenv("CITYFED_DATE_FORMAT", "XYZ")
    res, text = _serve_cli(health_pkg, monkeypatch, *args)
    assert res.exit_code == 2, text
    assert all(w in text for w in words) and "fix" in text.lower() and "would serve" not in text, text


def test_a_package_file_swapped_after_its_hash_check_is_not_served(health_pkg, tmp_path, monkeypatch):
    """What is loaded is what was hashed: each package file is read once.

    On 8d95eb7 ``load_package`` hashed each file, then read it again to load it (a LOW of the
    bad-input review of 2026-12-07): weights written into the folder between the two reads were
    served under the pinned ``--manifest-sha256``.
    """
    import builtins

    import numpy as np
    from safetensors.numpy import load_file, save_file

    pkg = _copy(health_pkg, tmp_path)
    pinned = sha256_file(pkg / MANIFEST)
    model = pkg / "model.safetensors"
    original = load_file(str(model))
    tampered = tmp_path / "tampered.safetensors"
    save_file({k: np.zeros_like(v) for k, v in original.items()}, str(tampered))
    real_open = builtins.open
    swapped = []

    class SwapOnClose:
        def __init__(self, fh):
            self._fh = fh

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __iter__(self):
            return iter(self._fh)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()
            if not swapped:  # the first read is over: an attacker replaces the weights
                os.replace(tampered, model)
                swapped.append(True)
            return False

    def watching(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if Path(file) == model and "r" in mode:
            return SwapOnClose(fh)
        return fh

    monkeypatch.setattr(builtins, "open", watching)
    pkg_loaded = load_package(pkg, manifest_sha256=pinned)
    monkeypatch.undo()
    assert swapped, "the test never saw the weights read"
    served = {k: v.detach().numpy() for k, v in pkg_loaded.model.state_dict().items()}
    assert all(np.array_equal(served[k], original[k]) for k in original)


@pytest.mark.parametrize("name", ["model.safetensors", "model-card.json", MANIFEST])
def test_a_symlink_inside_a_package_is_refused_naming_it(health_pkg, tmp_path, name):
    """A package holds the plain files the export wrote; a link could point anywhere later."""
    pkg = _copy(health_pkg, tmp_path)
    elsewhere = tmp_path / ("elsewhere-" + name)
    (pkg / name).rename(elsewhere)
    (pkg / name).symlink_to(elsewhere)
    with pytest.raises(PackageError) as info:
        load_package(pkg)
    msg = str(info.value)
    assert str(pkg / name) in msg and "symbolic link" in msg and "fix" in msg.lower(), msg
