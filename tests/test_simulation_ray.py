"""A real Flower Simulation Engine (Ray) run of the health federation via ``fl-sim run``."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from clients.node import public_count
from privacy.ledger import PrivacyLedger
from privacy.policy import load_policy
from simulations.run import default_policy


def test_ray_simulation_health(tmp_path):
    out = tmp_path / "run"
    # Ray's unix-socket paths must stay short (pytest's tmp_path is too long: Ray hangs)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [sys.executable, "-m", "simulations.cli", "run", "-d", "health", "-r", "2", "--local-epochs", "2", "--lr", "0.02",
           "--batch-size", "32", "-o", str(out), "--engine", "ray"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [e["round"] for e in res["rounds"]] == [1, 2]
    assert all(e["train"]["accepted"] == 4 for e in res["rounds"])
    assert res["rounds"][-1]["central"]["accuracy"] > 0.7  # fl-sim's default: the exact per-site scores
    assert (out / "report.html").exists() and (out / "epsilon.png").exists()
    ledgers = sorted(p.name for p in (out / "ledgers").iterdir() if p.suffix == ".sqlite")
    assert len(ledgers) == 4
    for p in (out / "ledgers").glob("*.sqlite"):
        site = p.stem.split("-", 1)[1]
        # the example policy's per-site delta, of the site's released (noised) training count as the node sets it
        (count,) = PrivacyLedger(p).counts(site, split="train")
        delta = public_count(count["value"], load_policy(default_policy("health")))[1]
        assert 2.5 < PrivacyLedger(p).epsilon(site, delta) <= 3.0 + 1e-6
