"""Every resume of a run is recorded in its ``results.json`` (``resumes``), however often it is interrupted.

A real in-process federation (the four health hospitals, DP-SGD) of 3 rounds is interrupted
twice: launch 1 dies after round 1's checkpoint, launch 2 (resumed) dies while it sends round
2's messages, before any checkpoint of its own; launch 3 (resumed again) completes the run.
The coordinator "dies" by a ``BaseException`` that nothing in the ServerApp catches, raised
where a SIGKILL could hit it; the checkpoint it leaves is what the next launch resumes from.
"""

from __future__ import annotations

import json

import pytest

from server.strategy import load_checkpoint


class CoordinatorDied(BaseException):
    """The coordinator process ending abruptly (what a SIGKILL does to the launch)."""


def _cfg(tmp_path, **kw) -> dict:
    cfg = {"department": "health", "num-rounds": 3, "local-epochs": 1, "batch-size": 64, "lr": 0.02,
           "target-epsilon": 3.0, "run-dir": str(tmp_path / "run"), "min-nodes": 1}
    cfg.update(kw)
    return cfg


def _die_after_round(k: int):
    def on_round(entry: dict) -> None:
        if entry["round"] >= k:
            raise CoordinatorDied(f"after round {entry['round']}")

    return on_round


@pytest.mark.slow
def test_second_resume_keeps_the_first_in_results_json(tmp_path, monkeypatch):
    from simulations.inprocess import InProcessGrid
    from simulations.run import simulate

    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    with pytest.raises(CoordinatorDied):  # launch 1: round 1 done and checkpointed, then the process dies
        simulate(_cfg(tmp_path, **{"run-id": "launch-1"}), engine="inprocess", on_round=_die_after_round(1))
    assert load_checkpoint(ckpt)["round"] == 1

    def dies_sending(self, messages, *, timeout=None):
        raise CoordinatorDied("while sending round 2's messages")

    with monkeypatch.context() as m:  # launch 2: resumed, dies in round 2 before it checkpoints anything
        m.setattr(InProcessGrid, "send_and_receive", dies_sending)
        with pytest.raises(CoordinatorDied):
            simulate(_cfg(tmp_path, **{"run-id": "launch-2", "resume": True}), engine="inprocess")
    saved = load_checkpoint(ckpt)
    assert saved["round"] == 1  # no round of launch 2 reached the checkpoint
    recorded_by_launch_2 = saved["history"].get("resumes", [])

    res = simulate(_cfg(tmp_path, **{"run-id": "launch-3", "resume": True}), engine="inprocess")  # launch 3 completes
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["run_id"] == "launch-1"
    assert [e["round"] for e in results["rounds"]] == [1, 2, 3]
    resumes = results["resumes"]
    assert [(r["flower-run-id"], r["after-round"]) for r in resumes] == [("launch-2", 1), ("launch-3", 1)]
    assert all(r["at"].endswith("Z") for r in resumes)
    assert res["resumes"] == resumes
    # launch 2's resume was on record as soon as it happened, not only with a round's checkpoint
    assert [r["flower-run-id"] for r in recorded_by_launch_2] == ["launch-2"]
    # and the checkpoint left by the completed run holds them too (a later --resume appends to both)
    assert load_checkpoint(ckpt)["history"]["resumes"] == resumes



def test_a_refused_resume_is_not_recorded(tmp_path):
    """A resume refused before it starts (another strategy than the checkpoint's) leaves the checkpoint as it was."""
    import numpy as np

    from server.app import run_federation
    from server.artefacts import write_checkpoint
    from shared_models import build_model, default_model_config
    from citydata import DATASETS

    model = build_model(default_model_config(DATASETS["health"].schema, "heart-mlp"))
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    ckpt.parent.mkdir()
    history = {"rounds": [{"round": 1}], "excluded": [], "refused": [],
               "resumes": [{"flower-run-id": "2", "after-round": 1, "at": "2026-12-05T10:00:00Z"}]}
    write_checkpoint(ckpt, {"run_id": "1", "round": 1, "arrays": {k: v.numpy() for k, v in model.state_dict().items()},
                            "strategy_state": {"momentum": [np.ones(2)]}, "history": history})  # FedAvgM's state
    cfg = {"department": "health", "num-rounds": 2, "run-dir": str(ckpt.parent), "resume": True, "strategy": "fedadam"}
    with pytest.raises(ValueError, match="resume with the strategy that wrote the checkpoint"):
        run_federation(object(), cfg, run_id="3")
    assert load_checkpoint(ckpt)["history"]["resumes"] == history["resumes"]  # launch 3 never ran: not recorded


def test_a_resumed_launch_keeps_the_runs_initial_score():
    """Flower evaluates a resumed launch's starting arrays as "round 0"; that score replaced the run's
    initial one, so results.json "initial" and the report's "before round 1" column showed the checkpoint's
    score (0.665, round 1's) instead of the initial model's (0.396) (docs-followed review, 2026-12-07)."""
    from flwr.serverapp.strategy import FedAvg

    from server.strategy import GuardedStrategy

    s = GuardedStrategy(FedAvg(), max_update_norm=10.0, round_offset=1)
    s.history["initial"] = {"central": {"accuracy": 0.396}}
    s.history.setdefault("rounds", []).append({"round": 1, "central": {"accuracy": 0.665}})
    s.record_central(0, {"accuracy": 0.665})
    assert s.history["initial"]["central"]["accuracy"] == 0.396
    assert s.history["resumed-from"]["central"]["accuracy"] == 0.665
    fresh = GuardedStrategy(FedAvg(), max_update_norm=10.0)
    fresh.record_central(0, {"accuracy": 0.4})
    assert fresh.history["initial"]["central"]["accuracy"] == 0.4 and "resumed-from" not in fresh.history
