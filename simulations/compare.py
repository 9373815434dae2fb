"""``fl-sim compare``: pooled, local-only, federated and DP-federated on the same data and test sets.

One department, one model, one seed. Pooled and local-only are the reference baselines
(:mod:`simulations.baselines`, non-private); federated runs use the real ServerApp and
ClientApp (:mod:`simulations.run`), every node under its own policy and ledger:

* ``federated``: DP off; the nodes' policy is the department's example policy with
  ``require_dp = false`` (written to ``OUT/policies/``; a real department decides that);
* ``federated-dp``: DP-SGD at each target epsilon, under the department's example policy
  unchanged; each run has its own ledgers, so the budgets do not add up across runs.

Metrics: health: accuracy and ROC-AUC on each hospital's test set and on the pooled test set
(the union of the hospitals' test sets, as FLamby); forecasting: MAE and RMSE per site in
original units, and ``MAE vs pooled`` = mean over sites of MAE(method) / MAE(pooled).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tomli_w

from privacy.policy import load_policy
from simulations.baselines import run_baselines
from simulations.run import default_policy, simulate

#: Federated settings per department (health: rounds x local epochs = the pooled epochs; traffic and
#: utility: the best of a few non-private runs of 4-16 rounds, 1-3 local epochs, lr 3e-3/1e-2, batch 32-256).
FED_DEFAULTS: dict[str, dict] = {
    "health": {"num-rounds": 15, "local-epochs": 2, "batch-size": 32, "lr": 1e-2, "strategy": "fedavg"},
    "traffic": {"num-rounds": 8, "local-epochs": 1, "batch-size": 128, "lr": 1e-2, "strategy": "fedavg"},
    "utility": {"num-rounds": 8, "local-epochs": 1, "batch-size": 128, "lr": 1e-2, "strategy": "fedavg"},
}


def write_policy(department: str, out: Path, source: Path | None = None, **changes) -> Path:
    """A policy (``source``, default the department's example) with ``changes`` applied, written to ``out``.

    ``releases`` in ``changes`` is a dict of ``[releases]`` fields to change.
    """
    src = Path(source) if source else default_policy(department)
    data = load_policy(src).model_dump(exclude_none=True)
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# written by fl-sim from {src} with {changes}\n" + tomli_w.dumps(data))
    load_policy(out)  # the written file must validate
    return out


def _fed_rows(department: str, method: str, eps: float | None, res: dict, sites: list[str], task: str) -> list[dict]:
    """Rows of one federated run: the final global model's exact scores on each site's test split.

    The simulated coordinator holds the department's bundled data (``central-data = "bundled"``)
    and scores every round's global model on each site's test split: no node releases any
    metric for the comparison. Epsilon spent is what each node's ledger reported.
    """
    last = next((e for e in reversed(res["rounds"]) if e.get("central-sites")), None)
    if last is None:
        return []
    rows = []
    for site, m in last["central-sites"].items():
        rows.append({"method": method, "epsilon": eps, "site": site, "metrics": dict(m)})
    spent = {}
    for e in res["rounds"]:
        for phase in ("train", "evaluate"):
            for m in ((e.get(phase) or {}).get("nodes") or {}).values():
                if "epsilon" in m:
                    name = sites[int(m["partition-id"])]
                    spent[name] = max(spent.get(name, 0.0), float(m["epsilon"]))
    for r in rows:
        r["epsilon_spent"] = spent.get(r["site"]) if eps is not None else None
    if task == "binary-classification":
        agg = last["central"]
        rows.append({"method": method, "epsilon": eps, "site": "pooled",
                     "metrics": {"accuracy": agg["accuracy"], "roc-auc": agg["roc-auc"], "num-examples": agg["num-examples"]},
                     "epsilon_spent": max(spent.values()) if spent and eps is not None else None})
    return rows


def _baseline_rows(entries: list[dict], task: str) -> list[dict]:
    rows = []
    for e in entries:
        m = e["metrics"]
        if task == "binary-classification":
            metrics = {"accuracy": m["accuracy"], "roc-auc": m["roc_auc"], "num-examples": m["n"]}
        elif e["site"] == "pooled":
            continue
        else:
            metrics = {"mae": m["mae"], "rmse": m["rmse"], "mae-ratio": m["mae_ratio"], "num-examples": m["n"]}
        rows.append({"method": e["method"], "epsilon": e["epsilon"], "site": e["site"], "metrics": metrics,
                     "epsilon_spent": e["epsilon_spent"]})
    return rows


def summarise(rows: list[dict], task: str) -> list[dict]:
    """One line per (method, epsilon): the headline metric and its ratio to pooled."""
    keys = []
    for r in rows:
        k = (r["method"], r["epsilon"])
        if k not in keys:
            keys.append(k)
    out = []
    pooled_site = {r["site"]: r["metrics"] for r in rows if r["method"] == "pooled" and r["epsilon"] is None}
    for method, eps in keys:
        mine = [r for r in rows if r["method"] == method and r["epsilon"] == eps]
        spent = [r["epsilon_spent"] for r in mine if r.get("epsilon_spent") is not None]
        line = {"method": method, "epsilon": eps, "epsilon_spent_max": max(spent) if spent else None}
        if task == "binary-classification":
            pooled = next((r for r in mine if r["site"] == "pooled"), None)
            line["accuracy"] = pooled["metrics"]["accuracy"] if pooled else None
            line["roc-auc"] = pooled["metrics"]["roc-auc"] if pooled else None
            sites = [r for r in mine if r["site"] != "pooled"]
            line["min-site-accuracy"] = min(r["metrics"]["accuracy"] for r in sites) if sites else None
        else:
            ratios = [r["metrics"]["mae"] / pooled_site[r["site"]]["mae"] for r in mine if r["site"] in pooled_site]
            line["mae-vs-pooled"] = float(np.mean(ratios)) if ratios else None
            line["mae-vs-naive"] = float(np.mean([r["metrics"]["mae-ratio"] for r in mine]))
        out.append(line)
    return out


def run_compare(department: str, out: Path, *, epsilons: tuple[float, ...] = (1.0, 3.0, 8.0), model: str | None = None,
                engine: str = "inprocess", seed: int = 0, overrides: dict | None = None, overwrite: bool = False,
                on_stage: Callable[[str], None] | None = None, on_round: Callable[[dict], None] | None = None) -> dict:
    """Run the whole comparison for one department and write ``OUT/results.json``.

    Parameters
    ----------
    department : {"health", "traffic", "utility"}
    out : Path
        Output folder (one sub-folder per federated run, with its report and ledgers).
    epsilons : tuple of float
        Target epsilons of the DP-federated runs (per node, whole run).
    model : str, optional
        Model kind (default: the department's first).
    engine : {"inprocess", "ray"}
        Simulation engine for the federated runs (same ServerApp/ClientApp either way).
    seed : int
    overrides : dict, optional
        Run-config values replacing :data:`FED_DEFAULTS` (e.g. ``{"num-rounds": 3}``).
    overwrite : bool
        Replace earlier federated run folders in ``out`` (their ledgers would otherwise
        carry spent budget into this comparison).
    on_stage, on_round : callable, optional
        Progress callbacks.

    Returns
    -------
    dict
        ``{"meta", "summary", "rows"}`` as written to ``OUT/results.json``.
    """
    from clients.datasets import load_department
    from shared_models import model_kinds

    import torch

    # one intra-op thread for every method (pooled, local, each simulated node): small models
    # gain nothing from more, and slow down badly when other processes share the cores
    torch.set_num_threads(1)
    out = Path(out)
    runs = [("federated", None)] + [("federated-dp", float(e)) for e in epsilons]
    names = [m if e is None else f"{m}-eps{e:g}" for m, e in runs]
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out}: run folder(s) {', '.join(existing)} exist from an earlier comparison (their "
                              "ledgers hold spent budget). Fix: choose another --out, or pass --overwrite to replace them")
    for n in existing:
        shutil.rmtree(out / n)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_department(department, seed=seed)
    task = ds.schema.task
    model = model or model_kinds(department)[0]
    t0 = time.perf_counter()
    if on_stage:
        on_stage("pooled and local-only baselines")
    base = run_baselines(department, epsilons=[], kinds=[model], seed=seed)
    rows = _baseline_rows(base, task)
    fed = {**FED_DEFAULTS[department], **(overrides or {})}
    nodp_policy = write_policy(department, out / "policies" / f"{department}-no-dp.toml", require_dp=False)
    timings = {}
    for method, eps in runs:
        name = method if eps is None else f"{method}-eps{eps:g}"
        if on_stage:
            on_stage(name)
        cfg = {"department": department, "model": model, "seed": seed, "run-dir": str(out / name), **fed,
               "dp": eps is not None, "target-epsilon": eps if eps is not None else 1.0, "run-id": name,
               "central-data": "bundled", "fraction-evaluate": 0.0}
        if eps is None:
            cfg["policy"] = str(nodp_policy)
        t1 = time.perf_counter()
        res = simulate(cfg, engine=engine, on_round=on_round)
        timings[name] = time.perf_counter() - t1
        from simulations.report import write_report_safely

        write_report_safely(out / name, ds.sites, "accuracy" if task == "binary-classification" else "mae-ratio")
        rows += _fed_rows(department, method, eps, res, ds.sites, task)
        if res.get("refused"):
            rows.append({"method": method, "epsilon": eps, "site": "refusals", "metrics": {},
                         "refused": res["refused"], "epsilon_spent": None})
    rows = [r for r in rows if r["site"] != "refusals"] + [r for r in rows if r["site"] == "refusals"]
    result = {
        "meta": {"command": "fl-sim compare", "department": department, "model": model, "seed": seed,
                 "epsilons": list(epsilons), "federated": fed, "engine": engine, "seconds": time.perf_counter() - t0,
                 "seconds_per_run": timings},
        "summary": summarise([r for r in rows if r["site"] != "refusals"], task),
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    from simulations.report import write_report_safely  # DIR/report.html: per site local-only vs federated, the gain

    write_report_safely(out, ds.sites, "accuracy" if task == "binary-classification" else "mae-ratio")
    return result
