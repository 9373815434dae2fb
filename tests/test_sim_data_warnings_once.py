"""A simulation shows each site's data-quality warnings once, from the driver, not from every Ray actor.

Found by a review of the docs followed literally (2026-12-07, L13): every ClientAppActor that played
a node re-printed each DataQualityWarning with a source line of clients/node.py, and Ray printed a
FutureWarning about its own future defaults.
"""

from __future__ import annotations

import warnings

import pytest

from citydata import DataQualityWarning


def test_the_loader_stays_quiet_once_the_driver_has_shown_the_warnings(monkeypatch):
    from citydata import load_department
    from citydata.base import DATA_WARNINGS_SHOWN_ENV

    monkeypatch.delenv(DATA_WARNINGS_SHOWN_ENV, raising=False)
    with warnings.catch_warnings(record=True) as loud:
        warnings.simplefilter("always")
        load_department("health", seed=91_001).site_data("Switzerland")
    assert any(issubclass(w.category, DataQualityWarning) for w in loud)  # Switzerland: imputed values
    monkeypatch.setenv(DATA_WARNINGS_SHOWN_ENV, "1")  # as the Ray actors and the ServerApp inherit it
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        load_department("health", seed=91_002).site_data("Switzerland")
    assert not [w for w in quiet if issubclass(w.category, DataQualityWarning)]


def test_the_driver_shows_each_sites_warnings(monkeypatch):
    import simulations.run as run
    from citydata.base import DATA_WARNINGS_SHOWN_ENV

    monkeypatch.delenv(DATA_WARNINGS_SHOWN_ENV, raising=False)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert run.show_data_warnings({"department": "health", "data-seed": 91_003},
                                      ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"])
    texts = [str(w.message) for w in shown if issubclass(w.category, DataQualityWarning)]
    assert any("'Switzerland'" in t and "imputed" in t for t in texts) and len(texts) == len(set(texts))
    assert not run.show_data_warnings({"department": "health"}, ["Atlantis"])  # left to the node to report
