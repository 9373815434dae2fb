"""Run folders under ``--runs-dir``: their launch records and the results written for them.

One job: what ``fl-server run`` leaves in a run folder and what is read from it later.
``launch.json`` (Flower run IDs, run config, launch times) is read with its shape checked
(:func:`read_launch`, :func:`_launches`); a run named by folder or run ID is found
(:func:`resolve_run`, :func:`_flwr_run_id`); the rounds its checkpoint holds are counted
(:func:`_checkpoint_round`); ``results.json``, ``model.safetensors`` and ``report.html`` are
written for a run the ServerApp did not finish (:func:`write_run_results`), and the run's own
outcome is what ``fl-server runs`` shows (:func:`run_result`).
"""

from __future__ import annotations

import json
import re
import tomllib
from datetime import datetime, timezone
from pathlib import Path

from rich.markup import escape

from contract.text_files import load_toml
from privacy.safe_cli import make_console
from server.errors import FIX_RUN, MAX_FLOWER_ID, CliError, check_flower_id

#: Project root (holds pyproject.toml with ``[tool.flwr.app]``): the app ``fl-server run`` ships.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _checkpoint_round(folder: Path) -> int:
    """Rounds completed according to ``folder/checkpoint.safetensors`` (0 without one)."""
    from server.artefacts import CHECKPOINT

    ckpt = Path(folder) / CHECKPOINT
    if not ckpt.exists():
        return 0
    from server.strategy import load_checkpoint

    try:
        return int(load_checkpoint(ckpt)["round"])
    except Exception:  # noqa: BLE001 - a damaged checkpoint: the resume will say so
        return 0


def _app_defaults() -> dict:
    """The shipped app's run-config defaults (``[tool.flwr.app.config]`` of the project)."""
    try:
        return dict(load_toml((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return {}


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (:func:`contract.files.write_atomic`)."""
    from contract.files import write_atomic

    write_atomic(Path(path), text.encode())


def write_run_results(folder: Path, status: str, flwr_run_id: str, *, written_by: str) -> dict:
    """Write ``results.json``, ``model.safetensors`` and ``report.html`` for a run the ServerApp did not finish.

    For a run stopped by the operator (``fl-server stop``) or one whose ServerApp failed:
    the rounds completed so far come from the run's checkpoint (its history: per-round
    metrics, refusals, excluded replies), ``model.safetensors`` is the last completed round's model.

    Parameters
    ----------
    folder : Path
        The run folder (``launch.json``, ``checkpoint.safetensors``).
    status : str
        The run's own status, e.g. ``stopped by operator`` or ``failed: ...``.
    flwr_run_id : str
        The Flower run that ended (the folder's logical ``run_id`` stays the first one's).
    written_by : str
        Which command wrote it (recorded in the file).

    Returns
    -------
    dict
        What was written to ``results.json``.
    """
    folder = Path(folder)
    launch = read_launch(folder / "launch.json")  # ValueError: malformed (the callers say so)
    from server.artefacts import CHECKPOINT, MODEL, require_no_legacy_checkpoint, save_model

    require_no_legacy_checkpoint(folder)  # an earlier version's pickle is never unpickled
    ckpt = folder / CHECKPOINT
    saved = None
    if ckpt.exists():
        from server.strategy import load_checkpoint

        saved = load_checkpoint(ckpt)
    history = dict(saved["history"]) if saved else {"rounds": [], "excluded": [], "refused": []}
    done = int(saved["round"]) if saved else 0
    history["rounds"] = [e for e in history.get("rounds", []) if int(e.get("round", 0)) <= done]
    out = {"run_id": str((saved or {}).get("run_id") or (launch.get("run-ids") or [flwr_run_id])[0]), "status": status,
           "config": {**_app_defaults(), **launch.get("config", {})}, "job": None, "seconds": None, **history,
           "rounds-completed": done, "flwr-run-id": str(flwr_run_id), "written-by": written_by,
           "written-at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    from server.energy import summarise as energy_summary

    out["energy"] = energy_summary(out)  # per node and for the run, as the nodes reported it
    if saved and saved["arrays"]:  # (an earlier version's checkpoint of round 0 held no model)
        save_model(folder / MODEL, saved["arrays"], metadata={"run-id": out["run_id"]})
    _write_atomic(folder / "results.json", json.dumps(out, indent=2, default=float))
    from server.report import write_run_report

    write_run_report(folder)
    return out


def run_result(folder: Path, launch: dict, run_id: str, status: str) -> str:
    """The run's own outcome for ``fl-server runs``: ``results.json``'s status where it belongs to ``run_id``.

    ``resumed as run N`` for a Flower run that a later one continued, ``""`` while the run
    is not finished, ``no results.json`` for a finished run without one.
    """
    ids = [str(r) for r in launch.get("run-ids", [])]
    if run_id in ids and run_id != ids[-1]:
        return f"resumed as run {ids[ids.index(run_id) + 1]}"
    if not str(status).startswith("finished"):
        return ""
    path = Path(folder) / "results.json"
    try:
        data = read_results(path)
        written = path.stat().st_mtime
    except OSError:
        return "no results.json"
    except ValueError as exc:
        return f"damaged results.json ({exc})"
    launched = launch.get("launched") or []
    if launched and written < datetime.fromisoformat(launched[-1]).timestamp() - 2:
        return "no results.json (only an earlier launch's)"
    return str(data.get("status", "?"))


def read_results(path: Path) -> dict:
    """A run folder's ``results.json``, its shape checked where the coordinator's pages and commands read it.

    Raises
    ------
    OSError
        The file cannot be read.
    ValueError
        Saying what is wrong (first problem only): not UTF-8, not JSON, nested too deeply, not an
        object, or a part of the wrong type (``config``, ``rounds`` and each round's ``round``,
        ``train``/``evaluate`` and their ``nodes``, ``energy``, the event lists, ``status``).
    """
    d = _json_file(path)
    problem = results_problem(d)
    if problem:
        raise ValueError(problem)
    return d


def _json_file(path: Path):
    """The JSON in ``path``; ValueError saying why it is not JSON (OSError passes)."""
    try:
        return json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno}; truncated?)") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply to read)") from None


def results_problem(d) -> str | None:
    """What is wrong with the shape of a ``results.json`` object, or None (see :func:`read_results`)."""

    names = {dict: "an object", list: "a list", str: "a text", int: "a number", float: "a number", bool: "true/false"}

    def kind(v) -> str:
        return "null" if v is None else names.get(type(v), type(v).__name__)

    if not isinstance(d, dict):
        return f"{kind(d)} where an object is expected"
    for key, want in (("config", dict), ("energy", dict), ("status", str), ("rounds", list), ("refused", list),
                      ("excluded", list), ("dropped", list)):
        if d.get(key) is not None and not isinstance(d[key], want):
            return f"{key!r} is {kind(d[key])}, not {names[want]}"
    for key in ("refused", "excluded", "dropped"):
        if any(not isinstance(e, dict) for e in d.get(key) or []):
            return f"{key!r} holds an entry that is not an object"
    nodes = (d.get("energy") or {}).get("nodes")
    if nodes is not None and (not isinstance(nodes, dict) or any(not isinstance(v, dict) for v in nodes.values())):
        return "'energy.nodes' is not an object of per-node objects"
    for i, entry in enumerate(d.get("rounds") or [], 1):
        if not isinstance(entry, dict):
            return f"rounds[{i}] is {kind(entry)}, not an object"
        rnd = entry.get("round")
        if rnd is not None and (isinstance(rnd, bool) or not isinstance(rnd, int)):
            return f"rounds[{i}].round is {kind(rnd)}, not a whole number"
        for phase in ("train", "evaluate"):
            ph = entry.get(phase)
            if ph is None:
                continue
            if not isinstance(ph, dict):
                return f"rounds[{i}].{phase} is {kind(ph)}, not an object"
            nodes = ph.get("nodes")
            if nodes is not None and (not isinstance(nodes, dict) or any(not isinstance(v, dict) for v in nodes.values())):
                return f"rounds[{i}].{phase}.nodes is not an object of per-node objects"
    return None


def _is_run_id(value) -> bool:
    """A Flower run ID as launch.json holds it: an int, or a string of digits, within 64 bits."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return False
    text = str(value)
    return re.fullmatch(r"[0-9]+", text) is not None and int(text) <= MAX_FLOWER_ID


def read_launch(path: Path) -> dict:
    """A run folder's ``launch.json`` (what ``fl-server run`` wrote), its shape checked.

    Returns
    -------
    dict
        With ``run-ids`` (list of Flower run IDs, first to latest) and ``config`` (dict) always present.

    Raises
    ------
    ValueError
        Saying what is wrong: unreadable, not JSON (e.g. truncated), not an object, ``run-ids``
        not a list of run IDs, ``config`` not an object, ``launched`` not a list of ISO times.
    """
    try:
        d = _json_file(path)
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"a JSON {type(d).__name__} where an object is expected")
    d.setdefault("run-ids", [])
    d.setdefault("config", {})
    if not isinstance(d["run-ids"], list) or not all(_is_run_id(r) for r in d["run-ids"]):
        raise ValueError(f"'run-ids' must be a list of Flower run IDs (got {json.dumps(d['run-ids'])[:80]})")
    if not isinstance(d["config"], dict):
        raise ValueError(f"'config' must be an object of run-config keys (got {json.dumps(d['config'])[:80]})")
    launched = d.get("launched", [])
    if not isinstance(launched, list) or not all(isinstance(t, str) for t in launched):
        raise ValueError(f"'launched' must be a list of ISO 8601 times (got {json.dumps(launched)[:80]})")
    try:
        [datetime.fromisoformat(t) for t in launched]
    except ValueError:
        raise ValueError(f"'launched' must be a list of ISO 8601 times (got {json.dumps(launched)[:80]})") from None
    return d


#: ``(path, mtime, size)`` of the malformed launch.json files already warned about (once each).
_WARNED_LAUNCHES: set[tuple[str, int, int]] = set()
#: What ``fl-server runs`` and the console show for a run folder whose launch.json is malformed.
UNREADABLE = "unreadable launch.json"


def _warn_launch_once(path: Path, reason: str) -> None:
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        key = (str(path), 0, 0)
    if key in _WARNED_LAUNCHES:
        return
    _WARNED_LAUNCHES.add(key)
    make_console(stderr=True).print(
        f"[yellow]warning:[/] {escape(str(path))}: {UNREADABLE} ({escape(reason)}); its run folder matches "
        "no run (listed as unreadable). Fix: restore it (it holds the folder's Flower run IDs and settings), "
        "or move the folder out of the runs folder")


def _launches(runs: Path) -> list[dict]:
    """Every run folder's launch record under ``runs`` (with ``folder``), by folder name.

    A malformed ``launch.json`` (:func:`read_launch`) is warned about once and listed as
    ``{"folder", "run-ids": [], "config": {}, "unreadable": reason}``: it matches no run.
    """
    out = []
    for f in sorted(runs.glob("*/launch.json")):
        try:
            d = read_launch(f)
        except ValueError as exc:
            _warn_launch_once(f, str(exc))
            d = {"run-ids": [], "config": {}, "unreadable": str(exc)}
        d["folder"] = f.parent.name
        out.append(d)
    return out


def resolve_run(runs: Path, run: str) -> dict:
    """Find a run's launch record by folder name, folder path, or Flower run ID.

    A reference of digits that is both a run folder's name and a Flower run ID of another run
    folder (a folder named so before ``fl-server run --name`` refused all-digit names) is
    ambiguous and refused, naming both; a folder path is never taken for a run ID.

    Parameters
    ----------
    runs : Path
        The runs folder (``--runs-dir``).
    run : str
        A run folder's name or path, or a Flower run ID.

    Returns
    -------
    dict
        The launch record (:func:`read_launch`) with ``folder`` (the folder's name).

    Raises
    ------
    CliError
        If no run folder under ``runs`` matches, its launch.json is malformed, or the reference
        is ambiguous (code 2; the message names the matches and the fix).
    """
    p = Path(run).expanduser()
    folder = p if p.is_absolute() else runs / run
    if (folder / "launch.json").is_file():
        try:
            d = read_launch(folder / "launch.json")
        except ValueError as exc:
            raise CliError(f"{folder / 'launch.json'}: {UNREADABLE} ({exc}); fix: restore it (it holds the run's "
                           "Flower run IDs and settings), or use a Flower run ID from `fl-server runs`") from None
        d["folder"] = folder.name
        if not p.is_absolute() and re.fullmatch(r"[0-9]+", run):
            others = [o["folder"] for o in _launches(runs)
                      if o["folder"] != folder.name and run in [str(r) for r in o.get("run-ids", [])]]
            if others:
                own = ", ".join(str(r) for r in d["run-ids"]) or "none"
                raise CliError(f"run {run!r} is ambiguous: it is the name of run folder {folder.name!r} (Flower run "
                               f"{own}) and Flower run {run} of run folder {others[0]!r}; nothing done; fix: pass "
                               f"{others[0]!r} for the run folder of Flower run {run}, or the path {folder} for the run "
                               f"folder named {run!r}")
        return d
    for d in _launches(runs):
        if run in [str(r) for r in d.get("run-ids", [])]:
            return d
    raise CliError(f"no run {run!r} under {runs}; fix: {FIX_RUN}")


def _flwr_run_id(runs: Path, run: str) -> str:
    """The Flower run ID of ``run`` (a run folder name or path, or a Flower run ID).

    Raises
    ------
    CliError
        Code 2: no such run folder, a malformed launch.json, or digits outside Flower's 64 bits.
    """
    if re.fullmatch(r"[0-9]+", run) and not (runs / run / "launch.json").exists():
        return check_flower_id(run, "run ID", FIX_RUN)
    rec = resolve_run(runs, run)
    if not rec["run-ids"]:
        raise CliError(f"run folder {rec['folder']} has no Flower run ID in its launch.json; fix: {FIX_RUN}")
    return str(rec["run-ids"][-1])


def extended_dp_run_warning(run_dir: Path, asked: int) -> str | None:
    """What to say when a resume extends a DP run past the rounds it was launched for; None otherwise.

    Each node calibrates the run's ``target-epsilon`` over the rounds the run was launched with; a
    finished run's target is spent, so extra rounds get only what is left of it: far more noise
    (round 2's noise multiplier was 20-60x round 1's). Nothing is refused: each node's lifetime budget
    stays bounded by its policy.

    Parameters
    ----------
    run_dir : Path
        The run folder (its ``results.json`` holds the launched config; an interrupted run has none).
    asked : int
        The rounds the resumed launch asks for.

    Returns
    -------
    str or None
    """
    try:
        cfg = json.loads((Path(run_dir) / "results.json").read_text())["config"]
        launched, dp, target = int(cfg["num-rounds"]), bool(cfg.get("dp")), cfg.get("target-epsilon")
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None  # an interrupted run (no results.json yet) trains the rounds it was launched for
    if not (dp and int(asked) > launched):
        return None
    return (f"{run_dir}: this DP run was launched for {launched} round(s) at target epsilon {target}; the nodes "
            f"calibrated that target over those rounds, so the {int(asked) - launched} extra round(s) get only what is "
            "left of it and train with far more noise (each node's lifetime budget stays bounded by its policy). For "
            "useful extra rounds, start a new run with the rounds and epsilon it needs.")
