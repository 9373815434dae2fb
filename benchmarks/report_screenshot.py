"""Screenshot of a real run's report in headless Chromium (docs/img/report-health.png).

Runs a short health federation in process (the same ServerApp/ClientApp as ``fl-sim run``;
DP-SGD at epsilon 3 per hospital, the coordinator scoring each hospital's test split, and each
node also releasing its evaluation through the Gaussian mechanism, so the report shows two
mechanisms per site), writes its ``report.html`` and renders it with Debian's ``chromium``
(``apt-get install -y chromium``)::

    .venv/bin/python benchmarks/report_screenshot.py                # runs/report-demo, docs/img/report-health.png
    .venv/bin/python benchmarks/report_screenshot.py --results-only  # rerender an existing run folder

``tests/test_report_browser.py`` uses the helpers here (:func:`find_chromium`,
:func:`screenshot`, :func:`dump_dom`, :func:`short_run`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Names the Chromium binary has on Debian/Ubuntu.
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def find_chromium() -> str | None:
    """Path of a Chromium binary on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH; fix: apt-get install -y chromium")
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-dev-shm-usage", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 3600, *, trim: bool = False) -> Path:
    """Render ``page`` (an HTML file) at ``width`` x ``height`` CSS pixels into ``png``.

    ``trim``: cut the blank rows below the page's end (keeping a 24-pixel margin).
    """
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _chromium([f"--screenshot={png}", f"--window-size={width},{height}", Path(page).resolve().as_uri()])
    if trim:
        import numpy as np
        from PIL import Image

        img = Image.open(png).convert("RGB")
        a = np.asarray(img)
        used = np.nonzero((a != a[-1:, :, :]).any(axis=(1, 2)))[0]
        if len(used):
            img.crop((0, 0, img.width, min(img.height, int(used[-1]) + 24))).save(png, optimize=True)
    return png


def dump_dom(page: Path) -> str:
    """The DOM of ``page`` after Chromium loaded it (``--dump-dom``)."""
    return _chromium(["--dump-dom", Path(page).resolve().as_uri()]).stdout


def dump_url(url: str, wait_ms: int = 10_000) -> str:
    """The DOM of ``url`` (e.g. a loopback server's page) after its scripts ran for up to ``wait_ms`` of virtual time."""
    return _chromium(["--dump-dom", f"--virtual-time-budget={int(wait_ms)}", url]).stdout


def short_run(out: Path, rounds: int = 2, target_epsilon: float = 3.0) -> dict:
    """A real health federation of ``rounds`` rounds (in process) into ``out``; returns results.json's content.

    Every hospital trains with DP-SGD to ``target_epsilon`` for the run and releases its
    evaluation metrics through the Gaussian mechanism (policy ``[releases] local_evaluation =
    "dp"``) and its tasks' energy (``energy = "sent"``: an opt-in, not a DP release); the simulated
    coordinator also scores each hospital's test split exactly (``central-data = "bundled"``).
    Then writes ``out/report.html``.
    """
    from citydata import load_department
    from server.report import write_report
    from simulations.compare import write_policy
    from simulations.run import simulate

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    policy = write_policy("health", out / "policies" / "health-dp-eval.toml",
                          releases={"local_evaluation": "dp", "max_evaluations_per_run": rounds,
                                    "energy": "sent"})
    cfg = {"department": "health", "num-rounds": rounds, "local-epochs": 1, "batch-size": 32, "dp": True,
           "target-epsilon": target_epsilon, "run-dir": str(out), "policy": str(policy), "run-id": "report-demo",
           "central-data": "bundled", "fraction-evaluate": 1.0, "seed": 0}
    results = simulate(cfg, engine="inprocess")
    write_report(out, load_department("health").sites, "accuracy")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "report-demo", help="run folder (results.json, report.html)")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "report-health.png")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=3600)
    ap.add_argument("--results-only", action="store_true", help="do not run: rerender OUT's results.json")
    args = ap.parse_args(argv)
    if find_chromium() is None:
        print("no chromium on PATH; fix: apt-get install -y chromium", file=sys.stderr)
        return 1
    if args.results_only:
        from citydata import load_department
        from server.report import write_report

        write_report(args.out, load_department("health").sites, "accuracy")
    else:
        if args.out.exists():
            shutil.rmtree(args.out)  # fresh ledgers: the demo's epsilon is this run's
        short_run(args.out, rounds=args.rounds)
    png = screenshot(args.out / "report.html", args.png, args.width, args.height, trim=True)
    print(f"wrote {args.out / 'report.html'} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
