"""The operator console (``fl-server console``, :mod:`server.console`) over a real run folder.

A real 2-round health federation runs in process (DP-SGD to epsilon 3 per hospital, DP
evaluation releases, the coordinator scoring each hospital's test split); its folder is laid
out as ``fl-server run`` leaves one (``launch.json`` with a Flower run ID) in a coordinator
state dir with a real signed audit log. The coordinator's answers (``flwr supernode ls``,
``flwr ls``, ``flwr stop``, ``flwr log``) are stood in for with records in Flower 1.41's JSON
format: there is no SuperLink in this test. Everything else is the real code path: the
console's pages, the CLI's ``list_nodes`` / ``list_runs`` / ``stop_run`` / ``_stopped_results``,
the checkpoint, the audit log.
"""

import html
import importlib.util
import json
import os
import re
import shutil
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

import server.cli as server_cli
from server import console, console_pages

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("report_screenshot", ROOT / "benchmarks" / "report_screenshot.py")
shot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shot)

SITES = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
FOLDER = "health-demo"
RUN_ID = "7001"


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="seconds")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real 2-round health run folder (results.json, checkpoint, ledgers, report.html)."""
    out = tmp_path_factory.mktemp("console-run") / "run"
    launched = datetime.now(timezone.utc) - timedelta(seconds=5)
    results = shot.short_run(out, rounds=2)
    assert results["status"] == "completed"
    return out, launched


class FakeCoordinator:
    """Flower 1.41's JSON answers for ``flwr supernode ls`` / ``ls`` / ``stop`` / ``log`` (no SuperLink here)."""

    def __init__(self, runs: list[dict], nodes: list[dict], down: bool = False):
        self.runs, self.nodes, self.down, self.calls = runs, nodes, down, []

    def __call__(self, state_dir, *args, **kw):
        self.calls.append(args)
        if self.down:
            raise server_cli.CliError("`flwr ls` failed: connection refused", 3)
        if args[:2] == ("supernode", "ls"):
            return {"success": True, "nodes": [dict(n) for n in self.nodes]}
        if args[0] == "ls":
            return {"success": True, "runs": [dict(r) for r in self.runs]}
        if args[0] == "stop":
            return {"success": True}
        if args[0] == "log":
            return "INFO :      [ROUND 1]\nINFO :      <aggregated> & done\n"
        raise AssertionError(args)


def _flower_node(nid: str, status: str) -> dict:
    return {"node-id": nid, "owner-name": "<none>", "status": status, "created-at": "2026-12-03 10:00:00Z",
            "online-at": "2026-12-03 10:00:05Z", "online-elapsed": 60.0,
            "offline-at": "2026-12-03 10:30:00Z" if status == "offline" else "N/A", "deleted-at": "N/A"}


@pytest.fixture
def coord(real_run, tmp_path, monkeypatch):
    """A coordinator state dir with the run folder, node labels, a real audit log, and the stand-in flwr."""
    src, launched = real_run
    sd = tmp_path / "state"
    runs = sd / "runs"
    shutil.copytree(src, runs / FOLDER)
    res = json.loads((runs / FOLDER / "results.json").read_text())
    cfg = {k: v for k, v in res["config"].items() if k not in ("resume",)}
    (runs / FOLDER / "launch.json").write_text(json.dumps({"config": cfg, "run-ids": [RUN_ID],
                                                           "launched": [_iso(launched)]}))
    node_ids = sorted(res["rounds"][0]["train"]["nodes"], key=int)
    (sd / "nodes.json").write_text(json.dumps({nid: {"name": f"{SITES[int(res['rounds'][0]['train']['nodes'][nid]['partition-id'])]}"
                                                     f"<b>", "fingerprint": f"SHA256:fp{nid}"} for nid in node_ids}))
    server_cli.record(sd, "run", argv=["fl-server", "run"], **{"run-id": RUN_ID}, department="health", folder=FOLDER)
    fake = FakeCoordinator(
        runs=[{"run-id": RUN_ID, "status": "finished:completed", "elapsed": 41.5, "pending-at": _iso(launched),
               "finished-at": _iso(launched + timedelta(seconds=42))}],
        nodes=[_flower_node(nid, "online" if i else "offline") for i, nid in enumerate(node_ids)])
    monkeypatch.setattr(server_cli, "flwr", fake)
    monkeypatch.delenv("CITYFED_AUDIT_LOG", raising=False)
    return sd, runs, res, fake


def _client(sd: Path, runs: Path, login: bool = True, **kw):
    from fastapi.testclient import TestClient

    token = console.load_token(sd)
    app = console.make_app(sd, runs, token=token, cache_s=0, stop_wait=5, **kw)
    c = TestClient(app, base_url="http://127.0.0.1:8090")
    if login:
        r = c.get("/login", params={"token": token}, follow_redirects=False)
        assert r.status_code == 303 and console.COOKIE in r.cookies
    return c, app, token


def _text(page: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def _table(page: str, first_header: str, second: str | None = None) -> list[list[str]]:
    """Rows (cell texts) of the first table whose first header cell is ``first_header`` (and second ``second``)."""
    for t in re.findall(r"<table.*?</table>", page, flags=re.S):
        rows = [[" ".join(html.unescape(re.sub(r"<[^>]+>", " ", c)).split())
                 for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr, flags=re.S)]
                for tr in re.findall(r"<tr.*?</tr>", t, flags=re.S)]
        if rows and rows[0] and rows[0][0] == first_header and (second is None or rows[0][1:2] == [second]):
            return rows
    raise AssertionError(f"no table starting with {first_header!r}")


def _points(page: str) -> dict[tuple[str, str], dict[int, float]]:
    """``{(chart title, series): {round: value}}`` from the inline SVG charts."""
    out = {}
    for svg in re.findall(r"<svg.*?</svg>", page, flags=re.S):
        title = html.unescape(re.search(r'aria-label="([^"]*)"', svg).group(1))
        for name, rnd, val in re.findall(r'data-series="([^"]*)" data-round="(\d+)" data-value="([^"]*)"', svg):
            out.setdefault((title, html.unescape(name)), {})[int(rnd)] = float(val)
    return out


# --------------------------------------------------------------------------- access


def test_every_page_needs_the_admin_token(coord):
    sd, runs, _, _ = coord
    c, _, token = _client(sd, runs, login=False)
    for path in ("/", "/nodes", "/runs", "/audit", f"/runs/{FOLDER}", f"/runs/{FOLDER}/report.html"):
        r = c.get(path)
        assert r.status_code == 401 and "Log in" in r.text and "Cleveland" not in r.text, path
    assert c.get("/login", params={"token": "wrong-" + token}).status_code == 403
    assert c.get("/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    r = c.post("/login", data={"token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.cookies[console.COOKIE]
    assert token not in cookie
    assert c.get("/runs").status_code == 200
    # the login link may name the page to go to, never another site
    assert c.get("/login", params={"token": token, "next": f"/runs/{FOLDER}"}, follow_redirects=False).headers["location"] == f"/runs/{FOLDER}"
    assert c.get("/login", params={"token": token, "next": "//evil.example/"}, follow_redirects=False).headers["location"] == "/"
    # a page with a foreign Host header (DNS rebinding) is refused
    assert c.get("/", headers={"Host": "evil.example"}).status_code == 421


def test_pages_forbid_scripts_and_framing(coord):
    sd, runs, _, _ = coord
    c, _, _ = _client(sd, runs)
    r = c.get("/")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "frame-ancestors 'none'" in csp
    assert "<script" not in r.text.lower() and "http://" not in r.text and "https://" not in r.text


def test_token_file_is_private(tmp_path):
    tok = console.load_token(tmp_path)
    path = tmp_path / console.TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(tok) >= 32
    assert console.load_token(tmp_path) == tok  # kept across starts
    path.chmod(0o644)
    with pytest.raises(console.ConsoleError, match="chmod 600"):
        console.load_token(tmp_path)


# --------------------------------------------------------------------------- bind


def test_non_loopback_bind_refused_without_the_flag_and_https(tmp_path):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        console.check_bind(host, allow_remote=False, certfile=None, keyfile=None)
    for host in ("0.0.0.0", "10.1.2.3", "::", "coordinator.city.example"):
        with pytest.raises(console.ConsoleError, match="--allow-remote"):
            console.check_bind(host, allow_remote=False, certfile=None, keyfile=None)
        with pytest.raises(console.ConsoleError, match="--certfile"):
            console.check_bind(host, allow_remote=True, certfile=None, keyfile=None)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    console.check_bind("10.1.2.3", allow_remote=True, certfile=cert, keyfile=key)
    with pytest.raises(console.ConsoleError, match="go together"):
        console.check_bind("10.1.2.3", allow_remote=True, certfile=cert, keyfile=None)


def test_cli_refuses_a_non_loopback_bind(tmp_path):
    r = CliRunner().invoke(server_cli.app, ["console", "--host", "0.0.0.0", "--state-dir", str(tmp_path)])
    assert r.exit_code == 2 and "--allow-remote" in r.output
    r = CliRunner().invoke(server_cli.app, ["console", "--host", "0.0.0.0", "--allow-remote", "--state-dir", str(tmp_path)])
    assert r.exit_code == 2 and "--certfile" in r.output
    assert not (tmp_path / console.TOKEN_FILE).exists()  # refused before anything is made
    r = CliRunner().invoke(server_cli.app, ["console", "--state-dir", str(tmp_path / "typo")])
    assert r.exit_code == 2 and "no such folder" in r.output and not (tmp_path / "typo").exists()


# --------------------------------------------------------------------------- content


def _last_reported_eps(res: dict) -> dict[str, float]:
    """Each node's epsilon in its latest reply (the evaluate reply follows the train reply)."""
    out = {}
    for e in res["rounds"]:
        for ph in ("train", "evaluate"):
            for nid, m in e[ph]["nodes"].items():
                out[nid] = m["epsilon"]
    return out


def test_overview_shows_nodes_runs_and_audit_log(coord):
    sd, runs, res, _ = coord
    c, _, _ = _client(sd, runs)
    page = c.get("/").text
    nodes = _table(page, "node ID")
    head = nodes[0]
    assert "ε spent, as reported by the node" in head
    col = {h: i for i, h in enumerate(head)}
    eps = _last_reported_eps(res)
    assert {r[0] for r in nodes[1:]} == set(eps)
    for row in nodes[1:]:
        assert float(row[col["ε spent, as reported by the node"]]) == pytest.approx(eps[row[0]], abs=5e-4)
        assert row[col["reported in"]].replace(" ,", ",") == f"{FOLDER}, round 2"
        assert row[col["name"]].endswith("<b>") and row[col["key fingerprint"]] == f"SHA256:fp{row[0]}"
    assert "<b>" not in page.replace("&lt;b&gt;", "")  # the node name is escaped, never markup
    statuses = sorted(r[col["status"]] for r in nodes[1:])
    assert statuses == ["offline", "online", "online", "online"]
    offline = next(r for r in nodes[1:] if r[col["status"]] == "offline")
    assert offline[col["last seen"]].startswith("2026-12-03 10:30:00 UTC")
    runs_t = _table(page, "run folder")
    assert runs_t[1][:5] == [FOLDER, RUN_ID, "health", "finished:completed", "completed"]
    assert runs_t[1][5] == "2 of 2"
    text = _text(page)
    assert "verified" in text and "NOT VERIFIED" not in text and "(1 entries checked; signatures checked against audit.pub)" in text


def test_run_page_figures_match_results_json(coord):
    sd, runs, res, _ = coord
    c, _, _ = _client(sd, runs)
    page = c.get(f"/runs/{FOLDER}").text
    pts = _points(page)
    central = {s: v for (t, s), v in pts.items() if t.endswith("(coordinator-held test data, exact)")}
    assert set(central) == set(SITES)
    for e in res["rounds"]:
        for site, m in e["central-sites"].items():
            assert central[site][e["round"]] == pytest.approx(m["accuracy"], rel=1e-12)
    labels = json.loads((sd / "nodes.json").read_text())
    eps = {s: v for (t, s), v in pts.items() if t == "ε reported per site"}
    released = {s: v for (t, s), v in pts.items() if t.startswith("accuracy per site (node releases")}
    for e in res["rounds"]:
        for nid, m in e["evaluate"]["nodes"].items():
            name = f"{labels[nid]['name']} (node {nid})"
            assert released[name][e["round"]] == pytest.approx(m["accuracy"], rel=1e-12)
            assert eps[name][e["round"]] == pytest.approx(max(m["epsilon"], e["train"]["nodes"][nid]["epsilon"]), rel=1e-12)
    # the target line is drawn where DP is on
    assert "target ε 3" in page
    sites = _table(page, "site")
    last = res["rounds"][-1]["central-sites"]
    assert {r[0]: r[2] for r in sites[1:]} == {s: f"{m['accuracy']:.3f}" for s, m in last.items()}
    rounds = _table(page, "round")
    assert [r[:3] for r in rounds[1:]] == [[str(e["round"]), str(len(e["train"]["nodes"])), str(e["train"]["accepted"])]
                                          for e in res["rounds"]]
    assert "None: no node refused a job." in page and "figures from" in page
    assert "Stop run" not in page  # a finished run has no stop button
    # links: report, results.json, log; the report and its plots are served from the run folder
    for href in (f"/runs/{FOLDER}/report.html", f"/runs/{FOLDER}/results.json", f"/runs/{FOLDER}/log"):
        assert f'href="{href}"' in page
    rep = c.get(f"/runs/{FOLDER}/report.html")
    assert rep.status_code == 200 and "cityfed run report" in rep.text
    img = c.get(f"/runs/{FOLDER}/metric.png")
    assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ROUND 1" in c.get(f"/runs/{FOLDER}/log").text


def test_model_card_linked_when_present_and_other_files_not_served(coord):
    sd, runs, _, _ = coord
    c, _, _ = _client(sd, runs)
    assert "exported model card" not in c.get(f"/runs/{FOLDER}").text
    (runs / FOLDER / "model_card.json").write_text(json.dumps({"run-id": RUN_ID}))
    assert f'href="/runs/{FOLDER}/model_card.json"' in c.get(f"/runs/{FOLDER}").text
    assert c.get(f"/runs/{FOLDER}/model_card.json").json() == {"run-id": RUN_ID}
    (sd / "secret.png").write_bytes(b"\x89PNG")
    for path in (f"/runs/{FOLDER}/launch.json", f"/runs/{FOLDER}/model.safetensors", f"/runs/{FOLDER}/..%2Fsecret.png",
                 f"/runs/{FOLDER}/checkpoint.safetensors", "/runs/nope/report.html", "/runs/..%2F/secret.png"):
        assert c.get(path).status_code == 404, path


def _make_live(runs: Path, res: dict, planned: int = 5) -> None:
    """The run folder as it is while the run goes on: results.json older than the latest launch."""
    launch = json.loads((runs / FOLDER / "launch.json").read_text())
    launch["config"]["num-rounds"] = planned
    launch["launched"] = [_iso(datetime.now(timezone.utc) + timedelta(seconds=30))]
    (runs / FOLDER / "launch.json").write_text(json.dumps(launch))


def test_live_run_progress_from_the_checkpoint(coord):
    sd, runs, res, fake = coord
    _make_live(runs, res)
    fake.runs[0].update({"status": "running", "finished-at": ""})
    c, _, _ = _client(sd, runs, refresh=7)
    page = c.get(f"/runs/{FOLDER}").text
    assert '<meta http-equiv="refresh" content="7">' in page
    assert '<progress value="2" max="5"></progress> 2 of 5</span>' in page
    assert "the run&#x27;s checkpoint (live" in page
    pts = _points(page)
    for e in res["rounds"]:  # the checkpoint's history: the same figures
        for site, m in e["central-sites"].items():
            assert pts[("accuracy per site (coordinator-held test data, exact)", site)][e["round"]] == pytest.approx(m["accuracy"])
    assert "Stop run" in page and 'name="csrf"' in page
    assert _table(c.get("/").text, "run folder")[1][5] == "2 of 5"


def test_stop_refused_without_the_csrf_token(coord):
    sd, runs, res, fake = coord
    _make_live(runs, res)
    fake.runs[0]["status"] = "running"
    c, _, _ = _client(sd, runs)
    audit = (sd / "audit.jsonl").read_text()
    good = console.Guard(console.load_token(sd)).csrf(FOLDER)
    for data, headers in (({"confirm": "yes"}, {}), ({"confirm": "yes", "csrf": "0" * 64}, {}),
                          ({"confirm": "yes", "csrf": console.Guard(console.load_token(sd)).csrf("other")}, {}),
                          ({"confirm": "yes", "csrf": good}, {"Origin": "https://evil.example"}),
                          ({"confirm": "yes", "csrf": good}, {"Origin": "null"})):
        r = c.post(f"/runs/{FOLDER}/stop", data=data, headers=headers, follow_redirects=False)
        assert r.status_code == 403, (data, headers)
    # no session at all: the login page, not a stop
    from fastapi.testclient import TestClient

    anon = TestClient(c.app, base_url="http://127.0.0.1:8090")
    assert anon.post(f"/runs/{FOLDER}/stop", data={"confirm": "yes", "csrf": good}).status_code == 401
    # without the confirmation box: nothing happens
    r = c.post(f"/runs/{FOLDER}/stop", data={"csrf": good}, follow_redirects=False)
    assert r.status_code == 303 and "not+stopped" in r.headers["location"]
    assert not [a for a in fake.calls if a[0] == "stop"]
    assert (sd / "audit.jsonl").read_text() == audit
    assert json.loads((runs / FOLDER / "results.json").read_text())["status"] == "completed"


def test_stop_from_the_page_does_what_fl_server_stop_does(coord):
    sd, runs, res, fake = coord
    _make_live(runs, res)
    fake.runs[0]["status"] = "running"
    c, app, _ = _client(sd, runs)
    page = c.get(f"/runs/{FOLDER}").text
    csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page).group(1)
    r = c.post(f"/runs/{FOLDER}/stop", data={"csrf": csrf, "confirm": "yes"},
               headers={"Origin": "http://127.0.0.1:8090"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith(f"/runs/{FOLDER}?msg=stopped+run+{RUN_ID}")
    assert [a[:2] for a in fake.calls if a[0] == "stop"] == [("stop", RUN_ID)]
    for th in app.state.stops:
        th.join(timeout=60)
    out = json.loads((runs / FOLDER / "results.json").read_text())
    assert out["status"] == "stopped by operator" and out["rounds-completed"] == 2
    assert out["written-by"] == "fl-server stop" and [e["round"] for e in out["rounds"]] == [1, 2]
    from privacy.audit import verify

    entries = [json.loads(x) for x in (sd / "audit.jsonl").read_text().splitlines()]
    assert entries[-1]["kind"] == "stop" and entries[-1]["data"]["run-id"] == RUN_ID
    assert entries[-1]["data"]["via"] == "console"
    assert verify(sd / "audit.jsonl", public_key_path=sd / "audit.pub").ok
    audit_page = c.get("/audit").text
    assert _table(audit_page, "seq")[1][2] == "stop"


def test_coordinator_down_shows_the_reason_and_the_run_folders(coord):
    sd, runs, _, fake = coord
    fake.down = True
    c, _, _ = _client(sd, runs)
    page = c.get("/").text
    assert "the coordinator did not answer" in page and "connection refused" in page
    row = _table(page, "run folder")[1]
    assert row[0] == FOLDER and row[3] == "unknown" and row[5] == "2 of 2"
    assert c.get(f"/runs/{FOLDER}").status_code == 200


def test_broken_audit_log_is_shown_not_verified(coord):
    sd, runs, _, _ = coord
    log = sd / "audit.jsonl"
    log.write_text(log.read_text().replace('"health"', '"traffic"'))
    c, _, _ = _client(sd, runs)
    assert "NOT VERIFIED" in c.get("/audit").text


def test_svg_chart_places_points_by_value():
    svg = console_pages.svg_chart({"a": [(1, 0.2), (2, 0.8)], "b<": [(1, 0.5)]}, "t", "y")
    circles = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"[^>]*data-series="([^"]*)" data-round="(\d)"', svg)
    by = {(s, int(r)): (float(x), float(y)) for x, y, s, r in circles}
    assert by[("a", 2)][1] < by[("b&lt;", 1)][1] < by[("a", 1)][1]  # higher value: higher on the page
    assert by[("a", 1)][0] == by[("b&lt;", 1)][0] < by[("a", 2)][0]
    assert "no rounds completed yet" in console_pages.svg_chart({}, "t", "y")


def test_fl_server_console_serves_on_loopback(tmp_path):
    """``fl-server console`` as an operator starts it: the token file, the login line, HTTP on 127.0.0.1."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "console", "--port", str(port), "--state-dir", str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert f"open http://127.0.0.1:{port}/login" in line and str(tmp_path / console.TOKEN_FILE) in line, line
        assert "token=" not in line  # not a terminal: the token is not printed
        token = (tmp_path / console.TOKEN_FILE).read_text().strip()
        url = f"http://127.0.0.1:{port}/"
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=2)
            except urllib.error.HTTPError as exc:
                assert exc.code == 401  # up, and it wants the token
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("the console did not answer")
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            page = r.read().decode()
        # no coordinator in this state dir: the page says so and how to fix it
        assert r.status == 200 and "the coordinator did not answer" in page and "fl-server start" in page
        # a second console on the same port: refused with the reason
        second = subprocess.run([sys.executable, "-m", "server.cli", "console", "--port", str(port), "--state-dir",
                                 str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "cannot listen there" in second.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_energy_per_site_and_run(coord):
    """Each node reports its tasks' energy (method named); results.json sums it; the console shows it."""
    from contract.energy import METHODS

    sd, runs, res, _ = coord
    per_node = {}
    for e in res["rounds"]:
        for ph in ("train", "evaluate"):
            for nid, m in e[ph]["nodes"].items():
                assert m["energy-j"] > 0 and m["energy-method"] in METHODS  # every reply carries it
                per_node[nid] = per_node.get(nid, 0.0) + m["energy-j"]
    assert res["energy"]["total-j"] == pytest.approx(sum(per_node.values()))
    assert {k: v["joules"] for k, v in res["energy"]["nodes"].items()} == pytest.approx(per_node)
    c, _, _ = _client(sd, runs)
    rows = _table(c.get(f"/runs/{FOLDER}").text, "site / node", "training")  # the energy table
    # the page shows results.json's sums (equal to per_node above, written without float noise): compared as shown,
    # not with this loop's own float sums (7.875 and 7.874999999999999 are 7.88 J and 7.87 J)
    shown = {k: v["joules"] for k, v in res["energy"]["nodes"].items()}
    assert rows[-1][0] == "all nodes (run)" and rows[-1][3] == console_pages.fmt_joules(res["energy"]["total-j"])
    labels = json.loads((sd / "nodes.json").read_text())
    for r in rows[1:-1]:
        nid = re.search(r"\(node (\d+)\)$", r[0]).group(1)
        assert r[3] == console_pages.fmt_joules(shown[nid]) and r[4] in METHODS.values()
        assert r[0].startswith(labels[nid]["name"])
    overview = _table(c.get("/").text, "run folder")
    assert overview[0][7] == "energy (nodes)" and overview[1][7] == console_pages.fmt_joules(res["energy"]["total-j"])


@pytest.mark.slow
def test_console_against_a_real_coordinator(tmp_path):
    """No stand-in: a real ``fl-server start`` (TLS, node auth), a registered node key, the console's
    pages read it through the real ``flwr`` CLI (the same calls as ``fl-server nodes`` / ``runs``)."""
    from test_deploy_slow import City

    city = City(tmp_path)
    try:
        city.start_coordinator()
        nid = city.register("Cleveland")
        c, _, _ = _client(city.state, city.state / "runs")
        page = c.get("/").text
        assert "did not answer" not in page, _text(page)[:2000]
        nodes = _table(page, "node ID")
        assert [r[0] for r in nodes[1:]] == [nid]
        col = {h: i for i, h in enumerate(nodes[0])}
        assert nodes[1][col["name"]].endswith("Cleveland") and nodes[1][col["status"]] in ("registered", "offline")
        assert nodes[1][col["key fingerprint"]].startswith("SHA256:")
        assert "No run yet" in page
        assert city.nodes()[0]["node-id"] == nid  # fl-server nodes agrees
    finally:
        for p in city.procs:
            p.stop()


def test_model_card_made_from_the_run_folder(coord):
    sd, runs, res, _ = coord
    c, _, _ = _client(sd, runs)
    assert f'href="/runs/{FOLDER}/model-card"' in c.get(f"/runs/{FOLDER}").text
    page = c.get(f"/runs/{FOLDER}/model-card").text
    text = html.unescape(page)
    assert f"# Model card: run {res['run_id']} (health)" in text and "## Energy" in text
    assert "- rounds: 2 completed of 2 planned" in text
    (runs / FOLDER / "results.json").unlink()  # a run that has not ended: no card, and the page says why
    page = c.get(f"/runs/{FOLDER}/model-card").text
    assert "no model card" in page and "has not ended" in page
    assert c.get("/runs/nope/model-card").status_code == 404


def test_run_page_shows_the_runs_central_dp(coord):
    """The run page said nothing of central DP (docs review 2026-12-07): it now states it, as the report does."""
    sd, runs, res, _ = coord
    c, _, _ = _client(sd, runs)
    assert "central DP (published model) off" in _text(c.get(f"/runs/{FOLDER}").text)
    res = json.loads((runs / FOLDER / "results.json").read_text())
    res["config"].update({"central-dp": True, "central-noise-multiplier": 0.8, "central-clipping-norm": 2.0,
                          "central-delta": 1e-3})
    res["central-dp"] = {"epsilon": 4.56, "rounds": 2, "accountant": "rdp"}
    for e in res["rounds"]:
        e["train"]["central-dp"] = {"contributors": 4, "noise-multiplier": 0.8, "clipping-norm": 2.0,
                                    "noise-std": 0.4, "sample-rate": 1.0, "delta": 1e-3, "epsilon": 3.21 + e["round"]}
    (runs / FOLDER / "results.json").write_text(json.dumps(res))
    launch = json.loads((runs / FOLDER / "launch.json").read_text())
    launch["config"] = {**launch["config"], **{k: res["config"][k] for k in ("central-dp", "central-noise-multiplier",
                                                                           "central-clipping-norm", "central-delta")}}
    (runs / FOLDER / "launch.json").write_text(json.dumps(launch))
    page = c.get(f"/runs/{FOLDER}").text
    text = _text(page)
    assert "central DP (published model) on: noise multiplier 0.800, update clipping norm 2.000, δ 1.00e-03; " \
           "ε 4.560 after 2 round(s)" in text, text
    rows = _table(page, "round", "updates arrived")
    assert [r[0] for r in rows[1:]] == ["1", "2"] and rows[-1][-1] == "5.210", rows
