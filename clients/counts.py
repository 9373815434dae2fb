"""The site's record counts as they may leave the node: noised once, accounted, reused.

A count computed from the node's records is a release like any other: the exact number of
training records, sent as a reply's ``num-examples`` or readable from DP-SGD's steps, sample
rate and delta, tells apart two data sets that differ in one record. A DP-run node therefore
releases each count once through the Gaussian mechanism (sensitivity 1, noise std the policy's
``[releases] count_noise_multiplier`` records), records it in its ledger (mechanism
``gaussian-count``) and reuses the released value for everything that follows from the count:
reuse is post-processing and costs nothing more. A data set that changes size gets a new release.

The noise comes from the operating system's CSPRNG; in simulation with
``CITYFED_DP_SEED_FROM_JOB=1`` (``fl-sim``, one machine, no adversary) it is seeded from the job's
seed, so that runs repeat.
"""

from __future__ import annotations

import math
import os
import random

from privacy import SEED_FROM_JOB_ENV
from privacy.accounting import epsilon as composed_epsilon
from privacy.ledger import BudgetExceededError, PrivacyLedger, Release

__all__ = ["released_count"]

_RNG = random.SystemRandom()
#: The budget of a count release is checked at the delta of ``exact + HIGH_DRAW * sigma`` records:
#: a Gaussian draw above it has probability below 1e-9.
HIGH_DRAW = 6.0


def released_count(spec, ledger: PrivacyLedger, split: str, exact: int, *, run_id: str, round: int,
                   seed: int = 0, site_delta: float | None = None) -> int:
    """The noised count of the site's ``split`` records that the node's replies derive from.

    Parameters
    ----------
    spec : clients.node.NodeSpec
        The node (its site, department, policy, audit log).
    ledger : PrivacyLedger
        The node's ledger: holds the released value, and accounts a new release.
    split : str
        ``"train"`` or ``"test"``.
    exact : int
        The exact count (>= 1; it never leaves the node).
    run_id, round : str, int
        The run and round that asked first (recorded with a new release).
    seed : int
        The job's seed (used only with ``CITYFED_DP_SEED_FROM_JOB=1``).
    site_delta : float, optional
        The site's delta, where it is known already (it follows the released training count: give
        it for the test split). Default: the training split's own, from the value released.

    Returns
    -------
    int
        ``max(1, round(exact + N(0, sigma^2)))``, the same value every time for this data set.

    Raises
    ------
    clients.node.JobRefused
        A new release would pass the policy's lifetime ``max_epsilon``.
    """
    from clients.node import JobRefused, delta_records, public_count

    policy = spec.policy
    sigma = float(policy.releases.count_noise_multiplier)
    exact = int(exact)
    # the value is not drawn yet, and the site's delta will follow it (a larger count, a smaller delta, a
    # larger epsilon): the budget is checked at the delta of a count HIGH_DRAW standard deviations above the
    # exact one, so the released value cannot take the site past max_epsilon (unless it draws higher still,
    # probability < 1e-9); the committed row records the delta that follows from the released value
    high = exact + math.ceil(HIGH_DRAW * sigma)
    delta = policy.site_delta(delta_records(high, policy.releases.num_examples_granularity)) \
        if site_delta is None else float(site_delta)

    def delta_of(value: int) -> float:
        return public_count(value, policy)[1] if site_delta is None else float(site_delta)

    release = Release(noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=delta, run_id=run_id or "count",
                      round=max(int(round), 0), site=spec.site, department=spec.department,
                      mechanism="gaussian-count")
    if os.environ.get(SEED_FROM_JOB_ENV) == "1":
        rng = random.Random(f"{seed}/{spec.department}/{spec.site}/{split}/{exact}")
    else:
        rng = _RNG
    history_before = ledger.history(spec.site)
    if any(noise <= 0 and q > 0 and steps > 0 for noise, q, steps in history_before):
        raise JobRefused(f"{spec.department}/{spec.site}: refused: this site's records already left without DP (a "
                         "non-private release in the ledger, allowed by policy require_dp = false): its epsilon is "
                         f"infinite, so no DP release stays within max_epsilon {policy.max_epsilon:g}")
    try:
        value, new = ledger.released_count(release, split, exact,
                                           lambda: max(1, round_half(exact + rng.gauss(0.0, sigma))),
                                           max_epsilon=policy.max_epsilon, delta=delta,
                                           delta_of=delta_of)
    except BudgetExceededError as exc:
        # the ledger's message holds an epsilon at a delta computed from the exact count: it stays in the node's log
        from flower_compat.logging import log

        log(30, "cityfed: %s/%s: the %s record count was not released: %s", spec.department, spec.site, split, exc)
        raise JobRefused(f"{spec.department}/{spec.site}: refused: the site's {split} record count cannot be released "
                         f"within policy max_epsilon {policy.max_epsilon:g} (the node's log has the figures)") from None
    if new:  # audited like the other releases, at the delta that follows from the released count
        row_delta = delta_of(value)
        spec.audit("release", run=run_id, round=int(round), mechanism="gaussian-count", split=split,
                   noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=row_delta,
                   epsilon_before=composed_epsilon(history_before, row_delta, ledger.accountant),
                   epsilon_after=ledger.epsilon(spec.site, row_delta), accountant=ledger.accountant)
    return value


def round_half(x: float) -> int:
    """``x`` rounded to the nearest whole number (halves away from zero)."""
    return int(x + 0.5) if x >= 0 else -int(-x + 0.5)
