"""``fl-server`` and its operator console given bad input: exit 2, a message naming the option, key or
file, the value and the fix, nothing written before the input is checked, no traceback.

Most tests need no coordinator: the checking functions are called directly, or ``fl-server`` runs
in process (typer's CliRunner) against a state dir that only looks started (nothing listens) with a
stand-in ``flwr``. The tests marked ``live`` share one real ``fl-server start`` on loopback (TLS,
node auth, ``--admin-net 10.0.0.0/8``; a few seconds) for what only Flower can say (unknown run and
node IDs), the single-instance lock and the port check. ``fl-server start`` runs that may start a
SuperLink run as subprocesses in their own session, killed by process group in ``finally``.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
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

BIN = Path(sys.executable).parent
runner = CliRunner(env={"COLUMNS": "250"})
FIX_RUNS = "use a folder name or run ID from `fl-server runs`"


def _text(res) -> str:
    return " ".join((res.output + (res.stderr if res.stderr_bytes is not None else "")).split())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "250",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            try:
                os.killpg(proc.pid, 0)  # what it started may outlive it
            except (ProcessLookupError, PermissionError):
                return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def fl_server(*args: str, timeout: float = 60.0) -> tuple[int | None, str]:
    """Run ``fl-server ARGS`` in its own session; ``(exit status or None after timeout, output)``."""
    proc = subprocess.Popen([str(BIN / "fl-server"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(), start_new_session=True)
    try:
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            rc = None
    finally:
        _kill_group(proc)
    return rc, out


@pytest.fixture(scope="module")
def pki_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    pki.create_ca(d / "ca")
    pki.issue_server_cert(d / "ca", d / "server", ["127.0.0.1", "localhost"])
    pki.create_ca(d / "other-ca", "Some Other CA")
    pki.issue_server_cert(d / "other-ca", d / "other-server", ["127.0.0.1", "localhost"])
    return d


def _tls(pki_files, key: Path | None = None) -> list[str]:
    return ["--ca", str(pki_files / "ca" / "ca.crt"), "--cert", str(pki_files / "server" / "server.crt"),
            "--key", str(key or pki_files / "server" / "server.key")]


def _started_state(pki_files, tmp_path) -> Path:
    """A coordinator state dir that looks started (connection and coordinator.json; nothing listens)."""
    sd = tmp_path / "state"
    server_cli.write_connection(sd, "127.0.0.1:1", pki_files / "ca" / "ca.crt", insecure=False)
    (sd / "coordinator.json").write_text(json.dumps({"address": "127.0.0.1:1", "ca": str(pki_files / "ca" / "ca.crt")}))
    return sd


@pytest.fixture
def fake_coordinator(pki_files, tmp_path, monkeypatch):
    """A state dir that looks started, and a ``flwr`` that records launches (run config) and answers ``ls``."""
    sd = _started_state(pki_files, tmp_path)
    launched = []

    def fake_flwr(state_dir, *args, **kw):
        if args[:2] == ("supernode", "ls"):
            return {"success": True, "nodes": []}
        if args[0] == "ls":
            return {"success": True, "runs": [{"run-id": "7", "status": "finished:completed", "elapsed": 3.0}]}
        assert args[0] == "run", args
        launched.append(tomllib.loads(Path(args[args.index("--run-config") + 1]).read_text()))
        return {"success": True, "run-id": str(100 + len(launched))}

    monkeypatch.setattr(server_cli, "flwr", fake_flwr)
    return sd, launched


def _run(sd: Path, *args: str):
    return runner.invoke(server_cli.app, ["run", "--state-dir", str(sd), "--wait-start", "0", *args])


# --------------------------------------------------------------------------- 2. underscore run-config keys


@pytest.mark.parametrize("key, hyphenated", [("local_epochs", "local-epochs"), ("target_epsilon", "target-epsilon"),
                                             ("num_rounds", "num-rounds")])
def test_settings_refuses_the_field_name_of_a_hyphenated_key(key, hyphenated):
    from server.app import RunConfigError, settings

    with pytest.raises(RunConfigError) as err:
        settings({"department": "health", key: 2})
    assert err.value.keys == (key,)
    assert f"did you mean '{hyphenated}'" in str(err.value) and "fix:" in str(err.value)


def test_settings_still_takes_hyphenated_and_node_side_keys():
    from server.app import settings

    cfg = settings({"department": "health", "local-epochs": 2, "data": "bundled", "run-id": "x"})
    assert cfg["local-epochs"] == 2 and cfg["data"] == "bundled"


def test_run_refuses_an_underscore_key_before_anything_is_written(fake_coordinator):
    sd, launched = fake_coordinator
    res = _run(sd, "--department", "health", "--name", "u", "-c", "local_epochs=2")
    text = _text(res)
    assert res.exit_code == 2, text
    assert "local_epochs" in text and "did you mean 'local-epochs'" in text and "fix:" in text
    assert launched == [] and not (sd / "runs" / "u").exists()


def test_run_refuses_node_side_keys_flower_would_refuse(fake_coordinator):
    sd, launched = fake_coordinator
    res = _run(sd, "--department", "health", "--name", "n", "-c", "data=/x.csv")
    text = _text(res)
    assert res.exit_code == 2 and "'data'" in text and "fl-client" in text and "fix:" in text, text
    assert launched == [] and not (sd / "runs" / "n").exists()


# --------------------------------------------------------------------------- 3. -c against the options


@pytest.mark.parametrize("args, words", [
    (["--department", "health", "-c", "department=traffic"], ["--department health", "department=traffic"]),
    (["--department", "health", "--rounds", "7", "-c", "num-rounds=3"], ["--rounds 7", "num-rounds=3"]),
    (["--department", "health", "--no-secagg", "-c", "secagg=true"], ["--no-secagg", "secagg=true"]),
    (["--department", "health", "--secagg-num-shares", "5", "-c", "secagg-num-shares=7"],
     ["--secagg-num-shares 5", "secagg-num-shares=7"]),
    (["--department", "health", "-c", "run-dir=/tmp/elsewhere"], ["run-dir", "--name", "--runs-dir"]),
    (["--department", "health", "-c", "resume=true"], ["resume", "--resume"]),
    (["--department", "health", "-c", "lr=0.1", "-c", "lr=0.2"], ["lr", "twice"]),
    (["--department", "health", "-c", "=1"], ["'=1'", "no key"]),
])
def test_run_refuses_run_config_that_conflicts_with_options_or_is_set_by_fl_server(fake_coordinator, args, words):
    sd, launched = fake_coordinator
    res = _run(sd, "--name", "c", *args)
    text = _text(res)
    assert res.exit_code == 2, text
    assert all(w in text for w in words) and "fix:" in text, text
    assert "unknown run config key '?'" not in text
    assert launched == [] and not (sd / "runs" / "c").exists()


def test_run_takes_run_config_that_agrees_with_the_options(fake_coordinator):
    sd, launched = fake_coordinator
    res = _run(sd, "--name", "ok", "--department", "health", "--rounds", "3", "-c", "num-rounds=3",
               "-c", "department=health")
    assert res.exit_code == 0, _text(res)
    assert launched[-1]["num-rounds"] == 3 and launched[-1]["department"] == "health"


def test_resume_refuses_another_department_in_run_config(fake_coordinator):
    sd, launched = fake_coordinator
    assert _run(sd, "--name", "r", "--department", "health").exit_code == 0
    res = _run(sd, "--resume", "r", "-c", "department=traffic")
    text = _text(res)
    assert res.exit_code == 2 and "department=traffic" in text and "health" in text, text
    assert len(launched) == 1


# --------------------------------------------------------------------------- central-data, read by the ServerApp


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "missing.csv", ["file not found"]),
    (lambda d: d, ["directory"]),
    (lambda d: (d / "bad.csv").write_text("id,age\n1,63\n") and d / "bad.csv", ["missing required column"]),
])
def test_run_checks_central_data_before_it_launches(fake_coordinator, tmp_path, make, words):
    """The ServerApp reads central-data when the run starts: a missing or bad file was a run that
    launched (exit 0) and failed 10 s later with a traceback in the coordinator's log."""
    sd, launched = fake_coordinator
    path = make(tmp_path)
    res = _run(sd, "--department", "health", "--name", "cd", "-c", f"central-data={path}")
    text = _text(res)
    assert res.exit_code == 2, text
    assert "central-data" in text and str(path) in text and all(w in text for w in words) and "fix:" in text.lower(), text
    assert "Traceback" not in text
    assert launched == [] and not (sd / "runs" / "cd").exists()


def test_a_forecasting_central_data_file_needs_the_test_start_variable(fake_coordinator, tmp_path, monkeypatch):
    """fl-server has no --test-start: the coordinator's own traffic file takes CITYFED_TEST_START, and the fix says so."""
    from citydata import TrafficCounts

    sd, launched = fake_coordinator
    f = TrafficCounts().raw_frame()
    path = tmp_path / "central.csv"
    f[f["detector"] == 3].to_csv(path, index=False)
    monkeypatch.delenv("CITYFED_TEST_START", raising=False)
    res = _run(sd, "--department", "traffic", "--name", "cd", "-c", f"central-data={path}")
    text = _text(res)
    assert res.exit_code == 2 and "no test start" in text and "set CITYFED_TEST_START" in text and "fl-server" in text, text
    assert launched == []
    monkeypatch.setenv("CITYFED_TEST_START", "2024-05-07 12:00")
    assert _run(sd, "--department", "traffic", "--name", "cd", "-c", f"central-data={path}").exit_code == 0
    assert len(launched) == 1


def test_run_checks_central_data_given_as_the_apps_default(fake_coordinator, tmp_path):
    """A central-data set in --app's pyproject.toml (not by -c) is read before the launch too."""
    sd, launched = fake_coordinator
    app = tmp_path / "app"
    app.mkdir()
    text = (ROOT / "pyproject.toml").read_text()
    assert '\ncentral-data = ""' in text
    (app / "pyproject.toml").write_text(text.replace('\ncentral-data = ""', f'\ncentral-data = "{tmp_path}/gone.csv"'))
    res = _run(sd, "--department", "health", "--name", "appcd", "--app", str(app))
    text = _text(res)
    assert res.exit_code == 2 and "central-data" in text and "gone.csv" in text and "file not found" in text, text
    assert launched == [] and not (sd / "runs" / "appcd").exists()


def test_run_resolves_a_relative_central_data_path_from_where_it_runs(fake_coordinator, tmp_path, monkeypatch):
    """The ServerApp runs in `fl-server start`'s working directory: the run config carries the
    absolute path of the file the operator named, from the folder `fl-server run` ran in."""
    from citydata import load_department

    sd, launched = fake_coordinator
    (tmp_path / "ref").mkdir()
    load_department("health", None).raw_frame().to_csv(tmp_path / "ref" / "heart.csv", index=False)
    monkeypatch.chdir(tmp_path)
    res = _run(sd, "--department", "health", "--name", "rel", "-c", "central-data=ref/heart.csv")
    assert res.exit_code == 0, _text(res)
    assert launched[-1]["central-data"] == str(tmp_path / "ref" / "heart.csv")
    assert _run(sd, "--department", "health", "--name", "bun", "-c", "central-data=bundled").exit_code == 0
    assert launched[-1]["central-data"] == "bundled"


def test_parse_run_config_names_the_item():
    with pytest.raises(server_cli.CliError, match="no key"):
        server_cli.parse_run_config(["=1"])
    with pytest.raises(server_cli.CliError, match="twice"):
        server_cli.parse_run_config(["lr=1", " lr = 2"])
    with pytest.raises(server_cli.CliError, match="fix:"):
        server_cli.parse_run_config(["lr"])


# --------------------------------------------------------------------------- 4. run and node IDs


@pytest.mark.parametrize("value", ["18446744073709551616", "99999999999999999999999"])
def test_run_ids_outside_64_bits_are_refused(tmp_path, value):
    with pytest.raises(server_cli.CliError) as err:
        server_cli._flwr_run_id(tmp_path / "runs", value)
    assert err.value.code == 2 and value in str(err.value) and FIX_RUNS in str(err.value)
    assert server_cli._flwr_run_id(tmp_path / "runs", str(2**64 - 1)) == str(2**64 - 1)


@pytest.mark.parametrize("cmd", [["stop", "18446744073709551616"], ["logs", "99999999999999999999999"],
                                 ["unregister", "99999999999999999999999"], ["unregister", "abc"]])
def test_commands_refuse_ids_outside_64_bits_before_asking_flower(pki_files, tmp_path, cmd):
    sd = _started_state(pki_files, tmp_path)
    res = runner.invoke(server_cli.app, [*cmd, "--state-dir", str(sd)])
    text = _text(res)
    assert res.exit_code == 2, (text, res.exception)
    assert cmd[1] in text and "fix:" in text


def test_flower_failures_are_plain_text():
    boxed = ("\x1b[92mINFO \x1b[0m:      Printing logstream for run_id `123`\n╭─ Error ──────╮\n"
             "│ [code: 16] Run ID not found.          │\n╰──────────────╯\n")
    msg = server_cli.flower_message(boxed)
    assert "\x1b" not in msg and "╭" not in msg and "│" not in msg
    assert "[code: 16] Run ID not found." in msg
    assert server_cli.flower_code(boxed) == 16


# --------------------------------------------------------------------------- 5. --key of another certificate


def test_key_that_does_not_belong_to_the_certificate_is_refused(pki_files):
    cert = pki_files / "server" / "server.crt"
    server_cli.check_tls_key(cert, pki_files / "server" / "server.key")
    with pytest.raises(server_cli.CliError) as err:
        server_cli.check_tls_key(cert, pki_files / "other-server" / "server.key")
    assert err.value.code == 2 and "--key" in str(err.value) and "does not belong" in str(err.value)
    with pytest.raises(server_cli.CliError, match="--key .*not a PEM private key"):
        server_cli.check_tls_key(cert, cert)


@pytest.mark.parametrize("which", ["other-key", "certificate"])
def test_start_with_a_mismatched_key_exits_2_before_writing(pki_files, tmp_path, which):
    key = pki_files / "other-server" / "server.key" if which == "other-key" else pki_files / "server" / "server.crt"
    sd = tmp_path / "state"
    rc, out = fl_server("start", *_tls(pki_files, key), "--host", "127.0.0.1", "--port", str(_free_port()),
                        "--state-dir", str(sd), timeout=60)
    text = " ".join(out.split())
    assert rc == 2, text[-3000:]
    assert "--key" in text and "fix:" in text and "Traceback" not in text
    assert not (sd / "coordinator.json").exists()


# --------------------------------------------------------------------------- 6. --state-dir / --runs-dir that are files


def test_state_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for sd in (f, f / "under"):
        res = runner.invoke(server_cli.app, ["start", "--insecure", "--state-dir", str(sd), "--port", str(_free_port())])
        text = _text(res)
        assert res.exit_code == 2, (text, res.exception)
        assert "--state-dir" in text and "fix:" in text


def test_runs_dir_that_is_a_file_is_refused_by_run(fake_coordinator, tmp_path):
    sd, launched = fake_coordinator
    f = tmp_path / "runs-file"
    f.write_text("x")
    res = _run(sd, "--department", "health", "--runs-dir", str(f))
    assert res.exit_code == 2 and "--runs-dir" in _text(res), (_text(res), res.exception)
    assert launched == []


@pytest.mark.parametrize("what", ["missing", "file"])
def test_runs_refuses_a_runs_dir_that_is_not_a_folder(fake_coordinator, tmp_path, what):
    sd, _ = fake_coordinator
    d = tmp_path / "nowhere"
    if what == "file":
        d.write_text("x")
    res = runner.invoke(server_cli.app, ["runs", "--state-dir", str(sd), "--runs-dir", str(d)])
    text = _text(res)
    assert res.exit_code == 2 and "--runs-dir" in text and "fix:" in text, text


def test_runs_without_any_run_yet_is_fine(fake_coordinator):
    sd, _ = fake_coordinator
    assert runner.invoke(server_cli.app, ["runs", "--state-dir", str(sd)]).exit_code == 0


# --------------------------------------------------------------------------- 7. malformed launch.json


BAD_LAUNCH = {"list": "[1, 2]", "wrong-types": json.dumps({"run-ids": "abc", "config": []}),
              "truncated": '{"run-ids": ["7"], "config": {"depart', "bad-id": json.dumps({"run-ids": [True], "config": {}})}


def _runs_with_bad_launch(sd: Path, bad: str) -> Path:
    good = sd / "runs" / "good"
    good.mkdir(parents=True)
    (good / "launch.json").write_text(json.dumps({"run-ids": ["7"], "config": {"department": "health"}}))
    broken = sd / "runs" / "broken"
    broken.mkdir()
    (broken / "launch.json").write_text(BAD_LAUNCH[bad])
    return broken / "launch.json"


@pytest.mark.parametrize("bad", sorted(BAD_LAUNCH))
def test_launches_skip_a_malformed_launch_json_with_one_warning(tmp_path, capsys, bad):
    path = _runs_with_bad_launch(tmp_path, bad)
    first = server_cli._launches(tmp_path / "runs")
    again = server_cli._launches(tmp_path / "runs")
    err = " ".join(capsys.readouterr().err.split())
    assert [d["folder"] for d in first if not d.get("unreadable")] == ["good"]
    assert [d["folder"] for d in again if d.get("unreadable")] == ["broken"]
    assert err.count(str(path)) == 1 and "unreadable launch.json" in err


@pytest.mark.parametrize("bad", sorted(BAD_LAUNCH))
def test_runs_and_logs_survive_a_malformed_launch_json(fake_coordinator, bad):
    sd, _ = fake_coordinator
    path = _runs_with_bad_launch(sd, bad)
    res = runner.invoke(server_cli.app, ["runs", "--state-dir", str(sd)])
    text = _text(res)
    assert res.exit_code == 0, (text, res.exception)
    assert "good" in text and "broken" in text and "unreadable launch.json" in text
    res = runner.invoke(server_cli.app, ["logs", "broken", "--state-dir", str(sd)])
    text = _text(res)
    assert res.exit_code == 2, (text, res.exception)
    assert str(path) in text and "fix:" in text


def test_console_pages_survive_a_malformed_launch_json(fake_coordinator):
    from fastapi.testclient import TestClient

    from server import console

    sd, _ = fake_coordinator
    _runs_with_bad_launch(sd, "list")
    token = console.load_token(sd)
    client = TestClient(console.make_app(sd, sd / "runs", token=token, cache_s=0),
                        base_url="http://127.0.0.1:8090", raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {token}"}
    for page in ("/", "/runs", "/runs/good", "/runs/broken", "/nodes"):
        resp = client.get(page, headers=auth)
        assert resp.status_code == 200, (page, resp.text[-2000:])
    assert "unreadable launch.json" in client.get("/runs", headers=auth).text
    assert "unreadable launch.json" in client.get("/runs/broken", headers=auth).text
    assert client.get("/runs", headers=auth).text.count('href="/runs/broken"') == 1  # one row, not a second empty one
    assert client.get("/runs/good/stop", headers=auth).status_code == 404  # (10) not 405


def test_launch_json_is_written_atomically(fake_coordinator, monkeypatch):
    sd, _ = fake_coordinator
    written = []
    original = server_cli._write_atomic
    monkeypatch.setattr(server_cli, "_write_atomic", lambda path, text: (written.append(Path(path).name), original(path, text)))
    assert _run(sd, "--department", "health", "--name", "a").exit_code == 0
    assert "launch.json" in written
    assert server_cli.read_launch(sd / "runs" / "a" / "launch.json")["run-ids"] == ["101"]


# --------------------------------------------------------------------------- 9. --admin-net keeps loopback


def test_admin_networks_always_include_loopback_and_the_address_commands_dial():
    nets = [str(n) for n in server_cli.admin_networks(["10.0.0.0/8"], "0.0.0.0")]
    assert {"10.0.0.0/8", "127.0.0.1/32", "::1/128"} <= set(nets)
    assert "10.1.2.3/32" in [str(n) for n in server_cli.admin_networks([], "10.1.2.3")]
    assert sorted(map(str, server_cli.admin_networks([], "0.0.0.0"))) == ["127.0.0.1/32", "::1/128"]
    assert "always" in " ".join(runner.invoke(server_cli.app, ["start", "--help"]).output.split())


# --------------------------------------------------------------------------- 10. nitpicks


def test_run_checks_the_run_config_before_the_coordinator(tmp_path):
    res = _run(tmp_path / "no-coordinator", "--department", "health", "-c", "batch-size=0")
    text = _text(res)
    assert res.exit_code == 2 and "batch-size" in text and "fix:" in text, text


def test_run_names_the_100_character_limit_of_name(fake_coordinator):
    sd, _ = fake_coordinator
    res = _run(sd, "--department", "health", "--name", "a" * 300)
    text = _text(res)
    assert res.exit_code == 2 and "100" in text and "fix:" in text, text


# --------------------------------------------------------------------------- live coordinator (1, 4, 8, 9)


@pytest.fixture(scope="module")
def live(pki_files, tmp_path_factory):
    """A started coordinator with ``--admin-net 10.0.0.0/8`` (no loopback given): ``(state dir, port, pid)``."""
    base = tmp_path_factory.mktemp("live")
    port = _free_port()
    state = base / "state"
    log = base / "coordinator.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([str(BIN / "fl-server"), "start", *_tls(pki_files), "--host", "127.0.0.1",
                                 "--port", str(port), "--state-dir", str(state), "--admin-net", "10.0.0.0/8"],
                                stdout=fh, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        end = time.monotonic() + 90
        while "Uvicorn running" not in log.read_text(errors="replace") and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.2)
        assert proc.poll() is None and "Uvicorn running" in log.read_text(errors="replace"), log.read_text()[-3000:]
        yield state.resolve(), port, proc.pid
    finally:
        _kill_group(proc)


def test_live_admin_net_without_loopback_still_serves_local_commands(live):
    state, _, _ = live
    res = runner.invoke(server_cli.app, ["nodes", "--state-dir", str(state)])
    assert res.exit_code == 0, _text(res)
    coord = json.loads((state / "coordinator.json").read_text())
    assert {"10.0.0.0/8", "127.0.0.1/32", "::1/128"} <= set(coord["admin-nets"])


@pytest.mark.parametrize("cmd, fix", [(["stop", "123"], FIX_RUNS), (["logs", "123"], FIX_RUNS),
                                      (["logs", "123", "--follow"], FIX_RUNS),
                                      (["unregister", "12345"], "use a node ID from `fl-server nodes`")])
def test_live_ids_flower_does_not_know_exit_2_with_the_fix(live, cmd, fix):
    state, _, _ = live
    rc, out = fl_server(*cmd, "--state-dir", str(state), timeout=120)
    text = " ".join(out.split())
    assert rc == 2, text
    assert fix in text and cmd[1] in text and "\x1b" not in out and "╭" not in out


def test_live_start_on_a_busy_port_exits_2_before_writing(pki_files, live, tmp_path):
    _, port, _ = live
    sd = tmp_path / "state"
    rc, out = fl_server("start", *_tls(pki_files), "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(sd),
                        timeout=60)
    text = " ".join(out.split())
    assert rc == 2, text[-3000:]
    assert f"--port {port}" in text and "fix:" in text
    assert not (sd / "coordinator.json").exists() and not (sd / "flwr-home").exists()


def test_live_second_start_on_the_same_state_dir_is_refused(pki_files, live):
    """Last of the live tests: without the lock a second start rewrites the live coordinator's files."""
    state, port, pid = live
    from privacy.audit import AuditLog

    files = {p: p.read_bytes() for p in (state / "coordinator.json", state / "flwr-home" / "config.toml")}
    starts = sum(e["kind"] == "start" for e in AuditLog(server_cli.audit_paths(state)[0]).entries())
    rc, out = fl_server("start", *_tls(pki_files), "--host", "127.0.0.1", "--port", str(_free_port()),
                        "--state-dir", str(state), timeout=45)
    text = " ".join(out.split())
    assert rc == 2, text[-3000:]
    assert f"pid {pid}" in text and "--state-dir" in text and "fix:" in text
    assert {p: p.read_bytes() for p in files} == files
    assert sum(e["kind"] == "start" for e in AuditLog(server_cli.audit_paths(state)[0]).entries()) == starts
    # and the lock is the file fl-client's lock is: held with flock, naming the holder
    with open(state / "fl-server.lock") as fh:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert fh.read().strip() == str(pid)


# --------------------------------------------------------------------------- --host: an address, nothing else


@pytest.mark.parametrize("host, says, fix", [
    ("127.0.0.1:80", "port", "--host 127.0.0.1 --port 80"),
    ("[::1]:9092", "port", "--host ::1 --port 9092"),
    ("999.1.1.1", "not an IP address", "--host"),
    ("https://coord.city.example", "scheme", "--host coord.city.example"),
    ("coord_city", "host name", "--host"),
    ("coord city", "host name", "--host"),
])
def test_start_refuses_a_host_that_is_not_an_address_or_host_name(pki_files, tmp_path, host, says, fix):
    """Was: '--cert ... does not cover 127.0.0.1:80 ... Fix: reissue it ... --san 127.0.0.1:80' (fl-pki refuses that)."""
    sd = tmp_path / "state"
    res = runner.invoke(server_cli.app, ["start", *_tls(pki_files), "--host", host, "--port", str(_free_port()),
                                         "--state-dir", str(sd)])
    text = _text(res)
    assert res.exit_code == 2, text
    assert text.startswith(f"error: --host {host}") and says in text and "fix:" in text and fix in text, text
    assert "--san" not in text and "reissue" not in text, text
    assert not sd.exists()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "localhost", "coord.city.example", "0.0.0.0", "::"])
def test_check_host_takes_ip_literals_and_host_names(host):
    server_cli.check_host(host)


@pytest.mark.parametrize("host", ["127.0.0.1:8090", "999.1.1.1", "http://localhost"])
def test_console_refuses_a_host_that_is_not_an_address_or_host_name(pki_files, tmp_path, host):
    sd = tmp_path / "state"
    (sd / "runs").mkdir(parents=True)
    res = runner.invoke(server_cli.app, ["console", "--state-dir", str(sd), "--host", host, "--allow-remote",
                                         "--certfile", str(pki_files / "server" / "server.crt"),
                                         "--keyfile", str(pki_files / "server" / "server.key")])
    text = _text(res)
    assert res.exit_code == 2 and text.startswith(f"error: --host {host}:") and "fix:" in text, text
    assert "cannot listen" not in text, text  # was: a bind test's 'Name or service not known' for 127.0.0.1:8090
    assert not (sd / "console.token").exists()


# --------------------------------------------------------------------------- --app's pyproject.toml


def _app_copy(tmp_path, old: str, new: str) -> Path:
    """A copy of the project's pyproject.toml in a folder, with ``old`` replaced by ``new`` (once)."""
    text = (ROOT / "pyproject.toml").read_text()
    assert old in text
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(text.replace(old, new, 1))
    return app


@pytest.mark.parametrize("old, new, bom, words", [
    # a key given twice: was 'no readable pyproject.toml with [tool.flwr.app.config]'
    ("num-rounds = 5\n", "num-rounds = 5\nnum-rounds = 5\n", False, ["not valid TOML", "line", "num-rounds"]),
    ("[tool.flwr.app.config]", "[tool.flwr.app.konfig]", False, ["no [tool.flwr.app.config] table"]),
    # Flower's `flwr run` reads pyproject.toml with tomli, which refuses a BOM: named before it is submitted
    ("[tool.flwr.app.config]", "[tool.flwr.app.config]", True, ["byte-order mark (BOM)"]),
], ids=["key-twice", "no-table", "bom"])
def test_run_names_what_is_wrong_with_the_app_pyproject(fake_coordinator, tmp_path, old, new, bom, words):
    sd, launched = fake_coordinator
    path = _app_copy(tmp_path, old, new) / "pyproject.toml"
    if bom:
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    res = _run(sd, "--department", "health", "--app", str(path.parent))
    text = _text(res)
    assert res.exit_code == 2 and not launched, text
    assert str(path) in text and all(w in text for w in words) and "fix:" in text, text
    assert "no readable" not in text


def test_run_checks_the_apps_own_defaults_and_blames_the_file(fake_coordinator, tmp_path):
    """B5: a bad default in --app's pyproject.toml passed 'checking the run config'; the ServerApp
    merges the app's defaults with the run config, so fl-server run checks them merged and names the
    file's key (not a -c item the operator never typed)."""
    sd, launched = fake_coordinator
    app = _app_copy(tmp_path, "num-rounds = 5\n", 'num-rounds = "five"\n')
    res = _run(sd, "--department", "health", "--app", str(app))
    text = _text(res)
    assert res.exit_code == 2 and not launched, text
    assert str(app / "pyproject.toml") in text and "num-rounds" in text and "'five'" in text and "fix:" in text, text
    assert "-c secagg" not in text and "-c num-rounds=<" not in text, text
    # an override the operator gives wins over the file's default, as in the ServerApp
    res = _run(sd, "--department", "health", "--app", str(app), "--rounds", "3")
    assert res.exit_code == 0 and launched, _text(res)


# --------------------------------------------------------------------------- node.pub with a byte-order mark


def test_register_names_a_byte_order_mark_in_node_pub(tmp_path):
    """Was: 'is not an OpenSSH public key' for a valid key saved 'UTF-8 with BOM' (Notepad). Flower's
    `flwr supernode register` reads the file itself and refuses the BOM too, so it is named, not stripped."""
    _, pub, _ = pki.create_node_key(tmp_path / "k", "health", "site-a")
    bom = tmp_path / "k" / "bom.pub"
    bom.write_bytes(b"\xef\xbb\xbf" + pub.read_bytes())
    sd = tmp_path / "state"
    res = runner.invoke(server_cli.app, ["register", "--state-dir", str(sd), str(bom)])
    text = _text(res)
    assert res.exit_code == 2, text
    assert str(bom) in text and "byte-order mark (BOM)" in text and "fix:" in text and "without BOM" in text, text
    assert "is not an OpenSSH public key" not in text
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")  # read, not edited


def test_run_says_which_value_of_a_conflict_comes_from_the_app_pyproject(fake_coordinator, tmp_path):
    """A conflict of a file default with fl-server run's own setting (secagg on) names the file's key."""
    sd, launched = fake_coordinator
    app = _app_copy(tmp_path, 'strategy = "fedavg"\n', 'strategy = "krum"\n')
    res = _run(sd, "--department", "health", "--app", str(app))
    text = _text(res)
    assert res.exit_code == 2 and not launched, text
    assert f'strategy = "krum" comes from {app / "pyproject.toml"}' in text and "fix:" in text, text


@pytest.mark.parametrize("value", ["abc", "nan", "-1", "1e9"])
def test_start_refuses_a_bad_grid_poll_variable_before_anything_starts(tmp_path, monkeypatch, value):
    """The ServerApp processes inherit CITYFED_GRID_POLL_S; a bad value was found only when a run reached
    its first round. `fl-server start` refuses it (exit 2, the variable named), nothing written."""
    monkeypatch.setenv("CITYFED_GRID_POLL_S", value)
    sd = tmp_path / "state"
    res = runner.invoke(server_cli.app, ["start", "--insecure", "--host", "127.0.0.1", "--state-dir", str(sd),
                                         "--port", str(_free_port())])
    text = _text(res)
    assert res.exit_code == 2, (text, res.exception)
    assert "CITYFED_GRID_POLL_S" in text and value in text and "fix:" in text, text
    assert not (sd / "coordinator.json").exists()


@pytest.mark.parametrize("net", ["0.0.0.0/0", "::/0", "10.0.0.0/4", "2000::/8"])
def test_an_admin_net_that_covers_the_internet_is_refused(net):
    """`--admin-net 0.0.0.0/0` was accepted ("control plane only from ... 0.0.0.0/0"): every address could
    launch runs and register nodes, the guard off (docs-followed review, 2026-12-07)."""
    from server.errors import CliError
    from server.start_checks import admin_networks

    with pytest.raises(CliError) as info:
        admin_networks([net], "127.0.0.1")
    msg = str(info.value)
    import ipaddress

    assert f"--admin-net {ipaddress.ip_network(net, strict=False)}" in msg and "fix:" in msg and info.value.code == 2, msg
    assert admin_networks(["10.20.0.0/16"], "127.0.0.1")  # an operators' network passes
