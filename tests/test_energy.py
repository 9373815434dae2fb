"""Energy per task on a node (:mod:`clients.energy`) and per run (:mod:`server.energy`).

RAPL is absent on the test machine; its reading is checked on a powercap tree laid out as
Linux's (``intel-rapl:N/energy_uj``, ``max_energy_range_uj``) whose counters the test
advances. The estimate is checked against the process's own CPU time. The figures in a real
run's replies and results.json are checked in ``tests/test_console.py``.
"""

import math
import time

import pytest

from clients import energy
from contract.energy import ENERGY_METRICS, METHODS
from server.energy import summarise


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x += 1


def test_estimate_is_cpu_time_times_stated_watts(monkeypatch, tmp_path):
    monkeypatch.setenv(energy.ENV_WATTS, "10")
    with energy.EnergyMeter(powercap=tmp_path, gpu=False) as m:  # empty powercap: no RAPL
        _busy(0.3)
    assert m.method == 1 and METHODS[1].startswith("estimate")
    assert 0.3 <= m.cpu_seconds < 2.0
    assert m.joules == pytest.approx(10 * m.cpu_seconds)
    out = m.metrics()
    assert set(out) == set(ENERGY_METRICS) and out["energy-method"] == 1
    assert out["energy-j"] == pytest.approx(m.joules, rel=0.05)  # two significant figures


def test_default_watts_and_bad_setting(monkeypatch, tmp_path):
    monkeypatch.delenv(energy.ENV_WATTS, raising=False)
    assert energy.watts_per_core() == energy.DEFAULT_WATTS_PER_CORE
    for bad in ("-1", "0", "abc", "nan", "inf"):
        monkeypatch.setenv(energy.ENV_WATTS, bad)
        with pytest.raises(ValueError, match=energy.ENV_WATTS):
            with energy.EnergyMeter(powercap=tmp_path, gpu=False):  # refused before the task's work
                raise AssertionError("the block must not run")


def _rapl(root, name, uj, max_uj=262143328850):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def test_rapl_measured_across_packages_and_a_wrap(tmp_path):
    p0 = _rapl(tmp_path, "intel-rapl:0", 1_000_000)
    p1 = _rapl(tmp_path, "intel-rapl:1", 999_000_000, max_uj=1_000_000_000)
    _rapl(tmp_path, "intel-rapl:0:0", 5)  # a sub-domain (cores): inside package 0's figure, not added
    assert [d.name for d in energy.rapl_domains(tmp_path)] == ["intel-rapl:0", "intel-rapl:1"]
    with energy.EnergyMeter(powercap=tmp_path, gpu=False) as m:
        (p0 / "energy_uj").write_text("3500000\n")  # +2.5 J
        (p1 / "energy_uj").write_text("500000\n")  # wrapped: +1.0 J + 0.5 J
        (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("900000000\n")
    assert m.method == 0 and m.joules == pytest.approx(4.0)
    assert m.metrics() == {"energy-j": 4.0, "energy-method": 0}


def test_unreadable_rapl_falls_back_to_the_estimate(tmp_path, monkeypatch):
    monkeypatch.setenv(energy.ENV_WATTS, "6")
    d = tmp_path / "intel-rapl:0"
    d.mkdir()
    (d / "energy_uj").write_text("not a number")  # as when only root may read it: unusable
    assert energy.rapl_domains(tmp_path) == []
    with energy.EnergyMeter(powercap=tmp_path, gpu=False) as m:
        _busy(0.05)
    assert m.method == 1 and m.joules == pytest.approx(6 * m.cpu_seconds)


def test_switched_off_sends_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv(energy.ENV_SWITCH, "off")
    with energy.EnergyMeter(powercap=tmp_path, gpu=False) as m:
        _busy(0.01)
    assert m.metrics() == {}


def test_two_significant_figures():
    assert energy.sig2(1234.5) == 1200 and energy.sig2(0.012345) == 0.012 and energy.sig2(9.96) == 10.0
    assert energy.sig2(0) == 0 and energy.sig2(-1) == 0 and energy.sig2(math.inf) == 0


def test_summary_per_node_and_run():
    res = {"rounds": [
        {"round": 1, "train": {"nodes": {"7": {"energy-j": 10.0, "energy-method": 1, "partition-id": 0},
                                         "8": {"energy-j": 4.0, "energy-method": 0}}},
         "evaluate": {"nodes": {"7": {"energy-j": 1.5, "energy-method": 1}, "8": {"accuracy": 0.5}}}},
        {"round": 2, "train": {"nodes": {"7": {"energy-j": 12.0, "energy-method": 3}}}},
    ]}
    s = summarise(res)
    assert s["nodes"]["7"]["train-j"] == 22.0 and s["nodes"]["7"]["evaluate-j"] == 1.5 and s["nodes"]["7"]["joules"] == 23.5
    assert s["nodes"]["7"]["methods"] == [METHODS[1], METHODS[3]]
    assert s["nodes"]["8"]["joules"] == 4.0 and s["total-j"] == 27.5 and s["replies"] == 4
    assert summarise({"rounds": [{"round": 1, "train": {"nodes": {"1": {"num-examples": 3}}}}]})["total-j"] is None


def test_round_aggregate_sums_energy_and_keeps_no_method_average():
    from server.strategy import aggregate_metrics

    recs = [{"metrics": {"num-examples": 100, "epsilon": 1.0, "energy-j": 3.0, "energy-method": 1}},
            {"metrics": {"num-examples": 300, "epsilon": 2.0, "energy-j": 5.0, "energy-method": 0}}]
    agg = dict(aggregate_metrics(recs, "num-examples"))
    assert agg["energy-j"] == 8.0 and "energy-method" not in agg and agg["epsilon-max"] == 2.0


def test_model_card_carries_energy_per_site_and_run(tmp_path):
    from serving.package import card_markdown, model_card

    res = {"run_id": "r1", "status": "completed", "config": {"department": "health", "num-rounds": 1},
           "rounds": [{"round": 1, "train": {"accepted": 2, "nodes": {
               "1": {"num-examples": 10, "epsilon": 1.0, "partition-id": 0, "energy-j": 2.5, "energy-method": 1},
               "2": {"num-examples": 10, "epsilon": 1.0, "partition-id": 1, "energy-j": 1.5, "energy-method": 0}}}}]}
    card = model_card(tmp_path, res, sites=["Cleveland", "Hungary"], model_config={"kind": "heart-mlp"}, made_by="test")
    e = card["energy"]
    assert e["total-j"] == 4.0 and e["sites"]["Cleveland"]["joules"] == 2.5 and e["sites"]["Hungary"]["joules"] == 1.5
    assert e["sites"]["Hungary"]["methods"] == [METHODS[0]]
    md = card_markdown(card)
    assert "## Energy" in md and "| Cleveland | 2.5 | estimate: process CPU time × W per core |" in md
    assert "| all sites (run) | 4 | |" in md
    # the Sites table's metrics column is the model's metrics: energy is the Energy table's (its method a
    # code there was shown as a bare number, "energy-method 1")
    sites = md[md.index("## Sites"):md.index("## Energy")]
    assert "| Cleveland | 1 | round 1, epsilon 1 |" in sites and "energy" not in sites


def test_gpu_counter_added_when_nvml_is_there(monkeypatch, tmp_path):
    """The NVML path (no GPU on the test machine): a stand-in ``pynvml`` whose energy counter (mJ) advances."""
    import sys
    import types

    import torch

    counter = {"mj": 1_000_000}
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i),
                                 nvmlDeviceGetTotalEnergyConsumption=lambda h: counter["mj"])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv(energy.ENV_WATTS, "6")
    with energy.EnergyMeter(powercap=tmp_path) as m:
        _busy(0.02)
        counter["mj"] += 42_500  # 42.5 J on the GPU
    assert m.method == 3 and m.joules == pytest.approx(42.5 + 6 * m.cpu_seconds)
    _rapl(tmp_path, "intel-rapl:0", 0)
    with energy.EnergyMeter(powercap=tmp_path) as m:
        (tmp_path / "intel-rapl:0" / "energy_uj").write_text("2000000\n")
        counter["mj"] += 1_000
    assert m.method == 2 and m.joules == pytest.approx(3.0)
    with energy.EnergyMeter(powercap=tmp_path, gpu=False) as m:
        counter["mj"] += 1_000
    assert m.method == 0  # gpu=False: the counter is not read


def test_model_card_says_the_noise_was_calibrated_per_node_not_the_sentinel(tmp_path):
    """A run with a target epsilon stores noise-multiplier = -1 ("calibrate"); the card printed -1."""
    from serving.package import card_markdown, model_card

    res = {"run_id": "r1", "status": "completed", "rounds": [],
           "config": {"department": "health", "num-rounds": 1, "dp": True, "target-epsilon": 3.0, "noise-multiplier": -1.0}}
    card = model_card(tmp_path, res, sites=["Cleveland"], model_config={"kind": "heart-mlp"}, made_by="test")
    assert card["training"]["noise-multiplier"] == "calibrated by each node for target-epsilon 3"
    assert "-1" not in card_markdown(card).split("noise-multiplier")[1].splitlines()[0]
    res["config"]["noise-multiplier"] = 1.1  # a fixed noise stays as given
    card = model_card(tmp_path, res, sites=["Cleveland"], model_config={"kind": "heart-mlp"}, made_by="test")
    assert card["training"]["noise-multiplier"] == 1.1


def test_summed_joules_carry_no_float_noise():
    """Sums of the nodes' two-significant-figure joules were written as 0.7500000000000001, 14.074000000000002
    (results.json, model card; docs review, 2026-12-07)."""
    from server.energy import summarise

    res = {"rounds": [{"round": r, "train": {"nodes": {"1": {"energy-j": j, "energy-method": 0}}}}
                      for r, j in ((1, 0.1), (2, 0.1), (3, 0.1))]}
    s = summarise(res)
    assert repr(s["total-j"]) == "0.3" and repr(s["nodes"]["1"]["joules"]) == "0.3"
    assert repr(s["nodes"]["1"]["train-j"]) == "0.3"
