"""DP-SGD glue around Opacus' ``PrivacyEngine``.

What this module adds to Opacus:

* :class:`DPSettings`, the validated knobs of a private training job;
* :func:`make_private`, which under ``grad_sample_mode="auto"`` trains with the fastest
  per-sample-gradient mode measured for the model kind that Opacus accepts, hooks last
  (:mod:`privacy.grad_modes`), always with Poisson sampling (batches fetched by tensor indexing,
  :mod:`privacy.poisson_loader`); epsilon by the RDP accountant, or the tighter PRV one
  (:mod:`privacy.accounting`);
* a norm sampler for ``nn.Linear`` on inputs with more than 3 dimensions (PatchTST embeds
  ``(batch, channels, patches, patch_len)`` tensors), which Opacus 1.6's ghost clipping
  silently skips, leaving that layer unclipped and the step failing;
* :func:`dp_seeds`: DP-SGD's randomness (Gaussian noise, Poisson sampling) is seeded from the
  operating system's entropy, never from the job's seed, which the coordinator chooses: noise
  it could regenerate, it could subtract. Only a simulation on one machine
  (``CITYFED_DP_SEED_FROM_JOB=1``, set by ``fl-sim``) derives it from the job's seed, to be
  reproducible. The noise, the sampling and the rest (dropout) are three independent streams.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from opacus import PrivacyEngine
from privacy import SEED_FROM_JOB_ENV  # re-exported
from privacy.accounting import ACCOUNTANTS, rdp_epsilon  # re-exported: one cached RDP implementation
from privacy.accounting import epsilon as composed_epsilon
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import linear as _opacus_linear
from opacus.grad_sample.utils import register_norm_sampler
from privacy.grad_modes import candidate_modes, usable_mode
from privacy.poisson_loader import TensorPoissonLoader
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

_linear_norm_sample = _opacus_linear.compute_linear_norm_sample

from flower_compat.logging import route_logs_through_flower  # noqa: E402 - re-exported; after opacus' import

route_logs_through_flower()  # opacus is imported above, so its basicConfig has run


@register_norm_sampler(nn.Linear)
def _linear_norm_sample_nd(layer, activations, backprops):
    """Per-sample gradient norms for ``nn.Linear`` on inputs of any rank (flattened to 3-D)."""
    if backprops.dim() > 3:
        b = backprops.shape[0]
        act = activations[0]
        return _linear_norm_sample(
            layer, [act.reshape(b, -1, act.shape[-1])], backprops.reshape(b, -1, backprops.shape[-1])
        )
    return _linear_norm_sample(layer, activations, backprops)


class DPSettings(BaseModel):
    """Settings of one DP-SGD training job.

    Give either ``target_epsilon`` (the noise multiplier is then calibrated by the accountant
    for the planned number of epochs) or ``noise_multiplier``.
    """

    model_config = ConfigDict(extra="forbid")

    target_epsilon: float | None = Field(default=None, gt=0, description="Epsilon to reach after the planned epochs.")
    noise_multiplier: float | None = Field(default=None, ge=0, description="Gaussian noise std / clipping norm.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Per-sample gradient clipping norm.")
    delta: float | None = Field(
        default=None, gt=0, lt=1, description="Target delta; default 1/(10·n) for n training records."
    )
    grad_sample_mode: Literal["auto", "hooks", "ghost", "functorch", "ew"] = Field(
        default="auto",
        description="Opacus' per-sample-gradient mode; 'auto' = the fastest measured for the model kind that "
        "Opacus accepts, hooks last (privacy.grad_modes.AUTO_MODES). Every mode but 'ghost' counts a record whose "
        "gradient is not finite as contributing zero; ghost clipping keeps no per-sample gradients, so there one "
        "such record makes the update NaN (a node trains with 'auto', which never picks ghost for the shipped "
        "models).",
    )
    accountant: Literal["rdp", "prv"] = Field(
        default="rdp", description="Accountant of calibration and reported epsilon (privacy.accounting)."
    )
    public_records: int | None = Field(
        default=None, ge=1,
        description="The record count that may be known outside the node (its policy's rounded count): the steps "
        "per epoch, the sample rate and the expected batch size that scales the noise are derived from it, so "
        "that the update does not reveal the exact count. None: the exact count.",
    )




class DPSeeds(NamedTuple):
    """Seeds of one DP-SGD training call's three random streams (:func:`dp_seeds`)."""

    sampling: int  #: Poisson sampling: which records each step's batch holds
    noise: int  #: the Gaussian noise added to each step's clipped sum, on a generator used for nothing else
    other: int  #: torch's default generators: dropout and any other draw of the model


def dp_seeds(job_seed: int) -> DPSeeds:
    """Independent seeds for DP-SGD's sampling, its noise, and everything else.

    The sampled-Gaussian bound the ledger accounts for assumes the noise is independent of the
    batches. Two torch generators seeded alike (Mersenne Twister) yield the same uniform draws,
    so one seed for both made each noise value a function of the draws that chose the batch. And
    a stream shared with dropout would move the noise by how many records earlier steps drew. So
    each stream has its own seed: three draws from the operating system (``os.urandom``, as
    :func:`dp_seed`), or with ``CITYFED_DP_SEED_FROM_JOB=1`` (simulations) three seeds derived from
    the job's by SHA-256 (reproducible, still distinct).

    Parameters
    ----------
    job_seed : int
        The job's seed (used only in simulations).

    Returns
    -------
    DPSeeds
    """
    if os.environ.get(SEED_FROM_JOB_ENV, "") == "1":
        def derive(stream: str) -> int:
            digest = hashlib.sha256(f"cityfed-dp:{int(job_seed)}:{stream}".encode()).digest()
            return int.from_bytes(digest[:8], "little")
    else:
        def derive(stream: str) -> int:
            return int.from_bytes(os.urandom(8), "little")
    return DPSeeds(derive("sampling"), derive("noise"), derive("other"))


def dp_seed(job_seed: int) -> int:
    """The seed of one DP-SGD training call's randomness (noise and Poisson sampling).

    64 bits from the operating system (``os.urandom``), so nobody who knows the job, its seed
    included, can regenerate the noise and subtract it from an update (or, under SecAgg+, from
    the sum). With ``CITYFED_DP_SEED_FROM_JOB=1`` (simulations) it is ``job_seed``.

    The generator seeded with it is torch's (Mersenne Twister on CPU, Philox on CUDA), not a
    cryptographic one: Opacus' ``secure_mode`` needs the ``torchcsprng`` package, which has no
    build for this torch.
    """
    if os.environ.get(SEED_FROM_JOB_ENV, "") == "1":
        return int(job_seed)
    return int.from_bytes(os.urandom(8), "little")


def steps_per_epoch(n_records: int, batch_size: int) -> int:
    """DP-SGD steps of one epoch over ``n_records`` at ``batch_size``: ``max(1, ceil(n / batch))``.

    The node's ledger accounts these steps at sample rate ``1 / steps_per_epoch`` (Poisson
    sampling: each record joins each step's batch with that probability), and
    :func:`make_private` takes exactly them.

    Parameters
    ----------
    n_records : int
        The count the steps derive from: the node's public (rounded) count where its policy
        rounds counts, else the exact one.
    batch_size : int
        The job's batch size (>= 1).

    Returns
    -------
    int
    """
    return max(1, math.ceil(int(n_records) / max(int(batch_size), 1)))


class _PlannedSteps(torch.utils.data.Sampler):
    """A batch sampler that only has a length: what Opacus reads of the loader it replaces."""

    def __init__(self, steps: int):
        self.steps = int(steps)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        raise RuntimeError("_PlannedSteps is only measured (Opacus replaces it by its Poisson sampler)")


def default_delta(n_records: int) -> float:
    """Delta = min(1/(10·n), 1e-3): well below the 1/n at which one record could leak outright.

    A site of fewer than 100 records gets :data:`privacy.policy.MAX_DELTA` (1/(10·n) would be above it).
    """
    from privacy.policy import default_site_delta

    return default_site_delta(n_records)


@dataclass
class PrivateTraining:
    """What :func:`make_private` returns: the wrapped training objects and the DP parameters used."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    loader: torch.utils.data.DataLoader
    engine: PrivacyEngine
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float
    grad_sample_mode: str
    accountant: str = "rdp"

    def epsilon(self) -> float:
        """Epsilon spent so far (the engine's step history, by :attr:`accountant`), at :attr:`delta`."""
        return composed_epsilon(list(self.engine.accountant.history), self.delta, self.accountant)


class CalibrationError(ValueError):
    """No noise multiplier reaches the target: the reserved releases alone spend it."""


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    reserved: tuple[tuple[float, float, int], ...] | list = (), accountant: str = "rdp") -> float:
    """Noise multiplier reaching ``target_epsilon`` after ``steps`` Poisson-sampled steps.

    Parameters
    ----------
    target_epsilon, delta : float
        The whole run's target, at the site's delta.
    sample_rate : float
        Poisson sampling rate of DP-SGD.
    steps : int
        DP-SGD steps of the whole run.
    reserved : sequence of (noise_multiplier, sample_rate, steps)
        Other releases planned in the same run (DP training losses, DP evaluation metrics;
        :mod:`privacy.releases`): the DP-SGD noise is calibrated so that everything together
        stays at or below ``target_epsilon``.
    accountant : {"rdp", "prv"}
        The accountant the node's ledger uses (:mod:`privacy.accounting`; the department
        policy's ``accountant``). The result is the smallest noise (within 0.1 %) whose
        composition with ``reserved``, computed by exactly that accountant, is at most
        ``target_epsilon``; "prv" gives less noise for the same target (its epsilon is tighter).

    Raises
    ------
    CalibrationError
        When the reserved releases alone reach ``target_epsilon``.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(map(repr, ACCOUNTANTS))} (got {accountant!r})")
    if int(steps) < 1:  # no step: no noise multiplier changes anything (Opacus' search would never end)
        raise CalibrationError(f"nothing to calibrate: {steps} DP-SGD steps planned")
    reserved = [(float(n), float(q), int(k)) for n, q, k in reserved]
    if not reserved and accountant == "rdp":
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp"
            )
        )

    def eps(sigma: float) -> float:
        return composed_epsilon([(sigma, sample_rate, steps), *reserved], delta, accountant)

    floor = composed_epsilon(reserved, delta, accountant)
    if floor >= target_epsilon:
        raise CalibrationError(
            f"the releases already made or reserved spend epsilon {floor:.3g} >= target {target_epsilon:g} without "
            "any further DP-SGD step (metric releases: fewer evaluations, a larger metric_noise_multiplier or "
            "train_loss = \"off\" in the policy's [releases])")
    tol = 1e-3  # the smallest noise (within 0.1 %) that stays on target: err on the noisy side
    if accountant == "rdp":
        lo, hi = 0.0, 1.0
        while eps(hi) > target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise CalibrationError(f"no noise multiplier below 1e6 reaches epsilon {target_epsilon:g}")
        while hi - lo > tol * hi:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
        return float(hi)
    # PRV: each evaluation costs ~0.1-1 s, so start from RDP's noise (PRV's epsilon is never above
    # RDP's, so it stays on target) and search below it by Illinois regula falsi in log-log space
    try:
        hi = calibrate_noise(target_epsilon, delta, sample_rate, steps, reserved, "rdp")
    except CalibrationError:  # RDP's floor reaches the target but PRV's (lower) does not: search up with PRV
        hi = 1.0
        while eps(hi) > target_epsilon:
            hi *= 2
            if hi > 1e6:
                raise CalibrationError(f"no noise multiplier below 1e6 reaches epsilon {target_epsilon:g}") from None
    e_hi = eps(hi)
    lo = hi * 0.8
    while (e_lo := eps(lo)) <= target_epsilon:
        hi, e_hi, lo = lo, e_lo, lo * 0.8
        if lo < 1e-3:
            return float(hi)
    f_lo, f_hi = math.log(e_lo / target_epsilon), math.log(max(e_hi, 1e-300) / target_epsilon)
    side = 0
    for _ in range(60):
        if hi - lo <= tol * hi:
            break
        if f_lo > 0 > f_hi and math.isfinite(f_lo) and math.isfinite(f_hi):
            x = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * f_lo / (f_lo - f_hi))
        else:
            x = (lo + hi) / 2
        if not lo < x < hi:
            x = (lo + hi) / 2
        e_x = eps(x)
        f_x = math.log(max(e_x, 1e-300) / target_epsilon)
        if e_x <= target_epsilon:
            hi, f_hi = x, f_x
            if side == -1:
                f_lo /= 2  # Illinois: the same end kept twice, weigh it down
            side = -1
        else:
            lo, f_lo = x, f_x
            if side == 1:
                f_hi /= 2
            side = 1
    else:  # never seen, but never loop forever: finish by bisection
        while hi - lo > tol * hi:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return float(hi)


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    criterion: nn.Module,
    settings: DPSettings,
    *,
    epochs: int,
    n_records: int | None = None,
    noise_generator: torch.Generator | None = None,
    epoch_steps: int | None = None,
) -> PrivateTraining:
    """Wrap model, optimizer, criterion and loader for DP-SGD with Poisson sampling.

    Parameters
    ----------
    module, optimizer, loader, criterion
        The non-private training objects (criterion must return one loss per sample when
        ``reduction='none'``, see :mod:`shared_models.losses`).
    settings : DPSettings
        Target epsilon or noise multiplier, clipping norm, delta, per-sample-gradient mode
        ("auto": the first of :func:`privacy.grad_modes.candidate_modes` that Opacus accepts
        for the model; the mode used is ``PrivateTraining.grad_sample_mode``).
    epochs : int
        Planned epochs (used to calibrate noise for ``target_epsilon``).
    n_records : int, optional
        Training records (for the default delta); defaults to ``len(loader.dataset)``.
    epoch_steps : int, optional
        Steps per epoch (:func:`steps_per_epoch` of the job's batch size and the count it may
        reveal, ``settings.public_records``); default ``len(loader)``. The sample rate is its
        inverse, and exactly this many Poisson batches are drawn per epoch (Opacus' own sampler
        would draw ``int(1 / (1 / k))``, one fewer for k = 93, 99, 105, ...).

    Returns
    -------
    PrivateTraining
    """
    n = n_records if n_records is not None else len(loader.dataset)
    delta = settings.delta if settings.delta is not None else default_delta(n)
    k = int(epoch_steps) if epoch_steps is not None else len(loader)
    sample_rate = 1.0 / k
    # Opacus reads only the loader's length (sample rate 1/len) and its dataset and settings
    planned = torch.utils.data.DataLoader(loader.dataset, batch_sampler=_PlannedSteps(k), generator=loader.generator,
                                          collate_fn=loader.collate_fn, num_workers=loader.num_workers)
    if settings.noise_multiplier is not None:
        noise = settings.noise_multiplier
    elif settings.target_epsilon is not None:
        noise = calibrate_noise(settings.target_epsilon, delta, sample_rate, epochs * k,
                                accountant=settings.accountant)
    else:
        raise ValueError("DPSettings needs target_epsilon or noise_multiplier")
    mode = usable_mode(module, criterion, loader.dataset, candidate_modes(module, settings.grad_sample_mode),
                       settings.max_grad_norm)
    engine = PrivacyEngine(accountant="rdp")  # only its step history is read (PrivateTraining.epsilon)
    result = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=planned,
        criterion=criterion,
        noise_multiplier=noise,
        max_grad_norm=settings.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=mode,
        noise_generator=noise_generator,
    )
    if mode == "ghost":
        dp_module, dp_opt, dp_crit, dp_loader = result
    else:
        dp_module, dp_opt, dp_loader = result
        dp_crit = criterion
    _exact_plan(engine, dp_opt, dp_loader, k, settings.public_records or len(loader.dataset))
    if mode != "ghost":  # ghost clipping keeps no per-sample gradients to check (see DPSettings.grad_sample_mode)
        _finite_contributions(dp_opt)
    if TensorPoissonLoader.applies_to(dp_loader):  # the same Poisson draws, fetched by tensor indexing
        dp_loader = TensorPoissonLoader(dp_loader)
    return PrivateTraining(
        module=dp_module,
        optimizer=dp_opt,
        criterion=dp_crit,
        loader=dp_loader,
        engine=engine,
        noise_multiplier=float(noise),
        max_grad_norm=settings.max_grad_norm,
        sample_rate=sample_rate,
        delta=delta,
        grad_sample_mode=mode,
        accountant=settings.accountant,
    )


def _finite_contributions(optimizer) -> None:
    """Make every record's contribution finite before Opacus clips it: a non-finite one counts as zero.

    Opacus clips a record's gradient by ``C / (norm + 1e-6)``: an infinite norm gives the factor 0
    and ``0 * inf`` is NaN, so one record's non-finite gradient made the whole noised update NaN.
    The coordinator chooses the weights, so it can make exactly the records above a threshold
    of its choosing overflow, and a NaN update (or SecAgg+'s "update not finite") told it,
    without noise and without any ledger row, whether a sampled record met its condition
    (a binary search on one feature took 12 messages). Here such a record's per-sample gradient
    is set to zero in every parameter before clipping: its contribution (norm 0 <= C) is within
    the clipping bound the accounting assumes, so the noised update stays a DP release and is
    finite. Records whose gradients are finite are untouched.
    """
    original = optimizer.clip_and_accumulate

    def clip_and_accumulate():
        params = [p for p in optimizer.params if getattr(p, "grad_sample", None) is not None]
        for p in params:
            if isinstance(p.grad_sample, list):  # accumulated batches (Poisson sampling forbids it): one tensor
                p.grad_sample = torch.cat(p.grad_sample, dim=0)
        if params and len(params[0].grad_sample):
            finite = None
            for p in params:
                ok = torch.isfinite(p.grad_sample.reshape(len(p.grad_sample), -1)).all(dim=1)
                finite = ok if finite is None else finite & ok.to(finite.device)
            if not bool(finite.all()):
                for p in params:
                    p.grad_sample[~finite.to(p.grad_sample.device)] = 0
        return original()

    optimizer.clip_and_accumulate = clip_and_accumulate


def _exact_plan(engine: PrivacyEngine, optimizer, dp_loader, steps: int, count: int) -> None:
    """Make Opacus' loader, accountant hook and noise scale follow the plan of ``steps`` per epoch.

    Opacus derives three things from the loader and the exact dataset size: the sampler's steps
    (``int(1 / sample_rate)``, which floating point makes ``k - 1`` for some ``k``), the sample
    rate its accountant records (``1 / len(loader)`` of that sampler) and the expected batch size
    that divides the noised sum (``int(n * sample_rate)``: the exact count, readable from the
    update's noise level). Here they are ``steps``, ``1 / steps`` and ``int(count / steps)`` of the
    count the node may reveal.
    """
    dp_loader.batch_sampler.steps = int(steps)
    optimizer.expected_batch_size = max(1, int(count * (1.0 / steps)))
    optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=1.0 / steps))


def noise_only_step(optimizer) -> bool:
    """DP-SGD's step for a Poisson batch that drew no record: zero clipped sum, full noise.

    The accounting (the node's ledger and Opacus' accountant) counts every one of the
    ``epochs * ceil(n / batch)`` steps as a release of a noised sum at the sample rate, empty
    draws included; skipping an empty draw would release "no step", which the update shows, and
    the sampled-Gaussian bound would no longer hold. The models cannot run a forward pass on zero
    records (GRU and PatchTST reshape by batch size; expanded weights refuse a batch of 0), so this
    does what :meth:`opacus.optimizers.DPOptimizer.pre_step` does for such a batch without one: each
    trainable parameter's clipped sum is zero, Opacus' ``add_noise`` adds
    ``N(0, (noise_multiplier * max_grad_norm)^2)`` from the optimizer's generator, the result is
    divided by the expected batch size, and the step hook (the engine's accountant) records the step.

    Parameters
    ----------
    optimizer : opacus.optimizers.DPOptimizer
        The private optimizer (any of Opacus' per-sample-gradient modes), after ``zero_grad``.

    Returns
    -------
    bool
        True, like ``pre_step``: the caller then runs the inner optimizer's step.
    """
    for p in optimizer.params:
        p.summed_grad = torch.zeros_like(p)
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # one accumulated (empty) batch
    optimizer.add_noise()
    if optimizer.loss_reduction == "mean":
        for p in optimizer.params:
            p.grad /= optimizer.expected_batch_size
    if optimizer.step_hook:
        optimizer.step_hook(optimizer)
    return True
