"""Non-federated reference results: pooled and local-only training, with and without DP-SGD.

Every later federated result is compared with these. Pooled = all sites' training data in one
place (what federation tries to approach without moving data); local = each site alone.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import ConcatDataset, TensorDataset

from citydata import DepartmentDataset, load_department
from clients.selection import fit_selected, validation_split
from clients.training import TrainConfig, fit
from shared_models.scoring import classification_metrics, evaluate, predict
from privacy.dp import DPSettings
from shared_models import build_model, default_model_config, model_kinds

#: Default local-training hyper-parameters per (department, model kind). ``epochs`` is what a DP-SGD
#: baseline trains (fixed: part of its accounted release); a non-private baseline trains as many
#: epochs, up to :data:`SELECT_MAX_EPOCHS`, as its validation split favours (:mod:`clients.selection`).
DEFAULT_TRAIN: dict[tuple[str, str], TrainConfig] = {
    ("health", "heart-mlp"): TrainConfig(epochs=30, batch_size=32, lr=1e-2),
    ("traffic", "gru"): TrainConfig(epochs=4, batch_size=128, lr=3e-3),
    ("traffic", "patchtst"): TrainConfig(epochs=4, batch_size=128, lr=3e-3),
    ("utility", "gru"): TrainConfig(epochs=6, batch_size=64, lr=3e-3),
    ("utility", "patchtst"): TrainConfig(epochs=6, batch_size=64, lr=1e-3),
}

#: The most epochs a non-private baseline's validation search tries.
SELECT_MAX_EPOCHS = 60


@dataclass
class Job:
    """One baseline training job (what the progress bar counts)."""

    model: str
    method: str
    epsilon: float | None
    site: str | None  # None = pooled


def _concat(parts: Iterable[TensorDataset]) -> TensorDataset:
    parts = list(parts)
    return TensorDataset(*(torch.cat([p.tensors[i] for p in parts]) for i in range(2)))


def plan(dataset: DepartmentDataset, kinds: list[str], epsilons: list[float], pooled_dp: bool = True) -> list[Job]:
    """All jobs of a baseline run, in order (``pooled_dp=False``: no pooled DP job)."""
    jobs = []
    for kind in kinds:
        for eps in [None, *epsilons]:
            if eps is None or pooled_dp:
                jobs.append(Job(kind, "pooled", eps, None))
            jobs += [Job(kind, "local", eps, s) for s in dataset.sites]
    return jobs


def check_kinds(department: str, kinds: list[str] | None) -> list[str]:
    """``kinds``, or all the department's model kinds when empty; :class:`ValueError` for a kind it does not ship.

    Checked before the department's data is loaded (``fl-sim baselines --model`` checks the same, as an
    input error).
    """
    shipped = model_kinds(department)
    for kind in kinds or ():
        if kind not in shipped:
            raise ValueError(f"{kind!r} is not a {department} model; choose one of {', '.join(shipped)}")
    return list(kinds) if kinds else shipped


def _entry(dept, job, site, metrics, fitres, primary):
    if primary not in metrics or metrics[primary] != metrics[primary]:  # forecasting "pooled" row
        primary = "mae_ratio"
    return {
        "department": dept,
        "model": job.model,
        "method": job.method,
        "epsilon": job.epsilon,
        "site": site,
        "metric": primary,
        "value": metrics.get(primary),
        "metrics": metrics,
        "epsilon_spent": None if fitres is None else fitres.epsilon,
        "delta": None if fitres is None else fitres.delta,
        "noise_multiplier": None if fitres is None else fitres.noise_multiplier,
    }


def run_baselines(
    department: str,
    *,
    epsilons: list[float] = (3.0,),
    kinds: list[str] | None = None,
    data: str | None = None,
    seed: int = 0,
    epochs: int | None = None,
    max_grad_norm: float = 1.0,
    pooled_dp: bool = True,
    site_delta: Callable[[int], float] | None = None,
    on_job: Callable[[Job], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[dict]:
    """Train pooled and local-only baselines for one department.

    Parameters
    ----------
    department : {"health", "traffic", "utility"}
    epsilons : list of float
        Target epsilons for the DP-SGD runs (delta = 1/(10·n), n = that job's training records).
    kinds : list of str, optional
        Model kinds (default: all shipped for the department).
    data : str, optional
        Operator file in the department schema instead of the bundled data.
    seed : int
    epochs : int, optional
        Train every job exactly this many epochs (no validation search).
    max_grad_norm : float
        Per-sample clipping norm for DP runs.
    pooled_dp : bool
        Also train the pooled model under DP at each epsilon (``False``: local-only DP rows only).
    site_delta : callable, optional
        ``site_delta(n)``: the delta of a DP job on ``n`` records (e.g. a department policy's
        :meth:`~privacy.policy.PrivacyPolicy.site_delta`, as its nodes use); default ``1/(10·n)``.
    on_job, on_epoch : callable, optional
        Progress callbacks.

    Returns
    -------
    list of dict
        One entry per (model, method, epsilon, site), ``site="pooled"`` for the pooled test set;
        ``metrics["epochs"]``: the epochs trained (non-private without ``epochs``: chosen on the
        sites' validation splits, :func:`clients.selection.fit_selected`, at most
        :data:`SELECT_MAX_EPOCHS`; a pooled model's split is the union of its sites' splits).

    Raises
    ------
    ValueError
        A kind in ``kinds`` that the department does not ship (:func:`check_kinds`), before any data is loaded.
    """
    kinds = check_kinds(department, kinds)
    ds = load_department(department, data, seed=seed)
    schema = ds.schema
    task = schema.task
    sites = {s: ds.site_data(s) for s in ds.sites}
    primary = "accuracy" if task == "binary-classification" else "mae"
    results: list[dict] = []
    for job in plan(ds, kinds, list(epsilons), pooled_dp):
        if on_job:
            on_job(job)
        cfg = copy.copy(DEFAULT_TRAIN[(department, job.model)])
        cfg.seed = seed
        if epochs:
            cfg.epochs = epochs
        torch.manual_seed(seed)
        model = build_model(default_model_config(schema, job.model))
        train_sites = list(sites) if job.site is None else [job.site]
        train = _concat(sites[s].train.tensors() for s in train_sites)
        dp = None if job.epsilon is None else DPSettings(
            target_epsilon=job.epsilon, max_grad_norm=max_grad_norm,
            delta=site_delta(len(train)) if site_delta else None)
        t0 = time.perf_counter()
        if dp is None and not epochs:
            cfg.epochs = SELECT_MAX_EPOCHS
            parts = [validation_split(sites[s].train.tensors(), task, seed=seed) for s in train_sites]
            split = (_concat(p[0] for p in parts), _concat(p[1] for p in parts))
            fitres = fit_selected(model, train, task, cfg, split=split, on_epoch=on_epoch)
        else:
            fitres = fit(model, train, task, cfg, dp, on_epoch=on_epoch)
        seconds = time.perf_counter() - t0
        trained = fitres.selected_epochs if fitres.selected_epochs is not None else cfg.epochs
        per_site = {s: evaluate(model, sites[s], task) for s in train_sites}
        for s, m in per_site.items():
            m["train_seconds"] = seconds
            m["epochs"] = trained
            results.append(_entry(department, job, s, m, fitres if dp else None, primary))
        # the "pooled" row: pooled test set for classification, mean skill for forecasting
        if job.site is None:
            results.append(_entry(department, job, "pooled", _pooled(per_site, sites, model, task), fitres if dp else None, primary))
    # local-only "pooled" rows: each site's own model on its own test set, combined
    for kind in kinds:
        for eps in [None, *epsilons]:
            rows = [r for r in results if r["model"] == kind and r["method"] == "local" and r["epsilon"] == eps]
            if rows:
                results.append(_combine_local(department, kind, eps, rows, task, primary))
    return results


def _pooled(per_site, sites, model, task) -> dict:
    if task == "binary-classification":
        y = np.concatenate([sites[s].test.y for s in per_site])
        logits = np.concatenate([predict(model, sites[s].test.X) for s in per_site])
        return classification_metrics(y, logits)
    return _mean_forecast(per_site.values())


def _mean_forecast(metrics: Iterable[dict]) -> dict:
    metrics = list(metrics)
    return {
        "mae_ratio": float(np.mean([m["mae_ratio"] for m in metrics])),
        "n": int(sum(m["n"] for m in metrics)),
        "note": "mean over sites of MAE / best naive MAE (sites have different units)",
    }


def _combine_local(dept, kind, eps, rows, task, primary) -> dict:
    if task == "binary-classification":
        n = sum(r["metrics"]["n"] for r in rows)
        acc = sum(r["metrics"]["accuracy"] * r["metrics"]["n"] for r in rows) / n
        metrics = {"accuracy": acc, "roc_auc": float(np.nanmean([r["metrics"]["roc_auc"] for r in rows])), "n": n,
                   "note": "each hospital's own model on its own test set; accuracy pooled over test sets, ROC-AUC averaged"}
    else:
        metrics = _mean_forecast(r["metrics"] for r in rows)
    if task != "binary-classification":
        primary = "mae_ratio"
    return {"department": dept, "model": kind, "method": "local", "epsilon": eps, "site": "pooled", "metric": primary,
            "value": metrics.get(primary), "metrics": metrics, "epsilon_spent": None, "delta": None, "noise_multiplier": None}


#: The files ``fl-sim baselines`` writes in its --out folder, at the end: results.json, through results.json.tmp.
END_FILES = ("results.json", "results.json.tmp")


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON to ``path`` whole or not at all (``PATH.tmp``, then renamed; no ``.tmp`` left on failure).

    Parameters
    ----------
    path : Path
        The file; its folder must exist.
    data
        JSON-able (numbers numpy gives are written as floats).
    """
    from server.artefacts import write_atomic

    write_atomic(Path(path), json.dumps(data, indent=2, default=float).encode())


def write_results(results: list[dict], out: Path, meta: dict) -> Path:
    """Write ``results.json`` whole or not at all (:func:`write_json`) and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    write_json(path, {"meta": meta, "results": results})
    return path
