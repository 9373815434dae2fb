"""A run's DP evaluations on the node's test split stay within the run's target-epsilon.

Found by an independent privacy review (2026-12-07, L1): the noise of DP-SGD was calibrated with
the policy's evaluations reserved, but not the release of the test split's noised count that the
first DP evaluation makes, so one evaluation in a 1-round run took the run to epsilon 3.018 against
a target of 3. And an evaluation beyond those reserved (the coordinator may send several in a
round; the policy's per-run cap allowed them) was made whatever the run had spent.
"""

from __future__ import annotations

import pytest
import torch

POLICY = """department = "health"
max_epsilon = 8.0
min_noise_multiplier = 0.5
max_clipping_norm = 1.0
allowed_tasks = ["heart-disease"]
max_rounds_per_run = 50
require_dp = true
[releases]
local_evaluation = "dp"
max_evaluations_per_run = 5
"""

CFG = {"department": "health", "task": "heart-disease", "run-id": "r1", "server-round": 1, "num-rounds": 1,
       "local-epochs": 1, "batch-size": 32, "lr": 0.01, "dp": True, "clipping-norm": 1.0, "target-epsilon": 3.0}


@pytest.fixture()
def node(tmp_path):
    from clients.node import node_from_config

    pol = tmp_path / "policy.toml"
    pol.write_text(POLICY)
    return node_from_config({"department": "health", "site": "Cleveland", "policy": str(pol),
                             "ledger": str(tmp_path / "ledger.sqlite")}, {})


@pytest.fixture()
def state():
    from citydata import load_department
    from shared_models import build_model, default_model_config

    torch.manual_seed(0)
    return build_model(default_model_config(load_department("health").schema)).state_dict()


def _run_epsilon(spec) -> float:
    from privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(spec.ledger_path)
    delta = ledger.releases()[-1]["delta"]
    return ledger.run_epsilon("Cleveland", "r1", delta)


def test_one_round_run_with_its_evaluation_stays_within_its_target(node, state):
    from clients.node import handle_evaluate, handle_train

    handle_train(state, CFG, node)
    out = handle_evaluate(state, CFG, node)  # the round's evaluation: its test-count release is reserved too
    eps = _run_epsilon(node)
    assert eps <= 3.0, f"run r1 reached epsilon {eps:.4f} (reply {out['epsilon']:.4f}) > its target-epsilon 3.0"
    assert eps >= 2.9  # the reservation is not wasteful: the run still lands near its target


def test_an_evaluation_beyond_the_runs_target_is_refused_before_anything_is_released(node, state):
    from clients.node import JobRefused, handle_evaluate, handle_train
    from privacy.ledger import PrivacyLedger

    handle_train(state, CFG, node)
    handle_evaluate(state, CFG, node)
    rows = len(PrivacyLedger(node.ledger_path).releases())
    with pytest.raises(JobRefused, match=r"target-epsilon 3(\.0)? of run 'r1'"):
        handle_evaluate(state, CFG, node)  # a second one in the same round: within the cap of 5, not the target
    assert len(PrivacyLedger(node.ledger_path).releases()) == rows
    assert _run_epsilon(node) <= 3.0


def test_an_evaluation_refused_for_its_target_releases_no_count_either(node, state):
    """Found by a review of the change (2026-12-07): the training count was released (and recorded) before
    the target was checked, so an evaluation the node then refused had released it, and the run passed its
    target. Now the check comes first, counting every count release the evaluation would make."""
    from clients.node import JobRefused, handle_evaluate
    from privacy.ledger import PrivacyLedger

    cfg = {**CFG, "run-id": "eval-only", "target-epsilon": 0.05}  # an evaluate of a run the node never trained
    with pytest.raises(JobRefused, match="target-epsilon 0.05 of run 'eval-only'"):
        handle_evaluate(state, cfg, node)
    assert PrivacyLedger(node.ledger_path).releases() == []
