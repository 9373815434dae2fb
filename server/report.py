"""Run report: PNG plots (metric and epsilon per site vs round) and a small HTML page.

One report for every run, simulated or deployed: ``fl-sim`` writes it after a simulation
(with the sites' names), the ServerApp at the end of every run (:func:`server.app.run_federation`),
and ``fl-server stop`` / ``fl-server start`` for runs that ended without the ServerApp
finishing them (stopped by the operator, failed). Needs only ``results.json`` and
matplotlib: no model, dataset or ``clients`` import, so the coordinator's CLI can write it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path


def metric_for(department: str | None) -> str:
    """The headline metric of a department's task: ``accuracy`` (health) or ``mae-ratio`` (forecasting)."""
    return "accuracy" if department == "health" else "mae-ratio"


def per_site_series(results: dict, sites: list[str], phase: str | tuple[str, ...], key: str) -> dict[str, list[tuple[int, float]]]:
    """``{site: [(round, value), ...]}`` from a run's ``results.json`` content.

    ``phase`` is ``"train"`` or ``"evaluate"`` (what the nodes released; several phases: the
    largest value per round), or ``"central-sites"`` (the coordinator's exact scores on the
    data it holds, keyed by site name). Node releases are named ``sites[partition-id]``
    where the node reports a partition (simulation), else ``node <node ID>`` (deployment).
    """
    out: dict[str, list[tuple[int, float]]] = {}
    rounds = results.get("rounds") or []
    if phase == "central-sites":
        for entry in rounds:
            for name, m in (entry.get("central-sites") or {}).items():
                if key in m and m.get("num-examples", 1):
                    out.setdefault(name, []).append((entry["round"], float(m[key])))
        return out
    if isinstance(phase, tuple):
        merged: dict[str, dict[int, float]] = {}
        for ph in phase:
            for name, pts in per_site_series(results, sites, ph, key).items():
                for rnd, v in pts:
                    merged.setdefault(name, {})[rnd] = max(v, merged.get(name, {}).get(rnd, v))
        return {name: sorted(d.items()) for name, d in merged.items()}
    for entry in rounds:
        nodes = (entry.get(phase) or {}).get("nodes") or {}
        for node, m in nodes.items():
            if key not in m:
                continue
            pid = m.get("partition-id")
            name = sites[int(pid)] if pid is not None and int(pid) < len(sites) else f"node {node}"
            out.setdefault(name, []).append((entry["round"], float(m[key])))
    return out


def _plot(series: dict, title: str, ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for name, pts in sorted(series.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title if series else f"{title}: no rounds completed")
    ax.grid(alpha=0.3)
    if 0 < len(series) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(run_dir: Path, sites: list[str], metric: str) -> Path:
    """Write ``metric.png``, ``epsilon.png`` and ``report.html`` into ``run_dir``.

    Parameters
    ----------
    run_dir : Path
        Folder holding the run's ``results.json``.
    sites : list of str
        Site names by partition ID (simulation); ``[]`` in deployment (nodes are named by ID,
        the coordinator's central scores by the site names in its data).
    metric : str
        Metric plotted per site (:func:`metric_for`).

    Returns
    -------
    Path
        ``run_dir/report.html``.
    """
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    central = per_site_series(results, sites, "central-sites", metric)
    released = per_site_series(results, sites, "evaluate", metric)
    if central or not released:
        _plot(central, f"{metric} per site test split (coordinator-held data, exact)", metric, run_dir / "metric.png")
    else:
        _plot(released, f"{metric} per site (DP-noised node releases, accounted)", metric, run_dir / "metric.png")
    if central and released:
        _plot(released, f"{metric} per site (DP-noised node releases, accounted)", metric, run_dir / "metric-dp.png")
    eps = per_site_series(results, sites, ("train", "evaluate"), "epsilon")
    _plot(eps, "epsilon spent per site (node ledger, lifetime)", "epsilon", run_dir / "epsilon.png")
    cfg = results.get("config", {})
    rounds = results.get("rounds") or []
    rows = "".join(
        f"<tr><td>{e['round']}</td><td>{(e.get('train') or {}).get('accepted', '')}</td>"
        f"<td>{html.escape(json.dumps((e.get('evaluate') or {}).get('aggregate'), default=float))}</td>"
        f"<td>{html.escape(json.dumps(e.get('central'), default=float))}</td></tr>"
        for e in rounds
    )
    refused = "".join(f"<li>round {r['round']} node {r['node']}: {html.escape(r['reason'])}</li>" for r in results.get("refused", []))
    excluded = "".join(f"<li>round {r['round']} node {r['node']}: {html.escape(r['reason'])}</li>" for r in results.get("excluded", []))
    status = str(results.get("status", "unknown"))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cityfed run {html.escape(str(results.get('run_id')))}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>
<h1>cityfed run: {html.escape(str(cfg.get('department')))}</h1>
<p>run {html.escape(str(results.get('run_id')))}: <b>{html.escape(status)}</b> after {len(rounds)} of {cfg.get('num-rounds')} rounds</p>
<p>strategy {html.escape(str(cfg.get('strategy')))}, {cfg.get('num-rounds')} rounds, DP {'on' if cfg.get('dp') else 'off'},
target epsilon {cfg.get('target-epsilon')}, model {html.escape(str(cfg.get('model')))}, secure aggregation {'on' if cfg.get('secagg') else 'off'}</p>
<img src="metric.png" alt="metric per site"><img src="epsilon.png" alt="epsilon per site">
<h2>Rounds</h2><table><tr><th>round</th><th>updates accepted</th><th>aggregate evaluation (nodes)</th><th>central evaluation</th></tr>{rows}</table>
<h2>Refused jobs</h2><ul>{refused or '<li>none</li>'}</ul>
<h2>Excluded replies</h2><ul>{excluded or '<li>none</li>'}</ul>
</body></html>"""
    out = run_dir / "report.html"
    out.write_text(page)
    return out


def write_run_report(run_dir: Path) -> Path:
    """:func:`write_report` for a deployment run folder (metric from its department, nodes named by ID)."""
    results = json.loads((Path(run_dir) / "results.json").read_text())
    return write_report(run_dir, [], metric_for((results.get("config") or {}).get("department")))
