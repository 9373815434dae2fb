"""Run report (moved to :mod:`server.report`, which the coordinator's ServerApp and CLI use too).

Re-exported here so ``fl-sim`` and existing imports keep working.
"""

from __future__ import annotations

from server.report import metric_for, per_site_series, write_report, write_report_safely, write_run_report

__all__ = ["metric_for", "per_site_series", "write_report", "write_report_safely", "write_run_report"]
