"""Per-site personalisation at the node: fine-tune the run's final model on the node's own records.

After a run's last round the coordinator may send each node a ``train.personalise`` message with
the final global model (run config ``personalise-epochs`` > 0). The node decides, by its own
policy (``personalisation = true``), whether to answer. If it does, it

1. calibrates the DP-SGD noise of the fine-tuning together with what the run already spent, so
   that the run's ``target-epsilon`` covers the federated rounds *and* the personalisation (the
   rounds' noise was calibrated with these steps reserved, :func:`personalise_steps`);
2. checks the release against its policy and lifetime budget (:func:`privacy.policy.check_job`),
   records it in its ledger (mechanism ``"personalisation"``) before training;
3. fine-tunes with the one training loop (:func:`clients.training.fit`): the whole model, or only
   its head (``personalise-layers = "head"``), optionally pulled towards the global model
   (``personalise-mu``, the proximal term of Ditto/FedProx, data-independent so free). Without
   DP, ``personalise-epochs`` is the most it trains: the count (0 = keep the global model) is
   chosen on a validation split of the node's own training records
   (:func:`clients.selection.fit_selected`); under DP-SGD it trains exactly the accounted epochs;
4. keeps the personalised model on the node (:func:`personalised_path`, safetensors) and replies
   with the DP-SGD parameters and epsilon only (:data:`contract.tasks.PERSONALISE_METRICS`): no arrays, nothing
   computed from the records.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from clients.selection import fit_selected
from clients.training import TrainConfig, fit
from privacy.dp import DPSettings
from privacy.ledger import BudgetExceededError, PrivacyLedger, Release
from privacy.policy import JobRequest, check_job

#: Run-config keys of personalisation (sent with the personalise message, read by the node).
LAYERS = ("all", "head")


def personalise_epochs(cfg: dict, spec) -> int:
    """Epochs of personalisation a run plans for this node (0 when the run or the policy says no)."""
    epochs = int(cfg.get("personalise-epochs", 0) or 0)
    return epochs if epochs > 0 and spec.policy.personalisation else 0


def personalise_batch(cfg: dict) -> int:
    """Batch size of the personalisation: ``personalise-batch-size``, or the run's ``batch-size`` when 0 or absent."""
    return int(cfg.get("personalise-batch-size", 0) or 0) or int(cfg.get("batch-size", 64))


def personalise_steps(cfg: dict, spec, n_train: int) -> int:
    """DP-SGD steps of this node's planned personalisation (at :func:`personalise_batch`)."""
    return personalise_epochs(cfg, spec) * max(1, math.ceil(n_train / personalise_batch(cfg)))


def head_prefix(model: torch.nn.Module) -> str:
    """Name prefix of the model's output layer (the module owning its last parameter)."""
    last = [n for n, _ in model.named_parameters()][-1]
    return last.rsplit(".", 1)[0]


def personalised_path(spec, run_id: str) -> Path:
    """Where the node keeps its personalised model of ``run_id``: next to its ledger.

    ``<ledger folder>/personalised/<department>-<site>/<run_id>.safetensors`` (deployment: the
    ``fl-client`` state dir; simulation: ``RUN_DIR/ledgers``).
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(run_id)) or "run"
    return spec.ledger_path.parent / "personalised" / f"{spec.department}-{spec.site}" / f"{safe}.safetensors"


def load_personalised(path: Path) -> dict[str, torch.Tensor]:
    """A personalised model's state dict (safetensors; never pickle)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def handle_personalise(state: dict[str, torch.Tensor], cfg: dict, spec) -> dict:
    """Fine-tune the run's final model on this node's training records, under its policy.

    Parameters
    ----------
    state : dict
        The run's final global model.
    cfg : dict
        The run's job config plus ``personalise-epochs``, ``personalise-lr``,
        ``personalise-layers`` (``"all"`` or ``"head"``), ``personalise-mu`` and
        ``personalise-batch-size`` (0: the run's ``batch-size``).
    spec : clients.node.NodeSpec

    Returns
    -------
    dict
        Whitelisted metrics (:data:`contract.tasks.PERSONALISE_METRICS`).

    Raises
    ------
    clients.node.JobRefused
        Policy ``personalisation = false``, no epochs asked, the run's target already spent,
        or the policy's checks / lifetime budget refuse the release.
    """
    from clients.node import JobRefused, NoTrainingData, _model_for, job_from_config, rounded_count

    run_id, rnd = str(cfg.get("run-id", "")), int(cfg.get("server-round", 0))

    def refuse(reason: str) -> JobRefused:
        spec.audit("personalise", run=run_id, round=rnd, decision="refused", reason=reason)
        return JobRefused(f"{spec.department}/{spec.site}: refused: {reason}")

    if not spec.policy.personalisation:
        raise refuse("personalisation is off (policy personalisation = false)")
    epochs = personalise_epochs(cfg, spec)
    if epochs <= 0:
        raise refuse("the personalise message asks for no epochs (run config personalise-epochs = 0)")
    layers = str(cfg.get("personalise-layers", "all"))
    if layers not in LAYERS:
        raise refuse(f"personalise-layers {layers!r} is not one of {', '.join(LAYERS)}")
    if not run_id:
        raise refuse("the personalise message names no run-id (its release is accounted per run)")
    model, ds, site = _model_for(spec, str(cfg.get("model", "")) or None, state)
    if len(site.train) == 0:
        raise NoTrainingData(f"{spec.department}/{spec.site}: no training records; nothing to personalise")
    train = site.train.tensors()
    task = ds.schema.task
    delta = spec.policy.site_delta(len(train))
    ledger = PrivacyLedger(spec.ledger_path, accountant=spec.policy.accountant)
    if ledger.count(spec.site, run_id, "personalisation"):
        raise refuse(f"run {run_id!r} was already personalised on this node (once per run)")
    # the same calibration as a training round, with no rounds left: the personalisation's steps
    # get the noise that lands the run (what it spent so far + these steps) on its target
    pcfg = {**cfg, "local-epochs": epochs, "num-rounds": rnd, "personalise-epochs": 0, "batch-size": personalise_batch(cfg)}
    base = job_from_config(pcfg, spec, len(train), task, ledger)
    job = JobRequest(**{**base.model_dump(), "round": rnd})
    decision = check_job(spec.policy, job, ledger, spec.site, delta=delta)
    spec.audit("personalise", run=run_id, round=rnd, dp=job.dp, noise_multiplier=job.noise_multiplier,
               clipping_norm=job.clipping_norm, sample_rate=job.sample_rate, steps=job.steps, layers=layers,
               decision="accepted" if decision.accepted else "refused", reason=decision.reason,
               epsilon_before=decision.epsilon_before, epsilon_after=decision.epsilon_after, delta=delta)
    if not decision.accepted:
        raise JobRefused(f"{spec.department}/{spec.site}: {decision.reason}")
    dp, rid, release = None, None, None
    if job.dp:
        dp = DPSettings(noise_multiplier=job.noise_multiplier, max_grad_norm=job.clipping_norm, delta=delta)
        release = Release(noise_multiplier=job.noise_multiplier, sample_rate=job.sample_rate, steps=job.steps,
                          delta=delta, run_id=run_id, round=rnd, site=spec.site, department=spec.department,
                          mechanism="personalisation")
        try:  # recorded BEFORE training: a crash never under-counts
            rid = ledger.begin(release, max_epsilon=spec.policy.max_epsilon, delta=delta)
        except BudgetExceededError as exc:
            raise refuse(str(exc)) from exc
    tc = TrainConfig(epochs=epochs, batch_size=personalise_batch(cfg),
                     lr=float(cfg.get("personalise-lr", cfg.get("lr", 1e-2))),
                     seed=int(cfg.get("seed", 0)) * 100_003 + rnd + 7919,
                     proximal_mu=float(cfg.get("personalise-mu", 0.0)),
                     trainable=(head_prefix(model),) if layers == "head" else None)
    try:
        if dp is None:  # non-private: at most `epochs`, as many as the node's validation split favours (0 = keep)
            res = fit_selected(model, train, task, tc, allow_zero=True)
        else:  # DP-SGD: the accounted steps, no selection on the records
            res = fit(model, train, task, tc, dp)
        path = personalised_path(spec, run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"run-id": run_id, "department": spec.department, "site": spec.site, "layers": layers,
                            "epochs": str(epochs if dp is not None else res.selected_epochs), "dp": str(job.dp), "noise-multiplier": str(job.noise_multiplier)})
        tmp.replace(path)
    except BaseException as exc:
        if rid is not None:
            ledger.abort(rid, f"personalisation failed: {type(exc).__name__}")
        raise
    after = float(ledger.epsilon(spec.site, delta)) if job.dp else float("inf")
    if rid is not None:
        ledger.commit(rid)
        after = float(ledger.epsilon(spec.site, delta))
        spec.audit("release", run=run_id, round=rnd, mechanism=release.mechanism, noise_multiplier=release.noise_multiplier,
                   sample_rate=release.sample_rate, steps=release.steps, delta=delta, epsilon_before=decision.epsilon_before,
                   epsilon_after=after, accountant=ledger.accountant)
    spec.audit("personalised", run=run_id, path=str(path), steps=res.steps)
    out = {"num-examples": rounded_count(len(train), spec.policy.releases.num_examples_granularity),
           "epsilon": after, "noise-multiplier": float(job.noise_multiplier or 0.0), "steps": int(job.steps)}
    if spec.partition_id is not None:
        out["partition-id"] = int(spec.partition_id)
    return out
