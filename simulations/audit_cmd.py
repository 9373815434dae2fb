"""``fl-sim audit``: empirical privacy audit (LiRA + canaries) of one node's local training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from privacy.safe_cli import make_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = make_console(highlight=True, soft_wrap=False)  # 200 columns off a terminal (logs, pipes)


def _error(message: str) -> None:
    """Print ``error: MESSAGE``; the message is text, not rich markup (a ranges file's ``[sex]`` stays)."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}")


def audit(
    department: str = typer.Option("health", "--department", "-d",
                                   help="health (heart-mlp), traffic or utility (GRU; forecasting windows, per-window "
                                        "loss as the attack's signal: slower)."),
    out: Path = typer.Option(Path("runs/audit"), "--out", "-o",
                             help="Folder for audit.json and ledgers/ (one ledger per DP setting, one site per target)."),
    epsilon: List[float] = typer.Option([1.0, 3.0, 8.0], "--epsilon", "-e",
                                        help="Target epsilon of a DP-SGD setting to audit (repeat for several). "
                                             "A non-private control is always audited too (unless --no-control)."),
    shadows: int = typer.Option(32, "--shadows", min=2,
                                help="Shadow (reference) models per setting; the attacker knows their training sets."),
    targets: int = typer.Option(8, "--targets", min=1,
                                help="Audited models per setting; their guesses are pooled into one bound."),
    canaries: int = typer.Option(128, "--canaries", min=0,
                                 help="Synthetic records (atypical features, random label), each in a model's "
                                      "training set with probability 1/2; 0 audits the real records only."),
    seed: int = typer.Option(0, "--seed", help="Seed of the inclusion masks, canaries, initialisation and DP noise."),
    site: Optional[List[str]] = typer.Option(None, "--site", "-s",
                                             help="Pool only this site's training records (repeat; default: all sites)."),
    accountant: str = typer.Option("rdp", "--accountant",
                                   help="Accountant of the DP noise calibration and the ledgers: rdp or prv."),
    confidence: float = typer.Option(0.95, "--confidence", min=0.5, max=0.9999,
                                     help="Confidence of the empirical epsilon lower bound."),
    clip: float = typer.Option(1.0, "--clip", help="DP-SGD per-sample clipping norm."),
    max_records: int = typer.Option(2000, "--max-records", min=0,
                                    help="Forecasting: at most this many training windows in the pool (0 = all)."),
    control: bool = typer.Option(True, "--control/--no-control", help="Audit the non-private control model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Remove OUT's earlier audit ledgers first."),
) -> None:
    """Empirical privacy audit: how much does a membership attack actually learn, next to the ledger's epsilon?

    Audits one department node's local training (clients.training.fit with fl-sim baselines'
    settings), non-private and with DP-SGD at each --epsilon. Each record of the pool (the
    department's training records plus --canaries synthetic ones) is in each model's training
    set with probability 1/2. Per setting, --shadows models train the attack (LiRA, Carlini et
    al. 2022) and --targets models are attacked; the attacker's guesses give an epsilon lower
    bound at --confidence (Steinke, Nasr, Jagielski 2023): the training is NOT (eps_lb,
    delta)-DP. The ledger's epsilon is what a PrivacyLedger recorded for the same training.

    Reading the table: the non-private control must show clear leakage (AUC >= 0.6 on the
    records or the canaries, or eps_lb > 1), otherwise the attack is too weak to say anything
    about the DP rows. A DP row whose eps_lb is above its ledger epsilon is a bug (exit 1).
    eps_lb below the ledger epsilon is expected (the bound is a lower bound; DP-SGD's
    accounting assumes an attacker who sees every step).

    Writes OUT/audit.json (AUC, TPR at low FPR, bounds, ledger epsilon and delta, attack
    settings, seconds) and OUT/ledgers/audit-eps*.sqlite.
    """
    import torch

    from simulations.mia import AuditSettings, run_audit

    departments = ("health", "traffic", "utility")
    if department not in departments:
        raise typer.BadParameter(f"unknown department {department!r}; choose from {', '.join(departments)}",
                                 param_hint="--department")
    if accountant not in ("rdp", "prv"):
        raise typer.BadParameter(f"accountant must be 'rdp' or 'prv' (got {accountant!r})", param_hint="--accountant")
    bad = [e for e in epsilon if not (e > 0 and e < float("inf"))]
    if bad:
        raise typer.BadParameter(f"every epsilon must be a finite number > 0 (got {bad[0]!r})", param_hint="--epsilon")
    if clip <= 0:
        raise typer.BadParameter(f"the clipping norm must be > 0 (got {clip!r})", param_hint="--clip")
    if not control and not epsilon:
        raise typer.BadParameter("nothing to audit: give an --epsilon or keep the --control", param_hint="--no-control")
    if overwrite and (out / "ledgers").exists():
        for p in (out / "ledgers").glob("audit-*.sqlite*"):
            p.unlink()
    torch.set_num_threads(max(1, int(os.environ.get("CITYFED_AUDIT_THREADS", "1"))))
    settings = AuditSettings(department=department, epsilons=tuple(epsilon), shadows=shadows, targets=targets,
                             canaries=canaries, seed=seed, sites=tuple(site) if site else None, accountant=accountant,
                             confidence=confidence, max_grad_norm=clip, max_records=max_records, control=control)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        n_settings = len(epsilon) + int(control)
        bar = progress.add_task(f"{department}: shadow and target models", total=n_settings * (shadows + targets))

        started = [False]

        def on_model(label: str, j: int, total: int) -> None:
            if started[0]:  # called before each model: the previous one is done
                progress.advance(bar)
            started[0] = True
            kind = "shadow" if j < shadows else "target"
            progress.update(bar, description=f"{department} {label}: {kind} {j + 1}/{total}")

        try:
            res = run_audit(settings, out, on_model=on_model)
        except FileExistsError as exc:
            _error(f"{exc} (or pass --overwrite)")
            raise typer.Exit(2)
        except ValueError as exc:
            _error(f"{exc}")
            raise typer.Exit(2)
        progress.update(bar, completed=n_settings * (shadows + targets))
    console.print(audit_table(res))
    meta = res["meta"]
    console.print(f"audited: {meta['mechanism']}.")
    console.print(f"pool: {meta['pool']['records']} training records of {', '.join(meta['pool']['sites'])} + "
                  f"{meta['pool']['canaries']} canaries; {shadows} shadows, {targets} targets per setting; "
                  f"{meta['seconds']:.0f} s. Wrote {out / 'audit.json'}")
    try:  # the readable page; a failure to write it never hides the result printed above
        from server.audit_report import write_audit_report

        console.print(f"report: {write_audit_report(out)}")
    except (OSError, ValueError) as exc:
        console.print(f"[yellow]report.html not written: {type(exc).__name__}: {exc}[/yellow]")
    for row in res["rows"]:
        colour = "green" if row["ok"] and not row["verdict"].startswith("attack too weak") else "red"
        console.print(f"[{colour}]{row['setting']}: {row['verdict']}[/{colour}]")
    if not res["ok"]:
        raise typer.Exit(1)


def audit_table(res: dict) -> Table:
    """The audit's summary as a rich table (one row per privacy setting)."""
    conf = res["meta"]["bound"]["confidence"]
    t = Table(title=f"{res['meta']['department']}: empirical privacy audit ({res['meta']['model']}, "
                    f"LiRA + canaries, {conf:.0%} confidence)")
    cols = ["setting", "ledger eps", "delta", "AUC records", "TPR@1% FPR", "AUC canaries", "eps_lb records",
            "eps_lb canaries", "eps_lb", "test acc." if any("test_accuracy" in r for r in res["rows"]) else "test MSE"]
    for c in cols:
        t.add_column(c, justify="left" if c == "setting" else "right")

    def f(v, fmt=".3f"):
        return "-" if v is None else format(v, fmt)

    for r in res["rows"]:
        rec, can = r.get("records") or {}, r.get("canaries") or {}
        t.add_row(r["setting"], "inf (no DP)" if r["epsilon"] is None else f(r["ledger_epsilon"], ".2f"),
                  f(r["delta"], ".2g"), f(rec.get("auc")), f((rec.get("tpr_at_fpr") or {}).get("0.01")),
                  f(can.get("auc")), f(rec.get("eps_lb"), ".2f"), f(can.get("eps_lb"), ".2f"), f(r["eps_lb"], ".2f"),
                  f(r.get("test_accuracy", r.get("test_mse"))))
    return t
