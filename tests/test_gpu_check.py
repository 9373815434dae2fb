"""benchmarks/gpu_check.py: its help, its refusal without CUDA, and the training half it times (on CPU here)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_help_describes_the_check():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for words in ("DP-SGD on CUDA", "--gpus-per-client", "--json", "exits with status 2"):
        assert words in " ".join(r.stdout.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: run the check itself")
def test_without_cuda_it_says_why_and_exits_2_measuring_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "gpu_check: no CUDA device" in r.stderr and "nothing was measured" in r.stderr
    assert "s/epoch" not in r.stdout and not out.exists()


def test_the_timed_training_runs_the_node_loop_and_checks_its_device():
    row = gpu_check.time_fit("heart-mlp", "cpu", dp=True, epochs=2, batch=64, max_records=256)
    assert row["records"] == 256 and row["device"] == "cpu" and row["steps"] > 0
    assert row["epoch_s"] > 0 and row["epsilon"] > 0 and row["peak_cuda_mb"] is None
    plain = gpu_check.time_fit("heart-mlp", "cpu", dp=False, epochs=2, batch=64, max_records=256)
    assert plain["epsilon"] is None
