"""The fault table: what each injected fault did to a deployment run, as the slow suite measured it.

Usage::

    python benchmarks/fault_table.py            # runs the fault suite (~25 min on 2 cores), then prints the table
    python benchmarks/fault_table.py --render runs/fault-table.jsonl   # only render rows already recorded

The fault suite is the slow loopback tests that inject faults into a real deployment (a
coordinator and three hospital nodes over TLS with node authentication, as in
docs/DEPLOYMENT.md): ``tests/test_faults_slow.py``, ``tests/test_fault_resume_slow.py``,
``tests/test_supervision_slow.py`` and the fault tests of ``tests/test_deploy_slow.py``. Each
test appends its measured row (``tests/faultlog.py``) to the file named by
``CITYFED_FAULT_TABLE``; ``make test-slow`` (and so CI) records them too and prints the table.
A scenario recorded twice (a rerun) shows its last measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ["tests/test_deploy_slow.py", "tests/test_faults_slow.py", "tests/test_fault_resume_slow.py",
         "tests/test_supervision_slow.py"]
COLUMNS = ("Scenario", "Outcome (checked by the test)", "Time to detect", "Rounds lost", "Max node epsilon / target")


def load_rows(path: Path) -> list[dict]:
    """The recorded rows of ``path``, the last one per scenario, in first-recorded order.

    Raises
    ------
    SystemExit
        When the file is missing or holds a line that is not a JSON object (names the line).
    """
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file (run the fault suite first, or omit --render)")
    rows: dict[str, dict] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = row["scenario"]
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"error: {path}:{n}: not a fault-table row (a JSON object with 'scenario')") from None
        rows.pop(key, None)
        rows[key] = row
    return list(rows.values())


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict]) -> str:
    """A Markdown table of ``rows`` (see :func:`tests.faultlog.record` for the fields)."""
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        eps = "nothing trained" if r.get("epsilon") is None else f"{r['epsilon']:.3f}"
        if r.get("target") is not None:
            eps += f" / {r['target']:g}"
        scen = r["scenario"] + ("" if r.get("settings", "defaults") == "defaults" else f" ({r['settings']})")
        out.append("| " + " | ".join(_cell(c) for c in (scen, r["outcome"], r["detect"], r["rounds_lost"], eps)) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--render", type=Path, metavar="JSONL", help="only render this file of recorded rows")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "fault-table.jsonl",
                    help="where the suite records its rows (default: runs/fault-table.jsonl; replaced)")
    args = ap.parse_args(argv)
    rc, given = 0, args.render is not None
    if not given:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.unlink(missing_ok=True)
        env = {**os.environ, "CITYFED_FAULT_TABLE": str(args.out.resolve()), "FLWR_TELEMETRY_ENABLED": "0"}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "slow", "--reruns", "1",
                              "--reruns-delay", "5", *SUITE], cwd=ROOT, env=env)
        if rc != 0:
            print(f"warning: the fault suite failed (pytest exit {rc}); the table shows the scenarios that passed",
                  file=sys.stderr)
        args.render = args.out
    try:
        rows = load_rows(args.render)
    except SystemExit as exc:
        if isinstance(exc.code, str):  # a missing or bad --render file: its message names it; exit 2
            print(exc.code, file=sys.stderr)
            return 2 if given else 1
        raise
    print(render(rows))
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
