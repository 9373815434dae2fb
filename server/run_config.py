"""The run config that ``fl-server run`` submits.

One job: turn ``fl-server run``'s options and ``-c KEY=VALUE`` items into a checked run config.
``-c`` items are parsed (:func:`parse_run_config`) and refused where ``fl-server run`` sets the
key itself or an option given says otherwise (:func:`check_overrides`), or where the app does
not declare the key (:func:`check_app_keys`); SecAgg+ keys are added (:func:`secagg_config`);
the launch record, folder and config of a new or resumed run are made (:func:`_new_run`,
:func:`_resumed_run`) and validated as the ServerApp will (:func:`_checked_settings`). Also the
``[tool.flwr.app.config]`` section that ``fl-server app-config`` prints (:func:`app_config_toml`).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from datetime import datetime, timezone
from pathlib import Path

from contract.keys import SECAGG_MIN_NEIGHBOURS
from contract.text_files import BOM_FIX, UTF8_BOM, load_toml
from server.errors import CliError
from server.launches import resolve_run

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return repr(v)
    raise TypeError(f"unsupported run-config value {v!r}")


def app_config_toml() -> str:
    """The ``[tool.flwr.app.config]`` section: every RunSettings key with its default.

    ``department`` (required by RunSettings, no default) is listed as ``"health"`` so that
    ``--run-config`` may override it.
    """
    from server.app import DEFAULTS

    rows = [f"department = {_toml_value('health')}"] + [f"{k} = {_toml_value(v)}" for k, v in DEFAULTS.items()]
    return "[tool.flwr.app.config]\n" + "\n".join(rows) + "\n"


def _parse_value(raw: str):
    try:
        return load_toml(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # bare words (fedprox, /abs/path) are strings


def parse_run_config(items: list[str]) -> dict:
    """Parse ``k=v`` items; values are TOML (``3``, ``0.5``, ``true``, ``"x"``) or a bare string.

    Raises
    ------
    CliError
        For an item without ``=`` or without a key, and for a key given twice (code 2).
    """
    out, given = {}, {}
    for item in items:
        if "=" not in item:
            raise CliError(f"-c/--run-config {item!r}: expected key=value; fix: e.g. -c local-epochs=2")
        k, v = (part.strip() for part in item.split("=", 1))
        if not k:
            raise CliError(f"-c/--run-config {item!r}: the item has no key (nothing before '='); fix: -c key=value, "
                           "e.g. -c local-epochs=2 (`fl-server app-config` lists every key)")
        if k in out:
            raise CliError(f"-c/--run-config: key {k!r} given twice ({given[k]!r} and {item!r}); fix: give each "
                           "run-config key once")
        out[k], given[k] = _parse_value(v), item
    return out


#: Run-config keys ``fl-server run`` sets itself -> what to use instead.
SET_BY_RUN = {"run-dir": "--name (and --runs-dir): the run folder is <runs-dir>/<name>",
              "resume": "--resume RUN to continue a run"}
#: Run-config keys that an option of ``fl-server run`` sets -> that option.
OPTION_KEYS = {"department": "--department", "num-rounds": "--rounds", "secagg": "--secagg/--no-secagg",
               "secagg-num-shares": "--secagg-num-shares", "secagg-threshold": "--secagg-threshold"}


def _same_value(a, b) -> bool:
    return type(a) is type(b) and a == b  # true is not 1


def explicit_options(department, rounds, secagg, num_shares, threshold) -> dict[str, tuple[str, object]]:
    """``{run-config key: (the option as given, its value)}`` for the options of ``fl-server run`` that were given."""
    given = {"department": (f"--department {department}", department),
             "num-rounds": (f"--rounds {rounds}", rounds),
             "secagg": ("--secagg" if secagg else "--no-secagg", secagg),
             "secagg-num-shares": (f"--secagg-num-shares {num_shares}", num_shares),
             "secagg-threshold": (f"--secagg-threshold {threshold}", threshold)}
    return {k: v for k, v in given.items() if v[1] is not None}


def check_overrides(overrides: dict, explicit: dict[str, tuple[str, object]]) -> None:
    """Refuse ``-c`` keys ``fl-server run`` sets itself, and ``-c`` values that contradict an option given.

    Raises
    ------
    CliError
        Code 2, naming the ``-c`` item, the option and the fix.
    """
    for key, instead in SET_BY_RUN.items():
        if key in overrides:
            raise CliError(f"-c {key}={_toml_value_or_text(overrides[key])}: `fl-server run` sets {key!r} itself; "
                           f"fix: drop it, and use {instead}")
    for key, (option, value) in explicit.items():
        if key in overrides and not _same_value(overrides[key], value):
            raise CliError(f"{option} and -c {key}={_toml_value_or_text(overrides[key])} disagree; fix: give "
                           f"{OPTION_KEYS[key]} only (drop the -c item)")


def _toml_text(v) -> str:
    """``v`` as TOML writes it (``"five"``, ``5``, ``true``), else its text."""
    try:
        return _toml_value(v)
    except TypeError:
        return str(v)


def _toml_value_or_text(v) -> str:
    try:
        return _toml_value(v).strip('"') if isinstance(v, str) else _toml_value(v)
    except TypeError:
        return str(v)


#: The table of ``pyproject.toml`` that holds the app's run-config keys and defaults.
APP_TABLE = "[tool.flwr.app.config]"
_FIX_APP = "pass the cityfed project folder as --app (`fl-server app-config` prints the section with every default)"


def read_app_config(app_dir: Path) -> dict:
    """The app's run-config defaults: ``[tool.flwr.app.config]`` of ``--app``'s ``pyproject.toml``.

    Parameters
    ----------
    app_dir : Path
        The ``--app`` folder.

    Returns
    -------
    dict
        The table's keys and values, as Flower reads them.

    Raises
    ------
    CliError
        Code 2, naming the file and the real problem: missing or unreadable, a byte-order mark, not UTF-8, not valid
        TOML (the parser's reason with line and column, e.g. a duplicated key), or no such table.
    """
    path = Path(app_dir) / "pyproject.toml"
    try:
        raw = path.read_bytes()
        if raw.startswith(UTF8_BOM):  # Flower's `flwr run` reads it with tomli, which refuses it
            raise CliError(f"--app {app_dir}: {path} starts with a byte-order mark (BOM), which TOML does not allow "
                           f"(Flower would refuse the app); fix: {BOM_FIX}")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise CliError(f"--app {app_dir}: no pyproject.toml in it ({path}); fix: {_FIX_APP}") from None
    except IsADirectoryError:
        raise CliError(f"--app {app_dir}: {path} is a folder, not a file; fix: {_FIX_APP}") from None
    except OSError as exc:
        raise CliError(f"--app {app_dir}: cannot read {path} ({exc.strerror or exc}); fix: make it readable by this "
                       f"user, or {_FIX_APP}") from None
    except UnicodeDecodeError as exc:
        raise CliError(f"--app {app_dir}: {path} is not UTF-8 text (byte {exc.start}); fix: save it as UTF-8, or "
                       f"{_FIX_APP}") from None
    try:
        data = load_toml(text)
    except tomllib.TOMLDecodeError as exc:
        reason = str(exc)
        at = re.search(r"at line (\d+)", reason)
        lines = text.splitlines()
        if at and 0 < int(at.group(1)) <= len(lines):
            reason += f": {lines[int(at.group(1)) - 1].strip()[:80]!r}"
        if "overwrite" in reason.lower():
            reason += " (a key given twice in one table?)"
        raise CliError(f"--app {app_dir}: {path} is not valid TOML: {reason}; fix: correct that line (each key once "
                       f"per table), or {_FIX_APP}") from None
    table = data
    for part in ("tool", "flwr", "app", "config"):
        table = table.get(part) if isinstance(table, dict) else None
    if not isinstance(table, dict):
        raise CliError(f"--app {app_dir}: {path} has no {APP_TABLE} table (the app's run-config keys and defaults); "
                       f"fix: {_FIX_APP}")
    return table


def check_app_keys(cfg: dict, app_dir: Path) -> None:
    """Refuse run-config keys that the app's ``[tool.flwr.app.config]`` lacks: Flower would refuse the run.

    Node-side keys (``data``, ``policy`` ...) are the department nodes' own (``fl-client``), never
    taken from the coordinator's run config.

    Raises
    ------
    CliError
        Code 2: ``--app``'s pyproject.toml is missing, not valid TOML or has no such table
        (:func:`read_app_config`), or a key it does not declare.
    """
    from contract.keys import NODE_KEYS

    known = read_app_config(app_dir)
    for key in cfg:
        if key in NODE_KEYS:
            raise CliError(f"-c {key}={_toml_value_or_text(cfg[key])}: {key!r} is a department node's own setting "
                           "(fl-client's node config), never taken from the coordinator's run config; fix: drop it "
                           "(set it on each node's fl-client)")
        if key not in known:
            raise CliError(f"-c {key}={_toml_value_or_text(cfg[key])}: {key!r} is not a run-config key of the app in "
                           f"--app {app_dir} (its [tool.flwr.app.config]), so Flower would refuse the run; fix: drop "
                           "it, or pass the cityfed project folder as --app")


def check_app_defaults(cfg: dict, app_dir: Path, explicit: dict[str, tuple[str, object]]) -> dict:
    """Validate the app's defaults merged with the run config, as the ServerApp will see them.

    Flower gives the ServerApp ``--app``'s ``[tool.flwr.app.config]`` updated with the run config
    that ``fl-server run`` submits; a bad default in that file (``num-rounds = "five"``) would
    fail the run once it started. A refusal caused by a value from the file names the file and
    its key; one caused by the run config names the option or ``-c`` item
    (:func:`_checked_settings`).

    Parameters
    ----------
    cfg : dict
        The run config ``fl-server run`` submits.
    app_dir : Path
        The ``--app`` folder.
    explicit : dict
        :func:`explicit_options`.

    Returns
    -------
    dict
        The merged settings (:func:`server.app.settings`).

    Raises
    ------
    CliError
        Code 2, naming the file and key, or the option or ``-c`` item, and the fix.
    """
    from contract.keys import NODE_KEYS
    from server.app import RunConfigError, settings

    defaults = {k: v for k, v in read_app_config(app_dir).items() if k not in NODE_KEYS}
    merged = {**defaults, **cfg}
    try:
        return settings(merged)
    except RunConfigError as exc:
        path = Path(app_dir) / "pyproject.toml"
        from_file = [k for k in exc.keys if k in defaults and k not in cfg]
        if not from_file:  # several keys together (e.g. a strategy with secagg): say which values the file gave
            named = [k for k in defaults if k not in cfg and f"'{k}'" in str(exc)]
            try:
                return _checked_settings(merged, explicit)
            except CliError as err:
                if not named:
                    raise
                given = ", ".join(f"{k} = {_toml_text(defaults[k])}" for k in named)
                raise CliError(f"{err} ({given} comes from {path} {APP_TABLE}: correct it there, or override it "
                               "with -c)") from None

        shown = ", ".join(f"{k} = {_toml_text(defaults[k])}" for k in from_file)
        raise CliError(f"--app {app_dir}: {path} {APP_TABLE} {shown}: {exc}; fix: correct it in that file "
                       f"(`fl-server app-config` prints the section with every default), or override it with "
                       f"-c {from_file[0]}=VALUE") from None


def secagg_config(cfg: dict, secagg: bool | None, num_shares: int | None, threshold: int | None) -> dict:
    """The SecAgg+ run-config keys ``fl-server run`` sets.

    SecAgg+ is on by default: ``secagg = true`` unless ``--no-secagg`` is given or the
    run config (``-c secagg=false``, or a resumed run's stored config) already says so;
    an explicit ``--secagg/--no-secagg`` wins over a resumed run's stored config (a ``-c``
    item that contradicts it is refused before: :func:`check_overrides`). ``--secagg-num-shares``
    and ``--secagg-threshold`` are passed through as ``secagg-num-shares`` /
    ``secagg-threshold``.
    """
    out = {"secagg": cfg.get("secagg", True) if secagg is None else secagg}
    if num_shares is not None:
        out["secagg-num-shares"] = num_shares
    if threshold is not None:
        out["secagg-threshold"] = threshold
    return out


def secagg_banner(cfg: dict) -> str:
    """One line saying which aggregation mode a (validated) run uses."""
    if cfg.get("secagg"):
        shares, threshold = int(cfg["secagg-num-shares"]), int(cfg["secagg-threshold"])
        least = max(3, int(cfg.get("min-accepted", 1)))  # server.secagg.MIN_SECAGG_NODES
        head = (f"[bold green]secure aggregation ON[/] (SecAgg+, {shares} shares, threshold {threshold}: the coordinator "
                f"only sees the mean update of >= {least} nodes per round, if it follows the protocol; tolerates "
                f"{shares - threshold} dropped node(s) per neighbourhood of {shares} while >= {least} nodes still "
                f"contribute")
        if shares - 1 - 1 < SECAGG_MIN_NEIGHBOURS:  # a setup dropout leaves each neighbour too few others to mask with
            return (f"{head}; a node that drops out at setup takes its {shares - 1} neighbours out of the round too "
                    f"(each keeps {shares - 2} other node(s), fewer than the {SECAGG_MIN_NEIGHBOURS} every node "
                    f"requires): run >= {least + shares} nodes, or --secagg-num-shares 5 with >= {least + 1}, to "
                    "train through one dropout)")
        return f"{head}: run >= {least + 1} nodes to train through one dropout)"
    return ("[bold yellow]secure aggregation OFF[/] (--no-secagg): the coordinator receives each node's updated "
            "weights individually")


#: A run folder name (``--name``): what ``fl-server run`` accepts.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _departments() -> tuple[str, ...]:
    from typing import get_args

    from server.app import RunSettings

    return get_args(RunSettings.model_fields["department"].annotation)


def _new_run(runs: Path, department: str | None, name: str | None, overrides: dict) -> tuple[dict, Path, dict]:
    """``(launch record, folder, run config)`` of a new run; refuses a missing department or a bad --name
    (not :data:`RUN_NAME`, or digits only: that reads as a Flower run ID)."""
    depts = _departments()
    if not department:
        given = f" (not -c department={overrides['department']})" if "department" in overrides else ""
        raise CliError(f"--department is required; fix: --department {'|'.join(depts)}{given}")
    if department not in depts:
        raise CliError(f"--department {department!r}: not a department; fix: --department {'|'.join(depts)}")
    folder_name = name or f"{department}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    if not RUN_NAME.fullmatch(folder_name):
        shown = folder_name if len(folder_name) <= 60 else f"{folder_name[:57]}... ({len(folder_name)} characters)"
        raise CliError(f"--name {shown!r}: a run folder name is 1 to 100 characters, letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit; fix: choose such a name (e.g. health-trial-2)")
    if folder_name.isdigit():  # stop/logs/export/--resume take a folder name or a Flower run ID
        raise CliError(f"--name {folder_name}: a run folder name of digits only reads as a Flower run ID (`fl-server "
                       f"stop`, `logs`, `export` and `run --resume` take either), so it could name another run; fix: "
                       f"add a letter, e.g. --name run-{folder_name}")
    folder = runs / folder_name
    if (folder / "launch.json").exists():
        raise CliError(f"run folder {folder} exists; fix: choose another --name, or --resume {shlex.quote(folder_name)}")
    if folder.exists() and not folder.is_dir():
        raise CliError(f"--name {folder_name}: {folder} is a file; fix: choose another --name")
    return {"run-ids": []}, folder, {"department": department, **overrides}


def _resumed_run(runs: Path, resume: str, department: str | None, overrides: dict) -> tuple[dict, Path, dict]:
    """``(launch record, folder, run config)`` of a run to resume; refuses another department."""
    rec = resolve_run(runs, resume)
    stored = rec["config"].get("department")
    for option, value in (("--department", department), ("-c department", overrides.get("department"))):
        if value is not None and value != stored:
            shown = f"{option} {value}" if option.startswith("--") else f"{option}={value}"
            raise CliError(f"{shown} but run {resume} is a {stored} run (a resumed run keeps its department); "
                           f"fix: drop {option}")
    return rec, runs / rec["folder"], {**rec["config"], **overrides, "resume": True}


def check_resumed_config(folder: Path, cfg: dict, overrides: dict, explicit: dict) -> None:
    """Name the run folder's ``launch.json`` when a value it holds (not one given now) is refused.

    Raises
    ------
    CliError
        Code 2: the file, the key and its value, and the fix (override it, or restore the file).
    """
    from server.app import RunConfigError, settings

    try:
        settings(cfg)
    except RunConfigError as exc:
        stored = [k for k in exc.keys if k not in overrides and k not in explicit]
        if stored:
            shown = ", ".join(f"{k} = {json.dumps(cfg.get(k))[:60]}" for k in stored)
            raise CliError(f"--resume: {Path(folder) / 'launch.json'} holds {shown}: {exc}; fix: override it with "
                           f"-c {stored[0]}=VALUE, or restore launch.json (fl-server run wrote it; this value was "
                           "edited or damaged)") from None


def check_central_data(cfg: dict) -> None:
    """Read ``central-data`` as the ServerApp will, before the run is launched; make its path absolute.

    The ServerApp reads the file when the run starts, in ``fl-server start``'s working directory
    (``/`` under systemd): a relative path is taken from the folder ``fl-server run`` runs in and
    written into ``cfg`` as an absolute path. Empty (no central data) and ``bundled`` pass as
    they are.

    Parameters
    ----------
    cfg : dict
        The run config (``department``, ``central-data``, ``central-data-seed``); changed in place.

    Raises
    ------
    CliError
        The file is missing, not readable or not in the department's schema (exit 2; the message
        names the key, the file, the column where there is one, and the fix). Nothing is launched.
    """
    import warnings

    from citydata import load_department
    from citydata.base import DataFileError

    source = str(cfg.get("central-data") or "")
    if source in ("", "bundled"):
        return
    path = Path(source).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    try:
        with warnings.catch_warnings():  # data-quality notes: the ServerApp logs them when it reads the file
            warnings.simplefilter("ignore")
            ds = load_department(cfg["department"], path, seed=int(cfg.get("central-data-seed") or 0))
            for site in ds.sites:
                ds.site_data(site)
    except DataFileError as exc:
        from citydata.forecasting import TEST_START_ENV, TEST_START_FORMAT, NoTestStart

        where = exc.path + (f", column {exc.column!r}" if exc.column is not None else "")
        fix = exc.fix
        if isinstance(exc, NoTestStart):  # fl-server has no --test-start: the coordinator's file takes the variable
            fix = (f"set {TEST_START_ENV} to the first time of the file's test period ({TEST_START_FORMAT}) in the "
                   "environment of both `fl-server start` (its ServerApp reads the file) and `fl-server run` (or of flwr run)")
        raise CliError(f"run config 'central-data' ({source}): {where}: {exc.problem}; fix: {fix} (or drop -c "
                       "central-data: the coordinator then holds no data)") from None
    cfg["central-data"] = str(path)


def _checked_settings(cfg: dict, explicit: dict[str, tuple[str, object]]) -> dict:
    """:func:`server.app.settings` of ``cfg``; a refusal is exit 2 naming the key, the option or -c item, and the fix."""
    from server.app import RunConfigError, settings

    try:
        return settings(cfg)
    except RunConfigError as exc:
        msg = str(exc)
        if cfg.get("secagg") is True and "'secagg' = true" in msg:
            msg += (f" (secure aggregation is on by default in `fl-server run`: strategy {cfg.get('strategy')!r} "
                    "needs each node's individual update; fix: -c strategy=fedavg, or --no-secagg to send "
                    "individual updates to the coordinator)")
        elif "fix:" not in msg:
            options = [explicit[k][0].split()[0] for k in exc.keys if k in explicit]
            fix = (f"give {' and '.join(dict.fromkeys(options))} a value the message allows" if options else
                   f"-c {exc.keys[0]}=<a value the message allows>" if exc.keys else
                   "change the run-config keys the message names (-c KEY=VALUE)")
            msg += f"; fix: {fix} (`fl-server app-config` lists every key and its default)"
        raise CliError(msg) from None
