"""Round time with and without SecAgg+, in process, for 3 and 20 virtual health sites.

The same ServerApp logic (:func:`server.app.run_federation`) and ClientApp run over the
in-process grid (:class:`simulations.inprocess.InProcessGrid`), so the difference is the
protocol alone: four message stages instead of one, key agreement and secret sharing
with ``secagg-num-shares - 1`` neighbours, masking and unmasking. Every node does real
DP-SGD with its ledger and policy, as in a run. Plain and SecAgg+ runs alternate, after
one warm-up run per size (data loading, noise calibration), and a round's time is the
wall time between two rounds' ends (train + federated evaluation).

    python benchmarks/secagg_overhead.py [--sizes 3 20] [--rounds 3] [--repeats 1] [--no-dp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_args, beside this script
from bench_args import whole_number  # noqa: E402

POLICY = """department = "health"
max_epsilon = 100.0
delta = 1e-3
min_noise_multiplier = 0.3
max_clipping_norm = 1.0
allowed_tasks = ["heart-disease"]
max_rounds_per_run = 100
require_dp = {dp}
"""


def run_once(n_sites: int, secagg: bool, rounds: int, workdir: Path, dp: bool = True) -> tuple[list[float], list[float]]:
    """One federated run of ``n_sites`` virtual health sites (DP-SGD and ledgers when ``dp``).

    The nodes' noise calibration (cached per process) is done before the clock starts, so
    that whichever mode runs first does not pay for it.

    Returns
    -------
    (wall, cpu)
        Each round's wall-clock seconds and this process' CPU seconds (all threads).
    """
    from clients.app import app as client_app
    from clients.node import job_from_config, node_from_config
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    workdir.mkdir(parents=True)
    pol = workdir / "policy.toml"
    pol.write_text(POLICY.format(dp=str(dp).lower()))
    cfg = {"department": "health", "num-rounds": rounds, "local-epochs": 1, "batch-size": 16, "target-epsilon": 3.0,
           "run-dir": str(workdir / "run"), "virtual-sites": n_sites, "partitioner": "iid", "policy": str(pol),
           "ledger-dir": str(workdir / "ledgers"), "secagg": secagg, "dp": dp}
    nodes = [{"partition-id": i, "num-partitions": n_sites} for i in range(n_sites)]
    for nc in nodes:  # warm the nodes' noise-calibration cache (same keys as the train config)
        spec = node_from_config(nc, cfg)
        job_from_config({**cfg, "run-id": "warm-up", "task": "heart-disease"}, spec, len(spec.site_data()[1].train))
    marks = []
    t0 = (time.perf_counter(), time.process_time())
    res = run_federation(InProcessGrid(client_app, nodes, cfg), cfg, run_id=f"bench-{n_sites}-{int(secagg)}",
                         on_round=lambda entry: marks.append((time.perf_counter(), time.process_time())))
    if res["status"] != "completed" or len(marks) != rounds:
        raise RuntimeError(f"{n_sites} sites, secagg={secagg}: run did not complete: {res['status']}")
    accepted = {e["train"]["accepted"] for e in res["rounds"]}
    if accepted != {n_sites}:
        raise RuntimeError(f"{n_sites} sites, secagg={secagg}: accepted per round {accepted}")
    spans = list(zip([t0] + marks[:-1], marks))
    return [b[0] - a[0] for a, b in spans], [b[1] - a[1] for a, b in spans]


#: Fewest sites a SecAgg+ run takes (server.secagg.MIN_SECAGG_NODES: a run raises min-accepted to it).
MIN_SITES = 3


def main(argv: list[str] | None = None) -> dict:
    """Measure and print the table; return the measurements."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=whole_number(MIN_SITES, "--sizes 3 20", " (SecAgg+ needs at least 3 nodes)"),
                    nargs="+", default=[3, 20], help=f"numbers of virtual health sites, each >= {MIN_SITES}")
    ap.add_argument("--rounds", type=whole_number(1, "--rounds 3"), default=3, help="rounds per run (>= 1)")
    ap.add_argument("--repeats", type=whole_number(1, "--repeats 1"), default=1,
                    help="runs per (size, mode), alternating modes (>= 1)")
    ap.add_argument("--no-dp", dest="dp", action="store_false",
                    help="train without DP-SGD (policy require_dp = false): isolates the protocol's cost")
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    args = ap.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # Flower logs every stage at INFO; refusals are checked above
    out = {"rounds": args.rounds, "repeats": args.repeats, "dp": args.dp, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as tmp:
        for n in args.sizes:
            run_once(n, True, 1, Path(tmp) / f"warm-{n}", args.dp)  # data, partitions, imports
            wall, cpu = {False: [], True: []}, {False: [], True: []}
            for r in range(args.repeats):
                for secagg in ((False, True) if r % 2 == 0 else (True, False)):
                    w, c = run_once(n, secagg, args.rounds, Path(tmp) / f"{n}-{int(secagg)}-{r}", args.dp)
                    wall[secagg] += w
                    cpu[secagg] += c
            med = {k: statistics.median(v) for k, v in (("plain", wall[False]), ("secagg", wall[True]),
                                                        ("plain_cpu", cpu[False]), ("secagg_cpu", cpu[True]))}
            out["sizes"][n] = {**med, "ratio": med["secagg"] / med["plain"], "cpu_ratio": med["secagg_cpu"] / med["plain_cpu"],
                               "rounds_wall": {"plain": wall[False], "secagg": wall[True]},
                               "rounds_cpu": {"plain": cpu[False], "secagg": cpu[True]}}
    print(f"{'sites':>6} {'plain s/round':>14} {'SecAgg+ s/round':>16} {'ratio':>7}   {'plain cpu-s':>11} {'SecAgg+ cpu-s':>13} {'ratio':>7}")
    for n, m in out["sizes"].items():
        print(f"{n:>6} {m['plain']:>14.3f} {m['secagg']:>16.3f} {m['ratio']:>6.2f}x   "
              f"{m['plain_cpu']:>11.3f} {m['secagg_cpu']:>13.3f} {m['cpu_ratio']:>6.2f}x")
    print(f"(median per round over {args.rounds} rounds x {args.repeats} run(s); in process, DP-SGD "
          f"{'on' if args.dp else 'off'}; "
          "wall and this process' CPU time; target <= 1.5x at 20 sites)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
