"""The rounds' local optimizer (run config ``optimizer``: adam or sgd): validated where it is set,
carried to the node in the job config, used by the one training loop, with and without DP-SGD."""

import os
import warnings

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st
from pydantic import ValidationError

from citydata import load_department
from clients.node import handle_train
from clients.training import OPTIMIZERS, SGD_MOMENTUM, TrainConfig, fit, make_optimizer
from contract.keys import JOB_KEYS
from privacy.dp import DPSettings

warnings.filterwarnings("ignore", category=UserWarning)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# the health node of the personalisation tests (policy, initial model), reused
from test_personalise_own import SITE, _equal, _init, _spec  # noqa: E402


def _train():
    return load_department("health").site_data(SITE).train.tensors()


def test_make_optimizer_builds_adam_or_sgd_with_momentum():
    params = list(_init().parameters())
    adam = make_optimizer(params, TrainConfig(lr=0.02))
    assert type(adam) is torch.optim.Adam and adam.defaults["lr"] == 0.02
    sgd = make_optimizer(params, TrainConfig(lr=0.3, optimizer="sgd", weight_decay=1e-4))
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["lr"] == 0.3 and sgd.defaults["momentum"] == SGD_MOMENTUM == 0.9
    assert sgd.defaults["weight_decay"] == 1e-4


@hsettings(max_examples=40, deadline=None)
@given(st.text(max_size=12).filter(lambda s: s not in OPTIMIZERS))
def test_train_config_rejects_an_unknown_optimizer_naming_the_key(name):
    with pytest.raises(ValueError) as err:
        TrainConfig(optimizer=name)
    assert "optimizer" in str(err.value) and "adam, sgd" in str(err.value)


@pytest.mark.parametrize("dp", [False, True], ids=["non-private", "dp-sgd"])
def test_sgd_trains_and_lowers_the_loss(dp):
    """Both optimizers train through the one loop; under DP Opacus wraps the SGD optimizer."""
    train = _train()
    model = _init()
    crit = torch.nn.BCEWithLogitsLoss()
    X, y = train.tensors
    before = float(crit(model(X), y))
    settings = DPSettings(target_epsilon=8.0, max_grad_norm=1.0) if dp else None
    res = fit(model, train, "binary-classification", TrainConfig(epochs=10, batch_size=64, lr=0.1, optimizer="sgd"),
              settings)
    after = float(crit(model(X), y))
    assert after < before - 0.05
    assert (res.epsilon is not None) == dp and (not dp or res.epsilon <= 8.0 + 1e-6)


def test_sgd_and_adam_give_different_models():
    """The key is not ignored: the same job with the other optimizer trains other weights."""
    a, b = _init(), _init()
    fit(a, _train(), "binary-classification", TrainConfig(epochs=2, batch_size=32, lr=0.01, seed=1), None)
    fit(b, _train(), "binary-classification", TrainConfig(epochs=2, batch_size=32, lr=0.01, seed=1, optimizer="sgd"), None)
    assert not _equal(a.state_dict(), b.state_dict())


def test_run_config_validates_the_optimizer_and_sends_it_to_nodes():
    from server.app import DEFAULTS, job_config, settings

    assert DEFAULTS["optimizer"] == "adam"
    assert "optimizer" in JOB_KEYS
    cfg = settings({"department": "health", "optimizer": "sgd"})
    assert job_config(cfg, "r")["optimizer"] == "sgd"
    assert job_config(settings({"department": "health"}), "r")["optimizer"] == "adam"
    with pytest.raises((ValidationError, ValueError)) as err:
        settings({"department": "health", "optimizer": "rmsprop"})
    assert "optimizer" in str(err.value)


def _cfg(**over):
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "r1", "server-round": 2,
           "num-rounds": 3, "local-epochs": 1, "batch-size": 32, "lr": 0.1, "dp": False, "seed": 0}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("optimizer", ["sgd", "adam", None], ids=["sgd", "adam", "absent"])
def test_node_trains_its_round_with_the_job_configs_optimizer(tmp_path, optimizer):
    """A node's round equals the one training loop with the job's optimizer (absent: Adam, as before)."""
    over = {} if optimizer is None else {"optimizer": optimizer}
    state = {k: v.detach().clone() for k, v in _init().state_dict().items()}
    out, metrics = handle_train(state, _cfg(**over), _spec(tmp_path))
    ref = _init()
    fit(ref, _train(), "binary-classification",
        TrainConfig(epochs=1, batch_size=32, lr=0.1, seed=2, optimizer=optimizer or "adam"), None)
    assert _equal(out, ref.state_dict())


@pytest.mark.parametrize("dp", [False, True], ids=["non-private", "dp"])
def test_node_refuses_an_unknown_optimizer_before_its_policy_check(tmp_path, dp):
    """A coordinator's unknown optimizer is a refusal naming the key and the choices, before the
    policy check: nothing is trained, audited as accepted, or recorded in the ledger."""
    from clients.node import JobRefused
    from privacy.ledger import PrivacyLedger

    spec = _spec(tmp_path)
    state = {k: v.detach().clone() for k, v in _init().state_dict().items()}
    with pytest.raises(JobRefused, match="optimizer 'lbfgs' is not one of adam, sgd"):
        handle_train(state, _cfg(optimizer="lbfgs", dp=dp, **({"target-epsilon": 3.0, "clipping-norm": 1.0} if dp else {})), spec)
    audit = tmp_path / "audit.jsonl"
    assert not audit.exists() or '"job"' not in audit.read_text()
    assert PrivacyLedger(spec.ledger_path).run_history(SITE, "r1") == []


def _fl_sim_run(*args: str):
    from typer.testing import CliRunner

    from simulations.cli import app

    res = CliRunner().invoke(app, ["run", *args], env={"COLUMNS": "200"})
    return res.exit_code, " ".join(res.output.split())


@pytest.mark.parametrize("bad", ["Adam", "rmsprop", ""])
def test_fl_sim_run_refuses_an_unknown_optimizer_naming_the_option(tmp_path, bad):
    code, out = _fl_sim_run("-d", "health", "--optimizer", bad, "-o", str(tmp_path / "r"), "--engine", "inprocess")
    assert code == 2 and "--optimizer" in out and "adam or sgd" in out
    assert not (tmp_path / "r").exists()


def test_fl_sim_run_trains_with_sgd_under_dp(tmp_path):
    """A real 2-round DP run with --optimizer sgd: completes within the target epsilon and learns."""
    import json

    code, out = _fl_sim_run("-d", "health", "-r", "2", "--optimizer", "sgd", "--lr", "0.1", "-e", "3",
                            "-o", str(tmp_path / "r"), "--engine", "inprocess")
    assert code == 0, out
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["status"] == "completed"
    assert res["config"]["optimizer"] == res["job"]["optimizer"] == "sgd"
    eps = [n["epsilon"] for r in res["rounds"] for n in r["train"]["nodes"].values()]
    assert len(eps) == 8 and max(eps) <= 3.0 + 1e-6
    acc = res["rounds"][-1]["central"]["accuracy"]
    assert acc > 0.6
