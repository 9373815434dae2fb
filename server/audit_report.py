"""The readable page of an empirical privacy audit (``fl-sim audit``): ``OUT/report.html``.

Reads ``OUT/audit.json`` (written by :func:`simulations.mia.run_audit`) and shows, per privacy
setting, the epsilon lower bound the attack proves next to the epsilon the ledger accounted,
the attack's AUC and true-positive rates at low false-positive rates, for the real records and
for the canaries, and the verdict: whether the non-private control leaked clearly enough for
the audit to test anything, and whether any DP bound exceeds its ledger epsilon (a defect).

The table cells come from :mod:`server.report`'s formatters, so the page looks like the run and
compare reports (no raw JSON).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from server.report import Html, _page, esc, fmt_delta, fmt_eps, fmt_int, fmt_num, kv_table, num, table

log = logging.getLogger("cityfed.server")

#: False-positive rates whose true-positive rate the page shows (keys of ``tpr_at_fpr``).
FPRS = ("0.001", "0.01", "0.1")


def _badge(ok: bool, text: str) -> Html:
    return Html(f'<span class="status {"ok" if ok else "bad"}">{esc(text)}</span>')


def _bound_cell(row: dict) -> Html | tuple[str, str]:
    """The epsilon lower bound, flagged when it exceeds the ledger's epsilon (a DP defect)."""
    lb, led = row.get("eps_lb"), row.get("ledger_epsilon")
    text = fmt_num(lb, 2)
    if led is not None and lb is not None and lb > led:
        return Html(f'<span class="status bad">{esc(text)} &gt; ledger</span>')
    return num(text)


def verdict(audit: dict) -> tuple[bool, str]:
    """``(ok, sentence)``: the audit's overall reading, as ``fl-sim audit`` prints it.

    ``ok`` is False when a DP model's bound exceeds its ledger epsilon. Without a leaking
    non-private control the sentence says the attack is too weak to test the DP bounds.
    """
    rows = [r for r in audit.get("rows", []) if isinstance(r, dict)]
    dp = [r for r in rows if r.get("epsilon") is not None]
    over = [r for r in dp if r.get("ledger_epsilon") is not None and (r.get("eps_lb") or 0) > r["ledger_epsilon"]]
    if over:
        names = ", ".join(str(r.get("setting")) for r in over)
        return False, f"DEFECT: the attack proves more leakage than the ledger accounted at {names}"
    control = audit.get("control_leaks")
    if control is None:
        return True, "no non-private control was run: the DP bounds below are not tested against a known leak"
    if not control:
        return True, ("the non-private control did not leak clearly: the attack is too weak to test the DP bounds "
                      "(a bound of 0 here does not show the models are private)")
    return True, "the non-private control leaks clearly, and no DP model's bound exceeds its ledger epsilon"


def render_audit_page(audit: dict) -> str:
    """The HTML page of one ``audit.json``."""
    meta = audit.get("meta") or {}
    rows = [r for r in audit.get("rows", []) if isinstance(r, dict)]
    ok, sentence = verdict(audit)
    body = ["<h2>Result</h2>", f"<p>{_badge(ok, 'consistent' if ok else 'DEFECT')} {esc(sentence)}.</p>"]
    headline = []
    for r in rows:
        headline.append([
            esc(r.get("setting")),
            num(fmt_eps(r.get("epsilon"))) if r.get("epsilon") is not None else "off",
            num(fmt_eps(r.get("ledger_epsilon"))) if r.get("ledger_epsilon") is not None else "—",
            num(fmt_delta(r.get("delta"))),
            _bound_cell(r),
            num(fmt_num((r.get("records") or {}).get("auc"), 3)),
            num(fmt_num((r.get("canaries") or {}).get("auc"), 3)),
            num(fmt_num(r.get("test_accuracy"), 3)) if r.get("test_accuracy") is not None else "—",
            esc(r.get("verdict") or ""),
        ])
    conf = (meta.get("bound") or {}).get("confidence")
    body.append(table(["setting", "target ε", "ledger ε", "δ", f"ε lower bound ({fmt_num(conf, 2)} confidence)",
                       "attack AUC, records", "attack AUC, canaries", "target test accuracy", "reading"], headline,
                      caption="Per privacy setting: what the ledger accounted, and what the attack proves"))
    for kind, label in (("records", "real training records"), ("canaries", "canaries (atypical records)")):
        detail = []
        for r in rows:
            d = r.get(kind) or {}
            tpr = d.get("tpr_at_fpr") or {}
            detail.append([esc(r.get("setting"))] + [num(fmt_num(tpr.get(f), 3)) for f in FPRS]
                          + [num(fmt_int(d.get("guesses"))), num(fmt_int(d.get("correct"))),
                             num(fmt_num(d.get("eps_lb"), 2)), num(fmt_int(d.get("m")))])
        body.append(table(["setting"] + [f"TPR at FPR {float(f):g}" for f in FPRS]
                          + ["guesses", "correct", "ε lower bound", "membership trials"], detail,
                          caption=f"Attack on the {label}"))
    attack, bound, pool = meta.get("attack") or {}, meta.get("bound") or {}, meta.get("pool") or {}
    body.append("<h2>What was audited, and how</h2>")
    body.append(kv_table([
        ("department", meta.get("department")), ("model", meta.get("model")),
        ("mechanism", meta.get("mechanism")),
        ("pool", f"{fmt_int(pool.get('records'))} training records of {', '.join(map(str, pool.get('sites') or []))}"
                 f" + {fmt_int(pool.get('canaries'))} canaries"),
        ("attack", f"{attack.get('name')}; signal: {attack.get('signal')}; {fmt_int(attack.get('shadows'))} shadow "
                   f"and {fmt_int(attack.get('targets'))} target models per setting"),
        ("guesses", attack.get("guesses")),
        ("bound", f"{bound.get('method')}; {fmt_int(bound.get('tests'))} tests at "
                  f"{fmt_num(bound.get('per_test_confidence'), 3)} each"),
        ("run time", f"{fmt_num(meta.get('seconds'), 0)} s"),
    ], caption="Audit settings (audit.json: meta)"))
    body.append('<p class="note">A lower bound of 0 means the attack proved nothing at that confidence, not that '
                "the model is private; DP-SGD's ledger epsilon assumes an adversary who sees every step, this attack "
                "sees only the final model, so bounds well below the ledger epsilon are expected.</p>")
    title = f"Empirical privacy audit: {meta.get('department', '?')}"
    return _page(title, f"{meta.get('command', 'fl-sim audit')}, {meta.get('model', '')}", "".join(body))


def write_audit_report(out: Path) -> Path:
    """Write ``out/report.html`` from ``out/audit.json`` (temp file then rename) and return its path.

    Raises
    ------
    OSError, ValueError
        ``audit.json`` cannot be read or parsed, or the page cannot be written.
    """
    out = Path(out)
    audit = json.loads((out / "audit.json").read_text())
    if not isinstance(audit, dict) or "rows" not in audit:
        raise ValueError(f"{out / 'audit.json'}: not an fl-sim audit result (no 'rows')")
    from server.artefacts import write_atomic

    path = out / "report.html"
    write_atomic(path, render_audit_page(audit).encode())  # an earlier page is replaced only by a complete one
    return path
