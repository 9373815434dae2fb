"""A department node's train/evaluate logic, independent of Flower's transport.

The Flower ClientApp (:mod:`clients.app`) is a thin adapter over :func:`handle_train` and
:func:`handle_evaluate`, so simulation, deployment and the in-process test grid all run the
same code. A node:

1. checks the coordinator's job against its own privacy policy and ledger and refuses
   (with the reason) anything weaker than the policy or over its lifetime budget;
2. records the release in its ledger *before* training (pending counts, so a crash never
   under-counts), trains with DP-SGD at the job's noise and clipping, then commits it;
3. replies with the model's arrays and whitelisted metrics only.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from clients.datasets import load_department
from clients.training import TrainConfig, evaluate, fit
from privacy.dp import DPSettings, calibrate_noise
from privacy.ledger import BudgetExceededError, PrivacyLedger, Release
from privacy.policy import JobRequest, PrivacyPolicy, check_job, load_policy
from shared_models import build_model, default_model_config

#: The only metric keys a node ever sends back (anything else is a leak by definition).
TRAIN_METRICS = ("train-loss", "num-examples", "epsilon", "noise-multiplier", "steps", "partition-id")
EVAL_METRICS = ("num-examples", "accuracy", "roc-auc", "mae", "rmse", "mae-ratio", "loss", "partition-id")

#: Run/node config keys read only by department nodes (the ServerApp passes them through).
NODE_KEYS = ("policy", "ledger", "ledger-dir", "data", "site", "dropout-probability", "virtual-sites", "partitioner",
             "dirichlet-alpha", "partition-id", "num-partitions", "torch-threads")

#: Task name per department (what policies list in ``allowed_tasks``).
TASKS = {"health": "heart-disease", "traffic": "traffic-forecast", "utility": "utility-forecast"}


class SimulatedFailure(RuntimeError):
    """A failure injected by the simulation's dropout probability."""


class NoTrainingData(Exception):
    """The node holds no training records (e.g. an empty virtual site); it sends no update."""


class JobRefused(Exception):
    """The node's policy refused the job; ``str(exc)`` is the reason sent to the coordinator."""


@dataclass
class NodeSpec:
    """Where a node's data, policy and ledger live."""

    department: str
    site: str
    data: str | None  # None = the bundled data
    policy: PrivacyPolicy
    ledger_path: Path
    partition_id: int | None = None  # simulation only: lets the report label sites
    dropout_probability: float = 0.0  # simulation only: chance of a simulated node failure per message
    virtual: tuple[int, str, float, int] | None = None  # simulation only: (n, partitioner, alpha, seed)

    def site_data(self):
        """This node's :class:`~clients.datasets.SiteData` (a natural site or a virtual share)."""
        ds = _dataset(self.department, self.data)
        if self.virtual is None:
            return ds, ds.site_data(self.site)
        from clients.datasets.virtual import virtual_sites

        n, partitioner, alpha, seed = self.virtual
        return ds, virtual_sites(ds, n, partitioner, alpha, seed)[int(self.partition_id)]


@lru_cache(maxsize=64)
def _dataset(department: str, data: str | None):
    return load_department(department, data)


def _model_for(spec: NodeSpec, kind: str, state: dict[str, torch.Tensor]):
    ds, site = spec.site_data()
    model = build_model(default_model_config(ds.schema, kind))
    model.load_state_dict(state)
    return model, ds, site


@lru_cache(maxsize=256)
def _calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    return calibrate_noise(target_epsilon, delta, sample_rate, steps)


def job_from_config(cfg: dict, spec: NodeSpec, n_train: int) -> JobRequest:
    """The privacy-relevant part of a train message's config, as the node's policy sees it."""
    batch = int(cfg.get("batch-size", 64))
    steps_per_epoch = max(1, math.ceil(n_train / batch))
    epochs = int(cfg.get("local-epochs", 1))
    noise = float(cfg["noise-multiplier"]) if "noise-multiplier" in cfg else None
    if noise is None and "target-epsilon" in cfg and bool(cfg.get("dp", True)):
        # the node calibrates its own noise so that the whole run lands on the target epsilon
        total = int(cfg.get("num-rounds", 1)) * epochs * steps_per_epoch
        noise = _calibrated_noise(float(cfg["target-epsilon"]), spec.policy.delta, 1.0 / steps_per_epoch, total)
    return JobRequest(
        department=str(cfg.get("department", "")),
        task=str(cfg.get("task", "")),
        run_id=str(cfg.get("run-id", "")),
        round=int(cfg.get("server-round", 0)),
        dp=bool(cfg.get("dp", True)),
        noise_multiplier=noise,
        clipping_norm=float(cfg["clipping-norm"]) if "clipping-norm" in cfg else None,
        sample_rate=1.0 / steps_per_epoch,
        steps=epochs * steps_per_epoch,
    )


def handle_train(state: dict[str, torch.Tensor], cfg: dict, spec: NodeSpec) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the global model locally under the node's policy.

    Parameters
    ----------
    state : dict
        Global model state dict.
    cfg : dict
        Job config: department, task, model, local-epochs, batch-size, lr, dp,
        noise-multiplier, clipping-norm, run-id, server-round.
    spec : NodeSpec

    Returns
    -------
    (state_dict, metrics)
        Updated weights and whitelisted metrics.

    Raises
    ------
    JobRefused
        When the node's policy or budget refuses the job.
    """
    if spec.dropout_probability and random.Random(f"{cfg.get('run-id')}/{cfg.get('server-round')}/{spec.site}").random() < spec.dropout_probability:
        raise SimulatedFailure(f"{spec.site}: simulated node failure (dropout probability {spec.dropout_probability})")
    model, ds, site = _model_for(spec, str(cfg.get("model", "")) or None, state)
    if len(site.train) == 0:
        raise NoTrainingData(f"{spec.department}/{spec.site}: no training records; no update sent")
    train = site.train.tensors()
    job = job_from_config(cfg, spec, len(train))
    ledger = PrivacyLedger(spec.ledger_path)
    decision = check_job(spec.policy, job, ledger, spec.site)
    if not decision.accepted:
        raise JobRefused(f"{spec.department}/{spec.site}: {decision.reason}")
    tc = TrainConfig(epochs=int(cfg.get("local-epochs", 1)), batch_size=int(cfg.get("batch-size", 64)),
                     lr=float(cfg.get("lr", 1e-2)), seed=int(cfg.get("seed", 0)) * 100_003 + job.round,
                     proximal_mu=float(cfg.get("proximal-mu", 0.0)))
    dp = None
    release_id = None
    if job.dp:
        dp = DPSettings(noise_multiplier=job.noise_multiplier, max_grad_norm=job.clipping_norm, delta=spec.policy.delta)
        try:
            release_id = ledger.begin(
                Release(noise_multiplier=job.noise_multiplier, sample_rate=job.sample_rate, steps=job.steps,
                        delta=spec.policy.delta, run_id=job.run_id, round=job.round, site=spec.site,
                        department=spec.department),
                max_epsilon=spec.policy.max_epsilon, delta=spec.policy.delta,
            )
        except BudgetExceededError as exc:  # another process spent the budget since check_job
            raise JobRefused(f"{spec.department}/{spec.site}: refused: {exc}") from exc
    try:
        res = fit(model, train, ds.schema.task, tc, dp)
    except BaseException as exc:
        if release_id is not None:
            ledger.abort(release_id, f"training failed before any release: {type(exc).__name__}: {exc}")
        raise
    if release_id is not None:
        ledger.commit(release_id)
    metrics = {
        "train-loss": float(res.loss),
        "num-examples": int(res.num_examples),
        "epsilon": float(ledger.epsilon(spec.site, spec.policy.delta)) if job.dp else float("inf"),
        "noise-multiplier": float(job.noise_multiplier or 0.0),
        "steps": int(job.steps),
    }
    if spec.partition_id is not None:
        metrics["partition-id"] = int(spec.partition_id)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, metrics


def handle_evaluate(state: dict[str, torch.Tensor], cfg: dict, spec: NodeSpec) -> dict:
    """Evaluate the global model on the node's own test split (whitelisted metrics only)."""
    model, ds, site = _model_for(spec, str(cfg.get("model", "")) or None, state)
    out = evaluation_metrics(model, site, ds.schema.task)
    if spec.partition_id is not None:
        out["partition-id"] = int(spec.partition_id)
    return out


def evaluation_metrics(model, site, task: str) -> dict:
    """Whitelisted evaluation metrics of ``model`` on ``site``'s test split.

    A site without test data reports only ``num-examples = 0`` (it then weighs nothing
    in the aggregate).
    """
    if len(site.test) == 0:
        return {"num-examples": 0}
    m = evaluate(model, site, task)
    out = {"num-examples": int(m["n"])}
    if task == "binary-classification":
        out.update({"accuracy": m["accuracy"], "roc-auc": m["roc_auc"]})
    else:
        out.update({"mae": m["mae"], "rmse": m["rmse"], "mae-ratio": m["mae_ratio"]})
    return out


def node_from_config(node_config: dict, run_config: dict) -> NodeSpec:
    """Build a node's spec from Flower's node config (deployment) or run config (simulation).

    Keys: ``department``, ``site`` (or ``partition-id`` in simulation: the k-th site),
    ``data`` (file; empty = bundled), ``policy`` (TOML file), ``ledger`` (SQLite file) or
    ``ledger-dir`` (simulation: one file per site); simulation only: ``virtual-sites`` (N > 0:
    the node is the ``partition-id``-th of N virtual sites, see
    :mod:`clients.datasets.virtual`), ``partitioner``, ``dirichlet-alpha``,
    ``dropout-probability``; ``torch-threads`` (> 0: intra-op threads torch may use).

    A node config that names the ``department`` (``fl-client``'s) is a department node: the
    keys above (:data:`NODE_KEYS`) then come from the node config only, never from the
    coordinator's run config.
    """
    if "department" in node_config:
        # a department node (fl-client names its department): what data, site, policy, ledger and
        # simulation options it uses is the node's decision alone. The run config comes from the
        # coordinator; were it allowed to add e.g. virtual-sites/partition-id here, the node's
        # records would be released again under a fresh per-site budget ("virtual-3") in the
        # same ledger. Simulations put these keys in the run config and name no department here.
        ignored = sorted(k for k in NODE_KEYS if k in run_config and run_config[k] != node_config.get(k))
        if ignored:
            logging.getLogger("cityfed.node").warning(
                "ignored node-side key(s) %s in the coordinator's run config: the node config decides them",
                ", ".join(ignored))
        run_config = {k: v for k, v in run_config.items() if k not in NODE_KEYS}
    merged = {**run_config, **node_config}
    if int(merged.get("torch-threads", 0) or 0) > 0:  # CPU nodes: intra-op threads for training
        torch.set_num_threads(int(merged["torch-threads"]))
    department = str(merged["department"])
    data = str(merged.get("data") or "") or None
    site = merged.get("site")
    partition = merged.get("partition-id")
    virtual = None
    if int(merged.get("virtual-sites", 0) or 0) > 0:
        virtual = (int(merged["virtual-sites"]), str(merged.get("partitioner", "iid")),
                   float(merged.get("dirichlet-alpha", 0.5)), int(merged.get("seed", 0)))
        site = f"virtual-{int(partition)}"
    elif not site:
        sites = _dataset(department, data).sites
        site = sites[int(merged["partition-id"]) % len(sites)]
    site = str(site)
    policy = load_policy(merged["policy"])
    if merged.get("ledger"):
        ledger_path = Path(str(merged["ledger"]))
    else:
        ledger_path = Path(str(merged["ledger-dir"])) / f"{department}-{site}.sqlite"
    return NodeSpec(department=department, site=site, data=data, policy=policy, ledger_path=ledger_path,
                    partition_id=None if partition is None else int(partition),
                    dropout_probability=float(merged.get("dropout-probability", 0.0)), virtual=virtual)
