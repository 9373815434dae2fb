"""benchmarks/seed_spread.py: per-site gains of several `fl-sim compare` runs (one per seed) side by side."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("seed_spread", ROOT / "benchmarks" / "seed_spread.py")
seed_spread = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seed_spread)


def _results(path: Path, seed: int, gains: dict, dp_gains: dict, department="health") -> Path:
    """A compare results.json with the fields the script reads (per_site, meta, summary)."""
    sites = [{"site": s, "gain-personalised": g, "dp": {k: {"gain-personalised": v[s]} for k, v in dp_gains.items()}}
             for s, g in gains.items()]
    summary = [{"method": "local", "epsilon": None, "accuracy": 0.8},
               {"method": "federated+personalised", "epsilon": None, "accuracy": 0.80 + seed / 100}]
    path.write_text(json.dumps({"meta": {"department": department, "model": "m", "seed": seed},
                                "per_site": {"metric": "accuracy", "higher_is_better": True, "sites": sites},
                                "summary": summary}))
    return path


def test_mean_and_worst_per_site_and_setting_over_the_epsilons_all_runs_have(tmp_path, capsys):
    a = _results(tmp_path / "a.json", 0, {"A": 0.02, "B": -0.01}, {"3": {"A": 0.0, "B": 0.01}, "8": {"A": 0, "B": 0}})
    b = _results(tmp_path / "b.json", 1, {"A": 0.04, "B": 0.0}, {"3": {"A": -0.02, "B": 0.03}})
    runs = seed_spread.load([b, a])
    assert [r["meta"]["seed"] for r in runs] == [0, 1]
    assert seed_spread.settings(runs) == ["non-private", "3"]  # eps 8 is only in one run
    head, rows = seed_spread.table(runs)
    assert head == ["site", "setting", "seed 0", "seed 1", "mean", "worst"]
    got = {(r[0], r[1]): r[2:] for r in rows}
    assert got[("A", "non-private")] == pytest.approx([0.02, 0.04, 0.03, 0.02])
    assert got[("A", "3")] == pytest.approx([0.0, -0.02, -0.01, -0.02])
    assert got[("B", "non-private")] == pytest.approx([-0.01, 0.0, -0.005, -0.01])
    assert seed_spread.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "below 0: A (3), B (non-private)" in out and "+3.0 pt" in out
    assert "0.805" in out  # the mean of the pooled summary row (0.80, 0.81)


def test_bad_input_names_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(SystemExit, match=f"{missing}.*Fix: pass the results.json"):
        seed_spread.load([missing])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(SystemExit, match="not an `fl-sim compare` results.json"):
        seed_spread.load([tmp_path / "x.json"])
    a = _results(tmp_path / "a.json", 0, {"A": 0.0}, {})
    with pytest.raises(SystemExit, match="seed appears twice"):
        seed_spread.load([a, a])
    t = _results(tmp_path / "t.json", 1, {"A": 0.0}, {}, department="traffic")
    with pytest.raises(SystemExit, match="mix departments"):
        seed_spread.load([a, t])


def test_counts_the_seeds_on_which_each_node_kept_its_own_model(tmp_path, capsys):
    paths = []
    for seed, kept in enumerate([{"A": "own", "B": "federated"}, {"A": "own", "B": "own"}, {"A": "federated"}]):
        p = _results(tmp_path / f"{seed}.json", seed, {s: 0.0 for s in ("A", "B")}, {})
        r = json.loads(p.read_text())
        for s in r["per_site"]["sites"]:
            if s["site"] in kept:
                s["kept"] = kept[s["site"]]
        p.write_text(json.dumps(r))
        paths.append(p)
    runs = seed_spread.load(paths)
    assert seed_spread.kept_own(runs) == {"A": (2, 3), "B": (1, 2)}
    head, rows = seed_spread.compact(runs)
    assert head[-1] == "own model kept without DP (seeds)" and [r[-1] for r in rows] == ["2 of 3", "1 of 2"]
    assert seed_spread.main(["--compact", *map(str, paths)]) == 0
    assert "kept their own-records model (its gain is 0 by construction): A (2 of 3), B (1 of 2)" in capsys.readouterr().out
    # older comparisons (no "kept"): no column, no line
    old = [_results(tmp_path / f"old{s}.json", s, {"A": 0.0}, {}) for s in (0, 1)]
    assert seed_spread.kept_own(seed_spread.load(old)) is None
    assert "own model" not in seed_spread.compact(seed_spread.load(old))[0][-1]


def test_beyond_noise_needs_three_seeds_and_a_mean_two_standard_errors_from_zero(tmp_path, capsys):
    """A loss on every seed is beyond noise; a loss on average with gains on other seeds is not."""
    gains = [{"A": -0.02, "B": -0.06, "C": 0.01}, {"A": -0.01, "B": 0.05, "C": 0.02}, {"A": -0.03, "B": 0.00, "C": 0.03}]
    paths = [_results(tmp_path / f"{s}.json", s, g, {}) for s, g in enumerate(gains)]
    head, rows = seed_spread.table(seed_spread.load(paths))
    below, above = seed_spread.beyond_noise(rows)
    # A: mean -0.02, sd 0.01, se 0.00577 -> -0.02 + 2 * 0.00577 < 0; B: mean -0.0033, se 0.0318 -> no verdict
    assert [(s, k) for s, k, _, _ in below] == [("A", "non-private")]
    assert below[0][2] == pytest.approx(-0.02) and below[0][3] == pytest.approx(0.01 / 3 ** 0.5)
    assert [(s, k) for s, k, _, _ in above] == [("C", "non-private")]
    assert seed_spread.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    assert "below 0 by more than 2 standard errors over the seeds: A (non-private: -2.0 +- 0.6 pt)" in out
    assert "above 0 by more than 2 standard errors over the seeds: C (non-private: +2.0 +- 0.6 pt)" in out
    # two seeds: no verdict, and no line
    _, rows2 = seed_spread.table(seed_spread.load(paths[:2]))
    assert seed_spread.beyond_noise(rows2) == ([], [])
    seed_spread.main([str(p) for p in paths[:2]])
    assert "standard errors" not in capsys.readouterr().out
