"""Run report: PNG plots and an HTML page of formatted tables that people read.

One report for every run, simulated or deployed: ``fl-sim`` writes it after a simulation
(with the sites' names), the ServerApp at the end of every run (:func:`server.app.run_federation`),
and ``fl-server stop`` / ``fl-server start`` for runs that ended without the ServerApp
finishing them (stopped by the operator, failed). ``fl-sim compare`` writes one for the
comparison folder too (local-only vs federated per site, and the gain).

Needs only ``results.json`` and matplotlib: no model, dataset or ``clients`` import, so the
coordinator's CLI can write it. Where the run folder holds the nodes' ledgers (simulation:
``ledgers/*.sqlite``) they are read (read-only) for epsilon and delta per site and per
mechanism; in deployment the ledgers stay on the department machines and the page shows the
epsilon each node reported. Where ``$CITYFED_AUDIT_LOG`` names the coordinator's audit log
(``fl-server start`` sets it for the ServerApp) the page shows whether that log verifies.

Every section is rendered from whatever fields the ``results.json`` has (older files lack
some): a missing field shows as "—" and a section that cannot be rendered is replaced by a
one-line note (and logged); the page never contains raw JSON, and every value is escaped.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

#: Shown for a missing or empty value.
MISSING = "—"

#: Human labels and units of the headline metrics.
METRIC_LABELS = {
    "accuracy": ("accuracy", "fraction of test records classified correctly, 0–1; higher is better"),
    "roc-auc": ("ROC AUC", "area under the ROC curve, 0–1; higher is better"),
    "mae-ratio": ("MAE ratio", "model MAE ÷ MAE of the best naive forecast; lower is better, < 1 beats naive"),
    "mae": ("MAE", "mean absolute error, in the target's units; lower is better"),
    "rmse": ("RMSE", "root mean squared error, in the target's units; lower is better"),
    "loss": ("loss", "training loss (the model's criterion); lower is better"),
}

#: Ledger mechanisms (``privacy.ledger.MECHANISMS``) as people read them.
MECHANISM_LABELS = {
    "dp-sgd": "DP-SGD (model update)",
    "gaussian-train-loss": "Gaussian release: training loss",
    "gaussian-eval": "Gaussian release: evaluation metrics",
    "personalisation": "DP-SGD (on-site personalisation, model kept on the node)",
    "gaussian-count": "Gaussian release: record count (once per data set)",
    "non-private": "trained without DP (no finite epsilon)",
}

#: Methods of ``fl-sim compare``.
METHOD_LABELS = {
    "pooled": "pooled (all sites' records in one place; reference)",
    "local": "local-only (each site alone)",
    "federated": "federated, no DP",
    "federated-dp": "federated with DP",
    "federated+personalised": "federated, then personalised on each site, no DP",
    "federated-dp+personalised": "federated with DP, then personalised on each site (same ε budget)",
}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:76em;margin:1.5em auto;padding:0 1em;
color:#1d232a;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:2px solid #dde3ea;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #cfd6de;padding:3px 8px;vertical-align:top}
th{background:#eef2f6;text-align:left;font-weight:600}th[colspan]{text-align:center}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.total td{font-weight:600;background:#f7f9fb}
caption{caption-side:top;text-align:left;color:#52606d;font-size:.9em;padding-bottom:.2em}
.status{display:inline-block;padding:1px 8px;border-radius:4px;font-weight:600}
.ok{background:#dff3e4;color:#17612c}.warn{background:#fff1d6;color:#7a4d00}.bad{background:#fde2e1;color:#8a1c17}
.note{color:#52606d;font-size:.9em}.error{color:#8a1c17}
figure{display:inline-block;vertical-align:top;width:48%;margin:.4em 1% .4em 0}
figcaption{color:#52606d;font-size:.85em}img{width:100%;border:1px solid #e3e8ee}
ul.reasons{margin:0;padding-left:1.1em}
"""


# --------------------------------------------------------------------------- formatting
class Html(str):
    """Markup built by this module (already escaped); any other value is escaped when shown."""


def esc(value) -> str:
    """``value`` as escaped text (:class:`Html` is kept as it is)."""
    if isinstance(value, Html):
        return value
    return html.escape(str(value), quote=True)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt_num(v, digits: int = 3, *, unit: str = "") -> str:
    """A number for a table: fixed ``digits`` decimals, thousands separators for integers,
    ``n/a`` for NaN, ``∞`` for infinity, "—" for None; other values as text.
    """
    if v is None or v == "":
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return v
    if not _is_num(v):
        return fmt_value(v)
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1000:
        text = f"{int(v):,}"
    else:
        text = f"{v:.{digits}f}"
    return f"{text} {unit}" if unit else text


def fmt_int(v) -> str:
    """A count: ``1,234``; "—" for None."""
    if v is None or v == "":
        return MISSING
    try:
        return f"{int(round(float(v))):,}"
    except (TypeError, ValueError):
        return fmt_value(v)


def fmt_seconds(v) -> str:
    """Seconds with their unit: ``0.41 s``, ``12.3 s``; "—" for None."""
    if not _is_num(v):
        return MISSING if v is None else fmt_value(v)
    if math.isnan(v):
        return "n/a"
    return f"{v:.2f} s" if abs(v) < 10 else f"{v:.1f} s"


def fmt_eps(v) -> str:
    """Epsilon (dimensionless privacy loss), 3 decimals; ``∞`` where DP is off."""
    return fmt_num(v, 3)


def fmt_delta(v) -> str:
    """Delta (a probability) in scientific notation: ``4.93e-04``."""
    if not _is_num(v):
        return MISSING if v is None else fmt_value(v)
    return "0" if v == 0 else f"{v:.2e}"


def fmt_value(v) -> str:
    """Any value as plain text, never JSON: dicts as ``key: value; …``, lists comma-separated."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if _is_num(v):
        return fmt_num(v, 4) if isinstance(v, float) else fmt_int(v)
    if isinstance(v, dict):
        return "; ".join(f"{k}: {fmt_value(x)}" for k, x in v.items()) or MISSING
    if isinstance(v, (list, tuple, set)):
        return ", ".join(fmt_value(x) for x in v) or MISSING
    return str(v)


def _cell(v, tag: str = "td") -> str:
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "num":
        return f'<{tag} class="num">{esc(v[1])}</{tag}>'
    if isinstance(v, Html):
        return f"<{tag}>{v}</{tag}>"
    if v is None or v == "":
        return f"<{tag}>{MISSING}</{tag}>"
    return f"<{tag}>{esc(v if isinstance(v, str) else fmt_value(v))}</{tag}>"


TOTAL = ' class="total"'


def num(text: str) -> tuple[str, str]:
    """A right-aligned table cell holding already formatted ``text``."""
    return ("num", text)


def table(headers: list | None, rows: list[list], *, caption: str | None = None, total_rows: set[int] = frozenset(),
          cls: str = "", groups: list[tuple[str, int]] | None = None) -> Html:
    """An HTML table: ``headers`` (text; None: no header row), ``rows`` of cells (text, :class:`Html`, or :func:`num`).

    ``groups``: an extra header row above, of ``(label, number of columns)``.
    """
    top = ("<tr>" + "".join(f'<th colspan="{int(n)}">{esc(g)}</th>' if n > 1 else _cell(g, "th") for g, n in groups)
           + "</tr>") if groups else ""
    head = f"<thead>{top}<tr>{''.join(_cell(h, 'th') for h in headers)}</tr></thead>" if headers else ""
    body = "".join(f'<tr{TOTAL if i in total_rows else ""}>{"".join(_cell(c) for c in row)}</tr>'
                   for i, row in enumerate(rows))
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    klass = f' class="{esc(cls)}"' if cls else ""
    return Html(f"<table{klass}>{cap}{head}<tbody>{body}</tbody></table>")


def _empty(c) -> bool:
    v = c[1] if isinstance(c, tuple) else c
    return v is None or v in ("", MISSING, "not run")


def drop_empty_columns(headers: list, rows: list[list], keep: int = 1) -> tuple[list, list[list]]:
    """``headers`` and ``rows`` without the columns (after the first ``keep``) that hold no value in any row."""
    cols = [i for i in range(len(headers)) if i < keep or any(not _empty(r[i]) for r in rows)]
    return [headers[i] for i in cols], [[r[i] for i in cols] for r in rows]


def kv_table(pairs: list[tuple[str, object]], caption: str | None = None) -> Html:
    """A two-column table of ``(label, value)`` (values shown as :func:`_cell` does)."""
    body = "".join(f'<tr><th scope="row">{esc(k)}</th>{_cell(v)}</tr>' for k, v in pairs)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return Html(f'<table class="kv">{cap}<tbody>{body}</tbody></table>')


def reasons_list(items: list[str]) -> Html:
    """A bullet list of escaped lines (empty list: "—")."""
    if not items:
        return Html(MISSING)
    return Html('<ul class="reasons">' + "".join(f"<li>{esc(x)}</li>" for x in items) + "</ul>")


def status_badge(status) -> Html:
    s = str(status if status is not None else "unknown")
    kind = "ok" if s == "completed" else "bad" if s.startswith("failed") else "warn"
    return Html(f'<span class="status {kind}">{esc(s)}</span>')


def metric_label(metric: str, with_unit: bool = True) -> str:
    name, unit = METRIC_LABELS.get(metric, (metric, ""))
    return f"{name} ({unit})" if with_unit and unit else name


def _higher_is_better(metric: str) -> bool:
    return metric not in ("mae-ratio", "mae", "rmse", "loss")


# --------------------------------------------------------------------------- results.json reading
def metric_for(department: str | None) -> str:
    """The headline metric of a department's task: ``accuracy`` (health) or ``mae-ratio`` (forecasting)."""
    return "accuracy" if department == "health" else "mae-ratio"


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _list(v) -> list:
    return v if isinstance(v, list) else []


def metric_value(m, metric: str):
    """``m[metric]`` (also under its underscore spelling, e.g. ``mae_ratio``), None if absent or not a number."""
    m = _dict(m)
    v = m.get(metric, m.get(metric.replace("-", "_")))
    return v if _is_num(v) else None


def _rounds(results: dict) -> list[dict]:
    return [e for e in _list(results.get("rounds")) if isinstance(e, dict) and "round" in e]


def node_names(results: dict, sites: list[str]) -> dict[str, str]:
    """``{node ID (text): name}``: ``sites[partition-id]`` where a node reported its partition
    (simulation), else ``node <ID>`` (deployment)."""
    out: dict[str, str] = {}
    for e in _rounds(results):
        for phase in ("train", "evaluate"):
            for node, m in _dict(_dict(e.get(phase)).get("nodes")).items():
                pid = _dict(m).get("partition-id")
                try:
                    if pid is not None and int(pid) < len(sites):
                        out[str(node)] = sites[int(pid)]
                except (TypeError, ValueError):
                    pass
    return out


def _name(node, names: dict[str, str]) -> str:
    if node is None:
        return MISSING
    if str(node) in names:
        return f"{names[str(node)]} (node {node})"
    return "secure aggregate (all nodes)" if node == "secure-aggregate" else f"node {node}"


def per_site_series(results: dict, sites: list[str], phase: str | tuple[str, ...], key: str) -> dict[str, list[tuple[int, float]]]:
    """``{site: [(round, value), ...]}`` from a run's ``results.json`` content.

    ``phase`` is ``"train"`` or ``"evaluate"`` (what the nodes released; several phases: the
    largest value per round), or ``"central-sites"`` (the coordinator's exact scores on the
    data it holds, keyed by site name). Node releases are named ``sites[partition-id]``
    where the node reports a partition (simulation), else ``node <node ID>`` (deployment).
    """
    out: dict[str, list[tuple[int, float]]] = {}
    rounds = _rounds(results)
    if phase == "central-sites":
        for entry in rounds:
            for name, m in _dict(entry.get("central-sites")).items():
                if metric_value(m, key) is not None and _dict(m).get("num-examples", 1):
                    out.setdefault(name, []).append((entry["round"], float(metric_value(m, key))))
        return out
    if isinstance(phase, tuple):
        merged: dict[str, dict[int, float]] = {}
        for ph in phase:
            for name, pts in per_site_series(results, sites, ph, key).items():
                for rnd, v in pts:
                    merged.setdefault(name, {})[rnd] = max(v, merged.get(name, {}).get(rnd, v))
        return {name: sorted(d.items()) for name, d in merged.items()}
    names = node_names(results, sites)
    for entry in rounds:
        nodes = _dict(_dict(entry.get(phase)).get("nodes"))
        for node, m in nodes.items():
            if key not in _dict(m) or not _is_num(m[key]):
                continue
            name = names.get(str(node), f"node {node}")
            out.setdefault(name, []).append((entry["round"], float(m[key])))
    return out


#: Columns of a ledger's ``releases`` rows the report and the model card read, with the kind they must hold.
_LEDGER_COLUMNS = {"site": None, "run_id": None, "status": None, "noise_multiplier": "a number",
                   "sample_rate": "a number", "steps": "a number"}
#: The fix of a ledger file that cannot be read.
LEDGER_FIX = ("restore the ledger file from a backup or from the run's original folder (a node's ledger is its record of "
              "the privacy budget spent), or re-run the run")


def _ledger_rows(path: Path) -> list[dict]:
    """Every release row of one ledger file, read-only; :class:`ValueError` naming the problem when a row lacks a
    column or holds the wrong type (a ``sqlite3.Error`` when the file is not a ledger database)."""
    rows = []
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        con.row_factory = sqlite3.Row
        for r in con.execute("SELECT * FROM releases ORDER BY id"):
            d = dict(r)
            for col, kind in _LEDGER_COLUMNS.items():
                if col not in d:
                    raise ValueError(f"its releases table has no column {col}")
                if d[col] is None or (kind and not _is_num(d[col])):
                    raise ValueError(f"release row {d.get('id')}: column {col} holds "
                                     f"{'nothing' if d[col] is None else type(d[col]).__name__}, where "
                                     f"{kind or 'a value'} is expected")
            d.setdefault("mechanism", "dp-sgd")
            rows.append(d)
    finally:
        con.close()
    return rows


def read_ledger_files(folder: Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Every release row of the ledgers (``*.sqlite``) in ``folder``, read-only, and the ledgers that could not be read.

    Parameters
    ----------
    folder : Path
        A run folder's ``ledgers/``.

    Returns
    -------
    (list of dict, list of (Path, str))
        The rows (``[]`` when there is no such folder); each ledger file that exists but cannot be
        read (not a database, no ``releases`` table, a row of the wrong shape) with the problem in
        words. ``folder`` itself is listed when it exists but is not a folder. Rows of schema 1
        ledgers (no ``mechanism`` column) are DP-SGD releases.
    """
    rows: list[dict] = []
    bad: list[tuple[Path, str]] = []
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            bad.append((folder, "not a folder"))
        return rows, bad
    for path in sorted(folder.glob("*.sqlite")):
        try:
            rows += _ledger_rows(path)
        except (sqlite3.Error, ValueError, OSError) as exc:
            bad.append((path, str(exc) or type(exc).__name__))
    return rows, bad


def read_ledgers(folder: Path) -> list[dict]:
    """Every release row of the ledgers (``*.sqlite``) in ``folder``, read-only; [] when none.

    A ledger that cannot be read is logged and skipped (:func:`read_ledger_files` also says which).
    Rows of schema 1 ledgers (no ``mechanism`` column) are DP-SGD releases.
    """
    rows, bad = read_ledger_files(folder)
    for path, problem in bad:
        log.warning("report: ledger %s not read: %s", path, problem)
    return rows


def _ledger_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float | None:
    """Epsilon of ledger releases at ``delta`` by ``accountant`` (the one the node used last), None if it
    cannot be computed."""
    if not history or not _is_num(delta) or not 0 < delta < 1:
        return None
    try:
        try:
            from privacy.accounting import epsilon as composed
        except ImportError:  # a release without privacy.accounting: RDP only
            if accountant != "rdp":
                raise ValueError(f"accountant {accountant!r} is not available here") from None
            from privacy.ledger import rdp_epsilon

            return float(rdp_epsilon(history, float(delta)))
        return float(composed(history, float(delta), accountant))
    except Exception as exc:  # noqa: BLE001 - a report shows what it can
        log.warning("report: epsilon not computed from the ledger: %s: %s", type(exc).__name__, exc)
        return None


def ledger_summary(rows: list[dict], run_id) -> dict[str, dict]:
    """Per site: ``delta``, ``accountant``, ``mechanisms`` (per mechanism, this run: releases,
    steps, noise range, sample rates, epsilon of that mechanism alone), ``run-epsilon`` (all of
    this run's releases composed), ``lifetime-epsilon`` (every counted release of the ledger),
    ``aborted`` (releases started but not counted).
    """
    out: dict[str, dict] = {}
    by_site: dict[str, list[dict]] = {}
    for r in rows:
        by_site.setdefault(str(r.get("site")), []).append(r)
    for site, rs in sorted(by_site.items()):
        counted = [r for r in rs if r.get("status") in ("pending", "committed")]
        mine = [r for r in counted if str(r.get("run_id")) == str(run_id)]
        deltas = sorted({float(r["delta"]) for r in counted if _is_num(r.get("delta"))})
        delta = deltas[-1] if deltas else None
        acct = str(counted[-1].get("accountant") or "rdp") if counted else "rdp"  # the one in force at the last release

        def hist(rs_):
            return [(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])) for r in rs_]

        mechs = {}
        for mech in sorted({r["mechanism"] for r in mine}, key=lambda m: (m != "dp-sgd", m)):
            part = [r for r in mine if r["mechanism"] == mech]
            noise = [float(r["noise_multiplier"]) for r in part]
            mechs[mech] = {
                "releases": len(part), "steps": sum(int(r["steps"]) for r in part),
                "noise": (min(noise), max(noise)) if noise else None,
                "sample-rate": sorted({float(r["sample_rate"]) for r in part}),
                "replays": sum(1 for r in part if r.get("replay")),
                "epsilon": _ledger_epsilon(hist(part), delta, acct),
            }
        out[site] = {"delta": delta, "deltas": deltas, "accountant": [acct],
                     "mechanisms": mechs, "run-epsilon": _ledger_epsilon(hist(mine), delta, acct),
                     "lifetime-epsilon": _ledger_epsilon(hist(counted), delta, acct),
                     "aborted": sum(1 for r in rs if str(r.get("run_id")) == str(run_id) and r.get("status") == "aborted"),
                     "other-runs": len({str(r.get("run_id")) for r in counted} - {str(run_id)})}
    return out


def coordinator_audit(run_id) -> dict | None:
    """Verification of the coordinator's audit log named by ``$CITYFED_AUDIT_LOG`` (None where unset).

    Returns ``path``, ``ok``, ``entries``, ``reason``, ``signatures`` and the number of
    ``refused``/``excluded`` entries for ``run_id`` found in the log.
    """
    from privacy.audit import ENV_LOG

    path = os.environ.get(ENV_LOG)
    if not path or not Path(path).exists():
        return None
    from privacy.audit import verify

    pub = Path(path).parent / "audit.pub"
    try:
        res = verify(path, public_key_path=pub if pub.exists() else None)
    except Exception as exc:  # noqa: BLE001
        return {"path": path, "ok": False, "entries": 0, "reason": f"{type(exc).__name__}: {exc}", "signatures": False}
    counts = {"refused": 0, "excluded": 0}
    try:
        for line in Path(path).read_text().splitlines():
            e = json.loads(line)
            if e.get("kind") in counts and str(_dict(e.get("data")).get("run-id")) == str(run_id):
                counts[e["kind"]] += 1
    except (OSError, ValueError):
        pass
    return {"path": path, "ok": res.ok, "entries": res.entries, "reason": res.reason,
            "signatures": res.signatures_checked, **counts}


# --------------------------------------------------------------------------- plots
def literal(text) -> str:
    """``text`` for a matplotlib label, drawn as written: every ``$`` escaped, so none starts mathtext.

    Site names come from a department's file: ``cost $5 and $6`` was drawn as math, and
    ``$\\undefined$`` made the plot fail (left out of the report). A label starting with ``_``
    is kept as it is: the plots give their legends the handles themselves, because matplotlib
    leaves such a label out of a legend it collects.
    """
    return str(text).replace("$", r"\$")


def _plot(series: dict, title: str, ylabel: str, path: Path, xlabel: str = "round (number of completed rounds)",
          hline: tuple[float, str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    handles = []  # given to legend() itself: it would leave out a label starting with '_' (a site '_North')
    for name, pts in sorted(series.items()):
        pts = sorted(pts)
        handles += ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=literal(name))
    if hline is not None and series:
        handles.append(ax.axhline(hline[0], color="#8a1c17", linestyle="--", linewidth=1, label=hline[1]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title if series else f"{title}: no rounds completed", fontsize=10)
    ax.grid(alpha=0.3)
    if series:
        ax.xaxis.get_major_locator().set_params(integer=True)
    if 0 < len(series) <= 12:
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _round_times(results: dict) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for e in _rounds(results):
        for phase, label in (("train", "training (replies back)"), ("evaluate", "node evaluation")):
            s = _dict(e.get(phase)).get("seconds")
            if _is_num(s) and (phase == "train" or s > 0):
                out.setdefault(label, []).append((e["round"], float(s)))
    return out


def write_plots(results: dict, sites: list[str], metric: str, run_dir: Path) -> dict[str, str]:
    """Write the run's plots into ``run_dir``; returns ``{file name: caption}`` of those written.

    A plot that fails is logged and left out (the page says so).
    """
    plots: dict[str, str] = {}
    cfg = _dict(results.get("config"))
    central = per_site_series(results, sites, "central-sites", metric)
    released = per_site_series(results, sites, "evaluate", metric)
    ylabel = metric_label(metric, with_unit=False) + {"accuracy": " (fraction correct, 0–1)",
                                                      "mae-ratio": " (model MAE ÷ naive MAE)"}.get(metric, "")
    jobs = []
    if central or not released:
        jobs.append(("metric.png", central, f"{metric_label(metric, False)} per site, test split (coordinator-held data, exact)",
                     ylabel, None, f"{metric_label(metric)} of each round's global model on each site's test split, "
                                   "scored by the coordinator on data it holds."))
    else:
        jobs.append(("metric.png", released, f"{metric_label(metric, False)} per site (DP-noised node releases, accounted)",
                     ylabel, None, f"{metric_label(metric)} as each node released it (DP noise added, cost in its ledger)."))
    if central and released:
        jobs.append(("metric-dp.png", released, f"{metric_label(metric, False)} per site (DP-noised node releases, accounted)",
                     ylabel, None, "The nodes' own DP-noised releases of the same metric."))
    eps = per_site_series(results, sites, ("train", "evaluate"), "epsilon")
    target = cfg.get("target-epsilon") if cfg.get("dp") and _is_num(cfg.get("target-epsilon")) else None
    jobs.append(("epsilon.png", eps, "epsilon spent per site (node ledger, lifetime, all mechanisms)",
                 "ε (privacy loss, dimensionless)", (float(target), f"run target ε = {target:g}") if target else None,
                 "ε each node reported after each round: its ledger's lifetime total at its own δ."))
    times = _round_times(results)
    jobs.append(("round-time.png", times, "time per round", "time (s)", None,
                 "Seconds from sending the round's messages to the last reply (training; node evaluation where run)."))
    for fname, series, title, ylab, hline, caption in jobs:
        try:
            _plot(series, title, ylab, run_dir / fname, hline=hline)
            plots[fname] = caption
        except Exception as exc:  # noqa: BLE001 - a plot never fails the report
            log.error("report: %s not written in %s: %s: %s", fname, run_dir, type(exc).__name__, exc)
    return plots


def write_compare_plot(results: dict, metric: str, run_dir: Path) -> dict[str, str]:
    """``compare.png``: the headline metric per site and method (bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = compare_grid(results, metric)
        sites, methods = grid["sites"], grid["methods"]
        if not sites or not methods:
            return {}
        fig, ax = plt.subplots(figsize=(7.2, 3.8), dpi=110)
        width = 0.8 / len(methods)
        handles = []  # given to legend() itself: it would leave out a label starting with '_'
        for k, (key, label) in enumerate(methods):
            vals = [grid["values"].get((site, key), float("nan")) for site in sites]
            handles.append(ax.bar([i + k * width for i in range(len(sites))], vals, width, label=literal(label)))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sites))], [literal(s) for s in sites], fontsize=8)
        ax.set_xlabel("site (test split)")
        ax.set_ylabel(metric_label(metric, False) + {"accuracy": " (fraction correct, 0–1)",
                                                     "mae-ratio": " (model MAE ÷ naive MAE)"}.get(metric, ""))
        ax.set_title(f"{metric_label(metric, False)} per site and method", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=3, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        fig.savefig(run_dir / "compare.png")
        plt.close(fig)
        return {"compare.png": f"{metric_label(metric)} of each method on each site's test split."}
    except Exception as exc:  # noqa: BLE001
        log.error("report: compare.png not written in %s: %s: %s", run_dir, type(exc).__name__, exc)
        return {}


# --------------------------------------------------------------------------- run sections
def _safe(title: str, fn, *args) -> str:
    """``fn(*args)``; on any error a one-line note (logged) instead of the section."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - one bad field never loses the whole page
        log.error("report: section %r not rendered: %s: %s", title, type(exc).__name__, exc)
        return f'<h2>{esc(title)}</h2><p class="error">This section could not be rendered from results.json ' \
               f"({esc(type(exc).__name__)}: {esc(exc)}).</p>"


def section_summary(results: dict, ctx: dict) -> str:
    cfg, job = _dict(results.get("config")), _dict(results.get("job"))
    rounds = _rounds(results)
    done = results.get("rounds-completed")
    if not _is_num(done):
        done = sum(1 for e in rounds if _dict(e.get("train")).get("accepted"))
    total = cfg.get("num-rounds", job.get("num-rounds"))
    dp = cfg.get("dp", job.get("dp"))
    noise = cfg.get("noise-multiplier", job.get("noise-multiplier"))
    privacy = MISSING
    if dp is False:
        privacy = "off (no DP-SGD; the nodes' policy must allow it)"
    elif dp:
        if _is_num(noise) and noise >= 0:
            privacy = f"DP-SGD with fixed noise multiplier σ = {fmt_num(noise)}"
        else:
            privacy = f"DP-SGD calibrated by each node to target ε = {fmt_num(cfg.get('target-epsilon', job.get('target-epsilon')), 2)} for the whole run"
    secagg = cfg.get("secagg")
    sa = MISSING if secagg is None else (
        f"on (SecAgg+, {fmt_int(cfg.get('secagg-num-shares'))} shares, threshold {fmt_int(cfg.get('secagg-threshold'))})"
        if secagg else "off (the coordinator sees each node's DP-noised update)")
    timeout = cfg.get("round-timeout")
    pairs = [
        ("status", status_badge(results.get("status", "unknown"))),
        ("rounds", f"after {done} of {total if total is not None else '?'} rounds"),
        ("run ID", results.get("run_id")),
        ("department", cfg.get("department", job.get("department"))),
        ("model", cfg.get("model", job.get("model"))),
        ("strategy", cfg.get("strategy")),
        ("differential privacy", privacy),
        ("per-sample clipping norm", fmt_num(cfg.get("clipping-norm", job.get("clipping-norm")), 2)),
        ("secure aggregation", sa),
        ("central DP (published model)", central_dp_summary(cfg, results)),
        ("local training", f"{fmt_int(job.get('local-epochs', cfg.get('local-epochs')))} epoch(s) per round, "
                           f"batch size {fmt_int(job.get('batch-size', cfg.get('batch-size')))}, "
                           f"learning rate {fmt_num(job.get('lr', cfg.get('lr')), 4)}"),
        ("nodes per round", f"train: fraction {fmt_num(cfg.get('fraction-train'), 2)}, evaluate: fraction "
                            f"{fmt_num(cfg.get('fraction-evaluate'), 2)}; at least {fmt_int(cfg.get('min-accepted'))} "
                            "accepted update(s) per round"),
        ("round deadline", f"{fmt_num(timeout, 0)} s" if _is_num(timeout) else fmt_value(timeout)),
        ("central evaluation data", cfg.get("central-data") or "none (the coordinator holds no data)"),
        ("wall time of this launch", fmt_seconds(results.get("seconds"))),
    ]
    pairs = [(k, v) for k, v in pairs if v is not None]
    out = [f"<h2>Run</h2>{kv_table(pairs)}"]
    resumes = [r for r in _list(results.get("resumes")) if isinstance(r, dict)]
    if resumes:
        out.append(table(["resumed after round", "this launch's Flower run ID", "at (UTC)"],
                         [[num(fmt_int(r.get("after-round"))), r.get("flower-run-id"), r.get("at")] for r in resumes],
                         caption="Resumes: each launch that continued this run from its checkpoint (same run ID "
                                 "in the nodes' ledgers)"))
    if ctx.get("compare_link"):
        out.append(Html(f'<p class="note">Part of a comparison: <a href="{esc(ctx["compare_link"])}">'
                        "the comparison report</a>.</p>"))
    return "".join(out)


def section_plots(results: dict, ctx: dict) -> str:
    plots = ctx.get("plots") or {}
    if not plots:
        return '<h2>Plots</h2><p class="note">No plots were written (see the log).</p>'
    figs = "".join(f'<figure><img src="{esc(f)}" alt="{esc(c)}"><figcaption>{esc(c)}</figcaption></figure>'
                   for f, c in plots.items())
    return f"<h2>Plots</h2>{figs}"


def _events_in(results: dict, kind: str, rnd) -> list[dict]:
    return [r for r in _list(results.get(kind)) if isinstance(r, dict) and r.get("round") == rnd]


def section_rounds(results: dict, ctx: dict) -> str:
    rounds = sorted(_rounds(results), key=lambda e: e["round"])
    metric, names = ctx["metric"], ctx["names"]
    if not rounds:
        return '<h2>Rounds</h2><p class="note">No round completed.</p>'
    headers = ["round", "nodes asked", "updates accepted", "refused", "excluded", "no reply (dropped)",
               "training time", "training deadline", "evaluation time", f"{metric_label(metric, False)}, exact (coordinator)",
               f"{metric_label(metric, False)}, DP node releases (mean)", "max ε of a node", "reasons and notes"]
    rows = []
    for e in rounds:
        rnd, train, ev = e["round"], _dict(e.get("train")), _dict(e.get("evaluate"))
        refused, excluded = _events_in(results, "refused", rnd), _events_in(results, "excluded", rnd)
        dropped = [d for d in _events_in(results, "dropped", rnd)] or \
            [dict(d, stage="train") for d in _list(train.get("dropped")) if isinstance(d, dict)]
        ev_dropped = [d for d in _list(ev.get("dropped")) if isinstance(d, dict)]
        accepted = train.get("accepted")
        asked = _dict(train.get("secagg")).get("sampled")
        if asked is None and (train.get("nodes") is not None or accepted is not None):
            asked = len(_dict(train.get("nodes"))) + len(refused) + \
                len([x for x in excluded if x.get("node") != "secure-aggregate"]) + len(dropped)
        notes = []
        for r in refused:
            notes.append(f"refused: {_name(r.get('node'), names)}: {r.get('reason', MISSING)}")
        for r in excluded:
            notes.append(f"excluded: {_name(r.get('node'), names)}: {r.get('reason', MISSING)}")
        for d in dropped + [dict(d, stage="evaluate") for d in ev_dropped]:
            notes.append(f"no reply ({d.get('stage', 'train')} stage): {_name(d.get('node'), names)}: {d.get('reason', MISSING)}")
        for node, why in _dict(ev.get("declined")).items():
            notes.append(f"evaluation declined: {_name(node, names)}: {why}")
        for key, label in (("stopped", "run ended"), ("rejected", "secure aggregate rejected")):
            if train.get(key):
                notes.append(f"{label}: {train[key]}")
        if ev.get("skipped"):
            notes.append(str(ev["skipped"]))
        stages = _dict(train.get("stages"))
        if stages:
            notes.append("SecAgg+ stages: " + ", ".join(f"{k} {fmt_seconds(_dict(v).get('seconds'))}" for k, v in stages.items()))
        deadline = _dict(train.get("deadline")).get("seconds")
        central = metric_value(e.get("central"), metric)
        node_agg = metric_value(ev.get("aggregate"), metric)
        eps = [(_dict(_dict(e.get(p)).get("aggregate"))).get("epsilon-max") for p in ("train", "evaluate")]
        eps += [m.get("epsilon") for p in ("train", "evaluate") for m in _dict(_dict(e.get(p)).get("nodes")).values()
                if isinstance(m, dict)]
        eps = [v for v in eps if _is_num(v)]
        ev_s = ev.get("seconds")
        rows.append([num(str(rnd)), num(fmt_int(asked)), num(fmt_int(accepted)), num(fmt_int(len(refused))),
                     num(fmt_int(len(excluded))), num(fmt_int(len(dropped) + len(ev_dropped))),
                     num(fmt_seconds(train.get("seconds"))), num(fmt_seconds(deadline)),
                     num(fmt_seconds(ev_s) if _is_num(ev_s) and (ev_s > 0 or ev.get("nodes")) else "not run"),
                     num(fmt_num(central)), num(fmt_num(node_agg)), num(fmt_eps(max(eps)) if eps else MISSING),
                     reasons_list(notes)])
    initial = metric_value(_dict(results.get("initial")).get("central"), metric)
    cap = (f"{metric_label(metric)}; before round 1 the initial model scored {fmt_num(initial)}. "
           if _is_num(initial) else f"{metric_label(metric)}. ") + \
        "Times in seconds (s) from sending a round's messages to the last reply; ε is each node's lifetime total at its δ."
    return f"<h2>Rounds</h2>{table(*drop_empty_columns(headers, rows, keep=6), caption=cap)}"


def _site_rows(results: dict, ctx: dict) -> dict[str, dict]:
    """Per site (or node): last training/evaluation report, exact scores, records."""
    names, metric = ctx["names"], ctx["metric"]
    sites: dict[str, dict] = {}
    for e in sorted(_rounds(results), key=lambda e: e["round"]):
        for phase in ("train", "evaluate"):
            for node, m in _dict(_dict(e.get(phase)).get("nodes")).items():
                if not isinstance(m, dict):
                    continue
                name = names.get(str(node), f"node {node}")
                s = sites.setdefault(name, {"node": str(node)})
                s[phase] = m
                s[f"{phase}-round"] = e["round"]
                if _is_num(m.get("epsilon")):
                    s["epsilon"] = max(float(m["epsilon"]), s.get("epsilon", float("-inf")))
        for name, m in _dict(e.get("central-sites")).items():
            if isinstance(m, dict):
                sites.setdefault(name, {})["central"] = m
    # on-site personalisation after the last round: its reply carries the node's lifetime epsilon then
    for node, m in _dict(_dict(results.get("personalise")).get("nodes")).items():
        if isinstance(m, dict) and _is_num(m.get("epsilon")):
            s = sites.setdefault(names.get(str(node), f"node {node}"), {"node": str(node)})
            s["epsilon"] = max(float(m["epsilon"]), s.get("epsilon", float("-inf")))
    for name, m in _dict(_dict(results.get("initial")).get("central-sites")).items():
        if isinstance(m, dict):
            sites.setdefault(name, {})["initial"] = m
    return sites


def section_sites(results: dict, ctx: dict) -> str:
    metric = ctx["metric"]
    sites = _site_rows(results, ctx)
    if not sites:
        return '<h2>Sites</h2><p class="note">No site reported anything.</p>'
    cfg = _dict(results.get("config"))
    target = cfg.get("target-epsilon") if cfg.get("dp") else None
    better = _higher_is_better(metric)
    headers = ["site", "training records", "test records (coordinator)", f"{metric_label(metric, False)} before round 1",
               f"{metric_label(metric, False)} after the last round", "change (positive = better)",
               f"{metric_label(metric, False)}, last DP node release", "noise multiplier σ (last round)",
               "DP-SGD steps per round", "ε reported by the node", "δ (site)", "target ε (run)"]
    rows = []
    ledgers = ctx.get("ledgers") or {}
    for name, s in sorted(sites.items()):
        train, ev = _dict(s.get("train")), _dict(s.get("evaluate"))
        before, after = metric_value(s.get("initial"), metric), metric_value(s.get("central"), metric)
        change = None
        if _is_num(before) and _is_num(after):
            change = (after - before) if better else (before - after)
        rows.append([name, num(fmt_int(train.get("num-examples"))), num(fmt_int(_dict(s.get("central")).get("num-examples"))),
                     num(fmt_num(before)), num(fmt_num(after)), num(("+" if _is_num(change) and change > 0 else "") + fmt_num(change)),
                     num(fmt_num(metric_value(ev, metric))), num(fmt_num(train.get("noise-multiplier"))),
                     num(fmt_int(train.get("steps"))), num(fmt_eps(s.get("epsilon"))),
                     num(fmt_delta(_dict(ledgers.get(name)).get("delta"))), num(fmt_eps(target) if target is not None else "no DP")])
    cap = (f"{metric_label(metric)}. Records: training records the node reported (as its policy rounds counts) and "
           "the test split the coordinator scored. ε: the largest value the node reported (its ledger's lifetime "
           "total, all mechanisms). δ is each site's own (from its ledger; — where the ledger stays on the node).")
    return f"<h2>Sites</h2>{table(*drop_empty_columns(headers, rows, keep=2), caption=cap)}"


def central_dp_summary(cfg: dict, results: dict) -> str | None:
    """One line on the coordinator's central DP of the published model (run config ``central-dp``); None when off."""
    if not cfg.get("central-dp"):
        return None
    total = _dict(results.get("central-dp"))
    return (f"on: noise multiplier {fmt_num(cfg.get('central-noise-multiplier'))}, update clipping norm "
            f"{fmt_num(cfg.get('central-clipping-norm'))}, δ {fmt_delta(cfg.get('central-delta'))}; "
            f"ε {fmt_eps(total.get('epsilon'))} after {fmt_int(total.get('rounds'))} round(s)")


def central_dp_table(results: dict) -> str:
    """The coordinator's central-DP accountant (run config ``central-dp``) per round, as its own mechanism; "" when off."""
    cfg = _dict(results.get("config"))
    if not cfg.get("central-dp"):
        return ""
    rows = []
    for e in sorted(_rounds(results), key=lambda e: e["round"]):
        c = _dict(_dict(e.get("train")).get("central-dp"))
        if c:
            asked = c.get("nodes-asked")  # results of before 2026-12-07: the mean of those that arrived
            rows.append([num(str(e["round"])), num(fmt_int(c.get("contributors"))),
                         num(fmt_int(asked) if asked is not None else "-"), num(fmt_num(c.get("noise-multiplier"))),
                         num(fmt_num(c.get("clipping-norm"))), num(fmt_num(c.get("noise-std"), 4)),
                         num(fmt_num(c.get("sample-rate"), 2)), num(fmt_delta(c.get("delta"))), num(fmt_eps(c.get("epsilon")))])
    total = _dict(results.get("central-dp"))
    cap = ("Central DP of the published model (the coordinator's Gaussian noise on the sum of the nodes' clipped "
           "updates over the nodes asked, each node weighing 1; user level: one node's whole participation). ε after "
           "each round, all launches of the run "
           f"({str(total.get('accountant') or cfg.get('central-accountant') or 'rdp').upper()}"
           f"{', ' + fmt_eps(total.get('epsilon')) + ' in total' if _is_num(total.get('epsilon')) else ''}). "
           "A separate mechanism from the nodes' own ε above: it protects the model against its users, not a node "
           "against the coordinator, and is the coordinator's claim (nodes record it as claimed).")
    return "<h3>Central DP (coordinator)</h3>" + (table(
        ["round", "updates arrived", "nodes asked W", "noise multiplier z", "clipping norm C", "noise std (z·C/W)",
         "node sampling rate q", "δ (central)", "ε (central, after the round)"], rows, caption=cap) if rows else
        f'<p class="note">{esc(cap)} No round was aggregated under central DP.</p>')


def section_privacy(results: dict, ctx: dict) -> str:
    return _section_privacy(results, ctx) + central_dp_table(results)


def _unreadable_note(ctx: dict) -> str:
    """The page's warning naming each ledger file that exists but could not be read ('' when none)."""
    bad = ctx.get("unreadable-ledgers") or []
    if not bad:
        return ""
    items = "".join(f"<li><code>{esc(p)}</code>: {esc(problem)}</li>" for p, problem in bad)
    return (f'<p class="note"><span class="status bad">{len(bad)} ledger file(s) could not be read</span>: their sites\' '
            f"ε and δ from the ledger are not shown here (the ledgers are not missing: they are damaged). Fix: "
            f"{esc(LEDGER_FIX)}.</p><ul>{items}</ul>")


def _section_privacy(results: dict, ctx: dict) -> str:
    ledgers = ctx.get("ledgers") or {}
    cfg = _dict(results.get("config"))
    target = cfg.get("target-epsilon") if cfg.get("dp") else None
    note = _unreadable_note(ctx)
    if not ledgers:
        sites = _site_rows(results, ctx)
        rows = []
        for name, s in sorted(sites.items()):
            train, ev = _dict(s.get("train")), _dict(s.get("evaluate"))
            if "epsilon" not in train and "epsilon" not in ev:
                continue
            rows.append([name, num(fmt_eps(train.get("epsilon"))), num(fmt_int(s.get("train-round"))),
                         num(fmt_eps(ev.get("epsilon"))), num(fmt_int(s.get("evaluate-round"))),
                         "yes" if "loss" in train else "no", num(fmt_eps(target) if target is not None else "no DP")])
        body = table(["site / node", "ε after its last DP-SGD release (incl. any loss release)", "in round",
                      "ε after its last evaluation release", "in round", "training loss released", "target ε (run)"],
                     rows, caption="ε as reported by each node (lifetime, all mechanisms composed).") if rows else \
            '<p class="note">No node reported ε.</p>'
        if note:
            return f"<h2>Privacy per site and mechanism</h2>{note}<p class=\"note\">Below is what the nodes reported with their replies.</p>{body}"
        return ("<h2>Privacy per site and mechanism</h2><p class=\"note\">The nodes' ledgers are not in this run folder "
                "(in deployment they stay on the department machines): ε and δ per mechanism are in each node's "
                "ledger and audit log (<code>fl-client audit show --kind release</code>). Below is what the nodes "
                f"reported with their replies.</p>{body}")
    headers = ["site", "mechanism", "releases (this run)", "steps", "noise multiplier σ", "sampling rate q",
               "δ", "ε of this mechanism alone", "target ε (run)"]
    rows, totals = [], set()
    for site, s in sorted(ledgers.items()):
        for mech, m in s["mechanisms"].items():
            lo_hi = m.get("noise")
            noise = MISSING if not lo_hi else fmt_num(lo_hi[0]) if lo_hi[0] == lo_hi[1] else \
                f"{fmt_num(lo_hi[0])}–{fmt_num(lo_hi[1])}"
            q = ", ".join(f"{x:.4g}" for x in m.get("sample-rate") or []) or MISSING
            label = MECHANISM_LABELS.get(mech, mech) + (f" ({m['replays']} replayed)" if m.get("replays") else "")
            rows.append([site, label, num(fmt_int(m["releases"])), num(fmt_int(m["steps"])), num(noise), num(q),
                         num(fmt_delta(s["delta"])), num(fmt_eps(m["epsilon"])), num(MISSING)])
        totals.add(len(rows))
        acct = "/".join(a.upper() for a in s.get("accountant") or ["rdp"])
        rows.append([site, f"all mechanisms, this run (composed, {acct})",
                     num(fmt_int(sum(m["releases"] for m in s["mechanisms"].values()))),
                     num(fmt_int(sum(m["steps"] for m in s["mechanisms"].values()))), num(""), num(""),
                     num(fmt_delta(s["delta"])), num(fmt_eps(s["run-epsilon"])),
                     num(fmt_eps(target) if target is not None else "no DP")])
        if s.get("other-runs"):
            totals.add(len(rows))
            rows.append([site, f"lifetime: this run and {s['other-runs']} earlier run(s)", num(""), num(""), num(""),
                         num(""), num(fmt_delta(s["delta"])), num(fmt_eps(s["lifetime-epsilon"])), num("")])
    cap = ("From the nodes' ledgers in this run folder (read-only), recomputed with the ledgers' accountant "
           f"({', '.join(sorted({a for s in ledgers.values() for a in s['accountant']}))}) at each site's δ. "
           "ε is dimensionless; δ is a probability.")
    return f"<h2>Privacy per site and mechanism</h2>{note}{table(headers, rows, caption=cap, total_rows=totals)}"


def section_audit(results: dict, ctx: dict) -> str:
    cfg = _dict(results.get("config"))
    target = cfg.get("target-epsilon") if cfg.get("dp") and _is_num(cfg.get("target-epsilon")) else None
    ledgers, sites = ctx.get("ledgers") or {}, _site_rows(results, ctx)
    out = ["<h2>Audit</h2>"]
    rows, over = [], 0
    for name in sorted(set(sites) | set(ledgers)):
        s, led = sites.get(name, {}), ledgers.get(name)
        reported = s.get("epsilon")
        run_eps = led.get("run-epsilon") if led else None
        checks = []
        if led and _is_num(reported) and _is_num(led.get("lifetime-epsilon")):
            same = abs(reported - led["lifetime-epsilon"]) <= 1e-6 * max(1.0, abs(reported))
            checks.append("ledger matches the reported ε" if same else
                          f"ledger ε {fmt_eps(led['lifetime-epsilon'])} differs from the reported {fmt_eps(reported)}")
        basis = run_eps if _is_num(run_eps) else reported
        if target is None:
            verdict = Html('<span class="status warn">no DP target (DP off)</span>')
        elif not _is_num(basis):
            verdict = Html('<span class="status warn">no ε reported</span>')
        elif basis <= target + 1e-9:
            verdict = Html('<span class="status ok">within target</span>')
        else:
            over += 1
            what = "this run's ε" if _is_num(run_eps) else "the reported lifetime ε (may include earlier runs)"
            verdict = Html(f'<span class="status bad">over target</span> {esc(what)} exceeds it by {esc(fmt_eps(basis - target))}')
        no_ledger = "ledger unreadable (see Privacy)" if ctx.get("unreadable-ledgers") else "ledger on the node"
        rows.append([name, num(fmt_eps(reported)), num(fmt_eps(run_eps) if led else no_ledger),
                     num(fmt_eps(target) if target is not None else MISSING), verdict, reasons_list(checks)])
    if rows:
        verdict = "every site is within the run's target ε" if target is not None and not over else \
            f"{over} site(s) over the run's target ε" if over else "no DP target to check"
        out.append(table(["site / node", "ε reported (lifetime)", "ε of this run (ledger)", "target ε", "budget check",
                          "ledger check"], rows, caption=f"Privacy budget: {verdict}."))
    audit = ctx.get("audit")
    if audit:
        ok = Html(f'<span class="status {"ok" if audit.get("ok") else "bad"}">'
                  f'{"verified" if audit.get("ok") else "NOT VERIFIED"}</span>')
        out.append(kv_table([("coordinator audit log", audit.get("path")), ("result", ok),
                             ("entries checked", fmt_int(audit.get("entries"))),
                             ("signatures checked", "yes" if audit.get("signatures") else "no (no audit.pub beside the log)"),
                             ("what was checked", audit.get("reason")),
                             ("this run's refusals / exclusions in the log",
                              f"{fmt_int(audit.get('refused'))} of {len(_list(results.get('refused')))} refusal(s), "
                              f"{fmt_int(audit.get('excluded'))} of {len(_list(results.get('excluded')))} exclusion(s)")],
                            caption="Coordinator audit log (hash chain, signatures, head file), checked when this "
                                    "report was written"))
    else:
        out.append('<p class="note">Coordinator audit log: not checked here (simulations write none; in deployment '
                   "run <code>fl-server audit verify</code>). Each node's ledger and signed audit log stay on the node "
                   "(<code>fl-client audit verify</code>).</p>")
    return "".join(out)


def section_events(results: dict, ctx: dict) -> str:
    names = ctx["names"]
    out = []
    refused = [r for r in _list(results.get("refused")) if isinstance(r, dict)]
    out.append("<h2>Refusals</h2>" + (table(
        ["round", "site / node", "code", "reason"],
        [[num(fmt_int(r.get("round"))), _name(r.get("node"), names), num(fmt_value(r.get("code"))), r.get("reason")]
         for r in refused], caption="Nodes that declined a training job (their policy or budget): nothing left the node.")
        if refused else '<p class="note">None: no node refused a job.</p>'))
    excluded = [r for r in _list(results.get("excluded")) if isinstance(r, dict)]
    out.append("<h2>Exclusions</h2>" + (table(
        ["round", "site / node", "reason"],
        [[num(fmt_int(r.get("round"))), _name(r.get("node"), names), r.get("reason")] for r in excluded],
        caption="Replies the coordinator did not aggregate (failed validation).")
        if excluded else '<p class="note">None: every reply that arrived passed validation.</p>'))
    dropped = [d for d in _list(results.get("dropped")) if isinstance(d, dict)]
    for e in _rounds(results):
        for d in _list(_dict(e.get("evaluate")).get("dropped")):
            if isinstance(d, dict):
                dropped.append({"round": e["round"], "stage": "evaluate", **d})
    out.append("<h2>No reply (dropped, incl. SecAgg+ stages)</h2>" + (table(
        ["round", "stage", "site / node", "reason"],
        [[num(fmt_int(d.get("round"))), d.get("stage", "train"), _name(d.get("node"), names), d.get("reason")]
         for d in sorted(dropped, key=lambda d: (d.get("round") or 0))],
        caption="Nodes that missed an exchange's deadline or dropped out; the round went on with the others.")
        if dropped else '<p class="note">None: every asked node replied in time.</p>'))
    return "".join(out)


def render_run_page(results: dict, sites: list[str], metric: str, *, plots: dict[str, str] | None = None,
                    ledgers: dict | None = None, audit: dict | None = None, compare_link: str | None = None,
                    unreadable_ledgers: list[tuple[Path, str]] | None = None) -> str:
    """The HTML page of one run from its ``results.json`` content (pure: no files read).

    ``plots`` maps image file names to captions, ``ledgers`` is :func:`ledger_summary`'s result
    (keyed by site), ``audit`` :func:`coordinator_audit`'s, ``unreadable_ledgers``
    :func:`read_ledger_files`' ledgers that exist but could not be read (named on the page, never
    shown as absent).
    """
    results = _dict(results)
    ctx = {"metric": metric, "names": node_names(results, sites), "plots": plots or {}, "ledgers": ledgers or {},
           "audit": audit, "compare_link": compare_link, "unreadable-ledgers": list(unreadable_ledgers or [])}
    cfg = _dict(results.get("config"))
    title = f"cityfed run report: {cfg.get('department', 'unknown department')}"
    body = "".join(_safe(t, fn, results, ctx) for t, fn in (
        ("Run", section_summary), ("Plots", section_plots), ("Rounds", section_rounds), ("Sites", section_sites),
        ("Privacy per site and mechanism", section_privacy), ("Audit", section_audit),
        ("Refusals, exclusions and drops", section_events)))
    return _page(title, f"run {results.get('run_id', MISSING)}", body)


def _page(title: str, subtitle: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}: {esc(subtitle)}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><p class=\"note\">{esc(subtitle)}</p>{body}</body></html>")


# --------------------------------------------------------------------------- compare
def is_compare(results: dict) -> bool:
    """Whether ``results`` is an ``fl-sim compare`` summary (``meta``, ``summary``, ``rows``)."""
    return isinstance(results, dict) and "rows" in results and isinstance(results.get("meta"), dict)


def _method_key(r: dict) -> tuple[str, float | None]:
    return (str(r.get("method")), r.get("epsilon") if _is_num(r.get("epsilon")) else None)


def _method_label(key: tuple[str, float | None]) -> str:
    m, eps = key
    base = METHOD_LABELS.get(m, m)
    return f"{base} at ε = {eps:g}" if eps is not None else base


def compare_grid(results: dict, metric: str) -> dict:
    """``sites`` (not pooled), ``methods`` [(key, label)], ``values`` {(site, key): metric},
    ``spent`` {(site, key): epsilon}, ``n`` {site: test records}."""
    rows = [r for r in _list(results.get("rows")) if isinstance(r, dict) and r.get("site") != "refusals"]
    sites, methods, values, spent, n = [], [], {}, {}, {}
    for r in rows:
        key = _method_key(r)
        if key[0] == "pooled":
            continue
        if key not in [k for k, _ in methods]:
            methods.append((key, _method_label(key)))
        site = str(r.get("site"))
        m = _dict(r.get("metrics"))
        if site != "pooled" and site not in sites:
            sites.append(site)
        if metric_value(m, metric) is not None:
            values[(site, key)] = float(metric_value(m, metric))
        if _is_num(r.get("epsilon_spent")):
            spent[(site, key)] = float(r["epsilon_spent"])
        if _is_num(m.get("num-examples")):
            n[site] = m["num-examples"]
    return {"sites": sites, "methods": methods, "values": values, "spent": spent, "n": n}


def render_compare_page(results: dict, metric: str, *, plots: dict[str, str] | None = None,
                        run_links: dict[str, str] | None = None) -> str:
    """The HTML page of an ``fl-sim compare`` folder (pure). ``run_links``: {method label: href}."""
    results = _dict(results)
    meta = _dict(results.get("meta"))

    def summary_section(results, ctx):
        fed = _dict(meta.get("federated"))
        pairs = [("department", meta.get("department")), ("model", meta.get("model")), ("seed", fmt_value(meta.get("seed"))),
                 ("engine", meta.get("engine")),
                 ("DP targets compared", ", ".join(f"ε = {e:g}" for e in _list(meta.get("epsilons")) if _is_num(e)) or MISSING),
                 ("federated training", f"{fmt_int(fed.get('num-rounds'))} rounds × {fmt_int(fed.get('local-epochs'))} local "
                                        f"epoch(s), batch size {fmt_int(fed.get('batch-size'))}, learning rate "
                                        f"{fmt_num(fed.get('lr'), 4)}, strategy {fed.get('strategy', MISSING)}"),
                 ("wall time", fmt_seconds(meta.get("seconds")))]
        out = [f"<h2>Comparison</h2>{kv_table(pairs)}"]
        per_run = _dict(meta.get("seconds_per_run"))
        if per_run:
            links = run_links or {}
            out.append(table(["run", "wall time", "report"],
                             [[k, num(fmt_seconds(v)),
                               Html(f'<a href="{esc(links[k])}">{esc(links[k])}</a>') if k in links else MISSING]
                              for k, v in per_run.items()], caption="Federated runs (each has its own report)"))
        return "".join(out)

    def methods_section(results, ctx):
        summ = [s for s in _list(results.get("summary")) if isinstance(s, dict)]
        if not summ:
            return '<h2>Methods</h2><p class="note">No summary in results.json.</p>'
        keys = [k for k in summ[0] if k not in ("method", "epsilon", "epsilon_spent_max")]
        for s in summ[1:]:
            keys += [k for k in s if k not in keys and k not in ("method", "epsilon", "epsilon_spent_max")]
        labels = {"min-site-accuracy": "lowest site accuracy (fraction, 0–1)",
                  "mae-vs-pooled": "MAE ÷ pooled model's MAE (mean over sites; lower is better)",
                  "mae-vs-naive": "MAE ÷ naive MAE (mean over sites; lower is better)"}
        headers = ["method", "target ε", "largest ε spent by a site"] + [labels.get(k, metric_label(k)) for k in keys]
        rows = [[_method_label(_method_key(s)), num(fmt_eps(s.get("epsilon")) if _is_num(s.get("epsilon")) else "no DP"),
                 num(fmt_eps(s.get("epsilon_spent_max")))] + [num(fmt_num(s.get(k))) for k in keys] for s in summ]
        return f"<h2>Methods</h2>{table(headers, rows, caption='Scores on the pooled test set (all sites test splits).')}"

    def sites_section(results, ctx):
        grid = compare_grid(results, metric)
        local = ("local", None)
        if not grid["sites"]:
            return '<h2>Per site</h2><p class="note">No per-site rows in results.json.</p>'
        fed_keys = [(k, lab) for k, lab in grid["methods"] if k[0] != "local"]
        better = _higher_is_better(metric)
        headers = ["site", "test records", metric_label(metric, False)]
        groups = [("", 2), ("local-only", 1)]
        for k, lab in fed_keys:
            headers += [metric_label(metric, False), "gain vs local-only"]
            if k[1] is not None:
                headers.append("ε spent")
            groups.append((lab, 3 if k[1] is not None else 2))
        rows = []
        pooled = ["pooled"] if any(site == "pooled" for site, _ in grid["values"]) else []
        for site in grid["sites"] + pooled:
            lv = grid["values"].get((site, local))
            row = [site if site != "pooled" else "all sites (pooled test set)", num(fmt_int(grid["n"].get(site))),
                   num(fmt_num(lv))]
            for k, _ in fed_keys:
                v = grid["values"].get((site, k))
                # DP methods are compared with local-only DP at the same epsilon where the comparison has it
                ref = grid["values"].get((site, ("local", k[1])), lv) if k[1] is not None else lv
                gain = (v - ref if better else ref - v) if _is_num(v) and _is_num(ref) else None
                row += [num(fmt_num(v)), num(("+" if _is_num(gain) and gain > 0 else "") + fmt_num(gain))]
                if k[1] is not None:
                    row.append(num(fmt_eps(grid["spent"].get((site, k)))))
            rows.append(row)
        cap = (f"{metric_label(metric)}. Gain = federated − local-only (DP runs: local-only with DP at the same ε "
               "where the comparison ran it)"
               f"{'' if better else ' with the sign flipped (lower is better)'}: positive means the site gains by "
               "federating. ε spent: what the site's ledger reported (dimensionless).")
        return f"<h2>Per site: local-only vs federated</h2>{table(headers, rows, caption=cap, groups=groups)}"

    def value_section(results, ctx):
        value = _dict(results.get("per_site"))
        entries = [e for e in _list(value.get("sites")) if isinstance(e, dict)]
        if not entries:
            return ""
        m = str(value.get("metric", metric))
        eps_keys = list(_dict(entries[0].get("dp")))
        # which model a node kept without DP (the fine-tuned federated one, or its own-records candidate)
        show_kept = any(e.get("kept") for e in entries)
        headers = ["site", "local-only", "federated", "personalised", "gain"] + (["kept"] if show_kept else [])
        groups = [("", 1), ("no DP: " + metric_label(m, False), 4 + show_kept)]
        for k in eps_keys:
            headers += ["local-only", "federated", "personalised", "gain"]
            groups.append((f"DP at ε = {k}", 4))
        headers.append("leave-one-out contribution")
        groups.append(("", 1))

        def cells(d):
            d = _dict(d)
            g = d.get("gain-personalised")
            return [num(fmt_num(d.get("local"))), num(fmt_num(d.get("federated"))), num(fmt_num(d.get("personalised"))),
                    num(("+" if _is_num(g) and g > 0 else "") + fmt_num(g))]

        rows = []
        for e in entries:
            row = [e.get("site")] + cells(e) + ([str(e.get("kept") or MISSING)] if show_kept else [])
            for k in eps_keys:
                row += cells(_dict(e.get("dp")).get(k))
            row.append(num(fmt_num(e.get("loo-contribution"))))
            rows.append(row)
        worst = _dict(value.get("worst-site"))
        worst_dp = _dict(value.get("worst-site-dp"))
        lines = [f"Worst site (no DP): {esc(worst.get('site', MISSING))}, gain {fmt_num(worst.get('gain'))}."]
        lines += [f"Worst site at ε = {esc(k)}: {esc(_dict(w).get('site', MISSING))}, gain {fmt_num(_dict(w).get('gain'))}."
                  for k, w in worst_dp.items()]
        cap = (f"{metric_label(m)} of each site's model on its own test split. Gain = personalised vs local-only "
               f"({value.get('gain', '')}); positive = the site gains. Leave-one-out contribution: "
               f"{value.get('loo-note') or MISSING}; mean over the other sites of how much worse they do without "
               "this site (accuracy points, or relative MAE increase): positive = the site helps the others."
               + (" Kept: which model the node kept without DP, chosen on its own validation split: federated = "
                  "fine-tuned from the federated model, own = trained on its own records alone (fl-sim compare "
                  "trains it with the local-only baseline's seed and settings, so it scores as local-only), average = the mean of those two models' predictions." if show_kept else ""))
        return (f"<h2>Per-site value: local-only, federated, personalised</h2>"
                f"{table(headers, rows, caption=cap, groups=groups)}<p>{' '.join(lines)}</p>")

    def plots_section(results, ctx):
        return section_plots(results, {"plots": plots or {}}) if plots else ""

    def refusals_section(results, ctx):
        refusals = [(r, x) for r in _list(results.get("rows")) if isinstance(r, dict) and r.get("site") == "refusals"
                    for x in _list(r.get("refused")) if isinstance(x, dict)]
        if not refusals:
            return '<h2>Refusals</h2><p class="note">None: no node refused a job in any run.</p>'
        return "<h2>Refusals</h2>" + table(["run", "round", "node", "reason"],
                                           [[_method_label(_method_key(r)), num(fmt_int(x.get("round"))),
                                             f"node {x.get('node')}", x.get("reason")] for r, x in refusals])

    body = "".join(_safe(t, fn, results, {}) for t, fn in (
        ("Comparison", summary_section), ("Plots", plots_section), ("Methods", methods_section),
        ("Per site", sites_section), ("Per-site value", value_section), ("Refusals", refusals_section)))
    return _page(f"cityfed comparison: {meta.get('department', 'unknown department')}",
                 "pooled vs local-only vs federated vs DP-federated (fl-sim compare)", body)


# --------------------------------------------------------------------------- entry points
def write_report(run_dir: Path, sites: list[str], metric: str) -> Path:
    """Write the plots (``metric.png``, ``epsilon.png``, ``round-time.png``...) and ``report.html``.

    Parameters
    ----------
    run_dir : Path
        Folder holding the run's ``results.json`` (a run's, or an ``fl-sim compare`` folder's).
    sites : list of str
        Site names by partition ID (simulation); ``[]`` in deployment (nodes are named by ID,
        the coordinator's central scores by the site names in its data).
    metric : str
        Headline metric (:func:`metric_for`).

    Returns
    -------
    Path
        ``run_dir/report.html``.

    Raises
    ------
    OSError, ValueError
        ``results.json`` cannot be read or parsed, or the page cannot be written. Anything
        else (a plot, a ledger, one section) is logged and left out of the page.
    """
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    if is_compare(results):
        plots = write_compare_plot(results, metric, run_dir)
        links = {}
        for k in _dict(_dict(results.get("meta")).get("seconds_per_run")):
            if (run_dir / str(k) / "report.html").exists():
                links[str(k)] = f"{k}/report.html"
        page = render_compare_page(results, metric, plots=plots, run_links=links)
    else:
        results = _dict(results)
        plots = write_plots(results, sites, metric, run_dir)
        ledgers, unreadable = {}, []
        try:
            folder = run_dir / "ledgers"
            if not folder.exists() and _dict(results.get("config")).get("ledger-dir"):
                folder = Path(results["config"]["ledger-dir"])
            rows, unreadable = read_ledger_files(folder)
            for path, problem in unreadable:
                log.warning("report: ledger %s not read: %s", path, problem)
            ledgers = ledger_summary(rows, results.get("run_id"))
        except Exception as exc:  # noqa: BLE001
            log.error("report: ledgers not summarised in %s: %s: %s", run_dir, type(exc).__name__, exc)
        try:
            audit = coordinator_audit(results.get("run_id"))
        except Exception as exc:  # noqa: BLE001
            log.error("report: audit log not checked: %s: %s", type(exc).__name__, exc)
            audit = None
        parent = run_dir.parent / "results.json"
        link = None
        try:
            if parent.exists() and is_compare(json.loads(parent.read_text())):
                link = "../report.html"
        except (OSError, ValueError):
            pass
        page = render_run_page(results, sites, metric, plots=plots, ledgers=ledgers, audit=audit, compare_link=link,
                               unreadable_ledgers=unreadable)
    from server.artefacts import write_atomic

    out = run_dir / "report.html"
    write_atomic(out, page.encode("utf-8"))  # an earlier page is replaced only by a complete one
    return out


def write_report_safely(run_dir: Path, sites: list[str], metric: str) -> Path | None:
    """:func:`write_report`, but a failure is logged and returns None: a report never fails a run."""
    try:
        return write_report(run_dir, sites, metric)
    except Exception as exc:  # noqa: BLE001
        log.error("report.html not written in %s: %s: %s", run_dir, type(exc).__name__, exc)
        return None


def write_run_report(run_dir: Path) -> Path:
    """:func:`write_report` for a deployment run folder (metric from its department, nodes named by ID)."""
    results = json.loads((Path(run_dir) / "results.json").read_text())
    return write_report(run_dir, [], metric_for(_dict(_dict(results).get("config")).get("department")))
