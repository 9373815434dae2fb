"""README tables of one ``fl-sim compare`` run: the summary per method and the per-site value.

Usage::

    fl-sim compare -d health --out runs/compare-health --overwrite
    python benchmarks/compare_tables.py runs/compare-health/results.json

Prints Markdown: a line with the run's settings (from ``meta``), the summary table (one row per
method and epsilon: epsilon spent, and accuracy / ROC-AUC / worst hospital, or MAE / pooled and
MAE / naive), the per-site table (local-only, its chosen epochs, federated, personalised, the
gain, which model the node kept without DP where the run records it, local-only DP and
personalised DP with the gain at each epsilon, the leave-one-site-out contribution) and the worst
site per setting. It computes nothing new: every number is one the comparison wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LAYERS = {"all": "whole model", "head": "output layer"}


def load(path: Path) -> dict:
    """A compare results.json (``meta``, ``summary``, ``per_site``, ``rows``)."""
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {path}: cannot read a compare results.json ({exc}). Fix: pass the results.json "
                         "that `fl-sim compare --out DIR` wrote (DIR/results.json)")
    missing = [k for k in ("meta", "summary", "per_site", "rows") if k not in r]
    if missing or r["meta"].get("command") != "fl-sim compare":
        raise SystemExit(f"error: {path}: not an `fl-sim compare` results.json (missing {', '.join(missing) or 'meta.command'})"
                         ". Fix: pass the results.json that `fl-sim compare --out DIR` wrote (DIR/results.json)")
    return r


def _lr(x) -> str:
    return f"{float(x):g}"


def settings_line(r: dict) -> str:
    """``(model; federated: ...; personalised: ...; under DP (...): ...; N s in all)``."""
    meta = r["meta"]
    fed, dp = meta.get("federated", {}), meta.get("federated-dp", {})
    parts = [f"{fed.get('num-rounds')} rounds x {fed.get('local-epochs')} local epochs, batch {fed.get('batch-size')}, "
             f"lr {_lr(fed.get('lr'))}, {fed.get('strategy')}"]
    out = [meta["model"], "federated: " + parts[0]]
    if fed.get("personalise-epochs"):
        pb = fed.get("personalise-batch-size") or fed.get("batch-size")
        out.append(f"personalised: at most {fed['personalise-epochs']} epochs ({LAYERS.get(fed.get('personalise-layers'), '?')}, "
                   f"chosen on the node's validation split), batch {pb}, lr {_lr(fed.get('personalise-lr'))}")
        if float(fed.get("personalise-own-lr", 0) or 0) > 0:
            out.append(f"own-records candidate: lr {_lr(fed['personalise-own-lr'])}, batch "
                       f"{fed.get('personalise-own-batch-size') or pb} (kept alone, or averaged with the fine-tuned model, whichever validates better)")
    changed = {k: v for k, v in dp.items() if fed.get(k) != v and not k.startswith("personalise-own")}
    if changed:
        bits = []
        for k, label in (("batch-size", "batch"), ("lr", "lr"), ("clipping-norm", "clipping norm")):
            if k in changed:
                bits.append(f"{label} {_lr(changed[k]) if k != 'batch-size' else changed[k]}")
        if dp.get("personalise-epochs"):
            pb = dp.get("personalise-batch-size") or dp.get("batch-size")
            bits.append(f"personalised: {dp['personalise-epochs']} epochs ({LAYERS.get(dp.get('personalise-layers'), '?')}), "
                        f"batch {pb}, lr {_lr(dp.get('personalise-lr'))}")
        out.append("under DP (`FED_DP_DEFAULTS`): " + ", ".join(bits))
    out.append(f"{meta.get('seconds', 0):,.0f} s in all")
    return "(" + "; ".join(out) + ")"


def _f3(x) -> str:
    return "" if x is None else f"{x:.3f}"


def summary_table(r: dict) -> list[str]:
    cls = r["per_site"].get("higher_is_better", True)
    who = "hospital" if r["meta"]["department"] == "health" else "site"
    head = ["method", "target epsilon", f"epsilon spent (max {who})"]
    head += (["accuracy, pooled test", "ROC-AUC", "worst hospital accuracy"] if cls else
             ["MAE / pooled MAE (mean over sites)", "MAE / best naive MAE (mean over sites)"])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in r["summary"]:
        eps = "off" if s["epsilon"] is None else f"{s['epsilon']:g}"
        spent = "" if s.get("epsilon_spent_max") is None else f"{s['epsilon_spent_max']:.2f}"
        vals = [s.get("accuracy"), s.get("roc-auc"), s.get("min-site-accuracy")] if cls else \
            [s.get("mae-vs-pooled"), s.get("mae-vs-naive")]
        lines.append("| " + " | ".join([s["method"], eps, spent, *map(_f3, vals)]) + " |")
    return lines


def site_table(r: dict) -> list[str]:
    v = r["per_site"]
    cls = v.get("higher_is_better", True)
    fmt = _f3 if cls else (lambda x: "" if x is None else f"{x:.4g}")
    gain = lambda g: "" if g is None else f"{g:+.3f}"
    eps_keys = list(v["sites"][0].get("dp", {})) if v["sites"] else []
    kept = any(e.get("kept") for e in v["sites"])
    epochs = {row["site"]: row["metrics"].get("epochs") for row in r["rows"]
              if row["method"] == "local" and row["epsilon"] is None and row.get("metrics")}
    head = ["site", "local", "local epochs", "federated", "personalised", "gain", *(["kept"] if kept else [])]
    for k in eps_keys:
        head += [f"local DP eps {k}", f"personalised DP eps {k}", "gain"]
    head.append("LOO")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "".join("---|" if h == "kept" else "---:|" for h in head[1:])]
    for e in v["sites"]:
        cells = [e["site"], fmt(e.get("local")), str(epochs.get(e["site"]) or ""), fmt(e.get("federated")),
                 fmt(e.get("personalised")), gain(e.get("gain-personalised")), *([e.get("kept") or ""] if kept else [])]
        for k in eps_keys:
            d = e["dp"][k]
            cells += [fmt(d.get("local")), fmt(d.get("personalised")), gain(d.get("gain-personalised"))]
        cells.append(gain(e.get("loo-contribution")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def worst_line(r: dict) -> str:
    v = r["per_site"]
    w = v.get("worst-site") or {}
    parts = [f"Worst site without DP: {w.get('site')} ({w.get('gain', 0):+.3f})"]
    parts += [f"at epsilon {k}: {x.get('site')} ({x.get('gain', 0):+.3f})" for k, x in (v.get("worst-site-dp") or {}).items() if x]
    return "; ".join(parts)


def render(r: dict) -> str:
    v = r["per_site"]
    cls = v.get("higher_is_better", True)
    unit = "accuracy" if cls else "MAE (site's units)"
    intro = (f"Per site ({unit}; gain = {v.get('gain')}; local epochs = chosen on the site's validation split"
             + ("; kept = the model the node kept without DP: federated = fine-tuned from the federated model, "
                "own = its own-records candidate, trained like local-only, average = the mean of those two models' predictions" if any(e.get("kept") for e in v["sites"]) else "")
             + f"; LOO = leave-one-site-out contribution, {v.get('loo-note')}):")
    return "\n".join([f"**{r['meta']['department']}**", settings_line(r), "", *summary_table(r), "", intro, "",
                      *site_table(r), "", worst_line(r)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="results.json of one `fl-sim compare` department")
    args = ap.parse_args(argv)
    try:
        text = render(load(args.results))
    except SystemExit as exc:
        if isinstance(exc.code, str):  # a bad results file: its message names the file and the fix; exit 2
            print(exc.code, file=sys.stderr)
            return 2
        raise
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
