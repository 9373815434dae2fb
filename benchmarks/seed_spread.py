"""Per-site gain of federation across seeds: how much of one comparison's per-site verdict is noise.

Usage::

    fl-sim compare -d health --out runs/cmp-health-s0 --seed 0     # one comparison per seed (same settings)
    fl-sim compare -d health --out runs/cmp-health-s1 --seed 1
    python benchmarks/seed_spread.py runs/cmp-health-s0/results.json runs/cmp-health-s1/results.json
    python benchmarks/seed_spread.py --markdown ...                  # README tables

``fl-sim compare`` reports each site's gain (personalised federated against local-only, without
DP and under DP at each epsilon) on one seed. A seed changes the split, the initialisation and
the sampling, so with test sets of 41-101 patients (health) one patient moves a hospital's
accuracy by 1-2.5 points. This script reads several ``results.json`` of one department, made
with different seeds, and prints, per site and setting, the gain on each seed, its mean and its
worst; which sites' mean gain lies more than two standard errors (over the seeds) below or above 0;
and the pooled summary per seed (accuracy, or MAE / pooled). It computes nothing new: every
number is one ``fl-sim compare`` wrote.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def load(paths: list[Path]) -> list[dict]:
    """Read the comparisons; all of one department and one model, each seed once."""
    runs = []
    for p in paths:
        try:
            r = json.loads(Path(p).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: {p}: cannot read a compare results.json ({exc}). Fix: pass the results.json "
                             "that `fl-sim compare --out DIR` wrote (DIR/results.json or DIR/<department>/results.json)")
        if "per_site" not in r or "meta" not in r:
            raise SystemExit(f"error: {p}: no 'per_site'/'meta' (not an `fl-sim compare` results.json). Fix: pass the "
                             "results.json that `fl-sim compare --out DIR` wrote (DIR/results.json)")
        runs.append(r)
    depts = {(r["meta"]["department"], r["meta"]["model"]) for r in runs}
    if len(depts) != 1:
        raise SystemExit(f"error: the files mix departments/models {sorted(depts)}; pass one department's runs")
    seeds = [r["meta"]["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: seeds {seeds}: a seed appears twice; pass one run per seed")
    return sorted(runs, key=lambda r: r["meta"]["seed"])


def settings(runs: list[dict]) -> list[str]:
    """``non-private`` and every epsilon that all runs have (as strings, as results.json keys them)."""
    common = set.intersection(*({k for s in r["per_site"]["sites"] for k in s.get("dp", {})} for r in runs))
    return ["non-private", *sorted(common, key=float)]


def gain(site: dict, setting: str) -> float | None:
    """Personalised federated vs local-only at ``setting`` (``None`` where a side is missing)."""
    row = site if setting == "non-private" else site.get("dp", {}).get(setting, {})
    return row.get("gain-personalised")


def table(runs: list[dict]) -> tuple[list[str], list[list]]:
    """Rows: site, setting, gain per seed, mean, worst."""
    seeds = [r["meta"]["seed"] for r in runs]
    sites = [s["site"] for s in runs[0]["per_site"]["sites"]]
    by_seed = [{s["site"]: s for s in r["per_site"]["sites"]} for r in runs]
    head = ["site", "setting", *[f"seed {s}" for s in seeds], "mean", "worst"]
    rows = []
    for site in sites:
        for setting in settings(runs):
            g = [gain(b[site], setting) if site in b else None for b in by_seed]
            have = [x for x in g if x is not None]
            rows.append([site, setting, *g, statistics.fmean(have) if have else None, min(have) if have else None])
    return head, rows


def summary(runs: list[dict]) -> tuple[list[str], list[list]]:
    """Pooled-test rows (local-only, federated, personalised) per seed: accuracy, or MAE / pooled model's MAE."""
    key = "accuracy" if runs[0]["per_site"].get("higher_is_better", True) else "mae-vs-pooled"
    head = ["method", "epsilon", *[f"seed {r['meta']['seed']}" for r in runs], "mean"]
    rows = []
    wanted = [("local", None), ("federated", None), ("federated+personalised", None)]
    for eps in settings(runs)[1:]:
        wanted += [("local", float(eps)), ("federated-dp", float(eps)), ("federated-dp+personalised", float(eps))]
    for method, eps in wanted:
        vals = []
        for r in runs:
            hit = [s.get(key) for s in r["summary"] if s["method"] == method and s.get("epsilon") == eps]
            vals.append(hit[0] if hit else None)
        have = [v for v in vals if v is not None]
        rows.append([method, "-" if eps is None else f"{eps:g}", *vals, statistics.fmean(have) if have else None])
    return [*head[:2], *head[2:]], rows


def beyond_noise(rows: list[list], z: float = 2.0) -> tuple[list[tuple], list[tuple]]:
    """(site, setting, mean, standard error) whose mean gain is below / above 0 by more than ``z`` standard errors.

    The standard error is the seeds' sample standard deviation over the square root of their number
    (at least 3 seeds; fewer give no verdict). Seeds differ in split, initialisation and noise, so this
    says whether a site's loss or gain shows up across splits, not only on one test split.
    """
    below, above = [], []
    for r in rows:
        have = [x for x in r[2:-2] if x is not None]
        if len(have) < 3:
            continue
        mean, se = statistics.fmean(have), statistics.stdev(have) / math.sqrt(len(have))
        if mean + z * se < 0:
            below.append((r[0], r[1], mean, se))
        elif mean - z * se > 0:
            above.append((r[0], r[1], mean, se))
    return below, above


def kept_own(runs: list[dict]) -> dict[str, tuple[int, int]] | None:
    """Per site: on how many seeds the node kept its own-records model without DP, of the seeds that say.

    ``None`` when no run records it (comparisons made before ``personalise-own-lr`` or with
    ``--no-personalise-own``): every personalised row is then the fine-tuned federated model.
    """
    counts: dict[str, list[int]] = {}
    for r in runs:
        for s in r["per_site"]["sites"]:
            if s.get("kept") in ("own", "federated", "average"):
                c = counts.setdefault(s["site"], [0, 0])
                c[0] += s["kept"] == "own"
                c[1] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()} if counts else None


def compact(runs: list[dict]) -> tuple[list[str], list[list]]:
    """One row per site: for each setting the mean gain over the seeds and, in brackets, the worst;
    and, where the runs record it, on how many seeds the node kept its own model without DP."""
    head, rows = table(runs)
    sets = settings(runs)
    by_site: dict[str, dict] = {}
    for r in rows:
        by_site.setdefault(r[0], {})[r[1]] = (r[-2], r[-1])
    own = kept_own(runs)
    out_head = ["site", *[f"{'without DP' if k == 'non-private' else 'epsilon ' + k}: mean (worst)" for k in sets]]
    if own is not None:
        out_head.append("own model kept without DP (seeds)")
    return out_head, [[site, *[v.get(k, (None, None)) for k in sets],
                       *([f"{own[site][0]} of {own[site][1]}" if site in own else "-"] if own is not None else [])]
                      for site, v in by_site.items()]


def _fmt(x, unit: str | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{100 * x:+.1f}{unit}" if unit else f"{x:.3f}"


def render(head: list[str], rows: list[list], markdown: bool, unit: str | None = None, first: int = 2) -> str:
    """A plain-text (or Markdown) table; ``unit``: gains as 100 x value with this suffix, else 3 decimals.

    Columns before ``first`` are labels; a (mean, worst) pair prints as "mean (worst)".
    """
    def cell(c):
        return f"{_fmt(c[0], unit)} ({_fmt(c[1], unit)})" if isinstance(c, tuple) else _fmt(c, unit)

    cells = [[cell(c) if i >= first else str(c) for i, c in enumerate(r)] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join([*lines, *("| " + " | ".join(c) + " |" for c in cells)])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in [head, *cells])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="results.json of `fl-sim compare`, one per seed")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables (README)")
    ap.add_argument("--compact", action="store_true", help="one row per site: mean (worst) gain per setting")
    args = ap.parse_args(argv)
    try:
        runs = load(args.results)
    except SystemExit as exc:
        if isinstance(exc.code, str):  # a bad results file: its message names the file and the fix; exit 2
            print(exc.code, file=sys.stderr)
            return 2
        raise
    meta = runs[0]["meta"]
    forecasting = not runs[0]["per_site"].get("higher_is_better", True)
    below, unit = ("relative MAE reduction, %", " %") if forecasting else ("accuracy points (pt)", " pt")
    print(f"{meta['department']} ({meta['model']}): personalised federated vs local-only per site, gain in {below}; "
          f"seeds {[r['meta']['seed'] for r in runs]}")
    head, rows = table(runs)
    if args.compact:
        c_head, c_rows = compact(runs)
        print(render(c_head, c_rows, args.markdown, unit, first=1))
    else:
        print(render(head, rows, args.markdown, unit))
    losing = sorted({(r[0], r[1]) for r in rows if r[-2] is not None and r[-2] < 0})
    print(f"\nsites whose mean gain is below 0: {', '.join(f'{s} ({k})' for s, k in losing) or 'none'}")
    below, above = beyond_noise(rows)
    if len(runs) >= 3:
        def fmt(items):
            return ", ".join(f"{s} ({k}: {100 * m:+.1f} +- {100 * e:.1f}{unit})" for s, k, m, e in items) or "none"

        print(f"mean gain below 0 by more than 2 standard errors over the seeds: {fmt(below)}")
        print(f"mean gain above 0 by more than 2 standard errors over the seeds: {fmt(above)}")
    own = kept_own(runs)
    if own is not None:
        kept = [f"{s} ({n} of {m})" for s, (n, m) in own.items() if n]
        print(f"without DP, nodes that kept their own-records model (its gain is 0 by construction): "
              f"{', '.join(kept) or 'none'}")
    print()
    head, rows = summary(runs)
    print(render(head, rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
