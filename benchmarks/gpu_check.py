"""GPU check: the node's CUDA path, end to end, in one short run (a few minutes on one GPU).

1. **DP-SGD on CUDA, every shipped model** (heart-mlp on the health data, GRU and PatchTST on
   the traffic data): the node's own training loop (:func:`clients.training.fit`, Opacus
   DP-SGD) on CPU and on CUDA, same data, batch and noise; checks that the model, data and
   optimiser stayed on the GPU and that the accountant spent epsilon; prints epoch times (CPU
   vs CUDA, and non-private CUDA) and peak CUDA memory.
2. **A 2-round simulation with GPU clients**: ``fl-sim run -d health -r 2 --gpus-per-client
   F`` (Flower's Ray engine, one client per hospital); checks the run completed and that the
   client processes (not this one) allocated GPU memory while it ran.

    python benchmarks/gpu_check.py [--json runs/gpu_check.json]

On a machine where torch sees no CUDA device it prints why and exits with status 2: it never
reports CPU figures as GPU ones. Exit 1 = a check failed (the message says which).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: model kind -> department whose real data feeds it
MODELS = {"heart-mlp": "health", "gru": "traffic", "patchtst": "traffic"}


class CheckFailed(RuntimeError):
    """A GPU-path check failed (exit status 1)."""


def no_cuda_reason() -> str | None:
    """Why this machine cannot run the check (``None`` when torch sees a CUDA device)."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"gpu_check: no CUDA device: torch {torch.__version__} ({build}) sees no GPU on this machine. "
            "Run it on a machine with an NVIDIA GPU, its driver, and a CUDA build of torch "
            "(the same torch version for your CUDA, see https://pytorch.org/get-started/locally/); "
            "nothing was measured.")


def _train_data(kind: str, max_records: int):
    import torch
    from torch.utils.data import TensorDataset

    from citydata import load_department

    ds = load_department(MODELS[kind])
    parts = [ds.site_data(s).train.tensors() for s in ds.sites]
    X, y = (torch.cat([p.tensors[i] for p in parts]) for i in range(2))
    if max_records and len(X) > max_records:
        keep = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:max_records]
        X, y = X[keep], y[keep]
    return ds, TensorDataset(X, y)


def time_fit(kind: str, device: str, dp: bool, epochs: int, batch: int, max_records: int) -> dict:
    """Train one shipped model with the node's loop on ``device``; epoch times and checks.

    Parameters
    ----------
    kind : str
        ``heart-mlp``, ``gru`` or ``patchtst``.
    device : {"cpu", "cuda"}
    dp : bool
        Opacus DP-SGD (noise multiplier 1.0, clipping norm 1.0) or plain training.
    epochs : int
        Epochs; the first is a warm-up, the others are timed (median).
    batch : int
        Batch size (expected batch under DP's Poisson sampling).
    max_records : int
        Train on at most this many records (a fixed random subset; 0 = all).

    Returns
    -------
    dict
        ``epoch_s``, ``records``, ``params``, ``epsilon``, ``peak_cuda_mb`` (CUDA only), ...

    Raises
    ------
    CheckFailed
        The model left the GPU, the loss is not finite, or DP spent no epsilon.
    """
    import torch

    from clients.training import TrainConfig, fit
    from privacy.dp import DPSettings
    from shared_models import build_model, default_model_config

    torch.manual_seed(0)
    ds, data = _train_data(kind, max_records)
    model = build_model(default_model_config(ds.schema, kind))
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stamps = [time.perf_counter()]

    def on_epoch(_epoch, _loss):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0) if dp else None
    res = fit(model, data, ds.schema.task, TrainConfig(epochs=epochs, batch_size=batch, lr=1e-3, seed=0), settings,
              device=dev, on_epoch=on_epoch)
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    where = {p.device.type for p in model.parameters()}
    label = f"{kind} on {device} ({'DP-SGD' if dp else 'no DP'})"
    if where != {dev.type}:
        raise CheckFailed(f"{label}: parameters ended on {sorted(where)}, not {dev.type}")
    if not all(map(lambda v: v == v and abs(v) != float("inf"), res.history)):
        raise CheckFailed(f"{label}: loss not finite: {res.history}")
    if dp and not (res.epsilon and res.epsilon > 0):
        raise CheckFailed(f"{label}: the accountant spent no epsilon ({res.epsilon})")
    return {"model": kind, "device": device, "dp": dp, "records": len(data), "batch": batch,
            "params": sum(p.numel() for p in model.parameters()), "steps": res.steps,
            "epoch_s": statistics.median(times[1:] if len(times) > 1 else times),
            "epsilon": res.epsilon, "grad_sample_mode": res.grad_sample_mode,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None}


def _gpu_pids() -> set[int] | None:
    """PIDs nvidia-smi lists as computing on a GPU (``None`` when nvidia-smi is unavailable)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {int(x) for x in out.stdout.split() if x.strip().isdigit()}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def gpu_simulation(rounds: int, gpus_per_client: float, timeout: float) -> dict:
    """``fl-sim run -d health`` with GPU clients; proof that the clients computed on the GPU.

    Evidence, while the run lasts (polled every 0.5 s): device-wide free GPU memory
    (``torch.cuda.mem_get_info``; this process holds no tensors then, and the coordinator does
    not score on the GPU with ``--site-metrics off``), and nvidia-smi's compute processes whose
    command line is a Ray ``ClientAppActor`` (where the container shows their PIDs).

    Raises
    ------
    CheckFailed
        The run failed, did not complete ``rounds`` rounds, or no client used the GPU.
    """
    import torch

    out_dir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free0, total = torch.cuda.mem_get_info()
    seen = {"min_free": free0, "actor_pids": set()}
    done = threading.Event()

    def poll():
        while not done.is_set():
            seen["min_free"] = min(seen["min_free"], torch.cuda.mem_get_info()[0])
            for pid in _gpu_pids() or ():
                if "ClientAppActor" in _cmdline(pid):
                    seen["actor_pids"].add(pid)
            done.wait(0.5)

    cmd = [str(Path(sys.executable).parent / "fl-sim"), "run", "-d", "health", "-r", str(rounds), "--local-epochs", "1",
           "--gpus-per-client", str(gpus_per_client), "--site-metrics", "off", "--out", str(out_dir)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "160"}
    env.pop("CITYFED_DEVICE", None)  # the clients' own rule (auto): CUDA because Ray granted them a GPU
    thread = threading.Thread(target=poll, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{' '.join(cmd)}: not finished within {timeout:.0f} s") from None
    finally:
        done.set()
        thread.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise CheckFailed(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    results = json.loads((out_dir / "results.json").read_text())
    rounds_done = [e["round"] for e in results.get("rounds", [])]
    if results.get("status") != "completed" or rounds_done != list(range(1, rounds + 1)):
        raise CheckFailed(f"GPU simulation: status {results.get('status')!r}, rounds {rounds_done} (expected "
                          f"1..{rounds}); see {out_dir}/results.json")
    used_mb = (free0 - seen["min_free"]) / 2**20
    if used_mb < 64 and not seen["actor_pids"]:
        raise CheckFailed(f"GPU simulation: no client used the GPU (free GPU memory fell by {used_mb:.0f} MB at most, "
                          "no ClientAppActor among nvidia-smi's compute processes)")
    accepted = [(e.get("train") or {}).get("accepted") for e in results["rounds"]]
    return {"rounds": rounds_done, "accepted": accepted, "seconds": seconds, "gpus_per_client": gpus_per_client,
            "gpu_mem_used_by_others_mb": used_mb, "gpu_total_mb": total / 2**20,
            "actor_pids_on_gpu": sorted(seen["actor_pids"]), "out": str(out_dir)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run: 1 warm-up + timed ones (median)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (expected batch under Poisson sampling)")
    ap.add_argument("--max-records", type=int, default=8192,
                    help="train on at most this many records per model (fixed random subset; 0 = all)")
    ap.add_argument("--cpu-threads", type=int, default=1, help="torch threads for the CPU runs (1 = a simulated node)")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the GPU-client simulation (0 = skip it)")
    ap.add_argument("--gpus-per-client", type=float, default=0.25, help="GPU share of each simulated client")
    ap.add_argument("--sim-timeout", type=float, default=240.0, help="seconds allowed for the simulation")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args(argv)

    reason = no_cuda_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, args.cpu_threads))
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    meta = {"gpu": props.name, "gpu_mem_gb": props.total_memory / 2**30, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpu_threads": args.cpu_threads, "epochs": args.epochs, "batch": args.batch,
            "max_records": args.max_records}
    print(f"GPU: {props.name} ({meta['gpu_mem_gb']:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"CPU runs with {args.cpu_threads} thread(s)", flush=True)
    rows = []
    try:
        for kind in args.models:
            for device, dp in (("cpu", True), ("cuda", True), ("cuda", False)):
                rows.append(time_fit(kind, device, dp, args.epochs, args.batch, args.max_records))
                r = rows[-1]
                print(f"  {kind:9s} {device:4s} {'DP-SGD' if dp else 'no DP '} {r['epoch_s']:.3f} s/epoch", flush=True)
        sim = gpu_simulation(args.rounds, args.gpus_per_client, args.sim_timeout) if args.rounds > 0 else None
    except CheckFailed as exc:
        print(f"gpu_check: FAILED: {exc}", file=sys.stderr)
        return 1
    print("\n| model | params | records | batch | CPU DP-SGD s/epoch | CUDA DP-SGD s/epoch | CPU / CUDA | "
          "CUDA no-DP s/epoch | DP / no-DP (CUDA) | CUDA peak MB (DP) | epsilon |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in args.models:
        cpu = next(r for r in rows if r["model"] == kind and r["device"] == "cpu")
        gdp = next(r for r in rows if r["model"] == kind and r["device"] == "cuda" and r["dp"])
        gnd = next(r for r in rows if r["model"] == kind and r["device"] == "cuda" and not r["dp"])
        print(f"| {kind} | {gdp['params']:,} | {gdp['records']:,} | {gdp['batch']} | {cpu['epoch_s']:.3f} | "
              f"{gdp['epoch_s']:.3f} | {cpu['epoch_s'] / gdp['epoch_s']:.2f} | {gnd['epoch_s']:.3f} | "
              f"{gdp['epoch_s'] / gnd['epoch_s']:.2f} | {gdp['peak_cuda_mb']:.0f} | {gdp['epsilon']:.2f} |")
    if sim:
        print(f"\nsimulation, GPU clients: fl-sim run -d health -r {args.rounds} --gpus-per-client {args.gpus_per_client}: "
              f"rounds {sim['rounds']} completed, accepted {sim['accepted']}, {sim['seconds']:.0f} s; the clients "
              f"held up to {sim['gpu_mem_used_by_others_mb']:.0f} MB of GPU memory"
              + (f"; ClientAppActor PIDs on the GPU (nvidia-smi): {sim['actor_pids_on_gpu']}" if sim["actor_pids_on_gpu"]
                 else "; nvidia-smi showed no ClientAppActor PID (container PID namespace?)"))
    print(f"\ngpu_check: OK in {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "training": rows, "simulation": sim}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
