"""The one local training loop (used by baselines now and by the ClientApp).

:func:`fit` trains a shared model on one split, non-privately or with Opacus DP-SGD;
scoring a model on a split in the department's own metric and units is :mod:`shared_models.scoring`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from contract.keys import OPTIMIZERS
from privacy.dp import DPSettings, dp_seeds, make_private, noise_only_step, steps_per_epoch
from shared_models import criterion_for
from shared_models.scoring import pick_device, predict


#: Momentum of the ``"sgd"`` optimizer.
SGD_MOMENTUM = 0.9


@dataclass
class TrainConfig:
    """Local training hyper-parameters."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.0
    seed: int = 0
    #: FedProx proximal weight: adds ``mu * (w - w_global)`` to each step's gradient (0 = off).
    proximal_mu: float = 0.0
    #: Only parameters whose name starts with one of these prefixes are trained (the others stay
    #: frozen, e.g. a per-site head fine-tuned on a shared body); ``None`` = all parameters.
    trainable: tuple[str, ...] | None = None
    #: ``"adam"`` (Adam) or ``"sgd"`` (SGD with momentum :data:`SGD_MOMENTUM`). Under DP-SGD's noise
    #: Adam rescales every coordinate by its (mostly noise) second moment, so its steps are about
    #: ``lr * batch / (noise_multiplier * clipping_norm)`` times the noisy gradient: plain SGD with a
    #: learning rate set by the noise. ``"sgd"`` takes the learning rate as given (README, "Local optimizer").
    optimizer: str = "adam"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)} "
                             "(run config 'optimizer')")


@dataclass
class FitResult:
    """Outcome of :func:`fit` (``epsilon`` is ``None`` for non-private training)."""

    loss: float
    num_examples: int
    steps: int
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    max_grad_norm: float | None = None
    grad_sample_mode: str | None = None
    history: list[float] = field(default_factory=list)
    #: Epochs chosen on a validation split (:func:`clients.selection.fit_selected`); ``None`` = fixed.
    selected_epochs: int | None = None
    #: Validation score per epoch of that search (index 0: before training).
    validation: list[float] | None = None


def fit(
    model: nn.Module,
    data: TensorDataset,
    task: str,
    train: TrainConfig,
    dp: DPSettings | None = None,
    *,
    device: torch.device | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Train ``model`` in place on ``data``.

    Parameters
    ----------
    model : nn.Module
        A shared model (its parameters are updated in place, also under DP).
    data : TensorDataset
        ``(X, y)`` tensors of one split.
    task : str
        ``"binary-classification"`` or ``"forecasting"`` (selects the criterion).
    train : TrainConfig
        Epochs, batch size, learning rate, seed.
    dp : DPSettings, optional
        DP-SGD settings; ``None`` trains without privacy.
    device : torch.device, optional
        Default: the node's device (:func:`shared_models.device.pick_device`: CUDA when present
        and, in a Ray simulation, granted to this client; `$CITYFED_DEVICE` overrides).
    on_epoch : callable, optional
        Called as ``on_epoch(epoch, mean_loss)`` after each epoch (progress bars).

    Returns
    -------
    FitResult
    """
    device = device or pick_device()
    frozen = _freeze(model, train.trainable)
    try:
        return _fit(model, data, task, train, dp, device, on_epoch)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _freeze(model: nn.Module, trainable: tuple[str, ...] | None) -> list[nn.Parameter]:
    """Freeze every parameter outside ``trainable`` (name prefixes); return those frozen."""
    if trainable is None:
        return []
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(tuple(trainable))]
    if len(frozen) == sum(1 for p in model.parameters() if p.requires_grad):
        raise ValueError(f"TrainConfig.trainable {trainable!r} matches no parameter of {type(model).__name__} "
                         f"(names: {', '.join(n for n, _ in model.named_parameters())})")
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _fit(model, data, task, train, dp, device, on_epoch) -> FitResult:
    # under DP, Poisson sampling, the noise and the rest (dropout) are three independent streams,
    # seeded from OS entropy, not from the coordinator's job seed (privacy.dp.dp_seeds): the
    # accountant's bound assumes the noise is independent of the batches
    noise_gen = None
    if dp is None:
        torch.manual_seed(train.seed)
        gen = torch.Generator().manual_seed(train.seed)
    else:
        seeds = dp_seeds(train.seed)
        torch.manual_seed(seeds.other)
        gen = torch.Generator().manual_seed(seeds.sampling)
        noise_gen = torch.Generator(device=torch.device(device)).manual_seed(seeds.noise)
    model.to(device).train()
    criterion = criterion_for(task)
    batch = min(train.batch_size, len(data))
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=gen)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], train)
    private = None
    if dp is not None:
        # steps per epoch from the count the node may reveal (its policy's rounded count), as its ledger accounts
        private = make_private(model, optimizer, loader, criterion, dp, epochs=train.epochs, noise_generator=noise_gen,
                               epoch_steps=steps_per_epoch(dp.public_records or len(data), train.batch_size))
        net, optimizer, criterion, loader = private.module, private.optimizer, private.criterion, private.loader
    else:
        net = model
    params = [p for p in model.parameters() if p.requires_grad]
    # FedProx: the weights the round started from (the global model). The proximal term is
    # data-independent, so it is added *after* Opacus has clipped and noised the data gradient:
    # it costs no privacy and is not clipped away.
    anchors = [p.detach().clone() for p in params] if train.proximal_mu > 0 else None
    steps, history = 0, []
    for epoch in range(train.epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            if len(xb) == 0:
                # Poisson sampling drew no record (only under DP): still a noised, accounted step
                optimizer.zero_grad(set_to_none=True)
                noise_only_step(private.optimizer)
                _add_proximal(params, anchors, train.proximal_mu)
                private.optimizer.original_optimizer.step()
                steps += 1
                continue
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(net(xb), yb)
            loss.backward()
            if private is not None:
                # DPOptimizer.step() == pre_step() (clip, noise, accountant hook) + inner step
                if private.optimizer.pre_step():
                    _add_proximal(params, anchors, train.proximal_mu)
                    private.optimizer.original_optimizer.step()
            else:
                _add_proximal(params, anchors, train.proximal_mu)
                optimizer.step()
            steps += 1
            value = float(loss.item())
            if math.isfinite(value):
                total += value * len(xb)
                count += len(xb)
        mean = total / max(count, 1)
        history.append(mean)
        if on_epoch:
            on_epoch(epoch, mean)
    result = FitResult(loss=history[-1] if history else float("nan"), num_examples=len(data), steps=steps, history=history)
    if private is not None:
        result.epsilon = private.epsilon()
        result.delta = private.delta
        result.noise_multiplier = private.noise_multiplier
        result.sample_rate = private.sample_rate
        result.max_grad_norm = private.max_grad_norm
        result.grad_sample_mode = private.grad_sample_mode
        private.module.remove_hooks() if hasattr(private.module, "remove_hooks") else None
    model.eval()
    return result


def make_optimizer(params: list[nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """The torch optimizer of ``train.optimizer`` over ``params`` (Opacus wraps it under DP).

    Parameters
    ----------
    params : list of nn.Parameter
        The parameters to train.
    train : TrainConfig
        ``optimizer``, ``lr`` and ``weight_decay``.

    Returns
    -------
    torch.optim.Optimizer
        :class:`torch.optim.Adam`, or :class:`torch.optim.SGD` with momentum :data:`SGD_MOMENTUM`.
    """
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=SGD_MOMENTUM, weight_decay=train.weight_decay)
    return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)


@torch.no_grad()
def _add_proximal(params: list[nn.Parameter], anchors: list[torch.Tensor] | None, mu: float) -> None:
    """Add the FedProx term's gradient ``mu * (w - w_anchor)`` to each parameter's gradient."""
    if not anchors or mu <= 0:
        return
    for p, a in zip(params, anchors):
        if p.grad is not None:
            p.grad.add_(p.detach() - a, alpha=mu)


def per_record_statistics(model: nn.Module, split, task: str, *, loss_only: bool = False) -> dict[str, np.ndarray]:
    """One value per record (window) of ``split`` for each statistic a node may release under DP.

    The values feed :func:`privacy.releases.noisy_means`, which clips each to its bound and
    noises the sums; nothing here leaves the node.

    Parameters
    ----------
    model : nn.Module
    split : citydata.base.Split
        A site's train or test split (``X``, ``y``; forecasting: ``naive``).
    task : str
        ``"binary-classification"`` or ``"forecasting"``.
    loss_only : bool
        Only the per-record training criterion (``"loss"``).

    Returns
    -------
    dict of str to ndarray
        ``loss`` (the training criterion per record); with ``loss_only=False`` also
        classification: ``accuracy`` (1 for a correct prediction at threshold 0.5);
        forecasting: ``mae`` (mean absolute error over the horizon, in the window's own units:
        its lookback std, floored) and ``mae-persistence`` / ``mae-seasonal`` (the naive
        forecasts' errors on the same windows, same units).
    """
    out = predict(model, split.X)
    pred = torch.as_tensor(out, dtype=torch.float32)
    target = torch.as_tensor(np.asarray(split.y), dtype=torch.float32)
    crit = criterion_for(task)
    crit.reduction = "none"
    with torch.no_grad():
        stats = {"loss": crit(pred.reshape(target.shape) if task == "binary-classification" else pred, target).numpy()}
    if loss_only:
        return stats
    if task == "binary-classification":
        stats["accuracy"] = ((out > 0).astype(np.float32) == np.asarray(split.y)).astype(np.float64)
        return stats
    n = len(split.y)
    truth = np.asarray(split.y).reshape(n, -1)
    stats["mae"] = np.abs(np.asarray(out).reshape(n, -1) - truth).mean(axis=1)
    for name, naive in (split.naive or {}).items():
        stats[f"mae-{name}"] = np.abs(np.asarray(naive).reshape(n, -1) - truth).mean(axis=1)
    return stats
