"""Supervision on loopback (issue 11, item 4): real fl-server and fl-client processes, default settings.

* the coordinator's SuperExec killed (SIGKILL) mid-run: ``fl-server start`` logs it, restarts it,
  and resumes the run it was running from its checkpoint; the run completes, no manual step;
* a run's ServerApp killed mid-run: noticed at once from its process, marked failed in Flower
  with the reason, resumed, completes;
* ``fl-server stop``: results.json ("stopped by operator", the rounds done), model.safetensors and
  report.html are left, and ``fl-server runs`` shows that result;
* a run that ends cleanly on too few updates (every node refuses it): ``runs`` shows its own
  result next to Flower's ``finished:completed``;
* ``fl-client`` killed with SIGKILL: its SuperNode (and the SuperNode's process group) is gone
  within seconds and signed off; a restarted fl-client runs exactly one SuperNode on the key.

Processes are found through ``/proc`` (children of the PIDs this file started) and only
processes this file started are signalled, by PID. Run with
``pytest -m slow tests/test_supervision_slow.py`` (about 6 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from faultlog import max_run_epsilon, record  # noqa: E402
from test_deploy_slow import SITES, City, _round_of_checkpoint, slug, wait_for  # noqa: E402

from clients.cli import supernodes_using_key  # noqa: E402
from server.cli import proc_children, proc_cmdline, proc_stat  # noqa: E402

TRAINING = SITES[:2]  # two hospitals train (--no-secagg); the third is the fl-client kill test's
RUN = ["--no-secagg", "--run-config", "min-nodes=2", "--run-config", "fraction-evaluate=0"]


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    c = City(tmp_path_factory.mktemp("supervision"))
    try:
        c.start_coordinator()  # default supervision settings
        yield c
    finally:
        c.stop_all()


@pytest.fixture(scope="module")
def nodes(city):
    ids = {site: city.register(slug(site)) for site in TRAINING}
    procs = {site: city.start_node(site) for site in TRAINING}
    city.wait_online(ids.values())
    return {site: (ids[site], procs[site]) for site in TRAINING}


def alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st["state"] not in ("Z", "X")


def named_children(pid: int, name: str) -> list[int]:
    return [c for c in proc_children(pid) if any(Path(a).name == name for a in proc_cmdline(c)[:2]) and alive(c)]


def superexec(city) -> int | None:
    found = named_children(city.coordinator.pid, "flower-superexec")
    return found[0] if len(found) == 1 else None


def serverapp(city) -> int | None:
    se = superexec(city)
    found = named_children(se, "flwr-serverapp") if se else []
    return found[0] if len(found) == 1 else None


def run_row(city, run_id: str) -> dict:
    return next(r for r in city.runs() if str(r["run-id"]) == str(run_id))


def wait_round_1(city, folder: Path, run_id: str) -> None:
    """Wait for the run's round-1 checkpoint; fail at once, saying why, if the run ended first."""
    def ready():
        if _round_of_checkpoint(folder) >= 1:
            return True
        if (folder / "results.json").exists():
            status = json.loads((folder / "results.json").read_text())["status"]
            raise AssertionError(f"run {run_id} ended before its round 1 was checkpointed: {status}")
        return False

    wait_for(ready, 300, f"round 1 of {folder.name} to be checkpointed", poll=0.5)


def received(proc, run_id: str) -> int:
    """Train messages of ``run_id`` this node has fully received (from its own log)."""
    chunks = proc.text().split(f"[RUN {run_id}]")[1:]
    return sum("Receiving: train message" in c.split("[RUN ", 1)[0] and "Received successfully" in c.split("[RUN ", 1)[0]
               for c in chunks)


def wait_quiet_round_2(city, nodes, folder: Path, run_id: str) -> None:
    """Wait until every node holds the run's round-2 message (nothing in flight: the nodes are training).

    Faults are injected at this point, not while a node is still pulling a message: a run that
    ends while a flwr 1.41 SuperNode pulls one of its messages leaves a task behind in the
    node that answers the node's next message in its place, stalling an unrelated later run
    (node-side, outside this test's subject).
    """
    wait_round_1(city, folder, run_id)
    wait_for(lambda: all(received(proc, run_id) >= 2 for _, proc in nodes.values()), 240,
             f"both nodes to hold round 2 of {folder.name}", poll=0.05)


def launch_ids(folder: Path) -> list[str]:
    return [str(r) for r in json.loads((folder / "launch.json").read_text())["run-ids"]]


def wait_resumed(city, folder: Path, timeout: float = 240) -> str:
    wait_for(lambda: len(launch_ids(folder)) == 2, timeout, f"the automatic resume of {folder.name}", poll=1)
    return launch_ids(folder)[-1]


def check_completed(city, folder: Path, first: str, resumed: str, rounds: int) -> dict:
    run = city.wait_run(resumed, 300)
    assert run["status"] == "finished:completed", city.fl_server("logs", resumed).stdout[-3000:]
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and results["run_id"] == first
    assert [r["round"] for r in results["rounds"]] == list(range(1, rounds + 1))  # none lost, none repeated
    assert (folder / "report.html").exists() and (folder / "metric.png").exists()  # deployment report
    assert run_row(city, first)["result"] == f"resumed as run {resumed}"
    assert run_row(city, resumed)["result"] == "completed"
    return results


def test_killed_superexec_is_restarted_and_its_run_resumed(city, nodes):
    folder = city.state / "runs" / "superexec-kill"
    first = city.launch("--rounds", "4", "--name", folder.name, *RUN)
    wait_quiet_round_2(city, nodes, folder, first)
    old = superexec(city)
    assert old is not None and serverapp(city) is not None
    os.kill(old, signal.SIGKILL)  # the ServerApp it started follows it (Flower's parent-PID watch)
    t_kill = time.monotonic()
    wait_for(lambda: "SuperExec restarted" in city.coordinator.text(), 60, "fl-server start to restart the SuperExec",
             poll=0.2)
    t_detect = time.monotonic() - t_kill
    log = city.coordinator.text()
    assert f"the SuperExec (pid {old}) exited (killed by SIGKILL)" in log and "restart 1/5" in log
    new = superexec(city)
    assert new is not None and new != old and city.coordinator.alive()
    resumed = wait_resumed(city, folder)
    results = check_completed(city, folder, first, resumed, 4)
    log = city.coordinator.text()
    assert f"run {first} (superexec-kill): its ServerApp" in log and f"resumed as run {resumed}" in log
    record("the coordinator's SuperExec killed (SIGKILL) in round 2; its ServerApp dies with it",
           "fl-server start restarted the SuperExec and resumed the run from its checkpoint (same run ID, "
           "4/4 rounds, runs shows 'resumed as run ...')", f"{t_detect:.1f} s (to the restart)", 0,
           max_run_epsilon(city, TRAINING, results["run_id"]), results["config"].get("target-epsilon"),
           "--no-secagg, 2 nodes")


def test_killed_serverapp_is_marked_failed_and_resumed(city, nodes):
    folder = city.state / "runs" / "serverapp-kill"
    first = city.launch("--rounds", "4", "--name", folder.name, *RUN)
    wait_quiet_round_2(city, nodes, folder, first)
    app = serverapp(city)
    assert app is not None
    os.kill(app, signal.SIGKILL)  # no chance to report: Flower alone says "running" until its heartbeat expires
    t_kill = time.monotonic()
    wait_for(lambda: f"its ServerApp process (pid {app}) died (killed by SIGKILL)" in city.coordinator.text(), 30,
             "fl-server start to notice the dead ServerApp", poll=0.2)
    t_detect = time.monotonic() - t_kill
    assert "automatic resume 1/3" in city.coordinator.text()
    wait_for(lambda: f"run {first}: marked finished:failed" in city.coordinator.text(), 30,
             "the dead run to be marked failed", poll=0.5)
    row = run_row(city, first)
    assert row["status"] == "finished:failed" and row["status-details"].startswith("its ServerApp process")
    resumed = wait_resumed(city, folder)
    results = check_completed(city, folder, first, resumed, 4)
    record("the ServerApp killed (SIGKILL) in round 2", "marked finished:failed with the reason, resumed "
           "automatically from its checkpoint (same run ID, 4/4 rounds)", f"{t_detect:.1f} s (to the notice)", 0,
           max_run_epsilon(city, TRAINING, results["run_id"]), results["config"].get("target-epsilon"),
           "--no-secagg, 2 nodes")


def test_stop_leaves_results_report_and_runs_agrees(city, nodes):
    folder = city.state / "runs" / "stopped"
    run_id = city.launch("--rounds", "30", "--name", folder.name, *RUN)
    wait_quiet_round_2(city, nodes, folder, run_id)
    res = city.fl_server("stop", folder.name)
    assert "stopped by operator after" in " ".join(res.stdout.split())
    results = json.loads((folder / "results.json").read_text())
    done = results["rounds-completed"]
    assert results["status"] == "stopped by operator" and 1 <= done < 30
    assert [r["round"] for r in results["rounds"]] == list(range(1, done + 1)) and results["run_id"] == run_id
    assert (folder / "model.safetensors").exists() and "stopped by operator" in (folder / "report.html").read_text()
    row = run_row(city, run_id)
    assert row["status"] == "finished:stopped" and row["result"] == "stopped by operator"
    time.sleep(3)  # the supervisor saw the ServerApp go: a stopped run is not resumed
    assert launch_ids(folder) == [run_id] and f"run {run_id} (stopped)" not in city.coordinator.text()


def test_run_that_stops_on_too_few_updates_shows_its_result(city, nodes):
    folder = city.state / "runs" / "too-few"
    # every node's policy requires DP-SGD: a job without it is refused by all, round 1 has no update
    run_id = city.launch("--rounds", "2", "--name", folder.name, *RUN, "--run-config", "dp=false")
    row = city.wait_run(run_id, 300)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"].startswith("stopped:") and (folder / "report.html").exists()
    # Flower: the ServerApp ended cleanly; the run's own result says why it stopped, never "completed"
    assert row["status"] == "finished:completed"
    assert run_row(city, run_id)["result"] == results["status"]
    table = " ".join(city.fl_server("runs").stdout.split())
    assert "result" in table and "stopped:" in table


def test_killed_fl_client_leaves_no_supernode(city):
    site = SITES[2]
    key = city.base / "keys" / slug(site) / "node.key"
    node_id = city.register(slug(site))
    for p in city.procs:  # a first attempt's nodes (when this is a rerun) end before the key is used again
        if p.log.name == f"node-{slug(site)}.log" and p.alive():
            p.stop()
    client = city.start_node(site)
    city.wait_online([node_id])
    supernodes = supernodes_using_key(key)
    assert [s["owner"] for s in supernodes] == [client.pid]
    sn = supernodes[0]["pid"]
    assert supernodes[0]["pgid"] == sn != os.getpgid(client.pid)  # its own process group
    os.kill(client.pid, signal.SIGKILL)  # fl-client only (not its group): the kernel tells the SuperNode
    client.p.wait(timeout=10)
    t0 = time.monotonic()
    wait_for(lambda: not alive(sn), 10, "the SuperNode to end after its fl-client was killed", poll=0.1)
    assert time.monotonic() - t0 < 5

    def group_gone() -> bool:
        try:
            os.killpg(sn, 0)
        except ProcessLookupError:
            return True
        return False

    # they follow through Flower's parent-PID watch (0.2 s) and a graceful shutdown: slower on a busy machine
    wait_for(group_gone, 30, "the SuperNode's SuperExec and ClientApp worker to end", poll=0.1)
    # it signs off on SIGTERM (offline at once) unless it dies before its sign-off call completes;
    # then the SuperLink marks it offline when its heartbeat expires (seen once in a full module run)
    t1 = time.monotonic()
    wait_for(lambda: {n["node-id"]: n["status"] for n in city.nodes()}[node_id] == "offline", 120,
             "the coordinator to show the killed node offline", poll=1)
    print(f"\nkilled fl-client: offline at the coordinator {time.monotonic() - t1:.1f} s after its processes ended")
    again = city.start_node(site)
    city.wait_online([node_id])
    assert [s["owner"] for s in supernodes_using_key(key)] == [again.pid]  # one SuperNode on the key
    assert "SuperNode ID" in again.text()
    again.stop()
    assert supernodes_using_key(key) == []
