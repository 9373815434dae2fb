"""A coordinator process killed with SIGKILL mid-run resumes from its last checkpoint (fl-sim run --resume)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from privacy.ledger import PrivacyLedger
from server.strategy import load_checkpoint

SITES = ["Cleveland", "Hungary", "VA Long Beach", "Switzerland"]


def _cmd(out, *extra):
    return [sys.executable, "-m", "simulations.cli", "run", "-d", "health", "-r", "5", "--local-epochs", "1",
            "--batch-size", "32", "-e", "3", "--engine", "inprocess", "-o", str(out), *extra]


@pytest.mark.slow
def test_sigkill_after_round_k_resumes_at_k_plus_1(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.Popen(_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpt = out / "checkpoint.safetensors"
    done = 0
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists():
                try:
                    done = load_checkpoint(ckpt)["round"]
                except Exception:  # being replaced: read again
                    done = 0
                if done >= 2:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    k = load_checkpoint(ckpt)["round"]
    assert 2 <= k < 5
    res = subprocess.run(_cmd(out, "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert [e["round"] for e in results["rounds"]] == [1, 2, 3, 4, 5]  # no round lost, none repeated in history
    assert all(e["train"]["accepted"] == 4 for e in results["rounds"] if e["round"] > k)
    for site in SITES:
        led = PrivacyLedger(out / "ledgers" / f"health-{site}.sqlite")
        rounds = [r["round"] for r in led.releases(site) if r["mechanism"] == "dp-sgd"]  # not the count release
        # every round 1..5 was released; the round in progress at the kill may have been trained twice
        # (released twice: the ledger keeps both, so the budget is never under-counted)
        assert set(rounds) == {1, 2, 3, 4, 5} and len(rounds) <= 6
        assert {r["run_id"] for r in led.releases(site)} == {results["run_id"]}
