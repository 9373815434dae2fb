"""A run that ended before its first round completed can be resumed (docs followed literally, 2026-12-06).

``fl-server stop`` of a run in its first round left a checkpoint of round 0 with no model arrays:
the coordinator's round-0 score of the initial model (run config ``central-data``) saved the run's
history before any round had set the global model. ``model.safetensors`` was then empty, and
``fl-server run --resume`` failed in the ServerApp ("Missing key(s) in state_dict"). The
checkpoint of round 0 now holds the run's initial model, and a resume from a checkpoint without
arrays (one an earlier version wrote) starts from the initial model the run's seed draws.
"""

import warnings

import numpy as np
import torch

from clients.app import app as client_app
from server.app import run_federation
from server.artefacts import write_checkpoint
from server.strategy import load_checkpoint
from simulations.inprocess import InProcessGrid

warnings.filterwarnings("ignore", category=UserWarning)
from fed_helpers import health_nodes  # noqa: E402


class CoordinatorStopped(BaseException):
    """The ServerApp ending (fl-server stop, SIGKILL) while round 1's messages are out."""


def _cfg(tmp_path, **kw):
    cfg = {"department": "health", "num-rounds": 2, "local-epochs": 1, "batch-size": 64, "lr": 0.02,
           "target-epsilon": 3.0, "run-dir": str(tmp_path / "run"), "min-nodes": 1, "central-data": "bundled",
           "secagg": False}
    cfg.update(kw)
    return cfg


def _initial_model(seed=0) -> dict:
    from citydata import load_department
    from shared_models import build_model, default_model_config

    torch.manual_seed(seed)
    model = build_model(default_model_config(load_department("health").schema))
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_a_run_stopped_in_round_one_keeps_its_initial_model_and_resumes(tmp_path, monkeypatch):
    nodes = health_nodes(tmp_path, (8.0, 8.0, 8.0, 8.0))
    grid = InProcessGrid(client_app, nodes)

    def stop(*a, **k):
        raise CoordinatorStopped("stopped while round 1's messages were out")

    monkeypatch.setattr(grid, "send_and_receive", stop)
    try:
        run_federation(grid, _cfg(tmp_path), run_id="r1")
    except CoordinatorStopped:
        pass
    else:
        raise AssertionError("the run was not stopped")
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert saved["round"] == 0
    init = _initial_model()
    assert saved["arrays"].keys() == init.keys()
    assert all(np.array_equal(saved["arrays"][k], init[k]) for k in init)  # the initial model, not nothing
    res = run_federation(InProcessGrid(client_app, nodes), _cfg(tmp_path, resume=True), run_id="r2")
    assert res["status"] == "completed"
    assert [e["round"] for e in res["rounds"] if e["round"] >= 1] == [1, 2]
    assert all(e["train"]["accepted"] == 4 for e in res["rounds"] if e["round"] >= 1)


def test_a_checkpoint_without_arrays_resumes_from_the_seeds_initial_model(tmp_path):
    nodes = health_nodes(tmp_path, (8.0, 8.0, 8.0, 8.0))
    run = tmp_path / "run"
    run.mkdir()
    write_checkpoint(run / "checkpoint.safetensors", {"run_id": "r1", "round": 0, "arrays": {}, "strategy_state": {},
                                                      "history": {"rounds": [], "excluded": [], "refused": []}})
    res = run_federation(InProcessGrid(client_app, nodes), _cfg(tmp_path, resume=True), run_id="r2")
    assert res["status"] == "completed"
    assert [e["round"] for e in res["rounds"] if e["round"] >= 1] == [1, 2]
    final = load_checkpoint(run / "checkpoint.safetensors")
    assert final["round"] == 2 and final["arrays"].keys() == _initial_model().keys()
