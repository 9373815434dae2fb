"""A hospital killed mid-round under SecAgg+ with the default deadlines (issue 11), on loopback.

Three hospitals (the deployment guide's city), ``fl-server run`` with its defaults: SecAgg+ on
(3 shares, threshold 2, at least 3 contributors per round) and ``round-timeout = "auto"``. One
node's ``fl-client`` is killed with SIGKILL (its whole process group: SuperNode and ClientApp
worker) at a chosen SecAgg+ stage of round 2, picked from the node's own log:

* (a) while it trains (collect-masked-vectors stage): 2 contributors are left, fewer than 3, so
  the run ends cleanly before anything is unmasked, naming the node;
* (b) as it receives round 2's setup message, so that it drops out before sharing its keys (the
  case where Flower's workflow made every other node fail with ``KeyError`` and halted): the run
  ends before anyone trains;
* (c) after it sent its masked vector, so that it misses the unmask stage: its mask is rebuilt
  from the others' shares and the round completes with all 3 contributions;
* (d) its ClientApp worker hangs while training but the node stays connected (heartbeats go
  on): only the stage's deadline ends the wait (it was ``round-timeout`` = 3600 s before);
* (e) frozen (SIGSTOP of all its processes: a hung machine, no heartbeat, no reply) while it
  trains: the stage's deadline (or the SuperLink's heartbeat expiry, whichever comes first) ends
  the wait. Last: a node restarted after being frozen did not come back online in time here.

A SIGKILLed ``fl-client`` takes its SuperNode down cleanly (it signs off), so the SuperLink
answers for it at once; one that does not (a, b, c in recent runs), a hung ClientApp (d) and a
frozen node (e) are found out by the deadline.

Each test checks that the stage ended within the deadline recorded for it (measured, printed),
that ``results.json`` is consistent (no round lost or repeated, the node named with a readable
reason, no ``KeyError`` anywhere) and that no surviving node logged a traceback.

Module-scoped city of its own (``tests/test_deploy_slow.py``'s harness); run with
``pytest -m slow tests/test_faults_slow.py``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faultlog import max_run_epsilon, record  # noqa: E402
from test_deploy_slow import POLICY, SITES, City, _round_of_checkpoint, slug, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

VICTIM = "VA Long Beach"
#: Seconds allowed on top of a stage's deadline: 0.1 s polling, process start-up under load.
SLACK_S = 10.0
MEASURED: dict[str, dict] = {}  # test -> measured times (printed at the end of each test)


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    c = City(tmp_path_factory.mktemp("faultcity"))
    try:
        c.start_coordinator()
        yield c
    finally:
        c.stop_all()


class Hospitals:
    """The three hospitals of the module's city; :meth:`up` (re)starts any that is not running."""

    def __init__(self, city: City):
        self.city = city
        # a lifetime budget for several runs in one module (the example policy's 8.0 fits two)
        self.policy = city.base / "policy-faults.toml"
        self.policy.write_text(POLICY.read_text().replace("max_epsilon = 8.0", "max_epsilon = 60.0"))
        self.ids = {site: city.register(slug(site)) for site in SITES}
        self.procs: dict = {}
        self.trees: dict[str, list[int]] = {}  # site -> fl-client and its descendants (SuperNode, worker)
        self.cmds: dict[int, bytes] = {}  # pid -> its command line when seen (a reused PID is never signalled)

    def snapshot(self, site: str) -> None:
        """Remember the node's processes (its SuperNode runs in a session of its own)."""
        self.trees[site] = _tree(self.procs[site].pid)
        self.cmds.update({p: _cmdline(p) for p in self.trees[site]})

    def live(self, pids) -> list[int]:
        """Those of ``pids`` still running the command they ran when seen."""
        return [p for p in pids if self.cmds.get(p) and _cmdline(p) == self.cmds[p]]

    def node_processes(self, site: str) -> list[int]:
        """Every running process of this test's node ``site``, and their children.

        Found by the node's key path on the command line (fl-client, SuperNode) or its state dir as
        ``FLWR_HOME`` (SuperExec, ClientApp worker: a killed node can leave them orphaned).
        """
        key = str(self.city.base / "keys" / slug(site) / "node.key").encode()
        home = f"FLWR_HOME={self.city.base / f'node-{slug(site)}'}".encode()

        def ours(pid: int) -> bool:
            if key in _cmdline(pid):
                return True
            try:
                return home in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                return False

        roots = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and ours(int(p.name))]
        out = sorted({q for r in roots for q in _tree(r)})
        self.cmds.update({q: _cmdline(q) for q in out})
        return out

    def _gone(self, site: str) -> None:
        """End what is left of a killed node and wait until the coordinator no longer counts it online."""
        import signal

        left = self.live(sorted(set(self.trees.get(site, [])) | set(self.node_processes(site))))
        _signal_tree(left, signal.SIGTERM)  # a SuperNode still running signs off
        end = time.monotonic() + 20
        while self.live(left) and time.monotonic() < end:
            time.sleep(0.5)
        _signal_tree(self.live(left), signal.SIGKILL)
        nid = str(self.ids[site])

        def offline() -> bool:
            res = self.city.fl_server("nodes", "--json", check=False)
            return res.returncode == 0 and all(n["status"] != "online" for n in json.loads(res.stdout)
                                               if n["node-id"] == nid)

        wait_for(offline, 150, f"{site} offline before its restart", poll=2)

    def up(self) -> None:
        for site in SITES:
            if site not in self.procs or not self.procs[site].alive():
                if site in self.procs:
                    self._gone(site)
                self.procs[site] = self.city.start_node(site, policy=self.policy)
        try:
            self.city.wait_online(self.ids.values(), timeout=180)
        except AssertionError as exc:  # say what each node's processes are doing
            status = {site: [(p, Path(f"/proc/{p}/wchan").read_text() if Path(f"/proc/{p}/wchan").exists() else "?",
                              _cmdline(p)[:60]) for p in self.node_processes(site)] for site in SITES}
            raise AssertionError(f"{exc}; node processes: {status}; VA log: {self.procs[VICTIM].text()[-1500:]}") from None
        for site in SITES:
            self.snapshot(site)


@pytest.fixture(scope="module")
def hospitals(city):
    import signal

    h = Hospitals(city)
    try:
        yield h
    finally:  # the nodes' SuperNodes run in sessions of their own: end those too
        for site, proc in h.procs.items():
            if proc.alive():
                h.snapshot(site)
            proc.stop()
        left = h.live(sorted({p for tree in h.trees.values() for p in tree} |
                             {p for site in SITES for p in h.node_processes(site)}))
        _signal_tree(left, signal.SIGTERM)
        time.sleep(2)
        _signal_tree(h.live(left), signal.SIGKILL)


def _launch(city: City, name: str, rounds: int) -> str:
    res = city.fl_server("run", "--department", "health", "--rounds", str(rounds), "--name", name)  # the defaults
    assert "secure aggregation ON" in " ".join(res.stdout.split())
    return res.stdout.strip().splitlines()[-1]


def _nth(text: str, line: str, n: int) -> int:
    """Index of the ``n``-th occurrence of ``line`` in ``text`` (-1 if fewer)."""
    i = -1
    for _ in range(n):
        i = text.find(line, i + 1)
        if i < 0:
            return -1
    return i


def _await_line(proc, line: str, count: int, then: str | None, folder: Path, timeout: float = 600) -> None:
    """Wait until ``proc``'s log shows ``line`` for the ``count``-th time (and ``then`` after it).

    Fails at once if the run ended first (e.g. the nodes refused the app bundle: this tree changed
    while the run was being set up; ``results.json`` says why).
    """
    def due() -> bool:
        text = proc.text()
        i = _nth(text, line, count)
        return i >= 0 and (then is None or then in text[i:])

    wait_for(lambda: due() or not proc.alive() or (folder / "results.json").exists(), timeout,
             f"{count} x {line!r}", poll=0.02)
    if not due():
        done = folder / "results.json"
        raise AssertionError(json.loads(done.read_text())["status"] if done.exists() else
                             f"fl-client exited ({proc.p.returncode}) before {line!r} x {count}: {proc.text()[-3000:]}")


def _kill_at(hospitals: Hospitals, site: str, line: str, count: int, folder: Path, then: str | None = None,
             timeout: float = 600) -> float:
    """SIGKILL ``site``'s ``fl-client`` (its process group) when its log shows ``line`` for the ``count``-th time.

    (and ``then`` after it). Returns the monotonic time of the kill.
    """
    proc = hospitals.procs[site]
    _await_line(proc, line, count, then, folder, timeout)
    hospitals.snapshot(site)
    proc.kill()
    t = time.monotonic()
    proc.p.wait(timeout=30)
    return t


def _check(city: City, hospitals: Hospitals, name: str, run_id: str, marks: dict) -> dict:
    run = city.wait_run(run_id, 900)
    t_end = time.monotonic()
    folder = city.state / "runs" / name
    text = (folder / "results.json").read_text()
    results = json.loads(text)
    assert run["status"] == "finished:completed", city.fl_server("logs", run_id).stdout[-4000:]
    assert "KeyError" not in text and "<class" not in text, text[-3000:]
    for site in SITES:  # no surviving node logged a traceback or a KeyError for this run
        if site != VICTIM:
            log = hospitals.procs[site].text()[marks[site]:]
            assert "Traceback" not in log and "KeyError" not in log, (site, log[-3000:])
    logs = city.fl_server("logs", run_id).stdout
    assert "Not enough shares" not in logs and "Traceback" not in logs, logs[-3000:]
    results["_ended"] = t_end
    results["_logs"] = logs
    results["_city"] = city
    return results


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux ``/proc``), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _signal_tree(pids: list[int], sig) -> None:
    import os

    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _marks(hospitals: Hospitals) -> dict:
    return {site: len(hospitals.procs[site].text()) for site in SITES}


def _measured(key: str, what: str, stage: dict, drop: dict, res: dict, t_fault: float, scenario: str, outcome: str,
              lost: str | int, **extra) -> None:
    """Keep, record (fault table) and print what one test measured about its fault's stage."""
    MEASURED[key] = {"stage": drop["stage"], "stage_s": stage["seconds"], "deadline_s": stage["deadline"],
                     "basis": stage["basis"], "fault_to_run_end_s": round(res["_ended"] - t_fault, 1),
                     "reason": drop["reason"], **extra}
    record(scenario, outcome, f"{stage['seconds']:.1f} s (stage deadline {stage['deadline']:.0f} s)", lost,
           max_run_epsilon(res["_city"], SITES, res["run_id"]))
    print(f"\n({key}) {what}: stage ended after {stage['seconds']:.1f} s (deadline {stage['deadline']:.1f} s = "
          f"{stage['basis']}{''.join(f'; {k} {v}' for k, v in extra.items())}); fault -> run finished "
          f"{res['_ended'] - t_fault:.1f} s; reason: {drop['reason']}")
    print(json.dumps(MEASURED, indent=1))


def _start(city: City, hospitals: Hospitals, name: str, rounds: int, line: str = "Receiving: train message"):
    """All three hospitals up, then a run launched: ``(victim proc, victim node ID, log marks, lines seen, run ID)``.

    ``lines seen`` counts ``line`` in the victim's log before the run (the fault is timed from it).
    """
    hospitals.up()
    victim = hospitals.procs[VICTIM]
    marks = _marks(hospitals)
    seen = victim.text().count(line)
    return victim, int(hospitals.ids[VICTIM]), marks, seen, _launch(city, name, rounds)


def test_a_node_killed_while_training_ends_the_run_cleanly_naming_it(city, hospitals):
    victim, vid, marks, seen, run_id = _start(city, hospitals, "kill-collect", 3)
    # 4 SecAgg+ train messages per round: the 7th is round 2's collect stage (train + masked vector)
    t_kill = _kill_at(hospitals, VICTIM, "Receiving: train message", seen + 7, city.state / "runs" / "kill-collect")
    res = _check(city, hospitals, "kill-collect", run_id, marks)
    assert res["status"].startswith("stopped: round 2: SecAgg+:"), res["status"]
    assert f"node {vid} (" in res["status"] and "min-accepted=3" in res["status"] and "nothing was unmasked" in res["status"]
    assert [r["round"] for r in res["rounds"]] == [1, 2] and _round_of_checkpoint(city.state / "runs" / "kill-collect") == 1
    r2 = res["rounds"][1]["train"]
    [drop] = r2["secagg"]["dropped"]
    assert drop["node"] == vid and drop["stage"] == "collect_masked_vectors", drop
    assert "SecAgg+ collect-masked-vectors" in drop["reason"] and ("no reply" in drop["reason"] or "unavailable" in drop["reason"])
    assert res["dropped"] == [{"round": 2, **drop}] and res["refused"] == []
    stage = r2["stages"]["collect_masked_vectors"]
    assert "unmask" not in r2["stages"]  # the two-node sum was never unmasked
    assert stage["deadline"] < 600, stage  # measured from round 1, not the first-exchange 600 s
    assert stage["seconds"] <= stage["deadline"] + SLACK_S
    _measured("a", "killed in round 2's collect stage", stage, drop, res, t_kill,
              "kill -9 a node while it trains (SecAgg+ collect stage, round 2 of 3)",
              "run stopped cleanly before anything was unmasked, the node and reason named in results.json",
              "0 (stopped after round 1: 2 contributors < min 3)")
    assert res["_ended"] - t_kill <= stage["deadline"] + 60


def test_b_node_killed_in_setup_nobody_trains(city, hospitals):
    from privacy.ledger import PrivacyLedger

    victim, vid, marks, seen, run_id = _start(city, hospitals, "kill-setup", 3)
    # the 5th train message is round 2's setup: killed while it makes its keys (about 1 s of work
    # here; should its reply slip out first, it drops out of share-keys instead: also before training)
    t_kill = _kill_at(hospitals, VICTIM, "Receiving: train message", seen + 5, city.state / "runs" / "kill-setup")
    res = _check(city, hospitals, "kill-setup", run_id, marks)
    r2 = res["rounds"][1]["train"]
    [drop] = r2["secagg"]["dropped"]
    assert drop["node"] == vid and drop["stage"] in ("setup", "share_keys"), drop
    label = {"setup": "setup", "share_keys": "share-keys"}[drop["stage"]]
    assert f"SecAgg+ {label}" in drop["reason"], drop
    assert res["status"].startswith("stopped: round 2: SecAgg+:"), res["status"]
    assert f"answered the {drop['stage']} stage" in res["status"] and "no node trained" in res["status"]
    assert f"node {vid} (" in res["status"]
    assert [r["round"] for r in res["rounds"]] == [1, 2] and _round_of_checkpoint(city.state / "runs" / "kill-setup") == 1
    assert res["refused"] == [] and "collect_masked_vectors" not in r2["stages"]
    stage = r2["stages"][drop["stage"]]
    assert stage["seconds"] <= stage["deadline"] + SLACK_S and stage["deadline"] < 600
    for site in SITES:  # nobody trained (or spent budget) for the round that could not be completed
        if site != VICTIM:
            rows = [r for r in PrivacyLedger(city.ledger(site)).releases(site) if r["run_id"] == res["run_id"]]
            assert sorted({r["round"] for r in rows}) == [1], (site, rows)
    _measured("b", f"killed in round 2's {drop['stage']} stage", stage, drop, res, t_kill,
              "kill -9 a node in SecAgg+ setup / share-keys (round 2 of 3)",
              "run stopped cleanly before anyone trained round 2 (no budget spent on it), node named; no KeyError",
              "0 (stopped after round 1)")
    assert res["_ended"] - t_kill <= stage["deadline"] + 60


def test_c_node_killed_after_sending_its_masked_vector_the_round_completes(city, hospitals):
    victim, vid, marks, seen, run_id = _start(city, hospitals, "kill-unmask", 2, line="Sending: train message")
    # its 7th train reply is round 2's masked vector: dead when the unmask stage asks for its shares
    t_kill = _kill_at(hospitals, VICTIM, "Sending: train message", seen + 7, city.state / "runs" / "kill-unmask",
                      then="Sent successfully")
    res = _check(city, hospitals, "kill-unmask", run_id, marks)
    assert res["status"] == "completed", res["status"]
    assert [r["round"] for r in res["rounds"]] == [1, 2] and _round_of_checkpoint(city.state / "runs" / "kill-unmask") == 2
    r2 = res["rounds"][1]["train"]
    assert r2["accepted"] == 3 and {int(n) for n in r2["nodes"]} == {int(i) for i in hospitals.ids.values()}
    [drop] = r2["secagg"]["dropped"]
    assert drop["node"] == vid and drop["stage"] == "unmask" and "SecAgg+ unmask" in drop["reason"], drop
    assert "aggregate" in r2 and res["refused"] == []
    stage = r2["stages"]["unmask"]
    assert stage["seconds"] <= stage["deadline"] + SLACK_S and stage["deadline"] < 600
    _measured("c", "killed before round 2's unmask stage", stage, drop, res, t_kill,
              "kill -9 a node after it sent its masked vector (SecAgg+ unmask stage)",
              "round completed with all 3 contributions (its mask rebuilt from the others' shares); run completed", 0)


def test_d_node_whose_clientapp_hangs_is_dropped_by_the_deadline(city, hospitals):
    """The node stays connected (its SuperNode heartbeats) but its ClientApp worker hangs while training.

    Only the stage's deadline can end the wait here: Flower's SuperLink sees a live node, and
    before issue 11 the stage waited ``round-timeout`` = 3600 s.
    """
    import signal

    victim, vid, marks, seen, run_id = _start(city, hospitals, "hang-collect", 3)
    _await_line(victim, "Receiving: train message", seen + 7, None, city.state / "runs" / "hang-collect")
    import threading

    def workers() -> list[int]:
        return [p for p in hospitals.node_processes(VICTIM) if b"clients.warm\x00worker" in _cmdline(p)]

    assert workers(), "no ClientApp worker found under the victim's fl-client"
    stop = threading.Event()

    def keep_stopped():  # a worker the SuperNode starts anew hangs too: the ClientApp cannot answer
        while not stop.is_set():
            _signal_tree(workers(), signal.SIGSTOP)
            stop.wait(0.1)

    hanger = threading.Thread(target=keep_stopped, daemon=True)
    hanger.start()
    t_stop = time.monotonic()
    try:
        res = _check(city, hospitals, "hang-collect", run_id, marks)
        assert victim.alive()  # the node itself never went away
    finally:
        stop.set()
        hanger.join(timeout=5)
        _signal_tree(workers(), signal.SIGKILL)  # the node itself is ended (and waited for) by the next up()
        victim.kill()
        victim.p.wait(timeout=30)  # dead before the next up() looks (SIGKILL is delivered asynchronously)
    assert res["status"].startswith("stopped: round 2: SecAgg+:") and f"node {vid} (" in res["status"], res["status"]
    r2 = res["rounds"][1]["train"]
    [drop] = r2["secagg"]["dropped"]
    stage = r2["stages"]["collect_masked_vectors"]
    assert drop["node"] == vid and drop["stage"] == "collect_masked_vectors", drop
    assert drop["reason"].startswith("no reply to SecAgg+ collect-masked-vectors (training) within "), drop
    assert "deadline = " in drop["reason"] and stage["deadline"] < 600
    assert stage["deadline"] - 1 <= stage["seconds"] <= stage["deadline"] + SLACK_S, stage
    _measured("d", "ClientApp hung in round 2's collect stage (node connected)", stage, drop, res, t_stop,
              "a node's ClientApp hangs while training, the node stays connected (SecAgg+ collect)",
              "the stage's deadline dropped it, run stopped cleanly naming it (was: waited round-timeout = 3600 s)",
              "0 (stopped after round 1: 2 contributors < min 3)")


def test_e_node_frozen_while_training_is_dropped_by_the_deadline(city, hospitals):
    import signal

    victim, vid, marks, seen, run_id = _start(city, hospitals, "freeze-collect", 3)
    _await_line(victim, "Receiving: train message", seen + 7, None, city.state / "runs" / "freeze-collect")
    hospitals.snapshot(VICTIM)
    frozen = hospitals.trees[VICTIM]  # fl-client, its SuperNode (own session) and the ClientApp worker
    _signal_tree(frozen, signal.SIGSTOP)  # the whole node hangs: no reply, no heartbeat, no sign-off
    t_stop = time.monotonic()
    try:
        res = _check(city, hospitals, "freeze-collect", run_id, marks)
    finally:
        _signal_tree(frozen, signal.SIGCONT)  # the next up() ends it (a SuperNode signs off) and restarts it
        victim.kill()
        victim.p.wait(timeout=30)
    assert res["status"].startswith("stopped: round 2: SecAgg+:") and f"node {vid} (" in res["status"], res["status"]
    r2 = res["rounds"][1]["train"]
    [drop] = r2["secagg"]["dropped"]
    assert drop["node"] == vid and drop["stage"] == "collect_masked_vectors", drop
    stage = r2["stages"]["collect_masked_vectors"]
    # found out by its deadline (5 x round 1's collect time, >= 30 s), or by the SuperLink after <= 60 s without heartbeat
    by = "deadline" if "no reply" in drop["reason"] else "heartbeat"
    assert by == "heartbeat" or "within" in drop["reason"] and "deadline = " in drop["reason"], drop
    assert stage["seconds"] <= min(stage["deadline"], 60 + 30) + SLACK_S, stage
    _measured("e", "frozen in round 2's collect stage", stage, drop, res, t_stop,
              "a node frozen (SIGSTOP: no reply, no heartbeat) while it trains (SecAgg+ collect)",
              f"dropped by the {by}, run stopped cleanly naming it", "0 (stopped after round 1: 2 contributors < min 3)",
              found_by=by)
