"""The federated global model over many seeds: is a pooled target met on one split, or on most?

Usage::

    python benchmarks/federated_seeds.py -d health --seeds 0-8 --no-dp
    python benchmarks/federated_seeds.py -d health --seeds 3-8 --epsilon 3 --set lr=0.03
    python benchmarks/federated_seeds.py -d health --seeds 0-2 --epsilon 3 --markdown

``fl-sim compare`` runs everything (baselines, the federated runs, personalisation, leave-one-site-out)
for one seed. This script runs only the federated part, with exactly the run config ``fl-sim compare``
uses (:func:`simulations.compare.federated_settings`: ``FED_DEFAULTS``, under DP ``FED_DP_DEFAULTS``,
personalisation included, since under DP it shares each node's budget with the rounds), one run per
seed, in-process, and prints the global model's pooled test metric as the simulated coordinator scored
it after the last round, and its best round (which a real run cannot pick: the coordinator has no test
set). ``--set KEY=VALUE`` changes run-config keys for every seed (e.g. a setting tried on seeds other
than the ones it is reported on). A seed changes health's split of every hospital's patients, the
initialisation and the sampling (DP noise follows the seed in simulation).

Metric: health: accuracy on the union of the hospitals' test splits; traffic and utility: MAE / naive
(the coordinator's ``mae-ratio``) on the union of the sites' test periods.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Pooled metric of the coordinator's central evaluation per department, and whether higher is better.
METRIC = {"health": ("accuracy", True), "traffic": ("mae-ratio", False), "utility": ("mae-ratio", False)}


def parse_seeds(spec: str) -> list[int]:
    """``"0-8"``, ``"0,3,5"`` or ``"0-2,7"`` -> sorted distinct seeds (each >= 0).

    Raises
    ------
    ValueError
        With the bad part and the accepted forms.
    """
    seeds: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(f"--seeds {spec!r}: {part!r} is not a seed or a range. Fix: e.g. 0-8, 0,3,5 or 0-2,7") from None
        if a < 0 or b < a:
            raise ValueError(f"--seeds {spec!r}: {part!r} is not a range of seeds >= 0 (first <= last). Fix: e.g. 0-8")
        if b - a >= 1000:
            raise ValueError(f"--seeds {spec!r}: {part!r} is more than 1000 seeds. Fix: a shorter range")
        seeds.update(range(a, b + 1))
    return sorted(seeds)


def parse_set(items: list[str]) -> dict:
    """``["lr=0.03", "strategy=fedavgm"]`` -> run-config overrides, checked against the ServerApp's keys.

    Values are read as JSON where they parse (numbers, ``true``/``false``), else kept as strings; the
    whole run config is validated later by the ServerApp's own settings model.
    """
    from server.app import DEFAULTS

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE. Fix: e.g. --set lr=0.03")
        if key not in DEFAULTS:
            raise ValueError(f"--set {item!r}: {key!r} is not a run-config key. Fix: one of {', '.join(sorted(DEFAULTS))}")
        if key in ("department", "seed", "dp", "target-epsilon", "run-dir", "central-data"):
            raise ValueError(f"--set {item!r}: {key!r} is set by this script. Fix: use -d, --seeds, --epsilon/--no-dp")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[key] = value
    return out


def run_seed(department: str, seed: int, epsilon: float | None, overrides: dict, out: Path) -> dict:
    """One federated run (in-process) as ``fl-sim compare`` configures it; returns per-round pooled metrics."""
    from simulations.compare import federated_settings, run_config, write_policy
    from simulations.run import simulate

    run_dir = out / f"seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # its ledgers would carry spent budget into this run
    policy = None
    if epsilon is None:
        policy = write_policy(department, out / "policies" / f"{department}-no-dp.toml", require_dp=False)
    cfg = run_config(department, seed, epsilon, run_dir, federated_settings(department, epsilon is not None, overrides), policy)
    t0 = time.perf_counter()
    res = simulate(cfg, engine="inprocess")
    metric, _ = METRIC[department]
    values = [(e["round"], e["central"][metric]) for e in res["rounds"] if isinstance(e.get("central"), dict)
              and e["central"].get(metric) is not None]
    if not values:
        raise RuntimeError(f"{run_dir}: the run wrote no central {metric} (status {res.get('status')!r})")
    spent = [n.get("epsilon") for e in res["rounds"] for n in (e.get("train") or {}).get("nodes", {}).values()]
    spent = [s for s in spent if s is not None]
    return {"seed": seed, "rounds": values, "final": values[-1][1], "seconds": time.perf_counter() - t0,
            "epsilon_spent_max": max(spent) if spent else None}


def summarise(runs: list[dict]) -> dict:
    """Mean, min and max over seeds of the pooled metric after the last round."""
    finals = [r["final"] for r in runs]
    return {"mean": statistics.fmean(finals), "min": min(finals), "max": max(finals), "n": len(finals)}


def render(department: str, epsilon: float | None, overrides: dict, runs: list[dict], target: float | None,
           markdown: bool) -> str:
    """The per-seed table and the summary line."""
    metric, higher = METRIC[department]
    best = (max if higher else min)
    s = summarise(runs)
    head = (f"{department}, {'no DP' if epsilon is None else f'DP at epsilon {epsilon:g}'}, "
            f"settings of fl-sim compare{' with ' + ', '.join(f'{k}={v}' for k, v in overrides.items()) if overrides else ''}")
    lines = [head, ""]
    if markdown:
        lines += [f"| seed | {metric} after the last round | best round ({metric}) | s |", "|---|---|---|---|"]
    else:
        lines.append(f"seed  {metric} after the last round  best round ({metric})  s")
    for r in runs:
        br, bv = best(r["rounds"], key=lambda x: x[1])
        cells = [str(r["seed"]), f"{r['final']:.3f}", f"{br} ({bv:.3f})", f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(cells))
    tail = f"mean {s['mean']:.3f} (min {s['min']:.3f}, max {s['max']:.3f}) over {s['n']} seeds"
    if target is not None:
        met = [r["seed"] for r in runs if (r["final"] >= target if higher else r["final"] <= target)]
        tail += f"; {metric} {'>=' if higher else '<='} {target:g} on {len(met)} of {len(runs)} seeds ({', '.join(map(str, met)) or 'none'})"
    lines += ["", tail]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("-d", "--department", required=True, choices=sorted(METRIC))
    ap.add_argument("--seeds", default="0-2", help="seeds: 0-8, 0,3,5 or 0-2,7 (default 0-2)")
    dp = ap.add_mutually_exclusive_group()
    dp.add_argument("--epsilon", type=float, default=3.0, help="target epsilon per node (default 3)")
    dp.add_argument("--no-dp", action="store_true", help="no DP (the nodes' policy with require_dp = false)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config change for every seed")
    ap.add_argument("--target", type=float, help="count the seeds meeting this pooled value")
    ap.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder, removed)")
    ap.add_argument("--json", type=Path, help="also write the per-seed results as JSON here")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table")
    a = ap.parse_args(argv)
    try:
        seeds = parse_seeds(a.seeds)
        overrides = parse_set(a.set)
    except ValueError as exc:
        ap.error(str(exc))
    if a.epsilon is not None and not a.no_dp and not a.epsilon > 0:
        ap.error(f"--epsilon {a.epsilon}: must be > 0. Fix: e.g. --epsilon 3, or --no-dp")
    epsilon = None if a.no_dp else a.epsilon
    import torch

    torch.set_num_threads(1)  # as fl-sim compare: small models gain nothing from more threads
    from privacy import SEED_FROM_JOB_ENV

    os.environ.setdefault(SEED_FROM_JOB_ENV, "1")  # DP noise follows the seed in simulation, as in fl-sim compare
    tmp = None
    out = a.out
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="federated-seeds-")
        out = Path(tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for i, seed in enumerate(seeds, 1):
            r = run_seed(a.department, seed, epsilon, overrides, out)
            runs.append(r)
            print(f"[{i}/{len(seeds)}] seed {seed}: {r['final']:.3f} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(render(a.department, epsilon, overrides, runs, a.target, a.markdown))
    if a.json:
        a.json.write_text(json.dumps({"department": a.department, "epsilon": epsilon, "overrides": overrides,
                                      "summary": summarise(runs), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
