"""Scoring a model on a site's split: shared by nodes, the coordinator and the simulation harness.

Exact metrics for data the caller holds (the coordinator's ``central-data``, a simulation's
pooled test sets, the baselines); what a department node may *release* about its
records is decided on the node (:mod:`clients.node`: DP-noised releases only).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from shared_models.device import pick_device  # noqa: F401  (also the training loop's default device)


@torch.no_grad()
def predict(model: nn.Module, X: np.ndarray, *, batch_size: int = 1024, device: torch.device | None = None) -> np.ndarray:
    """Model outputs for ``X`` as a numpy array (logits or scaled forecasts)."""
    device = device or pick_device()
    model.to(device).eval()
    outs = [model(torch.as_tensor(X[i : i + batch_size], device=device)).cpu().numpy() for i in range(0, len(X), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,), dtype=np.float32)


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC by the rank-sum (Mann–Whitney) formula, ties averaged; NaN with one class."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def classification_metrics(y: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Accuracy (threshold 0.5) and ROC-AUC."""
    pred = (logits > 0).astype(np.float32)
    return {"accuracy": float((pred == y).mean()), "roc_auc": roc_auc(y, logits), "n": int(len(y))}


def forecast_metrics(site, split, pred_scaled: np.ndarray) -> dict[str, float]:
    """MAE/RMSE in the site's original units, next to the naive baselines on the same windows.

    Every window is taken back to the target's unit with its own statistics
    (:meth:`citydata.base.Split.to_original`), the model's prediction, the truth and the naive
    forecasts alike, so the errors of different windows add up in one unit.
    """
    truth = split.to_original(split.y)
    pred = split.to_original(np.asarray(pred_scaled).reshape(truth.shape))
    err = pred - truth
    out = {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())), "n": int(len(truth))}
    for name, naive in (split.naive or {}).items():
        nerr = split.to_original(naive) - truth
        out[f"mae_{name}"] = float(np.abs(nerr).mean())
        out[f"rmse_{name}"] = float(np.sqrt((nerr**2).mean()))
    naive_maes = [v for k, v in out.items() if k.startswith("mae_")]
    if naive_maes:
        out["mae_naive_best"] = min(naive_maes)
        out["mae_ratio"] = out["mae"] / out["mae_naive_best"] if out["mae_naive_best"] > 0 else float("nan")
    return out


def evaluate(model: nn.Module, site, task: str, split: str = "test") -> dict[str, float]:
    """Score ``model`` on one site's split.

    Parameters
    ----------
    model : nn.Module
    site : citydata.SiteData
    task : str
    split : {"test", "train"}

    Returns
    -------
    dict
        ``accuracy``/``roc_auc`` for classification; ``mae``/``rmse`` (original units),
        naive baselines' MAE/RMSE and ``mae_ratio`` (model MAE / best naive MAE) for forecasting.
    """
    part = site.test if split == "test" else site.train
    out = predict(model, part.X)
    if task == "binary-classification":
        return classification_metrics(part.y, out)
    return forecast_metrics(site, part, out)


def evaluation_metrics(model: nn.Module, site, task: str) -> dict:
    """Exact evaluation metrics of ``model`` on ``site``'s test split, for data the caller holds.

    The coordinator's central evaluation (``central-data``) and the simulation harness use
    it; a department node never sends these (it releases DP-noised metrics only, see
    :func:`clients.node.handle_evaluate`).

    Parameters
    ----------
    model : nn.Module
    site : citydata.SiteData
    task : str
        ``"binary-classification"`` or ``"forecasting"``.

    Returns
    -------
    dict
        ``num-examples`` and, classification: ``accuracy``, ``roc-auc``; forecasting: ``mae``,
        ``rmse``, ``mae-ratio`` (model MAE / best naive MAE). A site without test data reports
        only ``num-examples = 0`` (it then weighs nothing in an aggregate).
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
