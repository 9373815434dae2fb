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
sampled every 0.5 s; Ray's own daemons included; also the sum of PSS, which counts pages
shared between processes once, and the biggest processes at the RSS peak), RSS per client
(peak / clients), and the overhead ratio
``ray round time / plain round time`` (raw) and against an ideal parallel plain loop
(``plain / workers``, workers = Ray CPUs).

    python benchmarks/sim_scale.py --clients 1000 --rounds 3 [--fraction 1.0] [--json out.json]
    python benchmarks/sim_scale.py --clients 100000 --fraction 0.01 --allow-empty   # more clients than windows

Each round samples ``int(clients x fraction)`` nodes (passed as ``min-nodes``, so the first round
waits until that many have registered).
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


def _tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
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
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        out.append(pid)
    return out


def _memory(pid: int) -> tuple[str, float, float] | None:
    """``(name, rss_mb, pss_mb)`` of one process (PSS: shared pages divided among their users)."""
    try:
        with open(f"/proc/{pid}/cmdline") as fh:
            name = fh.read().replace("\0", " ").strip()
        rss = pss = 0.0
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) / 1024.0
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return _short(name), rss, pss


def _short(cmdline: str) -> str:
    """A process' role: Ray actor/daemon name, or this benchmark's driver."""
    if cmdline.startswith("ray::"):
        return cmdline.split()[0]
    if "sim_scale.py" in cmdline:
        return "driver (ServerApp, SuperLink state)"
    for daemon in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
        if daemon in cmdline:
            return f"ray {daemon}"
    return cmdline.split()[0].rsplit("/", 1)[-1] if cmdline else "?"


def _tree_rss_mb(root: int) -> float:
    """Sum of RSS (MB) of ``root`` and all its descendants."""
    return sum(m[1] for p in _tree_pids(root) if (m := _memory(p)))


class PeakSampler(threading.Thread):
    """Samples the process tree's memory until stopped.

    ``peak`` (MB) is the highest sum of RSS over the tree; ``peak_pss`` the highest sum of PSS
    (shared pages such as libtorch's counted once, not once per process); ``at_peak`` the
    processes ``(name, rss, pss)`` at the RSS peak.
    """

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.peak, self.peak_pss, self.at_peak = interval, 0.0, 0.0, []
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            rows = [m for p in _tree_pids(os.getpid()) if (m := _memory(p))]
            rss, pss = sum(r[1] for r in rows), sum(r[2] for r in rows)
            if rss > self.peak:
                self.peak, self.at_peak = rss, sorted(rows, key=lambda r: -r[1])
            self.peak_pss = max(self.peak_pss, pss)
            self._halt.wait(self.interval)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak


def _sampled(clients: int, fraction: float) -> int:
    """Nodes a round samples (Flower: ``int(available x fraction)``, at least ``min-nodes``).

    Used as ``min-nodes``, so a round never samples fewer. Flower's simulation registers its
    nodes while the ServerApp already runs (with ``min-nodes = 1`` the first round of a
    1,000-client run sampled the 699 registered by then); ``fl-sim run`` now also waits for
    all of them (:func:`simulations.run.after_registration`).
    """
    return max(1, int(clients * fraction))


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
           "min-nodes": _sampled(args.clients, args.fraction),
           "policy": str(ROOT / "examples" / "policies" / f"{args.department}.toml")}
    if args.allow_empty:
        cfg["virtual-allow-empty"] = True
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
            "rss_before_mb": base, "peak_tree_pss_mb": sampler.peak_pss,
            "per_client_mb": peak / args.clients, "processes_at_peak": sampler.at_peak,
            "updates_per_round": [len(e["train"].get("nodes") or {}) for e in res["rounds"]],
            "refused_per_round": [sum(1 for x in res.get("refused") or [] if x.get("round") == e["round"])
                                  for e in res["rounds"]],
            "accepted_per_round": accepted, "status": res.get("status"),
            "workers": (os.cpu_count() or 1) if engine != "plain" else 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=1.0, help="fraction of clients sampled per round")
    ap.add_argument("--department", default="traffic", help="traffic has 39k training windows (>= 10,000 clients)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--engines", nargs="*", default=["plain", "ray"])
    ap.add_argument("--allow-empty", action="store_true",
                    help="more clients than training windows: the sites beyond hold none and answer 'no training "
                         "records' (traffic has 39,006 windows; needed for 100,000 clients)")
    ap.add_argument("--tmp", default="/tmp", help="short folder for run dirs (Ray needs short socket paths); "
                                                  "created if missing")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tmp = Path(args.tmp)
    if tmp.exists() and not tmp.is_dir():
        ap.error(f"--tmp {args.tmp}: is a file, not a folder; give a (short) folder path, created if missing")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        ap.error(f"--tmp {args.tmp}: cannot create the folder ({exc.strerror or type(exc).__name__}); give a "
                 "writable (short) folder path")
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)))
        return
    rows = []
    for engine in args.engines:
        cmd = [sys.executable, __file__, "--worker", engine, "--clients", str(args.clients), "--rounds", str(args.rounds),
               "--fraction", str(args.fraction), "--department", args.department, "--batch", str(args.batch),
               "--tmp", args.tmp] + (["--allow-empty"] if args.allow_empty else [])
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
    print("\n| engine | clients | updates/round | refused/round | rounds | wall s | steady round s | peak RSS (tree) MB "
          "| peak PSS (tree) MB | RSS per client MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['clients']:,} | {'/'.join(map(str, r['updates_per_round']))} | "
              f"{'/'.join(map(str, r['refused_per_round']))} | {r['rounds']} | {r['wall_s']:.1f} | "
              f"{r['steady_round_s']:.2f} | {r['peak_tree_rss_mb']:.0f} | {r['peak_tree_pss_mb']:.0f} | "
              f"{r['per_client_mb']:.3f} |")
    for r in rows:
        top = ", ".join(f"{name} {rss:.0f}" for name, rss, _ in r["processes_at_peak"][:6])
        print(f"\n{r['engine']} at its peak (RSS MB): {top}")
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
