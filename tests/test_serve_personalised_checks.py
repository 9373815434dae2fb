"""fl-serve: a personalised file's weights are checked as the package's are, and each record is answered on its own.

From the review of 2026-12-08 (s18, findings 4 and 6; reproductions adapted). Each test below failed before the fix:

- ``fl-serve --personalised`` loaded the node's file with ``load_state_dict`` and no dtype/finiteness check,
  while the package's own model is refused for exactly these: NaN weights started a healthy-looking server
  whose every ``/predict`` answered 500; int64 weights were silently cast and served (200, a wrong
  probability).
- a health record with a null (unknown) field was refused alone (422 "every value is missing; fix: fill in
  'chol'": the file loader's whole-column check applied to the request) but answered next to a complete
  record; a record identical to an earlier one was dropped (one probability fewer than records sent); a
  record that lacked a field other records had was answered (imputed) although alone it was refused.

Fast: an untrained package (:func:`serve_helpers.synthetic_package`) and a personalised file made from its
weights with the metadata the node writes; the app is called in-process (FastAPI's TestClient).
"""

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import KEY, synthetic_package  # noqa: E402

SITE = "Cleveland"
H = {"X-API-Key": KEY}
#: The README's example record (health); every field fl-serve's model uses.
REC = {"age": 63, "sex": "Male", "cp": "typical angina", "trestbps": 145, "chol": 233, "fbs": True,
       "restecg": "lv hypertrophy", "thalch": 150, "exang": False, "oldpeak": 2.3}
OTHER = {"age": 41, "sex": "Female", "cp": "atypical angina", "trestbps": 130, "chol": 204, "fbs": False,
         "restecg": "normal", "thalch": 172, "exang": False, "oldpeak": 1.4}


@pytest.fixture(scope="module")
def pkg_dir(tmp_path_factory) -> Path:
    return synthetic_package(tmp_path_factory.mktemp("pcheck"), "health")


def _personalised(pkg_dir: Path, dst: Path, change=None) -> Path:
    """A personalised file of ``SITE`` for the package, as the node writes it: the package's weights moved a little
    (so its answers differ from the global model's), then ``change(state)`` applied."""
    from safetensors.torch import save_file

    from serving.package import load_package
    from shared_models.fingerprint import state_sha256

    pkg = load_package(pkg_dir)
    base = pkg.model.state_dict()
    state = {k: (v + 0.05).contiguous() for k, v in base.items()}
    if change is not None:
        state = change(state)
    meta = {"run-id": str(pkg.card["run-id"]), "department": "health", "site": SITE, "base-sha256": state_sha256(base),
            "kept": "federated", "dp": "False", "epochs": "2", "layers": "all"}
    save_file(state, str(dst), metadata=meta)
    return dst


def _first_name(state: dict) -> str:
    return sorted(state)[0]


def _nan(state):
    out = dict(state)
    name = _first_name(out)
    out[name] = torch.full_like(out[name], float("nan"))
    return out


def _inf(state):
    out = dict(state)
    name = _first_name(out)
    out[name] = torch.full_like(out[name], float("inf"))
    return out


def _int64(state):
    return {k: (v * 3).to(torch.int64) for k, v in state.items()}


def _client(pkg_dir: Path, personalised: Path | None = None):
    from fastapi.testclient import TestClient

    from serving.cli import build

    return TestClient(build(pkg_dir, SITE, None, [KEY], personalised=personalised), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(pkg_dir):
    return _client(pkg_dir)


@pytest.fixture(scope="module")
def personalised_client(pkg_dir, tmp_path_factory):
    return _client(pkg_dir, _personalised(pkg_dir, tmp_path_factory.mktemp("pgood") / "sim.safetensors"))


def _predict(c, records):
    return c.post("/predict", json={"records": records}, headers=H)


# -- finding 4: a personalised file's weights ------------------------------------------------------------------


@pytest.mark.parametrize("change, words", [
    (_nan, ["holds NaN or infinite values"]),
    (_inf, ["holds NaN or infinite values"]),
    (_int64, ["holds int64 values, not floating point"]),
], ids=["nan", "inf", "int64"])
def test_a_personalised_file_with_non_finite_or_integer_weights_is_refused_at_load(pkg_dir, tmp_path, change, words):
    from serving.package import PackageError, load_package
    from serving.personalised import attach_personalised

    bad = _personalised(pkg_dir, tmp_path / "sim.safetensors", change)
    with pytest.raises(PackageError) as info:
        attach_personalised(load_package(pkg_dir), bad, SITE)
    msg = str(info.value)
    name = _first_name(load_package(pkg_dir).model.state_dict())
    assert f"--personalised {bad}" in msg and f"tensor {name!r}" in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert "fix: personalise the run again" in msg and "leave out --personalised" in msg, msg


@pytest.mark.parametrize("change, words", [(_nan, "holds NaN or infinite values"),
                                           (_int64, "holds int64 values, not floating point")], ids=["nan", "int64"])
def test_fl_serve_exits_1_before_serving_a_personalised_file_with_bad_weights(pkg_dir, tmp_path, monkeypatch,
                                                                             change, words):
    """As the package's own NaN weights: exit 1, the file, the tensor and the fix; nothing is served."""
    from typer.testing import CliRunner

    from serving.cli import KEY_ENV, app

    bad = _personalised(pkg_dir, tmp_path / "sim.safetensors", change)
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setattr("serving.cli.check_port", lambda *a, **k: pytest.fail("fl-serve went on to serve"))
    res = CliRunner().invoke(app, [str(pkg_dir), "--site", SITE, "--personalised", str(bad)], env={"COLUMNS": "400"})
    out = " ".join(res.output.split())
    assert res.exit_code == 1, out
    assert str(bad) in out and words in out and "tensor '" in out and "fix:" in out, out
    assert "Traceback" not in out, out


def test_a_personalised_file_with_finite_float_weights_is_still_served(pkg_dir, personalised_client, client):
    r = _predict(personalised_client, [REC])
    assert r.status_code == 200, r.text
    assert personalised_client.get("/health").json()["model"] == "personalised"
    p = r.json()["probability"][0]
    assert math.isfinite(p) and abs(p - _predict(client, [REC]).json()["probability"][0]) > 1e-6


def test_the_package_check_still_refuses_its_own_integer_weights(pkg_dir, tmp_path):
    """The check moved to one function shared by both loaders; the package's refusal keeps its wording."""
    import shutil

    from safetensors.numpy import load_file, save_file
    from serve_helpers import rehash

    from serving.package import PackageError, load_package

    pkg = tmp_path / "pkg"
    shutil.copytree(pkg_dir, pkg)
    w = load_file(str(pkg / "model.safetensors"))
    save_file({k: (v * 3).astype(np.int64) for k, v in w.items()}, str(pkg / "model.safetensors"))
    rehash(pkg)
    with pytest.raises(PackageError) as info:
        load_package(pkg)
    msg = str(info.value)
    assert str(pkg / "model.safetensors") in msg and "holds int64 values, not floating point" in msg, msg
    assert "the package is damaged" in msg and "fix: export the package again" in msg, msg


# -- finding 6: each record answered on its own -------------------------------------------------------------------

FIELDS = list(REC)


#: Probabilities of one input row computed alone or in a batch differ by float32 rounding (about 1e-8).
BATCH_ROUNDING = 1e-6


@pytest.fixture(scope="module")
def feats():
    from serving.features import SiteFeatures

    return SiteFeatures("health", SITE)


@pytest.mark.parametrize("field", FIELDS)
def test_a_single_record_with_a_null_field_is_answered_as_in_a_batch(client, feats, field):
    from serving.features import frame_from_records

    unknown = {**REC, field: None}
    alone = _predict(client, [unknown])
    assert alone.status_code == 200, alone.text
    pair = _predict(client, [OTHER, unknown])
    assert pair.status_code == 200, pair.text
    assert len(pair.json()["probability"]) == 2
    assert alone.json()["probability"][0] == pytest.approx(pair.json()["probability"][1], abs=BATCH_ROUNDING)
    x_alone, _ = feats.inputs(frame_from_records([unknown]))
    x_pair, _ = feats.inputs(frame_from_records([OTHER, unknown]))
    np.testing.assert_array_equal(x_alone[0], x_pair[1])  # the model's inputs are the same, bit for bit


def test_a_null_field_is_answered_alone_with_the_personalised_model_too(personalised_client):
    unknown = {**REC, "chol": None}
    alone = _predict(personalised_client, [unknown])
    assert alone.status_code == 200, alone.text
    pair = _predict(personalised_client, [REC, unknown]).json()["probability"]
    assert alone.json()["probability"][0] == pytest.approx(pair[1], abs=BATCH_ROUNDING)


def test_a_null_value_is_imputed_as_in_training(client, pkg_dir):
    """Training's per-record imputation (citydata.health.record_features): cholesterol and blood pressure of 0 mean
    "not measured", so null answers as 0 does."""
    for field in ("chol", "trestbps"):
        null = _predict(client, [{**REC, field: None}]).json()["probability"][0]
        zero = _predict(client, [{**REC, field: 0}]).json()["probability"][0]
        assert null == pytest.approx(zero, abs=1e-12), field


def test_a_record_with_no_known_value_is_refused_alone_and_in_a_batch(client):
    """A record with every field null says nothing about the patient: its answer would be the imputation constants'
    alone, so it is refused (review of the change, s18: it was answered), whatever the other records hold."""
    blank = {k: None for k in REC}
    for records, where in (([blank], "record 1"), ([REC, blank], "record 2")):
        r = _predict(client, records)
        assert r.status_code == 422, r.text
        d = r.json()["detail"][0]
        assert d["field"] == "records" and where in d["problem"] and "no known value" in d["problem"], d
        assert "at least one" in d["fix"], d


def test_a_blank_site_is_the_served_site(client):
    """A blank site (the file loader's missing value) is answered as null or a left-out site: the served site (it
    was refused as an unforeseen error, "report this", with a warning in the server's log)."""
    want = _predict(client, [REC]).json()["probability"]
    r = _predict(client, [{**REC, "dataset": ""}, {**REC, "dataset": " "}, REC])
    assert r.status_code == 200, r.text
    assert r.json()["probability"] == pytest.approx(want * 3, abs=BATCH_ROUNDING)


def test_a_csv_record_with_an_empty_cell_is_answered_alone(client):
    csv = pd.DataFrame([{**REC, "chol": None}]).to_csv(index=False).encode()
    r = client.post("/predict", content=csv, headers={**H, "Content-Type": "text/csv"})
    assert r.status_code == 200, r.text
    assert r.json()["probability"][0] == pytest.approx(_predict(client, [{**REC, "chol": None}]).json()["probability"][0],
                                                       abs=1e-12)


def test_identical_records_each_get_their_answer(client):
    """Two identical records were one (the file loader drops repeated rows): the answers no longer lined up."""
    r = _predict(client, [REC, OTHER, REC])
    assert r.status_code == 200, r.text
    p = r.json()["probability"]
    assert len(p) == 3 and r.headers["x-records"] == "3", p
    assert p[0] == pytest.approx(p[2], abs=BATCH_ROUNDING) and abs(p[0] - p[1]) > 1e-4


def test_a_null_site_is_the_served_site(client):
    """The site field may be left out (the served site); null is answered the same, alone or in a batch."""
    want = _predict(client, [REC]).json()["probability"][0]
    alone = _predict(client, [{**REC, "dataset": None}])
    assert alone.status_code == 200, alone.text
    pair = _predict(client, [{**OTHER, "dataset": SITE}, {**REC, "dataset": None}])
    assert pair.status_code == 200, pair.text
    assert alone.json()["probability"][0] == pytest.approx(want, abs=1e-12)
    assert len(pair.json()["probability"]) == 2
    assert pair.json()["probability"][1] == pytest.approx(want, abs=BATCH_ROUNDING)


def test_a_record_without_a_field_is_refused_alone_and_in_a_batch(client):
    """A field left out is refused (send null when unknown), whether or not another record has it."""
    lacking = {k: v for k, v in REC.items() if k != "chol"}
    for records, where in (([lacking], None), ([OTHER, lacking], "record 2")):
        r = _predict(client, records)
        assert r.status_code == 422, r.text
        d = r.json()["detail"][0]
        assert d["field"] == "chol" and "missing required field" in d["problem"], d
        assert d["fix"].startswith("add the field 'chol' to every record"), d
        if where:
            assert where in d["problem"] and "send null when the value is unknown" in d["fix"], d
        assert "233" not in r.text and "204" not in r.text  # no record value is echoed
