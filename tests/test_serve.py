"""fl-serve end to end: simulated run -> export -> HTTP predictions equal the package's offline ones, in original units.

Also: API keys (401/403), schema violations answered 422 naming the field (the data loaders'
own checks), CSV upload, /model and /metrics, and no pickle / torch.load anywhere in
export, serving and resume.
"""

import json
import pickle
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import (KEY, health_records, offline, served, simulated_run, synthetic_package, synthetic_run,  # noqa: E402
                           window_records)  # noqa: E402

from serving.package import export_package  # noqa: E402

H = {"X-API-Key": KEY}
SITE = "Hungary"


@pytest.fixture(scope="module")
def health_run(tmp_path_factory):
    """A real 1-round DP federated simulation of the four hospitals, exported."""
    d = tmp_path_factory.mktemp("health")
    res = simulated_run(d / "run", "health", rounds=1)
    assert res["status"] == "completed"
    export_package(d / "run", d / "pkg")
    return d


def test_health_http_predictions_equal_offline_on_test_split(health_run):
    server, feats, pkg = served(health_run / "pkg", SITE)
    test = feats.data.test
    want = 1 / (1 + np.exp(-offline(pkg, test.X).reshape(-1).astype(np.float64)))
    records = health_records(feats)
    assert len(records) == len(test) > 50
    with server as url:
        r = httpx.post(f"{url}/predict", json={"records": records}, headers=H, timeout=60)
        assert r.status_code == 200, r.text
        got = np.array(r.json()["probability"])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert ((got > 0) & (got < 1)).all()
        # the same records as a CSV upload
        import pandas as pd

        csv = pd.DataFrame(records).to_csv(index=False)
        r = httpx.post(f"{url}/predict", content=csv, headers={**H, "Content-Type": "text/csv"}, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["probability"], want, rtol=1e-6, atol=1e-7)
        # one record at a time gives the same answer
        r = httpx.post(f"{url}/predict", json={"records": records[:1]}, headers=H, timeout=60)
        assert r.json()["probability"][0] == pytest.approx(want[0], rel=1e-6)
        card = httpx.get(f"{url}/model", headers=H).json()
        assert card["card"]["run-id"] == pkg.card["run-id"] and card["site"] == SITE
        assert set(card["card"]["privacy"]) == {"Cleveland", "Hungary", "VA Long Beach", "Switzerland"}
        for site, p in card["card"]["privacy"].items():
            assert 0 < p["mechanisms"]["dp-sgd"]["epsilon"] <= 3.0 + 1e-6 and 0 < p["delta"] < 1
        m = httpx.get(f"{url}/metrics", headers=H).json()
        assert m["requests"]["/predict"]["200"] == 3 and m["records-predicted"] == 2 * len(records) + 1
        assert httpx.get(f"{url}/health").json()["site"] == SITE
        assert "/predict" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_api_key_missing_or_wrong_refused(health_run):
    server, feats, _ = served(health_run / "pkg", SITE)
    body = {"records": health_records(feats)[:1]}
    with server as url:
        for path, call in (("/predict", lambda h: httpx.post(f"{url}/predict", json=body, headers=h)),
                           ("/model", lambda h: httpx.get(f"{url}/model", headers=h)),
                           ("/metrics", lambda h: httpx.get(f"{url}/metrics", headers=h))):
            assert call({}).status_code == 401, path
            assert call({"X-API-Key": KEY + "x"}).status_code == 403, path
            assert call({"Authorization": "Bearer nope"}).status_code == 403, path
            assert call({"Authorization": f"Bearer {KEY}"}).status_code == 200, path


#: (column, bad value or DROP, words the answer must contain): the data loaders' own checks.
VIOLATIONS = [
    ("age", "sixty", "non-numeric"),
    ("age", 63.5, "non-integer"),
    ("age", 150, "plausib"),
    ("chol", "inf", "infinite"),
    ("cp", "sharp pain", "unknown value"),
    ("sex", "x", "unknown value"),
    ("fbs", "maybe", "true/false"),
    ("thalch", "DROP", "missing"),
    ("dataset", "Cleveland", "this server serves"),
]


@pytest.mark.parametrize("column,value,words", VIOLATIONS)
def test_schema_violations_answered_422_naming_the_field(health_run, column, value, words):
    server, feats, _ = served(health_run / "pkg", SITE)
    rec = dict(health_records(feats)[0])
    if value == "DROP":
        rec.pop(column)
    else:
        rec[column] = value
    with server as url:
        r = httpx.post(f"{url}/predict", json={"records": [rec]}, headers=H)
    assert r.status_code == 422, r.text
    d = r.json()["detail"][0]
    assert d["field"] == column, d
    assert words in (d["problem"] + d["fix"]).lower() or words in d["problem"], d
    assert d["fix"]


def test_malformed_bodies_answered_422(health_run):
    server, _, _ = served(health_run / "pkg", SITE)
    with server as url:
        for kw in ({"content": b"{not json", "headers": {**H, "Content-Type": "application/json"}},
                   {"json": {"rows": []}, "headers": H}, {"json": {"records": []}, "headers": H},
                   {"json": {"records": [1, 2]}, "headers": H},
                   {"content": b"age,age\n1,2\n", "headers": {**H, "Content-Type": "text/csv"}}):
            r = httpx.post(f"{url}/predict", **kw)
            assert r.status_code == 422, r.text
            assert r.json()["detail"][0]["fix"]


def test_no_pickle_loaded_in_export_serve_and_resume(health_run, tmp_path, monkeypatch):
    from clients.app import app as client_app
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    def refuse(*a, **k):
        raise AssertionError("pickle / torch.load called")

    import shutil

    run = tmp_path / "run"
    shutil.copytree(health_run / "run", run)
    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    export_package(run, tmp_path / "pkg")
    server, feats, pkg = served(tmp_path / "pkg", SITE)
    with server as url:
        r = httpx.post(f"{url}/predict", json={"records": health_records(feats)[:3]}, headers=H)
        assert r.status_code == 200
    cfg = json.loads((run / "results.json").read_text())["config"]
    cfg.update({"run-dir": str(run), "resume": True})  # all rounds done: resume reads the checkpoint, writes the model
    res = run_federation(InProcessGrid(client_app, []), cfg, run_id="again")
    assert res["status"] == "completed" and (run / "model.safetensors").exists()


def test_forecast_serving_matches_offline_untrained_models(tmp_path):
    """Traffic and utility (untrained weights, no simulation): HTTP forecasts = offline, in original units."""
    for dept, site in (("traffic", "detector-3"), ("utility", "victoria-2014")):
        run = synthetic_run(tmp_path / dept / "run", dept)
        export_package(run, tmp_path / dept / "pkg", sites=[])
        server, feats, pkg = served(tmp_path / dept / "pkg", site)
        n = len(feats.data.test)
        with server as url:
            for i in (0, n // 2, n - 1):
                records, t0 = window_records(feats, i)
                r = httpx.post(f"{url}/predict", json={"records": records}, headers=H, timeout=60)
                assert r.status_code == 200, r.text
                ans = r.json()
                test = feats.data.test
                want = offline(pkg, test.X[i:i + 1]).reshape(-1) * test.scale[i] + test.loc[i]  # the window's own statistics
                got = np.array([f[feats.schema.target] for f in ans["forecast"]])
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, abs(test.loc[i])))
                assert ans["forecast"][0][feats.schema.time_column] == t0.isoformat()
                assert len(got) == feats.schema.horizon
            short, _ = window_records(feats, 0, extra=0)
            r = httpx.post(f"{url}/predict", json={"records": short[-5:]}, headers=H)
            assert r.status_code == 422 and r.json()["detail"][0]["field"] == feats.schema.time_column


@pytest.mark.slow
@pytest.mark.parametrize("dept,site", [("traffic", "detector-3"), ("utility", "victoria-2014")])
def test_forecast_end_to_end_after_simulated_run(tmp_path, dept, site):
    """A real 1-round DP simulation of every site -> export -> fl-serve -> forecasts equal offline ones."""
    res = simulated_run(tmp_path / "run", dept, rounds=1)
    assert res["status"] == "completed"
    export_package(tmp_path / "run", tmp_path / "pkg")
    server, feats, pkg = served(tmp_path / "pkg", site)
    assert set(pkg.card["privacy"]) and pkg.card["rounds-completed"] == 1
    with server as url:
        for i in (0, len(feats.data.test) - 1):
            records, _ = window_records(feats, i)
            r = httpx.post(f"{url}/predict", json={"records": records}, headers=H, timeout=60)
            assert r.status_code == 200, r.text
            test = feats.data.test
            pred = offline(pkg, test.X[i:i + 1]).reshape(-1)
            want = pred * test.scale[i] + test.loc[i]  # the window's own statistics
            got = np.array([f[feats.schema.target] for f in r.json()["forecast"]])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, abs(test.loc[i])))


@pytest.fixture(scope="module")
def traffic_package(tmp_path_factory):
    d = tmp_path_factory.mktemp("traffic")
    export_package(synthetic_run(d / "run", "traffic"), d / "pkg", sites=[])
    return d / "pkg"


def _shift(rec, minutes):
    import pandas as pd

    return (pd.Timestamp(rec) + pd.Timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S")


#: Traffic records broken the ways the traffic loader refuses a file: (how, field).
TRAFFIC_VIOLATIONS = [
    ("negative", "total"),
    ("off-grid", "timestamp"),
    ("unsorted", "timestamp"),
    ("day-first", "timestamp"),
    ("conflict", "timestamp"),
    ("text", "total"),
]


@pytest.mark.parametrize("how,field", TRAFFIC_VIOLATIONS)
def test_forecast_schema_violations_answered_422(traffic_package, how, field):
    server, feats, _ = served(traffic_package, "detector-3")
    records, _ = window_records(feats, 0)
    records = [dict(r) for r in records]
    k = len(records) // 2
    if how == "negative":
        records[k]["total"] = -3
    elif how == "off-grid":
        records[k]["timestamp"] = _shift(records[k]["timestamp"], 7)
    elif how == "unsorted":
        records[k], records[k + 1] = records[k + 1], records[k]
    elif how == "day-first":
        import pandas as pd

        for r in records:
            r["timestamp"] = pd.Timestamp(r["timestamp"]).strftime("%d/%m/%Y %H:%M")
    elif how == "conflict":
        records.insert(k, {**records[k], "total": (records[k]["total"] or 0) + 5})
    elif how == "text":
        records[k]["total"] = "twelve"
    with server as url:
        r = httpx.post(f"{url}/predict", json={"records": records}, headers=H)
    assert r.status_code == 422, r.text
    d = r.json()["detail"][0]
    assert d["field"] == field, d
    assert d["fix"]


def test_fl_serve_refuses_tampered_package_and_missing_key(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from serving.cli import KEY_ENV, app

    run = synthetic_run(tmp_path / "run", "health")
    export_package(run, tmp_path / "pkg", sites=[])
    monkeypatch.delenv(KEY_ENV, raising=False)
    res = CliRunner().invoke(app, [str(tmp_path / "pkg"), "--site", "Cleveland"])
    assert res.exit_code == 2 and "no API key" in res.output
    monkeypatch.setenv(KEY_ENV, KEY)
    card = tmp_path / "pkg" / "model-card.json"
    card.write_text(card.read_text().replace('"fedavg"', '"krum"'))
    res = CliRunner().invoke(app, [str(tmp_path / "pkg"), "--site", "Cleveland"])
    assert res.exit_code == 1 and "model-card.json" in res.output and "does not match" in res.output


def test_package_schema_must_match_the_nodes(tmp_path):
    """A package made for another schema (another cityfed version) is refused before anything is served."""
    from serving.app import build_app
    from serving.features import SiteFeatures
    from serving.package import load_package

    export_package(synthetic_run(tmp_path / "run", "traffic"), tmp_path / "pkg", sites=[])
    pkg = load_package(tmp_path / "pkg")
    feats = SiteFeatures("traffic", "detector-3")
    build_app(pkg, feats, [KEY])  # the same schema: accepted
    pkg.schema = {**pkg.schema, "lookback": 16}
    with pytest.raises(ValueError, match="lookback"):
        build_app(pkg, feats, [KEY])
    with pytest.raises(ValueError, match="health"):
        build_app(pkg, SiteFeatures("health", "Cleveland"), [KEY])


def _client_cert(ca_dir: Path, out: Path) -> tuple[Path, Path]:
    """A client certificate (clientAuth) signed by the test CA."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from privacy.pki import load_ca

    ca_cert, ca_key = load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "control-room")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "client.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return out / "client.crt", out / "client.key"


def test_mutual_tls_needs_a_client_certificate_and_the_key(tmp_path):
    import ssl

    from privacy.pki import create_ca, issue_server_cert
    from serving.app import build_app
    from serving.cli import ServerThread
    from serving.features import SiteFeatures
    from serving.package import load_package

    create_ca(tmp_path / "ca")
    srv_key, srv_crt = issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["127.0.0.1"])
    crt, key = _client_cert(tmp_path / "ca", tmp_path / "client")
    export_package(synthetic_run(tmp_path / "run", "health"), tmp_path / "pkg", sites=[])
    app = build_app(load_package(tmp_path / "pkg"), SiteFeatures("health", "Cleveland"), [KEY])
    srv_files = {p.name: p for p in (Path(srv_key), Path(srv_crt))}
    server = ServerThread(app, ssl_certfile=str(srv_files["server.crt"]), ssl_keyfile=str(srv_files["server.key"]),
                          ssl_ca_certs=str(tmp_path / "ca" / "ca.crt"), ssl_cert_reqs=ssl.CERT_REQUIRED)
    with server as url:
        url = url.replace("http://", "https://")
        with_cert = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.crt"))
        with_cert.load_cert_chain(str(crt), str(key))
        assert httpx.get(f"{url}/health", verify=with_cert).status_code == 200
        assert httpx.get(f"{url}/model", verify=with_cert).status_code == 401  # the certificate does not replace the key
        assert httpx.get(f"{url}/model", verify=with_cert, headers=H).status_code == 200
        without = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.crt"))
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", verify=without)


def test_node_serves_from_its_own_records_file(tmp_path):
    """fl-serve --data: the node's own file (here one hospital's, written by fl-sim export) gives the scaling."""
    from typer.testing import CliRunner

    from citydata import load_department
    from serving.app import build_app
    from serving.cli import ServerThread
    from serving.features import SiteFeatures
    from serving.package import load_package
    from simulations.cli import app as sim_app

    res = CliRunner().invoke(sim_app, ["export", "-d", "health", "--site", "Hungary", "-o", str(tmp_path / "hungary.csv")])
    assert res.exit_code == 0, res.output
    export_package(synthetic_run(tmp_path / "run", "health"), tmp_path / "pkg", sites=[])
    pkg = load_package(tmp_path / "pkg")
    feats = SiteFeatures("health", "Hungary", tmp_path / "hungary.csv")
    assert feats.ds.sites == ["Hungary"]
    np.testing.assert_array_equal(feats.data.test.X, load_department("health").site_data("Hungary").test.X)
    want = 1 / (1 + np.exp(-offline(pkg, feats.data.test.X).reshape(-1).astype(np.float64)))
    with ServerThread(build_app(pkg, feats, [KEY])) as url:
        r = httpx.post(f"{url}/predict", json={"records": health_records(feats)}, headers=H, timeout=60)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["probability"], want, rtol=1e-6, atol=1e-7)


def test_node_serves_from_its_own_forecasting_file_with_its_test_start(tmp_path, monkeypatch):
    """An own traffic file is opened as the node opens it: with its --test-start (no split derived from the file)."""
    from typer.testing import CliRunner

    from citydata import load_department
    from citydata.forecasting import NoTestStart
    from serving.cli import app
    from serving.features import SiteFeatures

    monkeypatch.delenv("CITYFED_TEST_START", raising=False)
    path = load_department("traffic").export(tmp_path / "d3.csv", sites=["detector-3"])
    with pytest.raises(NoTestStart, match="--test-start"):
        SiteFeatures("traffic", "detector-3", path)
    feats = SiteFeatures("traffic", "detector-3", path, test_start="2024-05-07 12:00")
    np.testing.assert_array_equal(feats.data.test.X, load_department("traffic").site_data("detector-3").test.X)
    res = CliRunner().invoke(app, [str(tmp_path / "nopkg"), "--site", "detector-3", "--test-start", "2024-05-07"])
    assert res.exit_code == 2 and "bundled sites have their own" in " ".join(res.output.split()), res.output
    res = CliRunner().invoke(app, [str(tmp_path / "nopkg"), "--site", "detector-3", "--data", str(path), "--test-start", "May"])
    assert res.exit_code == 2 and "is not a date" in " ".join(res.output.split()), res.output


def test_a_json_client_is_told_about_fields_and_null_and_not_about_columns_the_server_adds(tmp_path):
    """Found by a review of the docs followed literally (2026-12-07, L5): a JSON client that sent only 'age' read
    "missing required column (found: 'age', 'dataset', 'num')" (the server adds those two), and a range
    error told it to "leave a cell empty" and to "widen the range (--ranges FILE)": an operator's wording."""
    ctx, feats, _ = served(synthetic_package(tmp_path, "health"), "Cleveland")
    rec = dict(health_records(feats)[0], age=150)
    with ctx as url:
        d = httpx.post(f"{url}/predict", json={"records": [{"age": 50}]}, headers=H).json()["detail"][0]
        assert d["field"] == "sex" and d["problem"] == "missing required field (found: 'age')", d
        assert d["fix"].startswith("add the field 'sex' to every record"), d
        d = httpx.post(f"{url}/predict", json={"records": [rec]}, headers=H).json()["detail"][0]
        assert d["field"] == "age" and "send null when the value is unknown" in d["fix"], d
        assert "node's operator can widen the range of 'age' (fl-serve --ranges)" in d["fix"], d
        assert "cell" not in d["fix"] and "--ranges FILE" not in d["fix"], d
        csv = pd.DataFrame([rec]).to_csv(index=False).encode()  # a CSV body keeps the file's wording
        r = httpx.post(f"{url}/predict", content=csv, headers={**H, "Content-Type": "text/csv"})
        assert r.status_code == 422 and "leave a cell empty" in r.json()["detail"][0]["fix"], r.text
