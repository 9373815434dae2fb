"""Energy per run and per site from the nodes' replies (issue 13.4).

Each node meters its own train and evaluate tasks and reports ``energy-j`` with an
``energy-method`` code (:mod:`clients.energy`: RAPL/NVML measured, or process CPU time × a
stated power per core). :func:`summarise` adds them up per node and for the run. The
coordinator's own process is **not** counted (in an in-process simulation it also runs the
nodes, so it could not be told apart); the figures are what the nodes reported.
"""

from __future__ import annotations

from contract.energy import METHODS


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _tidy(x: float) -> float:
    """``x`` to 12 significant digits: a sum of reported joules without the float noise of the addition."""
    return float(f"{x:.12g}")


def summarise(results: dict) -> dict:
    """Energy per node and for the run from a run's results (``rounds[*].train|evaluate.nodes``).

    Parameters
    ----------
    results : dict
        ``results.json`` content, or the checkpoint history of a live run.

    Returns
    -------
    dict
        ``nodes``: ``{node ID: {"train-j", "evaluate-j", "joules", "partition-id", "methods"}}``
        (methods: the :data:`contract.energy.METHODS` texts the node reported); ``total-j``: the
        sum over nodes; ``replies``: replies that carried a figure; ``scope``: what is counted.
        Empty ``nodes`` and ``total-j`` None when no reply carried one (no node's policy opts in
        with ``[releases] energy = "sent"``, the default; ``CITYFED_ENERGY=off``; older nodes).
    """
    nodes: dict[str, dict] = {}
    replies = 0
    for entry in results.get("rounds") or []:
        if not isinstance(entry, dict):
            continue
        for phase in ("train", "evaluate"):
            ph = entry.get(phase) if isinstance(entry.get(phase), dict) else {}
            for node, m in (ph.get("nodes") or {}).items():
                j = _num(m.get("energy-j")) if isinstance(m, dict) else None
                if j is None:
                    continue
                replies += 1
                n = nodes.setdefault(str(node), {"train-j": 0.0, "evaluate-j": 0.0, "joules": 0.0,
                                                  "partition-id": m.get("partition-id"), "methods": []})
                n[f"{phase}-j"] += j
                n["joules"] += j
                code = m.get("energy-method")
                text = METHODS.get(int(code), f"method {code}") if _num(code) is not None else "not stated"
                if text not in n["methods"]:
                    n["methods"].append(text)
    for n in nodes.values():  # sums of two-significant-figure figures: no float noise (0.7500000000000001)
        for k in ("train-j", "evaluate-j", "joules"):
            n[k] = _tidy(n[k])
    return {"nodes": nodes, "total-j": _tidy(sum(n["joules"] for n in nodes.values())) if nodes else None,
            "replies": replies, "scope": "department nodes' train and evaluate tasks, as reported; "
                                         "the coordinator's own process is not counted"}


def card_section(results: dict, names: dict[str, str]) -> dict:
    """The model card's ``energy``: the run's total and each site's, named as the card names sites.

    Parameters
    ----------
    results : dict
        ``results.json``'s content.
    names : dict
        ``{node ID: site name}`` (the card's naming; nodes without one are ``node <ID>``).
    """
    e = results.get("energy") if isinstance(results.get("energy"), dict) else summarise(results)
    sites = {names.get(str(n), f"node {n}"): {"joules": v["joules"], "train-j": v["train-j"], "evaluate-j": v["evaluate-j"],
                                               "methods": v["methods"]} for n, v in (e.get("nodes") or {}).items()}
    return {"total-j": e.get("total-j"), "sites": sites, "scope": e.get("scope", "")}


def card_markdown(section: dict | None) -> list[str]:
    """Markdown lines of the card's energy section (``[]`` when no node reported energy)."""
    if not section or not section.get("sites"):
        return []
    lines = ["", "## Energy", "", f"Scope: {section.get('scope')}.", "", "| site | energy (J) | method |", "|---|---:|---|"]
    for site, s in sorted(section["sites"].items()):
        lines.append(f"| {site} | {s['joules']:.3g} | {'; '.join(s['methods'])} |")
    lines.append(f"| all sites (run) | {section['total-j']:.3g} | |")
    return lines
