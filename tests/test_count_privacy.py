"""A node's record count leaves only as its policy rounds it.

With ``num_examples_granularity = g`` the reply's ``num-examples`` is rounded to a multiple of
``g``. Everything else that leaves and depends on the count (DP-SGD's steps and sample rate, the
calibrated noise multiplier, the site's delta and so the reported epsilon, the scale of the noise
in the update) must then be derived from the rounded count too, or a coordinator reads the exact
count back from them (``steps = epochs * ceil(n / batch)``, exactly ``n`` at batch size 1).

Under DP the count these derive from is the site's released count (clients.counts: the exact count
plus Gaussian noise, released once and accounted); the tests here fix that noise so that replies for
different exact counts compare.

Also: DP-SGD takes exactly the steps the ledger accounts (Opacus' sampler would take
``int(1 / (1 / k))`` steps, one fewer than ``k`` for k = 93, 99, 105, ...).
"""

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch.utils.data import DataLoader, TensorDataset

from citydata import load_department
from clients.app import app
from clients.node import NodeSpec, delta_records, rounded_count
from clients.training import TrainConfig, fit
from contract.tasks import ENERGY_METRICS
from flower_compat.inprocess import set_task_identity
from privacy.dp import DPSettings, make_private, steps_per_epoch
from privacy.ledger import PrivacyLedger
from shared_models import build_model, criterion_for, default_model_config

warnings.filterwarnings("ignore", category=UserWarning)

POLICY = """
department = "health"
max_epsilon = 8.0
min_noise_multiplier = 0.3
max_clipping_norm = 1.0
allowed_tasks = ["heart-disease"]
max_rounds_per_run = 10
require_dp = true
[releases]
num_examples_granularity = {g}
"""


_REAL_SITE_DATA = NodeSpec.site_data


@pytest.fixture(autouse=True)
def _identity():
    set_task_identity(7, 0, 1)
    yield


class _FixedNoise:
    """Stands in for clients.counts' CSPRNG: the count's Gaussian noise is always ``offset`` records."""

    def __init__(self, offset: float):
        self.offset = offset

    def gauss(self, mu, sigma):
        return mu + self.offset


def _fix_count_noise(monkeypatch, offset: float = 0.0) -> None:
    """The released count is the exact count + ``offset`` (count release: it is noised once per data set)."""
    import clients.counts

    monkeypatch.delenv("CITYFED_DP_SEED_FROM_JOB", raising=False)  # the noise comes from clients.counts._RNG
    monkeypatch.setattr(clients.counts, "_RNG", _FixedNoise(offset))


def _reply(tmp_path, monkeypatch, n: int, g: int, **job):
    """Train message to a Cleveland node that holds only its first ``n`` training records."""
    def first_n(self):
        ds, site = _REAL_SITE_DATA(self)
        train = dataclasses.replace(site.train, X=site.train.X[:n], y=site.train.y[:n])
        return ds, dataclasses.replace(site, train=train)

    monkeypatch.setattr(NodeSpec, "site_data", first_n)
    folder = tmp_path / f"n{n}-g{g}"
    folder.mkdir()
    (folder / "policy.toml").write_text(POLICY.format(g=g))
    ctx = Context(run_id=7, node_id=1, node_config={"department": "health", "site": "Cleveland",
                                                     "policy": str(folder / "policy.toml"),
                                                     "ledger": str(folder / "ledger.sqlite")},
                  state=RecordDict(), run_config={})
    torch.manual_seed(0)
    model = build_model(default_model_config(load_department("health").schema))
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "r1", "server-round": 1,
           "num-rounds": 3, "local-epochs": 1, "batch-size": 8, "lr": 0.01, "dp": True, "clipping-norm": 1.0, **job}
    reply = app(Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(cfg)}),
                        dst_node_id=1, message_type="train"), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = {k: v for k, v in dict(reply.content["metrics"]).items() if k not in ENERGY_METRICS}
    releases = [(r["mechanism"], r["noise_multiplier"], r["sample_rate"], r["steps"], r["delta"])
                for r in PrivacyLedger(folder / "ledger.sqlite").releases("Cleveland")]
    return metrics, releases


@pytest.mark.parametrize("job", [{"target-epsilon": 3.0}, {"noise-multiplier": 1.0}], ids=["target-epsilon", "noise"])
def test_what_leaves_depends_only_on_the_rounded_count(tmp_path, monkeypatch, job):
    # 196..204 all round to 200 at granularity 10; at batch size 8 their exact steps per epoch
    # (25 or 26) and deltas (1/(10 n)) differ: none of it may show in what leaves
    _fix_count_noise(monkeypatch)  # count release: zero count noise, so the released count is n itself
    seen = {n: _reply(tmp_path, monkeypatch, n, 10, **job) for n in (196, 199, 203, 204)}
    first = seen[196]
    assert first[0]["num-examples"] == 200
    for n, (metrics, releases) in seen.items():
        assert metrics == first[0], f"n={n}: the reply differs from n=196's"
        assert releases == first[1], f"n={n}: the ledger's releases differ from n=196's"
    # count release: the count (noise std 10, q = 1, one step) is released first, then DP-SGD's round
    (count, _, _, _, count_delta), (mech, _, q, steps, delta) = first[1]
    assert count == "gaussian-count" and first[1][0][1:4] == (10.0, 1.0, 1) and mech == "dp-sgd"
    # derived from the rounded count: 25 steps, and a delta of a site with at least n records
    assert steps == 25 and q == pytest.approx(1 / 25)
    assert delta <= 1 / (10 * 204) and count_delta <= 1 / (10 * 204)


def test_granularity_one_leaves_the_released_count_unrounded(tmp_path, monkeypatch):
    """Granularity 1 rounds nothing: what leaves follows the released (noised) count, not the exact 203."""
    # count release: the count leaves noised (here by a fixed +7 records: 210, not the exact 203)
    _fix_count_noise(monkeypatch, 7.0)
    metrics, releases = _reply(tmp_path, monkeypatch, 203, 1, **{"noise-multiplier": 1.0})
    (row,) = PrivacyLedger(tmp_path / "n203-g1" / "ledger.sqlite").counts("Cleveland", split="train")
    assert (row["exact"], row["value"]) == (203, 210)
    (count, *_), (mech, _, q, steps, delta) = releases
    assert (count, mech) == ("gaussian-count", "dp-sgd")
    # steps = ceil(210 / 8) = 27 (the exact count's would be 26), delta 1/(10 * 210) (not 1/2030)
    assert metrics["num-examples"] == 210 and steps == metrics["steps"] == 27 and q == pytest.approx(1 / 27)
    assert delta == pytest.approx(1 / 2100)


@pytest.mark.parametrize("n,g", [(1, 10), (4, 10), (5, 10), (15, 10), (25, 10), (203, 10), (203, 1), (1049, 100),
                                 (1050, 100), (7, 3), (8, 3)])
def test_delta_records_is_never_below_the_exact_count(n, g):
    # the delta of the rounded count must be no larger than the exact count's 1/(10 n)
    assert delta_records(n, g) >= n
    assert delta_records(n, g) - rounded_count(n, g) == g // 2  # a function of the rounded count alone


def _data(n: int) -> TensorDataset:
    ds = load_department("health")
    x, y = ds.site_data(ds.sites[0]).train.tensors().tensors
    reps = math.ceil(n / len(x))
    return TensorDataset(x.repeat(reps, 1)[:n], y.repeat(reps)[:n])


@pytest.mark.parametrize("k", [93, 99, 26])
def test_dp_fit_takes_exactly_the_accounted_steps(k):
    ds = load_department("health")
    n = 8 * k - 3  # ceil(n / 8) = k
    assert steps_per_epoch(n, 8) == k
    model = build_model(default_model_config(ds.schema))
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    result = fit(model, _data(n), ds.schema.task, TrainConfig(epochs=2, batch_size=8, lr=1e-3), dp)
    assert result.steps == 2 * k and result.sample_rate == pytest.approx(1 / k)


def test_the_update_noise_scale_follows_the_public_count():
    """Opacus divides the noised sum by the expected batch size ``int(n * q)``: from the public count."""
    ds = load_department("health")
    sizes = set()
    for n in (196, 199, 203, 204):
        model = build_model(default_model_config(ds.schema))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = DataLoader(_data(n), batch_size=8)
        dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, public_records=200)
        private = make_private(model, opt, loader, criterion_for(ds.schema.task), dp, epochs=1,
                               epoch_steps=steps_per_epoch(200, 8))
        assert len(private.loader) == 25 and private.sample_rate == pytest.approx(1 / 25)
        sizes.add(private.optimizer.expected_batch_size)
    assert sizes == {8}


def test_personalisation_reply_depends_only_on_the_rounded_count(tmp_path, monkeypatch):
    from clients.node import node_from_config
    from clients.personalise import handle_personalise

    _fix_count_noise(monkeypatch)  # count release: zero count noise, so the released count is n itself
    seen = []
    for n in (196, 203):
        _reply(tmp_path, monkeypatch, n, 10, **{"target-epsilon": 3.0})  # round 1 of the run, then its personalisation
        folder = tmp_path / f"n{n}-g10"
        policy = folder / "policy.toml"
        policy.write_text(policy.read_text().replace("[releases]", "personalisation = true\n[releases]"))
        spec = node_from_config({"department": "health", "site": "Cleveland", "policy": str(policy),
                                 "ledger": str(folder / "ledger.sqlite")}, {})
        torch.manual_seed(0)
        state = build_model(default_model_config(load_department("health").schema)).state_dict()
        cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "r1",
               "server-round": 3, "num-rounds": 3, "local-epochs": 1, "batch-size": 8, "lr": 0.01, "dp": True,
               "target-epsilon": 3.0, "clipping-norm": 1.0, "personalise-epochs": 2}
        metrics = handle_personalise(state, cfg, spec)
        rows = [(r["mechanism"], r["noise_multiplier"], r["sample_rate"], r["steps"], r["delta"])
                for r in PrivacyLedger(folder / "ledger.sqlite").releases("Cleveland")]
        seen.append((metrics, rows))
    assert seen[0][1][0][0] == "gaussian-count" and [r[0] for r in seen[0][1]].count("gaussian-count") == 1
    assert seen[0][1][-1][0] == "personalisation" and seen[0][0]["steps"] == 2 * 25
    assert seen[0] == seen[1]


def test_a_released_mean_is_divided_by_the_public_count():
    from privacy.releases import noisy_means

    values = {"loss": np.full(203, 0.5)}
    assert noisy_means(values, {"loss": 1.0}, 0.0).values["loss"] == pytest.approx(0.5)  # exact count by default
    assert noisy_means(values, {"loss": 1.0}, 0.0, count=200).values["loss"] == pytest.approx(101.5 / 200, rel=1e-3)
    with pytest.raises(ValueError, match="count"):
        noisy_means(values, {"loss": 1.0}, 1.0, count=0)


def test_a_personalise_message_at_round_0_is_refused_not_calibrated_forever(tmp_path, monkeypatch):
    """Audit finding: round 0 planned 0 DP-SGD steps and Opacus' noise search never ended (the node hung)."""
    import time

    from clients.node import JobRefused, node_from_config
    from clients.personalise import handle_personalise
    from privacy.dp import CalibrationError, calibrate_noise

    folder = tmp_path / "p0"
    folder.mkdir()
    (folder / "policy.toml").write_text(POLICY.format(g=1).replace("[releases]", "personalisation = true\n[releases]"))
    spec = node_from_config({"department": "health", "site": "Cleveland", "policy": str(folder / "policy.toml"),
                             "ledger": str(folder / "ledger.sqlite")}, {})
    state = build_model(default_model_config(load_department("health").schema)).state_dict()
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "r0", "server-round": 0,
           "num-rounds": 3, "local-epochs": 1, "batch-size": 8, "lr": 0.01, "dp": True, "target-epsilon": 3.0,
           "clipping-norm": 1.0, "personalise-epochs": 2}
    t0 = time.monotonic()
    with pytest.raises(JobRefused, match="server-round is 0"):
        handle_personalise(state, cfg, spec)
    assert time.monotonic() - t0 < 30
    with pytest.raises(CalibrationError, match="0 DP-SGD steps"):
        calibrate_noise(3.0, 1e-5, 0.1, 0)


def test_prv_calibration_searches_where_rdp_already_reaches_the_target():
    """Audit finding: with reserved releases whose RDP epsilon reaches the target but whose PRV epsilon
    does not, a PRV node refused a round it could run (the search started from RDP's answer)."""
    from privacy.accounting import epsilon as composed
    from privacy.dp import CalibrationError, calibrate_noise

    delta, reserved = 1e-5, [(1.0, 0.1, 200)]
    rdp, prv = composed(reserved, delta, "rdp"), composed(reserved, delta, "prv")
    assert prv < rdp
    target = (rdp + prv) / 2  # between the two floors
    with pytest.raises(CalibrationError):
        calibrate_noise(target, delta, 0.1, 50, reserved, "rdp")
    sigma = calibrate_noise(target, delta, 0.1, 50, reserved, "prv")
    assert composed([(sigma, 0.1, 50), *reserved], delta, "prv") <= target
