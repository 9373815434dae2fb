"""The operator console in a real browser (Debian's headless Chromium) over real HTTP.

``fl-server console``'s app is served by uvicorn on 127.0.0.1 (a free port) over the folder of
a real 2-round health run (as in ``tests/test_console.py``; the coordinator's answers stood in
with Flower's JSON). Chromium logs in with the token link, loads the overview, the run page,
the nodes and audit pages, the run's report and its model card: each page loads
(``--dump-dom``), its figures are results.json's, the browser logs no console message (errors, CSP violations: captured
from ``--enable-logging=stderr``), and a screenshot renders.

Set ``CITYFED_CONSOLE_SCREENSHOTS=docs/img`` to also write the screenshots shown in the README
(``console-overview.png``, ``console-run.png``).

Skipped, with that reason, only when no ``chromium`` (or ``chromium-browser``) binary is on
PATH: CI images may not have one (``apt-get install -y chromium`` installs it on Debian).
"""

import html
import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import server.cli as server_cli
from server import console

from chromium import needs_chromium, png_size, shot  # noqa: E402

pytestmark = needs_chromium("the browser check of the operator console")

from test_console import (FOLDER, RUN_ID, SITES, FakeCoordinator, _flower_node, _iso,  # noqa: E402
                                _last_reported_eps, _points, _table, real_run)  # noqa: F401 - fixture

CONSOLE_LINE = re.compile(r":CONSOLE(?::\d+|\(\d+\))\] (.*)")


def _chromium(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [shot.find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def browse(url: str) -> tuple[str, list[str]]:
    """``(DOM after load, console messages)`` of ``url`` in headless Chromium."""
    p = _chromium(["--dump-dom", url])
    return p.stdout, CONSOLE_LINE.findall(p.stderr)


def screenshot(url: str, png: Path, width: int, height: int) -> tuple[bytes, list[str]]:
    png.parent.mkdir(parents=True, exist_ok=True)
    p = _chromium([f"--screenshot={png}", f"--window-size={width},{height}", url])
    return png.read_bytes(), CONSOLE_LINE.findall(p.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(real_run, tmp_path_factory):
    """The console on http://127.0.0.1:<port> over a coordinator state dir holding the real run."""
    import shutil
    from datetime import timedelta

    import uvicorn

    src, launched = real_run
    sd = tmp_path_factory.mktemp("console-browser") / "state"
    runs = sd / "runs"
    shutil.copytree(src, runs / FOLDER)
    res = json.loads((runs / FOLDER / "results.json").read_text())
    (runs / FOLDER / "launch.json").write_text(json.dumps({"config": res["config"], "run-ids": [RUN_ID],
                                                           "launched": [_iso(launched)]}))
    ids = sorted(res["rounds"][0]["train"]["nodes"], key=int)
    names = {nid: SITES[int(res["rounds"][0]["train"]["nodes"][nid]["partition-id"])] for nid in ids}
    (sd / "nodes.json").write_text(json.dumps({nid: {"name": f"hospital {names[nid]}", "fingerprint": f"SHA256:{nid * 8}"}
                                               for nid in ids}))
    server_cli.record(sd, "run", argv=["fl-server", "run", "-d", "health"], **{"run-id": RUN_ID}, department="health",
                      folder=FOLDER)
    fake = FakeCoordinator(
        runs=[{"run-id": RUN_ID, "status": "finished:completed", "elapsed": 41.5, "pending-at": _iso(launched),
               "finished-at": _iso(launched + timedelta(seconds=42))}],
        nodes=[_flower_node(nid, "online") for nid in ids])
    saved = server_cli.flwr
    server_cli.flwr = fake
    token = console.load_token(sd)
    port = _free_port()
    app = console.make_app(sd, runs, token=token, refresh=0, cache_s=0)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{port}", token, sd, res
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        server_cli.flwr = saved


def _login(base: str, token: str, page: str) -> str:
    return f"{base}/login?token={token}&next={page}"


def test_console_messages_are_captured():
    """The capture works: a page that logs an error is seen (else 'no console message' proves nothing)."""
    _, msgs = browse('data:text/html,<script>console.error("captured-" + 42)</script>')
    assert any("captured-42" in m for m in msgs), msgs


def test_overview_in_the_browser(served):
    base, token, sd, res = served
    dom, msgs = browse(_login(base, token, "/"))
    assert msgs == []
    assert "<h1>Overview</h1>" in dom and "cityfed operator console" in dom
    nodes = _table(dom, "node ID")
    col = {h: i for i, h in enumerate(nodes[0])}
    eps = _last_reported_eps(res)
    assert {r[0]: float(r[col["ε spent, as reported by the node"]]) for r in nodes[1:]} == pytest.approx(eps, abs=5e-4)
    assert all(r[col["status"]] == "online" for r in nodes[1:])
    row = _table(dom, "run folder")[1]
    assert row[:5] == [FOLDER, RUN_ID, "health", "finished:completed", "completed"] and row[5] == "2 of 2"
    assert "verified" in dom and "NOT VERIFIED" not in dom
    # unauthenticated: the login form, nothing else
    dom, msgs = browse(f"{base}/")
    assert msgs == [] and "Log in" in dom and FOLDER not in dom


def test_run_page_in_the_browser(served):
    base, token, _, res = served
    dom, msgs = browse(_login(base, token, f"/runs/{FOLDER}"))
    assert msgs == []
    pts = _points(dom)
    for e in res["rounds"]:
        for site, m in e["central-sites"].items():
            assert pts[("accuracy per site (coordinator-held test data, exact)", site)][e["round"]] == pytest.approx(m["accuracy"])
        for nid, m in e["evaluate"]["nodes"].items():
            name = f"hospital {SITES[int(m['partition-id'])]} (node {nid})"
            assert pts[("ε reported per site", name)][e["round"]] == pytest.approx(
                max(m["epsilon"], e["train"]["nodes"][nid]["epsilon"]))
    sites = _table(dom, "site")
    assert {r[0]: r[2] for r in sites[1:]} == {s: f"{m['accuracy']:.3f}" for s, m in res["rounds"][-1]["central-sites"].items()}
    # the run's report opens from the page, with its plots
    rep, msgs = browse(_login(base, token, f"/runs/{FOLDER}/report.html"))
    assert msgs == [] and "<h1>cityfed run report: health</h1>" in rep
    import urllib.request

    for img in re.findall(r'<img src="([^"]+)"', rep):
        req = urllib.request.Request(f"{base}/runs/{FOLDER}/{img}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200 and r.read(8) == b"\x89PNG\r\n\x1a\n"


def test_nodes_audit_and_model_card_pages_in_the_browser(served):
    base, token, _, _ = served
    dom, msgs = browse(_login(base, token, "/audit"))
    assert msgs == [] and "<h1>Coordinator audit log</h1>" in dom
    rows = _table(dom, "seq")
    assert rows[1][:3] == ["1", rows[1][1], "run"] and f"run-id={RUN_ID}" in html.unescape(rows[1][3])
    dom, msgs = browse(_login(base, token, "/nodes"))
    assert msgs == [] and len(_table(dom, "node ID")) == 1 + len(SITES)
    dom, msgs = browse(_login(base, token, f"/runs/{FOLDER}/model-card"))
    assert msgs == [] and "# Model card: run" in html.unescape(dom) and "## Energy" in dom


def test_screenshots_render(served, tmp_path):
    base, token, _, _ = served
    out = Path(os.environ.get("CITYFED_CONSOLE_SCREENSHOTS") or tmp_path)
    for name, page, h in (("console-overview.png", "/", 820), ("console-run.png", f"/runs/{FOLDER}", 1500)):
        data, msgs = screenshot(_login(base, token, page), out / name, 1280, h)
        assert msgs == []
        assert png_size(data) == (1280, h) and len(data) > 40_000, name  # a rendered page, not a blank one
