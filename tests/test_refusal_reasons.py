"""What a budget refusal sends the coordinator, and the count release near the budget.

Found by an independent privacy audit (2026-12-06):

* a budget refusal found inside the ledger's write (evaluation, personalisation, and a training
  round whose budget another process spent since the policy check) sent the ledger's message,
  which names the ledger file's absolute path (the node's file layout and user name); the count
  release already sent a fixed reason;
* the record-count release checked the budget at the exact count's delta, but the site's delta
  afterwards follows the released value: a count drawn high gives a smaller delta, a larger
  epsilon, and the site's lifetime epsilon could pass ``max_epsilon``.
"""

import types
import warnings

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.app import REFUSED, app
from flower_compat.inprocess import set_task_identity
from privacy.ledger import PrivacyLedger, Release
from shared_models import build_model, default_model_config
from citydata import load_department

warnings.filterwarnings("ignore", category=UserWarning)

POLICY = """
department = "health"
max_epsilon = {max_eps}
min_noise_multiplier = 0.8
max_clipping_norm = 1.0
allowed_tasks = ["heart-disease"]
max_rounds_per_run = 10
require_dp = true
personalisation = true
[releases]
local_evaluation = "dp"
"""


@pytest.fixture(autouse=True)
def _identity():
    set_task_identity(7, 0, 1)
    yield


def _node(tmp_path, max_eps):
    folder = tmp_path / "node-home-of-a-user"
    folder.mkdir()
    (folder / "policy.toml").write_text(POLICY.format(max_eps=max_eps))
    cfg = {"department": "health", "site": "Cleveland", "policy": str(folder / "policy.toml"),
           "ledger": str(folder / "ledger.sqlite")}
    return Context(run_id=7, node_id=1, node_config=cfg, state=RecordDict(), run_config={}), folder


def _msg(kind, **over):
    torch.manual_seed(0)
    model = build_model(default_model_config(load_department("health").schema))
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "r1", "server-round": 1,
           "local-epochs": 1, "batch-size": 32, "lr": 0.01, "dp": True, "noise-multiplier": 1.0, "clipping-norm": 1.0}
    cfg.update(over)
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(cfg)}),
                   dst_node_id=1, message_type=kind)


def _check_reason(reply, folder):
    assert reply.has_error() and reply.error.code == REFUSED
    reason = reply.error.reason
    assert str(folder) not in reason and "ledger.sqlite" not in reason and "node-home-of-a-user" not in reason
    assert "max_epsilon" in reason  # still says why


def _accept_everything(monkeypatch, module):
    """The policy check passes: as when another process spent the budget after it ran."""
    monkeypatch.setattr(module, "check_job", lambda *a, **k: types.SimpleNamespace(
        accepted=True, reason="", epsilon_before=0.0, epsilon_after=0.0))


def test_an_evaluation_refused_by_the_budget_does_not_name_the_ledger_file(tmp_path):
    ctx, folder = _node(tmp_path, 0.45)  # room for the two count releases, not for the evaluation
    _check_reason(app(_msg("evaluate"), ctx), folder)
    rows = PrivacyLedger(folder / "ledger.sqlite").releases("Cleveland")
    assert [r["mechanism"] for r in rows if r["status"] != "aborted"] == ["gaussian-count", "gaussian-count"]


def test_a_training_round_refused_by_the_ledgers_budget_recheck_does_not_name_the_ledger_file(tmp_path, monkeypatch):
    import clients.node

    ctx, folder = _node(tmp_path, 0.45)
    _accept_everything(monkeypatch, clients.node)
    _check_reason(app(_msg("train"), ctx), folder)
    rows = PrivacyLedger(folder / "ledger.sqlite").releases("Cleveland")
    assert [r["mechanism"] for r in rows if r["status"] != "aborted"] == ["gaussian-count"]


def test_a_personalisation_refused_by_the_ledgers_budget_recheck_does_not_name_the_ledger_file(tmp_path, monkeypatch):
    import clients.personalise
    from clients.node import JobRefused, node_from_config

    ctx, folder = _node(tmp_path, 0.45)
    _accept_everything(monkeypatch, clients.personalise)
    spec = node_from_config(dict(ctx.node_config), {})
    state = build_model(default_model_config(load_department("health").schema)).state_dict()
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "r1", "server-round": 1,
           "num-rounds": 1, "local-epochs": 1, "batch-size": 64, "lr": 0.01, "dp": True, "noise-multiplier": 1.0,
           "clipping-norm": 1.0, "seed": 0, "personalise-epochs": 1, "personalise-layers": "head"}
    with pytest.raises(JobRefused) as caught:
        clients.personalise.handle_personalise(state, cfg, spec)
    reason = str(caught.value)
    assert str(folder) not in reason and "ledger.sqlite" not in reason and "max_epsilon" in reason


def test_a_count_drawn_high_cannot_take_the_site_past_max_epsilon(tmp_path, monkeypatch):
    """The budget is checked at the smallest delta the released count can set, not the exact count's."""
    import clients.counts
    from clients.node import JobRefused, node_from_config, public_count
    from privacy.accounting import epsilon as composed_epsilon

    exact = 203
    ctx, folder = _node(tmp_path, 100.0)
    spec = node_from_config(dict(ctx.node_config), {})
    ledger = PrivacyLedger(folder / "ledger.sqlite")
    for rnd in range(1, 9):  # a history of DP-SGD rounds, at the exact count's delta
        ledger.commit(ledger.begin(Release(noise_multiplier=1.0, sample_rate=0.15, steps=7, delta=1e-4, run_id="old",
                                           round=rnd, site="Cleveland", department="health")))
    exact_delta = public_count(exact, spec.policy)[1]
    hist = ledger.history("Cleveland") + [(10.0, 1.0, 1)]
    budget = composed_epsilon(hist, exact_delta, ledger.accountant) * (1 + 1e-6)  # fits at the exact count's delta
    spec.policy = spec.policy.model_copy(update={"max_epsilon": budget})
    # the noise draws +3 standard deviations (std 10 records): a smaller delta, a larger epsilon
    monkeypatch.setattr(clients.counts, "_RNG", types.SimpleNamespace(gauss=lambda mu, sigma: mu + 3 * sigma))
    try:
        value = clients.counts.released_count(spec, ledger, "train", exact, run_id="r1", round=1)
    except JobRefused:
        assert ledger.counts("Cleveland") == []  # refused before anything was drawn or released
        return
    site_delta = public_count(value, spec.policy)[1]
    assert ledger.epsilon("Cleveland", site_delta) <= budget, (value, site_delta)
