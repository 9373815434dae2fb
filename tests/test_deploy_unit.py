"""Deployment pieces without a running federation: the control-plane guard (ASGI, no
network), the pyproject app section, the fast-poll grid, fl-client start-up validation,
the fl-client supervisor, and fl-server's input checks."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import sys
import threading
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clients import cli as client_cli  # noqa: E402
from privacy import pki  # noqa: E402
from server import cli as server_cli  # noqa: E402
from server.guard import ControlPlaneGuard, install_guard, parse_networks  # noqa: E402

runner = CliRunner(env={"COLUMNS": "250"})
POLICY = ROOT / "examples" / "policies" / "health.toml"


# --------------------------------------------------------------------------- guard


class Inner:
    """Records what reached the SuperLink app behind the guard."""

    def __init__(self):
        self.paths = []

    async def __call__(self, scope, receive, send):
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})


def call(guard, path, peer, kind="http"):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {"type": kind, "path": path, "client": peer, "method": "POST", "headers": []}
    asyncio.run(guard(scope, receive, send))
    if kind == "websocket":
        return sent[0]
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


CONTROL_PATHS = ["/v1/control/start-run", "/v1/control/register-node", "/v1/control/list-runs",
                 "/v1/control/unregister-node", "/v1/runtime/acquire-task", "/v1/runtime/push-messages",
                 "/openapi.json", "/docs", "/", "/v1/fleetx/pull-messages", "/v1/fleet"]
FLEET_PATHS = ["/v1/fleet/pull-messages", "/v1/fleet/activate-node", "/v1/fleet/push-messages", "/health"]


@pytest.mark.parametrize("path", CONTROL_PATHS)
@pytest.mark.parametrize("peer", [("127.0.0.3", 40000), ("10.1.2.3", 1), ("::ffff:192.168.1.5", 2), ("2001:db8::1", 3),
                                  None, ("testclient", 50000)])
def test_guard_refuses_control_and_runtime_from_non_admin(path, peer):
    inner = Inner()
    status, body = call(ControlPlaneGuard(inner), path, peer)
    assert status == 403 and b"forbidden" in body
    assert inner.paths == []


@pytest.mark.parametrize("path", FLEET_PATHS)
def test_guard_passes_fleet_paths_from_anyone(path):
    inner = Inner()
    assert call(ControlPlaneGuard(inner), path, ("10.1.2.3", 5555)) == (200, b"inner")
    assert inner.paths == [path]


@pytest.mark.parametrize("peer", [("127.0.0.1", 1), ("::1", 2), ("::ffff:127.0.0.1", 3)])
def test_guard_passes_control_from_loopback_admin(peer):
    inner = Inner()
    assert call(ControlPlaneGuard(inner), "/v1/control/start-run", peer)[0] == 200
    assert inner.paths == ["/v1/control/start-run"]


def test_guard_admin_networks_configurable():
    nets = parse_networks(["10.20.0.0/16", "192.168.7.7"])
    inner = Inner()
    guard = ControlPlaneGuard(inner, nets)
    assert call(guard, "/v1/control/register-node", ("10.20.3.4", 1))[0] == 200
    assert call(guard, "/v1/control/register-node", ("192.168.7.7", 1))[0] == 200
    assert call(guard, "/v1/control/register-node", ("192.168.7.8", 1))[0] == 403
    assert call(guard, "/v1/control/register-node", ("127.0.0.1", 1))[0] == 403  # loopback is not implied
    with pytest.raises(ValueError, match="not-a-net"):
        parse_networks(["not-a-net"])


def test_guard_closes_non_admin_websocket():
    msg = call(ControlPlaneGuard(Inner()), "/v1/control/stream-logs", ("10.0.0.9", 1), kind="websocket")
    assert msg == {"type": "websocket.close", "code": 1008}


def test_guard_is_outermost_superlink_middleware(monkeypatch):
    from flwr.superlink import extensions
    from flwr.superlink import main as superlink_main

    from server.guard import guard_installed_in_superlink

    monkeypatch.setattr(extensions, "get_middleware", extensions.get_middleware)  # restored after the test
    assert not guard_installed_in_superlink()
    install_guard(parse_networks(["127.0.0.1/32"]))
    install_guard(parse_networks(["127.0.0.1/32"]))  # idempotent: still one guard
    mws = superlink_main._get_middleware()
    assert mws[0].cls is ControlPlaneGuard and [m.cls for m in mws].count(ControlPlaneGuard) == 1
    assert guard_installed_in_superlink()


# --------------------------------------------------------------------------- pyproject


def test_pyproject_app_config_matches_run_settings_defaults():
    from server.app import DEFAULTS, settings

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr_app = project["tool"]["flwr"]["app"]
    assert flwr_app["components"] == {"serverapp": "server.app:app", "clientapp": "clients.app:app"}
    assert flwr_app["publisher"]
    config = flwr_app["config"]
    assert config == {"department": "health", **DEFAULTS}, "run `fl-server app-config` and paste it into pyproject.toml"
    assert tomllib.loads(server_cli.app_config_toml().split("\n", 1)[1]) == config
    settings(config)  # the shipped defaults validate
    assert {"fl-server", "fl-client"} <= set(project["project"]["scripts"])


# --------------------------------------------------------------------------- grid


class FakeGrid:
    def __init__(self, answer_after: int):
        self.pulls = 0
        self.answer_after = answer_after

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        if self.pulls < self.answer_after:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)[:1]]


def test_fast_poll_grid_collects_all_replies_quickly():
    from server.grid import FastPollGrid

    inner = FakeGrid(answer_after=3)
    t0 = time.monotonic()
    replies = FastPollGrid(inner, 0.05).send_and_receive([1, 2, 3], timeout=30)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert time.monotonic() - t0 < 1.0  # Flower's HttpGrid would sleep 3 s per empty pull


def test_fast_poll_grid_honours_timeout():
    from server.grid import FastPollGrid

    t0 = time.monotonic()
    assert FastPollGrid(FakeGrid(answer_after=10**9), 0.05).send_and_receive([1], timeout=0.3) == []
    assert 0.3 <= time.monotonic() - t0 < 1.5


def test_fast_poll_wraps_only_deployment_grids(monkeypatch):
    from flwr.superlink.grid.http_grid import HttpGrid

    from server.grid import FastPollGrid, fast_poll
    from simulations.inprocess import InProcessGrid

    other = object.__new__(InProcessGrid)
    assert fast_poll(other) is other
    http = object.__new__(HttpGrid)
    wrapped = fast_poll(http)
    assert isinstance(wrapped, FastPollGrid) and wrapped.inner is http and fast_poll(wrapped) is wrapped
    monkeypatch.setenv("CITYFED_GRID_POLL_S", "0")
    assert fast_poll(http) is http


# --------------------------------------------------------------------------- fl-client validation


@pytest.fixture(scope="module")
def pki_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    pki.create_ca(d / "ca")
    pki.issue_server_cert(d / "ca", d / "server", ["127.0.0.1", "localhost"])
    pki.create_ca(d / "other-ca", "Some Other CA")
    pki.create_node_key(d / "node", "health", "Cleveland")
    return d


class TLSServer:
    """A TLS endpoint presenting the coordinator certificate (no Flower behind it)."""

    def __init__(self, cert: Path, key: Path):
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            try:
                conn.settimeout(5)
                with self.ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def tls_server(pki_files):
    srv = TLSServer(pki_files / "server" / "server.crt", pki_files / "server" / "server.key")
    yield srv
    srv.close()


def client_args(pki_files, tmp_path, port, **over):
    args = {"--department": "health", "--site": "Cleveland", "--data": "bundled", "--policy": str(POLICY),
            "--coordinator": f"127.0.0.1:{port}", "--ca": str(pki_files / "ca" / "ca.crt"),
            "--key": str(pki_files / "node" / "node.key"), "--state-dir": str(tmp_path / "node"),
            "--connect-timeout": "2", "--check": None}
    args.update(over)
    out = []
    for k, v in args.items():
        out += [k] if v is None else [k, v]
    return out


def run_client(args):
    res = runner.invoke(client_cli.app, args)
    text = " ".join((res.output + (res.stderr if res.stderr_bytes is not None else "")).split())
    return res.exit_code, text


def test_fl_client_check_passes_with_good_inputs(pki_files, tls_server, tmp_path):
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port))
    assert code == 0, text
    assert "ready" in text and "TLS verified" in text
    assert (tmp_path / "node" / "ledger.sqlite").exists()


def test_fl_client_bad_data_file(pki_files, tls_server, tmp_path):
    bad = tmp_path / "records.csv"
    bad.write_text("patient,weight\n1,70\n2,80\n")
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--data": str(bad)}))
    assert code == 2 and str(bad) in text and "--data" in text


def test_fl_client_missing_data_file(pki_files, tls_server, tmp_path):
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--data": str(tmp_path / "nope.csv")}))
    assert code == 2 and "nope.csv" in text and "not found" in text


def test_fl_client_site_not_in_data(pki_files, tls_server, tmp_path):
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--site": "Atlantis"}))
    assert code == 2 and "Atlantis" in text and "Cleveland" in text


def test_fl_client_bad_policy(pki_files, tls_server, tmp_path):
    bad = tmp_path / "policy.toml"
    bad.write_text(POLICY.read_text().replace("max_epsilon = 8.0", 'max_epsilon = "eight"'))
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--policy": str(bad)}))
    assert code == 2 and str(bad) in text and "max_epsilon" in text


def test_fl_client_policy_of_other_department(pki_files, tls_server, tmp_path):
    other = ROOT / "examples" / "policies" / "traffic.toml"
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--policy": str(other)}))
    assert code == 2 and "traffic.toml" in text and "department" in text


def test_fl_client_missing_key(pki_files, tls_server, tmp_path):
    missing = tmp_path / "gone" / "node.key"
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--key": str(missing)}))
    assert code == 2 and str(missing) in text and "fl-pki node-key" in text


def test_fl_client_public_key_instead_of_private(pki_files, tls_server, tmp_path):
    pub = pki_files / "node" / "node.pub"
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--key": str(pub)}))
    assert code == 2 and str(pub) in text and "node.pub" in text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_fl_client_unreadable_key(pki_files, tls_server, tmp_path):
    key = tmp_path / "node.key"
    key.write_bytes((pki_files / "node" / "node.key").read_bytes())
    key.chmod(0)
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--key": str(key)}))
    assert code == 2 and str(key) in text


def test_fl_client_unreachable_coordinator(pki_files, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.monotonic()
    code, text = run_client(client_args(pki_files, tmp_path, port))
    assert code == 2 and f"127.0.0.1:{port}" in text and "not reachable" in text
    assert time.monotonic() - t0 < 30


def test_fl_client_wrong_ca(pki_files, tls_server, tmp_path):
    other = pki_files / "other-ca" / "ca.crt"
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--ca": str(other)}))
    assert code == 2 and str(other) in text and "does not verify" in text


def test_fl_client_host_not_in_certificate(pki_files, tmp_path):
    # a coordinator certificate for another name: dialling 127.0.0.1 must fail the host-name check
    pki.issue_server_cert(pki_files / "ca", tmp_path / "named", ["coord.city.example"])
    srv = TLSServer(tmp_path / "named" / "server.crt", tmp_path / "named" / "server.key")
    try:
        code, text = run_client(client_args(pki_files, tmp_path, srv.port))
    finally:
        srv.close()
    assert code == 2 and "does not verify" in text and "127.0.0.1" in text


def test_fl_client_ca_file_not_a_certificate(pki_files, tls_server, tmp_path):
    key = pki_files / "node" / "node.key"
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--ca": str(key)}))
    assert code == 2 and str(key) in text and "--ca" in text


def test_fl_client_bad_coordinator_address(pki_files, tmp_path):
    code, text = run_client(client_args(pki_files, tmp_path, 1, **{"--coordinator": "coord.city.example"}))
    assert code == 2 and "HOST:PORT" in text
    for bad in ("https://127.0.0.1:9092", "127.0.0.1:٩٠٩٢", "[::1:9092", "127.0.0.1:0"):
        code, text = run_client(client_args(pki_files, tmp_path, 1, **{"--coordinator": bad}))
        assert code == 2 and "--coordinator" in text and "HOST:PORT" in text, text


def test_fl_client_check_prints_the_sites_counts(pki_files, tls_server, tmp_path):
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port))
    assert code == 0, text
    assert "site Cleveland: 304 records -> 203 training and 101 test records (training tensors X 203x15, y 203); " \
           "0 data warning(s)" in text, text
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--site": "Switzerland"}))
    assert code == 0, text
    assert "site Switzerland: 123 records -> 82 training and 41 test records" in text, text
    assert "data warning: bundled health data: hospital 'Switzerland': imputed 209 missing value(s)" in text, text


def test_fl_client_refuses_data_that_cannot_train(pki_files, tls_server, tmp_path):
    from clients.datasets import load_department

    frame = load_department("health").raw_frame()
    one = frame[frame["dataset"] == "Cleveland"].iloc[:3]
    path = tmp_path / "three.csv"
    one.to_csv(path, index=False)
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--data": str(path)}))
    assert code == 2 and str(path) in text and "'Cleveland'" in text and "ready" not in text, text


def test_fl_client_data_is_a_directory(pki_files, tls_server, tmp_path):
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--data": str(tmp_path)}))
    assert code == 2 and "is a directory" in text and "not found" not in text, text


def test_fl_client_refuses_a_policy_that_refuses_every_job(pki_files, tls_server, tmp_path):
    typo = tmp_path / "policy.toml"
    typo.write_text(POLICY.read_text().replace('allowed_tasks = ["heart-disease"]', 'allowed_tasks = ["heart_disease"]'))
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--policy": str(typo)}))
    assert code == 2 and str(typo) in text and "allowed_tasks" in text and "did you mean 'heart-disease'" in text, text


def test_fl_client_date_format_reaches_the_node(pki_files, tls_server, tmp_path, monkeypatch):
    from clients.datasets import load_department

    frame = load_department("health").raw_frame()
    path = tmp_path / "cleveland.csv"
    frame[frame["dataset"] == "Cleveland"].to_csv(path, index=False)
    ranges = tmp_path / "ranges.toml"
    ranges.write_text("[chol]\nmax = 700\n")
    launched = {}

    def fake_run(self):
        launched["env"] = self.launch.env()
        return 0

    monkeypatch.setattr(client_cli.Supervisor, "run", fake_run)
    args = [a for a in client_args(pki_files, tmp_path, tls_server.port, **{"--data": str(path)}) if a != "--check"]
    code, text = run_client(args + ["--date-format", "dmy", "--ranges", str(ranges)])
    assert code == 0, text
    assert launched["env"]["CITYFED_DATE_FORMAT"] == "DMY" and launched["env"]["CITYFED_RANGES"] == str(ranges.resolve())
    code, text = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--date-format": "weekday-first"}))
    assert code == 2 and "--date-format" in text and "DMY" in text, text


# --------------------------------------------------------------------------- supervisor


class ScriptLaunch(client_cli.NodeLaunch):
    def __init__(self, tmp_path, script):
        super().__init__(coordinator="x:1", ca=tmp_path, key=tmp_path, home=tmp_path, node_config={})
        self.script = script
        self.starts = 0

    def command(self):
        self.starts += 1
        return [sys.executable, "-c", self.script]


def test_supervisor_restarts_with_backoff_then_gives_up(tmp_path):
    launch = ScriptLaunch(tmp_path, "import sys; print('connection lost'); sys.exit(1)")
    sup = client_cli.Supervisor(launch, max_restarts=3, backoff=0.05, backoff_max=0.1)
    t0 = time.monotonic()
    assert sup.run() == client_cli.EXIT_GAVE_UP
    assert launch.starts == 4  # first start + 3 restarts
    assert time.monotonic() - t0 >= 0.05 + 0.1 + 0.1  # waits doubled, capped at backoff_max


def test_supervisor_stops_on_refused_key(tmp_path):
    launch = ScriptLaunch(tmp_path, "import sys; print('Exit Code: 305 [code: 2004] Failed to activate SuperNode'); sys.exit(1)")
    sup = client_cli.Supervisor(launch, max_restarts=5, backoff=0.05)
    assert sup.run() == client_cli.EXIT_REFUSED
    assert launch.starts == 1


def test_supervisor_forwards_sigterm(tmp_path):
    marker = tmp_path / "got-term"
    script = ("import signal, sys, time, pathlib\n"
              f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).write_text('x'), sys.exit(0)))\n"
              "time.sleep(60)\n")
    launch = ScriptLaunch(tmp_path, script)
    sup = client_cli.Supervisor(launch, max_restarts=5, backoff=0.05)

    # signal handlers can only be installed in the main thread: run the loop here, signal from a thread
    def stopper():
        deadline = time.monotonic() + 20
        while (sup.child is None or sup.child.poll() is not None) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # let the child install its handler
        sup._signal(15, None)

    threading.Thread(target=stopper, daemon=True).start()
    t0 = time.monotonic()
    assert sup.run() == client_cli.EXIT_OK
    assert marker.exists() and launch.starts == 1 and time.monotonic() - t0 < 30


# --------------------------------------------------------------------------- fl-server input checks


def test_fl_server_start_refuses_without_tls(tmp_path):
    res = runner.invoke(server_cli.app, ["start", "--state-dir", str(tmp_path), "--port", "1"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "refusing to start without TLS" in text and "--ca" in text
    assert not (tmp_path / "coordinator.json").exists()


def test_fl_server_start_rejects_insecure_with_tls_files(pki_files, tmp_path):
    res = runner.invoke(server_cli.app, ["start", "--insecure", "--ca", str(pki_files / "ca" / "ca.crt"),
                                         "--state-dir", str(tmp_path)])
    assert res.exit_code == 2 and "--insecure" in res.output


def test_fl_server_start_rejects_cert_from_other_ca(pki_files, tmp_path):
    res = runner.invoke(server_cli.app, ["start", "--ca", str(pki_files / "other-ca" / "ca.crt"),
                                         "--cert", str(pki_files / "server" / "server.crt"),
                                         "--key", str(pki_files / "server" / "server.key"), "--state-dir", str(tmp_path)])
    assert res.exit_code == 2 and "server.crt" in res.output and "not signed" in " ".join(res.output.split())


def test_fl_server_commands_need_a_started_coordinator(tmp_path):
    res = runner.invoke(server_cli.app, ["nodes", "--state-dir", str(tmp_path / "none")])
    assert res.exit_code == 3 and "fl-server start" in res.output


def test_fl_server_run_validates_run_config_before_launch(pki_files, tmp_path):
    sd = tmp_path / "state"
    server_cli.write_connection(sd, "127.0.0.1:1", pki_files / "ca" / "ca.crt", insecure=False)
    (sd / "coordinator.json").write_text(json.dumps({"address": "127.0.0.1:1"}))
    res = runner.invoke(server_cli.app, ["run", "--department", "health", "--state-dir", str(sd),
                                         "--run-config", "batch-size=0"])
    assert res.exit_code == 2 and "batch-size" in res.output
    res = runner.invoke(server_cli.app, ["run", "--department", "health", "--state-dir", str(sd),
                                         "--run-config", "no-such-key=1"])
    assert res.exit_code == 2 and "no-such-key" in res.output
    assert not list((sd / "runs").glob("*/launch.json")) if (sd / "runs").exists() else True


def test_parse_run_config_values():
    assert server_cli.parse_run_config(["lr=0.05", "dp=false", "strategy=fedprox", 'model="heart-mlp"', "min-nodes=3"]) == {
        "lr": 0.05, "dp": False, "strategy": "fedprox", "model": "heart-mlp", "min-nodes": 3}
    with pytest.raises(server_cli.CliError):
        server_cli.parse_run_config(["lr"])


def test_fl_server_nodes_and_runs_tables(monkeypatch, tmp_path):
    (tmp_path / "nodes.json").write_text(json.dumps({"42": {"name": "health-Cleveland", "fingerprint": "SHA256:abc"}}))
    (tmp_path / "runs" / "e2e").mkdir(parents=True)
    (tmp_path / "runs" / "e2e" / "launch.json").write_text(json.dumps({"run-ids": ["7"], "config": {}}))
    answers = {"supernode": {"success": True, "nodes": [{"node-id": "42", "status": "online", "online-at": "t"}]},
               "ls": {"success": True, "runs": [{"run-id": "7", "status": "finished:completed", "elapsed": 12.3}]}}
    monkeypatch.setattr(server_cli, "flwr", lambda sd, *args, **kw: answers[args[0]])
    res = runner.invoke(server_cli.app, ["nodes", "--state-dir", str(tmp_path)])
    assert res.exit_code == 0 and "health-Cleveland" in res.output and "SHA256:abc" in res.output and "online" in res.output
    res = runner.invoke(server_cli.app, ["runs", "--state-dir", str(tmp_path)])
    assert res.exit_code == 0 and "finished:completed" in res.output and "e2e" in res.output and "12 s" in res.output
    assert server_cli.resolve_run(tmp_path / "runs", "7")["folder"] == "e2e"
    with pytest.raises(server_cli.CliError, match="no run"):
        server_cli.resolve_run(tmp_path / "runs", "nope")


def _fake_coordinator(pki_files, tmp_path, monkeypatch):
    """A state dir that looks started, and a ``flwr`` that records the run-config file instead of launching."""
    sd = tmp_path / "state"
    server_cli.write_connection(sd, "127.0.0.1:1", pki_files / "ca" / "ca.crt", insecure=False)
    (sd / "coordinator.json").write_text(json.dumps({"address": "127.0.0.1:1"}))
    launched = []

    def fake_flwr(state_dir, *args, **kw):
        assert args[0] == "run"
        launched.append(tomllib.loads(Path(args[args.index("--run-config") + 1]).read_text()))
        return {"success": True, "run-id": str(100 + len(launched))}

    monkeypatch.setattr(server_cli, "flwr", fake_flwr)
    return sd, launched


def test_fl_server_run_uses_secagg_by_default_and_no_secagg_switches_it_off(pki_files, tmp_path, monkeypatch):
    sd, launched = _fake_coordinator(pki_files, tmp_path, monkeypatch)
    base = ["run", "--department", "health", "--state-dir", str(sd)]
    res = runner.invoke(server_cli.app, [*base, "--name", "on"])
    assert res.exit_code == 0, res.output
    assert launched[-1]["secagg"] is True and "secure aggregation ON" in res.output
    assert json.loads((sd / "runs" / "on" / "launch.json").read_text())["config"]["secagg"] is True
    res = runner.invoke(server_cli.app, [*base, "--name", "off", "--no-secagg", "-c", "strategy=krum"])
    assert res.exit_code == 0, res.output
    assert launched[-1]["secagg"] is False and launched[-1]["strategy"] == "krum" and "secure aggregation OFF" in res.output
    res = runner.invoke(server_cli.app, [*base, "--name", "shares", "--secagg-num-shares", "5", "--secagg-threshold", "3"])
    assert res.exit_code == 0, res.output
    assert (launched[-1]["secagg"], launched[-1]["secagg-num-shares"], launched[-1]["secagg-threshold"]) == (True, 5, 3)
    assert "tolerates 2 dropped" in " ".join(res.output.split())
    # a resumed run keeps its mode unless the flag is given
    res = runner.invoke(server_cli.app, ["run", "--resume", "off", "--state-dir", str(sd)])
    assert res.exit_code == 0, res.output
    assert launched[-1]["secagg"] is False and launched[-1]["resume"] is True
    assert len(launched) == 4


@pytest.mark.parametrize("args, key", [
    (["-c", "strategy=krum"], "strategy"), (["-c", "strategy=trimmed-mean"], "strategy"),
    (["--secagg-num-shares", "4"], "secagg-num-shares"), (["--secagg-threshold", "3"], "secagg-threshold"),
])
def test_fl_server_run_refuses_what_secagg_cannot_run(pki_files, tmp_path, monkeypatch, args, key):
    sd, launched = _fake_coordinator(pki_files, tmp_path, monkeypatch)
    res = runner.invoke(server_cli.app, ["run", "--department", "health", "--state-dir", str(sd), *args])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and f"'{key}'" in text and launched == []
    if key == "strategy":
        assert "--no-secagg" in text


def test_tables_never_cut_ids_in_a_narrow_terminal(monkeypatch, capsys):
    """`fl-server nodes`/`runs` on an 80-column terminal still show whole node IDs and run folders."""
    from server import cli as server_cli

    monkeypatch.setenv("COLUMNS", "80")
    row = {"node-id": "10442398150123456789", "name": "health-Cleveland", "status": "online",
           "online-at": "2026-11-23T16:49:06.123456+00:00", "offline-at": "",
           "fingerprint": "SHA256:abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"}
    server_cli._print_rows("department nodes", tuple(row), [row], False)
    out = capsys.readouterr().out
    assert "10442398150123456789" in out and max(map(len, out.splitlines())) <= 80
    server_cli._print_rows("runs", ("run-id", "status", "folder"),
                           [{"run-id": "2091209651743482089", "status": "finished:completed",
                             "folder": "health-20261123T164906Z"}], False)
    out = capsys.readouterr().out
    assert "2091209651743482089" in out and "health-20261123T164906Z" in out


# --------------------------------------------------------------------------- supervision (issue 11, item 4)


def test_a_run_that_stops_on_too_few_updates_gets_results_and_report(tmp_path):
    """A deployment run produced no report.html: the ServerApp (run_federation) now writes it, stopped runs too."""
    from clients.app import app as client_app
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    policy = POLICY.read_text()
    nodes = []
    for site in ("Cleveland", "Hungary"):
        pol = tmp_path / f"{site}.toml"
        pol.write_text(policy)
        nodes.append({"department": "health", "site": site, "policy": str(pol), "ledger": str(tmp_path / f"{site}.sqlite")})
    run_dir = tmp_path / "run"
    cfg = {"department": "health", "num-rounds": 2, "min-accepted": 3, "run-dir": str(run_dir)}  # 2 nodes < 3
    res = run_federation(InProcessGrid(client_app, nodes), cfg, run_id="few")
    assert res["status"].startswith("stopped:")
    page = (run_dir / "report.html").read_text()
    assert (run_dir / "metric.png").exists() and (run_dir / "epsilon.png").exists()
    assert "stopped:" in page and json.loads((run_dir / "results.json").read_text())["status"] == res["status"]
