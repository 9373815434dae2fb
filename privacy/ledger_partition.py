"""Which nodes a simulation's ledger folder accounts for: a department's own sites, or one partition of them.

A simulated node keeps one ledger per site in the run's ledger folder (``RUN_DIR/ledgers``), and runs
into the same ``--out`` share them: each node composes every release of its site and refuses what
would pass its policy's lifetime ``max_epsilon``. That holds only while every run into the folder
plays the same nodes over the same records. A ``--virtual-sites`` run cuts the department's records
into other sites (``virtual-0`` ... ``virtual-{N-1}``, :mod:`citydata.virtual`), each with a ledger of
its own: run into a folder of the hospitals' ledgers, or on another partition (another count,
partitioner, alpha or seed, e.g. ``--resume --virtual-sites 8`` of a 4-site run), the same records
were released again under ledgers that never saw their earlier releases (a review measured a record
at epsilon 4.1 in one run of target 3, and Switzerland's patients at 8.3 past their ``max_epsilon`` of
8, every ledger reading within its budget).

So the folder records the nodes it accounts for, ``<department>.partition.json``, when a run first
uses it, and a run with other nodes is refused (:func:`check_partition`, before any node trains). A
folder of an earlier version without the file is judged by its ledger files: the hospitals' own, or
virtual sites of a partition nobody recorded (refused for any virtual run).
"""

from __future__ import annotations

import json
from pathlib import Path

#: The virtual-site settings that decide which records each virtual site holds (run-config keys).
PARTITION_KEYS = ("virtual-sites", "partitioner", "dirichlet-alpha", "seed", "data-seed", "data")


class LedgerPartitionError(ValueError):
    """A run whose nodes are not the ones its ledger folder accounts for (names the folder and the fix, no record).

    Attributes
    ----------
    what, fix : str
        The problem and the fix (``str()``: ``WHAT; fix: FIX``), for a CLI's own format.
    """

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what}; fix: {fix}")
        self.what, self.fix = what, fix


def partition_of(cfg: dict) -> dict:
    """The nodes a run config's simulation plays, as recorded in its ledger folder.

    Parameters
    ----------
    cfg : dict
        The run config as :func:`simulations.run.simulate` completes it (``virtual-sites``,
        ``partitioner``, ``dirichlet-alpha``, ``seed``, ``data-seed``, ``data``).

    Returns
    -------
    dict
        ``{"sites": "department", "data": ...}``, or ``{"sites": "virtual", ...}`` with
        :data:`PARTITION_KEYS` (``dirichlet-alpha`` only for the Dirichlet partitioner).
    """
    data = str(cfg.get("data") or "")
    n = int(cfg.get("virtual-sites", 0) or 0)
    if n <= 0:
        return {"sites": "department", "data": data}
    partitioner = str(cfg.get("partitioner") or "iid")
    seed = int(cfg.get("seed", 0) or 0)
    return {"sites": "virtual", "virtual-sites": n, "partitioner": partitioner,
            "dirichlet-alpha": float(cfg.get("dirichlet-alpha", 0.5)) if partitioner == "dirichlet" else None,
            "seed": seed, "data-seed": int(cfg.get("data-seed", seed) or 0), "data": data}


def describe(part: dict) -> str:
    """``part`` in words, e.g. ``4 virtual sites (iid, seed 0, data seed 0)`` or ``the department's own sites``."""
    if part.get("sites") != "virtual":
        text = "the department's own sites"
    elif part.get("virtual-sites") is None:
        return "virtual sites of a partition that is not recorded (its record is missing)"
    else:
        how = str(part["partitioner"]) + (f", alpha {part['dirichlet-alpha']:g}" if part.get("dirichlet-alpha") else "")
        text = f"{part['virtual-sites']} virtual sites ({how}, seed {part['seed']})"
        if part.get("data-seed") != part.get("seed"):  # fl-sim sets both from --seed; simulate() callers may not
            text = text[:-1] + f", data-seed {part['data-seed']})"
    return text + (f" of {part['data']}" if part.get("data") else "")


def _options(part: dict) -> str:
    """The fl-sim options that play ``part``'s nodes again."""
    if part.get("sites") != "virtual":
        return "no --virtual-sites"
    if part.get("virtual-sites") is None:
        return "another --out"
    alpha = f" --alpha {part['dirichlet-alpha']:g}" if part.get("dirichlet-alpha") else ""
    return f"--virtual-sites {part['virtual-sites']} --partitioner {part['partitioner']}{alpha} --seed {part['seed']}"


def _file(ledger_dir: Path, department: str) -> Path:
    return Path(ledger_dir) / f"{department}.partition.json"


def recorded_partition(ledger_dir: Path, department: str) -> dict | None:
    """The nodes ``ledger_dir`` accounts for: its record, else what its ledger files show, else None (no ledger yet).

    Raises
    ------
    LedgerPartitionError
        The record is not readable JSON (names the file and the fix).
    """
    path = _file(ledger_dir, department)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict) or saved.get("sites") not in ("department", "virtual"):
                raise ValueError("not a partition record")
        except (OSError, ValueError) as exc:
            raise LedgerPartitionError(f"{path}: not a readable partition record ({type(exc).__name__}): its ledgers "
                                       "cannot be matched to this run's nodes", "run into another --out") from None
        return saved
    ledgers = [p.name for p in Path(ledger_dir).glob(f"{department}-*.sqlite")] if Path(ledger_dir).is_dir() else []
    if not ledgers:
        return None
    if any(n.startswith(f"{department}-virtual-") for n in ledgers):
        return {"sites": "virtual", "virtual-sites": None}
    return {"sites": "department", "data": None}


def _same(saved: dict, part: dict) -> bool:
    if saved.get("sites") != part["sites"]:
        return False
    if part["sites"] == "department":
        return True  # a site's ledger composes all its releases, whatever the split or the file
    return all(saved.get(k) == part.get(k) for k in PARTITION_KEYS)


def check_partition(ledger_dir: Path, department: str, cfg: dict) -> None:
    """Refuse a run whose nodes are not the ones ``ledger_dir``'s ledgers account for.

    Parameters
    ----------
    ledger_dir : Path
        The run's ledger folder (``ledger-dir``; ``RUN_DIR/ledgers`` by default).
    department : str
    cfg : dict
        The run config (:func:`partition_of`).

    Raises
    ------
    LedgerPartitionError
        Naming the folder, the nodes it accounts for, this run's, and the fix (the same nodes'
        options, or another ``--out``).
    """
    saved = recorded_partition(ledger_dir, department)
    part = partition_of(cfg)
    if saved is None or _same(saved, part):
        return
    known = saved["sites"] == "department" or saved.get("virtual-sites") is not None
    raise LedgerPartitionError(
        f"{ledger_dir}: its {department} ledgers account for {describe(saved)}, and this run's nodes would be "
        f"{describe(part)}: their ledgers would not hold those records' releases so far, so no node could bound "
        "what the records spend in all",
        (f"run with {_options(saved)} to continue with the same nodes, or run these nodes into another --out (their "
         "epsilon is then per folder: the records' releases in this one are not counted there)"
         if known else "run into another --out (its epsilon is then per folder: the records' releases in this one "
         "are not counted there)"))


def record_partition(ledger_dir: Path, department: str, cfg: dict) -> None:
    """Record the nodes ``ledger_dir`` accounts for, if not yet recorded (after :func:`check_partition` passed)."""
    from contract.files import write_atomic

    path = _file(ledger_dir, department)
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(partition_of(cfg), indent=2) + "\n").encode())
