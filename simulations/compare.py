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
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tomli_w

from privacy.policy import load_policy
from simulations.baselines import DEFAULT_TRAIN, SELECT_MAX_EPOCHS, run_baselines, write_json
from simulations.run import default_policy, simulate

#: Federated settings per department (health: rounds x local epochs = the pooled epochs; traffic and
#: utility: the best of a few non-private runs of 4-16 rounds, 1-3 local epochs, lr 3e-3/1e-2, batch 32-256).
#: Non-private personalisation: at most as many epochs as a non-private baseline's search
#: (simulations.baselines.SELECT_MAX_EPOCHS) at that baseline's batch size, the count chosen on each node's
#: validation split like the baselines' (clients.selection): the same rule on both sides. Measured on seed 0
#: (README, fl-sim compare, "How the method was chosen"): the whole model at the baseline's learning rate,
#: but health's output layer only (the whole model lost 1 of Switzerland's 41 test patients to local-only)
#: and traffic at a third of it (1e-3: 5 of 22 detectors below local-only; 3e-3: 9; utility at 1e-3 lost
#: 7.6 % at England & Wales, which needs every step it gets).
FED_DEFAULTS: dict[str, dict] = {
    "health": {"num-rounds": 15, "local-epochs": 2, "batch-size": 32, "lr": 1e-2, "strategy": "fedavg",
               "personalise-epochs": 60, "personalise-lr": 1e-2, "personalise-layers": "head"},
    "traffic": {"num-rounds": 8, "local-epochs": 1, "batch-size": 128, "lr": 1e-2, "strategy": "fedavg",
                "personalise-epochs": 60, "personalise-lr": 1e-3, "personalise-layers": "all", "personalise-batch-size": 128},
    "utility": {"num-rounds": 8, "local-epochs": 1, "batch-size": 128, "lr": 1e-2, "strategy": "fedavg",
                "personalise-epochs": 60, "personalise-lr": 3e-3, "personalise-layers": "all", "personalise-batch-size": 64},
}

#: Changes to :data:`FED_DEFAULTS` for the DP-federated runs only (``federated-dp`` and its
#: ``+personalised`` rows; the non-private run and leave-one-site-out keep :data:`FED_DEFAULTS`).
#: DP personalisation trains a fixed, accounted number of epochs (no validation search).
FED_DP_DEFAULTS: dict[str, dict] = {
    # health: batch 64 (the noise on the mean clipped gradient, sigma / batch, is lower at the same
    # epsilon; Cleveland at epsilon 3: 4.8 / 64 vs 3.4 / 32), and the whole model personalised for as
    # many epochs as the local-only DP baseline trains (30, simulations.baselines), so each node keeps
    # half its steps for its own model (README, fl-sim compare, "How the method was chosen")
    "health": {"batch-size": 64, "personalise-layers": "all", "personalise-epochs": 30, "personalise-lr": 1e-2},
    # traffic: DP-SGD clipping norm 0.1 and the whole model personalised 20 epochs, the best of seven DP
    # settings (the old one included) at epsilon 3, seed 0 (README, fl-sim compare, "Traffic under DP"); the output
    # layer for 3 epochs at clipping 1 (until 2026-12-07) left three detectors below local-only DP
    "traffic": {"clipping-norm": 0.1, "personalise-epochs": 20, "personalise-lr": 1e-2, "personalise-layers": "all",
                "personalise-batch-size": 0},
    # utility: the best of 13 DP settings measured at epsilon 3, seed 0 (README, fl-sim compare): at lr
    # 1e-2 the DP global model did not improve after round 1 (noisy Adam steps); a DP-SGD clipping norm
    # of 0.1 (the policy allows at most 1; the noise scales with it) and 10 personalisation epochs
    # lowered every grid's personalised DP error
    "utility": {"lr": 3e-3, "clipping-norm": 0.1, "personalise-epochs": 10, "personalise-lr": 3e-3,
                "personalise-layers": "all", "personalise-batch-size": 0},
}


def federated_settings(department: str, dp: bool, overrides: dict | None = None, own_model: str | None = None) -> dict:
    """The run config of a comparison's federated runs: :data:`FED_DEFAULTS`, under DP with
    :data:`FED_DP_DEFAULTS` on top, then ``overrides`` (which win for both).

    ``own_model`` (a model kind; non-private runs only): each node's own-records candidate
    (``personalise-own-lr``, :func:`clients.personalise.choose_kept`) is trained like that kind's
    local-only baseline (:data:`simulations.baselines.DEFAULT_TRAIN`'s learning rate and batch size).
    """
    own = {}
    if own_model and not dp:
        base = DEFAULT_TRAIN[(department, own_model)]
        own = {"personalise-own-lr": base.lr, "personalise-own-batch-size": base.batch_size}
    return {**FED_DEFAULTS[department], **own, **(FED_DP_DEFAULTS.get(department, {}) if dp else {}), **(overrides or {})}


def run_name(method: str, epsilon: float | None) -> str:
    """The folder name and run ID of one of a comparison's federated runs: ``federated``, ``federated-dp-eps3``.

    Parameters
    ----------
    method : str
        ``"federated"`` or ``"federated-dp"``.
    epsilon : float or None
        The run's target epsilon (None: no DP), written with ``:g`` (6 significant digits).

    Returns
    -------
    str
    """
    return method if epsilon is None else f"{method}-eps{epsilon:g}"


def same_run_epsilons(epsilons) -> list[tuple[float, float, str]]:
    """Target epsilons that would share one DP run: the same value twice, or values that name the same run.

    Two DP runs whose names (:func:`run_name`) are equal would share one folder, run ID and
    ledgers: the second would find the first's budget spent (and train at a huge noise), and
    overwrite its model and results.

    Parameters
    ----------
    epsilons : iterable of float
        The comparison's target epsilons, in the order given.

    Returns
    -------
    list of (float, float, str)
        ``(first, later, run name)`` for each value whose run an earlier value already names; empty if none.
    """
    seen: dict[str, float] = {}
    clashes = []
    for e in epsilons:
        name = run_name("federated-dp", float(e))
        if name in seen:
            clashes.append((seen[name], float(e), name))
        else:
            seen[name] = float(e)
    return clashes


def describe_same_run_epsilons(clashes: list[tuple[float, float, str]]) -> str:
    """``3.0 is given twice (run federated-dp-eps3)`` / ``3.0 and 3.0000001 name the same run (...)``, joined by ``; ``."""
    return "; ".join((f"{a!r} is given twice" if a == b else f"{a!r} and {b!r} name the same run")
                     + f" (folder and run ID {name}: the later run would reuse the earlier one's ledgers and spent budget)"
                     for a, b, name in clashes)


#: The files a comparison writes in its folder at the end (after all the training): results.json (through
#: results.json.tmp) and the report (report.html, compare.png).
END_FILES = ("results.json", "results.json.tmp", "report.html", "compare.png")


def loo_name(site: str) -> str:
    """The folder (and run ID) of the leave-one-site-out run without ``site``: ``loo-without-VA_Long_Beach``."""
    return f"loo-without-{''.join(c if c.isalnum() else '_' for c in site)}"


def loo_sites(sites: list[str], loo: bool, engine: str) -> list[str]:
    """The sites a comparison runs a leave-one-site-out run without (none unless ``loo``, the in-process engine and
    at most :data:`LOO_MAX_SITES` sites)."""
    return list(sites) if loo and engine == "inprocess" and len(sites) <= LOO_MAX_SITES else []


def check_outputs(out: Path, department: str, epsilons, *, overwrite: bool = False, loo_without=()) -> None:
    """Refuse, before anything is trained or created, a comparison folder the comparison could not write to the end.

    Checked: the files written at the end (:data:`END_FILES`) and the non-private policy
    (``policies/<department>-no-dp.toml``) must not be folders; ``policies`` and the run folders
    (``federated``, ``federated-dp-eps<e>``, ``loo-without-<site>`` for ``loo_without``) must not be
    files; and the federated run folders must not be there from an earlier comparison (their
    ledgers hold spent budget) unless ``overwrite``.

    Parameters
    ----------
    out : Path
        The comparison's folder (need not exist).
    department : str
    epsilons : iterable of float
        The DP runs' target epsilons.
    overwrite : bool
        Earlier run folders will be replaced.
    loo_without : iterable of str
        The sites of the leave-one-site-out runs (:func:`loo_sites`).

    Raises
    ------
    FileExistsError
        ``OUT/...: what is wrong; fix: ...`` (the first problem found).
    """
    out = Path(out)
    fix = "remove or rename it, or choose another --out"
    for name in (*END_FILES, f"policies/{department}-no-dp.toml"):
        path = out / name
        if path.exists() and not path.is_file():
            raise FileExistsError(f"{path} is a folder, not a file: the comparison writes {name} there (after all its "
                                  f"training); fix: {fix}")
    names = [run_name("federated", None), *(run_name("federated-dp", float(e)) for e in epsilons)]
    for name in ("policies", *names, *(loo_name(s) for s in loo_without)):
        path = out / name
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} is a file, not a folder: the comparison makes its {name} folder there; "
                                  f"fix: {fix}")
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out}: run folder(s) {', '.join(existing)} exist from an earlier comparison (their "
                              "ledgers hold spent budget); fix: choose another --out, or pass --overwrite to replace them")


def run_config(department: str, seed: int, epsilon: float | None, run_dir: Path, settings: dict,
               policy: Path | None = None, *, model: str | None = None) -> dict:
    """The run config of one of a comparison's federated runs, scored by the simulated coordinator.

    ``settings`` is :func:`federated_settings`' result; ``epsilon`` ``None`` = no DP, with ``policy``
    the nodes' policy allowing it (:func:`write_policy` with ``require_dp=False``). The coordinator
    holds the bundled data (``central-data = "bundled"``) and asks no node for an evaluation.
    """
    cfg = {"department": department, "seed": seed, "run-dir": str(run_dir), "run-id": Path(run_dir).name,
           **settings, "dp": epsilon is not None, "target-epsilon": epsilon if epsilon is not None else 1.0,
           "central-data": "bundled", "fraction-evaluate": 0.0}
    if model:
        cfg["model"] = model
    if policy is not None:
        cfg["policy"] = str(policy)
    return cfg


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


def _personalised_rows(ds, method: str, eps: float | None, res: dict, run_dir: Path, task: str) -> list[dict]:
    """Rows ``federated+personalised``: each node's kept model scored on its own site's test split.

    In simulation the harness plays every node, so it may read the model each node kept
    (:func:`clients.personalise.personalised_path`, under the run's ledger folder); a department
    node never sends it. Epsilon spent is the node's ledger total after the personalisation.
    """
    from clients.personalise import personalised_kept, personalised_model, personalised_scores
    from shared_models.scoring import classification_metrics, evaluation_metrics, predict
    from shared_models import build_model, default_model_config

    done = (res.get("personalise") or {}).get("nodes") or {}
    spent = {ds.sites[int(m["partition-id"])]: float(m["epsilon"]) for m in done.values() if "partition-id" in m}
    name = f"{method}+personalised"
    rows, ys, logits = [], [], []
    for s in ds.sites:
        path = run_dir / "ledgers" / "personalised" / f"{ds.schema.department}-{s}" / f"{res['run_id']}.safetensors"
        if s not in spent or not path.exists():
            continue
        model = personalised_model(path, lambda: build_model(default_model_config(ds.schema, res["config"]["model"])), task)
        site = ds.site_data(s)
        metrics = evaluation_metrics(model, site, task)
        scores = personalised_scores(path)
        if scores:  # the node weighed its own-records candidate (non-private, personalise-own-lr): say what it kept
            metrics.update({"kept": personalised_kept(path), **scores})
        rows.append({"method": name, "epsilon": eps, "site": s, "metrics": metrics,
                     "epsilon_spent": spent[s] if eps is not None else None})
        if task == "binary-classification" and len(site.test):
            ys.append(site.test.y)
            logits.append(predict(model, site.test.X))
    if task == "binary-classification" and ys:
        m = classification_metrics(np.concatenate(ys), np.concatenate(logits))
        rows.append({"method": name, "epsilon": eps, "site": "pooled",
                     "metrics": {"accuracy": m["accuracy"], "roc-auc": m["roc_auc"], "num-examples": m["n"]},
                     "epsilon_spent": max(spent.values()) if spent and eps is not None else None,
                     "note": "each hospital's personalised model on its own test set"})
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
        if "epochs" in m:
            metrics["epochs"] = m["epochs"]
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


#: Leave-one-site-out runs only for departments with at most this many sites (one extra
#: non-private federated run per site; traffic's 22 detectors would cost 22 runs).
LOO_MAX_SITES = 6


def _headline(task: str) -> tuple[str, bool]:
    """The per-site headline metric and whether higher is better."""
    return ("accuracy", True) if task == "binary-classification" else ("mae", False)


def _gain(task: str, base: float | None, new: float | None) -> float | None:
    """Gain of ``new`` over ``base``: accuracy points (classification), relative MAE reduction (forecasting)."""
    if base is None or new is None:
        return None
    return float(new - base) if task == "binary-classification" else float(1.0 - new / base) if base else None


def per_site_value(rows: list[dict], sites: list[str], task: str, epsilons: tuple[float, ...],
                   loo: dict[str, float] | None = None) -> dict:
    """Per site: its metric local-only, federated and personalised (non-private and at each epsilon), the gains.

    Parameters
    ----------
    rows : list of dict
        The comparison's rows.
    sites : list of str
    task : str
    epsilons : tuple of float
    loo : dict, optional
        Leave-one-site-out contribution per site (:func:`leave_one_out`).

    Returns
    -------
    dict
        ``metric``, ``higher_is_better``, ``gain`` (how gains are measured), ``sites`` (one entry
        per site: ``local``, ``federated``, ``personalised``, ``gain-federated``,
        ``gain-personalised``, ``kept`` (the personalised row's model: ``"federated"`` = fine-tuned
        from the federated model, ``"own"`` = the node's own-records candidate, ``"average"`` = the mean of those two models'
        predictions, ``None`` = no row),
        ``dp`` per epsilon with the same keys, ``loo-contribution``),
        ``worst-site`` (lowest personalised gain, non-private) and ``worst-site-dp`` per epsilon.
    """
    metric, higher = _headline(task)
    value = {(r["method"], r["epsilon"], r["site"]): r["metrics"].get(metric) for r in rows if r.get("metrics")}
    kept = {(r["epsilon"], r["site"]): r["metrics"]["kept"] for r in rows
            if r["method"].endswith("+personalised") and "kept" in (r.get("metrics") or {})}

    def entry(eps):
        local = value.get(("local", eps, s))
        fed = value.get(("federated" if eps is None else "federated-dp", eps, s))
        pers = value.get(("federated+personalised" if eps is None else "federated-dp+personalised", eps, s))
        return {"local": local, "federated": fed, "personalised": pers, "gain-federated": _gain(task, local, fed),
                "gain-personalised": _gain(task, local, pers), "kept": kept.get((eps, s))}

    out_sites = []
    for s in sites:
        e = {"site": s, **entry(None), "dp": {f"{eps:g}": entry(eps) for eps in epsilons}}
        if loo is not None:
            e["loo-contribution"] = loo.get(s)
        out_sites.append(e)

    def worst(get):
        cands = [(get(e), e["site"]) for e in out_sites if get(e) is not None]
        return None if not cands else {"site": min(cands)[1], "gain": min(cands)[0]}

    return {"metric": metric, "higher_is_better": higher,
            "gain": ("accuracy points over local-only" if higher else "relative MAE reduction over local-only "
                     "(1 - MAE / MAE local-only)"),
            "sites": out_sites,
            "worst-site": worst(lambda e: e["gain-personalised"]),
            "worst-site-dp": {f"{eps:g}": worst(lambda e, k=f"{eps:g}": e["dp"][k]["gain-personalised"]) for eps in epsilons}}


def loo_personalise_epochs(cfg: dict) -> int:
    """``personalise-epochs`` of a leave-one-site-out run: 0 (its models are not personalised), except 1
    when the reference run's nodes weigh an own-records candidate.

    Those nodes hold their validation split out of the rounds (:func:`clients.personalise.round_records`),
    and do so only when the run personalises; one epoch at most makes the runs without a site train
    their rounds on the same records as the reference, at little cost (their personalised models are not used).
    """
    from clients.personalise import weighs_own

    return 1 if weighs_own(cfg, bool(cfg.get("dp"))) else 0


def leave_one_out(department: str, out: Path, cfg: dict, sites: list[str], task: str, reference: dict,
                  engine: str = "inprocess") -> dict[str, float]:
    """Non-private leave-one-site-out contribution of each site to the others.

    For each site ``s``, one non-private federated run (the comparison's settings, no personalisation
    but see :func:`loo_personalise_epochs`) without ``s``; its contribution is the mean over the other sites ``t`` of
    accuracy(all) - accuracy(without s) (classification) or MAE(without s) / MAE(all) - 1
    (forecasting): positive = the others do better with ``s`` in the federation.

    ``reference`` maps each site to its metrics in the all-sites non-private run.
    """
    metric, _ = _headline(task)
    contrib = {}
    for s in sites:
        name = loo_name(s)
        if (out / name).exists():
            shutil.rmtree(out / name)
        run = {**cfg, "run-dir": str(out / name), "run-id": name, "personalise-epochs": loo_personalise_epochs(cfg)}
        res = simulate(run, engine="inprocess", only_sites=[t for t in sites if t != s])
        last = next((e for e in reversed(res["rounds"]) if e.get("central-sites")), None)
        if last is None:
            continue
        deltas = []
        for t in sites:
            if t == s or t not in reference or t not in last["central-sites"]:
                continue
            a, b = reference[t][metric], last["central-sites"][t][metric]
            deltas.append(a - b if task == "binary-classification" else b / a - 1.0)
        contrib[s] = float(np.mean(deltas)) if deltas else None
    return contrib


def run_compare(department: str, out: Path, *, epsilons: tuple[float, ...] = (1.0, 3.0, 8.0), model: str | None = None,
                engine: str = "inprocess", seed: int = 0, overrides: dict | None = None, overwrite: bool = False,
                on_stage: Callable[[str], None] | None = None, on_round: Callable[[dict], None] | None = None,
                loo: bool = True, own: bool = True) -> dict:
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
        Run-config values replacing :data:`FED_DEFAULTS` and :data:`FED_DP_DEFAULTS` (e.g.
        ``{"num-rounds": 3}``), for the non-private and the DP runs alike.
    overwrite : bool
        Replace earlier federated run folders in ``out`` (their ledgers would otherwise
        carry spent budget into this comparison).
    on_stage, on_round : callable, optional
        Progress callbacks.
    loo : bool
        Leave-one-site-out contributions (non-private; only with the in-process engine and at most
        :data:`LOO_MAX_SITES` sites).
    own : bool
        Non-private personalisation keeps the better, on each node's validation split, of the
        fine-tuned federated model and a model of the node's own records trained like the local-only
        baseline (:func:`clients.personalise.choose_kept`); rows say which (``metrics.kept``).

    Returns
    -------
    dict
        ``{"meta", "summary", "rows"}`` as written to ``OUT/results.json``; ``meta["stopped"]``
        maps each federated run that ended before its last round (``status: stopped: ...``) to
        ``{"status", "num-rounds"}`` (its rows score the model it had then).

    Raises
    ------
    ValueError
        Two of ``epsilons`` name the same DP run (:func:`same_run_epsilons`), before anything is created.
    FileExistsError
        Run folders of an earlier comparison are in ``out`` and ``overwrite`` is False, or a path the
        comparison writes is a folder where it writes a file or the reverse (:func:`check_outputs`),
        before anything is trained.
    """
    from citydata import load_department
    from shared_models import model_kinds

    import torch

    # one intra-op thread for every method (pooled, local, each simulated node): small models
    # gain nothing from more, and slow down badly when other processes share the cores
    torch.set_num_threads(1)
    from privacy import SEED_FROM_JOB_ENV

    # one machine, no adversary: DP noise follows the seed, so the local-only DP baselines are
    # reproducible too (simulate() sets the same for the federated runs; see privacy.dp.dp_seeds)
    os.environ.setdefault(SEED_FROM_JOB_ENV, "1")
    out = Path(out)
    clashes = same_run_epsilons(epsilons)
    if clashes:
        raise ValueError(f"epsilons: {describe_same_run_epsilons(clashes)}; fix: give each epsilon once")
    runs = [("federated", None)] + [("federated-dp", float(e)) for e in epsilons]
    names = [run_name(m, e) for m, e in runs]
    ds = load_department(department, seed=seed)
    check_outputs(out, department, epsilons, overwrite=overwrite, loo_without=loo_sites(ds.sites, loo, engine))
    for n in names:
        if (out / n).exists():
            shutil.rmtree(out / n)
    out.mkdir(parents=True, exist_ok=True)
    task = ds.schema.task
    model = model or model_kinds(department)[0]
    t0 = time.perf_counter()
    if on_stage:
        on_stage("pooled and local-only baselines")
    # local-only DP at the same epsilons (what a site gets alone under the same privacy); no pooled DP
    policy = load_policy(default_policy(department))  # the nodes' delta: local-only DP uses the same
    base = run_baselines(department, epsilons=list(epsilons), kinds=[model], seed=seed, pooled_dp=False,
                         site_delta=policy.site_delta)
    rows = _baseline_rows(base, task)
    fed = federated_settings(department, False, overrides, own_model=model if own else None)
    fed_dp = federated_settings(department, True, overrides)
    nodp_policy = write_policy(department, out / "policies" / f"{department}-no-dp.toml", require_dp=False)
    timings = {}
    stopped = {}  # federated run -> its status, for each run that ended before its last round
    for method, eps in runs:
        name = run_name(method, eps)
        if on_stage:
            on_stage(name)
        cfg = run_config(department, seed, eps, out / name, fed if eps is None else fed_dp,
                         nodp_policy if eps is None else None, model=model)
        t1 = time.perf_counter()
        res = simulate(cfg, engine=engine, on_round=on_round)
        timings[name] = time.perf_counter() - t1
        if str(res.get("status", "")).startswith("stopped"):  # its rows score the model it had when it stopped
            stopped[name] = {"status": str(res["status"]), "num-rounds": int(cfg["num-rounds"])}
        from simulations.report import write_report_safely

        write_report_safely(out / name, ds.sites, "accuracy" if task == "binary-classification" else "mae-ratio")
        rows += _fed_rows(department, method, eps, res, ds.sites, task)
        if (fed if eps is None else fed_dp).get("personalise-epochs"):
            rows += _personalised_rows(ds, method, eps, res, out / name, task)
        if res.get("refused"):
            rows.append({"method": method, "epsilon": eps, "site": "refusals", "metrics": {},
                         "refused": res["refused"], "epsilon_spent": None})
    rows = [r for r in rows if r["site"] != "refusals"] + [r for r in rows if r["site"] == "refusals"]
    loo_note = None
    contrib = None
    if not loo:
        loo_note = "not run (loo=False)"
    elif not loo_sites(ds.sites, loo, engine):
        loo_note = f"not run: needs the in-process engine and at most {LOO_MAX_SITES} sites ({len(ds.sites)} here)"
    else:
        if on_stage:
            on_stage("leave-one-site-out (non-private)")
        reference = {r["site"]: r["metrics"] for r in rows if r["method"] == "federated" and r["epsilon"] is None}
        t1 = time.perf_counter()
        base_cfg = {"department": department, "model": model, "seed": seed, **fed, "dp": False, "target-epsilon": 1.0,
                    "central-data": "bundled", "fraction-evaluate": 0.0, "policy": str(nodp_policy)}
        contrib = leave_one_out(department, out, base_cfg, ds.sites, task, reference)
        timings["leave-one-site-out"] = time.perf_counter() - t1
        loo_note = "non-private federated runs without each site; see leave_one_out"
    value = per_site_value(rows, ds.sites, task, tuple(epsilons), contrib)
    value["loo-note"] = loo_note
    result = {
        "meta": {"command": "fl-sim compare", "department": department, "model": model, "seed": seed,
                 "epsilons": list(epsilons), "federated": fed, "federated-dp": fed_dp, "engine": engine,
                 "baselines": {"non-private-epochs": f"chosen on each site's validation split, at most {SELECT_MAX_EPOCHS} "
                                                     "(clients.selection; rows' metrics.epochs)",
                               "dp-epochs": DEFAULT_TRAIN[(department, model)].epochs},
                 "seconds": time.perf_counter() - t0,
                 "seconds_per_run": timings, "stopped": stopped},
        "summary": summarise([r for r in rows if r["site"] != "refusals"], task),
        "per_site": value,
        "rows": rows,
    }
    write_json(out / "results.json", result)  # whole or not at all
    from simulations.report import write_report_safely  # DIR/report.html: per site local-only vs federated, the gain

    write_report_safely(out, ds.sites, "accuracy" if task == "binary-classification" else "mae-ratio")
    return result
