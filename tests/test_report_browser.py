"""The report of a real short run, opened in a real browser (headless Chromium).

A 2-round health federation runs in process (DP-SGD to epsilon 3 per hospital, DP evaluation
releases, the coordinator scoring each hospital's test split); its report.html is loaded by
Debian's ``chromium`` (``--dump-dom`` and ``--screenshot``): the page loads, its tables show the
values in results.json and the ledgers, no raw JSON reaches the DOM, every plot it names exists.

Skipped, with that reason, only when no ``chromium`` (or ``chromium-browser``) binary is on
PATH: CI images may not have one (``apt-get install -y chromium`` installs it on Debian).
"""

import html
import json
import re

import pytest

from chromium import needs_chromium, png_size, shot  # noqa: E402

pytestmark = needs_chromium("the browser check of report.html")

SITES = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report-run")
    results = shot.short_run(out, rounds=2)
    assert json.loads((out / "results.json").read_text())["status"] == "completed"
    return out, results, shot.dump_dom(out / "report.html")


def _tables(dom: str) -> dict[str, list[list[str]]]:
    """``{h2 heading: rows of cell texts}`` of the first table after each heading."""
    out = {}
    for part in re.split(r"<h2>", dom)[1:]:
        heading = html.unescape(part.split("</h2>", 1)[0])
        m = re.search(r"<table.*?</table>", part, flags=re.S)
        if not m:
            continue
        rows = []
        for tr in re.findall(r"<tr.*?</tr>", m.group(0), flags=re.S):
            cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr, flags=re.S)
            rows.append([" ".join(html.unescape(re.sub(r"<[^>]+>", " ", c)).split()) for c in cells])
        out[heading] = rows
    return out


def test_the_page_loads_and_shows_results_json_values(run):
    out, res, dom = run
    assert "<h1>cityfed run report: health</h1>" in dom and "</html>" in dom
    tables = _tables(dom)
    rounds = tables["Rounds"]
    head = rounds[0]
    assert head[:3] == ["round", "nodes asked", "updates accepted"] and "training time" in head
    exact = head.index("accuracy, exact (coordinator)")
    for e, row in zip(res["rounds"], rounds[1:]):
        assert row[0] == str(e["round"]) and row[2] == str(e["train"]["accepted"])
        assert row[exact] == f"{e['central']['accuracy']:.3f}"
        assert row[head.index("training time")].endswith(" s")
    sites = tables["Sites"]
    col = {h: i for i, h in enumerate(sites[0])}
    last = res["rounds"][-1]
    by_site = {r[0]: r for r in sites[1:]}
    assert set(by_site) == set(SITES)
    for node in last["train"]["nodes"].values():
        row = by_site[SITES[int(node["partition-id"])]]
        assert row[col["training records"]] == str(node["num-examples"])
        assert float(row[col["ε reported by the node"]]) == pytest.approx(
            max(float(e[p]["nodes"][n]["epsilon"]) for e in res["rounds"] for p in ("train", "evaluate")
                for n in e[p]["nodes"] if e[p]["nodes"][n]["partition-id"] == node["partition-id"]), abs=5e-4)
    for site, m in last["central-sites"].items():
        assert by_site[site][col["accuracy after the last round"]] == f"{m['accuracy']:.3f}"
    # epsilon and delta per site and per mechanism, from the ledgers
    priv = tables["Privacy per site and mechanism"]
    mechs = {(r[0], r[1]) for r in priv[1:]}
    for site in SITES:
        assert (site, "DP-SGD (model update)") in mechs and (site, "Gaussian release: evaluation metrics") in mechs
    from privacy.ledger import PrivacyLedger

    led = PrivacyLedger(out / "ledgers" / "health-Cleveland.sqlite")
    delta = led.releases("Cleveland")[0]["delta"]
    composed = next(r for r in priv if r[:2] == ["Cleveland", "all mechanisms, this run (composed, RDP)"])
    assert composed[6] == f"{delta:.2e}" and float(composed[7]) == pytest.approx(led.epsilon("Cleveland", delta), abs=5e-4)
    audit = tables["Audit"]
    assert all("within target" in " ".join(r) for r in audit[1:]) and len(audit) == 5


def test_no_raw_json_in_the_rendered_dom_and_plots_exist(run):
    out, _, dom = run
    text = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<style>.*?</style>", "", dom, flags=re.S)))
    assert not re.search(r"[{}\[\]]", text), re.findall(r".{0,40}[{}\[\]].{0,40}", text)[:3]
    assert 'class="error"' not in dom
    imgs = re.findall(r'<img src="([^"]+)"', dom)
    assert {"metric.png", "epsilon.png", "round-time.png"} <= set(imgs)
    assert all((out / i).stat().st_size > 5000 for i in imgs)


def test_screenshot_renders(run, tmp_path):
    out, _, _ = run
    png = shot.screenshot(out / "report.html", tmp_path / "report.png", 1280, 2400)
    data = png.read_bytes()
    width, height = png_size(data)
    assert (width, height) == (1280, 2400) and len(data) > 50_000  # a rendered page, not a blank one
