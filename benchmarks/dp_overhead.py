"""DP-SGD cost per shipped model: epoch time and peak memory, no DP vs Opacus hooks vs ghost clipping.

Each (model, mode) runs in its own subprocess, side by side in one invocation, so peak RSS
(CPU) or peak CUDA memory is measured cleanly; ratios are relative to the non-private run of
the same model on the same real data and batch size.

    python benchmarks/dp_overhead.py [--epochs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: model kind -> department whose real data feeds it
MODELS = {"heart-mlp": "health", "gru": "traffic", "patchtst": "traffic"}
MODES = ("none", "hooks", "ghost")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(kind: str, mode: str, epochs: int, batch: int, threads: int = 1) -> dict:
    """Train ``kind`` for ``epochs`` epochs in ``mode``; return timings and memory."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from torch.utils.data import DataLoader, TensorDataset

    from citydata import load_department
    from privacy.dp import DPSettings, make_private
    from shared_models import build_model, criterion_for, default_model_config

    torch.manual_seed(0)
    ds = load_department(MODELS[kind])
    parts = [ds.site_data(s).train.tensors() for s in ds.sites]
    data = TensorDataset(*(torch.cat([p.tensors[i] for p in parts]) for i in range(2)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(default_model_config(ds.schema, kind)).to(device)
    crit = criterion_for(ds.schema.task)
    loader = DataLoader(data, batch_size=batch, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    net = model
    if mode != "none":
        p = make_private(model, opt, loader, crit, DPSettings(noise_multiplier=1.0, grad_sample_mode=mode), epochs=epochs)
        net, opt, crit, loader = p.module, p.optimizer, p.criterion, p.loader
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = _rss_mb()
    times = []
    for _ in range(epochs + 1):  # first epoch is warm-up
        t0 = time.perf_counter()
        for xb, yb in loader:
            if len(xb) == 0:
                continue
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad(set_to_none=True)
            loss = crit(net(xb), yb)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb() - base
    return {
        "model": kind,
        "mode": mode,
        "params": sum(p.numel() for p in model.parameters()),
        "records": len(data),
        "batch": batch,
        "epoch_s": statistics.median(times[1:]),
        "peak_mem_mb": mem,
        "memory_kind": "cuda max allocated" if device.type == "cuda" else "RSS growth during training",
        "device": device.type,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--json", type=Path, help="write all measurements here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads per run (1 = as a simulated node; 0 = torch's default)")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.epochs, args.batch, args.threads)))
        return
    rows = []
    for kind in args.models:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--worker", kind, mode, "--epochs", str(args.epochs), "--batch", str(args.batch),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{kind}/{mode} failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  measured {kind:10s} {mode:6s} {rows[-1]['epoch_s']:.3f} s/epoch", file=sys.stderr)
    print(f"\n| model | params | records | mode | epoch s | x no-DP | peak MB | x no-DP |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for kind in args.models:
        base = next(r for r in rows if r["model"] == kind and r["mode"] == "none")
        for r in (r for r in rows if r["model"] == kind):
            r["time_ratio"] = r["epoch_s"] / base["epoch_s"]
            r["mem_ratio"] = r["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] > 0 else float("nan")
            print(f"| {kind} | {r['params']:,} | {r['records']:,} | {r['mode']} | {r['epoch_s']:.3f} | "
                  f"{r['time_ratio']:.2f} | {r['peak_mem_mb']:.1f} | {r['mem_ratio']:.2f} |")
    print(f"\ndevice: {rows[0]['device']}; memory = {rows[0]['memory_kind']}; batch {args.batch}; "
          f"torch threads {args.threads or 'default'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
