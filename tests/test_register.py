"""``fl-server register`` of a key the SuperLink already holds, against a real coordinator on loopback.

Flower 1.42 answers a second RegisterNode of one public key with ``[code: 23] Public key already
in use`` and keeps an unregistered node's key for good. An interrupted register (the SuperLink
accepted the key, ``fl-server`` never recorded the node ID) must not leave the operator stuck:
registering the same node.pub again finds that key's node, records it and exits 0. A key that
was unregistered is refused with the file, the node and the fix.

A real ``fl-server start`` (TLS, node auth; about 3 s) runs for this module in its own session
and is killed by its process-group ID in the fixture's finally.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
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


def _text(res) -> str:
    return " ".join((res.output + (res.stderr if res.stderr_bytes is not None else "")).split())


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """A started coordinator: ``(state_dir, keys_dir)``; keys a..e are department node keys."""
    base = tmp_path_factory.mktemp("register")
    pki.create_ca(base / "ca")
    pki.issue_server_cert(base / "ca", base / "server", ["127.0.0.1", "localhost"])
    for n in "abcde":
        pki.create_node_key(base / "keys" / n, "health", f"site-{n}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = base / "state"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = base / "coordinator.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([str(BIN / "fl-server"), "start", "--ca", str(base / "ca" / "ca.crt"),
                                 "--cert", str(base / "server" / "server.crt"), "--key", str(base / "server" / "server.key"),
                                 "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(state)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        end = time.monotonic() + 90
        while "Uvicorn running" not in log.read_text(errors="replace") and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.2)
        assert proc.poll() is None and "Uvicorn running" in log.read_text(errors="replace"), log.read_text()[-3000:]
        yield state.resolve(), base / "keys"
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass


def register(state: Path, pub: Path, *extra: str):
    res = runner.invoke(server_cli.app, ["register", str(pub), "--state-dir", str(state), *extra])
    return res.exit_code, _text(res), (res.stdout.strip().splitlines() or [""])[-1]


def labels(state: Path) -> dict:
    path = state / "nodes.json"
    return json.loads(path.read_text()) if path.exists() else {}


def audit_kinds(state: Path) -> list[dict]:
    from privacy.audit import AuditLog

    log, _, _ = server_cli.audit_paths(state)
    return [e for e in AuditLog(log).entries() if e["kind"] == "register"] if log.exists() else []


def test_register_after_an_interrupted_register_records_the_node_the_superlink_holds(coordinator):
    state, keys = coordinator
    pub = keys / "a" / "node.pub"
    fp = pki.load_public_key(pub).fingerprint
    # what an interrupted `fl-server register` leaves: the SuperLink accepted the key, nothing recorded
    node_id = str(server_cli.flwr(state, "supernode", "register", str(pub.resolve()), server_cli.CONNECTION,
                                  json_out=True)["node-id"])
    assert node_id not in labels(state)
    code, text, last = register(state, pub)
    assert code == 0, text
    assert last == node_id and "already registered" in text and fp in text
    assert labels(state)[node_id] == {"name": "health-site-a", "fingerprint": fp, "public-key": str(pub.resolve())}
    entry = audit_kinds(state)[-1]["data"]
    assert entry["node-id"] == node_id and entry["fingerprint"] == fp and entry["already-registered"] is True
    # and again: same node, exit 0, still one node for this key
    code, text, last = register(state, pub)
    assert code == 0 and last == node_id, text
    nodes = server_cli.list_nodes(state)
    assert [n["node-id"] for n in nodes if n.get("fingerprint") == fp] == [node_id]


def test_register_of_a_key_in_use_never_labels_another_keys_node(coordinator):
    state, keys = coordinator
    code, text, b_id = register(state, keys / "b" / "node.pub", "--name", "health-b")
    assert code == 0, text
    c_pub = keys / "c" / "node.pub"
    c_id = str(server_cli.flwr(state, "supernode", "register", str(c_pub.resolve()), server_cli.CONNECTION,
                               json_out=True)["node-id"])
    before_b = labels(state)[b_id]
    code, text, last = register(state, c_pub, "--name", "health-c")
    assert code == 0 and last == c_id and last != b_id, text
    got = labels(state)
    assert got[b_id] == before_b  # b's label untouched
    assert got[c_id]["fingerprint"] == pki.load_public_key(c_pub).fingerprint and got[c_id]["name"] == "health-c"


def test_register_of_an_unregistered_key_names_the_file_the_node_and_the_fix(coordinator):
    state, keys = coordinator
    pub = keys / "d" / "node.pub"
    code, text, node_id = register(state, pub)
    assert code == 0, text
    res = runner.invoke(server_cli.app, ["unregister", node_id, "--state-dir", str(state)])
    assert res.exit_code == 0, _text(res)
    before = labels(state)
    code, text, _ = register(state, pub)
    assert code == 1, text
    assert str(pub.resolve()) in text and node_id in text and "was unregistered" in text
    assert "fl-pki node-key" in text and "--force" in text and "fl-server register" in text
    assert "Traceback" not in text
    assert labels(state) == before
    # the fix works: a new key for the same site registers as a new node
    pki.create_node_key(keys / "d", "health", "site-d", force=True)
    code, text, new_id = register(state, pub)
    assert code == 0 and new_id != node_id, text


def test_key_in_use_but_not_listed_is_an_error_that_says_what_to_do(coordinator, monkeypatch):
    """A key the SuperLink holds but does not list for this operator (another account's): no guess, a clear error."""
    state, keys = coordinator
    pub = keys / "e" / "node.pub"

    def in_use(sd, *args, **kw):
        raise server_cli.CliError(f"`flwr {' '.join(args)}` failed: [code: 23] Public key already in use.", 1)

    monkeypatch.setattr(server_cli, "flwr", in_use)
    before = labels(state)
    code, text, _ = register(state, pub)
    assert code == 1, text
    assert str(pub.resolve()) in text and "already registered" in text and "fl-server nodes" in text
    assert "fl-pki node-key" in text
    assert labels(state) == before
