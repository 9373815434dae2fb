"""DP-SGD's Poisson sampling and its Gaussian noise come from independent random streams.

The sampled-Gaussian bound the ledger accounts for assumes the noise is independent of which
records each step samples. Both used to be seeded with the same 64-bit value (two Mersenne
Twisters in the same state): each noise value was then a fixed function of the uniform draws that
decided the batch, so the first step's noise on the first weight told exactly which records were
in its batch (independent privacy audit, 2026-12-06). The noise now has its own generator, seeded
from its own draw, used for nothing else (dropout and other draws consume another stream).
"""

import math

import pytest
import torch

import opacus.optimizers.optimizer as opacus_optimizer
import opacus.utils.uniform_sampler as uniform_sampler
from citydata import load_department
from clients.training import TrainConfig, fit
from privacy.dp import SEED_FROM_JOB_ENV, DPSettings, dp_seeds
from shared_models import build_model, default_model_config


@pytest.fixture
def captured(monkeypatch):
    """Every Poisson mask drawn and every noise tensor added (with the generator that drew it)."""
    masks, noises = [], []

    def sample(self):
        for _ in range(self.steps):
            m = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            masks.append(m.clone())
            yield m.nonzero(as_tuple=False).reshape(-1).tolist()

    real = opacus_optimizer._generate_noise

    def noise(std, reference, generator=None, secure_mode=False):
        z = real(std, reference, generator, secure_mode)
        noises.append((std, z.detach().clone(), generator))
        return z

    monkeypatch.setattr(uniform_sampler.UniformWithReplacementSampler, "__iter__", sample)
    monkeypatch.setattr(opacus_optimizer, "_generate_noise", noise)
    return masks, noises


def _train(seed=0):
    ds = load_department("health")
    data = ds.site_data("Cleveland").train.tensors()
    torch.manual_seed(0)
    model = build_model(default_model_config(ds.schema, None))
    fit(model, data, ds.schema.task, TrainConfig(epochs=1, batch_size=32, lr=0.01, seed=seed),
        DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, public_records=len(data)))
    return len(data)


def _noise_reveals_the_batch(masks, noises, n) -> bool:
    """True when the first step's noise separates sampled from unsampled records perfectly.

    With one shared Mersenne Twister state, record j's uniform draw u_j (j in 0-7 mod 16) and the
    noise pair (z_j, z_{j+8}) of the first weight are Box-Muller of the same numbers: j is sampled
    (u_j < q) exactly when the pair's radius is below sqrt(-2 ln(1 - q)).
    """
    std, z, _ = next(x for x in noises if x[0] > 0)
    flat = (z / std).reshape(-1).tolist()
    mask = masks[0]
    q = mask.float().mean().item() or 1 / 7
    lim = math.sqrt(-2 * math.log(1 - (1 / math.ceil(n / 32))))
    radius = {j: math.hypot(flat[j], flat[j + 8]) for j in range(min(n, len(flat) - 8)) if j % 16 < 8}
    inside = [r for j, r in radius.items() if mask[j]]
    outside = [r for j, r in radius.items() if not mask[j]]
    assert inside and outside and q > 0
    return max(inside) < lim <= min(outside)


@pytest.mark.parametrize("job_seeded", [False, True])
def test_noise_does_not_reveal_the_batch(captured, monkeypatch, job_seeded):
    if job_seeded:  # simulations: reproducible seeds from the job's
        monkeypatch.setenv(SEED_FROM_JOB_ENV, "1")
    else:
        monkeypatch.delenv(SEED_FROM_JOB_ENV, raising=False)
    n = _train()
    masks, noises = captured
    assert masks and noises
    assert not _noise_reveals_the_batch(masks, noises, n)


def test_noise_has_a_generator_of_its_own(captured, monkeypatch):
    monkeypatch.delenv(SEED_FROM_JOB_ENV, raising=False)
    _train()
    gens = {id(g) for _, _, g in captured[1]}
    assert len(gens) == 1
    g = captured[1][0][2]
    assert g is not None and g is not torch.default_generator  # dropout & co. draw from the default one


def test_seeds_are_distinct_and_reproducible_only_when_job_seeded(monkeypatch):
    monkeypatch.setenv(SEED_FROM_JOB_ENV, "1")
    a, b = dp_seeds(5), dp_seeds(5)
    assert a == b and len(set(a)) == len(a) and dp_seeds(6) != a
    monkeypatch.delenv(SEED_FROM_JOB_ENV)
    c, d = dp_seeds(5), dp_seeds(5)
    assert c != d and len(set(c)) == len(c)
