"""`fl-sim run` twice into the same --out: a second run, not a silently ruined one.

The nodes account per run ID and a simulation's ledgers stay in OUT/ledgers. Every in-process
run's ID used to be ``sim``, so a second fresh run into the same OUT found its epsilon target
already spent by "this run" and trained with overwhelming noise (health, 2 rounds: 0.458
accuracy, the first run 0.641), exit 0; its personalisation was refused as "already
personalised". Now a fresh run gets a run ID the ledgers do not know (``sim-2``...), its own
target, within each node's lifetime budget (the example policy's ``max_epsilon`` 8), as
Flower's Simulation Engine (a new run ID per launch) and deployment already did.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("CITYFED_DP_SEED_FROM_JOB", "1")

SITES = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
ARGS = ["-d", "health", "-r", "2", "--batch-size", "64", "--engine", "inprocess", "--personalise-epochs", "2",
        "--personalise-lr", "0.01"]


def _fl_sim_run(*args: str):
    from typer.testing import CliRunner

    from simulations.cli import app

    res = CliRunner().invoke(app, ["run", *args], env={"COLUMNS": "200"})
    return res.exit_code, " ".join(res.output.split())


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_a_second_run_into_the_same_out_is_a_new_run_with_its_own_target(tmp_path):
    from privacy.ledger import PrivacyLedger
    from privacy.policy import load_policy
    from simulations.run import inprocess_run_id

    out = tmp_path / "r"
    assert inprocess_run_id(out / "ledgers") == "sim"  # no ledger yet
    code, text = _fl_sim_run(*ARGS, "-o", str(out))
    assert code == 0, text
    first = _results(out)
    code, text = _fl_sim_run(*ARGS, "-o", str(out))
    assert code == 0, text
    second = _results(out)
    assert (first["run_id"], second["run_id"]) == ("sim", "sim-2")
    # the same seed and settings with a target of its own: about the same model, not a noise-drowned one (the
    # second run's noise is a little lower: its count was released, and reserved, by the first run)
    acc = [r["rounds"][-1]["central"]["accuracy"] for r in (first, second)]
    assert min(acc) > 0.55 and abs(acc[1] - acc[0]) <= 0.02, acc
    for node in second["rounds"][0]["train"]["nodes"].values():
        twin = next(n for n in first["rounds"][0]["train"]["nodes"].values() if n["partition-id"] == node["partition-id"])
        assert 0.98 * twin["noise-multiplier"] <= node["noise-multiplier"] <= twin["noise-multiplier"], (twin, node)
    assert not second["personalise"]["refused"] and len(second["personalise"]["nodes"]) == 4
    assert "already personalised" not in text
    policy = load_policy(Path("examples/policies/health.toml"))
    for site in SITES:
        led = PrivacyLedger(out / "ledgers" / f"health-{site}.sqlite")
        assert led.runs(site) == ["sim", "sim-2"]
        delta = led.releases(site)[0]["delta"]
        for run in ("sim", "sim-2"):
            assert 2.9 < led.run_epsilon(site, run, delta) <= 3.0 + 1e-6
        assert led.epsilon(site, delta) <= policy.max_epsilon
        assert (out / "ledgers" / "personalised" / f"health-{site}" / "sim-2.safetensors").is_file()
    assert "sim-2.safetensors" in text
    # a third run that would pass a node's lifetime budget is refused, saying so (a round that
    # still fits under it may be accepted: the budget is never passed)
    from simulations.compare import write_policy

    lifetime = max(PrivacyLedger(out / "ledgers" / f"health-{s}.sqlite").epsilon(s, PrivacyLedger(
        out / "ledgers" / f"health-{s}.sqlite").releases(s)[0]["delta"]) for s in SITES)
    assert 3.0 < lifetime < 6.0  # two runs at 3 compose to less than 6 (RDP)
    cap = round(lifetime + 0.5, 2)
    tight = write_policy("health", tmp_path / "tight.toml", max_epsilon=cap)
    assert inprocess_run_id(out / "ledgers") == "sim-3"
    code, text = _fl_sim_run(*ARGS, "-o", str(out), "--policy", str(tight))
    third = _results(out)
    assert third["run_id"] == "sim-3"
    assert third["refused"] and all("max_epsilon" in r["reason"] for r in third["refused"]), third["refused"]
    for site in SITES:
        led = PrivacyLedger(out / "ledgers" / f"health-{site}.sqlite")
        assert led.epsilon(site, led.releases(site)[0]["delta"]) <= cap


def test_a_run_into_an_out_folder_another_fl_sim_is_using_is_refused(tmp_path):
    """Two fl-sim runs on one --out at once both trained (and spent their nodes' budgets); the later
    writer's results.json, model and report replaced the other's (independent reliability review,
    2026-12-07). The second is refused before its first round, naming the folder and the PID."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-m", "simulations.cli", "run", "-d", "health", "-r", "500",
                               "--engine", "inprocess", "--no-secagg", "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 240
        while not (out / "ledgers").exists():  # the first run has passed its checks and is training
            assert holder.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        code, text = _fl_sim_run(*ARGS, "-o", str(out))
        assert code == 2, text
        assert str(out) in text and str(holder.pid) in text and "--out" in text, text
    finally:
        holder.kill()
        holder.wait()


def test_extending_a_finished_dp_run_says_the_extra_rounds_get_little_budget(tmp_path, capsys):
    """`--resume --rounds N` on a finished DP run (what the README and the refusal advise) trained the extra
    rounds with the target already spent, noise 20-60x higher, and said nothing (docs review, 2026-12-07)."""
    import json

    from simulations.cli import _warn_extended_dp_run

    run = tmp_path / "h"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"config": {"num-rounds": 1, "dp": True, "target-epsilon": 3.0}}))
    _warn_extended_dp_run(run, 2)
    out = " ".join(capsys.readouterr().out.split())
    assert "launched for 1 round(s)" in out and "far more noise" in out and "new run" in out, out
    _warn_extended_dp_run(run, 1)  # the rounds it was launched for (an interrupted run): nothing to say
    (run / "results.json").write_text(json.dumps({"config": {"num-rounds": 1, "dp": False}}))
    _warn_extended_dp_run(run, 3)  # without DP there is no target to spend
    assert capsys.readouterr().out == ""
