"""What the operator console shows: its data sources and its HTML pages (:mod:`server.console` serves them).

:class:`Sources` reads what the CLI reads, on request (:func:`server.cli.list_nodes`,
:func:`server.cli.list_runs`, ``flwr log``, run folders' ``results.json`` or, while a run goes
on, its checkpoint's history, the coordinator's audit log); :class:`Pages` renders them as
HTML without any script: tables, inline SVG plots (:func:`svg_chart`), every value escaped.
Access control, routes and the server are in :mod:`server.console`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flower_compat.logging import plain
from server import cli
from server.launches import read_results
from server.report import (MISSING, Html, esc, fmt_eps, fmt_int, fmt_num, fmt_seconds, metric_for, metric_label,
                           per_site_series, status_badge, table)

if TYPE_CHECKING:
    from server.console import Guard

log = logging.getLogger(__name__)

MODEL_CARDS = ("model_card.json", "model_card.md", "model-card.json", "model-card.md")
#: Flower run statuses of a run that is not over (the stop button is shown).
LIVE = ("pending", "starting", "running")
#: Entries of the audit log shown on the audit page.
AUDIT_LAST = 200
#: Bytes of a run's log shown (its end).
LOG_TAIL = 200_000


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:80em;margin:1em auto;padding:0 1em;
color:#1d232a;line-height:1.4}
header{display:flex;gap:1.5em;align-items:baseline;border-bottom:2px solid #dde3ea;padding-bottom:.3em}
header a{color:#1d4f91;text-decoration:none;font-weight:600}header .brand{font-size:1.3em;color:#1d232a}
header form.logout{margin-left:auto}header form.logout button{font:inherit;color:#1d4f91;background:none;border:1px solid #dde3ea;border-radius:4px;cursor:pointer}
h1{font-size:1.45em;margin:.6em 0 .2em}h2{font-size:1.15em;margin-top:1.4em;border-bottom:1px solid #dde3ea}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
th,td{border:1px solid #cfd6de;padding:3px 8px;vertical-align:top}th{background:#eef2f6;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
caption{caption-side:top;text-align:left;color:#52606d;font-size:.9em;padding-bottom:.2em}
.status{display:inline-block;padding:1px 8px;border-radius:4px;font-weight:600}
.ok{background:#dff3e4;color:#17612c}.warn{background:#fff1d6;color:#7a4d00}.bad{background:#fde2e1;color:#8a1c17}
.note{color:#52606d;font-size:.9em}.error{color:#8a1c17;background:#fde2e1;padding:.4em .6em;border-radius:4px}
.flash{background:#dff3e4;padding:.4em .6em;border-radius:4px}
figure{display:inline-block;vertical-align:top;margin:.4em 1.5em .4em 0}figcaption{color:#52606d;font-size:.85em;max-width:36em}
svg text{font-family:inherit}pre{background:#f6f8fa;padding:.6em;overflow:auto;max-height:40em;font-size:.82em}
progress{width:8em}form.stop{margin:.6em 0;padding:.5em .8em;border:1px solid #e6b8b5;background:#fdf3f2;display:inline-block}
button{font-weight:600}.nowrap,td a{white-space:nowrap}
"""

#: Line colours of the plots (colour-blind safe, Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


# --------------------------------------------------------------------------- sources


@dataclass
class Sources:
    """What the pages show, read from the coordinator and the run folders on request.

    The coordinator's answers (``flwr`` through :mod:`server.cli`) are cached ``cache_s``
    seconds; run folders' results and checkpoints are cached until their file changes.
    """

    state_dir: Path
    runs_dir: Path
    cache_s: float = 3.0
    _cache: dict = field(default_factory=dict)
    _files: dict = field(default_factory=dict)
    _problems: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _cached(self, key: str, fn):
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and now - hit[0] < self.cache_s:
                return hit[1]
        try:
            value = (fn(), None)
        except cli.CliError as exc:
            value = (None, str(exc))
        with self._lock:
            self._cache[key] = (now, value)
        return value

    def forget(self) -> None:
        """Drop the cached coordinator answers (after a stop)."""
        with self._lock:
            self._cache.clear()

    def nodes(self) -> tuple[list[dict] | None, str | None]:
        """``(nodes, error)``: :func:`server.cli.list_nodes`, or the reason it failed."""
        return self._cached("nodes", lambda: cli.list_nodes(self.state_dir))

    def runs(self) -> tuple[list[dict] | None, str | None]:
        """``(runs, error)``: :func:`server.cli.list_runs`, or the reason it failed."""
        return self._cached("runs", lambda: cli.list_runs(self.state_dir, self.runs_dir))

    def launches(self) -> list[dict]:
        """Every run folder's ``launch.json`` (with ``folder``), as ``fl-server runs`` finds them."""
        return cli._launches(self.runs_dir)

    def run_log(self, run_id: str) -> tuple[str | None, str | None]:
        """``(log, error)``: the ServerApp log of a Flower run (``fl-server logs``)."""
        return self._cached(f"log:{run_id}", lambda: cli.flwr(self.state_dir, "log", str(run_id), cli.CONNECTION,
                                                            "--show", timeout=60))

    def _file_cached(self, path: Path, reader):
        try:
            st = path.stat()
        except OSError:
            return None
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._files:
                return self._files[key]
        problem = None
        try:
            value = reader(path)
        except Exception as exc:  # noqa: BLE001 - a damaged file reads as None, is logged and named by damaged()
            log.warning("console: %s not readable: %s: %s", path, type(exc).__name__, exc)
            value, problem = None, str(exc) if isinstance(exc, (OSError, ValueError)) else type(exc).__name__
        with self._lock:
            self._files = {k: v for k, v in self._files.items() if k[0] != str(path)}
            self._files[key] = value
            self._problems[str(path)] = problem
        return value

    def damaged(self, path: Path) -> str | None:
        """Why ``path`` (e.g. a run's ``results.json``) could not be read when last read, or None."""
        with self._lock:
            return self._problems.get(str(path))

    def results(self, launch: dict) -> tuple[dict | None, str]:
        """A run folder's results and where they come from.

        Returns
        -------
        (dict or None, str)
            ``results.json`` when it belongs to the folder's latest launch (``"results.json"``);
            else a results-like dict from the checkpoint's history while the run goes on
            (``"checkpoint"``: ``rounds``, ``refused``, ``excluded``, ``dropped``, the launch's
            config, ``rounds-completed``); ``(None, "none")`` when neither exists.
        """
        folder = self.runs_dir / launch["folder"]
        res = self._file_cached(folder / "results.json", read_results)  # a damaged one: None, logged
        launched = launch.get("launched") or []
        if isinstance(res, dict):
            written = (folder / "results.json").stat().st_mtime
            if not launched or written >= datetime_ts(launched[-1]) - 2:
                return res, "results.json"
        from server.artefacts import CHECKPOINT
        from server.strategy import load_checkpoint

        ckpt = self._file_cached(folder / CHECKPOINT, lambda p: {k: v for k, v in load_checkpoint(p).items() if k != "arrays"})
        if isinstance(ckpt, dict):
            hist = dict(ckpt.get("history") or {})
            return ({**hist, "config": {**cli._app_defaults(), **launch.get("config", {})},
                     "rounds-completed": ckpt.get("round"), "status": None}, "checkpoint")
        if isinstance(res, dict):
            return res, "results.json (an earlier launch's)"
        return None, "none"

    def reported_epsilon(self) -> dict[str, dict]:
        """``{node ID: {"epsilon", "folder", "round"}}``: the epsilon each node reported last.

        From the train and evaluate replies in every run folder's results (latest by the
        exchange's start time). It is what the node said (its ledger's lifetime total at its
        own delta): the coordinator cannot verify it.
        """
        out: dict[str, dict] = {}
        for launch in self.launches():
            res, _ = self.results(launch)
            for entry in (res or {}).get("rounds") or []:
                if not isinstance(entry, dict):
                    continue
                for phase in ("train", "evaluate"):
                    ph = entry.get(phase) if isinstance(entry.get(phase), dict) else {}
                    started = ph.get("started") if isinstance(ph.get("started"), (int, float)) else 0.0
                    for node, m in (ph.get("nodes") or {}).items():
                        eps = m.get("epsilon") if isinstance(m, dict) else None
                        if not isinstance(eps, (int, float)) or isinstance(eps, bool):
                            continue
                        key = (started, entry.get("round") or 0)
                        if str(node) not in out or key >= out[str(node)]["_key"]:
                            out[str(node)] = {"epsilon": float(eps), "folder": launch["folder"],
                                              "round": entry.get("round"), "_key": key}
        return out

    def audit(self) -> dict:
        """The coordinator's audit log: ``path``, ``exists``, ``verified`` (ok, reason, signatures)
        and its last :data:`AUDIT_LAST` ``entries``."""
        from privacy.audit import ENV_LOG, AuditError, verify

        path = Path(os.environ.get(ENV_LOG) or cli.audit_paths(self.state_dir)[0])
        if not path.exists():
            return {"path": str(path), "exists": False}
        pub = path.parent / "audit.pub"

        def read(p: Path) -> dict:
            try:
                res = verify(p, public_key_path=pub if pub.exists() else None)
                verified = {"ok": res.ok, "reason": res.reason, "signatures": res.signatures_checked,
                            "entries": res.entries}
            except AuditError as exc:
                verified = {"ok": False, "reason": str(exc), "signatures": False, "entries": 0}
            entries = []
            for line in p.read_text(errors="replace").splitlines()[-AUDIT_LAST:]:
                try:
                    e = json.loads(line)
                except ValueError:
                    e = {"kind": "(unreadable line)", "data": {}}
                entries.append(e if isinstance(e, dict) else {"kind": "(unreadable line)", "data": {}})
            return {"verified": verified, "entries": entries}

        got = self._file_cached(path, read) or {"verified": {"ok": False, "reason": "not readable"}, "entries": []}
        return {"path": str(path), "exists": True, **got}


def datetime_ts(iso: str) -> float:
    """POSIX time of an ISO 8601 string (0 when it is not one)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return 0.0


# --------------------------------------------------------------------------- plots


def _short(name: str, n: int = 32) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def svg_chart(series: dict[str, list[tuple[int, float]]], title: str, ylabel: str, *,
              hline: tuple[float, str] | None = None, width: int = 600, height: int = 280) -> Html:
    """A line chart of ``{name: [(round, value), ...]}`` as inline SVG (no script, no external file).

    Each point is a ``<circle>`` with ``data-series``, ``data-round`` and ``data-value`` (the
    value as stored) and a ``<title>`` tooltip; ``hline`` draws a dashed reference line.
    """
    left, right, top, bottom = 58, 210, 28, 40
    pw, ph = width - left - right, height - top - bottom
    pts = [(r, v) for s in series.values() for r, v in s]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{esc(title)}">',
             f'<text x="{left}" y="16" font-size="13" font-weight="600">{esc(title)}</text>']
    if not pts:
        parts.append(f'<text x="{left}" y="{top + ph / 2:.0f}" font-size="12" fill="#52606d">no rounds completed yet</text></svg>')
        return Html("".join(parts))
    xs = [r for r, _ in pts]
    ys = [v for _, v in pts] + ([hline[0]] if hline else [])
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.08
    y0, y1 = y0 - pad, y1 + pad

    def X(r: float) -> float:
        return left + (pw / 2 if x1 == x0 else (r - x0) / (x1 - x0) * pw)

    def Y(v: float) -> float:
        return top + ph - (v - y0) / (y1 - y0) * ph

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fbfcfd" stroke="#cfd6de"/>')
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#e3e8ee"/>'
                     f'<text x="{left - 6}" y="{Y(v) + 4:.1f}" font-size="10" text-anchor="end">{esc(f"{v:.3g}")}</text>')
    step = max(1, (x1 - x0) // 10 or 1)
    for r in range(x0, x1 + 1, step):
        parts.append(f'<text x="{X(r):.1f}" y="{top + ph + 14}" font-size="10" text-anchor="middle">{r}</text>')
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle">round</text>'
                 f'<text x="12" y="{top + ph / 2:.0f}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + ph / 2:.0f})">{esc(ylabel)}</text>')
    if hline:
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(hline[0]):.1f}" y2="{Y(hline[0]):.1f}" '
                     f'stroke="#8a1c17" stroke-dasharray="5 4"/>')
    for i, (name, s) in enumerate(sorted(series.items())):
        colour = PALETTE[i % len(PALETTE)]
        s = sorted(s)
        line = " ".join(f"{X(r):.1f},{Y(v):.1f}" for r, v in s)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{line}"/>')
        for r, v in s:
            parts.append(f'<circle cx="{X(r):.1f}" cy="{Y(v):.1f}" r="3.5" fill="{colour}" data-series="{esc(name)}" '
                         f'data-round="{int(r)}" data-value="{esc(repr(float(v)))}"><title>{esc(name)}, round {int(r)}: '
                         f'{esc(f"{v:.4g}")}</title></circle>')
        ly = top + 10 + i * 16
        if ly < top + ph:
            parts.append(f'<rect x="{left + pw + 10}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>'
                         f'<text x="{left + pw + 24}" y="{ly + 1}" font-size="11">{esc(_short(name))}</text>')
    if hline:
        ly = top + 10 + len(series) * 16
        parts.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 20}" y1="{ly - 3}" y2="{ly - 3}" stroke="#8a1c17" '
                     f'stroke-dasharray="3 2"/><text x="{left + pw + 24}" y="{ly + 1}" font-size="11">{esc(hline[1])}</text>')
    parts.append("</svg>")
    return Html("".join(parts))


# --------------------------------------------------------------------------- page parts


def _ago(iso) -> str:
    """``2026-12-03 14:00:00 UTC (5 min ago)`` of an ISO time; the text as it is otherwise."""
    if not iso or iso == "N/A":
        return MISSING
    ts = datetime_ts(str(iso).replace(" ", "T")) or datetime_ts(str(iso))
    if not ts:
        return str(iso)
    from datetime import datetime, timezone

    d = max(0.0, time.time() - ts)
    rel = f"{d:.0f} s" if d < 120 else f"{d / 60:.0f} min" if d < 7200 else f"{d / 3600:.1f} h" if d < 172800 else f"{d / 86400:.0f} days"
    return f"{datetime.fromtimestamp(ts, timezone.utc):%Y-%m-%d %H:%M:%S} UTC ({rel} ago)"


def _badge(status: str | None) -> Html:
    s = str(status or "unknown")
    kind = "ok" if s in ("online", "running", "finished:completed", "completed") else \
        "bad" if ("failed" in s or s in ("offline", "unregistered")) else "warn"
    return Html(f'<span class="status {kind}">{esc(s)}</span>')


def _progress(done, planned) -> Html:
    try:
        d, p = int(done or 0), int(planned)
    except (TypeError, ValueError):
        return Html(esc(fmt_int(done)))
    return Html(f'<span class="nowrap"><progress value="{min(d, p)}" max="{max(p, 1)}"></progress> {d} of {p}</span>')


def _error(text: str | None) -> str:
    return f'<p class="error">{esc(text)}</p>' if text else ""


def _done(res: dict | None) -> int:
    rounds = [e.get("round") for e in (res or {}).get("rounds") or [] if isinstance(e, dict)]
    nums = [int(r) for r in rounds if isinstance(r, (int, float))]
    done = max(nums) if nums else 0
    rc = (res or {}).get("rounds-completed")
    return max(done, int(rc)) if isinstance(rc, (int, float)) else done


def energy_of(res: dict) -> dict:
    """The run's energy summary: results.json's ``energy`` where written, else summed from its rounds."""
    from server.energy import summarise

    e = res.get("energy")
    return e if isinstance(e, dict) and isinstance(e.get("nodes"), dict) else summarise(res)


def fmt_joules(j) -> str:
    """``840 J``, ``12.3 kJ (3.4 Wh)``; "—" for None."""
    if not isinstance(j, (int, float)) or isinstance(j, bool):
        return MISSING
    if j < 1000:
        return f"{j:.3g} J"
    return f"{j / 1000:.3g} kJ ({j / 3600:.3g} Wh)"


def _model_cards(folder: Path) -> list[str]:
    return [n for n in MODEL_CARDS if (folder / n).is_file()]


class Pages:
    """HTML of the console's pages (no script; every value escaped)."""

    def __init__(self, src: Sources, guard: Guard, refresh: int = 10):
        self.src, self.guard, self.refresh = src, guard, refresh

    def page(self, title: str, body: str, *, live: bool = False) -> str:
        meta = f'<meta http-equiv="refresh" content="{int(self.refresh)}">' if live and self.refresh > 0 else ""
        return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{esc(title)} · cityfed console</title>{meta}"
                '<link rel="stylesheet" href="/console.css"></head><body>'
                '<header><span class="brand">cityfed operator console</span><a href="/">overview</a>'
                '<a href="/nodes">nodes</a><a href="/runs">runs</a><a href="/audit">audit log</a>'
                '<form method="post" action="/logout" class="logout"><button type="submit">log out</button></form>'
                '</header>'
                f"{body}<p class=\"note\">Coordinator state {esc(self.src.state_dir)} · runs {esc(self.src.runs_dir)} · "
                f"page made {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
                f"{f' · reloads every {int(self.refresh)} s while a run is live' if meta else ''}</p></body></html>")

    # -- nodes -------------------------------------------------------------------------
    def nodes_table(self) -> str:
        nodes, err = self.src.nodes()
        eps = self.src.reported_epsilon()
        if err:
            return _error(f"nodes: the coordinator did not answer: {err}")
        rows = []
        for n in nodes or []:
            nid = str(n.get("node-id"))
            status = n.get("status")
            seen = "now (connected)" if status == "online" else _ago(n.get("offline-at"))
            e = eps.get(nid)
            where = Html(f'<a href="/runs/{esc(e["folder"])}">{esc(e["folder"])}</a>, round {esc(fmt_int(e["round"]))}') \
                if e else MISSING
            rows.append([nid, n.get("name") or MISSING, _badge(status), _ago(n.get("online-at")), seen,
                         ("num", fmt_eps(e["epsilon"])) if e else MISSING, where, n.get("fingerprint") or MISSING])
        if not rows:
            return '<p class="note">No department node registered (fl-server register).</p>'
        return table(["node ID", "name", "status", "online since", "last seen", "ε spent, as reported by the node",
                      "reported in", "key fingerprint"], rows,
                     caption="Department nodes (as fl-server nodes). ε is what each node reported in its last reply: "
                             "its own ledger's lifetime total at its own δ. The coordinator cannot verify it; the "
                             "node's ledger is the record.")

    def nodes_page(self) -> str:
        return self.page("nodes", "<h1>Department nodes</h1>" + self.nodes_table())

    # -- runs --------------------------------------------------------------------------
    def run_rows(self) -> tuple[list[dict], str | None]:
        """One dict per run folder (and per Flower run without one), newest first."""
        flwr_runs, err = self.src.runs()
        by_id = {str(r.get("run-id")): r for r in flwr_runs or [] if str(r.get("run-id") or "")}
        rows, seen = [], set()
        for launch in self.src.launches():
            ids = [str(r) for r in launch.get("run-ids", [])]
            rid = ids[-1] if ids else ""
            fr = by_id.get(rid, {})
            seen.update(ids)
            res, source = self.src.results(launch)
            cfg = {**cli._app_defaults(), **launch.get("config", {})}
            bad = launch.get("unreadable")  # a malformed launch.json: its runs and settings are not known
            status = fr.get("status") or ("unknown" if err or bad else "not known to the coordinator")
            rows.append({"folder": launch["folder"], "run-id": rid, "run-ids": ids,
                         "department": None if bad else cfg.get("department"), "status": status,
                         "result": f"{cli.UNREADABLE}: {bad}" if bad else fr.get("result", ""), "elapsed": fr.get("elapsed"),
                         "done": _done(res), "planned": cfg.get("num-rounds"), "launched": (launch.get("launched") or [""])[-1],
                         "results": res, "source": source, "launch": launch})
        for rid, fr in by_id.items():
            if rid not in seen:
                rows.append({"folder": "", "run-id": rid, "status": fr.get("status"), "result": "", "elapsed": fr.get("elapsed"),
                             "done": None, "planned": None, "launched": fr.get("pending-at", ""), "department": None})
        rows.sort(key=lambda r: str(r.get("launched") or ""), reverse=True)
        return rows, err

    def runs_table(self) -> str:
        rows, err = self.run_rows()
        out = _error(f"runs: the coordinator did not answer ({err}); the run folders are shown as they are on disk"
                     if err else None)
        if not rows:
            return out + '<p class="note">No run yet (fl-server run).</p>'
        cells = []
        for r in rows:
            name = Html(f'<a href="/runs/{esc(r["folder"])}">{esc(r["folder"])}</a>') if r["folder"] else MISSING
            elapsed = fmt_seconds(r["elapsed"]) if isinstance(r.get("elapsed"), (int, float)) else MISSING
            cells.append([name, r["run-id"] or MISSING, r.get("department") or MISSING, _badge(r["status"]),
                          r.get("result") or MISSING, _progress(r["done"], r["planned"]) if r["planned"] else MISSING,
                          ("num", elapsed), ("num", fmt_joules(energy_of(r.get("results") or {})["total-j"])),
                          _ago(r["launched"]) if r["launched"] else MISSING])
        return out + table(["run folder", "run ID", "department", "status (Flower)", "result", "rounds done",
                            "elapsed", "energy (nodes)", "launched"], cells,
                           caption="Runs (as fl-server runs): status is Flower's; result is the run's own outcome.")

    def runs_page(self) -> str:
        rows, _ = self.run_rows()
        return self.page("runs", "<h1>Runs</h1>" + self.runs_table(), live=any(r["status"] in LIVE for r in rows))

    def overview(self) -> str:
        rows, _ = self.run_rows()
        audit = self.src.audit()
        return self.page("overview", "<h1>Overview</h1><h2>Runs</h2>" + self.runs_table()
                         + "<h2>Department nodes</h2>" + self.nodes_table()
                         + "<h2>Coordinator audit log</h2>" + self.audit_summary(audit),
                         live=any(r["status"] in LIVE for r in rows))

    def run_page(self, folder: str, flash: str | None = None) -> str | None:
        rows, err = self.run_rows()
        r = next((x for x in rows if x["folder"] == folder), None)
        if r is None:
            return None
        res, source = r["results"] or {}, r["source"]
        cfg = {**cli._app_defaults(), **(res.get("config") or {}), **r["launch"].get("config", {})}
        metric = metric_for(cfg.get("department"))
        labels = {f"node {k}": f"{v.get('name')} (node {k})" for k, v in cli._node_labels(self.src.state_dir).items()
                  if isinstance(v, dict) and v.get("name")}
        relabel = lambda s: {labels.get(k, k): v for k, v in s.items()}  # noqa: E731
        central = per_site_series(res, [], "central-sites", metric)
        released = relabel(per_site_series(res, [], "evaluate", metric))
        eps = relabel(per_site_series(res, [], ("train", "evaluate"), "epsilon"))
        target = cfg.get("target-epsilon") if cfg.get("dp") and isinstance(cfg.get("target-epsilon"), (int, float)) else None
        ylabel = metric_label(metric, with_unit=False)
        body = [f"<h1>Run {esc(folder)}</h1>"]
        if flash:
            body.append(f'<p class="flash">{esc(flash)}</p>')
        body.append(_error(f"the coordinator did not answer: {err}" if err else None))
        bad = r["launch"].get("unreadable")
        body.append(_error(f"{folder}/launch.json: {cli.UNREADABLE} ({bad}); the folder's Flower run IDs and settings "
                           "are not known. Fix: restore it, or move the folder out of the runs folder" if bad else None))
        fdir = self.src.runs_dir / folder
        damaged = self.src.damaged(fdir / "results.json") if (fdir / "results.json").exists() else None
        unknown = "unknown: results.json is damaged (see above)" if damaged and source == "none" else None
        body.append(_error(f"{folder}/results.json: damaged ({damaged}); " + (
            "the run's rounds, refusals and exclusions are not known" if unknown else
            "the figures below come from the run's checkpoint") + ". Fix: restore results.json from a backup copy; "
            "the coordinator's audit log (audit log page) still lists the run's refusals and exclusions" if damaged else None))
        links = [f'<a href="/runs/{esc(folder)}/log">ServerApp log</a>']
        if (fdir / "report.html").is_file():
            links.append(f'<a href="/runs/{esc(folder)}/report.html">run report</a>')
        if (fdir / "results.json").is_file():
            links.append(f'<a href="/runs/{esc(folder)}/results.json">results.json</a>')
        if (fdir / "results.json").is_file():
            links.append(f'<a href="/runs/{esc(folder)}/model-card">model card</a>')
        links += [f'<a href="/runs/{esc(folder)}/{esc(n)}">exported model card ({esc(n)})</a>' for n in _model_cards(fdir)]
        body.append("<p>" + " · ".join(links) + "</p>")
        from server.report import central_dp_summary, central_dp_table, kv_table

        body.append(kv_table([
            ("status (Flower)", _badge(r["status"])), ("result", r.get("result") or MISSING),
            ("run's own status", status_badge(res.get("status")) if res.get("status") else MISSING),
            ("rounds done", _progress(r["done"], r["planned"]) if r["planned"] else MISSING),
            ("Flower run IDs (first to latest)", ", ".join(r["run-ids"]) or MISSING),
            ("department", cfg.get("department") or MISSING), ("strategy", cfg.get("strategy") or MISSING),
            ("secure aggregation (SecAgg+)", "on" if cfg.get("secagg") else "off"),
            ("DP-SGD", f"on, target ε {fmt_eps(target)} per site for the run" if target else ("on" if cfg.get("dp") else "off")),
            ("central DP (published model)", central_dp_summary(cfg, res) or "off"),
            ("figures from", unknown or {"results.json": "results.json (the run's final record)",
                                         "checkpoint": "the run's checkpoint (live: rounds completed so far)"}.get(source, source)),
        ], caption="Run"))
        if r["status"] in LIVE:
            body.append(f'<form class="stop" method="post" action="/runs/{esc(folder)}/stop">'
                        f'<input type="hidden" name="csrf" value="{esc(self.guard.csrf(folder))}">'
                        '<label><input type="checkbox" name="confirm" value="yes" required> stop this run now '
                        '(its results are written from its last completed round; <code>fl-server run --resume</code> '
                        'continues it)</label> <button type="submit">Stop run</button></form>')
        body.append("<h2>Metrics per site</h2>")
        figs = []
        if central:
            figs.append((svg_chart(central, f"{ylabel} per site (coordinator-held test data, exact)", ylabel),
                         f"{metric_label(metric)}: the global model of each round scored by the coordinator on the data it holds."))
        if released:
            figs.append((svg_chart(released, f"{ylabel} per site (node releases, DP-noised where the policy says)", ylabel),
                         f"{metric_label(metric)} as each node released it after evaluating (noised and accounted "
                         "in its ledger where its policy asks for DP releases)."))
        figs.append((svg_chart(eps, "ε reported per site", "ε", hline=(float(target), f"target ε {target:g}") if target else None),
                     "ε each node reported after each round (its ledger's lifetime total, as reported: not verified by "
                     "the coordinator)."))
        body += [f"<figure>{svg}<figcaption>{esc(cap)}</figcaption></figure>" for svg, cap in figs]
        body.append(self._sites_table(res, metric, labels, unknown))
        body.append(central_dp_table({**res, "config": cfg}))  # "" when the run has no central DP
        body.append(f"<h2>Energy</h2>{_error(unknown)}" if unknown else self._energy(res, labels))
        body.append(self._rounds_table(res, labels))
        body.append(self._events(res, labels, unknown))
        return self.page(f"run {folder}", "".join(body), live=r["status"] in LIVE)

    @staticmethod
    def _node(node, labels: dict) -> str:
        if node == "secure-aggregate":
            return "secure aggregate (all nodes)"
        return labels.get(f"node {node}", f"node {node}") if node is not None else MISSING

    def _sites_table(self, res: dict, metric: str, labels: dict, unknown: str | None = None) -> str:
        rounds = [e for e in res.get("rounds") or [] if isinstance(e, dict)]
        if not rounds:
            return f"<h2>Sites</h2><p class=\"note\">{esc(unknown or 'No round completed yet.')}</p>"
        last = rounds[-1]
        rows = []
        nodes = {**((last.get("evaluate") or {}).get("nodes") or {}), **((last.get("train") or {}).get("nodes") or {})}
        for node in sorted(nodes, key=str):
            tr = ((last.get("train") or {}).get("nodes") or {}).get(node) or {}
            ev = ((last.get("evaluate") or {}).get("nodes") or {}).get(node) or {}
            e = [m.get("epsilon") for m in (tr, ev) if isinstance(m.get("epsilon"), (int, float))]
            rows.append([self._node(node, labels), ("num", fmt_int(tr.get("num-examples"))),
                         ("num", fmt_num(ev.get(metric, ev.get(metric.replace("-", "_"))), 3)),
                         ("num", fmt_eps(max(e)) if e else MISSING), ("num", fmt_num(tr.get("noise-multiplier"), 3))])
        out = table(["site / node", "training records", f"{metric_label(metric, False)}, node release",
                     "ε reported", "noise multiplier"], rows,
                    caption=f"Each node's reply in the last round (round {last.get('round')}).")
        central = last.get("central-sites") or {}
        if central:
            crow = [[site, ("num", fmt_int(m.get("num-examples"))), ("num", fmt_num(m.get(metric), 3))]
                    for site, m in sorted(central.items()) if isinstance(m, dict)]
            out += table(["site", "test records", f"{metric_label(metric, False)}, exact"], crow,
                         caption=f"Coordinator-held test data per site, after round {last.get('round')}.")
        return "<h2>Sites</h2>" + out

    def _energy(self, res: dict, labels: dict) -> str:
        e = energy_of(res)
        if not e["nodes"]:
            return ('<h2>Energy</h2><p class="note">No node reported its energy: a node sends it only when its '
                    'privacy policy opts in (<code>[releases] energy = "sent"</code>; not a DP release), and not '
                    "with CITYFED_ENERGY=off on the node or from nodes of an earlier version.</p>")
        rows = [[self._node(nid, labels), ("num", fmt_joules(n["train-j"])), ("num", fmt_joules(n["evaluate-j"])),
                 ("num", fmt_joules(n["joules"])), "; ".join(n["methods"])]
                for nid, n in sorted(e["nodes"].items(), key=lambda kv: str(kv[0]))]
        rows.append(["all nodes (run)", MISSING, MISSING, ("num", fmt_joules(e["total-j"])), MISSING])
        return "<h2>Energy</h2>" + table(
            ["site / node", "training", "evaluation", "total", "method"], rows, total_rows={len(rows) - 1},
            caption="Energy of the nodes' train and evaluate tasks as each node reported it (measured with RAPL/NVML "
                    "where the node's machine exposes them, else estimated from its process CPU time × a stated "
                    "power per core: the method column says which). The coordinator's own process is not counted.")

    def _rounds_table(self, res: dict, labels: dict) -> str:
        rounds = [e for e in res.get("rounds") or [] if isinstance(e, dict)]
        if not rounds:
            return ""
        refused = [x for x in res.get("refused") or [] if isinstance(x, dict)]
        excluded = [x for x in res.get("excluded") or [] if isinstance(x, dict)]
        dropped = [x for x in res.get("dropped") or [] if isinstance(x, dict)]
        rows = []
        for e in rounds:
            tr = e.get("train") or {}
            n = lambda xs: sum(1 for x in xs if x.get("round") == e.get("round"))  # noqa: E731
            rows.append([("num", fmt_int(e.get("round"))), ("num", fmt_int(len(tr.get("nodes") or {}))),
                         ("num", fmt_int(tr.get("accepted"))), ("num", fmt_int(n(refused))), ("num", fmt_int(n(excluded))),
                         ("num", fmt_int(n(dropped))), ("num", fmt_seconds(tr.get("seconds")))])
        return "<h2>Rounds</h2>" + table(["round", "replies", "updates accepted", "refused", "excluded", "no reply",
                                          "training time"], rows)

    def _events(self, res: dict, labels: dict, unknown: str | None = None) -> str:
        """Refusals, exclusions and missed replies; ``unknown`` (why the record is not known) replaces "None"."""
        out = []
        for key, title, none in (("refused", "Refusals", "None: no node refused a job."),
                                 ("excluded", "Exclusions", "None: every reply that arrived passed validation."),
                                 ("dropped", "No reply (missed deadlines, dropped)", "None: every asked node replied in time.")):
            items = [x for x in res.get(key) or [] if isinstance(x, dict)]
            out.append(f"<h2>{esc(title)}</h2>")
            if not items:
                out.append(_error(unknown) if unknown else f'<p class="note">{esc(none)}</p>')
                continue
            out.append(table(["round", "site / node", "stage", "reason"],
                             [[("num", fmt_int(x.get("round"))), self._node(x.get("node"), labels), x.get("stage") or "train",
                               str(x.get("reason") or MISSING)] for x in items]))
        return "".join(out)

    def card_page(self, folder: str) -> str | None:
        """The run's model card, made now from its folder (as ``fl-server export`` writes it into a package)."""
        fdir = self.src.runs_dir / folder
        if folder not in {d["folder"] for d in self.src.launches()}:
            return None
        body = f'<h1>Model card of {esc(folder)}</h1><p><a href="/runs/{esc(folder)}">back to the run</a></p>'
        from serving.package import PackageError, card_markdown, model_card, read_run_results, run_model_config

        if not (fdir / "results.json").exists():
            return self.page(f"model card {folder}", body + _error(
                "no model card: no results.json yet: the run has not ended"))
        try:
            # as fl-server export reads the folder: a damaged results.json, launch.json or ledger is named
            # with the field and a fix (PackageError), never shown as an exception name
            results = read_run_results(fdir)
            mc = run_model_config(results, fdir / "results.json").model_dump(mode="json")
            card = model_card(fdir, results, sites=[], model_config=mc, made_by="fl-server console")
        except PackageError as exc:
            log.warning("console: model card of %s not made: %s", folder, exc)
            return self.page(f"model card {folder}", body + _error(f"no model card: {exc}"))
        except Exception as exc:  # noqa: BLE001 - the page says what is missing
            log.warning("console: model card of %s not made: %s: %s", folder, type(exc).__name__, exc)
            return self.page(f"model card {folder}", body + _error(
                f"no model card: an unexpected {type(exc).__name__} (the console's log has the message); fix: export "
                f"the run with fl-server export RUN -o DIR, which names what is wrong"))
        body += ('<p class="note">Made now from the run folder (results.json, ledgers where present). '
                 "<code>fl-server export RUN -o DIR</code> writes the same card into a model package, with the "
                 "weights and a manifest of hashes.</p>")
        return self.page(f"model card {folder}", body + f"<pre>{esc(card_markdown(card))}</pre>")

    def log_page(self, folder: str) -> str | None:
        rows, _ = self.run_rows()
        r = next((x for x in rows if x["folder"] == folder), None)
        if r is None:
            return None
        text, err = self.src.run_log(r["run-id"]) if r["run-id"] else (None, "no Flower run ID in launch.json")
        body = f'<h1>ServerApp log of {esc(folder)} (run {esc(r["run-id"])})</h1><p><a href="/runs/{esc(folder)}">back to the run</a></p>'
        if err:
            body += _error(err)
        else:
            text = plain(text or "")  # a log stored with Flower's colour codes (runs before the fix) reads as text
            cut = len(text) > LOG_TAIL
            body += (f'<p class="note">last {LOG_TAIL:,} characters</p>' if cut else "") + f"<pre>{esc(text[-LOG_TAIL:])}</pre>"
        return self.page(f"log {folder}", body, live=r["status"] in LIVE)

    # -- audit -------------------------------------------------------------------------
    def audit_summary(self, audit: dict) -> str:
        if not audit.get("exists"):
            return f'<p class="note">No coordinator audit log at {esc(audit["path"])} (made by fl-server start).</p>'
        v = audit["verified"]
        sig = "signatures checked against audit.pub" if v.get("signatures") else "chain only: no audit.pub beside the log"
        badge = Html(f'<span class="status {"ok" if v.get("ok") else "bad"}">{"verified" if v.get("ok") else "NOT VERIFIED"}</span>')
        return Html(f'<p>{badge} {esc(audit["path"])} ({esc(fmt_int(v.get("entries")))} entries checked; {esc(sig)}). '
                    f'{esc(v.get("reason") or "")} <a href="/audit">entries</a></p>')

    def audit_page(self) -> str:
        from privacy.audit_cli import summarize

        audit = self.src.audit()
        body = "<h1>Coordinator audit log</h1>" + self.audit_summary(audit)
        if audit.get("exists"):
            rows = [[("num", fmt_int(e.get("seq"))), str(e.get("time", ""))[:19].replace("T", " "), str(e.get("kind", "")),
                     summarize(e["data"] if isinstance(e.get("data"), dict) else {"?": e.get("data")}, 240)]
                    for e in reversed(audit.get("entries") or [])]
            body += table(["seq", "time (UTC)", "kind", "data"], rows,
                          caption=f"Latest {AUDIT_LAST} entries, newest first (fl-server audit show; export for whole entries).")
        return self.page("audit log", body)
