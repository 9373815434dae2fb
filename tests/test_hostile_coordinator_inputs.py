"""The coordinator's read-back inputs: run folders' launch.json and results.json (fl-server runs/logs/stop/
--resume and the console), node.pub files for register, node and run IDs, the console's Origin header.

From an independent bad-input review (2026-12-07, reproductions adapted); each test failed on 22b7c36: one damaged
results.json or launch.json took the console's pages down (500, with a traceback in its log) and broke
`fl-server runs`; a node.pub with a comment line passed cityfed's check and was refused by Flower (exit 1, no fix);
a 5,000-digit ID raised Python's int-conversion limit; a malformed Origin header was a 500.
"""
import sys
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# -- register / unregister -----------------------------------------------------------------------------------
def _pub(tmp_path: Path, before: bytes) -> Path:
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP384R1())
    line = k.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH) + b" cityfed:health:Cleveland\n"
    p = tmp_path / "node.pub"
    p.write_bytes(before + line)
    return p


@pytest.mark.parametrize("before", [b"# node key of Cleveland\n", b"\n"], ids=["comment line", "blank line"])
def test_register_refuses_what_flower_refuses(tmp_path, before):
    """pki.load_public_key skips '#' and blank lines, so fl-server register accepts such a node.pub and hands
    it to `flwr supernode register`, whose loader (serialization.load_ssh_public_key of the whole file)
    refuses it: exit 1 with Flower's 'Exit Code: 500 Unsupported key type: b'#'' and a flower.ai link, no
    cityfed fix. Expected: exit 2 before Flower, naming the file and the fix (or the key line handed over)."""
    from cryptography.hazmat.primitives import serialization

    from privacy import pki

    p = _pub(tmp_path, before)
    from cryptography.exceptions import UnsupportedAlgorithm

    with pytest.raises((ValueError, UnsupportedAlgorithm)):
        serialization.load_ssh_public_key(p.read_bytes())  # what Flower 1.42's try_load_public_key does
    with pytest.raises(pki.PKIError, match="node.pub"):
        pki.load_public_key(p)


def _fake_state(tmp_path: Path) -> Path:
    """A coordinator state dir whose connection points at a closed loopback port (nothing listens)."""
    sd = tmp_path / "state"
    (sd / "flwr-home").mkdir(parents=True)
    (sd / "coordinator.json").write_text(json.dumps({"address": "127.0.0.1:9", "ca": None, "insecure": True}))
    (sd / "flwr-home" / "config.toml").write_text('[superlink]\ndefault = "cityfed"\n\n[superlink.cityfed]\n'
                                                  'address = "127.0.0.1:9"\ninsecure = true\n')
    return sd


def test_register_comment_line_cli_exit_code(tmp_path):
    """The same through the CLI: Flower's refusal comes back as exit 1 ('Flower reported a failure')."""
    from server.cli import app

    p = _pub(tmp_path, b"# node key\n")
    res = CliRunner().invoke(app, ["register", str(p), "--state-dir", str(_fake_state(tmp_path))])
    assert res.exit_code == 2 and "fix" in res.output, res.output


def test_unregister_node_id_of_thousands_of_digits(tmp_path):
    """check_flower_id calls int() on a digit string of any length: 5,000 digits raise Python's ValueError
    (int max str digits) - `fl-server unregister` prints 'builtins.ValueError raised at server/errors.py:55'
    and exits 1. Same for `fl-server logs/stop 999...9`. Expected: exit 2 'node ID ...: not a Flower node ID'."""
    from server.errors import CliError, check_flower_id

    with pytest.raises(CliError):
        check_flower_id("9" * 5000, "node ID", "use a node ID from `fl-server nodes`")


# -- run folders read back ---------------------------------------------------------------------------------
@pytest.fixture
def state(tmp_path):
    sd = tmp_path / "state"
    runs = sd / "runs"
    runs.mkdir(parents=True)
    return sd, runs


def _folder(runs: Path, name: str, rid: str, launch=None, results=None) -> Path:
    f = runs / name
    f.mkdir()
    now = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    (f / "launch.json").write_text(launch if isinstance(launch, str) else json.dumps(
        launch or {"run-ids": [rid], "config": {"department": "health", "num-rounds": 2}, "launched": [now]}))
    if results is not None:
        os.utime(f / "launch.json", (0, 0))
        (f / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    return f


def test_read_launch_deeply_nested_is_a_value_error(tmp_path):
    """read_launch catches JSONDecodeError but not RecursionError: a launch.json of nested brackets makes
    `fl-server runs`, `logs NAME`, `stop NAME`, `run --resume NAME` print 'builtins.RecursionError raised
    at json/decoder.py' (exit 1), and every console page 500 (with a traceback in its log)."""
    from server.launches import read_launch

    p = tmp_path / "launch.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError):
        read_launch(p)


def test_fl_server_logs_names_a_deeply_nested_launch_json(state):
    from server.cli import app

    sd, runs = state
    _folder(runs, "deep", "1", launch="[" * 100_000 + "]" * 100_000)
    res = CliRunner().invoke(app, ["logs", "deep", "--state-dir", str(sd)])
    assert res.exit_code == 2 and "launch.json" in res.output, (res.exit_code, repr(res.exception))


@pytest.mark.parametrize("results", ["[]", "null"])
def test_fl_server_runs_with_a_results_json_that_is_not_an_object(state, monkeypatch, results):
    """run_result does `data.get("status")` on whatever results.json holds: a list or null raises
    AttributeError, so `fl-server runs` fails for every run ('builtins.AttributeError raised at
    server/launches.py:133'). Expected: the runs listed, that one with a result naming the damaged file."""
    import server.cli as server_cli

    sd, runs = state
    _folder(runs, "bad", "5", results=results)
    monkeypatch.setattr(server_cli, "flwr", lambda sd_, *a, **k: {"success": True, "runs": [
        {"run-id": "5", "status": "finished:completed", "elapsed": 1.0}]})
    res = CliRunner().invoke(server_cli.app, ["runs", "--json", "--state-dir", str(sd)])
    assert res.exit_code == 0, repr(res.exception)


def test_resume_with_damaged_config_in_launch_json_names_the_file(state):
    """A launch.json whose config holds num-rounds "many": `fl-server run --resume NAME` says "run config
    'num-rounds': ... fix: -c num-rounds=..." - the operator gave no -c, and launch.json is not named (LOW)."""
    from server.cli import app

    sd, runs = state
    _folder(runs, "badcfg", "5", launch={"run-ids": ["5"], "config": {"department": "health", "num-rounds": "many"},
                                          "launched": ["2024-01-01T00:00:00+00:00"]})
    res = CliRunner().invoke(app, ["run", "--resume", "badcfg", "--state-dir", str(sd)])
    assert res.exit_code == 2, res.output
    assert "launch.json" in res.output, res.output


# -- console ----------------------------------------------------------------------------------------------
GOOD = {"run_id": "r1", "status": "completed", "config": {"department": "health", "num-rounds": 1},
        "rounds": [{"round": 1, "train": {"nodes": {"11": {"epsilon": 1.0, "accuracy": 0.5}}, "accepted": 1}}]}
DAMAGED = {
    "results a list": "[]",
    "results null": "null",
    "nodes a list": {**GOOD, "rounds": [{"round": 1, "train": {"nodes": [1, 2]}}]},
    "round a text": {**GOOD, "rounds": [{"round": "one", "train": {"nodes": {"11": {"epsilon": 1.0}}}},
                                        {"round": 2, "train": {"nodes": {"11": {"epsilon": 2.0}}}}]},
    "deeply nested": "[" * 100_000 + "]" * 100_000,
    "config a list": {**GOOD, "config": [1]},
    "train a list": {**GOOD, "rounds": [{"round": 1, "train": [1, 2]}]},
    "energy nodes a list": {**GOOD, "energy": {"nodes": {"11": [1, 2]}}},
}


def _console(sd: Path, runs: Path, rids: list[str], monkeypatch):
    from fastapi.testclient import TestClient

    import server.cli as server_cli
    from server import console

    def fake(state_dir, *args, **kw):
        if args[:2] == ("supernode", "ls"):
            return {"success": True, "nodes": [{"node-id": "11", "status": "online"}]}
        if args[0] == "ls":
            return {"success": True, "runs": [{"run-id": r, "status": "running" if r == "1" else "finished:completed"}
                                              for r in rids]}
        return "log"

    monkeypatch.setattr(server_cli, "flwr", fake)
    token = console.load_token(sd)
    app = console.make_app(sd, runs, token=token, cache_s=0)
    return TestClient(app, base_url="http://127.0.0.1:8090", raise_server_exceptions=False), token


@pytest.mark.parametrize("case", list(DAMAGED))
def test_console_pages_survive_one_damaged_results_json(state, monkeypatch, case):
    """One run folder's damaged results.json makes /, /runs and /nodes answer 500 (AttributeError/TypeError in
    run_result, reported_epsilon, run_page): the operator loses the whole console, including the stop button of
    every other live run. Expected: pages render; the damaged folder is shown as such."""
    sd, runs = state
    _folder(runs, "good", "1")  # a live run the operator may need to stop
    _folder(runs, "damaged", "2", results=DAMAGED[case])
    c, token = _console(sd, runs, ["1", "2"], monkeypatch)
    h = {"Authorization": f"Bearer {token}"}
    got = {p: c.get(p, headers=h).status_code for p in ("/", "/runs", "/nodes", "/runs/good", "/runs/damaged")}
    assert set(got.values()) == {200}, got


def test_console_stop_with_a_malformed_origin_header_is_403_not_500(state, monkeypatch):
    """urlsplit("http://[") raises ValueError in the stop handler: 500 and a traceback in the console log."""
    sd, runs = state
    _folder(runs, "good", "1")
    c, token = _console(sd, runs, ["1"], monkeypatch)
    r = c.post("/runs/good/stop", data={"confirm": "yes", "csrf": "x"},
               headers={"Authorization": f"Bearer {token}", "Origin": "http://["})
    assert r.status_code == 403, (r.status_code, r.text[:200])
