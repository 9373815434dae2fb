"""benchmarks/federated_seeds.py: seed and --set parsing, and a real (small) federated run per seed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("federated_seeds", ROOT / "benchmarks" / "federated_seeds.py")
fs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fs)


@pytest.mark.parametrize("spec, seeds", [("0-2", [0, 1, 2]), ("0,3,5", [0, 3, 5]), ("0-2,7", [0, 1, 2, 7]),
                                         ("4", [4]), ("2,1,2", [1, 2]), (" 3 - 4 ", [3, 4])])
def test_parse_seeds(spec, seeds):
    assert fs.parse_seeds(spec) == seeds


@pytest.mark.parametrize("spec", ["", "a", "3-1", "-1", "1-", "0-2,x", "1.5", "0-5000"])
def test_parse_seeds_refuses_with_the_part_and_a_fix(spec):
    with pytest.raises(ValueError) as err:
        fs.parse_seeds(spec)
    assert "--seeds" in str(err.value) and "Fix:" in str(err.value)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=500), min_size=1, max_size=10))
def test_parse_seeds_lists_roundtrip(seeds):
    assert fs.parse_seeds(",".join(map(str, seeds))) == sorted(set(seeds))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20))
def test_parse_seeds_any_text_parses_or_says_why(spec):
    try:
        out = fs.parse_seeds(spec)
    except ValueError as exc:
        assert "Fix:" in str(exc)
    else:
        assert out == sorted(set(out)) and all(s >= 0 for s in out)


def test_parse_set_reads_numbers_and_strings():
    assert fs.parse_set(["lr=0.03", "strategy=fedavgm", "num-rounds=30", "secagg=true"]) == {
        "lr": 0.03, "strategy": "fedavgm", "num-rounds": 30, "secagg": True}


@pytest.mark.parametrize("item, words", [("lr", "KEY=VALUE"), ("=3", "KEY=VALUE"), ("learning-rate=0.1", "'learning-rate'"),
                                         ("seed=3", "--seeds"), ("dp=false", "--no-dp")])
def test_parse_set_refuses(item, words):
    with pytest.raises(ValueError) as err:
        fs.parse_set([item])
    assert words in str(err.value) and "Fix:" in str(err.value)


def test_bad_seeds_exit_2_naming_the_option(capsys):
    with pytest.raises(SystemExit) as exc:
        fs.main(["-d", "health", "--seeds", "2-1"])
    assert exc.value.code == 2
    assert "--seeds '2-1'" in capsys.readouterr().err


@pytest.fixture
def restore_process(monkeypatch):
    """main() sets one torch thread and DP noise from the seed for this process, as fl-sim compare: undo both."""
    import torch

    from privacy import SEED_FROM_JOB_ENV

    monkeypatch.setenv(SEED_FROM_JOB_ENV, "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_runs_each_seed_and_reports_the_coordinators_final_score(tmp_path, capsys, restore_process):
    """Two seeds, two rounds, no DP: the JSON and the table carry what each run's results.json says."""
    out = tmp_path / "runs"
    fs.main(["-d", "health", "--seeds", "0-1", "--no-dp", "--set", "num-rounds=2", "--set", "personalise-epochs=0",
             "--out", str(out), "--json", str(tmp_path / "r.json"), "--target", "0.5", "--markdown"])
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["epsilon"] is None and got["overrides"] == {"num-rounds": 2, "personalise-epochs": 0}
    finals = []
    for run in got["runs"]:
        res = json.loads((out / f"seed{run['seed']}" / "results.json").read_text())
        assert res["config"]["dp"] is False and res["config"]["num-rounds"] == 2
        assert res["config"]["seed"] == run["seed"]
        last = [e for e in res["rounds"] if isinstance(e.get("central"), dict)][-1]
        assert run["final"] == pytest.approx(last["central"]["accuracy"])
        assert [r for r, _ in run["rounds"]] == [1, 2]
        assert 0.5 < run["final"] <= 1.0  # 2 rounds on health already beat chance
        finals.append(run["final"])
    assert got["summary"]["mean"] == pytest.approx(sum(finals) / 2)
    table = capsys.readouterr().out
    assert "| 0 | " in table and "| 1 | " in table and "on 2 of 2 seeds" in table


def test_dp_run_spends_within_the_target(tmp_path, restore_process):
    fs.main(["-d", "health", "--seeds", "0", "--epsilon", "3", "--set", "num-rounds=2", "--set", "personalise-epochs=0",
             "--json", str(tmp_path / "r.json")])
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    assert 0 < run["epsilon_spent_max"] <= 3.0 + 1e-9
