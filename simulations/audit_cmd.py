"""``fl-sim audit``: empirical privacy audit (LiRA + canaries) of one node's local training."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Optional

import typer

from privacy.safe_cli import make_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = make_console(highlight=True, soft_wrap=False)  # 200 columns off a terminal (logs, pipes)

#: Highest --seed: the other fl-sim commands' bound (simulations.cli._MAX_SEED, the run config's).
_MAX_SEED = 2**32 - 1
MAX_CLIP = 1e6  # server.app.MAX_SCALE: the largest clipping norm a run accepts

#: Environment variable: PyTorch threads of the audit's training (default 1; at most the machine's CPU count).
THREADS_ENV = "CITYFED_AUDIT_THREADS"


def audit_threads() -> int:
    """The audit's PyTorch thread count from ``$CITYFED_AUDIT_THREADS``; fl-sim's exit 2 for a bad value.

    Unset or empty: 1. Otherwise a whole number from 1 to this machine's CPU count
    (``os.cpu_count()``): more threads than cores only slow the training down, and a very
    large count makes PyTorch fail to start its threads (or crash).

    Returns
    -------
    int
        The thread count.
    """
    from simulations.cli import _refuse

    raw = os.environ.get(THREADS_ENV, "")
    if not raw.strip():
        return 1
    most = os.cpu_count() or 1
    fix = f"set {THREADS_ENV} to a whole number from 1 to {most} (this machine's CPU count), or unset it (1 thread)"
    try:
        n = int(raw.strip())
    except ValueError:
        _refuse(f"{THREADS_ENV}={raw!r}: not a whole number", fix)
    if not 1 <= n <= most:
        _refuse(f"{THREADS_ENV}={raw!r}: out of range", fix)
    return n


def _check_inputs(department: str, out: Path, epsilon: List[float], seed: int, site: Optional[List[str]],
                  accountant: str, clip: float, confidence: float, control: bool, overwrite: bool) -> int:
    """fl-sim's input rule for ``fl-sim audit``: exit 2 with ``error: OPTION: WHAT; fix: HOW`` on standard error.

    Everything the audit would refuse, checked before its data is loaded, its progress bar shown or
    anything written: the department, accountant, epsilons (each setting once: two that share a ledger name,
    ``audit-eps{eps:g}.sqlite``, are refused), repeated --site names, clipping norm, confidence, ``$CITYFED_DEVICE``, --out (a file;
    a folder where the audit writes a file at its end: audit.json, report.html and their .tmp; a file at
    ledgers/; earlier audit ledgers there without --overwrite) and --site (the site names need the department's
    bundled records, so they are read only when --site is given).
    """
    from simulations.cli import (_check_end_files, _check_end_folders, _check_node_environment,  # fl-sim's own format
                                 _check_out_dir, _refuse)  # (imported here: cli imports this module)

    departments = ("health", "traffic", "utility")
    if department not in departments:
        _refuse(f"unknown department {department!r}", f"choose from {', '.join(departments)}", "--department")
    if accountant not in ("rdp", "prv"):
        _refuse(f"unknown accountant {accountant!r}", "choose rdp or prv", "--accountant")
    bad = [e for e in epsilon if not (e > 0 and math.isfinite(e))]
    if bad:
        _refuse(f"every epsilon must be a finite number > 0 (got {bad[0]!r})", "give --epsilon a finite number > 0",
                "--epsilon")
    from simulations.mia import ledger_name, repeated_site, same_ledger

    clash = same_ledger(epsilon)
    if clash:  # one ledger for both: the second row would report the two settings' composed epsilon
        first, second = clash
        _refuse(f"{first!r} and {second!r} are the same setting (both eps={first:g}, one ledger "
                f"{ledger_name(first)}): the second would be added to the first's ledger",
                "give each epsilon once (values equal to 6 significant digits count as one)", "--epsilon")
    twice = repeated_site(site)
    if twice is not None:
        _refuse(f"site {twice!r} given more than once: its records would be in the audit's pool twice",
                "give each --site once", "--site")
    if not (0 < clip <= MAX_CLIP and math.isfinite(clip)):  # MAX_CLIP: runs' clipping-norm bound (server.app)
        _refuse(f"the clipping norm must be a finite number > 0 and at most {MAX_CLIP:g} (got {clip!r})",
                f"give --clip a number in (0, {MAX_CLIP:g}]", "--clip")
    if not 0.5 <= confidence <= 0.9999:  # typer's range lets nan through
        _refuse(f"must be a number from 0.5 to 0.9999 (got {confidence!r})", "give --confidence a value in that range",
                "--confidence")
    if not control and not epsilon:
        _refuse("nothing to audit", "give an --epsilon or keep the --control", "--no-control")
    if not 0 <= seed <= _MAX_SEED:  # typer's range says so first; a direct call too
        _refuse(f"{seed} is not in the range 0<=x<={_MAX_SEED}", "give --seed a whole number in that range", "--seed")
    threads = audit_threads()
    _check_node_environment(energy=False)  # $CITYFED_DEVICE: every model of the audit trains on it
    _check_out_dir(out, "--out")
    from simulations.mia import FIXED_OUTPUTS

    _check_end_files(out, FIXED_OUTPUTS, "fl-sim audit")  # a folder there would fail after all the training
    _check_end_folders(out, ("ledgers",), "fl-sim audit")
    ledgers = out / "ledgers"
    odd = sorted(p for p in ledgers.glob("audit-*.sqlite*") if not p.is_file()) if ledgers.is_dir() else []
    if odd:  # neither a ledger to add to nor one --overwrite may remove
        _refuse(f"{odd[0]} exists and is not a file: the audit's ledgers take that name",
                f"remove or rename {odd[0]}, or choose another --out", "--out")
    stale = sorted(ledgers.glob("audit-*.sqlite")) if ledgers.is_dir() else []
    if stale and not overwrite:  # simulations.mia.run_audit's own refusal, before anything runs
        _refuse(f"{stale[0]} exists: an audit's ledgers would be added to",
                f"pass --overwrite to remove {ledgers}/audit-* first, or choose another --out", "--out")
    if site:
        from citydata import load_department

        names = load_department(department, seed=seed).sites
        unknown = [s for s in site if s not in names]
        if unknown:
            _refuse(f"unknown site(s) {', '.join(map(repr, unknown))} for {department}",
                    f"choose from {', '.join(map(repr, names))} (as `fl-sim datasets {department}` lists them)",
                    "--site")
    return threads


def audit(
    department: str = typer.Option("health", "--department", "-d",
                                   help="health (heart-mlp), traffic or utility (GRU; forecasting windows, per-window "
                                        "loss as the attack's signal: slower)."),
    out: Path = typer.Option(Path("runs/audit"), "--out", "-o",
                             help="Folder for audit.json and ledgers/ (one ledger per DP setting, one site per target)."),
    epsilon: List[float] = typer.Option([1.0, 3.0, 8.0], "--epsilon", "-e",
                                        help="Target epsilon of a DP-SGD setting to audit (repeat for several, each once: "
                                             "values equal to 6 significant digits are one setting). "
                                             "A non-private control is always audited too (unless --no-control)."),
    shadows: int = typer.Option(32, "--shadows", min=2, max=1024,
                                help="Shadow (reference) models per setting (at most 1024); the attacker knows their "
                                     "training sets."),
    targets: int = typer.Option(8, "--targets", min=1, max=1024,
                                help="Audited models per setting (at most 1024); their guesses are pooled into one bound."),
    canaries: int = typer.Option(128, "--canaries", min=0, max=100_000,
                                 help="Synthetic records (atypical features, random label; at most 100,000), each in a "
                                      "model's training set with probability 1/2; 0 audits the real records only."),
    seed: int = typer.Option(0, "--seed", min=0, max=_MAX_SEED,
                             help="Seed of the inclusion masks, canaries, initialisation and DP noise."),
    site: Optional[List[str]] = typer.Option(None, "--site", "-s",
                                             help="Pool only this site's training records (repeat, each site once; default: all sites)."),
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
    records or the canaries that is also beyond chance, one-sided Mann-Whitney p < 0.025 on
    that part; or eps_lb > 1), otherwise the attack is too weak to say anything about the DP
    rows. A DP row whose eps_lb is above its ledger epsilon is a bug (exit 1).
    eps_lb below the ledger epsilon is expected (the bound is a lower bound; DP-SGD's
    accounting assumes an attacker who sees every step).

    Writes OUT/audit.json (AUC, TPR at low FPR, bounds, ledger epsilon and delta, attack
    settings, seconds) and OUT/ledgers/audit-eps*.sqlite.

    Environment: CITYFED_AUDIT_THREADS = PyTorch threads of the training, a whole number from
    1 to this machine's CPU count (default 1; another value is refused with exit 2).
    """
    import torch

    from simulations.mia import AuditOutputError, AuditSettings, run_audit

    threads = _check_inputs(department, out, epsilon, seed, site, accountant, clip, confidence, control, overwrite)
    if overwrite and (out / "ledgers").exists():
        for p in (out / "ledgers").glob("audit-*.sqlite*"):
            p.unlink()
    torch.set_num_threads(threads)
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
            res = run_audit(settings, out, on_model=on_model)  # its input refusals were made above (_check_inputs)
        except AuditOutputError as exc:  # not the input: exit 1, but say which file and why
            progress.stop()
            from simulations.cli import EXIT_FAILED, _error

            _error(f"--out: {exc}; the audit's result was not written and its ledgers were removed",
                   f"free space in (or fix) {out}, or choose another --out, and run the audit again")
            raise typer.Exit(EXIT_FAILED) from None
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
