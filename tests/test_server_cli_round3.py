"""fl-server input defects of the round-3 bad-input corpus (D1-D4), with the coordinator faked.

* D1: ``register --name`` with control characters or too long is refused; re-registering a key
  with another ``--name`` says that the label changed; ``nodes`` never prints a raw control character.
* D2: every float option (``run --wait-start``, ``stop --wait``, ``start --backoff/--backoff-max``)
  refuses NaN and infinity; the supervisor refuses them too.
* D3: ``run --resume`` of a run whose latest Flower run is not finished is refused.
* D4: an all-digit ``run --name`` is refused; a reference that names a folder and another
  folder's run ID is refused naming both.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from privacy import pki  # noqa: E402
from server import cli as server_cli  # noqa: E402

runner = CliRunner(env={"COLUMNS": "250"})


def _text(res) -> str:
    return " ".join((res.output + (res.stderr if res.stderr_bytes is not None else "")).split())


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    pki.create_ca(d / "ca")
    return d / "ca" / "ca.crt"


@pytest.fixture
def coord(ca_file, tmp_path, monkeypatch):
    """A state dir that looks started and a fake ``flwr``/Control API: records every call, answers from ``status``."""
    sd = tmp_path / "state"
    server_cli.write_connection(sd, "127.0.0.1:1", ca_file, insecure=False)
    (sd / "coordinator.json").write_text(json.dumps({"address": "127.0.0.1:1", "ca": str(ca_file)}))
    calls: list[tuple] = []
    status: dict[str, str] = {}  # run ID -> Flower status
    state = {"next": 100, "in-use": set()}

    def fake_flwr(state_dir, *args, **kw):
        calls.append(args)
        if args[:2] == ("supernode", "register"):
            key = args[2]
            if key in state["in-use"]:
                raise server_cli.CliError("`flwr supernode register` failed: [code: 23] Public key already in use.", 1)
            state["in-use"].add(key)
            state["next"] += 1
            return {"success": True, "node-id": str(state["next"])}
        if args[:2] == ("supernode", "ls"):
            return {"success": True, "nodes": [{"node-id": n, "status": "online"} for n in state.get("nodes", [])]}
        if args[0] == "ls":
            return {"success": True, "runs": [{"run-id": r, "status": s} for r, s in status.items()]}
        if args[0] == "stop":
            status[args[1]] = "finished:stopped"
            return {"success": True}
        if args[0] == "run":
            state["next"] += 1
            rid = str(state["next"])
            status[rid] = "pending"
            calls[-1] = (*args, tomllib.loads(Path(args[args.index("--run-config") + 1]).read_text()))
            return {"success": True, "run-id": rid}
        raise AssertionError(args)

    def fake_status(state_dir, run_id, timeout=10.0, shown=None):
        if str(run_id) not in status:
            raise server_cli.unknown_run(shown or run_id, run_id)
        return {"status": status[str(run_id)], "details": ""}

    def fake_in_use(state_dir, public_key, info):
        nid = state.setdefault("by-key", {}).get(str(Path(public_key).resolve()))
        return {"node-id": nid, "status": "online", "registered-at": "2025-01-01T00:00:00Z"}

    monkeypatch.setattr(server_cli, "flwr", fake_flwr)
    monkeypatch.setattr(server_cli, "control_run_status", fake_status)
    monkeypatch.setattr(server_cli, "_node_of_key_in_use", fake_in_use)
    monkeypatch.setattr(server_cli, "wait_serverapp_exit", lambda *a, **k: True)
    return {"sd": sd, "calls": calls, "status": status, "state": state}


def _launches(coord) -> list[tuple]:
    return [c for c in coord["calls"] if c[0] == "run"]


def _run(coord, *args: str):
    return runner.invoke(server_cli.app, ["run", "--state-dir", str(coord["sd"]), "--wait-start", "0", *args])


# --------------------------------------------------------------------------- D1: register --name


@pytest.fixture
def node_pub(tmp_path):
    pki.create_node_key(tmp_path / "keys", "health", "Cleveland")
    return tmp_path / "keys" / "node.pub"


def _register(coord, pub: Path, *extra: str):
    res = runner.invoke(server_cli.app, ["register", str(pub), "--state-dir", str(coord["sd"]), *extra])
    if res.exit_code == 0:
        nid = res.stdout.strip().splitlines()[-1]
        coord["state"].setdefault("by-key", {})[str(pub.resolve())] = nid
    return res


@pytest.mark.parametrize("bad, words", [
    ("bad\x1b[31mred\nline", ["control character"]),
    ("tab\there", ["control character"]),
    ("x" * 5000, ["5000 characters", "120"]),
    ("", ["empty"]),
    ("   ", ["empty"]),
])
def test_register_refuses_a_bad_name_before_asking_flower(coord, node_pub, bad, words):
    res = _register(coord, node_pub, "--name", bad)
    text = _text(res)
    assert res.exit_code == 2, text
    assert "--name" in text and "fix:" in text and all(w in text for w in words), text
    assert "\x1b" not in res.output and "x" * 200 not in text, text
    assert not coord["calls"] and not (coord["sd"] / "nodes.json").exists()


def test_register_refuses_a_key_comment_that_cannot_be_a_label(coord, node_pub):
    line = node_pub.read_text().split()
    node_pub.write_text(f"{line[0]} {line[1]} cityfed:health:Clev\x1b[2Jland\n")
    res = _register(coord, node_pub)
    text = _text(res)
    assert res.exit_code == 2 and "control character" in text and "--name" in text and "fix:" in text, text
    assert "\x1b" not in res.output and not coord["calls"]


def test_register_stores_the_label_and_sends_flower_the_same_rule(coord, node_pub):
    res = _register(coord, node_pub, "--name", "Cleveland clinic")
    assert res.exit_code == 0, _text(res)
    labels = json.loads((coord["sd"] / "nodes.json").read_text())
    assert [v["name"] for v in labels.values()] == ["Cleveland clinic"]
    reg = next(c for c in coord["calls"] if c[:2] == ("supernode", "register"))
    assert reg[reg.index("--name") + 1] == "Cleveland-clinic"


def test_reregister_with_another_name_says_the_label_changed(coord, node_pub):
    assert _register(coord, node_pub, "--name", "first").exit_code == 0
    res = _register(coord, node_pub, "--name", "second")
    text = _text(res)
    assert res.exit_code == 0, text
    assert "already registered" in text and "'first'" in text and "'second'" in text and "label" in text, text
    assert [v["name"] for v in json.loads((coord["sd"] / "nodes.json").read_text()).values()] == ["second"]


def test_reregister_without_name_keeps_the_recorded_label(coord, node_pub):
    assert _register(coord, node_pub, "--name", "my-label").exit_code == 0
    res = _register(coord, node_pub)
    text = _text(res)
    assert res.exit_code == 0, text
    assert "already registered" in text and "changed" not in text, text
    assert [v["name"] for v in json.loads((coord["sd"] / "nodes.json").read_text()).values()] == ["my-label"]


def test_nodes_never_prints_a_raw_control_character_of_an_old_label(coord):
    (coord["sd"] / "nodes.json").write_text(json.dumps({"5": {"name": "bad\x1b[31mred\nline", "fingerprint": "SHA256:x"}}))
    coord["state"]["nodes"] = ["5"]
    res = runner.invoke(server_cli.app, ["nodes", "--state-dir", str(coord["sd"])])
    assert res.exit_code == 0, _text(res)
    assert "\x1b" not in res.output and "\\x1b" in res.output and "\\n" in res.output, res.output


# --------------------------------------------------------------------------- D2: float options refuse NaN/inf


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "Infinity"])  # -inf: click's min=0 refuses it
def test_run_refuses_a_non_finite_wait_start_before_submitting(coord, value):
    res = runner.invoke(server_cli.app, ["run", "--state-dir", str(coord["sd"]), "--department", "health",
                                         "--name", "r2", "--wait-start", value])
    text = _text(res)
    assert res.exit_code == 2 and "--wait-start" in text and str(float(value)) in text and "fix:" in text, text
    assert not _launches(coord) and not (coord["sd"] / "runs" / "r2").exists()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_stop_refuses_a_non_finite_wait_before_stopping(coord, value):
    assert _run(coord, "--department", "health", "--name", "r1").exit_code == 0
    res = runner.invoke(server_cli.app, ["stop", "r1", "--state-dir", str(coord["sd"]), "--wait", value])
    text = _text(res)
    assert res.exit_code == 2 and "--wait" in text and str(float(value)) in text and "fix:" in text, text
    assert not [c for c in coord["calls"] if c[0] == "stop"]


@pytest.mark.parametrize("option", ["--backoff", "--backoff-max"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_start_refuses_a_non_finite_backoff_before_writing(tmp_path, monkeypatch, option, value):
    sd = tmp_path / "st"

    def reached(host):  # start's first check: the refusal must come before it (never start a SuperLink here)
        raise server_cli.CliError("reached check_host", 9)

    monkeypatch.setattr(server_cli, "check_host", reached)
    res = runner.invoke(server_cli.app, ["start", "--insecure", "--host", "127.0.0.1", "--port", "1",
                                         "--state-dir", str(sd), option, value])
    text = _text(res)
    assert res.exit_code == 2 and option in text and value in text and "fix:" in text, text
    assert not sd.exists()


@pytest.mark.parametrize("kw", [{"backoff": float("nan")}, {"backoff_max": float("nan")}, {"backoff": float("inf")},
                                {"backoff_max": -1.0}])
def test_supervisor_refuses_a_non_finite_backoff(tmp_path, kw):
    with pytest.raises(ValueError, match="backoff"):
        server_cli.CoordinatorSupervisor(tmp_path, **kw)


# --------------------------------------------------------------------------- D3: resume of a live run


@pytest.mark.parametrize("live", ["pending", "starting", "running"])
def test_resume_of_a_run_that_is_not_finished_is_refused(coord, live):
    assert _run(coord, "--department", "health", "--rounds", "1", "--no-secagg", "--name", "r1").exit_code == 0
    rid = list(coord["status"])[-1]
    coord["status"][rid] = live
    launch = (coord["sd"] / "runs" / "r1" / "launch.json").read_bytes()
    res = _run(coord, "--resume", "r1", "--rounds", "1", "--no-secagg")
    text = _text(res)
    assert res.exit_code == 2, text
    assert rid in text and live in text and "fl-server stop r1" in text and "fix:" in text, text
    assert len(_launches(coord)) == 1
    assert (coord["sd"] / "runs" / "r1" / "launch.json").read_bytes() == launch


@pytest.mark.parametrize("ended", ["finished:failed", "finished:stopped"])
def test_resume_of_a_finished_run_still_launches(coord, ended):
    assert _run(coord, "--department", "health", "--rounds", "2", "--no-secagg", "--name", "r1").exit_code == 0
    rid = list(coord["status"])[-1]
    coord["status"][rid] = ended
    res = _run(coord, "--resume", "r1")
    assert res.exit_code == 0, _text(res)
    assert len(_launches(coord)) == 2


def test_resume_of_a_run_the_coordinator_no_longer_knows_still_launches(coord):
    assert _run(coord, "--department", "health", "--rounds", "2", "--no-secagg", "--name", "r1").exit_code == 0
    coord["status"].clear()  # e.g. a new state.db: that run cannot be running
    res = _run(coord, "--resume", "r1")
    assert res.exit_code == 0, _text(res)
    assert len(_launches(coord)) == 2


# --------------------------------------------------------------------------- D4: a name that reads as a run ID


@pytest.mark.parametrize("name", ["101", "2178948588361970750", "0"])
def test_run_refuses_an_all_digit_name(coord, name):
    res = _run(coord, "--department", "health", "--name", name)
    text = _text(res)
    assert res.exit_code == 2 and f"--name {name}" in text and "run ID" in text and "fix:" in text, text
    assert not _launches(coord) and not (coord["sd"] / "runs" / name).exists()


def _ambiguous(coord) -> tuple[str, str]:
    """Folder ``a`` whose run ID is the name of folder ``<that ID>`` holding another run (made before the fix)."""
    assert _run(coord, "--department", "health", "--no-secagg", "--name", "a").exit_code == 0
    rid_a = list(coord["status"])[-1]
    other = coord["sd"] / "runs" / rid_a
    other.mkdir()
    (other / "launch.json").write_text(json.dumps({"run-ids": ["999"], "config": {"department": "health"}}))
    coord["status"]["999"] = "running"
    return rid_a, "999"


@pytest.mark.parametrize("cmd", [["stop"], ["logs"]])
def test_a_reference_naming_a_folder_and_another_runs_id_is_refused(coord, cmd):
    rid_a, rid_b = _ambiguous(coord)
    res = runner.invoke(server_cli.app, [*cmd, rid_a, "--state-dir", str(coord["sd"])])
    text = _text(res)
    assert res.exit_code == 2, text
    assert "ambiguous" in text and rid_b in text and "'a'" in text and "fix:" in text, text
    assert not [c for c in coord["calls"] if c[0] in ("stop", "log")]
    assert coord["status"][rid_b] == "running"


def test_resolve_run_refuses_the_ambiguous_reference_and_takes_the_unambiguous_ones(coord):
    rid_a, rid_b = _ambiguous(coord)
    runs = coord["sd"] / "runs"
    with pytest.raises(server_cli.CliError, match="ambiguous"):
        server_cli.resolve_run(runs, rid_a)
    assert server_cli.resolve_run(runs, "a")["folder"] == "a"
    assert server_cli.resolve_run(runs, rid_b)["folder"] == rid_a
    assert server_cli.resolve_run(runs, str(runs / rid_a))["folder"] == rid_a  # a path is a folder, never an ID


def test_a_second_launch_into_the_same_run_folder_while_the_first_submits_is_refused(tmp_path, monkeypatch):
    """Two `fl-server run --name X` at once both passed the folder check (made before the seconds-long
    submission) and both ran on the nodes; the later launch.json replaced the other's (independent
    reliability review, 2026-12-07). A launch now waits for the other to finish, then is checked."""
    state = tmp_path / "coord"
    state.mkdir()
    monkeypatch.setattr(server_cli, "_coordinator", lambda sd: {"address": "127.0.0.1:1", "ca": "", "insecure": True})
    monkeypatch.setattr(server_cli, "LAUNCH_LOCK_WAIT_S", 1.0)
    args = ["run", "--department", "health", "--rounds", "1", "--no-secagg", "--name", "dup", "--state-dir", str(state),
            "--app", str(ROOT), "--wait-start", "0"]
    ids = iter(["1111", "2222"])
    nested = {}

    def submit(sd, app_dir, cfg_text):
        run_id = next(ids)
        if run_id == "1111":  # while the first launch is submitting, a second one starts
            nested["result"] = runner.invoke(server_cli.app, args)
        return {"run-id": run_id, "fab-hash": "ab" * 32}

    monkeypatch.setattr(server_cli, "_submit", submit)
    first = runner.invoke(server_cli.app, args)
    second = nested["result"]
    assert first.exit_code == 0, first.output
    assert second.exit_code == 2, second.output
    assert "another fl-server run" in _text(second) and "fix:" in _text(second)
    rec = json.loads((state / "runs" / "dup" / "launch.json").read_text())
    assert rec["run-ids"] == ["1111"]
    third = runner.invoke(server_cli.app, args)  # afterwards: the usual check names the folder
    assert third.exit_code == 2 and "exists" in _text(third), _text(third)
