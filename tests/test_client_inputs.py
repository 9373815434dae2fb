"""fl-client's own inputs: the coordinator address (strict, hypothesis) and the data check (--check builds the arrays)."""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clients.cli import SetupError, check_data, parse_address  # noqa: E402

# --------------------------------------------------------------------------- addresses

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_label = st.builds(lambda first, mid, last: first + mid + last,
                   st.sampled_from(_LETTERS + "0123456789"),
                   st.text(_LETTERS + "0123456789-", max_size=20),
                   st.sampled_from(_LETTERS + "0123456789")) | st.sampled_from(list(_LETTERS))
_tld = st.text(_LETTERS, min_size=1, max_size=6)
_dns = st.builds(lambda labels, tld: ".".join([*labels, tld]), st.lists(_label, max_size=4), _tld)
_ipv4 = st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))
_ipv6 = st.integers(0, 2**128 - 1).flatmap(
    lambda i: st.sampled_from([ipaddress.IPv6Address(i).compressed, ipaddress.IPv6Address(i).exploded]))
_port = st.integers(1, 65535)
_host = st.one_of(_dns, _ipv4, _ipv6.map(lambda h: f"[{h}]"))
_valid = st.tuples(_host, _port)


def _addr(host: str, port) -> str:
    return f"{host}:{port}"


@settings(max_examples=150, deadline=None)
@given(_valid)
def test_every_valid_address_is_accepted(hp):
    host, port = hp
    got_host, got_port = parse_address(_addr(host, port))
    assert (got_host, got_port) == (host.strip("[]"), port)


#: Ways a new user mistypes an address; each turns any valid address into a malformed one.
MUTATIONS = {
    "space inside": lambda h, p: f"{h} :{p}",
    "leading space": lambda h, p: f" {h}:{p}",
    "trailing space": lambda h, p: f"{h}:{p} ",
    "tab": lambda h, p: f"{h}:\t{p}",
    "arabic-indic port": lambda h, p: f"{h}:{str(p).translate(str.maketrans('0123456789', '٠١٢٣٤٥٦٧٨٩'))}",
    "fullwidth port": lambda h, p: f"{h}:{str(p).translate(str.maketrans('0123456789', '０１２３４５６７８９'))}",
    "superscript port digit": lambda h, p: f"{h}:{p}²",
    "empty host": lambda h, p: f":{p}",
    "brackets only": lambda h, p: f"[]:{p}",
    "no port": lambda h, p: h,
    "empty port": lambda h, p: f"{h}:",
    "port 0": lambda h, p: f"{h}:0",
    "port too large": lambda h, p: f"{h}:{65536 + p}",
    "leading zero": lambda h, p: f"{h}:0{p}",
    "signed port": lambda h, p: f"{h}:+{p}",
    "https scheme": lambda h, p: f"https://{h}:{p}",
    "grpc scheme": lambda h, p: f"grpc://{h}:{p}",
    "path": lambda h, p: f"{h}:{p}/",
    "user info": lambda h, p: f"node@{h}:{p}",
    "unclosed bracket": lambda h, p: f"[{h.strip('[]')}:{p}",
    "unopened bracket": lambda h, p: f"{h.strip('[]')}]:{p}",
    "double brackets": lambda h, p: f"[[{h.strip('[]')}]]:{p}",
    "two ports": lambda h, p: f"{h}:{p}:{p}",
    "non-ascii host": lambda h, p: f"{h.strip('[]')}é:{p}" if not h.startswith("[") else f"[{h[1:-1]}é]:{p}",
    "cyrillic lookalike": lambda h, p: f"сoord.{h.strip('[]')}:{p}",
    "underscore host": lambda h, p: f"my_{h.strip('[]')}:{p}",
    "label starts with hyphen": lambda h, p: f"-x.{h.strip('[]')}:{p}" if not h.startswith("[") else f"-{h}:{p}",
    "label of 64 chars": lambda h, p: f"{'a' * 64}.example:{p}",
    "double dot": lambda h, p: f"a..{h.strip('[]')}:{p}" if not h.startswith("[") else f"a..b:{p}",
    "trailing dot": lambda h, p: f"{h.strip('[]')}.:{p}" if not h.startswith("[") else f"{h}.:{p}",
    "ipv6 without brackets": lambda h, p: f"2001:db8::1:{p}",
    "bracketed ipv4": lambda h, p: f"[10.0.0.1]:{p}",
    "bracketed name": lambda h, p: f"[coord.city.example]:{p}",
    "bad ipv4": lambda h, p: f"10.0.0.256:{p}",
    "short ipv4": lambda h, p: f"10.0.1:{p}",
    "ipv4 leading zero": lambda h, p: f"10.0.0.01:{p}",
    "bad ipv6": lambda h, p: f"[2001:db8:::1]:{p}",
    "ipv6 zone": lambda h, p: f"[fe80::1%eth0]:{p}",
    "newline": lambda h, p: f"{h}:{p}\n",
    "nul": lambda h, p: f"{h}\x00:{p}",
}


@settings(max_examples=200, deadline=None)
@given(_valid, st.sampled_from(sorted(MUTATIONS)))
def test_no_malformed_address_gets_through(hp, mutation):
    bad = MUTATIONS[mutation](*hp)
    with pytest.raises(SetupError) as info:
        parse_address(bad)
    msg = str(info.value)
    assert msg.startswith(f"--coordinator {bad!r}:"), msg  # the value, exactly as given
    assert "fix:" in msg and "HOST:PORT" in msg


def _oracle(value: str) -> bool:
    """An independent statement of what a valid address is."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([1-9][0-9]{0,4})", value)
    if m:
        try:
            ipaddress.IPv6Address(m.group(1))
        except ValueError:
            return False
        return int(m.group(2)) <= 65535
    m = re.fullmatch(r"([A-Za-z0-9.-]+):([1-9][0-9]{0,4})", value)
    if not m or int(m.group(2)) > 65535:
        return False
    host = m.group(1)
    if re.fullmatch(r"[0-9.]+", host):
        return re.fullmatch(r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}", host) is not None
    labels = host.split(".")
    return (len(host) <= 253 and all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", lb) for lb in labels)
            and not labels[-1].isdigit())


@settings(max_examples=250, deadline=None)
@given(st.text(alphabet="ab1029.-:[]/ %@٣é\t", max_size=24)
       | st.builds(lambda h, p, junk, i: (_addr(h, p)[:i] + junk + _addr(h, p)[i:]), _host, _port,
                   st.text(alphabet=":[].-0 9a٣", min_size=1, max_size=2), st.integers(0, 60)))
def test_accepted_means_valid(value):
    try:
        host, port = parse_address(value)
    except SetupError as exc:
        assert str(exc).startswith(f"--coordinator {value!r}:")
        assert not _oracle(value), value
    else:
        assert _oracle(value), value
        assert value in (f"{host}:{port}", f"[{host}]:{port}")


def test_address_messages_say_what_is_wrong():
    cases = {
        "https://coord.city.example:9092": "no scheme",
        "[2001:db8::1:9092": "unbalanced",
        "coord.city.example:٩٠٩٢": "ASCII digits",
        "coord.city.example:0": "1-65535",
        "coord.city.example:70000": "1-65535",
        ":9092": "empty host",
        "coord city:9092": "space",
        "2001:db8::1:9092": "in brackets",
        "[10.0.0.1]:9092": "only around an IPv6",
        "coord.city.example": "no port",
        "coord_city.example:9092": "contains '_'",
        "coord.-city.example:9092": "not a valid host name",
    }
    for value, needle in cases.items():
        with pytest.raises(SetupError) as info:
            parse_address(value)
        assert needle in str(info.value), (value, str(info.value))


# --------------------------------------------------------------------------- data check


def _heart(n_per_class: int, site: str = "Tiny") -> pd.DataFrame:
    rng = np.random.default_rng(1)
    n = 2 * n_per_class
    return pd.DataFrame({
        "age": rng.integers(30, 80, n), "sex": rng.choice(["Male", "Female"], n), "dataset": site,
        "cp": "asymptomatic", "trestbps": rng.integers(100, 160, n).astype(float), "chol": 200.0,
        "fbs": False, "restecg": "normal", "thalch": 150.0, "exang": False, "oldpeak": 1.0,
        "num": [0, 1] * n_per_class,
    })


def test_check_builds_the_sites_arrays_and_counts(tmp_path):
    path = tmp_path / "tiny.csv"
    _heart(30).to_csv(path, index=False)
    report = check_data("health", str(path), "Tiny")
    from citydata import HeartDisease

    site = HeartDisease(path).site_data("Tiny")  # each patient's side: a hash of its own record (about 1/3 test)
    n_train, n_test = len(site.train), len(site.test)
    assert n_train + n_test == 60 and 10 <= n_test <= 30
    assert (report.records, report.train, report.test) == (60, n_train, n_test)
    assert report.unit == "records" and report.x_shape == (n_train, 15)
    assert f"60 records -> {n_train} training and {n_test} test records" in report.summary()
    counts = check_data("traffic", "bundled", "detector-1")
    assert counts.unit == "windows" and counts.x_shape[1:] == (32, 5) and counts.train > 1000


# 4 patients: each one's side is a hash of its own record, so the split itself may already fail (all on one
# side, or one class in training) before the 16-record minimum does; every such refusal names the hospital
@pytest.mark.parametrize(("n_per_class", "needles"), [(1, ("cannot split",)),
                                                      (2, ("cannot split", "at least 16 training records", "one class")),
                                                      (10, ("at least 16 training records",))])
def test_check_refuses_sites_that_cannot_train(tmp_path, n_per_class, needles):
    path = tmp_path / "tiny.csv"
    _heart(n_per_class).iloc[: max(1, 2 * n_per_class - (1 if n_per_class == 1 else 0))].to_csv(path, index=False)
    with pytest.raises(SetupError) as info:
        check_data("health", str(path), "Tiny")
    msg = str(info.value)
    assert msg.startswith(f"--data {path}:") and "'Tiny'" in msg and any(n in msg for n in needles), msg


def test_check_refuses_single_class_and_reports_warnings(tmp_path):
    f = _heart(30)
    f["num"] = 0
    f.to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(SetupError, match=r"'Tiny': all \d+ training patients have no heart disease"):
        check_data("health", str(tmp_path / "one.csv"), "Tiny")
    g = _heart(30)
    g.loc[3, "chol"] = np.nan
    g = pd.concat([g, g.iloc[[5]]], ignore_index=True)
    g.to_csv(tmp_path / "warn.csv", index=False)
    report = check_data("health", str(tmp_path / "warn.csv"), "Tiny")
    text = " | ".join(report.warnings)
    assert "dropped 1 of 61 rows that repeat an earlier row" in text and "imputed 1 missing value" in text


@pytest.mark.parametrize("kind", ["dir", "device"])
def test_check_names_directories_and_devices(tmp_path, kind):
    target = str(tmp_path) if kind == "dir" else os.devnull
    with pytest.raises(SetupError) as info:
        check_data("health", target, "Tiny")
    msg = str(info.value)
    assert ("is a directory" if kind == "dir" else "is a character device") in msg and "not found" not in msg
    assert msg.startswith(f"--data {target}:") and "fix:" in msg


def test_check_date_format_and_ranges_options(tmp_path):
    t = pd.date_range("2024-04-01", periods=96 * 3, freq="15min")
    f = pd.DataFrame({"timestamp": t.strftime("%d/%m/%Y %H:%M"), "detector": 5, "total": np.arange(len(t)) % 30})
    f.to_csv(tmp_path / "dmy.csv", index=False)
    with pytest.raises(SetupError, match=r"column 'timestamp'.*--date-format DMY"):
        check_data("traffic", str(tmp_path / "dmy.csv"), "detector-5")
    assert check_data("traffic", str(tmp_path / "dmy.csv"), "detector-5", date_format="DMY",
                      test_start="2024-04-03 06:00").train > 16
    with pytest.raises(SetupError, match=r"^--date-format 'dd/mm': unknown date format"):
        check_data("traffic", str(tmp_path / "dmy.csv"), "detector-5", date_format="dd/mm")
    bad = tmp_path / "ranges.toml"
    bad.write_text("[totl]\nmax = 5\n")
    with pytest.raises(SetupError, match=r"^--ranges .*ranges.toml: .*did you mean 'total'"):
        check_data("traffic", str(tmp_path / "dmy.csv"), "detector-5", date_format="DMY", ranges=str(bad))
