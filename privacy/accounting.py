"""Privacy accountants of a node's releases: RDP (default) and PRV (tighter), both conservative.

Every release a node makes is a Poisson-subsampled Gaussian mechanism ``(noise_multiplier,
sample_rate, steps)``: a round of DP-SGD at its sampling rate q, or a Gaussian-mechanism metric
release at q = 1 (:mod:`privacy.releases`). A site's epsilon is the composition of all of
them, computed by one of:

``"rdp"``
    Opacus' :class:`~opacus.accountants.RDPAccountant` (Rényi DP, converted to (epsilon,
    delta) at the best of Opacus' default orders). :func:`rdp_epsilon`, memoized per step.
``"prv"``
    Opacus' PRV accountant (numerical composition of privacy loss random variables, Gopi,
    Lee and Wutschitz 2021) over the whole heterogeneous history: each distinct ``(noise,
    q)`` is one PRV composed ``steps`` times, all of them convolved together.
    :func:`prv_epsilon` reports the accountant's **upper bound** (``eps_upper``: the epsilon at
    ``delta - delta_error`` plus ``eps_error``, with ``eps_error = 0.01`` and ``delta_error =
    delta / 1000``, Opacus' defaults), never its estimate, and never more than RDP's value:
    both are upper bounds on the true epsilon, so their minimum is one too. Where Opacus' PRV
    code cannot compute a history (its known "Discrete mean differs significantly" and
    "Cannot compute epsilon" failures, a delta too small for its floating point, a
    discretisation grid over :data:`PRV_MAX_GRID` points), the RDP value is reported: more
    epsilon, never less.

Mixed histories: a ledger's rows record the accountant the node used when it made each
release, but the epsilon of any composition is always the accountant chosen *now* applied to
the *whole* history (both accountants are valid bounds for every row; no per-row mixing).

The PRV computation is Opacus 1.6's ``PRVAccountant.get_epsilon`` step for step
(:func:`prv_bounds`; a test checks equality with it) with two changes that do not alter its
result: the RDP bounds that size its discretisation domain come from the memoized
:func:`rdp_epsilon` (they were 3/4 of its run time), and identical ``(noise, q)`` entries are
merged (composition is commutative). Results are memoized per (history, delta).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings

import numpy as np

__all__ = ["ACCOUNTANTS", "PRV_DELTA_ERROR", "PRV_EPS_ERROR", "PRV_MAX_GRID", "epsilon", "prv_bounds", "prv_epsilon",
           "rdp_epsilon"]

#: Accountants a department policy may choose (``accountant = "rdp"`` or ``"prv"``).
ACCOUNTANTS = ("rdp", "prv")

#: PRV accuracy: the reported bound is the estimate at ``delta - PRV_DELTA_ERROR * delta`` plus
#: ``PRV_EPS_ERROR`` (Opacus' defaults; absolute in epsilon).
PRV_EPS_ERROR = 0.01
PRV_DELTA_ERROR = 1e-3

#: Largest discretisation grid (points) the PRV accountant may use; beyond it RDP is reported.
#: The grid grows with epsilon and with the square root of the total step count; 2^23 points
#: (64 MiB per array) is about epsilon 100 over a few thousand steps.
PRV_MAX_GRID = 1 << 23

_log = logging.getLogger("cityfed.accounting")


History = list[tuple[float, float, int]]


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(noise: float, q: float) -> "np.ndarray":
    """RDP of one Sampled Gaussian step at Opacus' default orders (memoized).

    Opacus evaluates a slowly converging series for every fractional order; with a ledger
    and a simulation of many sites the same ``(noise, q)`` comes back thousands of times.
    RDP is linear in the number of steps, so ``steps * one_step`` is exactly what
    :func:`opacus.accountants.analysis.rdp.compute_rdp` returns.
    """
    from opacus.accountants.analysis.rdp import compute_rdp  # lazy: importing torch costs seconds
    from opacus.accountants.rdp import RDPAccountant

    vec = compute_rdp(q=q, noise_multiplier=noise, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    vec.setflags(write=False)
    return vec


def _merge(history) -> dict[tuple[float, float], int]:
    merged: dict[tuple[float, float], int] = {}
    for noise, q, steps in history:
        merged[(float(noise), float(q))] = merged.get((float(noise), float(q)), 0) + int(steps)
    return merged


def rdp_epsilon(history: History, delta: float) -> float:
    """Epsilon of ``(noise_multiplier, sample_rate, steps)`` releases at ``delta`` (Opacus RDP).

    Parameters
    ----------
    history : list of (float, float, int)
        Releases, as an Opacus ``RDPAccountant.history``.
    delta : float
        Target delta, in (0, 1).

    Returns
    -------
    float
        The value ``RDPAccountant.get_epsilon(delta)`` returns for the same history (same
        orders, same composition, same conversion), 0.0 when ``history`` is empty. The
        per-step RDP of each ``(noise, q)`` is memoized, so repeated queries cost microseconds.
    """
    if not history:
        return 0.0
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1) (got {delta!r})")
    if any(noise <= 0 and q > 0 and steps > 0 for noise, q, steps in history):
        return math.inf  # a noiseless release (a non-private round) has no finite epsilon
    from opacus.accountants.analysis.rdp import get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    # RDP composes additively and is linear in the step count, so releases with the same
    # (noise, q) are merged into one entry: identical epsilon, cost independent of #rounds.
    merged = _merge(history)
    rdp = sum(_rdp_one_step(noise, q) * steps for (noise, q), steps in merged.items())
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


class PRVUnavailable(RuntimeError):
    """Opacus' PRV accountant cannot compute this history (the caller reports RDP instead)."""


@functools.lru_cache(maxsize=2048)
def _prv_bounds(key: tuple[tuple[float, float, int], ...], delta: float, eps_error: float,
                delta_error: float) -> tuple[float, float, float]:
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    counts = [k for _, _, k in key]
    total = sum(counts)
    # Opacus' compute_safe_domain_size (Gopi et al., remark 5.6), with the memoized RDP
    size = rdp_epsilon(list(key), delta_error / 4)
    for noise, q, _ in key:
        size = max(size, rdp_epsilon([(noise, q, 1)], delta_error / (8 * total)))
    size = max(size, eps_error) + 3
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    if not math.isfinite(size) or 2 * size / mesh > PRV_MAX_GRID:
        raise PRVUnavailable(f"discretisation grid of {2 * size / mesh:.3g} points > {PRV_MAX_GRID}")
    domain = Domain.create_aligned(-size, size, mesh)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log(0) at q = 1 inside Opacus' PRV (masked out by its np.where)
        prvs = [TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(q, noise), domain.t_min, domain.t_max)
                for noise, q, _ in key]
        dprv = compose_heterogeneous(dprvs=[discretize(p, domain) for p in prvs], num_self_compositions=counts)
        low, est, up = dprv.compute_epsilon(delta, delta_error, eps_error)
    return float(low), float(est), float(up)


def prv_bounds(history: History, delta: float, *, eps_error: float = PRV_EPS_ERROR,
               delta_error: float | None = None) -> tuple[float, float, float]:
    """Opacus' PRV accountant on ``history``: ``(eps_lower, eps_estimate, eps_upper)`` at ``delta``.

    Entries with ``steps = 0`` or ``sample_rate = 0`` release nothing and are dropped; the rest
    is composed as Opacus' ``PRVAccountant`` does (identical ``(noise, q)`` merged).

    Raises
    ------
    PRVUnavailable
        A noise multiplier of 0 (no privacy), or Opacus' PRV code fails on this history, or its
        grid would exceed :data:`PRV_MAX_GRID`.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1) (got {delta!r})")
    delta_error = delta * PRV_DELTA_ERROR if delta_error is None else float(delta_error)
    merged = {k: v for k, v in _merge(history).items() if v > 0 and k[1] > 0}
    if not merged:
        return 0.0, 0.0, 0.0
    if any(noise <= 0 for noise, _ in merged):
        raise PRVUnavailable("a noise multiplier of 0 has no finite epsilon")
    key = tuple(sorted((noise, q, k) for (noise, q), k in merged.items()))
    try:
        return _prv_bounds(key, float(delta), float(eps_error), delta_error)
    except PRVUnavailable:
        raise
    except (RuntimeError, ValueError, FloatingPointError, OverflowError, MemoryError, ZeroDivisionError) as exc:
        raise PRVUnavailable(f"{type(exc).__name__}: {exc}") from exc


def prv_epsilon(history: History, delta: float) -> float:
    """Epsilon of ``history`` at ``delta`` by the PRV accountant, conservatively.

    ``min(rdp, eps_upper)``: the PRV upper bound (:func:`prv_bounds`), capped by RDP's value
    (both are upper bounds). When the PRV cannot be computed (:class:`PRVUnavailable`), RDP's.
    0.0 for an empty history.
    """
    rdp = rdp_epsilon(history, delta)
    if not history or rdp == 0.0 or not math.isfinite(rdp):
        return rdp
    try:
        upper = prv_bounds(history, delta)[2]
    except PRVUnavailable as exc:
        _log.debug("PRV accountant unavailable (%s): RDP epsilon %.4g reported", exc, rdp)
        return rdp
    if not math.isfinite(upper):
        return rdp
    return float(min(rdp, max(upper, 0.0)))


def epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of ``history`` at ``delta`` by ``accountant`` (one of :data:`ACCOUNTANTS`)."""
    if accountant == "rdp":
        return rdp_epsilon(history, delta)
    if accountant == "prv":
        return prv_epsilon(history, delta)
    raise ValueError(f"accountant must be one of {', '.join(map(repr, ACCOUNTANTS))} (got {accountant!r})")
