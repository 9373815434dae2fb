"""Loader settings that come from the environment (CITYFED_DATE_FORMAT, CITYFED_RANGES): a bad value is an
input error naming the variable, its value, what is allowed and the fix, in fl-sim and fl-client alike."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clients.cli import SetupError, check_data  # noqa: E402
from sim_helpers import fl_sim as _fl_sim  # noqa: E402


@pytest.fixture(scope="module")
def traffic_csv(tmp_path_factory):
    from citydata import load_department

    return load_department("traffic").export(tmp_path_factory.mktemp("env") / "t.csv")


@pytest.fixture(scope="module")
def health_csv(tmp_path_factory):
    from citydata import load_department

    return load_department("health").export(tmp_path_factory.mktemp("env") / "h.csv")


@pytest.fixture()
def never_train(monkeypatch):
    import simulations.baselines as baselines

    def never(*a, **k):
        raise AssertionError("trained before the input was checked")

    monkeypatch.setattr(baselines, "run_baselines", never)


# -- CITYFED_DATE_FORMAT ------------------------------------------------------------------------------

def test_loader_names_the_date_format_variable(monkeypatch, traffic_csv):
    from citydata import DataFileError, load_department

    monkeypatch.setenv("CITYFED_DATE_FORMAT", "XYZ")
    with pytest.raises(DataFileError) as ex:
        load_department("traffic", traffic_csv)
    text = str(ex.value)
    assert "CITYFED_DATE_FORMAT" in ex.value.path and "'XYZ'" in text and "DMY" in text and "MDY" in text
    assert "unset CITYFED_DATE_FORMAT" in ex.value.fix
    monkeypatch.setenv("CITYFED_DATE_FORMAT", "%H:%M")  # a pattern without a date
    with pytest.raises(DataFileError, match="CITYFED_DATE_FORMAT"):
        load_department("traffic", traffic_csv)
    # the argument overrides the variable (an own forecasting file also needs its public test start)
    assert load_department("traffic", traffic_csv, date_format="ISO", test_start="2024-05-07 12:00").sites


def test_fl_sim_baselines_bad_date_format_variable(tmp_path, capsys, monkeypatch, never_train, traffic_csv):
    monkeypatch.setenv("CITYFED_DATE_FORMAT", "XYZ")
    code, out, err = _fl_sim(["baselines", "-d", "traffic", "-o", tmp_path / "out", "--epochs", "1", "--data",
                              traffic_csv], capsys, monkeypatch)
    assert code == 2, (out, err)
    assert "CITYFED_DATE_FORMAT" in err and "'XYZ'" in err and "DMY" in err and "fix: unset CITYFED_DATE_FORMAT" in err
    assert "raised at" not in err and "not shown" not in err


def test_fl_client_check_bad_date_format_variable(monkeypatch, traffic_csv):
    monkeypatch.setenv("CITYFED_DATE_FORMAT", "XYZ")
    with pytest.raises(SetupError) as ex:
        check_data("traffic", str(traffic_csv), "detector-1")
    text = str(ex.value)
    assert "CITYFED_DATE_FORMAT" in text and "'XYZ'" in text and "fix: unset CITYFED_DATE_FORMAT" in text, text
    assert "--department" not in text and "--data" not in text, text


# -- CITYFED_RANGES -----------------------------------------------------------------------------------

def test_fl_client_check_missing_ranges_file_from_variable(monkeypatch, health_csv, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CITYFED_RANGES", "r/nope.toml")
    with pytest.raises(SetupError) as ex:
        check_data("health", str(health_csv), "Cleveland")
    text = str(ex.value)
    assert "r/nope.toml" in text and "CITYFED_RANGES" in text and "--data" not in text, text
    assert "unset CITYFED_RANGES" in text, text


def test_fl_client_check_bad_ranges_column_from_variable(monkeypatch, health_csv, tmp_path):
    (tmp_path / "nearcol.toml").write_text("[chool]\nmax = 320\n")
    monkeypatch.setenv("CITYFED_RANGES", str(tmp_path / "nearcol.toml"))
    with pytest.raises(SetupError) as ex:
        check_data("health", str(health_csv), "Cleveland")
    text = str(ex.value)
    assert "nearcol.toml" in text and "CITYFED_RANGES" in text and "'chool'" in text and "--data" not in text, text


def test_fl_client_check_ranges_option_names_option_and_file(monkeypatch, health_csv, tmp_path):
    (tmp_path / "nearcol.toml").write_text("[chool]\nmax = 320\n")
    with pytest.raises(SetupError) as ex:
        check_data("health", str(health_csv), "Cleveland", ranges=str(tmp_path / "nearcol.toml"))
    text = str(ex.value)
    assert text.startswith(f"--ranges {tmp_path / 'nearcol.toml'}") and "'chool'" in text, text


@pytest.mark.parametrize("content", [None, "[chool]\nmax = 320\n"])
def test_fl_sim_baselines_bad_ranges_variable(tmp_path, capsys, monkeypatch, never_train, health_csv, content):
    ranges = tmp_path / "r.toml"
    if content is not None:
        ranges.write_text(content)
    monkeypatch.setenv("CITYFED_RANGES", str(ranges))
    code, out, err = _fl_sim(["baselines", "-d", "health", "-o", tmp_path / "out", "--data", health_csv],
                             capsys, monkeypatch)
    assert code == 2, (out, err)
    assert str(ranges) in err and "CITYFED_RANGES" in err and "fix:" in err, err
    assert "--data" not in err, err
