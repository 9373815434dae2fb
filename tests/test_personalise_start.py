"""benchmarks/personalise_start.py: fine-tune a comparison's global model at one site, next to training from scratch."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("personalise_start", ROOT / "benchmarks" / "personalise_start.py")
personalise_start = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(personalise_start)


def _compare_folder(tmp_path: Path, with_model: bool = True) -> Path:
    """A compare folder of health: results.json (meta, per-site row) and an untrained global model."""
    from safetensors.torch import save_file

    from citydata import DATASETS
    from shared_models import build_model, default_model_config

    run = tmp_path / "cmp"
    (run / "federated").mkdir(parents=True)
    meta = {"department": "health", "model": "heart-mlp", "seed": 0,
            "federated": {"lr": 0.01, "personalise-epochs": 60, "personalise-lr": 0.01, "personalise-batch-size": 32}}
    sites = [{"site": "Hungary", "local": 0.81, "federated": 0.80, "personalised": 0.82}]
    (run / "results.json").write_text(json.dumps({"meta": meta, "per_site": {"sites": sites}}))
    if with_model:
        torch.manual_seed(0)
        model = build_model(default_model_config(DATASETS["health"].schema, "heart-mlp"))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "federated" / "model.safetensors"))
    return run


def test_each_start_and_learning_rate_is_trained_and_scored_on_the_site(tmp_path, capsys):
    run = _compare_folder(tmp_path)
    assert personalise_start.main([str(run), "Hungary", "--lr", "0.01", "--lr", "0.001", "--max-epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "comparison: local-only 0.81, federated 0.8, personalised 0.82" in out
    rows = re.findall(r"from the (global model|initialisation)\s+lr (\S+)\s+epochs\s+(\d+)\s+accuracy (\S+)", out)
    assert [(r[0], float(r[1])) for r in rows] == [("global model", 0.01), ("global model", 0.001), ("initialisation", 0.01)]
    for _, _, epochs, acc in rows:
        assert 0 <= int(epochs) <= 2 and 0.0 <= float(acc) <= 1.0


def test_bad_input_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(SystemExit, match=r"none[/\\]results.json.*Fix: pass the folder"):
        personalise_start.main([str(tmp_path / "none"), "Hungary"])
    run = _compare_folder(tmp_path, with_model=False)
    with pytest.raises(SystemExit, match=r"model.safetensors: no non-private global model. Fix"):
        personalise_start.main([str(run), "Hungary"])
    (run / "federated" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SystemExit, match=r"model.safetensors: not a heart-mlp model of health .*Fix"):
        personalise_start.main([str(run), "Hungary"])
    run2 = _compare_folder(tmp_path / "b")
    with pytest.raises(SystemExit, match=r"site 'Nowhere' is not in this comparison; its sites: Hungary"):
        personalise_start.main([str(run2), "Nowhere"])
