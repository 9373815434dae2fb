"""Model package: a run's global model with its provenance, every file covered by a SHA-256 manifest.

A package is a folder::

    model.safetensors   the global model's weights (safetensors: arrays only, no code)
    model-config.json   the shared_models config the weights belong to (kind, sizes)
    schema.json         the department's data schema (columns, units, plausibility, task)
    model-card.json     provenance: run ID, app hash, strategy, rounds, sites, epsilon and
                        delta per site and mechanism, metrics per site, data sources, time
    model-card.md       the same card for people
    MANIFEST.json       SHA-256 of each file above

:func:`load_package` recomputes every hash and refuses a package whose files differ from
its manifest, lack a file or carry an extra one (:class:`PackageError`). Each file is read
once: what is hashed is what is loaded (a file replaced after the check is not served), and a
symbolic link or other non-regular file in the package is refused. The manifest can
itself be pinned: its SHA-256 is printed by the export and ``fl-serve --manifest-sha256``
checks it, so a package swapped as a whole is refused too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from contract.energy import ENERGY_METRICS
from privacy.audit import fsync_dir
from privacy.policy import shown_value
from privacy.safe_cli import pid_alive
from server.artefacts import LEGACY_MODEL, MODEL, ArtefactError, load_model, model_from_bytes, save_model, write_atomic

#: Package format written in the manifest.
PACKAGE_FORMAT = "cityfed-model-package/1"
MANIFEST = "MANIFEST.json"
FILES = (MODEL, "model-config.json", "schema.json", "model-card.json", "model-card.md")
#: Most parameters (and buffer elements) a packaged model may have: the shipped models have thousands to
#: hundreds of thousands; this bound refuses a config that would allocate gigabytes before it is built.
MAX_PARAMETERS = 50_000_000
#: The fix of a package whose files were changed after the export (with a re-signed manifest) or damaged.
EXPORT_AGAIN = "fix: export the package again from the run folder (fl-sim export-model / fl-server export)"


class PackageError(ValueError):
    """A model package or run folder that cannot be exported or loaded; the message names the file and the fix."""


def _kind(value) -> str:
    """The JSON type of ``value`` in words (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _read_package_file(f: Path) -> bytes:
    """The bytes of package file ``f``, read once; :class:`PackageError` naming it otherwise.

    A symbolic link (it could be pointed elsewhere after the check) and anything but a regular
    file are refused; the file is opened without following a link (``O_NOFOLLOW``).
    """
    f = Path(f)
    unreadable = ("fix: make the package's files readable by the user that runs fl-serve")
    try:
        st = os.lstat(f)
    except FileNotFoundError:
        raise PackageError(f"{f}: missing from the package; {EXPORT_AGAIN}") from None
    except OSError as exc:
        raise PackageError(f"{f}: cannot read ({exc.strerror or type(exc).__name__}); {unreadable}") from None
    if stat.S_ISLNK(st.st_mode):
        raise PackageError(f"{f}: is a symbolic link; a package holds the plain files its export wrote (a link "
                           "can be pointed at other content after the check); fix: copy the package with its files "
                           "(`cp -rL`), or export it again")
    if not stat.S_ISREG(st.st_mode):
        raise PackageError(f"{f}: not a regular file; {EXPORT_AGAIN}")
    try:
        with open(f, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NOFOLLOW", 0))) as fh:
            return fh.read()
    except OSError as exc:
        raise PackageError(f"{f}: cannot read ({exc.strerror or type(exc).__name__}); {unreadable}") from None


def _package_json(path: Path, name: str, raw: bytes | None = None) -> dict:
    """The JSON object in package file ``name`` (``raw``: its bytes, already read); :class:`PackageError` otherwise."""
    f = Path(path) / name
    if raw is None:
        raw = _read_package_file(f)
    try:
        value = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise PackageError(f"{f}: not valid JSON (line {exc.lineno} column {exc.colno}); the package is damaged; "
                           f"{EXPORT_AGAIN}") from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, nested too deeply, a number of > 4300 digits
        raise PackageError(f"{f}: not valid JSON ({type(exc).__name__}); the package is damaged; {EXPORT_AGAIN}") from None
    if not isinstance(value, dict):
        raise PackageError(f"{f}: holds {_kind(value)}, where a JSON object is expected; the package is damaged; "
                           f"{EXPORT_AGAIN}")
    return value


#: The fix of a run folder's results.json or launch.json that is damaged or was edited.
RUN_FILE_FIX = ("restore the file the run wrote (fl-sim run / fl-server write results.json and launch.json; they are "
                "not meant to be edited), or export another run folder")


def _run_json(path: Path) -> dict:
    """The JSON object in a run folder's file ``path`` (``results.json``, ``launch.json``).

    Parameters
    ----------
    path : Path
        The file.

    Returns
    -------
    dict

    Raises
    ------
    PackageError
        Naming the file, the problem (cannot be read, empty, a byte-order mark, not UTF-8, not
        valid JSON, not a JSON object) and the fix. No value of the file is quoted.
    """
    from contract.text_files import BOM_FIX, UTF8_BOM

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PackageError(f"{path}: cannot read ({exc.strerror or type(exc).__name__}); fix: make it readable by "
                           "the user that exports the package") from None
    if not raw.strip():
        raise PackageError(f"{path}: empty; fix: {RUN_FILE_FIX}")
    if raw.startswith(UTF8_BOM):
        raise PackageError(f"{path}: starts with a UTF-8 byte-order mark (BOM); fix: {BOM_FIX}, or {RUN_FILE_FIX}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        utf16 = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise PackageError(f"{path}: not UTF-8 (byte {exc.start}){utf16}; fix: save it as UTF-8, or "
                           f"{RUN_FILE_FIX}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PackageError(f"{path}: not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno}); "
                           f"fix: {RUN_FILE_FIX}") from None
    except (ValueError, RecursionError) as exc:  # nested too deeply, a number of > 4300 digits
        raise PackageError(f"{path}: not valid JSON ({type(exc).__name__}); fix: {RUN_FILE_FIX}") from None
    if not isinstance(value, dict):
        raise PackageError(f"{path}: holds {_kind(value)}, where a JSON object is expected; fix: {RUN_FILE_FIX}")
    return value


_NUM, _TEXT, _NONE = (int, float), (str,), (type(None),)


def _expect(path: Path, where: str, value, kinds: tuple, words: str) -> None:
    """:class:`PackageError` naming ``path`` and the field ``where`` unless ``value`` is one of ``kinds``
    (true/false counts as a number only where ``bool`` is in ``kinds``)."""
    if isinstance(value, kinds) and (not isinstance(value, bool) or bool in kinds):
        return
    raise PackageError(f"{path}: {where} is {_kind(value)}, where {words} is expected; fix: {RUN_FILE_FIX}")


def _expect_table_of_tables(path: Path, where: str, value) -> None:
    """``value`` is null or an object whose values are objects (metrics by node or site)."""
    _expect(path, where, value, (dict, *_NONE), "an object (or null)")
    for k, v in (value or {}).items():
        _expect(path, f"{where}.{k}", v, (dict,), "an object")


#: Fields of a results.json config the card reads, by the JSON types they may have.
_CONFIG_FIELDS = {
    **{k: ((*_NUM, *_NONE), "a number (or null)") for k in (
        "num-rounds", "local-epochs", "batch-size", "lr", "target-epsilon", "noise-multiplier", "clipping-norm", "seed",
        "proximal-mu", "server-lr", "trim-beta", "krum-malicious")},
    **{k: ((bool, int, *_NONE), "true/false (or null)") for k in ("dp", "secagg")},
    **{k: ((*_TEXT, *_NONE), "text (or null)") for k in ("strategy", "model", "central-data")},
}


def check_results(results, path: Path) -> dict:
    """Check that a run's ``results.json`` content has the shape the model card reads.

    Parameters
    ----------
    results : object
        ``results.json``'s content.
    path : Path
        The file (named in the messages).

    Returns
    -------
    dict
        ``results``, unchanged.

    Raises
    ------
    PackageError
        Naming the file, the field (``config.department``, ``rounds[3].train.nodes.2``...), what
        it holds and the fix: not an object, no ``config`` object, a ``config.department`` that is
        not a department, a field of the wrong JSON type.
    """
    from citydata import DATASETS

    path = Path(path)
    if not isinstance(results, dict):
        raise PackageError(f"{path}: holds {_kind(results)}, where a JSON object is expected; fix: {RUN_FILE_FIX}")
    if "config" not in results:
        raise PackageError(f"{path}: no config.department (the file has no config); fix: {RUN_FILE_FIX}")
    cfg = results["config"]
    _expect(path, "config", cfg, (dict,), "an object")
    dept = cfg.get("department")
    if dept is None:
        raise PackageError(f"{path}: no config.department; fix: {RUN_FILE_FIX}")
    _expect(path, "config.department", dept, _TEXT, f"one of {', '.join(sorted(DATASETS))}")
    if dept not in DATASETS:
        raise PackageError(f"{path}: config.department = {dept[:40]!r} is not one of {sorted(DATASETS)}; "
                           f"fix: {RUN_FILE_FIX}")
    for key, (kinds, words) in _CONFIG_FIELDS.items():
        if key in cfg:
            _expect(path, f"config.{key}", cfg[key], kinds, words)
    _expect(path, "run_id", results.get("run_id"), (*_TEXT, int, *_NONE), "text")
    _expect(path, "status", results.get("status"), (*_TEXT, *_NONE), "text (or null)")
    _expect(path, "job", results.get("job"), (dict, *_NONE), "an object (or null)")
    _expect(path, "job.task", (results.get("job") or {}).get("task"), (*_TEXT, *_NONE), "text (or null)")
    for key in ("excluded", "refused"):
        _expect(path, key, results.get(key), (list, *_NONE), "a list (or null)")
    _expect(path, "rounds", results.get("rounds"), (list, *_NONE), "a list (or null)")
    for i, e in enumerate(results.get("rounds") or []):
        where = f"rounds[{i}]"
        _expect(path, where, e, (dict,), "an object")
        if "round" not in e:
            raise PackageError(f"{path}: {where} has no round number; fix: {RUN_FILE_FIX}")
        _expect(path, f"{where}.round", e["round"], (int,), "a whole number")
        for phase in ("train", "evaluate"):
            _expect(path, f"{where}.{phase}", e.get(phase), (dict, *_NONE), "an object (or null)")
            _expect_table_of_tables(path, f"{where}.{phase}.nodes", (e.get(phase) or {}).get("nodes"))
        _expect_table_of_tables(path, f"{where}.central-sites", e.get("central-sites"))
    _expect(path, "initial", results.get("initial"), (dict, *_NONE), "an object (or null)")
    _expect_table_of_tables(path, "initial.central-sites", (results.get("initial") or {}).get("central-sites"))
    energy = results.get("energy")
    _expect(path, "energy", energy, (dict, *_NONE), "an object (or null)")
    if energy:
        _expect_table_of_tables(path, "energy.nodes", energy.get("nodes"))
        for node, v in (energy.get("nodes") or {}).items():
            for key in ("joules", "train-j", "evaluate-j"):
                _expect(path, f"energy.nodes.{node}.{key}", v.get(key), _NUM, "a number")
            _expect(path, f"energy.nodes.{node}.methods", v.get("methods"), (list,), "a list of texts")
            for j, m in enumerate(v["methods"]):
                _expect(path, f"energy.nodes.{node}.methods[{j}]", m, _TEXT, "text")
        if energy.get("nodes"):
            _expect(path, "energy.total-j", energy.get("total-j"), _NUM, "a number")
    return results


def read_run_results(run_dir: Path) -> dict:
    """A run folder's ``results.json``, read and checked (:func:`check_results`).

    Parameters
    ----------
    run_dir : Path
        The run folder.

    Returns
    -------
    dict

    Raises
    ------
    PackageError
        No results.json, or one that cannot be read, is not UTF-8 JSON, or has the wrong
        shape; the message names the file, the field and the fix.
    """
    res_path = Path(run_dir) / "results.json"
    if not res_path.is_file():
        raise PackageError(f"{res_path}: not found; fix: give a run folder (fl-sim run -o DIR / fl-server runs) "
                           "of a run that ended")
    return check_results(_run_json(res_path), res_path)


def run_model_config(results: dict, res_path: Path):
    """The model config of a checked ``results.json`` (its ``config.model``, or the department's default).

    Raises
    ------
    PackageError
        ``config.model`` is not a model of the department, naming the file and the fix.
    """
    from citydata import DATASETS
    from shared_models import default_model_config
    from shared_models.configs import model_kinds

    cfg = results["config"]
    schema = DATASETS[cfg["department"]].schema
    kind = cfg.get("model") or None
    if kind is not None and kind not in model_kinds(schema.department):
        raise PackageError(f"{res_path}: config.model = {kind[:40]!r} is not a model of department "
                           f"{schema.department!r} ({', '.join(model_kinds(schema.department))}); fix: {RUN_FILE_FIX}")
    return default_model_config(schema, kind)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json(obj) -> str:
    def default(v):
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, (tuple, set)):
            return list(v)
        return str(v)

    def clean(v):  # NaN/inf are not JSON: null
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(json.loads(json.dumps(obj, default=default))), indent=2, allow_nan=False) + "\n"


def schema_dict(schema) -> dict:
    """The department :class:`~citydata.base.Schema` as JSON-able data (plus its text table)."""
    d = asdict(schema)
    d["columns"] = [{**c, "plausible": list(c["plausible"]) if c["plausible"] is not None else None} for c in d["columns"]]
    d["describe"] = schema.describe()
    return d


# -- provenance from a run folder -----------------------------------------------------------
def _site_names(results: dict, sites: list[str]) -> dict[str, str]:
    from server.report import node_names

    return node_names(results, sites)


def _per_site(results: dict, sites: list[str]) -> dict[str, dict]:
    """Per site (simulation) or node (deployment): last released train/evaluate metrics, exact central scores."""
    names = _site_names(results, sites)
    out: dict[str, dict] = {}
    rounds = sorted((e for e in results.get("rounds", []) if isinstance(e, dict)), key=lambda e: e.get("round", 0))
    for e in rounds:
        for phase in ("train", "evaluate"):
            for node, m in ((e.get(phase) or {}).get("nodes") or {}).items():
                name = names.get(str(node), f"node {node}")
                s = out.setdefault(name, {"node": str(node)})
                s[f"last-{phase}-release"] = {"round": e["round"], **{k: v for k, v in m.items() if k != "partition-id"}}
                if isinstance(m.get("epsilon"), (int, float)):
                    s["epsilon-reported"] = max(float(m["epsilon"]), s.get("epsilon-reported", float("-inf")))
        for name, m in (e.get("central-sites") or {}).items():
            out.setdefault(name, {})["central"] = {"round": e["round"], **m}
    for name, m in ((results.get("initial") or {}).get("central-sites") or {}).items():
        out.setdefault(name, {})["central-initial"] = m
    return out


def _privacy(run_dir: Path, run_id: str) -> tuple[dict, str]:
    """Per site and mechanism epsilon/delta from the run folder's ledgers (simulation), with where it came from.

    Raises
    ------
    PackageError
        A ledger in ``ledgers/`` exists but cannot be read: the card must record epsilon per site,
        so it is not made without it (a damaged ledger is not "no ledger").
    """
    from server.report import LEDGER_FIX, ledger_summary, read_ledger_files

    rows, bad = read_ledger_files(run_dir / "ledgers")
    if bad:
        (first, problem), more = bad[0], bad[1:]
        also = f" (and {len(more)} more: {', '.join(p.name for p, _ in more)})" if more else ""
        raise PackageError(f"{first}: ledger cannot be read ({problem}){also}; the model card records epsilon per site "
                           f"from the run's ledgers, so the package is not made without it; fix: {LEDGER_FIX}")
    if not rows:
        return {}, ("no ledger in the run folder (deployment: each node keeps its own ledger; the epsilon the nodes "
                    "reported is under sites.<site>.epsilon-reported)")
    summary = ledger_summary(rows, run_id)
    out = {}
    for site, s in summary.items():
        out[site] = {"delta": s["delta"], "accountant": s["accountant"][0] if s["accountant"] else None,
                     "epsilon-run": s["run-epsilon"], "epsilon-lifetime": s["lifetime-epsilon"],
                     "mechanisms": {m: {"epsilon": v["epsilon"], "delta": s["delta"], "releases": v["releases"],
                                        "steps": v["steps"], "noise-multiplier": list(v["noise"]) if v["noise"] else None}
                                    for m, v in s["mechanisms"].items()}}
    return out, "the run folder's ledgers (ledgers/*.sqlite), recomputed with each site's accountant"


def _app_hash(run_dir: Path) -> tuple[str | None, str]:
    launch = run_dir / "launch.json"
    if launch.exists():
        rec = _run_json(launch)
        for key in ("fab-hash", "app-hash"):
            _expect(launch, key, rec.get(key), (*_TEXT, *_NONE), "text (the app bundle's SHA-256)")
            if rec.get(key):
                return str(rec[key]), "launch.json"
        return None, "launch.json does not record the app bundle's hash"
    return None, "a simulation: no app bundle (the installed cityfed ran it)"


def _calibrated_noise(cfg: dict) -> dict:
    """``{"noise-multiplier": "calibrated by each node ..."}`` for a run that set none (the run config's -1), else ``{}``."""
    nm = cfg.get("noise-multiplier")
    if cfg.get("dp") and (nm is None or (isinstance(nm, (int, float)) and nm < 0)):
        target = cfg.get("target-epsilon")
        return {"noise-multiplier": f"calibrated by each node for target-epsilon {target:g}"
                if isinstance(target, (int, float)) else "calibrated by each node"}
    return {}


def _central_dp(results: dict) -> dict | None:
    """The coordinator's central DP of the published model (run config ``central-dp``), or None when off.

    ``epsilon`` is the accountant's total over every launch of the run (``results.json`` ``central-dp``).
    """
    cfg = results.get("config") or {}
    if not cfg.get("central-dp"):
        return None
    total = results.get("central-dp") if isinstance(results.get("central-dp"), dict) else {}
    return {"epsilon": total.get("epsilon"), "delta": total.get("delta", cfg.get("central-delta")),
            "accountant": total.get("accountant", cfg.get("central-accountant")), "rounds": total.get("rounds"),
            "noise-multiplier": cfg.get("central-noise-multiplier"), "clipping-norm": cfg.get("central-clipping-norm"),
            "unit": "one node's whole participation (user-level): the coordinator's Gaussian noise on the mean of the "
                    "nodes' clipped updates protects the model against its users"}


def model_card(run_dir: Path, results: dict, *, sites: list[str], model_config: dict, made_by: str) -> dict:
    """The model card (provenance) of a finished run folder.

    Parameters
    ----------
    run_dir : Path
        The run folder (``results.json``; ``ledgers/`` in simulation; ``launch.json`` in deployment).
    results : dict
        ``results.json``'s content.
    sites : list of str
        Site names by partition ID (simulation) or ``[]`` (deployment: nodes are named by ID).
    model_config : dict
        The model's config.
    made_by : str
        The command that wrote the package.

    Returns
    -------
    dict

    Raises
    ------
    PackageError
        ``results`` or the folder's ``launch.json`` has the wrong shape (:func:`check_results`),
        or a ledger in ``ledgers/`` cannot be read; the message names the file and the fix.
    """
    from citydata import DATASETS
    from server.energy import card_section as energy_card

    check_results(results, Path(run_dir) / "results.json")
    cfg = results.get("config") or {}
    dept = cfg.get("department")
    run_id = str(results.get("run_id"))
    privacy, privacy_source = _privacy(run_dir, run_id)
    per_site = _per_site(results, sites)
    for name, p in privacy.items():
        per_site.setdefault(name, {})["privacy"] = p
    app_hash, app_hash_note = _app_hash(run_dir)
    rounds = [e for e in results.get("rounds", []) if isinstance(e, dict)]
    trained = sorted({n for e in rounds for n in (((e.get("train") or {}).get("nodes")) or {})}, key=str)
    names = _site_names(results, sites)
    try:
        source = DATASETS[dept].source()
    except Exception as exc:  # noqa: BLE001 - a card says what it could not find
        source = {"error": f"{type(exc).__name__}"}
    data = cfg.get("central-data") or None
    return {
        "card-format": 1,
        "run-id": run_id,
        "status": results.get("status"),
        "department": dept,
        "task": (results.get("job") or {}).get("task"),
        "model": model_config,
        "app-hash": app_hash,
        "app-hash-note": app_hash_note,
        "strategy": cfg.get("strategy"),
        "strategy-settings": {k: cfg.get(k) for k in ("proximal-mu", "server-lr", "trim-beta", "krum-malicious")
                              if k in cfg and (cfg.get("strategy"), k) in {("fedprox", "proximal-mu"), ("fedadam", "server-lr"),
                                                                           ("fedyogi", "server-lr"), ("trimmed-mean", "trim-beta"),
                                                                           ("krum", "krum-malicious")}},
        "secure-aggregation": bool(cfg.get("secagg")),
        "rounds-planned": cfg.get("num-rounds"),
        "rounds-completed": max((int(e["round"]) for e in rounds if (e.get("train") or {}).get("accepted")), default=0),
        "sites-trained": [names.get(str(n), f"node {n}") for n in trained],
        "training": {**{k: cfg.get(k) for k in ("local-epochs", "batch-size", "lr", "dp", "target-epsilon",
                                                "noise-multiplier", "clipping-norm", "seed")},
                     **_calibrated_noise(cfg)},
        "privacy": privacy,
        "privacy-source": privacy_source,
        "central-dp": _central_dp(results),
        "sites": per_site,
        "excluded-updates": len(results.get("excluded") or []),
        "refusals": len(results.get("refused") or []),
        "data-sources": {"bundled": source, "coordinator-central-data": data,
                         "note": "bundled source as installed where the package was made; a department that trained "
                                 "on its own file has its own records' provenance"},
        "energy": energy_card(results, names),  # as the nodes reported it (server/energy.py)
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "made-by": made_by,
        "cityfed-version": _version(),
    }


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def card_markdown(card: dict) -> str:
    """The model card as Markdown (what ``model-card.md`` holds)."""
    from server.energy import card_markdown as energy_markdown

    lines = [f"# Model card: run {card['run-id']} ({card['department']})", "",
             f"- status: {card['status']}", f"- task: {card.get('task')}", f"- model: {card['model'].get('kind')}",
             f"- app hash: {card['app-hash'] or '-'} ({card['app-hash-note']})",
             f"- strategy: {card['strategy']} {card['strategy-settings'] or ''}".rstrip(),
             f"- secure aggregation: {'yes' if card['secure-aggregation'] else 'no'}",
             f"- rounds: {card['rounds-completed']} completed of {card['rounds-planned']} planned",
             f"- sites that trained: {', '.join(card['sites-trained']) or '-'}",
             f"- training: {', '.join(f'{k} = {_fmt(v)}' for k, v in card['training'].items())}",
             f"- excluded updates: {card['excluded-updates']}; refusals: {card['refusals']}",
             f"- created: {card['created']} by {card['made-by']} (cityfed {card['cityfed-version']})", "",
             "## Privacy per site and mechanism", "", f"Source: {card['privacy-source']}.", ""]
    if card["privacy"]:
        lines += ["| site | mechanism | epsilon | delta | releases |", "|---|---|---:|---:|---:|"]
        for site, p in sorted(card["privacy"].items()):
            for mech, m in p["mechanisms"].items():
                lines.append(f"| {site} | {mech} | {_fmt(m['epsilon'])} | {_fmt(m['delta'])} | {m['releases']} |")
            lines.append(f"| {site} | all (this run) | {_fmt(p['epsilon-run'])} | {_fmt(p['delta'])} | |")
    c = card.get("central-dp")
    if c:
        lines += ["", "## Central DP of the published model", "",
                  f"epsilon {_fmt(c['epsilon'])} at delta {_fmt(c['delta'])} ({str(c['accountant'] or 'rdp').upper()}, "
                  f"{_fmt(c['rounds'])} round(s)), noise multiplier {_fmt(c['noise-multiplier'])}, clipping norm "
                  f"{_fmt(c['clipping-norm'])}; unit: {c['unit']}."]
    lines += ["", "## Sites", "", "| site | epsilon reported by the node | last released metrics | coordinator's exact scores |",
              "|---|---:|---|---|"]
    for site, s in sorted(card["sites"].items()):
        rel = s.get("last-evaluate-release") or s.get("last-train-release") or {}
        rel = ", ".join(f"{k} {_fmt(v)}" for k, v in rel.items() if k not in ("num-examples", *ENERGY_METRICS))
        cen = ", ".join(f"{k} {_fmt(v)}" for k, v in (s.get("central") or {}).items())
        lines.append(f"| {site} | {_fmt(s.get('epsilon-reported'))} | {rel or '-'} | {cen or '-'} |")
    lines += energy_markdown(card.get("energy"))
    lines += ["", "## Data sources", "", "```json", json.dumps(card["data-sources"], indent=2, default=str), "```", ""]
    return "\n".join(lines)


# -- export ----------------------------------------------------------------------------------
def export_package(run_dir: Path, out_dir: Path, *, sites: list[str] | None = None, made_by: str = "cityfed") -> dict:
    """Write the model package of a finished run folder to ``out_dir``.

    Parameters
    ----------
    run_dir : Path
        A run folder with ``results.json`` and ``model.safetensors``.
    out_dir : Path
        The package folder (created; must be empty or absent).
    sites : list of str, optional
        Site names by partition ID (simulation); default: the department's sites (simulation
        runs name nodes by partition ID; deployment runs do not, and nodes stay ``node <ID>``).
    made_by : str
        Command recorded in the card.

    Returns
    -------
    dict
        The manifest (``files``: name -> SHA-256) plus ``manifest-sha256``.

    Raises
    ------
    PackageError
        No results.json / model, a results.json or launch.json that is damaged or has the wrong
        shape (:func:`read_run_results`), a model that does not fit its config, a non-empty ``out_dir``.
    """
    from citydata import DATASETS, load_department
    from shared_models import build_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    res_path = run_dir / "results.json"
    results = read_run_results(run_dir)
    model_path = run_dir / MODEL
    if not model_path.is_file():
        hint = (f" (it has {LEGACY_MODEL}, a pickle of an earlier version that cityfed does not read: re-run "
                "the run with this version)") if (run_dir / LEGACY_MODEL).exists() else ""
        raise PackageError(f"{model_path}: not found{hint}; fix: export a run that ended (its folder holds {MODEL})")
    cfg = results["config"]
    dept = cfg["department"]
    schema = DATASETS[dept].schema
    mcfg = run_model_config(results, res_path)
    _app_hash(run_dir)  # a damaged launch.json is refused before anything is written
    try:
        weights = load_model(model_path)
    except ArtefactError as exc:
        raise PackageError(str(exc)) from None
    import torch

    model = build_model(mcfg)
    try:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
    except RuntimeError as exc:
        raise PackageError(f"{model_path}: the weights do not fit the run's model {mcfg.kind!r} "
                           f"({str(exc).splitlines()[0]}); fix: export the folder of the run that wrote them") from None
    if sites is None:
        sites = load_department(dept).sites if cfg.get("department") and _is_simulation(run_dir) else []
    run_id = str(results.get("run_id"))
    mc = mcfg.model_dump(mode="json")
    # everything the package holds is made before anything is written (a ledger that cannot be read is
    # refused here, with no package folder left behind)
    card = model_card(run_dir, results, sites=sites, model_config=mc, made_by=made_by)
    texts = {"model-config.json": _json(mc), "schema.json": _json(schema_dict(schema)), "model-card.json": _json(card),
             "model-card.md": card_markdown(card)}
    out_dir = out_dir.absolute()  # "." names the working folder, whose Path has no name to stage beside
    existed = out_dir.is_dir()
    if existed:
        _remove_interrupted_export(out_dir)  # a killed export into this folder: its leftovers, never a package
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PackageError(f"{out_dir}: not empty; fix: give a new folder for the package")
    # built in a hidden staging folder, then put in place: a new out_dir by one rename of the whole folder; an
    # existing (empty) one keeps its inode and mode, and gets the files renamed into it, MANIFEST.json last. A kill
    # part-way leaves no complete-looking package (no manifest), and the next export removes what it left.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    where = out_dir if existed else out_dir.parent
    _remove_dead_staging(out_dir)
    stage = where / f"{_STAGING_PREFIX.format(name=out_dir.name)}{os.getpid()}-{os.urandom(4).hex()}"
    stage.mkdir(mode=0o755)
    try:
        save_model(stage / MODEL, weights, metadata={"run-id": run_id, "department": dept, "model": mcfg.kind})
        for name, text in texts.items():
            write_atomic(stage / name, text.encode())
        manifest = {"format": PACKAGE_FORMAT, "run-id": run_id, "department": dept,
                    "files": {name: sha256_file(stage / name) for name in FILES}}
        write_atomic(stage / MANIFEST, _json(manifest).encode())
        fsync_dir(stage)
        try:
            if existed:
                for name in (*FILES, MANIFEST):  # the manifest last: a package is complete once it is there
                    os.rename(stage / name, out_dir / name)
                stage.rmdir()
                fsync_dir(out_dir)
            else:
                os.rename(stage, out_dir)  # atomic
                fsync_dir(out_dir.parent)
        except OSError as exc:
            raise PackageError(f"{out_dir}: cannot put the package there ({exc.strerror}); fix: give a new folder "
                               "for the package") from None
    except BaseException:  # no half-written package: remove what this call wrote
        _remove_staging(stage)
        if existed and not (out_dir / MANIFEST).exists():
            for name in FILES:
                (out_dir / name).unlink(missing_ok=True)
        raise
    return {**manifest, "manifest-sha256": sha256_file(out_dir / MANIFEST)}


#: Name of an export's staging folder beside the package folder: ``.<name>.partial-<pid>-<random>``.
_STAGING_PREFIX = ".{name}.partial-"


def _remove_staging(stage: Path) -> None:
    """Remove an export's staging folder (package files only; anything else stays, and so does the folder)."""
    for name in (*FILES, MANIFEST):
        (stage / name).unlink(missing_ok=True)
        (stage / f"{name}.tmp").unlink(missing_ok=True)  # write_atomic's temporary
    try:
        stage.rmdir()
    except OSError:
        pass


def _remove_interrupted_export(out_dir: Path) -> None:
    """Remove what an export killed part-way left in the existing folder ``out_dir``: its dead staging folder and
    the package files it had moved in before the manifest (a folder that holds anything else is left alone)."""
    if (out_dir / MANIFEST).exists():
        return
    prefix = _STAGING_PREFIX.format(name=out_dir.name)
    names = {p.name for p in out_dir.iterdir()}
    stages = {n for n in names if n.startswith(prefix)}
    if not stages or not names - stages <= set(FILES):
        return
    _remove_dead_staging(out_dir, where=out_dir)
    if not any(p.name.startswith(prefix) for p in out_dir.iterdir()):  # every staging dead: an interrupted export
        for name in names - stages:
            (out_dir / name).unlink(missing_ok=True)


def _remove_dead_staging(out_dir: Path, where: Path | None = None) -> None:
    """Remove staging folders of exports to ``out_dir`` (in ``where``, default its parent) whose process is gone."""
    prefix = _STAGING_PREFIX.format(name=out_dir.name)
    for stage in (where or out_dir.parent).glob(prefix + "*"):
        pid = stage.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or not stage.is_dir() or stage.is_symlink():
            continue
        if not pid_alive(int(pid)):  # a live export's (or a reused pid's) is left alone
            _remove_staging(stage)


def _is_simulation(run_dir: Path) -> bool:
    """A simulation run folder (nodes named by partition ID): no ``launch.json`` of ``fl-server run``."""
    return not (Path(run_dir) / "launch.json").exists()


# -- load ------------------------------------------------------------------------------------
@dataclass
class ModelPackage:
    """A loaded, verified package: the model (eval mode), its config, schema and card."""

    path: Path
    model: object
    model_config: dict
    schema: dict
    card: dict
    manifest: dict
    manifest_sha256: str
    #: Set by :func:`serving.personalised.attach_personalised`: the node's personalised model file
    #: that :attr:`model` now holds (file, SHA-256, kept, dp, epochs, ...); ``None``: the global model.
    personalised: dict | None = None

    @property
    def department(self) -> str:  # noqa: D102
        return str(self.manifest["department"])


def verify_package(path: Path, *, manifest_sha256: str | None = None) -> dict:
    """Check a package's files against its manifest; return the manifest.

    Parameters
    ----------
    path : Path
        The package folder.
    manifest_sha256 : str, optional
        Expected SHA-256 of ``MANIFEST.json`` (as printed by the export).

    Raises
    ------
    PackageError
        Missing manifest or file, a file whose hash differs, an unexpected file, a manifest
        other than the expected one, a symbolic link or other non-regular file.
    """
    return _verified_files(path, manifest_sha256=manifest_sha256)[0]


def _verified_files(path: Path, *, manifest_sha256: str | None = None) -> tuple[dict, dict[str, bytes]]:
    """:func:`verify_package`, also returning each file's bytes as hashed (``MANIFEST.json`` included)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file() and not mpath.is_symlink():
        raise PackageError(f"{mpath}: not found; fix: give a package folder written by `fl-sim export-model` "
                           "or `fl-server export`")
    raw = {MANIFEST: _read_package_file(mpath)}
    got = hashlib.sha256(raw[MANIFEST]).hexdigest()
    if manifest_sha256 and got != manifest_sha256.lower():
        raise PackageError(f"{mpath}: SHA-256 {got} differs from the expected {manifest_sha256}; the package was "
                           "replaced or changed: do not serve it; export it again from the run folder")
    manifest = _package_json(path, MANIFEST, raw[MANIFEST])
    if manifest.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{mpath}: format {shown_value(manifest.get('format'))}, expected {PACKAGE_FORMAT!r}; fix: export "
                           "the package again with this cityfed (or serve it with the cityfed version that wrote it)")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise PackageError(f"{mpath}: files is {_kind(files)}, expected an object of file name -> SHA-256; the manifest "
                           f"was changed; {EXPORT_AGAIN}")
    if set(files) != set(FILES):
        raise PackageError(f"{mpath}: files lists {shown_value(sorted(files))}, a package has exactly {sorted(FILES)}; "
                           f"the package was changed; {EXPORT_AGAIN}")
    bad = sorted(n for n, h in files.items() if not (isinstance(h, str) and len(h) == 64
                                                      and all(c in "0123456789abcdef" for c in h)))
    if bad:
        raise PackageError(f"{mpath}: files.{shown_value(bad[0])} is not a SHA-256 (64 hex digits); the manifest was changed; "
                           f"{EXPORT_AGAIN}")
    from citydata import DATASETS

    dept = manifest.get("department")
    if not isinstance(dept, str) or dept not in DATASETS:
        raise PackageError(f"{mpath}: department {shown_value(dept)} is not one of {sorted(DATASETS)}; the manifest was changed; "
                           f"{EXPORT_AGAIN}")
    extra = sorted(p.name for p in path.iterdir() if p.name not in (*FILES, MANIFEST))
    if extra:
        raise PackageError(f"{path}: unexpected file(s) {shown_value(extra)} not covered by {MANIFEST}; fix: remove them, "
                           "or export the package again into an empty folder")
    for name, want in files.items():
        f = path / name
        raw[name] = _read_package_file(f)
        have = hashlib.sha256(raw[name]).hexdigest()
        if have != want:
            raise PackageError(f"{f}: SHA-256 {have} does not match {MANIFEST} ({want}): the file was changed "
                               "after export (tampered or damaged); refused. Fix: export the package again from "
                               "the run folder")
    return manifest, raw


def _validation_problems(exc) -> str:
    """A pydantic ``ValidationError`` in one line: ``field = value: problem`` per error."""
    out = []
    for e in exc.errors()[:5]:
        field = ".".join(str(x) for x in e.get("loc", ())) or "(the whole config)"
        value = repr(e.get("input"))
        value = value if len(value) <= 40 else value[:37] + "..."
        out.append(f"{field} = {value}: {e.get('msg', 'invalid')}" if e.get("type") != "missing"
                   else f"{field}: missing")
    more = len(exc.errors()) - len(out)
    return "; ".join(out) + (f" (and {more} more)" if more > 0 else "")


def count_parameters(config) -> int:
    """Parameters plus buffer elements of the model ``config`` describes, counted without allocating it."""
    import torch

    from shared_models import build_model

    with torch.device("meta"):  # shapes only: no memory, whatever the sizes
        model = build_model(config)
    return int(sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()))


def model_builder(path: Path, model_config: dict):
    """A callable returning a fresh model of the package's ``model-config.json`` (untrained weights).

    Raises
    ------
    PackageError
        An unknown model kind.
    """
    from pydantic import ValidationError

    from shared_models import build_model
    from shared_models.configs import GRUForecasterConfig, HeartClassifierConfig, PatchTSTForecasterConfig

    cfile = Path(path) / "model-config.json"
    kinds = {"heart-mlp": HeartClassifierConfig, "gru": GRUForecasterConfig, "patchtst": PatchTSTForecasterConfig}
    if not isinstance(model_config, dict):
        raise PackageError(f"{cfile}: holds {_kind(model_config)}, where a JSON object is expected; {EXPORT_AGAIN}")
    if model_config.get("kind") not in kinds:
        raise PackageError(f"{cfile}: kind {model_config.get('kind')!r} is not one of {sorted(kinds)}; fix: serve it "
                           "with the cityfed version that wrote it, or export the package again with this one")
    try:
        config = kinds[model_config["kind"]].model_validate(model_config)
    except ValidationError as exc:
        raise PackageError(f"{cfile}: {_validation_problems(exc)}; {EXPORT_AGAIN}") from None
    sizes = ", ".join(f"{k} = {list(v) if isinstance(v, tuple) else v}" for k, v in config.model_dump().items()
                      if isinstance(v, (int, tuple)) and not isinstance(v, bool))
    try:
        n = count_parameters(config)
    except (ValueError, TypeError, RuntimeError, ArithmeticError) as exc:  # e.g. d_model not divisible by heads
        why = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise PackageError(f"{cfile}: no {config.kind} model can be built from it ({why}); {EXPORT_AGAIN}") from None
    if n > MAX_PARAMETERS:
        raise PackageError(f"{cfile}: a {config.kind} model of {n:,} parameters ({sizes}), more than fl-serve loads "
                           f"({MAX_PARAMETERS:,}); the config was changed; {EXPORT_AGAIN}")
    return lambda: build_model(config)


def _state_dict_problems(message: str) -> str:
    """torch's ``load_state_dict`` error in a few words: tensors whose shapes differ, missing, unexpected."""
    import re

    out = [f"{m[0]} is [{m[1]}] in the file, [{m[2]}] in the model" for m in
           re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from "
                      r"checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)", message)]
    for what in ("Missing key(s)", "Unexpected key(s)"):
        m = re.search(re.escape(what) + r" in state_dict: ([^.]*(?:\.[^\s.][^.]*)*)\.", message)
        if m:
            out.append(f"{what.lower().replace('(s)', 's')} {m.group(1)[:200]}")
    if not out:
        return " ".join(message.split())[:300] or "RuntimeError"
    return "; ".join(out[:3]) + (f" (and {len(out) - 3} more)" if len(out) > 3 else "")


def check_weights(weights, where: str, *, damaged: str, made_by: str, fix: str) -> None:
    """Refuse weights that are not floating point or hold NaN or infinite values, before a model is built from them.

    ``load_state_dict`` would cast integer tensors silently (wrong predictions) and load NaN (every
    prediction NaN, which no JSON answer can carry). Used for the package's model
    (:func:`load_package`) and for a node's personalised model
    (:func:`serving.personalised.attach_personalised`). Messages name the tensor and its kind,
    never a value.

    Parameters
    ----------
    weights : mapping of str to array-like
        Tensor name -> tensor as read from the file (numpy arrays or torch tensors).
    where : str
        What the message starts with: the file, e.g. ``PACKAGE/model.safetensors`` or
        ``--personalised FILE``.
    damaged : str
        What is damaged when a tensor is not floating point, e.g. ``"the package"``, ``"the file"``.
    made_by : str
        What wrote the weights, e.g. ``"the run"``: a NaN says it diverged (or the file is damaged).
    fix : str
        The fix, starting with ``fix:``.

    Raises
    ------
    PackageError
        The first tensor that is not floating point, or holds a NaN or infinite value.
    """
    for name, value in weights.items():  # names and kinds only, never values
        is_torch = hasattr(value, "is_floating_point")  # a torch tensor (bfloat16 has no numpy dtype)
        if not is_torch:
            value = np.asarray(value)
        if not (value.is_floating_point() if is_torch else value.dtype.kind == "f"):
            kind = str(value.dtype).removeprefix("torch.")
            raise PackageError(f"{where}: tensor {name[:60]!r} holds {kind} values, not floating point; "
                               f"{damaged} is damaged; {fix}")
        if not bool(value.isfinite().all() if is_torch else np.isfinite(value).all()):
            raise PackageError(f"{where}: tensor {name[:60]!r} holds NaN or infinite values, so every "
                               f"prediction would be too; {made_by} that made it diverged or the file is damaged; "
                               f"{fix}")


def _check_fits_schema(path: Path, model_config: dict, schema: dict) -> None:
    """The model's input and output sizes are the schema's (n_features; lookback and horizon when forecasting)."""
    for key in ("n_features", "lookback", "horizon"):
        if key in model_config and schema.get(key) is not None and model_config[key] != schema[key]:
            raise PackageError(f"{Path(path) / 'model-config.json'}: {key} = {model_config[key]!r}, but "
                               f"schema.json's {key} is {schema[key]!r}: the model does not fit the records; "
                               f"{EXPORT_AGAIN}")


def load_package(path: Path, *, manifest_sha256: str | None = None) -> ModelPackage:
    """Verify a package (:func:`verify_package`) and build its model with the packaged weights.

    Parameters
    ----------
    path : Path
    manifest_sha256 : str, optional

    Returns
    -------
    ModelPackage
    """
    import torch

    path = Path(path)
    manifest, raw = _verified_files(path, manifest_sha256=manifest_sha256)  # each file read once: loaded as hashed
    mc = _package_json(path, "model-config.json", raw["model-config.json"])
    schema = _package_json(path, "schema.json", raw["schema.json"])
    card = _package_json(path, "model-card.json", raw["model-card.json"])
    build = model_builder(path, mc)
    _check_fits_schema(path, mc, schema)
    try:
        weights = model_from_bytes(raw[MODEL], path / MODEL)
    except ArtefactError:
        raise PackageError(f"{path / MODEL}: not a readable safetensors file; the package is damaged; "
                           f"{EXPORT_AGAIN}") from None
    check_weights(weights, str(path / MODEL), damaged="the package", made_by="the run", fix=EXPORT_AGAIN)
    model = build()
    try:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
    except RuntimeError as exc:  # missing/unexpected tensors, shapes (names and shapes only, no values)
        why = _state_dict_problems(str(exc))
        raise PackageError(f"{path / MODEL}: its tensors do not fit the {mc.get('kind')} model of model-config.json "
                           f"({why}); {EXPORT_AGAIN}") from None
    model.eval()
    return ModelPackage(path=path, model=model, model_config=mc, schema=schema, card=card, manifest=manifest,
                        manifest_sha256=hashlib.sha256(raw[MANIFEST]).hexdigest())


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("cityfed")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
