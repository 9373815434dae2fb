"""Checks every reply passes before it can touch the global model or the run's records."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from contract.text import peer_text

#: Characters of one node-chosen key (metric or array name) quoted in an exclusion reason.
MAX_QUOTED_KEY = 80


def quoted(keys, n: int) -> str:
    """The first ``n`` of ``keys`` as ``['a', 'b']``, each escaped and cut to :data:`MAX_QUOTED_KEY` (:func:`peer_text`).

    A reply's keys are the node's choice: of any length, and with any character.
    """
    return "[" + ", ".join(f"'{peer_text(str(k), limit=MAX_QUOTED_KEY)}'" for k in list(keys)[:n]) + "]"


def validate_update(arrays: ArrayRecord, global_arrays: dict[str, np.ndarray], max_update_norm: float) -> str | None:
    """Return why a reply must be excluded, or ``None`` if it is acceptable.

    Parameters
    ----------
    arrays : ArrayRecord
        The node's returned model.
    global_arrays : dict of str to np.ndarray
        The global model the node was sent (keys, shapes, dtypes to match).
    max_update_norm : float
        Largest allowed L2 norm of (returned - global) over all arrays.

    Returns
    -------
    str or None
    """
    if set(arrays.keys()) != set(global_arrays):
        missing = sorted(set(global_arrays) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(global_arrays))
        return f"array names differ from the global model (missing {quoted(missing, 3)}, unexpected {quoted(extra, 3)})"
    sq = 0.0
    for name, ref in global_arrays.items():
        try:
            got = arrays[name].numpy()
        except Exception as exc:  # malformed payload
            return f"array {name!r} cannot be decoded: {peer_text(str(exc), limit=200)}"
        if got.shape != ref.shape:
            return f"array {name!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"array {name!r} has dtype {got.dtype}, expected {ref.dtype}"
        if not np.isfinite(got).all():
            return f"array {name!r} contains NaN or infinite values"
        sq += float(np.sum((got.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = sq**0.5
    if norm > max_update_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_update_norm:.3g}"
    return None


def unexpected_metrics(metrics, allowed: tuple[str, ...]) -> str | None:
    """Return why a reply's metrics must not be kept, or ``None`` if every key is whitelisted.

    Parameters
    ----------
    metrics : MetricRecord or dict
        The node's reply metrics.
    allowed : tuple of str
        The reply's whitelist in the job contract (:data:`contract.tasks.TRAIN_METRICS`,
        :data:`contract.tasks.EVAL_METRICS`).

    Returns
    -------
    str or None
        A reason naming the keys outside the whitelist, each escaped and cut (:func:`quoted`; their
        values are never quoted: a key outside the contract may carry anything).
    """
    extra = sorted(set(metrics.keys()) - set(allowed))
    if extra:
        return (f"reply carries metric(s) {quoted(extra, 5)} outside the job contract's whitelist "
                f"(contract.tasks: {', '.join(allowed)}); not recorded")
    return None
