"""Helpers of tests/test_export.py and tests/test_serve.py: run folders, packages, a served app."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("CITYFED_DP_SEED_FROM_JOB", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

#: An API key the tests serve with.
KEY = "test-key-0123456789abcdef"


def simulated_run(run_dir: Path, department: str = "health", rounds: int = 1, model: str = "") -> dict:
    """A real federated simulation (in-process engine, DP-SGD, the department's bundled sites) into ``run_dir``."""
    from simulations.run import simulate

    torch.set_num_threads(1)
    cfg = {"department": department, "num-rounds": rounds, "local-epochs": 1, "batch-size": 32, "target-epsilon": 3.0,
           "run-dir": str(run_dir), "central-data": "bundled", "model": model, "fraction-evaluate": 0.0}
    return simulate(cfg, engine="inprocess")


def synthetic_run(run_dir: Path, department: str, seed: int = 0) -> Path:
    """A run folder holding an untrained model of ``department`` (results.json + model.safetensors), no simulation."""
    from citydata import DATASETS
    from server.artefacts import MODEL, save_model
    from shared_models import build_model, default_model_config

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(default_model_config(DATASETS[department].schema))
    save_model(run_dir / MODEL, model.state_dict())
    results = {"run_id": f"synthetic-{department}", "status": "completed",
               "config": {"department": department, "model": "", "strategy": "fedavg", "num-rounds": 1, "dp": True,
                          "target-epsilon": 3.0},
               "job": {"task": "test"}, "rounds": [], "excluded": [], "refused": []}
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def synthetic_package(folder: Path, department: str = "health") -> Path:
    """``folder/pkg``: a model package exported from :func:`synthetic_run` (untrained; no site data)."""
    from serving.package import export_package

    export_package(synthetic_run(folder / "run", department), folder / "pkg", sites=[])
    return folder / "pkg"


def rehash(pkg: Path) -> None:
    """Re-sign the manifest after a change (as someone who edits a package and its manifest would)."""
    from serving.package import MANIFEST, sha256_file

    m = json.loads((pkg / MANIFEST).read_text())
    m["files"] = {name: sha256_file(pkg / name) for name in m["files"]}
    (pkg / MANIFEST).write_text(json.dumps(m))


def served(package: Path, site: str):
    """``(url context manager, SiteFeatures, ModelPackage)`` for ``package`` served for ``site`` on a free loopback port."""
    from serving.app import build_app
    from serving.cli import ServerThread
    from serving.features import SiteFeatures
    from serving.package import load_package

    pkg = load_package(package)
    feats = SiteFeatures(pkg.department, site)
    feats.self_check()
    return ServerThread(build_app(pkg, feats, [KEY])), feats, pkg


def health_records(feats) -> list[dict]:
    """The served hospital's test records as JSON records (the label and ID left out; NaN as null)."""
    r = feats.test_records()
    cols = [c.name for c in feats.schema.columns if c.name in r.columns and c.name not in ("num", "id")]
    out = []
    for rec in r[cols].to_dict(orient="records"):
        out.append({k: (None if v is None or (isinstance(v, float) and np.isnan(v)) else
                        (v.item() if hasattr(v, "item") else v)) for k, v in rec.items()})
    return out


def offline(pkg, X: np.ndarray) -> np.ndarray:
    """The package's model called in-process on model inputs ``X`` (raw outputs)."""
    with torch.no_grad():
        return pkg.model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy()


def window_records(feats, i: int, extra: int = 8):
    """The site's raw records behind test window ``i`` (its lookback plus ``extra`` earlier steps) as JSON records."""
    import pandas as pd

    s = feats.schema
    step = pd.Timedelta(s.step)
    t0 = pd.Timestamp(feats.data.test.target_time[i])
    fr = feats.ds._frame
    recs = fr[(fr[s.site_column] == feats.site_key) & (fr[s.time_column] >= t0 - (s.lookback + extra) * step)
              & (fr[s.time_column] < t0)]
    cols = [c.name for c in s.columns if c.name in recs.columns]
    out = recs[cols].copy()
    out[s.time_column] = out[s.time_column].dt.strftime("%Y-%m-%dT%H:%M:%S")
    return [{k: (None if isinstance(v, float) and np.isnan(v) else (v.item() if hasattr(v, "item") else v))
             for k, v in r.items()} for r in out.to_dict(orient="records")], t0
