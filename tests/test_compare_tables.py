"""benchmarks/compare_tables.py: README tables from an `fl-sim compare` results.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_tables", ROOT / "benchmarks" / "compare_tables.py")
ct = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ct)


def _results(kept: bool) -> dict:
    from simulations.compare import federated_settings, per_site_value

    def row(method, eps, site, mae, **extra):
        return {"method": method, "epsilon": eps, "site": site, "metrics": {"mae": mae, **extra}}

    rows = [row("local", None, "a", 2.0, epochs=12), row("federated", None, "a", 2.5),
            row("federated+personalised", None, "a", 2.0, **({"kept": "own"} if kept else {})),
            row("local", None, "b", 1.0, epochs=7), row("federated", None, "b", 0.9),
            row("federated+personalised", None, "b", 0.8, **({"kept": "federated"} if kept else {})),
            row("local", 3.0, "a", 3.0), row("federated-dp+personalised", 3.0, "a", 2.4),
            row("local", 3.0, "b", 1.5), row("federated-dp+personalised", 3.0, "b", 1.6)]
    value = per_site_value(rows, ["a", "b"], "forecasting", (3.0,))
    value["loo-note"] = "not run (loo=False)"
    summary = [{"method": "local", "epsilon": None, "epsilon_spent_max": None, "mae-vs-pooled": 0.9, "mae-vs-naive": 0.7},
               {"method": "federated-dp+personalised", "epsilon": 3.0, "epsilon_spent_max": 2.999, "mae-vs-pooled": 1.1,
                "mae-vs-naive": 0.8}]
    return {"meta": {"command": "fl-sim compare", "department": "utility", "model": "gru", "seed": 0, "seconds": 1234.5,
                     "federated": federated_settings("utility", False, own_model="gru" if kept else None),
                     "federated-dp": federated_settings("utility", True)},
            "summary": summary, "per_site": value, "rows": rows}


def test_tables_carry_the_comparisons_numbers_and_the_kept_column(tmp_path, capsys):
    p = tmp_path / "results.json"
    p.write_text(json.dumps(_results(kept=True)))
    assert ct.main([str(p)]) == 0
    out = capsys.readouterr().out
    assert "**utility**" in out and "1,234 s in all" in out and "own-records candidate: lr 0.003, batch 64" in out
    assert "clipping norm 0.1" in out  # FED_DP_DEFAULTS["utility"]
    assert "| local | off |  | 0.900 | 0.700 |" in out and "| federated-dp+personalised | 3 | 3.00 | 1.100 | 0.800 |" in out
    assert "| a | 2 | 12 | 2.5 | 2 | +0.000 | own | 3 | 2.4 | +0.200 |  |" in out
    assert "| b | 1 | 7 | 0.9 | 0.8 | +0.200 | federated | 1.5 | 1.6 | -0.067 |  |" in out
    assert "Worst site without DP: a (+0.000); at epsilon 3: b (-0.067)" in out
    # an older comparison without "kept": no column
    p.write_text(json.dumps(_results(kept=False)))
    ct.main([str(p)])
    out = capsys.readouterr().out
    assert "| kept |" not in out and "| a | 2 | 12 | 2.5 | 2 | +0.000 | 3 |" in out


def test_bad_input_names_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(SystemExit, match=f"{missing}.*Fix: pass the results.json"):
        ct.load(missing)
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "x", "rounds": []}))
    with pytest.raises(SystemExit, match="not an `fl-sim compare` results.json"):
        ct.load(tmp_path / "run.json")
