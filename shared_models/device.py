"""Where a node trains: CUDA when the node has a GPU it may use, CPU otherwise.

One rule for every place that trains or scores a model (:mod:`clients.training` and :mod:`shared_models.scoring`, hence the
ClientApp's train, evaluate and personalise, and the baselines):

* ``$CITYFED_DEVICE`` (:data:`DEVICE_ENV`) is the node's own choice: ``auto`` (the default),
  ``cpu``, ``cuda`` or ``cuda:N``. A department sets it on the node machine (deployment); it
  is not part of the job, so the coordinator cannot move a node's records to another device.
* ``auto`` picks CUDA when torch sees a CUDA device, except inside a Ray actor that Ray gave
  no GPU (simulation with ``--gpus-per-client 0``): such a client trains on CPU even on a
  GPU machine, whatever Ray does with ``CUDA_VISIBLE_DEVICES`` for GPU-less actors.
* ``cuda`` on a machine without CUDA is an error (never a silent fall-back to CPU).
"""

from __future__ import annotations

import os
import sys

import torch

#: Environment: the node's device choice (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
DEVICE_ENV = "CITYFED_DEVICE"


class DeviceError(ValueError):
    """A bad ``$CITYFED_DEVICE`` (:data:`DEVICE_ENV`): an unknown value, or CUDA where torch sees none.

    Its message names the variable, its value and the fix, and holds no record value: the CLIs'
    error handler (:func:`privacy.safe_cli.describe`) shows it (a plain ``ValueError``'s message
    is hidden, as it might quote a record), and a node's log names the setting.

    Parameters
    ----------
    problem : str
        What is wrong (names the variable and its value).
    fix : str
        What to set instead.

    Attributes
    ----------
    setting : str
        The environment variable (:data:`DEVICE_ENV`).
    """

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix, self.setting = problem, fix, DEVICE_ENV
        super().__init__(f"{problem}; fix: {fix}")


def ray_gpu_grant() -> bool | None:
    """Whether Ray granted GPUs to this process: ``None`` outside a Ray actor.

    Returns
    -------
    bool or None
        ``True``/``False`` inside a Ray actor with/without GPUs assigned (``ray.get_gpu_ids()``);
        ``None`` when Ray is not imported, not initialised, or this is not an actor (a driver,
        the in-process simulation, a deployed node).
    """
    ray = sys.modules.get("ray")
    # a Ray actor runs with Ray fully imported; elsewhere (a simulation's driver) another thread
    # may be importing it right now, so its names may be missing yet: not an actor either way
    if not all(hasattr(ray, n) for n in ("is_initialized", "get_runtime_context", "get_gpu_ids")):
        return None
    if not ray.is_initialized():
        return None
    if ray.get_runtime_context().get_actor_id() is None:
        return None
    return len(ray.get_gpu_ids()) > 0


def choose_device(setting: str, *, cuda_available: bool, gpu_granted: bool | None) -> torch.device:
    """The device for a setting, given what the machine and Ray allow (no side effects).

    Parameters
    ----------
    setting : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (case and surrounding spaces ignored).
    cuda_available : bool
        Whether torch sees a CUDA device.
    gpu_granted : bool or None
        :func:`ray_gpu_grant`: ``False`` = a Ray actor without GPUs (``auto`` then means CPU).

    Returns
    -------
    torch.device

    Raises
    ------
    DeviceError
        An unknown setting, or ``cuda`` asked for where torch sees no CUDA device (a ``ValueError``).
    """
    value = setting.strip().lower()
    if value == "auto":
        return torch.device("cuda" if cuda_available and gpu_granted is not False else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        if not cuda_available:
            raise DeviceError(f"{DEVICE_ENV}={setting!r} but torch {torch.__version__} sees no CUDA device "
                              f"(CUDA build: {torch.version.cuda or 'no'})",
                              f"set {DEVICE_ENV}=auto or cpu (or unset it), or install a CUDA build of torch on a "
                              "machine with an NVIDIA GPU")
        return torch.device(value)
    raise DeviceError(f"{DEVICE_ENV}={setting!r} is not a device",
                      f"set {DEVICE_ENV} to auto, cpu, cuda or cuda:N (or unset it: auto)")


def pick_device() -> torch.device:
    """This node's training device: :func:`choose_device` of ``$CITYFED_DEVICE`` (default ``auto``).

    Returns
    -------
    torch.device

    Raises
    ------
    DeviceError
        A bad ``$CITYFED_DEVICE`` (:func:`choose_device`).
    """
    return choose_device(os.environ.get(DEVICE_ENV, "auto"), cuda_available=torch.cuda.is_available(),
                         gpu_granted=ray_gpu_grant())
