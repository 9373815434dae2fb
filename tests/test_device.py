"""Where a node trains (shared_models.device): CUDA when present and granted, CPU otherwise."""

import pytest
import torch

from shared_models.device import DEVICE_ENV, choose_device, pick_device, ray_gpu_grant


def test_auto_uses_cuda_when_present_outside_ray():
    assert choose_device("auto", cuda_available=True, gpu_granted=None) == torch.device("cuda")
    assert choose_device("auto", cuda_available=False, gpu_granted=None) == torch.device("cpu")


def test_auto_stays_on_cpu_in_a_ray_actor_without_gpus():
    # a simulated client given --gpus-per-client 0 on a GPU machine trains on CPU
    assert choose_device("auto", cuda_available=True, gpu_granted=False) == torch.device("cpu")
    assert choose_device("auto", cuda_available=True, gpu_granted=True) == torch.device("cuda")


def test_explicit_settings():
    assert choose_device("cpu", cuda_available=True, gpu_granted=True) == torch.device("cpu")
    assert choose_device(" CUDA:1 ", cuda_available=True, gpu_granted=None) == torch.device("cuda:1")


def test_cuda_without_cuda_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match=rf"{DEVICE_ENV}='cuda'.*sees no CUDA device.*auto or cpu"):
        choose_device("cuda", cuda_available=False, gpu_granted=None)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", ""])
def test_unknown_setting_is_refused(bad):
    with pytest.raises(ValueError, match="is not a device"):
        choose_device(bad, cuda_available=True, gpu_granted=None)


def test_pick_device_follows_torch_and_the_node_setting(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert ray_gpu_grant() is None  # Ray is not initialised in this process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert pick_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(DEVICE_ENV, "auto")
    assert pick_device() == torch.device("cpu")


def test_training_keeps_model_and_data_on_the_chosen_device(monkeypatch):
    """fit() with the default device trains where pick_device says (CPU here) and returns the model there."""
    from torch.utils.data import TensorDataset

    from clients.training import TrainConfig, fit
    from privacy.dp import DPSettings

    monkeypatch.setenv(DEVICE_ENV, "cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1))
    data = TensorDataset(torch.randn(64, 3), (torch.rand(64, 1) > 0.5).float())
    res = fit(model, data, "binary-classification", TrainConfig(epochs=1, batch_size=16),
              DPSettings(noise_multiplier=1.0, grad_sample_mode="hooks"))
    assert res.steps > 0 and res.epsilon is not None
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    if not torch.cuda.is_available():  # the node asked for CUDA on a machine without it: an error, not CPU
        with pytest.raises(ValueError, match="sees no CUDA device"):
            fit(model, data, "binary-classification", TrainConfig(epochs=1, batch_size=16))


def test_a_half_imported_ray_is_not_an_actor(monkeypatch):
    """A simulation's driver may score a model while another thread is still importing ray."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))  # no names yet
    assert ray_gpu_grant() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert pick_device() == torch.device("cuda")
