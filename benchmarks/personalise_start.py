"""Does a site's personalised model gain from starting at the federated model? A check at one site.

Usage::

    fl-sim compare -d utility --out runs/cmp-utility-s1 --seed 1 --epsilon 3 --no-loo
    python benchmarks/personalise_start.py runs/cmp-utility-s1 victoria-2014

``fl-sim compare`` fine-tunes the non-private run's global model at each site (the
``federated+personalised`` rows) and trains each site's local-only model from the initialisation.
Where a site's personalised model scores worse than its local-only model, this script separates
the two causes: the starting point and the fine-tuning's learning rate. It reads the comparison's
``results.json`` (department, model, seed, the personalisation's settings) and its non-private
global model (``federated/model.safetensors``), then trains at the one site, with the same
non-private rule as the node (:func:`clients.selection.fit_selected`: the epoch count, at most
``--max-epochs``, chosen on a validation split of the site's training records):

- from the global model at each ``--lr`` (default: the run's ``personalise-lr``, three times it
  and a third of it), keeping the global model when no epoch helps (as the node does);
- from the initialisation at the run's ``personalise-lr``.

It prints each model's test metric next to the comparison's local-only and personalised values.
The training seed is ``--train-seed`` (default: the comparison's seed). With the default, the
run from the initialisation is the comparison's local-only model (same seed, same rule: it
reproduces its metric); the node's personalisation used another seed, so the gap between the
comparison's personalised value and this script's at the same learning rate is seed noise.
Simulation only: it reads the site's records from the bundled data, like ``fl-sim compare``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_args, beside this script
from bench_args import finite_number, whole_number  # noqa: E402


def load_run(run: Path) -> tuple[dict, Path]:
    """Read a comparison's results.json and locate its non-private global model."""
    res = run / "results.json"
    try:
        r = json.loads(res.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {res}: cannot read a compare results.json ({exc}). Fix: pass the folder that "
                         "`fl-sim compare --out DIR` wrote for one department (DIR or DIR/<department>)")
    meta = r.get("meta") or {}
    for key in ("department", "model", "seed", "federated"):
        if key not in meta:
            raise SystemExit(f"error: {res}: meta has no '{key}' (not an `fl-sim compare` results.json, or "
                             "one from before 2026-12-04). Fix: re-run `fl-sim compare`")
    model = run / "federated" / "model.safetensors"
    if not model.is_file():
        raise SystemExit(f"error: {model}: no non-private global model. Fix: pass a compare folder whose "
                         "federated run finished (it writes federated/model.safetensors)")
    return r, model


def site_row(results: dict, site: str) -> dict:
    """The comparison's per-site row of ``site`` (local-only and personalised metric)."""
    rows = {s["site"]: s for s in results.get("per_site", {}).get("sites", [])}
    if site not in rows:
        raise SystemExit(f"error: site {site!r} is not in this comparison; its sites: {', '.join(rows)}")
    return rows[site]


def cli(argv: list[str] | None = None) -> int:
    """The script's entry: :func:`main`; a bad run folder, site or model file exits 2 with its message.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0, or 2 for a bad input (its message, naming the file and the fix, on stderr).
    """
    try:
        return main(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):  # main's refusals: SystemExit with the message
            print(exc.code, file=sys.stderr)
            return 2
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="folder `fl-sim compare --out` wrote for one department")
    ap.add_argument("site", help="site name, as in the comparison's per-site table")
    ap.add_argument("--lr", type=finite_number(0, "--lr 0.01", inclusive=False), action="append", help="fine-tuning learning rate, > 0 (repeat)")
    ap.add_argument("--max-epochs", type=whole_number(1, "60 epochs, batch 64, or leave the option out for the run's value"), default=None,
                    help="most epochs, >= 1 (default: the run's personalise-epochs)")
    ap.add_argument("--batch-size", type=whole_number(1, "60 epochs, batch 64, or leave the option out for the run's value"), default=None, help=">= 1; default: the run's personalise-batch-size")
    ap.add_argument("--train-seed", type=int, default=None, help="default: the comparison's seed")
    args = ap.parse_args(argv)

    results, model_path = load_run(args.run)
    meta = results["meta"]
    row = site_row(results, args.site)
    fed = meta["federated"]

    import torch
    from safetensors.torch import load_file

    from citydata import load_department
    from clients.selection import fit_selected
    from clients.training import TrainConfig
    from shared_models import build_model, default_model_config
    from shared_models.scoring import evaluate

    warnings.simplefilter("ignore")  # the data-quality notes were shown by the comparison
    torch.set_num_threads(1)
    ds = load_department(meta["department"], seed=int(meta["seed"]))
    task = ds.schema.task
    metric = "accuracy" if task == "binary-classification" else "mae"
    sd = ds.site_data(args.site)
    train = sd.train.tensors()
    try:
        global_state = load_file(str(model_path))
        probe = build_model(default_model_config(ds.schema, meta["model"]))
        probe.load_state_dict(global_state)
    except Exception as exc:  # a truncated file or another model's weights
        raise SystemExit(f"error: {model_path}: not a {meta['model']} model of {meta['department']} "
                         f"({type(exc).__name__}). Fix: pass the compare folder this model was written to")
    base_lr = float(fed.get("personalise-lr", fed.get("lr", 1e-2)))
    lrs = args.lr or [base_lr, base_lr * 3, base_lr / 3]
    epochs = args.max_epochs or int(fed.get("personalise-epochs", 60))
    batch = args.batch_size or int(fed.get("personalise-batch-size") or fed.get("batch-size", 64))
    seed = int(meta["seed"]) if args.train_seed is None else args.train_seed

    print(f"{meta['department']} ({meta['model']}), site {args.site}, comparison seed {meta['seed']}, "
          f"train seed {seed}, at most {epochs} epochs, batch {batch}; test {metric}")
    print(f"  comparison: local-only {row['local']:.4g}, federated {row['federated']:.4g}, "
          f"personalised {row['personalised']:.4g}")
    for start, lr in [*(("global model", lr) for lr in lrs), ("initialisation", base_lr)]:
        torch.manual_seed(seed)
        model = build_model(default_model_config(ds.schema, meta["model"]))
        if start == "global model":
            model.load_state_dict(global_state)
        tc = TrainConfig(epochs=epochs, batch_size=batch, lr=lr, seed=seed)
        res = fit_selected(model, train, task, tc, allow_zero=start == "global model")
        score = evaluate(model, sd, task)[metric]
        print(f"  from the {start:<14} lr {lr:<8.3g} epochs {res.selected_epochs:>3}  {metric} {score:.4g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
