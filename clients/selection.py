"""How many epochs to train, chosen on a validation split of the site's own training records.

Non-private training only. A fixed epoch count favours whichever method it was tuned for: the
comparison's local-only and pooled baselines and each node's personalisation would otherwise be
trained for whatever count someone picked. Here every one of them gets the same rule:

1. hold out the last ``fraction`` of the training windows (forecasting, in time order, after a gap
   of one horizon so that no fit target overlaps a validation target) or a stratified random
   ``fraction`` of the records (classification);
2. train on the rest, scoring the validation part after every epoch (and before the first when
   ``allow_zero``: fine-tuning may be best left undone), stopping ``patience`` epochs after the best;
3. restore the starting weights and train on *all* the training records for the best epoch count.

Nothing here leaves the node: the validation records are the node's own training records, and
the chosen count stays with the model it produced. Under DP-SGD the epoch count is part of the
accounted release and is fixed in advance (selecting it on private records would be an
unaccounted release), so :func:`fit_selected` refuses DP settings.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from clients.training import FitResult, TrainConfig, fit
from shared_models.scoring import predict

#: Share of a site's training records held out to choose the epoch count.
VAL_FRACTION = 0.2
#: Epochs without a better validation score before the search stops (at least; see PATIENCE_STEPS).
PATIENCE = 5
#: ... and at least this many optimiser steps: a small site takes few steps per epoch, and its
#: validation score is noisy (England & Wales' 473 windows at batch 64: 8 steps per epoch; its
#: validation error still falls after 50 epochs).
PATIENCE_STEPS = 300


class _Stop(Exception):
    """Raised from the epoch callback to end the search early."""


def validation_split(data: TensorDataset, task: str, fraction: float = VAL_FRACTION,
                     seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Split one site's training records into a fit part and a validation part.

    Parameters
    ----------
    data : TensorDataset
        ``(X, y)`` of one site's training split (forecasting: windows in time order).
    task : str
        ``"forecasting"``: the last ``fraction`` of the windows is the validation part and the
        ``horizon`` windows before it are dropped (their targets overlap its first targets);
        ``"binary-classification"``: a random ``fraction`` of each class (``seed``).
    fraction : float
        In (0, 1).
    seed : int

    Returns
    -------
    (TensorDataset, TensorDataset)
        The fit part and the validation part, each non-empty.

    Raises
    ------
    ValueError
        ``fraction`` outside (0, 1), or too few records for both parts.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
    X, y = data.tensors[0], data.tensors[1]
    n = len(y)
    if task == "forecasting":
        horizon = int(y.shape[1]) if y.dim() > 1 else 1
        n_val = max(1, int(round(n * fraction)))
        n_fit = n - n_val - horizon
        if n_fit < 1:
            raise ValueError(f"{n} training windows are too few for a validation split of {fraction:g} "
                             f"plus a gap of {horizon} windows")
        fit_idx, val_idx = torch.arange(n_fit), torch.arange(n - n_val, n)
    else:
        gen = np.random.default_rng(seed)
        labels = y.reshape(n).numpy()
        val_parts, fit_parts = [], []
        for cls in np.unique(labels):
            idx = np.flatnonzero(labels == cls)
            gen.shuffle(idx)
            k = int(round(len(idx) * fraction))
            val_parts.append(idx[:k])
            fit_parts.append(idx[k:])
        val_np, fit_np = np.sort(np.concatenate(val_parts)), np.sort(np.concatenate(fit_parts))
        if len(val_np) == 0 or len(fit_np) == 0:
            raise ValueError(f"{n} training records are too few for a validation split of {fraction:g}")
        fit_idx, val_idx = torch.from_numpy(fit_np), torch.from_numpy(val_np)
    return TensorDataset(X[fit_idx], y[fit_idx]), TensorDataset(X[val_idx], y[val_idx])


def validation_score(model: nn.Module, val: TensorDataset, task: str) -> float:
    """Lower is better: mean absolute error in scaled units (forecasting), mean log loss (classification)."""
    was_training = model.training
    with torch.no_grad():
        out = torch.as_tensor(predict(model, val.tensors[0].numpy()))
    model.train(was_training)
    y = val.tensors[1]
    if task == "forecasting":
        return float((out.reshape(y.shape) - y).abs().mean())
    return float(nn.functional.binary_cross_entropy_with_logits(out.reshape(y.shape), y))


def select_epochs(model: nn.Module, fit_part: TensorDataset, val: TensorDataset, task: str, train: TrainConfig,
                  *, patience: int = PATIENCE, allow_zero: bool = False, best: dict | None = None) -> tuple[int, list[float]]:
    """The epoch count (at most ``train.epochs``) with the best validation score; ``model`` is left unchanged.

    The search stops after ``patience`` epochs, and at least :data:`PATIENCE_STEPS` optimiser
    steps, without a better score.

    Parameters
    ----------
    best : dict, optional
        Filled with a copy of the weights (state dict) after the best count, i.e. the model trained
        on ``fit_part`` that scored best on ``val`` (:func:`clients.personalise.choose_kept` scores an
        average of two such models).

    Returns
    -------
    (int, list of float)
        The best count (0 only with ``allow_zero``: the starting weights scored best) and the
        validation score after each epoch (index 0 = before training, ``nan`` without ``allow_zero``).
    """
    start = copy.deepcopy(model.state_dict())
    per_epoch = max(1, math.ceil(len(fit_part) / max(1, min(train.batch_size, len(fit_part)))))
    patience = max(int(patience), math.ceil(PATIENCE_STEPS / per_epoch))
    scores = [validation_score(model, val, task) if allow_zero else math.nan]
    top = [0 if allow_zero else -1, scores[0] if allow_zero else math.inf]
    if best is not None:
        best.clear()
        best.update(start)  # ``start`` is already a copy, and only read from here on

    def on_epoch(epoch: int, _loss: float) -> None:
        score = validation_score(model, val, task)
        scores.append(score)
        if best is not None and (score < top[1] or (epoch == 0 and not allow_zero)):  # as the count returned
            best.clear()
            best.update(copy.deepcopy(model.state_dict()))
        if score < top[1]:
            top[:] = [epoch + 1, score]
        elif epoch + 1 - top[0] >= patience:
            raise _Stop

    try:
        fit(model, fit_part, task, train, None, on_epoch=on_epoch)
    except _Stop:
        pass
    finally:
        model.load_state_dict(start)
    return max(int(top[0]), 0 if allow_zero else 1), scores


def fit_selected(model: nn.Module, data: TensorDataset, task: str, train: TrainConfig, *,
                 split: tuple[TensorDataset, TensorDataset] | None = None, fraction: float = VAL_FRACTION,
                 patience: int = PATIENCE, allow_zero: bool = False, dp=None,
                 on_epoch: Callable[[int, float], None] | None = None) -> FitResult:
    """Train ``model`` in place on ``data`` for the epoch count chosen on a validation split.

    Parameters
    ----------
    model : nn.Module
    data : TensorDataset
        All the training records (what the final training uses).
    task : str
    train : TrainConfig
        ``epochs`` is the most the search tries.
    split : (TensorDataset, TensorDataset), optional
        Fit and validation parts (default :func:`validation_split` of ``data``; a pooled model
        passes the union of its sites' parts).
    fraction, patience, allow_zero
        See :func:`validation_split` and :func:`select_epochs`.
    dp : None
        Must be ``None``: under DP-SGD the epoch count is fixed in advance (module docstring).
    on_epoch : callable, optional
        Progress of the final training.

    Returns
    -------
    FitResult
        Of the final training, with ``selected_epochs`` and ``validation`` (scores per epoch) set.
    """
    if dp is not None:
        raise ValueError("fit_selected trains without DP only: under DP-SGD the epochs are part of the accounted "
                         "release and are fixed in advance; call clients.training.fit")
    fit_part, val = split or validation_split(data, task, fraction, train.seed)
    epochs, scores = select_epochs(model, fit_part, val, task, train, patience=patience, allow_zero=allow_zero)
    return fit_chosen(model, data, task, train, epochs, scores, on_epoch=on_epoch)


def fit_chosen(model: nn.Module, data: TensorDataset, task: str, train: TrainConfig, epochs: int, scores: list[float],
               *, on_epoch: Callable[[int, float], None] | None = None) -> FitResult:
    """The last step of :func:`fit_selected`: train on all of ``data`` for the chosen ``epochs`` (0: leave ``model`` as is).

    ``scores`` is the search's validation curve (:func:`select_epochs`), kept on the result.
    """
    if epochs == 0:
        res = FitResult(loss=math.nan, num_examples=len(data), steps=0)
        model.eval()
    else:
        res = fit(model, data, task, replace(train, epochs=epochs), None, on_epoch=on_epoch)
    res.selected_epochs, res.validation = epochs, scores
    return res
