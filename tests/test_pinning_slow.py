"""App pinning in deployment: nodes refuse app code their department did not approve (loopback, real processes).

The coordinator launches runs (`fl-server run --app DIR`) whose FAB differs from the cityfed
release installed on the nodes: (a) a copy of the project whose clients/node.py no longer
applies the department's policy check, (b) a copy whose ClientApp reads the node's data file
and returns its bytes. Every node (two warm, one `fl-client --cold`) refuses them before
installing or importing anything of them: 0 train replies, no byte of any data file in the
SuperLink's database, the refusals in results.json name the differing files. After
`fl-client app approve <sha256 of (a)>` on the nodes, (a) runs and a round completes. Control
of the leak search: once one department approves (b), its records are found there.

Uses the loopback harness of tests/test_deploy_slow.py (CA, TLS, node auth, free ports).
Run with ``pytest -m slow tests/test_pinning_slow.py`` (2 cores: about 3 min).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from test_deploy_slow import BIN, SITES, City, MessageAudit, env, slug  # noqa: E402
from test_pinning import NO_POLICY_CHECK  # noqa: E402

#: Appended to clients/app.py in copy (b): the ClientApp answers every message with the node's records.
EXFILTRATE = '''

from pathlib import Path as _Path

from flwr.app import ConfigRecord as _ConfigRecord

app = ClientApp()


@app.train()
def _steal(msg: Message, context: Context) -> Message:
    records = _Path(str(context.node_config["data"])).read_bytes()
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1}),
                               "loot": _ConfigRecord({"data": records})}), reply_to=msg)


@app.evaluate()
def _steal_too(msg: Message, context: Context) -> Message:
    return _steal(msg, context)
'''

#: Sites run by fl-client's default (warm worker) and by `fl-client --cold`.
COLD = "VA Long Beach"


def app_copy(dst: Path, changes: dict[str, str]) -> tuple[Path, str]:
    """Copy the project's fab-include files and pyproject.toml to ``dst``, append ``changes``; return (dst, FAB sha256)."""
    from flower_compat.testing import build_fab_from_disk

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["fab-include"]
    for pattern in patterns:
        for src in ROOT.glob(pattern):
            if src.is_file() and "__pycache__" not in src.parts:
                target = dst / src.relative_to(ROOT)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
    for rel, suffix in changes.items():
        with open(dst / rel, "a") as fh:
            fh.write(suffix)
    return dst, hashlib.sha256(build_fab_from_disk(dst)).hexdigest()  # what `flwr run` will ship (deterministic)


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    c = City(tmp_path_factory.mktemp("pin-city"))
    try:
        c.start_coordinator()
        yield c
    finally:
        c.stop_all()


@pytest.fixture(scope="module")
def nodes(city):
    """The three hospitals online: two warm nodes and one `fl-client --cold`. {site: (node_id, Proc)}."""
    ids = {site: city.register(slug(site)) for site in SITES}
    procs = {site: city.start_node(site, extra=["--cold"] if site == COLD else []) for site in SITES}
    city.wait_online(ids.values())
    return {site: (ids[site], procs[site]) for site in SITES}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    base = tmp_path_factory.mktemp("apps")
    return {"no-check": app_copy(base / "no-check", {"clients/node.py": NO_POLICY_CHECK}),
            "exfiltrate": app_copy(base / "exfiltrate", {"clients/app.py": EXFILTRATE})}


def node_home(city, site: str) -> Path:
    return city.base / f"node-{slug(site)}"


def run_app(city, app_dir: Path, name: str) -> tuple[str, dict, dict]:
    """Launch one round of ``app_dir`` on all three nodes (no SecAgg+); wait; return (run ID, run, results.json)."""
    res = city.fl_server("run", "--app", str(app_dir), "--department", "health", "--rounds", "1", "--name", name,
                         "--no-secagg", "--run-config", "min-nodes=3", "--run-config", "round-timeout=90")
    run_id = res.stdout.strip().splitlines()[-1]
    run = city.wait_run(run_id, 300)
    return run_id, run, json.loads((city.state / "runs" / name / "results.json").read_text())


def data_lines(city) -> list[bytes]:
    """Every record line of every node's data file (header excluded)."""
    return [ln for site in SITES for ln in (city.base / "data" / f"{slug(site)}.csv").read_bytes().splitlines()[1:]
            if len(ln) >= 20]


def superlink_db_bytes(city) -> bytes:
    """The SuperLink's database as stored on disk (main file, WAL and journal if present)."""
    return b"".join(p.read_bytes() for p in city.state.glob("state.db*") if p.is_file())


def assert_refused_everywhere(city, nodes, audit, run_id, results, digest, files):
    ids = {int(nid) for nid, _ in nodes.values()}
    refused = [r for r in results["refused"] if str(r["code"]) == "4033"]
    assert {r["node"] for r in refused} == ids, results["refused"]
    for r in refused:
        assert f"FAB sha256 {digest}" in r["reason"] and "app not approved by this department" in r["reason"]
        for f in files:
            assert f in r["reason"], (f, r["reason"])
    assert results["rounds"][0]["train"]["accepted"] == 0 and results["status"].startswith("stopped")
    got = audit.messages(run_id, to_coordinator=True)
    assert {row["src"] for row, _ in got} == ids and all(msg is None for _, msg in got)  # error replies only
    assert len(audit.messages(run_id, to_coordinator=False)) == 3  # the capture saw the run's messages
    for site in SITES:
        home = node_home(city, site)
        assert (home / "apps" / "quarantine" / f"{digest}.fab").is_file(), site
        assert json.loads((home / "apps" / "quarantine" / "index.json").read_text())["runs"][str(run_id)]["sha256"] == digest
        assert not list((home / "apps").glob(f"*.{digest[:8]}")), f"{site} installed the refused FAB"


def test_nodes_refuse_unapproved_apps_then_run_an_approved_one(city, nodes, copies):
    import time

    t0 = time.monotonic()
    audit = MessageAudit(city.state / "state.db")
    audit.install()
    try:
        # (a) the policy check removed
        app_a, sha_a = copies["no-check"]
        run_a, run, results = run_app(city, app_a, "pin-no-check")
        assert run["status"].startswith("finished"), run
        assert_refused_everywhere(city, nodes, audit, run_a, results, sha_a, ["clients/node.py (modified)"])
        # (b) the ClientApp sends the node's records to the coordinator
        app_b, sha_b = copies["exfiltrate"]
        run_b, run, results = run_app(city, app_b, "pin-exfiltrate")
        assert_refused_everywhere(city, nodes, audit, run_b, results, sha_b, ["clients/app.py (modified)"])
        lines = data_lines(city)
        captured = sqlite3.connect(city.state / "state.db", timeout=60)
        try:
            blobs = [c for (c,) in captured.execute("SELECT content FROM cityfed_audit_objects") if c]
        finally:
            captured.close()
        assert blobs and len(lines) > 500
        stored = b"\n".join(blobs) + superlink_db_bytes(city)
        leaked = [ln for ln in lines if ln in stored]
        assert not leaked, f"{len(leaked)} record line(s) of the nodes' data reached the SuperLink, e.g. {leaked[0]!r}"
        t1 = time.monotonic()
    finally:
        audit.remove()
    for site, (_, proc) in nodes.items():
        log = proc.text()
        assert "app not approved by this department" in log and "train compute" not in log, site
        assert proc.alive(), f"{site}: a refusal must not stop the node"

    # the departments review (a) and approve it: the same FAB now runs
    for site in SITES:
        home = node_home(city, site)
        review = subprocess.run([str(BIN / "fl-client"), "app", "review", sha_a[:12], "--state-dir", str(home)],
                                env={**env(), "COLUMNS": "200"}, capture_output=True, text=True, timeout=120)
        assert review.returncode == 0 and "clients/node.py" in review.stdout and "+def check_job" in review.stdout
        approve = subprocess.run([str(BIN / "fl-client"), "app", "approve", sha_a, "--state-dir", str(home)],
                                 env=env(), capture_output=True, text=True, timeout=120)
        assert approve.returncode == 0, approve.stdout + approve.stderr
    run_ok, run, results = run_app(city, app_a, "pin-approved")
    assert run["status"] == "finished:completed", city.fl_server("logs", run_ok).stdout[-3000:]
    assert results["status"] == "completed" and results["rounds"][0]["train"]["accepted"] == 3
    assert not [r for r in results["refused"] if str(r["code"]) == "4033"]
    for site in SITES:
        assert list((node_home(city, site) / "apps").glob(f"*.{sha_a[:8]}")), site  # installed once approved
    try:
        from privacy.audit import AuditLog
    except ImportError:
        AuditLog = None
    if AuditLog is not None:
        for site in SITES:
            kinds = [e["kind"] for e in AuditLog(node_home(city, site) / "audit.jsonl").entries()]
            assert {"app-refused", "app-approved", "app-accepted"} <= set(kinds), (site, kinds)
    t2 = time.monotonic()

    # control of the leak detector: one department (wrongly) approves (b); the others still refuse it,
    # and the same search finds that department's records in the SuperLink's database
    victim = "Cleveland"
    subprocess.run([str(BIN / "fl-client"), "app", "approve", sha_b, "--state-dir", str(node_home(city, victim))],
                   env=env(), capture_output=True, text=True, timeout=120, check=True)
    audit.install()
    try:
        run_leak, run, results = run_app(city, app_b, "pin-leak-control")
        refused = {r["node"] for r in results["refused"] if str(r["code"]) == "4033"}
        assert refused == {int(nodes[s][0]) for s in SITES if s != victim}
        con = sqlite3.connect(city.state / "state.db", timeout=60)
        try:
            stored = b"\n".join(c for (c,) in con.execute("SELECT content FROM cityfed_audit_objects") if c)
        finally:
            con.close()
    finally:
        audit.remove()
    mine = (city.base / "data" / f"{slug(victim)}.csv").read_bytes().splitlines()[1:]
    assert sum(ln in stored for ln in mine) == len(mine)  # every record of the approving node, found
    print(f"pinning: 2 unapproved apps refused by 3 nodes (1 cold) in {t1 - t0:.1f} s; approved app ran a round "
          f"in {t2 - t1:.1f} s; leak-detector control {time.monotonic() - t2:.1f} s")
