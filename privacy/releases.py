"""Gaussian-mechanism releases of clipped per-record sums: a training loss, evaluation metrics.

Besides the DP-SGD update, a node may release (only where its policy's ``[releases]`` table
says so) a few statistics of its records: the training loss of the updated model, and metrics
of a coordinator-supplied model on its own test split. Each is a mean of per-record
contributions; this module makes it a differentially private release:

1. every record contributes one value per statistic, clipped to ``[0, 1]`` (the caller divides
   by the statistic's bound first: a loss by its cap, an error by its cap, a hit by 1);
2. the ``k`` sums over the records get independent Gaussian noise of std ``sigma`` each (one
   record moves each sum by at most 1, so the vector by at most ``sqrt(k)`` in L2);
3. the released value is ``clip((sum + noise) / n, 0, 1) * bound``, post-processing of the
   noisy sum with the record count ``n``, which the policy treats as public (as DP-SGD's
   sample rate does).

The cost is that of ``k`` Gaussian mechanisms with noise multiplier ``sigma``; in RDP this is
exactly the sampled Gaussian at sample rate 1 for ``k`` steps, so the ledger accounts it as
``Release(noise_multiplier=sigma, sample_rate=1.0, steps=k, mechanism=...)`` in the same
history as the DP-SGD rounds (:mod:`privacy.ledger`).

Noise comes from :class:`secrets.SystemRandom` (the operating system's CSPRNG), never from a
seed the coordinator knows. Floating-point attacks on Gaussian samplers (Mironov 2012) are not
mitigated beyond the final clipping and rounding to 4 significant digits.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

__all__ = ["LOSS_BOUND", "ERROR_BOUND", "MetricRelease", "noisy_means"]

#: Cap on one record's loss in a released loss (binary cross-entropy; MSE of window-scaled forecasts).
LOSS_BOUND = {"binary-classification": 2.0, "forecasting": 4.0}
#: Cap on one forecast window's mean absolute error in a released MAE (window units: the window's own
#: lookback std, floored; citydata.forecasting).
ERROR_BOUND = 2.0

_RNG = secrets.SystemRandom()


@dataclass(frozen=True)
class MetricRelease:
    """The released values and what they cost.

    Attributes
    ----------
    values : dict
        Released value per statistic name (already scaled back by its bound).
    noise_multiplier : float
        Noise std of each sum, in units of one record's contribution.
    sums : int
        Number of noised sums (``k``): the ledger's ``steps`` at sample rate 1.
    """

    values: dict[str, float]
    noise_multiplier: float
    sums: int


def noisy_means(contributions: dict[str, np.ndarray], bounds: dict[str, float], noise_multiplier: float,
                count: int | None = None) -> MetricRelease:
    """Release the means of per-record contributions through the Gaussian mechanism.

    Parameters
    ----------
    contributions : dict of str to ndarray
        One array of per-record values per statistic, all of the same length ``n`` (>= 1).
    bounds : dict of str to float
        Each statistic's cap: a record's value is clipped to ``[0, bound]``.
    noise_multiplier : float
        Noise std per sum, in units of the largest contribution (>= 0; 0 releases exact means
        and is refused by every policy, which require >= 1).
    count : int, optional
        The divisor of each noised sum: the count the node may reveal (its policy's rounded count,
        :func:`clients.node.public_count`), so that the released mean derives from the noised sum
        and that count only. Default: the exact number of values.

    Returns
    -------
    MetricRelease
    """
    if not contributions:
        raise ValueError("nothing to release")
    lengths = {len(v) for v in contributions.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError("every statistic needs one value per record, and at least one record")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0 (got {noise_multiplier!r})")
    n = lengths.pop()
    if count is not None:
        if int(count) < 1:
            raise ValueError(f"count must be >= 1 (got {count!r})")
        n = int(count)
    values = {}
    for name, per_record in contributions.items():
        bound = float(bounds[name])
        unit = np.clip(np.nan_to_num(np.asarray(per_record, dtype=np.float64) / bound, nan=1.0, posinf=1.0,
                                     neginf=0.0), 0.0, 1.0)
        noisy = (float(unit.sum()) + _RNG.gauss(0.0, float(noise_multiplier))) / n
        values[name] = float(f"{min(max(noisy, 0.0), 1.0) * bound:.4g}")
    return MetricRelease(values=values, noise_multiplier=float(noise_multiplier), sums=len(contributions))
