"""Simulation scale and framework overhead: N virtual clients x R rounds, Ray vs a plain loop.

Both runs use the same ServerApp logic, ClientApp, virtual sites (flwr-datasets IID
partitions of a department's real records), DP-SGD and per-node ledgers, side by side in one
invocation:

* ``plain``: the in-process grid (:mod:`simulations.inprocess`): one process calls the
  ClientApp for every sampled client, one after another (torch limited to 1 thread, as a
  Ray worker with 1 CPU is);
* ``ray``: the Flower Simulation Engine (Ray), 1 CPU per virtual client, as ``fl-sim run``
  (with :mod:`flower_compat.dispatch`'s linear-time message dispatcher);
* ``ray-flower`` (optional): the same with Flower's own per-node dispatcher.

Reported: wall time, mean round time (rounds after the first; the first includes start-up),
peak memory of the whole process tree (sum of RSS of this process and all descendants,
sampled every 0.2 s; Ray's own daemons included), and the overhead ratio
``ray round time / plain round time`` (raw) and against an ideal parallel plain loop
(``plain / workers``, workers = Ray CPUs).

    python benchmarks/sim_scale.py --clients 1000 --rounds 3 [--fraction 1.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _tree_rss_mb(root: int) -> float:
    """Sum of VmRSS (MB) of ``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024.0
        except OSError:
            pass
    return total


class PeakSampler(threading.Thread):
    """Samples the process tree's RSS until stopped; ``peak`` in MB."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, 0.0, threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, _tree_rss_mb(os.getpid()))
            self._halt.wait(self.interval)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak


def worker(engine: str, args) -> dict:
    """One measured run in this process (called in a fresh subprocess per engine)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("flwr").setLevel("WARNING")
    import torch

    if engine == "plain":
        torch.set_num_threads(1)
    from simulations.run import simulate

    out = Path(tempfile.mkdtemp(prefix=f"scale-{engine}-", dir=args.tmp))
    cfg = {"department": args.department, "num-rounds": args.rounds, "local-epochs": 1, "batch-size": args.batch,
           "lr": 3e-3, "dp": True, "target-epsilon": 3.0, "run-dir": str(out), "virtual-sites": args.clients,
           "partitioner": "iid", "fraction-train": args.fraction, "fraction-evaluate": args.fraction, "seed": 0,
           "min-nodes": 1, "policy": str(ROOT / "examples" / "policies" / f"{args.department}.toml")}
    stamps: list[float] = []
    sampler = PeakSampler()
    sampler.start()
    base = _tree_rss_mb(os.getpid())
    t0 = time.perf_counter()
    if engine == "ray-flower":  # Flower's own per-node dispatcher (flower_compat/dispatch.py not installed)
        os.environ["CITYFED_SIM_DISPATCH"] = "flower"
    res = simulate(cfg, engine="inprocess" if engine == "plain" else "ray", on_round=lambda e: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    peak = sampler.stop()
    rounds = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    steady = rounds[1:] or rounds
    accepted = [e["train"]["accepted"] for e in res["rounds"]]
    return {"engine": engine, "clients": args.clients, "rounds": args.rounds, "fraction": args.fraction, "wall_s": wall,
            "round_s": rounds, "steady_round_s": sum(steady) / len(steady), "peak_tree_rss_mb": peak,
            "rss_before_mb": base, "accepted_per_round": accepted, "status": res.get("status"),
            "workers": (os.cpu_count() or 1) if engine != "plain" else 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=1.0, help="fraction of clients sampled per round")
    ap.add_argument("--department", default="traffic", help="traffic has 39k training windows (>= 10,000 clients)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--engines", nargs="*", default=["plain", "ray"])
    ap.add_argument("--tmp", default="/tmp", help="short folder for run dirs (Ray needs short socket paths)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)))
        return
    rows = []
    for engine in args.engines:
        cmd = [sys.executable, __file__, "--worker", engine, "--clients", str(args.clients), "--rounds", str(args.rounds),
               "--fraction", str(args.fraction), "--department", args.department, "--batch", str(args.batch),
               "--tmp", args.tmp]
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
               "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp")}
        print(f"running {engine}: {args.clients} clients x {args.rounds} rounds ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{engine} failed")
        rows.append(json.loads(line[7:]))
        r = rows[-1]
        print(f"  {engine}: wall {r['wall_s']:.1f} s, rounds {[round(x, 1) for x in r['round_s']]}, "
              f"peak {r['peak_tree_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    print("\n| engine | clients | sampled/round | rounds | wall s | steady round s | peak RSS (tree) MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['clients']:,} | {max(r['accepted_per_round']):,} | {r['rounds']} | {r['wall_s']:.1f} | "
              f"{r['steady_round_s']:.2f} | {r['peak_tree_rss_mb']:.0f} |")
    by = {r["engine"]: r for r in rows}
    if "plain" in by:
        for name in [e for e in ("ray", "ray-flower") if e in by]:
            r = by[name]
            raw = r["steady_round_s"] / by["plain"]["steady_round_s"]
            ideal = r["steady_round_s"] / (by["plain"]["steady_round_s"] / r["workers"])
            print(f"\noverhead ({name}): round / plain-loop round = {raw:.2f}x; vs an ideal {r['workers']}-worker "
                  f"plain loop = {ideal:.2f}x")
            r["overhead_raw"], r["overhead_vs_ideal_parallel"] = raw, ideal
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
