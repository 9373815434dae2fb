"""Which Opacus per-sample-gradient mode a model trains with under ``grad_sample_mode="auto"``.

Opacus 1.6 computes per-sample gradients (or, for ghost clipping, their norms) in four ways:

* ``hooks``: module hooks and one registered grad sampler per layer type (functorch for
  layers without one);
* ``ghost``: ghost clipping, per-sample gradient *norms* without the gradients, then a second
  backward pass of the clipped loss (refuses a layer with a norm sampler applied twice in one
  forward pass: "Parameter tying is not supported with Ghost Clipping");
* ``functorch``: ``torch.func.vmap`` over every layer's gradient;
* ``ew``: PyTorch's expanded weights (``call_for_per_sample_grads``; batch-first inputs only,
  and only the operations expanded weights implement: linear, convolution, embedding and the
  norms; anything else applied to a weight fails in the forward pass).

:data:`AUTO_MODES` orders them per shipped model kind, fastest first, as measured by
``benchmarks/dp_overhead.py`` (README, "DP cost benchmark"); ``hooks`` closes every list, as
the mode that handles the most models. :func:`usable_mode` tries them in that order on a copy of
the model with one zero-valued batch (no record is read, nothing is released, the accountant is
not touched) and returns the first that Opacus accepts, remembered per architecture for the process.
"""

from __future__ import annotations

import copy
import logging
from typing import Sequence

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: The modes :class:`privacy.dp.DPSettings` accepts besides "auto".
GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch", "ew")

#: model kind (``model.config.kind``) -> modes to try, fastest measured first (CPU seconds per epoch,
#: 1 torch thread, batch 64; ``benchmarks/dp_overhead.py``, README "DP cost benchmark": expanded
#: weights fastest on all three, hooks second). Models of another kind use :data:`DEFAULT_AUTO_MODES`.
AUTO_MODES: dict[str, tuple[str, ...]] = {
    "heart-mlp": ("ew", "hooks"),
    "gru": ("ew", "hooks"),
    "patchtst": ("ew", "hooks"),
}

#: Order for a model whose kind is not in :data:`AUTO_MODES` (hooks first: the widest support). Never
#: ghost: it keeps no per-sample gradients, so a record with a non-finite gradient cannot be counted as
#: zero (:func:`privacy.dp.make_private`); ghost only when asked for by name.
DEFAULT_AUTO_MODES: tuple[str, ...] = ("hooks", "functorch")

#: What Opacus (or PyTorch under it) raises when a mode cannot handle a model: ghost clipping's
#: parameter tying and expanded weights' batch-first check raise ``NotImplementedError``;
#: expanded weights on an operation it does not implement, and vmap on an unsupported
#: operation, raise ``RuntimeError``.
REFUSALS: tuple[type[BaseException], ...] = (NotImplementedError, RuntimeError)

log = logging.getLogger("cityfed.dp")

#: :func:`usable_mode`'s answers by architecture (:func:`_signature`): a node trains the same
#: model every round, so it probes once per process, not once per round.
_USABLE: dict[tuple, str] = {}


class NoUsableModeError(ValueError):
    """No per-sample-gradient mode handles the model."""


def candidate_modes(module: nn.Module, requested: str) -> tuple[str, ...]:
    """The modes to try, in order, for ``requested`` ("auto" or one mode).

    Parameters
    ----------
    module : nn.Module
        The model to train (a shared model has ``config.kind``).
    requested : str
        ``DPSettings.grad_sample_mode``.

    Returns
    -------
    tuple of str
        ``(requested,)`` for an explicit mode; for "auto" the kind's :data:`AUTO_MODES` entry
        (or :data:`DEFAULT_AUTO_MODES`) followed by ``hooks`` when not already in it.
    """
    if requested != "auto":
        if requested not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be 'auto' or one of {', '.join(GRAD_SAMPLE_MODES)} "
                             f"(got {requested!r})")
        return (requested,)
    kind = getattr(getattr(module, "config", None), "kind", None)
    order = AUTO_MODES.get(kind, DEFAULT_AUTO_MODES)
    return tuple(order) + (() if "hooks" in order else ("hooks",))


def _zero_batch(dataset, device: torch.device, n: int = 2) -> tuple[torch.Tensor, ...]:
    """``n`` all-zero records shaped like ``dataset[0]`` (its values are never read)."""
    first = dataset[0]
    return tuple(torch.zeros((n, *t.shape), dtype=t.dtype, device=device) for t in first)


def probe(module: nn.Module, criterion: nn.Module, batch: Sequence[torch.Tensor], mode: str, max_grad_norm: float) -> None:
    """One clipped, noise-free DP-SGD step in ``mode`` on deep copies of ``module`` and ``criterion``.

    Raises whatever Opacus raises when ``mode`` cannot handle the model (see :data:`REFUSALS`),
    or ``RuntimeError`` when a trainable parameter got no gradient. The caller's model,
    optimizer, random generators and accountant are untouched (noise 0 draws nothing).
    """
    m = copy.deepcopy(module)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    loader = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))
    result = PrivacyEngine(accountant="rdp").make_private(
        module=m, optimizer=opt, data_loader=loader, criterion=copy.deepcopy(criterion), noise_multiplier=0.0,
        max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode=mode,
    )
    dp_module, dp_opt = result[0], result[1]
    dp_crit = result[2] if len(result) == 4 else criterion
    x, y = batch[0], batch[1]
    dp_opt.zero_grad(set_to_none=True)
    dp_crit(dp_module(x), y).backward()
    dp_opt.step()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(f"grad_sample_mode {mode!r} left no gradient on {', '.join(missing)}")
    if hasattr(dp_module, "remove_hooks"):
        dp_module.remove_hooks()


def _signature(module: nn.Module, criterion: nn.Module, batch: Sequence[torch.Tensor], modes: Sequence[str]) -> tuple:
    """What decides a probe's outcome: module and criterion types, every submodule's type, each
    parameter's name, shape and trainability, the batch's shapes and dtypes, the device, the modes."""
    return (
        type(module), type(criterion), tuple(type(m) for m in module.modules()),
        tuple((n, tuple(p.shape), p.requires_grad) for n, p in module.named_parameters()),
        tuple((tuple(t.shape), t.dtype) for t in batch), str(batch[0].device), tuple(modes),
    )


def usable_mode(module: nn.Module, criterion: nn.Module, dataset, modes: Sequence[str], max_grad_norm: float) -> str:
    """The first of ``modes`` whose :func:`probe` passes on ``module``.

    Parameters
    ----------
    module, criterion : nn.Module
        The model and its (non-private) criterion, as given to :func:`privacy.dp.make_private`.
    dataset
        The training dataset; only the shapes and dtypes of ``dataset[0]`` are used.
    modes : sequence of str
        Candidates in order (:func:`candidate_modes`). A single mode is returned unprobed.
    max_grad_norm : float
        The clipping norm (ghost clipping's criterion needs it).

    Returns
    -------
    str
        The mode; remembered per architecture (:func:`_signature`) for the rest of the process.

    Raises
    ------
    NoUsableModeError
        When every mode is refused; the message names each mode and its reason.
    """
    if len(modes) == 1:
        return modes[0]
    device = next(module.parameters()).device
    batch = _zero_batch(dataset, device)
    key = _signature(module, criterion, batch, modes)
    if key in _USABLE:
        return _USABLE[key]
    refused: list[str] = []
    for mode in modes:
        try:
            probe(module, criterion, batch, mode, max_grad_norm)
        except REFUSALS as err:
            refused.append(f"{mode}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        if refused:
            log.warning("DP-SGD on %s: %s; training with grad_sample_mode %r", type(module).__name__,
                        "; ".join(refused), mode)
        else:
            log.debug("DP-SGD on %s with grad_sample_mode %r", type(module).__name__, mode)
        _USABLE[key] = mode
        return mode
    raise NoUsableModeError(
        f"no Opacus grad_sample_mode handles {type(module).__name__}: " + "; ".join(refused)
        + " (make its layers ones Opacus supports: opacus.validators.ModuleValidator.fix, or DPGRU/DPLSTM for RNNs)")
