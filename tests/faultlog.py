"""The fault table's rows, written by the slow fault tests as they measure them.

Each fault test of the slow suite (``make test-slow``) calls :func:`record` once it has checked
its outcome. When ``CITYFED_FAULT_TABLE`` names a file, the row is appended to it as one JSON
line; ``benchmarks/fault_table.py`` turns that file into the table in README.md and
docs/DEPLOYMENT.md (``make test-slow`` sets the variable and prints the table at the end).
Without the variable nothing is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "CITYFED_FAULT_TABLE"


def run_epsilon(ledger: Path, site: str, run_id: str) -> tuple[float, list[dict]]:
    """The epsilon run ``run_id`` obtained from ``site``'s node, from the node's own ledger.

    Every release the node recorded for the run counts (DP-SGD rounds, replays, metric releases);
    aborted rows are reservations that never left the node.
    """
    from privacy.dp import rdp_epsilon
    from privacy.ledger import PrivacyLedger

    led = PrivacyLedger(ledger)
    rows = [r for r in led.releases(site) if r["run_id"] == run_id and r["status"] != "aborted"]
    return (rdp_epsilon(led.run_history(site, run_id), rows[-1]["delta"]) if rows else 0.0), rows


def max_run_epsilon(city, sites, run_id: str) -> float:
    """The largest :func:`run_epsilon` over ``sites`` (their ledgers in ``city``)."""
    return max(run_epsilon(city.ledger(s), s, str(run_id))[0] for s in sites)


def record(scenario: str, outcome: str, detect: str, rounds_lost: int | str, epsilon: float | None,
           target: float | None = 3.0, settings: str = "defaults") -> None:
    """Append one measured row of the fault table to ``$CITYFED_FAULT_TABLE`` (if set).

    Parameters
    ----------
    scenario : str
        What was done, e.g. "kill -9 a node while it trains (SecAgg+ collect stage)".
    outcome : str
        What the run did, as checked by the test.
    detect : str
        The measured time from the fault to the system acting on it, with what it is bounded by.
    rounds_lost : int or str
        Rounds of the run that were lost (0 when every round ran exactly once in the numbering).
    epsilon : float or None
        Largest epsilon any node's ledger holds for the run (None when nothing was trained).
    target : float or None
        The run's target epsilon.
    settings : str
        Run settings that differ from ``fl-server run``'s defaults.
    """
    path = os.environ.get(ENV)
    if not path:
        return
    row = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "scenario": scenario,
           "outcome": outcome, "detect": detect, "rounds_lost": rounds_lost,
           "epsilon": None if epsilon is None else round(float(epsilon), 3), "target": target, "settings": settings}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
