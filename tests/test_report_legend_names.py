"""A site whose name starts with ``_`` is in the plots' legends (review s19, finding 12).

matplotlib leaves out a legend entry whose label starts with ``_``; site names may start with one (``_North``),
and such a site's line was drawn but not named.
"""
from __future__ import annotations

import pytest


@pytest.fixture
def closed_figures(monkeypatch) -> list:
    """The figures the report closes (after saving), to read their legends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real, figs = plt.close, []

    def close(fig=None):
        figs.append(fig)
        return real(fig)

    monkeypatch.setattr(plt, "close", close)
    return figs


def _legend(fig) -> list[str]:
    legend = fig.axes[0].get_legend() or (fig.legends[0] if fig.legends else None)
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def test_a_site_named_with_a_leading_underscore_is_in_the_legend(tmp_path, closed_figures):
    from server.report import _plot

    _plot({"_North": [(1, 0.5), (2, 0.6)], "South": [(1, 0.4), (2, 0.7)], "$x$": [(1, 0.1)]}, "accuracy", "acc",
          tmp_path / "acc.png", hline=(0.5, "_target"))
    assert (tmp_path / "acc.png").stat().st_size > 0
    assert _legend(closed_figures[-1]) == [r"\$x\$", "South", "_North", "_target"], _legend(closed_figures[-1])


def test_a_method_label_with_a_leading_underscore_is_in_the_compare_legend(tmp_path, closed_figures, monkeypatch):
    from server import report

    grid = {"sites": ["_North", "South"], "methods": [("fedavg", "_FedAvg"), ("local", "local only")],
            "values": {("_North", "fedavg"): 0.8, ("South", "local"): 0.7}}
    monkeypatch.setattr(report, "compare_grid", lambda results, metric: grid)
    assert "compare.png" in report.write_compare_plot({}, "accuracy", tmp_path)
    assert _legend(closed_figures[-1]) == ["_FedAvg", "local only"], _legend(closed_figures[-1])
