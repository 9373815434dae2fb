"""Round 2 bad input: fl-sim export-model's run files, damaged ledgers, the console's request bodies and model card.

* D7: a results.json or launch.json that is not UTF-8, not a JSON object, or has a field of the wrong
  type is an input error (exit 2) naming the file, the field and a fix; nothing is written.
* D8: a ledger in RUN_DIR/ledgers that cannot be read is not "no ledger": the export is refused
  (exit 2, naming the ledger file); the run report says the ledger could not be read.
* D9: ``fl-server console`` refuses a request body over its limit with 413 without reading it
  (Content-Length checked first; a chunked body read with a cap).
* D10: the console's model-card page names the damaged file, the field and a fix.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import shutil
from pathlib import Path

import pytest

from serve_helpers import synthetic_run
from sim_helpers import assert_input_error as _input_error
from sim_helpers import fl_sim


def _export(run: Path, out: Path, capsys, monkeypatch):
    return fl_sim(["export-model", run, "-o", out], capsys, monkeypatch)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A run folder (untrained health model, results.json with one round) and a valid ledger."""
    from privacy.ledger import PrivacyLedger, Release

    run = synthetic_run(tmp_path_factory.mktemp("r2") / "run", "health")
    res = json.loads((run / "results.json").read_text())
    res["rounds"] = [{"round": 1, "train": {"accepted": 1, "nodes": {"1": {"num-examples": 10, "epsilon": 1.5,
                                                                           "partition-id": 0, "energy-j": 0.1,
                                                                           "energy-method": 1}}},
                      "evaluate": {"nodes": {}}, "central-sites": {"Cleveland": {"accuracy": 0.5}}}]
    res["initial"] = {"central-sites": {"Cleveland": {"accuracy": 0.4}}}
    (run / "results.json").write_text(json.dumps(res))
    led = PrivacyLedger(run / "ledgers" / "health-Cleveland.sqlite")
    led.commit(led.begin(Release(noise_multiplier=1.1, sample_rate=0.1, steps=10, delta=1e-5, run_id=res["run_id"],
                                 round=1, site="Cleveland", department="health")))
    return run


@pytest.fixture
def run(good_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(good_run, dst)
    return dst


def test_a_good_run_exports_with_its_ledger_table(run, tmp_path, capsys, monkeypatch):
    code, out, err = _export(run, tmp_path / "pkg", capsys, monkeypatch)
    assert code == 0, err
    md = (tmp_path / "pkg" / "model-card.md").read_text()
    assert "the run folder's ledgers" in md and "| Cleveland | dp-sgd |" in md


# -- D7: results.json / launch.json of the wrong encoding or shape --------------------------------------------

def _edit(field_path: list, value):
    def edit(res):
        d = res
        for k in field_path[:-1]:
            d = d[k]
        d[field_path[-1]] = value
        return res
    return edit


RESULTS_CASES = {
    # name: (bytes or edit function, words the message must hold)
    "utf16": (lambda raw: raw.decode().encode("utf-16"), ["not UTF-8"]),
    "bom": (lambda raw: b"\xef\xbb\xbf" + raw, ["byte-order mark"]),
    "truncated": (lambda raw: raw[: len(raw) // 2], ["not valid JSON"]),
    "empty": (lambda raw: b"", ["empty"]),
    "list": (lambda raw: b"[1, 2, 3]", ["a list", "JSON object"]),
    "config-list": (_edit(["config"], [1]), ["config", "a list"]),
    "no-department": (lambda res: {**res, "config": {"model": ""}}, ["config.department"]),
    "department-number": (_edit(["config", "department"], 5), ["config.department", "a number"]),
    "model-list": (_edit(["config", "model"], [1]), ["config.model", "a list"]),
    "model-unknown": (_edit(["config", "model"], "gru"), ["config.model", "gru"]),
    "rounds-text": (_edit(["rounds"], "x"), ["rounds", "text"]),
    "round-entry-list": (_edit(["rounds"], [[1]]), ["rounds[0]", "a list"]),
    "round-number-text": (_edit(["rounds", 0, "round"], "x"), ["rounds[0].round", "text"]),
    "train-list": (_edit(["rounds", 0, "train"], []), ["rounds[0].train", "a list"]),
    "nodes-list": (_edit(["rounds", 0, "train", "nodes"], [1]), ["rounds[0].train.nodes", "a list"]),
    "node-metrics-number": (_edit(["rounds", 0, "train", "nodes", "1"], 3), ["rounds[0].train.nodes.1", "a number"]),
    "central-sites-list": (_edit(["rounds", 0, "central-sites"], [1]), ["rounds[0].central-sites", "a list"]),
    "initial-list": (_edit(["initial"], [1]), ["initial", "a list"]),
    "job-list": (_edit(["job"], ["x"]), ["job", "a list"]),
    "excluded-number": (_edit(["excluded"], 3), ["excluded", "a number"]),
    "energy-list": (_edit(["energy"], [1]), ["energy", "a list"]),
    "energy-node-joules": (_edit(["energy"], {"nodes": {"1": {"joules": "x"}}, "total-j": 1.0}),
                           ["energy.nodes.1", "joules"]),
    "dp-text": (_edit(["config", "target-epsilon"], "three"), ["config.target-epsilon", "text"]),
    "run-id-object": (_edit(["run_id"], {"a": 1}), ["run_id", "an object"]),
}


def _damage(path: Path, how):
    raw = path.read_bytes()
    try:
        out = how(raw)
    except (AttributeError, TypeError, KeyError):
        out = None
    if not isinstance(out, bytes):
        out = json.dumps(how(json.loads(raw))).encode()
    path.write_bytes(out)


@pytest.mark.parametrize("case", sorted(RESULTS_CASES))
def test_damaged_results_json_is_an_input_error_naming_the_file_and_field(run, tmp_path, capsys, monkeypatch, case):
    how, words = RESULTS_CASES[case]
    _damage(run / "results.json", how)
    before = (run / "results.json").read_bytes()
    code, out, err = _export(run, tmp_path / "pkg", capsys, monkeypatch)
    _input_error(code, out, err)
    assert f"{run / 'results.json'}:" in err and "RUN_DIR" in err, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "pkg").exists()
    assert (run / "results.json").read_bytes() == before  # nothing changed


LAUNCH_CASES = {
    "utf16": (json.dumps({"fab-hash": "abc"}).encode("utf-16"), ["not UTF-8"]),
    "bom": (b"\xef\xbb\xbf" + json.dumps({"fab-hash": "abc"}).encode(), ["byte-order mark"]),
    "truncated": (b'{"fab-hash": "ab', ["not valid JSON"]),
    "empty": (b"", ["empty"]),
    "list": (b"[1]", ["a list", "JSON object"]),
    "hash-list": (json.dumps({"fab-hash": [1]}).encode(), ["fab-hash", "a list"]),
}


@pytest.mark.parametrize("case", sorted(LAUNCH_CASES))
def test_damaged_launch_json_is_an_input_error_naming_the_file(run, tmp_path, capsys, monkeypatch, case):
    data, words = LAUNCH_CASES[case]
    (run / "launch.json").write_bytes(data)
    code, out, err = _export(run, tmp_path / "pkg", capsys, monkeypatch)
    _input_error(code, out, err)
    assert f"{run / 'launch.json'}:" in err, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "pkg").exists()


def test_fl_server_export_names_the_damaged_file_too(run, tmp_path):
    from typer.testing import CliRunner

    from server.cli import app

    (run / "results.json").write_text("[1, 2]")
    (run / "launch.json").write_text(json.dumps({"run-ids": ["42"], "config": {}}))
    res = CliRunner().invoke(app, ["export", "42", "-o", str(tmp_path / "pkg"), "--runs-dir", str(run.parent),
                                   "--state-dir", str(tmp_path / "state")])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "results.json" in text and "a list" in text and "fix:" in text and "Traceback" not in text
    assert not (tmp_path / "pkg").exists()


# -- D8: a damaged ledger is not "no ledger" ----------------------------------------------------------------

@pytest.mark.parametrize("damage", ["junk", "empty-file", "no-releases-table"])
def test_unreadable_ledger_refuses_the_export_naming_the_file(run, tmp_path, capsys, monkeypatch, damage):
    import sqlite3

    bad = run / "ledgers" / "health-Hungary.sqlite"
    if damage == "junk":
        bad.write_text("junk\n")
    elif damage == "empty-file":
        bad.write_bytes(b"")
    else:
        con = sqlite3.connect(bad)
        con.execute("CREATE TABLE other (x)")
        con.commit()
        con.close()
    code, out, err = _export(run, tmp_path / "pkg", capsys, monkeypatch)
    _input_error(code, out, err)
    assert str(bad) in err and "cannot be read" in err and "epsilon" in err, err
    assert "no ledger in the run folder" not in err + out
    assert not (tmp_path / "pkg").exists()


def test_all_ledgers_damaged_also_refused(run, tmp_path, capsys, monkeypatch):
    for f in (run / "ledgers").glob("*.sqlite"):
        f.write_text("junk\n")
    code, out, err = _export(run, tmp_path / "pkg", capsys, monkeypatch)
    _input_error(code, out, err)
    assert "health-Cleveland.sqlite" in err and not (tmp_path / "pkg").exists()


def test_run_report_says_a_damaged_ledger_could_not_be_read(run):
    from server import report as R

    (run / "ledgers" / "health-Cleveland.sqlite").write_text("junk\n")
    page = R.write_report(run, ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"], "accuracy").read_text()
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())
    assert "ledgers are not in this run folder" not in text, text
    assert "health-Cleveland.sqlite" in text and "could not be read" in text, text
    assert "ledger on the node" not in text


def test_read_ledger_files_lists_what_it_could_not_read(run):
    from server.report import read_ledger_files

    (run / "ledgers" / "x.sqlite").write_text("junk")
    rows, bad = read_ledger_files(run / "ledgers")
    assert len(rows) == 1 and [p.name for p, _ in bad] == ["x.sqlite"]


# -- D9: request bodies over the console's limit ---------------------------------------------------------------

def _console(tmp_path: Path, runs: Path | None = None):
    from server import console

    sd = tmp_path / "state"
    sd.mkdir(exist_ok=True)
    runs = runs or (sd / "runs")
    runs.mkdir(exist_ok=True)
    token = console.load_token(sd)
    return console.make_app(sd, runs, token=token, cache_s=0, stop_wait=1), token


def _asgi_post(app, path: str, chunks, headers: list[tuple[bytes, bytes]]):
    """POST ``chunks`` to ``app`` as a server would; returns (status, bytes the app pulled from the body)."""
    pulled = {"bytes": 0, "messages": 0}
    it = iter(chunks)
    sent = []

    async def receive():
        try:
            chunk = next(it)
        except StopIteration:
            await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}
        pulled["bytes"] += len(chunk)
        pulled["messages"] += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:8090"), (b"content-type", b"application/x-www-form-urlencoded"),
                         *headers],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8090)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], pulled


def test_content_length_over_the_limit_is_refused_unread(tmp_path):
    app, _ = _console(tmp_path)
    body = (b"a" * 1024 for _ in range(400_000))  # 400 MB if it were read
    status, pulled = _asgi_post(app, "/login", body, [(b"content-length", str(400_000 * 1024).encode())])
    assert status == 413
    assert pulled["bytes"] == 0, pulled


def test_chunked_body_over_the_limit_is_read_only_up_to_the_cap(tmp_path):
    from server.console import MAX_FORM_BYTES

    app, _ = _console(tmp_path)
    body = (b"a" * 1024 for _ in range(400_000))  # no Content-Length: Transfer-Encoding chunked
    status, pulled = _asgi_post(app, "/login", body, [(b"transfer-encoding", b"chunked")])
    assert status == 413
    assert pulled["bytes"] <= MAX_FORM_BYTES + 1024, pulled


def test_bodies_just_over_and_at_the_limit(tmp_path):
    from fastapi.testclient import TestClient

    from server.console import MAX_FORM_BYTES

    app, token = _console(tmp_path)
    c = TestClient(app, base_url="http://127.0.0.1:8090")
    ct = {"Content-Type": "application/x-www-form-urlencoded"}
    over = c.post("/login", content=b"token=" + b"a" * (MAX_FORM_BYTES - 5), headers=ct, follow_redirects=False)
    assert over.status_code == 413 and str(MAX_FORM_BYTES) in over.text
    assert over.headers.get("x-frame-options") == "DENY"  # the console's headers on the refusal too
    pad = MAX_FORM_BYTES - len(f"token={token}&pad=")
    at = c.post("/login", content=f"token={token}&pad={'a' * pad}".encode(), headers=ct, follow_redirects=False)
    assert at.status_code == 303, at.text  # exactly the limit: read and accepted


def test_stop_refuses_an_oversized_body_too(tmp_path):
    from fastapi.testclient import TestClient

    from server.console import MAX_FORM_BYTES

    app, token = _console(tmp_path)
    c = TestClient(app, base_url="http://127.0.0.1:8090")
    r = c.post("/runs/x/stop", content=b"a" * (MAX_FORM_BYTES + 1), headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 413
    status, pulled = _asgi_post(app, "/runs/x/stop", (b"a" * 1024 for _ in range(10_000)),
                                [(b"authorization", f"Bearer {token}".encode())])
    assert status == 413 and pulled["bytes"] <= MAX_FORM_BYTES + 1024


# -- D10: the console's model-card page of a damaged results.json ------------------------------------------------

CARD_CASES = {
    "list": (b"[1, 2]", ["results.json", "a list", "JSON object"]),
    "missing-department": (json.dumps({"status": 5, "rounds": "x", "config": []}).encode(), ["results.json", "config", "a list"]),
    "no-department": (json.dumps({"config": {}}).encode(), ["results.json", "config.department"]),
    "rounds-text": (None, ["results.json", "rounds", "text"]),
    "utf16": (json.dumps({"config": {"department": "health"}}).encode("utf-16"), ["results.json", "not UTF-8"]),
}


@pytest.mark.parametrize("case", sorted(CARD_CASES))
def test_model_card_page_names_the_file_problem_and_fix(good_run, tmp_path, case):
    from fastapi.testclient import TestClient

    data, words = CARD_CASES[case]
    runs = tmp_path / "runs"
    shutil.copytree(good_run, runs / "bad4")
    (runs / "bad4" / "launch.json").write_text(json.dumps({"run-ids": ["9"], "config": {}}))
    if data is None:
        res = json.loads((runs / "bad4" / "results.json").read_text())
        res["rounds"] = "x"
        data = json.dumps(res).encode()
    (runs / "bad4" / "results.json").write_bytes(data)
    app, token = _console(tmp_path, runs)
    c = TestClient(app, base_url="http://127.0.0.1:8090")
    page = c.get("/runs/bad4/model-card", headers={"Authorization": f"Bearer {token}"})
    assert page.status_code == 200
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page.text)).split())
    for w in [*words, "fix:"]:
        assert w in text, (w, text)
    assert "KeyError" not in text and "AttributeError" not in text and "TypeError" not in text, text
