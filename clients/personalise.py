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
   (:func:`clients.selection.fit_selected`); under DP-SGD it trains exactly the accounted epochs.
   Without DP and with ``personalise-own-lr`` > 0 the node also trains a second candidate from the
   run's initialisation on its own records alone (the model it would have without the federation)
   and keeps the average of that model's and the fine-tuned model's predictions unless its own
   model alone scores better on the same validation split (:func:`choose_kept`); which one it kept
   stays on the node (the model file's metadata ``kept``, its audit log);
4. keeps the personalised model on the node (:func:`personalised_path`, safetensors) and replies
   with the DP-SGD parameters and epsilon only (:data:`contract.tasks.PERSONALISE_METRICS`): no arrays, nothing
   computed from the records.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable

import torch

from clients.selection import fit_chosen, fit_selected, select_epochs, validation_score, validation_split
from clients.training import FitResult, TrainConfig, fit
from privacy.dp import DPSettings
from privacy.ledger import BudgetExceededError, PrivacyLedger, Release, RunCapExceededError
from privacy.policy import JobRequest, check_job
from shared_models import build_model, default_model_config
from shared_models.ensemble import MeanEnsemble
from shared_models.fingerprint import state_sha256

#: Values of ``personalise-layers``.
LAYERS = ("all", "head")
#: Values of the kept model's metadata ``kept``: fine-tuned from the federated model (no own candidate;
#: files written before 2026-12-05 also with one), the node's own, or the average of those two models'
#: predictions (:func:`choose_kept`).
KEPT = ("federated", "own", "average")


def personalise_epochs(cfg: dict, spec) -> int:
    """Epochs of personalisation a run plans for this node (0 when the run or the policy says no)."""
    epochs = int(cfg.get("personalise-epochs", 0) or 0)
    return epochs if epochs > 0 and spec.policy.personalisation else 0


def personalise_batch(cfg: dict) -> int:
    """Batch size of the personalisation: ``personalise-batch-size``, or the run's ``batch-size`` when 0 or absent."""
    return int(cfg.get("personalise-batch-size", 0) or 0) or int(cfg.get("batch-size", 64))


def personalise_steps(cfg: dict, spec, n_train: int) -> int:
    """DP-SGD steps of this node's planned personalisation (at :func:`personalise_batch`).

    From the count the node may reveal (:func:`clients.node.public_count` of ``n_train``, the site's
    released count under DP: :mod:`clients.counts`), as every other released step count.
    """
    from clients.node import public_count
    from privacy.dp import steps_per_epoch

    return personalise_epochs(cfg, spec) * steps_per_epoch(public_count(n_train, spec.policy)[0], personalise_batch(cfg))


def own_settings(cfg: dict) -> tuple[float, int] | None:
    """Learning rate and batch size of the own-records candidate, or ``None`` when the run asks for none.

    ``personalise-own-lr`` (0 or absent = no candidate) and ``personalise-own-batch-size`` (0 or
    absent = :func:`personalise_batch`).
    """
    lr = float(cfg.get("personalise-own-lr", 0.0) or 0.0)
    if lr <= 0:
        return None
    return lr, int(cfg.get("personalise-own-batch-size", 0) or 0) or personalise_batch(cfg)


def weighs_own(cfg: dict, dp: bool) -> bool:
    """Whether the run's personalisation will weigh an own-records candidate (:func:`choose_kept`).

    Only without DP, with ``personalise-epochs`` > 0 and ``personalise-own-lr`` > 0.
    """
    return not dp and int(cfg.get("personalise-epochs", 0) or 0) > 0 and own_settings(cfg) is not None


def round_records(train, task: str, cfg: dict, dp: bool, *, personalises: bool = True):
    """The records a node trains the federated rounds on.

    All its training records, except when the run's personalisation will weigh an own-records
    candidate (:func:`weighs_own`) and the node will personalise (``personalises``: its own policy's
    ``personalisation``; a node that will refuse the personalise message holds nothing out): then the validation split that choice is made on
    (:func:`clients.selection.validation_split` with the run's ``seed``, as :func:`handle_personalise`
    draws it) is held out, so that both candidates are scored on records neither has trained on.
    (Trained on every record, the federated candidate had seen the validation records and the own
    candidate had not: the choice leant toward the federated model.) The kept model is trained on
    all the records afterwards, as before.
    """
    if not (personalises and weighs_own(cfg, dp)):
        return train
    return validation_split(train, task, seed=int(cfg.get("seed", 0) or 0))[0]


def choose_kept(model: torch.nn.Module, build: Callable[[], torch.nn.Module], train, task: str, tc: TrainConfig,
                own_tc: TrainConfig, seed: int) -> tuple[torch.nn.Module, FitResult, str, dict]:
    """Non-private personalisation with a fallback: the node's own model, or its average with the fine-tuned federated one.

    Two models are trained on one validation split's fit part of the node's training records
    (:func:`clients.selection.validation_split` with ``seed``), each for the epoch count its
    validation score favours (:func:`clients.selection.select_epochs`): the federated model
    fine-tuned (it may keep 0 epochs, i.e. the global model) and the node's own model trained from
    the run's initialisation. The node keeps the average of the two models' predictions
    (:class:`shared_models.ensemble.MeanEnsemble`) unless its own model alone scores better on the
    validation part (:func:`pick_kept`); the kept model(s) are then trained on all the training
    records for their counts (:func:`clients.selection.fit_chosen`, as
    :func:`clients.selection.fit_selected` does).

    Why the average and not the fine-tuned model alone: the validation losses are convex in the
    prediction (absolute error; log loss in the probability), so the average's loss is at most the
    mean of its two models' losses, and it can lose at most half of what the fine-tuned model alone
    would lose against the own model, while it often beats both (README, "Personalisation at the node":
    measured over nine health splits and on the forecasting sites).

    Parameters
    ----------
    model : nn.Module
        The run's final global model (fine-tuned in place when the average is kept).
    build : callable
        Returns the run's initial model (the own candidate's start), built by the node itself.
    train : TensorDataset
        The node's training records.
    task : str
    tc, own_tc : TrainConfig
        Fine-tuning and own-model training (``epochs``: the most either search tries).
    seed : int
        Seed of the validation split.

    Returns
    -------
    (nn.Module, FitResult, str, dict)
        The kept model (trained; for ``"average"`` a :class:`~shared_models.ensemble.MeanEnsemble` of
        the fine-tuned federated model and the own model, in that order), its final training's result
        (for the average: both trainings' steps), ``"own"`` or ``"average"`` (:data:`KEPT`), and the
        validation scores (``federated-validation``, ``own-validation``, ``average-validation``) and
        epoch counts (``federated-epochs``, ``own-epochs``), which stay on the node.
    """
    fit_part, val = validation_split(train, task, seed=seed)
    ft_best, own_best = {}, {}
    ft_epochs, ft_scores = select_epochs(model, fit_part, val, task, tc, allow_zero=True, best=ft_best)
    own = build()
    own_epochs, own_scores = select_epochs(own, fit_part, val, task, own_tc, best=own_best)
    pair = [copy.deepcopy(model), copy.deepcopy(own)]
    pair[0].load_state_dict(ft_best)
    pair[1].load_state_dict(own_best)
    scores = {"federated-validation": float(ft_scores[ft_epochs]), "federated-epochs": int(ft_epochs),
              "own-validation": float(own_scores[own_epochs]), "own-epochs": int(own_epochs),
              "average-validation": validation_score(MeanEnsemble(pair, task), val, task)}
    kept = pick_kept(scores)
    res = fit_chosen(own, train, task, own_tc, own_epochs, own_scores)
    if kept == "own":
        return own, res, kept, scores
    ft_res = fit_chosen(model, train, task, tc, ft_epochs, ft_scores)
    ft_res.steps += res.steps
    return MeanEnsemble([model, own], task), ft_res, kept, scores


def pick_kept(scores: dict[str, float]) -> str:
    """:func:`choose_kept`'s rule: ``"own"`` if ``own-validation`` < ``average-validation``, else ``"average"``.

    A NaN score (a model that diverged) loses to a number; both NaN: ``"own"`` (the model the node
    would have without the federation).
    """
    own, avg = scores["own-validation"], scores["average-validation"]
    if math.isnan(avg):
        return "own"
    return "own" if own < avg else "average"


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


def personalised_model(path: Path, build: Callable[[], torch.nn.Module], task: str) -> torch.nn.Module:
    """The personalised model a file holds, ready to score or serve.

    Parameters
    ----------
    path : Path
        A file :func:`handle_personalise` wrote.
    build : callable
        Returns a freshly built model of the run's kind (the weights are the file's).
    task : str
        The department's task (how an ``"average"`` combines its two models' outputs).

    Returns
    -------
    nn.Module
        The model; for ``kept = "average"`` a :class:`~shared_models.ensemble.MeanEnsemble` of two.
    """
    model = MeanEnsemble([build(), build()], task) if personalised_kept(path) == "average" else build()
    model.load_state_dict(load_personalised(path))
    return model


def personalised_kept(path: Path) -> str:
    """Which candidate a personalised model file holds: ``"federated"``, ``"own"`` or ``"average"`` (:data:`KEPT`).

    Files written before the own-records candidate existed have no ``kept`` entry: ``"federated"``.

    Raises
    ------
    ValueError
        The metadata names something else (the file was not written by :func:`handle_personalise`).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        kept = (f.metadata() or {}).get("kept", "federated")
    if kept not in KEPT:
        raise ValueError(f"{path}: metadata kept = {kept!r} is not one of {', '.join(KEPT)}; "
                         "fix: personalise the run again (the file was not written by cityfed)")
    return kept


def personalised_scores(path: Path) -> dict[str, float]:
    """The candidates' validation scores and epoch counts a personalised model file records.

    Keys ``federated-validation``, ``own-validation``, ``average-validation`` (lower is better,
    :func:`clients.selection.validation_score`; files written before 2026-12-05 have no
    ``average-validation``), ``federated-epochs``, ``own-epochs``; empty when the node trained no
    own-records candidate.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    out = {}
    for key in ("federated-validation", "own-validation", "average-validation", "federated-epochs", "own-epochs"):
        if key in meta:
            try:
                out[key] = float(meta[key])
            except ValueError:
                raise ValueError(f"{path}: metadata {key} = {meta[key]!r} is not a number; fix: personalise the run "
                                 "again (the file was not written by cityfed)") from None
    return out


def handle_personalise(state: dict[str, torch.Tensor], cfg: dict, spec) -> dict:
    """Fine-tune the run's final model on this node's training records, under its policy.

    Parameters
    ----------
    state : dict
        The run's final global model.
    cfg : dict
        The run's job config plus ``personalise-epochs``, ``personalise-lr``,
        ``personalise-layers`` (``"all"`` or ``"head"``), ``personalise-mu``,
        ``personalise-batch-size`` (0: the run's ``batch-size``) and, without DP only,
        ``personalise-own-lr`` / ``personalise-own-batch-size`` (:func:`own_settings`, :func:`choose_kept`).
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
    from clients.node import JobRefused, NoTrainingData, _model_for, check_job_numbers, job_from_config, public_count

    check_job_numbers(cfg, spec)
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
    if rnd < 1:  # it follows a run's last round; its noise is calibrated with the run's rounds
        raise refuse(f"the personalise message's server-round is {rnd}; it follows a run's last round (>= 1)")
    kind = str(cfg.get("model", "")) or None
    model, ds, site = _model_for(spec, kind, state)
    if len(site.train) == 0:
        raise NoTrainingData(f"{spec.department}/{spec.site}: no training records; nothing to personalise")
    base_sha = state_sha256(model.state_dict())  # the global model it starts from (fl-serve --personalised checks it)
    train = site.train.tensors()
    task = ds.schema.task
    ledger = PrivacyLedger(spec.ledger_path, accountant=spec.policy.accountant)
    # under DP what leaves derives from the site's released, noised count (clients.counts), rounded
    n_count = len(train)
    if bool(cfg.get("dp", True)):
        from clients.node import train_count

        n_count = train_count(spec, ledger, cfg, len(train))
    public, delta = public_count(n_count, spec.policy)
    once = f"run {run_id!r} was already personalised on this node (once per run)"
    if ledger.count(spec.site, run_id, "personalisation"):
        raise refuse(once)
    # the same calibration as a training round, with no rounds left: the personalisation's steps
    # get the noise that lands the run (what it spent so far + these steps) on its target
    pcfg = {**cfg, "local-epochs": epochs, "num-rounds": rnd, "personalise-epochs": 0, "batch-size": personalise_batch(cfg)}
    base = job_from_config(pcfg, spec, n_count, task, ledger)
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
        dp = DPSettings(noise_multiplier=job.noise_multiplier, max_grad_norm=job.clipping_norm, delta=delta,
                        public_records=public)
        release = Release(noise_multiplier=job.noise_multiplier, sample_rate=job.sample_rate, steps=job.steps,
                          delta=delta, run_id=run_id, round=rnd, site=spec.site, department=spec.department,
                          mechanism="personalisation")
        try:  # recorded BEFORE training: a crash never under-counts
            # once per run, checked again in the write: another process of this node may have personalised it
            rid = ledger.begin(release, max_epsilon=spec.policy.max_epsilon, delta=delta,
                               run_cap=(("personalisation",), 1))
        except RunCapExceededError:
            raise refuse(once) from None
        except BudgetExceededError as exc:  # without the ledger file's path
            raise refuse(exc.reason) from None
    else:  # allowed by the policy (require_dp = false), still a release: the site's epsilon is infinite after it
        release = Release(noise_multiplier=0.0, sample_rate=1.0, steps=1, delta=delta, run_id=run_id, round=rnd,
                          site=spec.site, department=spec.department, mechanism="non-private")
        rid = ledger.begin(release)
    tc = TrainConfig(epochs=epochs, batch_size=personalise_batch(cfg),
                     lr=float(cfg.get("personalise-lr", cfg.get("lr", 1e-2))),
                     seed=int(cfg.get("seed", 0)) * 100_003 + rnd + 7919,
                     proximal_mu=float(cfg.get("personalise-mu", 0.0)),
                     trainable=(head_prefix(model),) if layers == "head" else None)
    own = own_settings(cfg) if dp is None else None  # under DP a second model would be a second release
    kept, scores = "federated", {}
    try:
        if own is not None:  # non-private: the better of fine-tuned federated and the node's own model
            seed = int(cfg.get("seed", 0))
            own_tc = TrainConfig(epochs=epochs, batch_size=own[1], lr=own[0], seed=seed)

            def build() -> torch.nn.Module:  # the run's initialisation, as the coordinator draws it from the seed
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    return build_model(default_model_config(ds.schema, kind))

            model, res, kept, scores = choose_kept(model, build, train, task, tc, own_tc, seed)
        elif dp is None:  # non-private: at most `epochs`, as many as the node's validation split favours (0 = keep)
            res = fit_selected(model, train, task, tc, allow_zero=True)
        else:  # DP-SGD: the accounted steps, no selection on the records
            res = fit(model, train, task, tc, dp)
        path = personalised_path(spec, run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save

        from contract.files import write_atomic

        blob = save({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
                    metadata={"run-id": run_id, "department": spec.department, "site": spec.site, "layers": layers,
                              "epochs": str(epochs if dp is not None else res.selected_epochs), "dp": str(job.dp),
                              "noise-multiplier": str(job.noise_multiplier), "kept": kept, "base-sha256": base_sha,
                              **{k: str(v) for k, v in scores.items()}})
        write_atomic(path, blob)  # a complete file or none (temporary file, fsync, rename)
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
    spec.audit("personalised", run=run_id, path=str(path), steps=res.steps, kept=kept, **scores)
    out = {"num-examples": public,
           "epsilon": after, "noise-multiplier": float(job.noise_multiplier or 0.0) if job.dp else 0.0,
           "steps": int(job.steps)}
    if spec.partition_id is not None:
        out["partition-id"] = int(spec.partition_id)
    return out
