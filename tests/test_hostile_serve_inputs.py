"""fl-serve's inputs past their limits, and fl-sim audit's count options.

From an independent bad-input review (2026-12-07, reproductions adapted); each test failed on 22b7c36: /metrics
grew with every unauthenticated path; a body was buffered whole before the 20 MB limit; an API-key file that is
not UTF-8 crashed and one with a BOM kept it in the key (every client 403); NaN/inf weights loaded and every
/predict answered 500; a megabyte MANIFEST value was quoted whole; `{"records": [{}]}` got CSV-file wording;
any Content-Type was parsed as JSON; fl-sim audit's --shadows/--targets/--canaries/--clip had no upper bound.
"""
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from serve_helpers import KEY, rehash, served, synthetic_package  # noqa: E402

SITE = "Hungary"


@pytest.fixture(scope="module")
def health_pkg(tmp_path_factory):
    return synthetic_package(tmp_path_factory.mktemp("pkg"))


def copy_pkg(pkg: Path, tmp_path: Path) -> Path:
    out = tmp_path / "pkg"
    shutil.copytree(pkg, out)
    return out

def test_metrics_do_not_grow_with_every_unauthenticated_path(health_pkg):
    """Metrics are keyed by request.url.path for every request, with no key needed for a 404: each new
    path adds a counts dict and a 10,000-slot latency deque, forever. 5,000 such requests made /metrics
    a 20 MB answer in the review. Expected: unknown paths counted under one key (or not at all)."""
    server, _, _ = served(health_pkg, SITE)
    with server as url, httpx.Client(timeout=30) as c:
        for i in range(300):
            assert c.get(f"{url}/no-such-{i}").status_code == 404
        m = c.get(f"{url}/metrics", headers={"X-API-Key": KEY}).json()
    assert len(m["requests"]) < 20, sorted(m["requests"])[:5]


def test_body_over_the_limit_is_refused_before_it_is_read(health_pkg):
    """MAX_BODY (20 MB) is checked after `await request.body()` has buffered the whole body: a
    Content-Length of 100 MB is waited for and held in memory (300 MB raised the server's peak RSS by
    ~365 MB in the review). Expected: a Content-Length over the limit answered at once (413/422)."""
    server, _, _ = served(health_pkg, SITE)
    with server as url:
        port = int(url.rsplit(":", 1)[1])
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(5)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n{\"records\"")
        try:
            head = s.recv(100)
        except socket.timeout:
            head = b""
        finally:
            s.close()
    assert head.startswith(b"HTTP/1.1 4"), head


def _serve_cli(pkg: Path, keyfile: Path):
    from serving.cli import app

    return CliRunner().invoke(app, [str(pkg), "--site", SITE, "--api-key-file", str(keyfile), "--port", "1"])


def test_api_key_file_not_utf8_is_named(health_pkg, tmp_path):
    """A key file with a non-UTF-8 byte: read_keys catches only OSError, so UnicodeDecodeError escapes
    (fl-serve prints 'builtins.UnicodeDecodeError raised at <frozen codecs>...'). Expected: exit 2 naming
    --api-key-file, the file and the fix."""
    keyfile = tmp_path / "serve.keys"
    keyfile.write_bytes(b"test-key-0123456789abcdef\xff\n")
    keyfile.chmod(0o600)  # a key file others can read is refused before it is read
    res = _serve_cli(health_pkg, keyfile)
    assert res.exit_code == 2, (res.exit_code, repr(res.exception))
    assert "serve.keys" in res.output


def test_api_key_file_with_bom_is_refused_or_stripped(health_pkg, tmp_path):
    """A key file saved 'UTF-8 with BOM' (Notepad): the BOM stays in the first key (str.strip keeps
    U+FEFF), fl-serve starts, and every client sending the key gets 403. Expected: refused with the BOM
    fix (as the other text inputs), or the BOM dropped."""
    import typer

    from serving.cli import read_keys

    keyfile = tmp_path / "serve.keys"
    keyfile.write_bytes(b"\xef\xbb\xbf" + KEY.encode() + b"\r\n")
    keyfile.chmod(0o600)
    try:
        keys = read_keys(keyfile)
    except typer.BadParameter:
        return
    assert keys == [KEY], [repr(k) for k in keys]


def test_predict_one_empty_json_record_is_worded_for_a_request(health_pkg):
    """`{"records": [{}]}` is answered 'the file has a header but no data rows' / 'export the records
    again' - CSV-file wording for a JSON request (LOW)."""
    server, _, _ = served(health_pkg, SITE)
    with server as url:
        r = httpx.post(f"{url}/predict", json={"records": [{}]}, headers={"X-API-Key": KEY}, timeout=60)
    assert r.status_code == 422
    d = r.json()["detail"][0]
    assert "file" not in (d["problem"] + d["fix"]).lower(), d


def test_predict_with_a_content_type_neither_json_nor_csv_is_refused(health_pkg):
    """Any Content-Type other than text/csv is parsed as JSON (application/xml, form-urlencoded,
    multipart: 200). Expected: 415 naming the two accepted types (LOW)."""
    from serve_helpers import health_records

    server, feats, _ = served(health_pkg, SITE)
    import json

    with server as url:
        r = httpx.post(f"{url}/predict", content=json.dumps({"records": health_records(feats)[:1]}),
                       headers={"X-API-Key": KEY, "Content-Type": "application/xml"}, timeout=60)
    assert r.status_code in (400, 415, 422), r.text


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_package_with_non_finite_weights_is_refused_at_load(health_pkg, tmp_path, value):
    """A package whose weights hold NaN/inf is loaded and served; every /predict is then a 500
    ("internal error (ValueError)": the JSON encoder refuses NaN). Expected: load_package refuses it
    naming model.safetensors, the tensor and the fix (as it names tensors of the wrong shape)."""
    from safetensors.numpy import load_file, save_file

    from serving.package import PackageError, load_package

    pkg = copy_pkg(health_pkg, tmp_path)
    w = load_file(str(pkg / "model.safetensors"))
    w = {k: np.full_like(v, value) for k, v in w.items()}
    save_file(w, str(pkg / "model.safetensors"))
    rehash(pkg)
    with pytest.raises(PackageError) as info:
        load_package(pkg)
    assert "model.safetensors" in str(info.value) and "fix" in str(info.value).lower()


def test_package_with_non_finite_weights_is_not_served_as_500(health_pkg, tmp_path):
    """The same package end to end: /predict answered 500 with no fix (it should never have been served)."""
    from safetensors.numpy import load_file, save_file

    pkg = copy_pkg(health_pkg, tmp_path)
    w = load_file(str(pkg / "model.safetensors"))
    save_file({k: np.full_like(v, np.nan) for k, v in w.items()}, str(pkg / "model.safetensors"))
    rehash(pkg)
    from serving.package import PackageError

    with pytest.raises(PackageError):  # refused at load: never served to answer 500s
        served(pkg, "Hungary")


def test_manifest_message_does_not_quote_a_megabyte_value(health_pkg, tmp_path):
    """MANIFEST.json's "format" is quoted whole in the error (1,000,000 characters printed to the terminal);
    other messages cut values to ~40 characters (LOW)."""
    from serving.package import MANIFEST, PackageError, load_package

    pkg = copy_pkg(health_pkg, tmp_path)
    m = json.loads((pkg / MANIFEST).read_text())
    m["format"] = "x" * 1_000_000
    (pkg / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(PackageError) as info:
        load_package(pkg)
    assert len(str(info.value)) < 2000, len(str(info.value))


@pytest.mark.parametrize("args, option", [
    (["--canaries", str(10 ** 12)], "--canaries"),
    (["--shadows", str(10 ** 21)], "--shadows"),
    (["--targets", str(10 ** 21), "--no-control", "--epsilon", "1"], "--targets"),
])
def test_audit_huge_counts_refused_naming_the_option(tmp_path, args, option):
    """--shadows/--targets/--canaries have a minimum and no maximum: 10**12 canaries end in 'numpy MemoryError
    raised at simulations/mia.py:335 (make_canaries)', 10**21 shadows/targets in 'builtins.ValueError raised at
    numpy/random/_common.pyx' (exit 1, after loading the data). Expected: exit 2 naming the option and its range;
    nothing written."""
    from simulations.cli import app

    res = CliRunner().invoke(app, ["audit", "-o", str(tmp_path / "a"), *args])
    assert res.exit_code == 2, (res.exit_code, repr(res.exception))
    assert option in res.output
    assert not (tmp_path / "a").exists()


def test_audit_clip_above_the_run_config_bound_is_refused(tmp_path):
    """--clip accepts any finite number > 0: 1e308 starts the audit (it was killed after 60 s in the review),
    whereas fl-sim run / fl-server run cap clipping-norm at MAX_SCALE = 1e6. Expected: exit 2 naming --clip."""
    import click

    from simulations.audit_cmd import _check_inputs

    with pytest.raises((click.exceptions.Exit, SystemExit)) as info:
        _check_inputs("health", tmp_path / "a", [1.0], 0, None, "rdp", 1e308, 0.95, True, False)
    code = getattr(info.value, "exit_code", getattr(info.value, "code", None))
    assert code == 2


# -- security review 2026-12-07, finding 2: plain HTTP on the network, a key file others can read ---------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_uvicorn(monkeypatch):
    """uvicorn.run replaced: the calls fl-serve would have served with."""
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    return calls


def _keyfile(tmp_path: Path, mode: int = 0o600) -> Path:
    keyfile = tmp_path / "serve.keys"
    keyfile.write_text(KEY + "\n")
    keyfile.chmod(mode)
    return keyfile


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_fl_serve_refuses_plain_http_on_a_non_loopback_host(health_pkg, tmp_path, no_uvicorn, host):
    """`fl-serve PKG --host 0.0.0.0` served plain HTTP on every interface, silently: the API key crossed the network
    in clear. The console refuses this (check_bind). Expected: exit 2 naming --host and the fix, nothing served."""
    from serving.cli import app

    res = CliRunner().invoke(app, [str(health_pkg), "--site", SITE, "--api-key-file", str(_keyfile(tmp_path)),
                                   "--host", host, "--port", str(_free_port())])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"--host {host}" in text and "--tls-cert" in text and "--tls-key" in text and "127.0.0.1" in text, text
    assert "serving" not in text and not no_uvicorn, text


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_fl_serve_on_loopback_needs_no_tls(health_pkg, tmp_path, no_uvicorn, host):
    from serving.cli import app

    res = CliRunner().invoke(app, [str(health_pkg), "--site", SITE, "--api-key-file", str(_keyfile(tmp_path)),
                                   "--host", host, "--port", str(_free_port())])
    assert res.exit_code == 0, res.output
    assert [c["host"] for c in no_uvicorn] == [host]


def test_the_plain_http_rule_allows_any_host_with_tls():
    from serving.cli import check_plain_http

    check_plain_http("0.0.0.0", tls=True)
    check_plain_http("127.0.0.1", tls=False)
    with pytest.raises(Exception, match="--tls-cert"):
        check_plain_http("192.0.2.1", tls=False)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620, 0o660, 0o602, 0o666], ids=oct)
def test_api_key_file_open_to_other_users_is_refused(tmp_path, mode):
    """read_keys used a 0644 key file (the review's scratch/serve.keys); the console refuses its 0644 token file.

    Group-read (0640) is allowed since review s19 (finding 3); world-readable, group- or world-writable are not."""
    import typer

    from serving.cli import read_keys

    keyfile = _keyfile(tmp_path, mode)
    with pytest.raises(typer.BadParameter) as err:
        read_keys(keyfile)
    msg = str(err.value)
    assert str(keyfile) in msg and f"{mode:o}" in msg and f"chmod 600 {keyfile}" in msg, msg
    assert KEY not in msg


def test_api_key_file_of_mode_600_is_read(tmp_path):
    from serving.cli import read_keys

    assert read_keys(_keyfile(tmp_path, 0o600)) == [KEY]


def test_fl_serve_with_a_key_file_others_can_read_exits_2(health_pkg, tmp_path, no_uvicorn):
    from serving.cli import app

    res = CliRunner().invoke(app, [str(health_pkg), "--site", SITE, "--api-key-file", str(_keyfile(tmp_path, 0o644)),
                                   "--port", str(_free_port())])
    assert res.exit_code == 2 and "chmod 600" in " ".join(res.output.split()) and not no_uvicorn, res.output


# -- review s19, finding 3: key files as secret managers provision them ---------------------------------------
def _not_mine(path: Path, monkeypatch) -> None:
    """Make ``path`` owned by another user: chown to nobody as root, else pretend to be another user."""
    import os

    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    else:
        monkeypatch.setattr("serving.cli.os.geteuid", lambda: path.stat().st_uid + 1)


@pytest.mark.parametrize("mode", [0o640, 0o440, 0o400], ids=oct)
def test_api_key_file_readable_by_its_group_is_read(tmp_path, mode):
    """root:svc 0440, the usual "one service group may read it" file, was refused with "chmod 600"."""
    from serving.cli import read_keys

    assert read_keys(_keyfile(tmp_path, mode)) == [KEY]


@pytest.mark.parametrize("mode", [0o444, 0o440], ids=oct)
def test_api_key_file_on_a_read_only_secret_mount_is_read(tmp_path, monkeypatch, mode):
    """Docker mounts a secret 0444 owned by root: read-only for everyone, and chmod 600 cannot be done there."""
    from serving.cli import read_keys

    keyfile = _keyfile(tmp_path, mode)
    _not_mine(keyfile, monkeypatch)
    assert read_keys(keyfile) == [KEY]


@pytest.mark.parametrize("mode", [0o644, 0o664, 0o646], ids=oct)
def test_api_key_file_of_another_user_that_it_can_change_is_refused(tmp_path, monkeypatch, mode):
    """World-readable and writable by someone (its owner): named, with a fix its owner can apply."""
    import typer

    from serving.cli import read_keys

    keyfile = _keyfile(tmp_path, mode)
    _not_mine(keyfile, monkeypatch)
    with pytest.raises(typer.BadParameter) as err:
        read_keys(keyfile)
    msg = str(err.value)
    assert str(keyfile) in msg and f"{mode:o}" in msg and "0440" in msg and "read-only" in msg and KEY not in msg, msg


def test_fl_serve_with_a_group_readable_key_file_serves(health_pkg, tmp_path, no_uvicorn):
    from serving.cli import app

    res = CliRunner().invoke(app, [str(health_pkg), "--site", SITE, "--api-key-file", str(_keyfile(tmp_path, 0o640)),
                                   "--port", str(_free_port())])
    assert res.exit_code == 0 and [c["host"] for c in no_uvicorn] == ["127.0.0.1"], res.output
