"""Health sites: each patient's split side and feature vector depend on that patient's record alone.

DP-SGD's guarantee and the node's privacy ledger assume that two neighbouring inputs (the
hospital's record file with and without one patient) differ in at most ONE training record.
That holds only if

* the train/test side of a patient is decided by that patient's record (and public
  constants: the data seed, the site name, the test fraction), never by how many other
  records there are, and
* the features of a patient are computed from that patient's values and public constants
  (no mean, std, median or mode of the hospital's records).

These tests remove (or add) records from a hospital's file and check that no OTHER record
moves between train and test and that every other record's feature vector is bitwise unchanged.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citydata import HeartDisease

pytestmark = pytest.mark.filterwarnings("ignore::citydata.DataQualityWarning")

HOSPITALS = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return HeartDisease().raw_frame()


def _site_frame(frame: pd.DataFrame, site: str) -> pd.DataFrame:
    return frame[frame["dataset"] == site].reset_index(drop=True)


def _by_id(ds: HeartDisease, site: str) -> tuple[dict, dict]:
    """``{patient id: feature vector}`` of the site's training and test records."""
    d = ds.site_data(site)
    f = ds.raw_frame()
    out = []
    for rows, part in ((d.meta["train_rows"], d.train), (d.meta["test_rows"], d.test)):
        ids = f.loc[rows, "id"].to_numpy()
        assert len(ids) == len(part) and len(set(ids)) == len(ids)
        out.append({float(i): part.X[k] for k, i in enumerate(ids)})
    return out[0], out[1]


def _build(records: pd.DataFrame, path: Path, site: str, **kw) -> tuple[dict, dict]:
    records.to_csv(path, index=False)
    return _by_id(HeartDisease(path, **kw), site)


def _assert_only_that_record(before: tuple[dict, dict], after: tuple[dict, dict], removed: set[float]):
    (tr0, te0), (tr1, te1) = before, after
    assert set(tr1) == set(tr0) - removed, "a removal moved another record into or out of the training set"
    assert set(te1) == set(te0) - removed, "a removal moved another record into or out of the test set"
    for old, new in ((tr0, tr1), (te0, te1)):
        for i, x in new.items():
            assert x.tobytes() == old[i].tobytes(), f"patient {i}'s feature vector changed when another record was removed"


@pytest.mark.parametrize("site", ["Cleveland", "VA Long Beach"])
def test_removing_one_record_changes_only_that_record(frame, tmp_path, site):
    records = _site_frame(frame, site)
    base = _build(records, tmp_path / "all.csv", site)
    train_ids, test_ids = sorted(base[0]), sorted(base[1])
    # training and test patients, from the start, middle and end of the file; VA has many missing values
    picks = [train_ids[0], train_ids[len(train_ids) // 2], train_ids[-1], test_ids[0], test_ids[len(test_ids) // 2], test_ids[-1]]
    for pid in picks:
        after = _build(records[records["id"] != pid], tmp_path / f"without-{int(pid)}.csv", site)
        _assert_only_that_record(base, after, {pid})


def test_adding_one_record_changes_only_that_record(frame, tmp_path):
    records = _site_frame(frame, "Hungary")
    base = _build(records, tmp_path / "all.csv", "Hungary")
    extra = records.iloc[[0]].copy()
    extra["id"], extra["age"], extra["chol"] = 10_000.0, 80.0, np.nan
    after = _build(pd.concat([records, extra], ignore_index=True), tmp_path / "plus.csv", "Hungary")
    tr1, te1 = after
    assert (set(tr1) | set(te1)) - (set(base[0]) | set(base[1])) == {10_000.0}
    _assert_only_that_record(base, ({k: v for k, v in tr1.items() if k != 10_000.0}, {k: v for k, v in te1.items() if k != 10_000.0}),
                             set())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_removals_move_no_other_record(frame, data):
    site = data.draw(st.sampled_from(["Switzerland", "Hungary"]), label="site")
    records = _site_frame(frame, site)
    ids = sorted(records["id"].tolist())
    removed = set(data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=5, unique=True), label="removed"))
    with tempfile.TemporaryDirectory() as tmp:
        base = _build(records, Path(tmp) / "all.csv", site)
        after = _build(records[~records["id"].isin(removed)], Path(tmp) / "less.csv", site)
    _assert_only_that_record(base, after, removed)


def test_features_are_a_function_of_the_record_alone(frame, tmp_path):
    """A patient's features are the same whether it is scored alone or with its whole hospital."""
    records = _site_frame(frame, "VA Long Beach")
    tr, te = _build(records, tmp_path / "all.csv", "VA Long Beach")
    whole = {**tr, **te}
    from citydata import health

    for pid in sorted(whole)[:25]:
        X = health.record_features(records[records["id"] == pid])
        assert X.shape == (1, 15) and X.dtype == np.float32
        assert X[0].tobytes() == whole[pid].tobytes()


def test_scaling_uses_public_constants(frame):
    from citydata import health

    assert set(health.REFERENCE) == set(health.NUMERIC)
    for c, (center, scale) in health.REFERENCE.items():
        assert np.isfinite(center) and scale > 0, c
    ds = HeartDisease()
    for site in HOSPITALS:
        assert ds.site_data(site).meta["scalers"] == {c: tuple(map(float, v)) for c, v in health.REFERENCE.items()}
    # a numeric value at the reference centre scales to 0; one scale above it to 1
    one = _site_frame(frame, "Cleveland").iloc[[0]].copy()
    one["age"] = health.REFERENCE["age"][0] + health.REFERENCE["age"][1]
    one["chol"] = health.REFERENCE["chol"][0]
    X = health.record_features(one)
    assert X[0, health.FEATURES.index("age")] == pytest.approx(1.0)
    assert X[0, health.FEATURES.index("chol")] == 0.0


def test_missing_values_get_fixed_constants(frame):
    from citydata import health

    one = _site_frame(frame, "Cleveland").iloc[[0]].copy()
    for c in ("age", "trestbps", "sex", "fbs", "cp", "restecg"):
        one[c] = None
    one["chol"] = 0.0  # zero = not measured
    X = health.record_features(one)[0]
    f = health.FEATURES
    for c in ("age", "trestbps", "chol"):
        assert X[f.index(c)] == 0.0  # imputed with the reference centre: 0 after scaling
    assert X[f.index("sex")] == X[f.index("fbs")] == health.BINARY_MISSING
    assert not X[f.index("cp=typical angina"):].any()  # unknown category: all-zero one-hot


def test_split_size_and_classes_per_hospital():
    ds = HeartDisease()
    for site in HOSPITALS:
        d = ds.site_data(site)
        n = len(d.train) + len(d.test)
        tf = ds.test_fraction
        # each patient is a Bernoulli(test_fraction) draw: within 3.5 binomial standard deviations
        assert abs(len(d.test) / n - tf) < 3.5 * math.sqrt(tf * (1 - tf) / n), (site, len(d.test), n)
        assert set(np.unique(d.train.y)) == {0.0, 1.0}, site


def test_split_follows_seed_and_test_fraction():
    a, b = HeartDisease(seed=0), HeartDisease(seed=1)
    for site in HOSPITALS:
        ra, rb = a.site_data(site).meta["test_rows"], b.site_data(site).meta["test_rows"]
        assert not np.array_equal(ra, rb), site
    small, large = HeartDisease(test_fraction=0.2), HeartDisease(test_fraction=0.5)
    for site in HOSPITALS:
        s, g = set(small.site_data(site).meta["test_rows"]), set(large.site_data(site).meta["test_rows"])
        assert s <= g, site  # one uniform draw per patient: a larger fraction only adds test patients
