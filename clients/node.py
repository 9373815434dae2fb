"""A department node's train/evaluate logic, independent of Flower's transport.

The Flower ClientApp (:mod:`clients.app`) is a thin adapter over :func:`handle_train` and
:func:`handle_evaluate`, so simulation, deployment and the in-process test grid all run the
same code. A node:

1. checks the coordinator's job against its own privacy policy and ledger and refuses
   (with the reason) anything weaker than the policy or over its lifetime budget;
2. records the release in its ledger *before* training (pending counts, so a crash never
   under-counts), trains with DP-SGD at the job's noise and clipping, then commits it;
3. replies with the model's arrays and whitelisted metrics only: the record count rounded as
   the policy says, the DP-SGD parameters and epsilon, and a training loss or evaluation
   metrics only where the policy's ``[releases]`` table allows them, then as Gaussian-mechanism
   releases accounted in the same ledger (:mod:`privacy.releases`);
4. writes what it decided and released to its own audit log (when ``fl-client`` configured one).

Delta is per site: ``policy.site_delta`` of the site's training records, counted as the policy lets
them be known (:func:`public_count`: with ``num_examples_granularity`` > 1, the rounded count, from
which the DP-SGD steps, sample rate and noise scale derive too).
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

from citydata import load_department
from clients.personalise import round_records
from clients.training import TrainConfig, fit
from contract.keys import NODE_KEYS, OPTIMIZERS
from privacy.dp import CalibrationError, DPSettings, calibrate_noise
from privacy.dp import steps_per_epoch as dp_steps_per_epoch
from privacy.ledger import BudgetExceededError, PrivacyLedger, Release, RunCapExceededError
from privacy.policy import JobRequest, PrivacyPolicy, check_job, job_conflict, load_policy, shown_value
from privacy.releases import ERROR_BOUND, LOSS_BOUND, noisy_means
from shared_models import build_model, default_model_config

#: Noised sums of one DP evaluation per task (classification: hits, loss; forecasting: the
#: model's and the two naive forecasts' absolute errors).
EVAL_SUMS = {"binary-classification": 2, "forecasting": 3}

class SimulatedFailure(RuntimeError):
    """A failure injected by the simulation's dropout probability."""


class NoTrainingData(Exception):
    """The node holds no training records (e.g. an empty virtual site); it sends no update."""


class JobRefused(Exception):
    """The node's policy refused the job; ``str(exc)`` is the reason sent to the coordinator."""


#: The job config's numbers as the node accepts them: key -> (kind, lowest, lowest allowed itself).
#: Every value is the coordinator's; the node checks each before using any (a NaN, a negative
#: batch or an epsilon of 1e300 is refused, not trained with or calibrated for).
JOB_NUMBERS: dict[str, tuple[type, float, bool]] = {
    "server-round": (int, 0, True), "num-rounds": (int, 1, True), "local-epochs": (int, 1, True),
    "batch-size": (int, 1, True), "seed": (int, 0, True), "personalise-epochs": (int, 0, True),
    "personalise-batch-size": (int, 0, True), "personalise-own-batch-size": (int, 0, True),
    "target-epsilon": (float, 0.0, False), "noise-multiplier": (float, 0.0, True), "clipping-norm": (float, 0.0, False),
    "lr": (float, 0.0, False), "proximal-mu": (float, 0.0, True), "personalise-lr": (float, 0.0, False),
    "personalise-own-lr": (float, 0.0, True), "personalise-mu": (float, 0.0, True), "max-update-norm": (float, 0.0, False),
}


def check_job_numbers(cfg: dict, spec: "NodeSpec") -> None:
    """Refuse a job config whose numbers the node cannot honour (:data:`JOB_NUMBERS`).

    Whole numbers must be whole (not a bool, not 2.5), real numbers finite, each at or above its
    lowest value; ``target-epsilon`` at most the policy's lifetime ``max_epsilon`` (a larger
    target can never be kept).

    Parameters
    ----------
    cfg : dict
        The message's job config (the coordinator's).
    spec : NodeSpec
        The node (its policy, and its name for the reason).

    Raises
    ------
    JobRefused
        Naming the key, the value sent and what the node accepts.
    """
    for key, (kind, lowest, inclusive) in JOB_NUMBERS.items():
        if key not in cfg:
            continue
        raw = cfg[key]
        ok = not isinstance(raw, bool) and isinstance(raw, (int, float))
        if ok and kind is int:
            ok = float(raw).is_integer()
        if ok:
            ok = math.isfinite(raw) and (raw >= lowest if inclusive else raw > lowest)
        if not ok:
            what = "a whole number" if kind is int else "a finite number"
            bound = f"{'>=' if inclusive else '>'} {lowest:g}"
            raise JobRefused(f"{spec.department}/{spec.site}: refused: job config {key} = {shown_value(raw)} is not {what} {bound}")
    if "target-epsilon" in cfg and float(cfg["target-epsilon"]) > spec.policy.max_epsilon:
        raise JobRefused(f"{spec.department}/{spec.site}: refused: job config target-epsilon = {cfg['target-epsilon']!r} "
                         f"is above the policy's lifetime max_epsilon {spec.policy.max_epsilon:g} (it can never be kept)")


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
    virtual: tuple[int, str, float, int, bool] | None = None  # simulation only: (n, partitioner, alpha, seed, allow_empty)
    audit_log: Path | None = None  # the node's tamper-evident audit log (fl-client: <state-dir>/audit.jsonl)
    audit_key: Path | None = None  # key signing its entries (the node's own node.key)
    data_seed: int = 0  # seed of the train/test split of its records (node config ``data-seed``)

    def audit(self, kind: str, **fields) -> None:
        """Append an entry to the node's audit log (nothing when none is configured).

        A node configured with an audit log never releases without a record: a failed write
        raises, and the job fails before its reply leaves.
        """
        if self.audit_log is None:
            return
        from privacy.audit import AuditLog

        AuditLog(self.audit_log, key_path=self.audit_key).append(
            kind, department=self.department, site=self.site, **fields)

    def site_data(self):
        """This node's :class:`~citydata.SiteData` (a natural site or a virtual share)."""
        ds = _dataset(self.department, self.data, self.data_seed)
        if self.virtual is None:
            return ds, ds.site_data(self.site)
        from citydata.virtual import virtual_site

        n, partitioner, alpha, seed, allow_empty = self.virtual
        # this site's rows alone: a Ray worker playing thousands of nodes holds one copy of the data
        return ds, virtual_site(ds, n, int(self.partition_id), partitioner, alpha, seed, allow_empty=allow_empty)


@lru_cache(maxsize=64)
def _dataset(department: str, data: str | None, seed: int = 0):
    return load_department(department, data, seed=seed)


def _model_for(spec: NodeSpec, kind: str, state: dict[str, torch.Tensor]):
    ds, site = spec.site_data()
    model = build_model(default_model_config(ds.schema, kind))
    model.load_state_dict(state)
    return model, ds, site


@lru_cache(maxsize=256)
def _calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      reserved: tuple[tuple[float, float, int], ...] = (), accountant: str = "rdp") -> float:
    return calibrate_noise(target_epsilon, delta, sample_rate, steps, reserved, accountant)


def rounded_count(n: int, granularity: int) -> int:
    """``n`` rounded to the nearest multiple of ``granularity`` (never 0 for ``n > 0``).

    The node's public count: the reply's ``num-examples``, and the count DP-SGD's steps, sample
    rate and noise scale are derived from (:func:`privacy.dp.steps_per_epoch`), so that none of
    what leaves reveals more of ``n`` than this.
    """
    if n <= 0 or granularity <= 1:
        return max(int(n), 0)
    return max(granularity, int(round(n / granularity)) * granularity)


def delta_records(n: int, granularity: int) -> int:
    """The record count a site's delta is set for: ``rounded_count(n, g) + g // 2``, never below ``n``.

    The delta (:meth:`~privacy.policy.PrivacyPolicy.site_delta`, ``1/(10 n)``) shows in the
    reply's epsilon, so it is derived from what may leave: under DP ``n`` is the site's released,
    noised count (:mod:`clients.counts`), rounded, plus half the granularity. It follows that count,
    so it may be slightly above the exact count's ``1/(10 n)`` when the noise drew low (std
    ``count_noise_multiplier`` records); a policy that needs a hard bound sets ``delta``, which
    caps every site's delta. Granularity 1: ``n``.
    """
    granularity = max(int(granularity), 1)
    return rounded_count(n, granularity) + granularity // 2


def public_count(n: int, policy: PrivacyPolicy) -> tuple[int, float]:
    """The count a node's replies may reveal of its ``n`` training records, and the delta it sets.

    Parameters
    ----------
    n : int
        The site's training-record count as it may leave: under DP the released, noised count
        (:func:`train_count`, :mod:`clients.counts`); without DP (a non-private round) the exact one.
    policy : PrivacyPolicy
        The node's policy (its ``releases.num_examples_granularity``).

    Returns
    -------
    (records, delta)
        :func:`rounded_count` of ``n``: the reply's ``num-examples`` and the count DP-SGD's steps,
        sample rate and noise scale derive from; and the site's delta for :func:`delta_records`.
    """
    g = policy.releases.num_examples_granularity
    return rounded_count(n, g), policy.site_delta(delta_records(n, g))


def planned_releases(cfg: dict, spec: NodeSpec, task: str, rounds: int | None = None,
                     evaluations_done: int = 0, test_count_released: bool = False) -> tuple[tuple[float, float, int], ...]:
    """The metric releases (``(noise, 1.0, sums)``) the node's policy lets a run still make.

    DP-SGD's noise is calibrated with these reserved, so that a run with a ``target-epsilon``
    lands on it with every release counted (:func:`privacy.dp.calibrate_noise`). One DP
    evaluation per round still to come is reserved (the per-run cap permitting), and with the
    first of them the release of the test split's noised count (:mod:`clients.counts`) unless
    it was released before. An evaluation beyond these is refused when it would pass the run's
    target (:func:`handle_evaluate`).

    Parameters
    ----------
    rounds : int, optional
        Rounds still to come, this one included (default: the run's ``num-rounds``).
    evaluations_done : int
        DP evaluations the run already obtained (the per-run cap counts them).
    test_count_released : bool
        The site's test count was released already (for its present data set): nothing to reserve.
    """
    rel = spec.policy.releases
    rounds = int(cfg.get("num-rounds", 1)) if rounds is None else int(rounds)
    out = []
    if rel.train_loss == "dp":
        out.append((rel.metric_noise_multiplier, 1.0, rounds))
    evaluations = min(rounds, max(0, rel.max_evaluations_per_run - evaluations_done))
    if rel.local_evaluation == "dp" and evaluations:
        out.append((rel.metric_noise_multiplier, 1.0, evaluations * EVAL_SUMS[task]))
        if not test_count_released:  # gaussian-count: sensitivity 1, noise std count_noise_multiplier, once
            out.append((float(rel.count_noise_multiplier), 1.0, 1))
    return tuple(out)


def _test_count_released(spec: NodeSpec, ledger: PrivacyLedger | None) -> bool:
    """Whether the node's test count was released already (only looked up when DP evaluations are allowed)."""
    if ledger is None or spec.policy.releases.local_evaluation != "dp":
        return False
    _ds, site = spec.site_data()
    return ledger.has_released_count(spec.site, "test", len(site.test))


def job_from_config(cfg: dict, spec: NodeSpec, n_train: int, task: str = "binary-classification",
                    ledger: PrivacyLedger | None = None) -> JobRequest:
    """The privacy-relevant part of a train message's config, as the node's policy sees it.

    With a ``target-epsilon`` the node calibrates its own noise so that the run, every release
    its policy allows included, lands on the target. Given its ``ledger``, it calibrates for
    the rounds still to come on top of what this run already obtained from it: a round replayed
    after a coordinator crash or a resume is paid for by more noise in the remaining rounds, and
    a run whose target is already spent is refused (the target is never passed).

    Parameters
    ----------
    cfg : dict
        The message's job config.
    spec : NodeSpec
    n_train : int
        The site's training-record count as it may leave: under DP its released, noised count
        (:func:`train_count`); the steps, sample rate, delta and noise derive from
        :func:`public_count` of it.
    task : str
    ledger : PrivacyLedger, optional

    Raises
    ------
    JobRefused
        When a ``target-epsilon`` cannot be reached (already spent by this run, or by the
        policy's planned metric releases alone).
    """
    public, delta = public_count(n_train, spec.policy)  # nothing below reveals more of n_train than `public`
    steps_per_epoch = dp_steps_per_epoch(public, int(cfg.get("batch-size", 64)))
    epochs = int(cfg.get("local-epochs", 1))
    noise = float(cfg["noise-multiplier"]) if "noise-multiplier" in cfg else None
    run_id, rnd = str(cfg.get("run-id", "")), int(cfg.get("server-round", 0))
    if noise is None and "target-epsilon" in cfg and bool(cfg.get("dp", True)):
        rounds = int(cfg.get("num-rounds", 1))
        remaining = max(1, rounds - rnd + 1) if rnd >= 1 else rounds
        spent: list = ledger.run_history(spec.site, run_id) if ledger is not None and run_id else []
        done = ledger.count(spec.site, run_id, "gaussian-eval") if spent else 0
        reserved = tuple(spent) + planned_releases(cfg, spec, task, remaining, done, _test_count_released(spec, ledger))
        # a run that ends with on-site personalisation (clients.personalise) reserves its steps at the
        # same noise and sample rate: the target covers the rounds and the personalisation together.
        # (With its own personalise-batch-size the reserve is approximate; the personalisation is
        # calibrated exactly on what the ledger holds then, so the target is never passed either way.)
        from clients.personalise import personalise_steps

        try:
            noise = _calibrated_noise(float(cfg["target-epsilon"]), delta,
                                      1.0 / steps_per_epoch,
                                      remaining * epochs * steps_per_epoch + personalise_steps(cfg, spec, n_train), reserved,
                                      spec.policy.accountant)
        except CalibrationError as exc:
            what = "this run's releases so far and the ones planned" if spent else "the planned metric releases"
            raise JobRefused(f"{spec.department}/{spec.site}: refused: target-epsilon {cfg['target-epsilon']} of run "
                             f"{run_id!r} cannot be kept with round {rnd} ({what} reach it): {exc}") from None
    return JobRequest(
        department=str(cfg.get("department", "")),
        task=str(cfg.get("task", "")),
        run_id=run_id,
        round=rnd,
        dp=bool(cfg.get("dp", True)),
        noise_multiplier=noise,
        clipping_norm=float(cfg["clipping-norm"]) if "clipping-norm" in cfg else None,
        sample_rate=1.0 / steps_per_epoch,
        steps=epochs * steps_per_epoch,
    )


def check_run_cap(run_id: str, rnd: int, spec: "NodeSpec", ledger: PrivacyLedger) -> None:
    """Refuse a training round the policy's ``max_rounds_per_run`` does not leave to ``job``'s run.

    The round numbers are the coordinator's: a training round is numbered from 1 (Flower's server
    rounds), and the run's trainings already in the node's ledger (DP-SGD and non-private rounds,
    pending or committed, replays of a round included) count against the cap, so neither round 0
    nor a repeated round trains a run more often than the policy allows. The cap binds one run; the
    coordinator names runs, so across runs the lifetime ``max_epsilon`` is what binds.

    Parameters
    ----------
    run_id, rnd : str, int
        The job config's ``run-id`` and ``server-round``.

    Raises
    ------
    JobRefused
        Round below 1, or the run has had its ``max_rounds_per_run`` trainings.
    """
    if rnd < 1:
        raise JobRefused(f"{spec.department}/{spec.site}: refused: job config server-round {rnd}: training "
                         "rounds are numbered from 1 (each counts against policy max_rounds_per_run)")
    cap = spec.policy.max_rounds_per_run
    trained = sum(ledger.count(spec.site, run_id, m) for m in TRAINING_MECHANISMS)
    if trained >= cap:
        raise run_cap_refusal(spec, run_id, trained)


#: The ledger mechanisms of a training round (counted against ``max_rounds_per_run``).
TRAINING_MECHANISMS = ("dp-sgd", "non-private")


def run_cap_refusal(spec: "NodeSpec", run_id: str, trained: int) -> "JobRefused":
    """The refusal of a training round past the policy's ``max_rounds_per_run`` (``trained`` so far)."""
    return JobRefused(f"{spec.department}/{spec.site}: refused: run {run_id!r} already trained {trained} "
                      f"time(s) on this node (replayed rounds included), policy max_rounds_per_run = "
                      f"{spec.policy.max_rounds_per_run}")


def train_count(spec: "NodeSpec", ledger: PrivacyLedger, cfg: dict, exact: int) -> int:
    """The released (noised, accounted once) count of the site's ``exact`` training records.

    :func:`clients.counts.released_count` for the training split, with the job config's run, round
    and seed. A job the policy refuses whatever the count (another department or task, DP off
    under ``require_dp``, too little noise asked, too large a clipping norm, a round past the cap)
    is refused here with the policy's reason, before anything is computed from the count (no noise
    calibrated on it, no count released).

    Raises
    ------
    JobRefused
        The policy's conflict, or the count's release does not fit the budget.
    """
    from clients.counts import released_count

    noise = cfg.get("noise-multiplier")
    if noise is None and "target-epsilon" not in cfg:  # nothing to calibrate from: refused as the policy check would
        noise_asked = None
    else:  # a target: the noise is calibrated later, at least the policy's minimum
        noise_asked = float(noise) if noise is not None else spec.policy.min_noise_multiplier
    conflict = job_conflict(spec.policy, department=str(cfg.get("department", "")), task=str(cfg.get("task", "")),
                            dp=bool(cfg.get("dp", True)), noise_multiplier=noise_asked,
                            clipping_norm=float(cfg["clipping-norm"]) if "clipping-norm" in cfg else None,
                            round=int(cfg.get("server-round", 0)))
    if conflict is not None:
        raise JobRefused(f"{spec.department}/{spec.site}: refused: {conflict[1]}")

    return released_count(spec, ledger, "train", exact, run_id=str(cfg.get("run-id", "")),
                          round=int(cfg.get("server-round", 0)), seed=int(cfg.get("seed", 0)))


@dataclass
class TrainPlan:
    """A training job as the node decided it before anything trains (:func:`plan_train`)."""

    job: JobRequest  # the job as the node runs it: its noise multiplier calibrated where it had a target
    public: int  # the released, rounded record count the reply carries
    delta: float  # the site's delta
    replay: bool  # the run asked for this round before (resumed after a crash mid-round)
    loss_release: Release | None  # the round's DP training-loss release, where the policy makes one
    decision: object  # privacy.policy.Decision: check_job's verdict (accepted, reason, epsilon before/after)

    def release(self, spec: "NodeSpec", mechanism: str, noise: float, q: float, steps: int) -> Release:
        """A release of this round (for the ledger), with its delta, run, round and replay mark."""
        return Release(noise_multiplier=noise, sample_rate=q, steps=steps, delta=self.delta, run_id=self.job.run_id,
                       round=self.job.round, site=spec.site, department=spec.department, mechanism=mechanism,
                       replay=self.replay)


def plan_train(cfg: dict, spec: "NodeSpec", ledger: PrivacyLedger, exact: int, task: str) -> TrainPlan:
    """The node's decision on a training job, up to (not including) its ledger write and training.

    The steps :func:`handle_train` takes after the job's numbers and the site's data are checked:
    the run's cap (:func:`check_run_cap`), the released training count (:func:`train_count`; under
    DP it is accounted in ``ledger`` the first time a run asks), the job as the node runs it
    (:func:`job_from_config`: the noise it calibrates for a ``target-epsilon``) and the policy's
    verdict on it (:func:`privacy.policy.check_job`). ``fl-sim run`` calls it on a temporary copy of
    each simulated node's ledger to refuse up front a run every node would refuse.

    Parameters
    ----------
    cfg : dict
        The message's job config (with ``run-id`` and ``server-round``).
    spec : NodeSpec
    ledger : PrivacyLedger
        The node's ledger (written to: the training count's release, where new).
    exact : int
        The site's exact training-record count (it never leaves the node).
    task : str

    Returns
    -------
    TrainPlan
        ``decision.accepted`` False (with its reason) where the policy refuses the job.

    Raises
    ------
    JobRefused
        The run's cap, the policy's conflict, the count's budget, or a target that cannot be kept.
    """
    rel = spec.policy.releases
    check_run_cap(str(cfg.get("run-id", "")), int(cfg.get("server-round", 0)), spec, ledger)
    # under DP, what leaves (steps, sample rate, noise, delta, epsilon, the count) derives from the
    # site's released, noised count (clients.counts), rounded; without DP the round is non-private
    n_count = train_count(spec, ledger, cfg, exact) if bool(cfg.get("dp", True)) else exact
    public, delta = public_count(n_count, spec.policy)
    job = job_from_config(cfg, spec, n_count, task, ledger)
    # the run asked for this round before (resumed after a crash mid-round): counted again, marked
    replay = bool(job.run_id) and ledger.has_round(spec.site, job.run_id, job.round,
                                                   "dp-sgd" if job.dp else "non-private")
    plan = TrainPlan(job=job, public=public, delta=delta, replay=replay, loss_release=None, decision=None)
    if job.dp and rel.train_loss == "dp":
        plan.loss_release = plan.release(spec, "gaussian-train-loss", rel.metric_noise_multiplier, 1.0, 1)
    plan.decision = check_job(spec.policy, job, ledger, spec.site, delta=delta,
                              extra=(plan.loss_release,) if plan.loss_release else ())
    return plan


def _job_fields(job: JobRequest) -> dict:
    return {"run": job.run_id, "round": job.round, "dp": job.dp, "noise_multiplier": job.noise_multiplier,
            "clipping_norm": job.clipping_norm, "sample_rate": job.sample_rate, "steps": job.steps}


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
        Updated weights and whitelisted metrics (:data:`contract.tasks.TRAIN_METRICS`): the record count
        rounded by the policy, epsilon (every release counted), the DP-SGD noise and steps,
        and ``train-loss`` only as a DP release the policy allows.

    Raises
    ------
    JobRefused
        When the node's policy or budget refuses the job.
    """
    if spec.dropout_probability and random.Random(f"{cfg.get('run-id')}/{cfg.get('server-round')}/{spec.site}").random() < spec.dropout_probability:
        raise SimulatedFailure(f"{spec.site}: simulated node failure (dropout probability {spec.dropout_probability})")
    check_job_numbers(cfg, spec)
    optimizer = str(cfg.get("optimizer", "adam"))
    if optimizer not in OPTIMIZERS:  # before the policy check: a job the node cannot run is neither audited nor accounted
        raise JobRefused(f"{spec.department}/{spec.site}: refused: job config optimizer {optimizer!r} is not one of "
                         f"{', '.join(OPTIMIZERS)}")
    model, ds, site = _model_for(spec, str(cfg.get("model", "")) or None, state)
    if len(site.train) == 0:
        raise NoTrainingData(f"{spec.department}/{spec.site}: no training records; no update sent")
    train = site.train.tensors()
    task = ds.schema.task
    rel = spec.policy.releases
    ledger = PrivacyLedger(spec.ledger_path, accountant=spec.policy.accountant)
    try:
        plan = plan_train(cfg, spec, ledger, len(train), task)
    except JobRefused as exc:
        spec.audit("job-refused", run=str(cfg.get("run-id", "")), round=int(cfg.get("server-round", 0)), reason=str(exc))
        raise
    job, public, delta, replay, loss_release, decision = (plan.job, plan.public, plan.delta, plan.replay,
                                                          plan.loss_release, plan.decision)

    def release(mechanism: str, noise: float, q: float, steps: int) -> Release:
        return plan.release(spec, mechanism, noise, q, steps)

    spec.audit("job", task=job.task, model=str(cfg.get("model", "")), **_job_fields(job), config=dict(cfg),
               decision="accepted" if decision.accepted else "refused", reason=decision.reason, replay=replay,
               epsilon_before=decision.epsilon_before, epsilon_after=decision.epsilon_after, delta=delta)
    if not decision.accepted:
        raise JobRefused(f"{spec.department}/{spec.site}: {decision.reason}")
    tc = TrainConfig(epochs=int(cfg.get("local-epochs", 1)), batch_size=int(cfg.get("batch-size", 64)),
                     lr=float(cfg.get("lr", 1e-2)), optimizer=optimizer, seed=int(cfg.get("seed", 0)) * 100_003 + job.round,
                     proximal_mu=float(cfg.get("proximal-mu", 0.0)))
    dp = None
    pending: list[tuple[int, Release]] = []
    # the run's cap again, inside the write that records the round: another process of this node may
    # have trained the run since check_run_cap read the ledger
    cap = (TRAINING_MECHANISMS, spec.policy.max_rounds_per_run)
    try:  # recorded BEFORE training: a crash never under-counts
        if not job.dp:  # allowed by the policy, still a release: the site's epsilon is infinite from now on
            r = release("non-private", 0.0, 1.0, 1)
            pending.append((ledger.begin(r, run_cap=cap), r))
        else:
            dp = DPSettings(noise_multiplier=job.noise_multiplier, max_grad_norm=job.clipping_norm, delta=delta,
                            public_records=public)
            for r in (release("dp-sgd", job.noise_multiplier, job.sample_rate, job.steps), loss_release):
                if r is not None:
                    pending.append((ledger.begin(r, max_epsilon=spec.policy.max_epsilon, delta=delta,
                                                 run_cap=cap if r.mechanism == "dp-sgd" else None), r))
    except (BudgetExceededError, RunCapExceededError) as exc:  # another process spent the budget or the cap
        for rid, _ in pending:
            ledger.abort(rid, f"refused in the ledger's write before training: {type(exc).__name__}")
        # (the ledger's reason without its file's path: the node's file layout stays on the node)
        refusal = run_cap_refusal(spec, job.run_id, exc.done) if isinstance(exc, RunCapExceededError) \
            else JobRefused(f"{spec.department}/{spec.site}: refused: {exc.reason}")
        spec.audit("job-refused", run=job.run_id, round=job.round, reason=str(refusal))
        raise refusal from exc
    before = decision.epsilon_before
    try:
        # without DP, with an own-records candidate to weigh later: the choice's validation records held out
        res = fit(model, round_records(train, task, cfg, job.dp, personalises=spec.policy.personalisation), task, tc, dp)
        loss = None
        if loss_release is not None:
            from clients.training import per_record_statistics

            stats = per_record_statistics(model, site.train, task, loss_only=True)
            loss = noisy_means(stats, {"loss": LOSS_BOUND[task]}, rel.metric_noise_multiplier,
                               count=public).values["loss"]
    except BaseException as exc:
        for rid, _ in pending:
            ledger.abort(rid, f"training failed before any release: {type(exc).__name__}")
        raise
    for rid, r in pending:
        ledger.commit(rid)
        spec.audit("release", run=job.run_id, round=job.round, mechanism=r.mechanism, noise_multiplier=r.noise_multiplier,
                   sample_rate=r.sample_rate, steps=r.steps, delta=delta, replay=r.replay, epsilon_before=before,
                   epsilon_after=ledger.epsilon(spec.site, delta), accountant=ledger.accountant)
    metrics = {
        # under DP the released count; a non-private round (its epsilon is infinite) the records it trained on
        "num-examples": public if job.dp else rounded_count(int(res.num_examples), rel.num_examples_granularity),
        "epsilon": float(ledger.epsilon(spec.site, delta)) if job.dp else float("inf"),
        "noise-multiplier": float(job.noise_multiplier or 0.0) if job.dp else 0.0,
        "steps": int(job.steps),
    }
    if loss is not None:
        metrics["train-loss"] = float(loss)
    if spec.partition_id is not None:
        metrics["partition-id"] = int(spec.partition_id)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, metrics


def _evaluation_target(cfg: dict) -> float | None:
    """The run's ``target-epsilon`` an evaluation must keep: a DP run's, when it names a usable one."""
    if not bool(cfg.get("dp", True)) or "target-epsilon" not in cfg or "noise-multiplier" in cfg:
        return None
    try:
        target = float(cfg["target-epsilon"])
    except (TypeError, ValueError):
        return None
    return target if math.isfinite(target) and target > 0 else None


def _evaluation_epsilon(spec: NodeSpec, ledger: PrivacyLedger, site, run_id: str, rnd: int, seed: int, task: str) -> float:
    """The run's epsilon if it made this evaluation: what it spent, plus the count releases the evaluation would make
    (training and test counts not released yet) and the metric release, at the delta it would be accounted at.

    Nothing is released here. A training count not released yet is taken at the delta of its exact value plus
    :data:`clients.counts.HIGH_DRAW` noise standard deviations (a smaller delta, a larger epsilon), as
    :func:`clients.counts.released_count` checks the budget.
    """
    from clients.counts import HIGH_DRAW, released_count
    from privacy.accounting import epsilon as composed_epsilon

    rel = spec.policy.releases
    sigma = float(rel.count_noise_multiplier)
    extra = []
    if len(site.train) and not ledger.has_released_count(spec.site, "train", len(site.train)):
        extra.append((sigma, 1.0, 1))
        high = len(site.train) + math.ceil(HIGH_DRAW * sigma)
        delta = spec.policy.site_delta(delta_records(high, rel.num_examples_granularity))
    else:  # released before: this returns that value, and releases nothing new
        delta = public_count(released_count(spec, ledger, "train", len(site.train), run_id=run_id, round=rnd, seed=seed)
                             if len(site.train) else 1, spec.policy)[1]
    if not ledger.has_released_count(spec.site, "test", len(site.test)):
        extra.append((sigma, 1.0, 1))
    return composed_epsilon(ledger.run_history(spec.site, run_id) + extra + [(rel.metric_noise_multiplier, 1.0, EVAL_SUMS[task])],
                            delta, ledger.accountant)


def handle_evaluate(state: dict[str, torch.Tensor], cfg: dict, spec: NodeSpec) -> dict:
    """Score the coordinator's model on the node's own test split, if and as the policy allows.

    Evaluation on private records is a release. With the policy's ``[releases]
    local_evaluation = "off"`` (the default) it is refused; with ``"dp"`` the node releases
    noised, clipped metric means (:mod:`privacy.releases`), at most ``max_evaluations_per_run``
    times per run, each recorded in the ledger before it is computed and checked against the
    lifetime budget.

    Returns
    -------
    dict
        Whitelisted metrics (:data:`contract.tasks.EVAL_METRICS`).

    Raises
    ------
    JobRefused
        Evaluation off, another department's or task's job, the per-run cap reached, or the
        budget spent.
    """
    check_job_numbers(cfg, spec)
    rel = spec.policy.releases
    run_id, rnd = str(cfg.get("run-id", "")), int(cfg.get("server-round", 0))

    def refuse(reason: str):
        spec.audit("evaluate", run=run_id, round=rnd, decision="refused", reason=reason)
        return JobRefused(f"{spec.department}/{spec.site}: refused: {reason}")

    if str(cfg.get("department", "")) != spec.policy.department:
        raise refuse(f"department {shown_value(cfg.get('department'))} != policy department "
                     f"{shown_value(spec.policy.department)}")
    if str(cfg.get("task", "")) not in spec.policy.allowed_tasks:
        raise refuse(f"task {shown_value(cfg.get('task'))} not in policy allowed_tasks "
                     f"{shown_value(spec.policy.allowed_tasks)}")
    if rel.local_evaluation == "off":
        raise refuse('local evaluation is off (policy [releases] local_evaluation = "off"): the node\'s test records '
                     "are not scored for the coordinator; score the run on coordinator-held data (run config central-data)")
    if not run_id:
        raise refuse("the evaluate message names no run-id (the per-run evaluation cap needs it)")
    def capped(done: int) -> JobRefused:
        return refuse(f"run {run_id} already had {done} evaluation(s), policy [releases] max_evaluations_per_run = "
                      f"{rel.max_evaluations_per_run}")

    ledger = PrivacyLedger(spec.ledger_path, accountant=spec.policy.accountant)
    done = ledger.count(spec.site, run_id, "gaussian-eval")  # early: a capped run releases no count either
    if done >= rel.max_evaluations_per_run:
        raise capped(done)
    model, ds, site = _model_for(spec, str(cfg.get("model", "")) or None, state)
    task = ds.schema.task
    if len(site.test) == 0:
        out = {"num-examples": 0}
    else:
        # the delta follows the released training count; the means' divisor and num-examples the released
        # test count (each released once, noised and accounted: clients.counts)
        from clients.counts import released_count

        # (released_count itself, not train_count: an evaluate's job-like settings are not checked here, and
        # no fallback to the exact count may reach the reply's epsilon)
        seed = int(cfg.get("seed", 0))
        target = _evaluation_target(cfg)
        if target is not None:  # before any count is released: a refused evaluation releases nothing
            would = _evaluation_epsilon(spec, ledger, site, run_id, rnd, seed, task)
            if would > target * (1 + 1e-9):
                # (the epsilon it would reach is not sent: where the training count is not released yet it is
                # computed at the delta of the exact count)
                raise refuse(f"target-epsilon {target:g} of run {run_id!r} would be passed by this evaluation (one "
                             "evaluation per round is reserved in the run's calibration)")
        delta = public_count(released_count(spec, ledger, "train", len(site.train), run_id=run_id, round=rnd, seed=seed)
                             if len(site.train) else 1, spec.policy)[1]
        r = Release(noise_multiplier=rel.metric_noise_multiplier, sample_rate=1.0, steps=EVAL_SUMS[task], delta=delta,
                    run_id=run_id, round=rnd, site=spec.site, department=spec.department, mechanism="gaussian-eval")
        n_test = rounded_count(released_count(spec, ledger, "test", len(site.test), run_id=run_id, round=rnd, seed=seed,
                                              site_delta=delta), rel.num_examples_granularity)
        before = ledger.epsilon(spec.site, delta)
        try:  # the cap again, in the write: another process of this node may have evaluated the run since
            rid = ledger.begin(r, max_epsilon=spec.policy.max_epsilon, delta=delta,
                               run_cap=(("gaussian-eval",), rel.max_evaluations_per_run))
        except RunCapExceededError as exc:
            raise capped(exc.done) from None
        except BudgetExceededError as exc:  # without the ledger file's path
            raise refuse(exc.reason) from None
        try:
            from clients.training import per_record_statistics

            stats = per_record_statistics(model, site.test, task)
            if task == "binary-classification":
                stats = {k: stats[k] for k in ("accuracy", "loss")}
                bounds = {"accuracy": 1.0, "loss": LOSS_BOUND[task]}
            else:
                stats = {k: v for k, v in stats.items() if k.startswith("mae")}
                bounds = {k: ERROR_BOUND for k in stats}
            if len(stats) != r.steps:
                raise RuntimeError(f"{len(stats)} statistics but {r.steps} accounted")
            released = noisy_means(stats, bounds, rel.metric_noise_multiplier,
                                   count=n_test).values
        except BaseException as exc:
            ledger.abort(rid, f"evaluation failed before any release: {type(exc).__name__}")
            raise
        ledger.commit(rid)
        after = ledger.epsilon(spec.site, delta)
        spec.audit("release", run=run_id, round=rnd, mechanism=r.mechanism, noise_multiplier=r.noise_multiplier,
                   sample_rate=1.0, steps=r.steps, delta=delta, epsilon_before=before, epsilon_after=after,
                   accountant=ledger.accountant)
        if task == "binary-classification":
            out = {"accuracy": released["accuracy"], "loss": released["loss"]}
        else:
            naive = max(min(v for k, v in released.items() if k != "mae"), 0.01)  # noise can reach 0
            out = {"mae-ratio": float(f"{released['mae'] / naive:.4g}")}
        out.update({"num-examples": n_test, "epsilon": float(after)})
    if spec.partition_id is not None:
        out["partition-id"] = int(spec.partition_id)
    return out


def _data_seed(raw) -> int:
    """The ``data-seed`` node-config value as an int >= 0 (a whole number, or its decimal text)."""
    try:
        if isinstance(raw, (bool, float)):
            raise ValueError
        value = int(str(raw).strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"node config 'data-seed': {raw!r} is not a whole number >= 0 (the seed of the node's "
                         "train/test split); fix: set data-seed = 0, or leave it out")
    return value


def node_from_config(node_config: dict, run_config: dict) -> NodeSpec:
    """Build a node's spec from Flower's node config (deployment) or run config (simulation).

    Keys: ``department``, ``site`` (or ``partition-id`` in simulation: the k-th site),
    ``data`` (file; empty = bundled), ``policy`` (TOML file), ``ledger`` (SQLite file) or
    ``ledger-dir`` (simulation: one file per site); simulation only: ``virtual-sites`` (N > 0:
    the node is the ``partition-id``-th of N virtual sites, see
    :mod:`citydata.virtual`), ``partitioner``, ``dirichlet-alpha``, ``virtual-allow-empty``,
    ``dropout-probability``; ``torch-threads`` (> 0: intra-op threads torch may use); ``data-seed``
    (seed of the node's train/test split of its records, default 0; a simulation sets the run's seed).

    A node config that names the ``department`` (``fl-client``'s) is a department node: the
    keys above (:data:`contract.keys.NODE_KEYS`) then come from the node config only, never from the
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
                   float(merged.get("dirichlet-alpha", 0.5)), int(merged.get("seed", 0)),
                   str(merged.get("virtual-allow-empty", False)).lower() in ("1", "true"))
        site = f"virtual-{int(partition)}"
    elif not site:
        sites = _dataset(department, data).sites
        site = sites[int(merged["partition-id"]) % len(sites)]
    site = str(site)
    data_seed = _data_seed(merged.get("data-seed", 0))
    policy = load_policy(merged["policy"])
    if merged.get("ledger"):
        ledger_path = Path(str(merged["ledger"]))
    else:
        ledger_path = Path(str(merged["ledger-dir"])) / f"{department}-{site}.sqlite"
    return NodeSpec(department=department, site=site, data=data, policy=policy, ledger_path=ledger_path,
                    partition_id=None if partition is None else int(partition),
                    dropout_probability=float(merged.get("dropout-probability", 0.0)), virtual=virtual,
                    audit_log=Path(str(merged["audit-log"])) if merged.get("audit-log") else None,
                    audit_key=Path(str(merged["audit-key"])) if merged.get("audit-key") else None, data_seed=data_seed)
