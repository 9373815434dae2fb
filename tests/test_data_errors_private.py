"""Private records never reach a message: DataFileError and DataQualityWarning name the file, the column,
the row and the kind of problem, never a value read from the data file's cells.

Each case plants a marker (``MARKER4711``, ``98765432101``, a timestamp) in a cell of a department's own
exported records, loads the file with the documented loader and checks that the marker is nowhere in the
error or in any warning, while the file, the column and the row are. Also: NUL/control bytes in a CSV
are refused (pandas would silently cut the cell at a NUL), and site names that would be unsafe as file
or ledger names are refused.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citydata import DataFileError, load_department

MARK = "MARKER4711"
NUM = "98765432101"
SUFFIXES = (".csv", ".parquet")
FIRST_SITE = {"health": "Cleveland", "traffic": "detector-1", "utility": "england-wales-2000"}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """One site of each department's bundled records, exported as an operator CSV and read back as text."""
    d = tmp_path_factory.mktemp("export")
    out = {}
    for dept, site in FIRST_SITE.items():
        p = load_department(dept).export(d / f"{dept}.csv", sites=[site])
        out[dept] = pd.read_csv(p, dtype=str, keep_default_na=False)
    return out


def _write(frame: pd.DataFrame, path: Path) -> Path:
    """A text frame as CSV, or as Parquet with the documented types where the column still parses."""
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
        return path
    typed = {}
    for c in frame.columns:
        s = frame[c]
        num = pd.to_numeric(s.where(s != ""), errors="coerce")
        if num.notna().sum() == (s != "").sum():
            typed[c] = num.astype("float64")
        else:
            typed[c] = s.where(s != "", None).astype(object)
    pd.DataFrame(typed).to_parquet(path, index=False)
    return path


def _edit(frame: pd.DataFrame, row: int, column: str, value: str) -> pd.DataFrame:
    """Copy of ``frame`` with the cell of 1-based data row ``row`` set to ``value``."""
    f = frame.copy()
    f.loc[row - 1, column] = value
    return f


def _load(dept: str, path: Path, **kw) -> tuple[DataFileError | None, list[str]]:
    """Load with the documented loader and build every site; the DataFileError (or None) and all warnings."""
    err = None
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            ds = load_department(dept, path, **kw)
            for s in ds.sites:
                ds.site_data(s)
        except DataFileError as exc:
            err = exc
    return err, [str(w.message) for w in rec]


def _rows_named(text: str) -> set[int]:
    """Row numbers a message names ("row 17", "rows 3, 5 and 2 more", "rows 50 and 51")."""
    out = set()
    for m in re.finditer(r"\brows? (\d+(?:(?:, | and )\d+)*)", text):
        out |= {int(x) for x in re.findall(r"\d+", m.group(1))}
    return out


def _check(err, warns, path, column, row=None, kind=None, markers=(MARK,)):
    """The error names the file, the column, the row and the kind; no marker in it or in any warning."""
    assert err is not None, f"no DataFileError (warnings: {warns})"
    msg = str(err)
    for text in [msg, err.problem, err.fix, *warns]:
        text = text.replace(str(path), "<file>")  # the temporary path may hold any digits
        for m in markers:
            assert m not in text, f"marker {m!r} leaked: {text[:500]!r}"
    assert len(msg) < 3000, msg[:500]
    assert err.path == str(path) and str(path) in msg
    assert err.column == column and repr(column) in msg, msg
    if row is not None:
        assert row in _rows_named(err.problem), msg
    if kind is not None:
        assert kind in err.problem, msg
    assert err.fix and "Fix:" in msg
    return err


# ----------------------------------------------------------------------------- health


HEALTH_CELLS = [  # (column, row, value, markers, kind)
    ("chol", 17, f"271{MARK}", (MARK, "271"), "non-numeric"),
    ("chol", 17, NUM, (NUM,), "plausible range"),
    ("trestbps", 9, f"-{NUM}", (NUM,), "plausible range"),
    ("age", 40, f"63.{NUM}", (NUM,), "non-integer"),
    ("age", 40, f"{MARK}", (MARK,), "non-numeric"),
    ("cp", 5, f"{MARK} angina", (MARK,), "unknown value"),
    ("restecg", 300, f"b'{MARK}'", (MARK,), "unknown value"),
    ("sex", 2, f"PATIENT-{MARK}", (MARK,), "unknown value"),
    ("fbs", 3, f"{MARK}", (MARK,), "true/false"),
    ("num", 100, NUM, (NUM,), "outside 0-4"),
    ("chol", 250, MARK * 500_000, (MARK,), "non-numeric"),  # a 5,000,000-character cell
    ("cp", 250, MARK * 500_000, (MARK,), "unknown value"),
]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("column,row,value,markers,kind", HEALTH_CELLS, ids=lambda v: str(v)[:20])
def test_health_cell_values_never_quoted(tmp_path, exported, suffix, column, row, value, markers, kind):
    path = _write(_edit(exported["health"], row, column, value), tmp_path / f"h{suffix}")
    err, warns = _load("health", path)
    _check(err, warns, path, column, row, kind, markers)


def test_several_bad_cells_list_the_first_rows_and_a_count(tmp_path, exported):
    f = exported["health"].copy()
    rows = [3, 8, 21, 22, 40, 41, 90, 200]
    for r in rows:
        f.loc[r - 1, "chol"] = f"{MARK}{r}"
    path = _write(f, tmp_path / "h.csv")
    err = _check(*_load("health", path), path, "chol", 3, "8 non-numeric value")
    assert {3, 8, 21, 22, 40} <= _rows_named(err.problem) and "and 3 more" in err.problem, err.problem
    assert "90" not in err.problem and "200" not in err.problem


def test_out_of_range_action_missing_warning_has_no_value(tmp_path, exported):
    path = _write(_edit(exported["health"], 17, "chol", NUM), tmp_path / "h.csv")
    err, warns = _load("health", path, ranges={"chol": {"action": "missing"}})
    assert err is None
    assert any("chol" in w and "treated as missing" in w for w in warns), warns
    assert not any(NUM in w for w in warns), warns


def test_headerless_file_does_not_quote_its_first_record(tmp_path, exported):
    f = _edit(_edit(exported["health"], 1, "chol", MARK), 1, "trestbps", "PATIENT-4711")
    path = tmp_path / "noheader.csv"
    f.to_csv(path, index=False, header=False)
    err, warns = _load("health", path)
    assert err is not None
    for text in [str(err), *warns]:
        assert MARK not in text and "PATIENT-4711" not in text and "233.0" not in text, text
    f = _edit(_edit(exported["health"], 1, "chol", MARK), 1, "trestbps", MARK)  # the same value twice: "duplicated names"
    f.to_csv(path, index=False, header=False)
    err, warns = _load("health", path)
    assert err is not None and MARK not in str(err), str(err)


# ----------------------------------------------------------------------------- traffic


TRAFFIC_CELLS = [  # (column, row, value, markers, kind, loader kwargs)
    ("total", 30, f"12{MARK}", (MARK,), "non-numeric", {}),
    ("total", 30, NUM, (NUM,), "plausible range", {}),
    ("total", 30, f"12.{NUM}", (NUM,), "non-integer", {}),
    ("total", 30, f"-{NUM}", (NUM,), "negative", {"ranges": {"total": {"min": -1e12}}}),
    ("timestamp", 50, "2024-02-30 00:00:00", ("2024-02-30",), "impossible day", {}),
    ("timestamp", 50, f"{MARK}", (MARK,), "unparsable", {}),
    ("timestamp", 50, "2024-13-18 12:30:00", ("2024-13-18",), "impossible month", {}),
    ("timestamp", 50, "2024-04-18 25:30:00", ("25:30",), "time of day", {}),
    ("timestamp", 500, "2999-04-23 04:45:00", ("2999",), "outside the years", {}),
    ("timestamp", 500, "2024-04-23 04:45:00+05:45", ("05:45",), "UTC offset", {}),
    ("timestamp", 500, "2024-04-23 04:45:00+15:30", ("15:30",), "UTC offset", {}),
    ("timestamp", 500, "2024-04-23 05:37:00", ("05:37",), "15-minute boundary", {}),
    ("timestamp", 500, MARK * 500_000, (MARK,), "unparsable", {}),
]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("column,row,value,markers,kind,kw", TRAFFIC_CELLS, ids=lambda v: str(v)[:20])
def test_traffic_cell_values_never_quoted(tmp_path, exported, suffix, column, row, value, markers, kind, kw):
    path = _write(_edit(exported["traffic"], row, column, value), tmp_path / f"t{suffix}")
    err, warns = _load("traffic", path, **kw)
    _check(err, warns, path, column, row, kind, markers)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_unsorted_and_duplicate_timestamps_not_quoted(tmp_path, exported, suffix):
    f = exported["traffic"]
    a, b = f.loc[499, "timestamp"], f.loc[500, "timestamp"]  # data rows 500 and 501
    assert a == "2024-04-23 05:30:00" and b == "2024-04-23 05:45:00"
    swapped = f.copy()
    swapped.loc[[499, 500]] = f.loc[[500, 499]].to_numpy()
    path = _write(swapped, tmp_path / f"s{suffix}")
    err = _check(*_load("traffic", path), path, "timestamp", 501, "not sorted", markers=(a, b, a[-8:-3], b[-8:-3], "2024-04-23"))
    assert 500 in _rows_named(err.problem) and "detector" in err.problem
    dup = pd.concat([f.iloc[:500], f.iloc[499:]], ignore_index=True)
    dup.loc[500, "total"] = "7777"
    path = _write(dup, tmp_path / f"d{suffix}")
    err = _check(*_load("traffic", path), path, "timestamp", 501, "duplicate timestamp", markers=(a, a[-8:-3], "2024-04-23", "7777"))
    assert "different values" in err.problem and 500 in _rows_named(err.problem)


def test_dates_in_another_order_not_quoted(tmp_path, exported):
    f = exported["traffic"].copy()
    f["timestamp"] = pd.to_datetime(f["timestamp"]).dt.strftime("%d/%m/%Y %H:%M")
    path = _write(f, tmp_path / "dmy.csv")
    stamps = ("/04/2024", "18/04", "23/04")
    err = _check(*_load("traffic", path), path, "timestamp", 1, "not year-first", markers=stamps)
    assert "--date-format DMY" in err.fix
    _check(*_load("traffic", path, date_format="MDY"), path, "timestamp", 1, "month above 12", markers=stamps)
    _check(*_load("traffic", path, date_format="%Y.%m.%d %H:%M"), path, "timestamp", 1, "do not match", markers=stamps)
    f["timestamp"] = pd.to_datetime(exported["traffic"]["timestamp"]).dt.strftime("%d/%m/%y %H:%M")
    path = _write(f, tmp_path / "yy.csv")
    _check(*_load("traffic", path, date_format="DMY"), path, "timestamp", 1, "4-digit year", markers=("/04/24",))


def test_mixed_aware_and_naive_not_quoted(tmp_path, exported):
    f = exported["traffic"].copy()
    f["timestamp"] = f["timestamp"] + "+05:45"
    f.loc[99, "timestamp"] = "2024-04-19 00:45:00"
    path = _write(f, tmp_path / "mix.csv")
    err = _check(*_load("traffic", path), path, "timestamp", 1, "UTC offset", markers=("05:45", "2024-04-18", "2024-04-19"))
    assert 100 in _rows_named(err.problem)


def test_numeric_timestamps_not_quoted(tmp_path, exported):
    f = exported["traffic"].copy()
    f["timestamp"] = [str(98765432101 + 900 * i) for i in range(len(f))]
    for suffix in SUFFIXES:
        path = _write(f, tmp_path / f"n{suffix}")
        _check(*_load("traffic", path), path, "timestamp", 1, "timestamps are numbers", markers=("987654321",))
    from citydata.timestamps import _Bad, parse_timestamps

    with pytest.raises(_Bad) as info:  # a JSON request can mix text and numbers in one column
        parse_timestamps(pd.Series(["2024-04-18 00:00", 98765432101, None], dtype=object))
    assert NUM not in info.value.problem and "row 2" in info.value.problem, info.value.problem


# ----------------------------------------------------------------------------- utility


UTILITY_CELLS = [
    ("demand", 77, f"{MARK}", (MARK,), "non-numeric"),
    ("demand", 77, NUM + "000", (NUM,), "plausible range"),
    ("temperature", 77, NUM, (NUM,), "plausible range"),
    ("temperature", 77, "-" + NUM, (NUM,), "plausible range"),
]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("column,row,value,markers,kind", UTILITY_CELLS, ids=lambda v: str(v)[:20])
def test_utility_cell_values_never_quoted(tmp_path, exported, suffix, column, row, value, markers, kind):
    path = _write(_edit(exported["utility"], row, column, value), tmp_path / f"u{suffix}")
    _check(*_load("utility", path), path, column, row, kind, markers)


def test_utility_duplicate_and_unsorted_not_quoted(tmp_path, exported):
    f = exported["utility"]
    a = f.loc[1000, "timestamp"]
    dup = pd.concat([f.iloc[:1001], f.iloc[1000:]], ignore_index=True)
    dup.loc[1001, "demand"] = NUM
    path = _write(dup, tmp_path / "d.csv")
    _check(*_load("utility", path), path, "timestamp", 1002, "duplicate timestamp", markers=(a, NUM, a[-8:-3]))
    rev = f.iloc[::-1].reset_index(drop=True)
    path = _write(rev, tmp_path / "r.csv")
    _check(*_load("utility", path), path, "timestamp", 2, "not sorted", markers=(rev.loc[0, "timestamp"], rev.loc[1, "timestamp"]))


# ----------------------------------------------------------------------------- NUL / control bytes


@pytest.mark.parametrize("dept,column,row,cell", [
    ("health", "chol", 17, "2\x00999"),
    ("health", "cp", 5, "typical\x01angina"),
    ("health", "dataset", 9, "Cleve\x00land"),
    ("traffic", "total", 30, "1\x00234"),
    ("utility", "demand", 10, "2\x1b5678"),
])
def test_nul_and_control_bytes_in_a_csv_are_refused(tmp_path, exported, dept, column, row, cell):
    path = _write(_edit(exported[dept], row, column, cell), tmp_path / f"{dept}.csv")
    err, warns = _load(dept, path)
    assert err is not None, f"loaded a file with a control byte in {column} (warnings: {warns})"
    msg = str(err)
    assert err.path == str(path) and str(path) in msg
    assert "NUL/control byte" in err.problem and "not a text CSV" in err.problem, msg
    assert f"line {row + 1}" in err.problem, msg  # the header is line 1
    assert err.column == column and repr(column) in msg, msg
    head, tail = re.split(r"[\x00-\x1f]", cell)
    text = msg.replace(str(path), "<file>")
    assert cell not in text and head + tail not in text and tail not in text, msg
    assert "UTF-8" in err.fix


def test_utf16_csv_is_called_not_utf8(tmp_path, exported):
    path = tmp_path / "utf16.csv"
    path.write_bytes(exported["health"].to_csv(index=False).encode("utf-16"))
    err, _ = _load("health", path)
    assert err is not None and "UTF-16" in str(err) and "UTF-8" in err.fix, str(err)


def test_nul_in_parquet_text_is_not_truncated(tmp_path, exported):
    path = _write(_edit(exported["health"], 17, "chol", "2\x00999"), tmp_path / "h.parquet")
    _check(*_load("health", path), path, "chol", 17, "non-numeric", markers=("999",))


def test_tab_cr_lf_are_not_control_bytes(tmp_path, exported):
    path = tmp_path / "crlf.csv"
    text = exported["health"].to_csv(index=False).replace("\n", "\r\n").replace("Male", "\tMale")
    path.write_bytes(text.encode())
    err, _ = _load("health", path)
    assert err is None, str(err)


# ----------------------------------------------------------------------------- site names


BAD_SITES = [  # (name, rule words)
    ("Cleve/land", "path separator"),
    ("..\\..\\Windows", "path separator"),
    ("..", "'.' or '..'"),
    (".", "'.' or '..'"),
    (MARK * 20, "longer than 100"),
    ("Cleve\x1bland", "control character"),
    ("Cleve\x00land", "control character"),
]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dept,column", [("health", "dataset"), ("traffic", "detector"), ("utility", "grid")])
@pytest.mark.parametrize("name,rule", BAD_SITES, ids=lambda v: repr(v)[:16])
def test_unsafe_site_names_are_refused(tmp_path, exported, suffix, dept, column, name, rule):
    if suffix == ".csv" and any(ord(c) < 32 for c in name):
        pytest.skip("control bytes in a CSV are refused before the site names are read (test above)")
    f = exported[dept].copy()
    f[column] = name  # every row: the whole site renamed (one site, so the time order is kept)
    f.loc[:9, column] = FIRST_SITE[dept].removeprefix("detector-")  # rows 1-10 keep the good name
    path = _write(f, tmp_path / f"{dept}{suffix}")
    err = _check(*_load(dept, path), path, column, 11, rule, markers=(MARK * 3,))
    assert name not in str(err) or len(name) <= 2
    assert "\x00" not in str(err) and "\x1b" not in str(err)
    assert "file and ledger names" in err.fix or "file names" in err.fix


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_spaces_and_unicode_site_names_stay_allowed(tmp_path, exported, suffix):
    f = exported["health"].copy()
    f["dataset"] = "Universitätsspital Zürich – Ost"
    f.loc[:149, "dataset"] = "VA Long Beach"
    ds = load_department("health", _write(f, tmp_path / f"h{suffix}"))
    assert ds.sites == ["Universitätsspital Zürich – Ost", "VA Long Beach"]


# ----------------------------------------------------------------------------- properties


_numeric_cols = st.sampled_from(["age", "trestbps", "chol", "thalch", "oldpeak", "num"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(column=_numeric_cols, row=st.integers(1, 304), big=st.integers(10**7, 10**15), sign=st.sampled_from(["", "-"]),
       suffix=st.sampled_from(SUFFIXES))
def test_property_random_implausible_number_not_quoted(exported, column, row, big, sign, suffix):
    value = f"{sign}{big}"
    with tempfile.TemporaryDirectory() as d:
        path = _write(_edit(exported["health"], row, column, value), Path(d) / f"h{suffix}")
        _check(*_load("health", path), path, column, row, markers=(str(big),))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(column=st.sampled_from(["age", "chol", "cp", "restecg", "sex", "fbs", "exang"]), row=st.integers(1, 304),
       # a digit and a capital in it: a plain word ("QcolumnZ") would find itself in the message's own text
       marker=st.text(alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Nd")), min_size=6, max_size=30)
       .filter(lambda s: any(c.isdigit() for c in s) and any(c.isupper() for c in s))
       .map(lambda s: "Q" + s + "Z"), suffix=st.sampled_from(SUFFIXES))
def test_property_random_text_marker_not_quoted(exported, column, row, marker, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = _write(_edit(exported["health"], row, column, marker), Path(d) / f"h{suffix}")
        _check(*_load("health", path), path, column, row, markers=(marker, marker[1:-1]))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 1 << 16])
def test_control_byte_scan_finds_line_and_column_across_chunks(tmp_path, chunk_size):
    from citydata.base import check_text_bytes

    path = tmp_path / "t.csv"
    path.write_bytes(b'timestamp,detector,total\r\n2024-04-18 00:00,"a, b",1\r\n2024-04-18 00:15,"a, b",2\x003\r\n')
    with pytest.raises(DataFileError) as info:
        check_text_bytes(path, chunk_size=chunk_size)
    assert "line 3 " in info.value.problem and info.value.column == "total", str(info.value)
    path.write_bytes(b'timestamp,detector,total\n2024-04-18 00:00,"a\nb",1\x7f\n')  # the line starts inside a quoted cell
    with pytest.raises(DataFileError) as info:
        check_text_bytes(path, chunk_size=chunk_size)
    assert "line 3 " in info.value.problem and info.value.column is None, str(info.value)
    path.write_bytes(b"time\x00stamp,detector,total\n")
    with pytest.raises(DataFileError) as info:
        check_text_bytes(path, chunk_size=chunk_size)
    assert "header line (line 1)" in info.value.problem and info.value.column is None
    path.write_bytes(b"timestamp,detector,total\n2024-04-18 00:00,\t1,\t2\r\n")
    check_text_bytes(path, chunk_size=chunk_size)  # tab, CR, LF are fine
