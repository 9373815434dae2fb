"""The coordinator ServerApp: one app for simulation and deployment.

Run config keys (``--run-config`` / ``pyproject`` ``[tool.flwr.app.config]`` / fl-sim):

=================  =====================================================================
department         health | traffic | utility
model              model kind (default: the department's first)
num-rounds         federated rounds
strategy           fedavg | fedadam | fedyogi | trimmed-mean | krum
local-epochs       local epochs per round
batch-size, lr     local training
dp                 true: DP-SGD on every node (required by default policies)
target-epsilon     per-node epsilon after num-rounds (node calibrates its own noise)
noise-multiplier   explicit noise (overrides target-epsilon)
clipping-norm      per-sample clipping norm
fraction-train     share of nodes sampled per round
max-update-norm    replies whose update norm exceeds this are excluded
run-dir            folder for checkpoint.pkl, model.pt, results.json
resume             true: continue from run-dir/checkpoint.pkl
seed               initial model and sampling seed
=================  =====================================================================
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from clients.datasets import DATASETS
from clients.node import TASKS
from server.strategy import GuardedStrategy, load_checkpoint, make_strategy
from shared_models import build_model, default_model_config, model_kinds

log = logging.getLogger("cityfed.server")

DEFAULTS = {
    "model": "", "num-rounds": 5, "strategy": "fedavg", "local-epochs": 1, "batch-size": 64, "lr": 1e-2, "dp": True,
    "target-epsilon": 3.0, "noise-multiplier": -1.0, "clipping-norm": 1.0, "fraction-train": 1.0,
    "max-update-norm": 1e3, "run-dir": "runs/latest", "resume": False, "seed": 0, "min-nodes": 1,
}


def settings(run_config: dict) -> dict:
    """Run config with defaults filled in and checked (errors name the key)."""
    cfg = {**DEFAULTS, **dict(run_config)}
    if cfg.get("department") not in DATASETS:
        raise ValueError(f"run config 'department' must be one of {sorted(DATASETS)}, got {cfg.get('department')!r}")
    cfg["model"] = cfg["model"] or model_kinds(cfg["department"])[0]
    for key in ("num-rounds", "local-epochs", "batch-size"):
        if int(cfg[key]) < 1:
            raise ValueError(f"run config {key!r} must be >= 1, got {cfg[key]!r}")
    return cfg


def run_federation(grid: Grid, run_config: dict, *, run_id: str, on_round=None) -> dict:
    """Run (or resume) a federated training run on ``grid`` and write its artefacts.

    ``on_round(entry)`` is called after each round's evaluation (progress display).
    Returns the results dict also written to ``run-dir/results.json``.
    """
    cfg = settings(run_config)
    dept = cfg["department"]
    run_dir = Path(cfg["run-dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.pkl"
    schema = DATASETS[dept].schema
    torch.manual_seed(int(cfg["seed"]))
    model = build_model(default_model_config(schema, cfg["model"]))
    arrays = ArrayRecord(model.state_dict())
    offset, history = 0, None
    inner = make_strategy(cfg["strategy"], fraction_train=float(cfg["fraction-train"]), min_nodes=int(cfg["min-nodes"]))
    if cfg["resume"] and ckpt.exists():
        saved = load_checkpoint(ckpt)
        offset, history = int(saved["round"]), saved["history"]
        run_id = saved.get("run_id", run_id)
        state = {k: torch.from_numpy(v) for k, v in saved["arrays"].items()}
        arrays = ArrayRecord(state)
        for k, v in saved["strategy_state"].items():
            setattr(inner, k, v)
        log.warning("resuming %s after round %d", run_dir, offset)
    strategy = GuardedStrategy(inner, max_update_norm=float(cfg["max-update-norm"]), checkpoint=ckpt, round_offset=offset,
                               history=history, run_id=run_id, on_round=on_round)
    remaining = int(cfg["num-rounds"]) - offset
    job = {
        "department": dept, "task": TASKS[dept], "model": cfg["model"], "run-id": run_id,
        "local-epochs": int(cfg["local-epochs"]), "batch-size": int(cfg["batch-size"]), "lr": float(cfg["lr"]),
        "dp": bool(cfg["dp"]), "clipping-norm": float(cfg["clipping-norm"]), "num-rounds": int(cfg["num-rounds"]),
        "seed": int(cfg["seed"]),
    }
    if float(cfg["noise-multiplier"]) >= 0:
        job["noise-multiplier"] = float(cfg["noise-multiplier"])
    else:
        job["target-epsilon"] = float(cfg["target-epsilon"])
    t0 = time.perf_counter()
    if remaining > 0:
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=remaining, train_config=ConfigRecord(job),
                                evaluate_config=ConfigRecord(job))
        if len(result.arrays.keys()):
            arrays = result.arrays
    final = load_checkpoint(ckpt) if ckpt.exists() else {"arrays": {k: v.numpy() for k, v in arrays.items()}}
    torch.save({k: torch.from_numpy(v) for k, v in final["arrays"].items()}, run_dir / "model.pt")
    out = {"run_id": run_id, "config": cfg, "job": job, "seconds": time.perf_counter() - t0, **strategy.history}
    (run_dir / "results.json").write_text(json.dumps(out, indent=2, default=float))
    return out


def build_server_app(defaults: dict | None = None, on_round=None) -> ServerApp:
    """The coordinator ServerApp (``defaults`` are baked-in run-config values for simulation)."""
    defaults = dict(defaults or {})
    sapp = ServerApp()

    @sapp.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, {**defaults, **dict(context.run_config)}, run_id=str(context.run_id), on_round=on_round)

    return sapp


#: The ServerApp for deployment (``flwr`` app entry point ``server.app:app``).
app = build_server_app()
