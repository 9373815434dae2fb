"""clients.warm: the node's warm ClientApp worker and capped polling (fast, no network).

The real thing (a deployment round trip through the warm worker under TLS, node auth and
SecAgg+) is exercised by tests/test_deploy_slow.py, whose nodes run fl-client's default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clients import warm  # noqa: E402
from flower_compat import self_test as flower_compat_self_test  # noqa: E402
from flower_compat import warm as flower_warm  # noqa: E402


def test_capped_time_caps_sleep_and_delegates(monkeypatch):
    slept = []
    monkeypatch.setattr(warm.time, "sleep", slept.append)
    shim = warm._CappedTime(0.1)
    shim.sleep(3)
    shim.sleep(0.5)
    shim.sleep(0.02)
    assert slept == [0.1, 0.1, 0.02]
    assert shim.monotonic is time.monotonic  # everything else is the real module


def test_supernode_starts_the_warm_superexec_instead_of_flowers(monkeypatch):
    seen = []
    monkeypatch.setattr(warm.subprocess, "Popen", lambda args, *a, **k: seen.append(list(args)))
    launcher = warm._SuperExecLauncher()
    launcher.Popen(["flower-superexec", "--insecure", "--runtime-api-address", "127.0.0.1:9094", "--parent-pid", "7"])
    launcher.Popen(["/venv/bin/flower-superexec", "--insecure"])
    launcher.Popen(["something-else", "-x"])
    warm._SuperExecLauncher("cold-superexec").Popen(["flower-superexec", "--insecure"])
    assert seen[0] == [sys.executable, "-m", "clients.warm", "superexec", "--insecure", "--runtime-api-address",
                       "127.0.0.1:9094", "--parent-pid", "7"]
    assert seen[1] == [sys.executable, "-m", "clients.warm", "superexec", "--insecure"]
    assert seen[2] == ["something-else", "-x"]
    assert seen[3] == [sys.executable, "-m", "clients.warm", "cold-superexec", "--insecure"]  # fl-client --cold
    assert launcher.DEVNULL is subprocess.DEVNULL


def test_flwr_internals_still_where_the_patches_expect():
    """The pinned flwr has the module attributes flower_compat.warm replaces (its self-test too)."""
    warm.check_flwr()
    assert flower_compat_self_test(["warm-worker"]) == {"warm-worker": "ok"}
    from flower_compat.testing import supercore_superexec_run_superexec as rs
    from flower_compat.testing import supernode_runtime_run_clientapp as rc
    from flower_compat.testing import supernode_start_client_internal as sci

    assert sci.time is time and sci.subprocess is subprocess
    assert callable(rs.get_executor)
    for name in ("pull_task_input", "push_message", "push_task_output"):
        assert callable(getattr(rc, name))


@pytest.mark.parametrize("raw", ["abc", "0", "0.001", "10", "nan"])
def test_bad_poll_cap_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(warm.POLL_ENV, raw)
    with pytest.raises(warm.WarmSetupError, match=warm.POLL_ENV):
        warm.poll_cap()


def test_poll_cap_default_and_value(monkeypatch):
    monkeypatch.delenv(warm.POLL_ENV, raising=False)
    assert warm.poll_cap() == warm.DEFAULT_POLL_S
    monkeypatch.setenv(warm.POLL_ENV, "0.25")
    assert warm.poll_cap() == 0.25


@pytest.mark.parametrize("raw", ["abc", "0", "0.001", "10", "nan", "inf"])
def test_bad_idle_poll_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(warm.IDLE_POLL_ENV, raw)
    with pytest.raises(warm.WarmSetupError, match=warm.IDLE_POLL_ENV) as err:
        warm.idle_poll(0.1)
    assert repr(raw) in str(err.value) and "Fix: seconds between 0.01 and 3" in str(err.value)


def test_idle_poll_default_value_and_never_below_the_cap(monkeypatch):
    monkeypatch.delenv(warm.IDLE_POLL_ENV, raising=False)
    assert warm.idle_poll(0.1) == warm.DEFAULT_IDLE_POLL_S == 1.0
    monkeypatch.setenv(warm.IDLE_POLL_ENV, "2.5")
    assert warm.idle_poll(0.1) == 2.5
    monkeypatch.setenv(warm.IDLE_POLL_ENV, "0.05")
    assert warm.idle_poll(0.2) == 0.2  # a node asked to poll every 0.2 s never polls faster when idle


def test_supernode_idle_polls_back_off_and_a_message_makes_them_fast_again(monkeypatch):
    """Flower's idle sleep (3 s after an empty poll) waits the cap while messages came in the last
    HOT_S seconds, then the idle cap; other sleeps (reply waits, 0.5 s) always wait the cap."""
    from flower_compat import warm as fw

    now = [1000.0]
    waits = []
    monkeypatch.setattr(fw.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(fw.time, "sleep", waits.append)
    clock = fw.CappedTime(0.1, idle_cap=1.0)
    clock.sleep(3)  # just started: hot (a node that has just joined is about to be asked)
    now[0] += fw.HOT_S + 1
    clock.sleep(3)  # idle
    clock.sleep(0.5)  # a reply wait: never backed off
    pulled = fw.marks_activity(lambda **kw: kw["run_id"], clock)
    assert pulled(run_id=None) is None
    clock.sleep(3)  # an empty poll is no activity
    assert pulled(run_id=7) == 7
    clock.sleep(3)  # a message came: fast again
    now[0] += fw.HOT_S - 1
    clock.sleep(3)  # still within the window
    now[0] += 2
    clock.sleep(3)  # the window passed with no message
    assert waits == [0.1, 1.0, 0.1, 1.0, 0.1, 0.1, 1.0]
    assert fw.CappedTime(0.1).sleep(3) is None and waits[-1] == 0.1  # no idle cap: always the cap
    assert fw.CappedTime(0.1, idle_cap=5.0)._idle_cap == 5.0
    now[0] += fw.HOT_S + 1
    fw.CappedTime(0.1, idle_cap=5.0)  # (started hot)
    slow = fw.CappedTime(0.1, idle_cap=5.0)
    now[0] += fw.HOT_S + 1
    slow.sleep(3)
    assert waits[-1] == 3  # never longer than Flower's own sleep


def _package(root: Path, name: str, marker: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(f"MARK = {marker!r}\n")
    (root / name / "mod.py").write_text(f"MARK = {marker!r}\n")
    return root


def test_fab_modules_replace_a_cached_copy_and_a_previous_fab(tmp_path, monkeypatch):
    import importlib

    installed = _package(tmp_path / "site", "cfpkg_demo", "installed")
    fab1 = _package(tmp_path / "apps" / "pub.proj.1.0.aaaa", "cfpkg_demo", "fab1")
    fab2 = _package(tmp_path / "apps" / "pub.proj.1.1.bbbb", "cfpkg_demo", "fab2")
    monkeypatch.syspath_prepend(str(installed))
    try:
        assert importlib.import_module("cfpkg_demo.mod").MARK == "installed"
        dropped = warm.use_fab_modules(fab1)
        assert set(dropped) == {"cfpkg_demo", "cfpkg_demo.mod"}
        sys.path.insert(0, str(fab1))  # what flwr's load_app does
        assert importlib.import_module("cfpkg_demo.mod").MARK == "fab1"
        assert warm.use_fab_modules(fab1) == []  # same FAB: stays warm
        dropped = warm.use_fab_modules(fab2)  # a new FAB: nothing of the old one survives
        assert "cfpkg_demo.mod" in dropped and str(fab1) not in sys.path
        sys.path.insert(0, str(fab2))
        assert importlib.import_module("cfpkg_demo.mod").MARK == "fab2"
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "cfpkg_demo"]:
            del sys.modules[name]
        for p in (str(fab1), str(fab2)):
            while p in sys.path:
                sys.path.remove(p)


#: Start of a stand-in for `python -m clients.warm worker`: it takes --done-fd and reports each task there.
FAKE_WORKER_HEAD = ("import os, sys\n"
                    "done = os.fdopen(int(sys.argv[sys.argv.index('--done-fd') + 1]), 'w', buffering=1)\n")


def _spec(task_type, token="tok-1", task_id=1):
    from flower_compat.testing import ExecutionSpec

    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:9094", token=token, insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
                         suppress_output=False, task_id=task_id)


def test_executor_sends_clientapp_tasks_to_one_worker_and_replaces_a_dead_one(tmp_path):
    from flower_compat.testing import LaunchResultStatus, TaskType

    sink = tmp_path / "tasks.jsonl"
    script = tmp_path / "fake_worker.py"  # stands in for `python -m clients.warm worker`: records each task line
    script.write_text(FAKE_WORKER_HEAD +
                      f"for line in sys.stdin:\n    open({str(sink)!r}, 'a').write(str(os.getpid()) + ' ' + line)\n"
                      "    done.write('x\\n')\n")
    executor = warm._executor_class()(worker_cmd=[sys.executable, str(script)])
    try:
        for i in (1, 2):
            assert executor.launch(_spec(TaskType.CLIENT_APP, f"tok-{i}", i)).status == LaunchResultStatus.ACCEPTED
        first = executor.worker
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not sink.exists() or len(sink.read_text().splitlines()) < 2):
            time.sleep(0.05)
        first.kill()
        first.wait(timeout=10)
        assert executor.launch(_spec(TaskType.CLIENT_APP, "tok-3", 3)).status == LaunchResultStatus.ACCEPTED
        assert executor.worker is not first
    finally:
        executor.close()
    lines = [ln.split(" ", 1) for ln in sink.read_text().splitlines()]
    tasks = [json.loads(body) for _, body in lines]
    assert [t["token"] for t in tasks] == ["tok-1", "tok-2", "tok-3"]
    assert tasks[0]["runtime_api_address"] == "127.0.0.1:9094" and tasks[0]["insecure"] is True
    pids = [pid for pid, _ in lines]
    assert pids[0] == pids[1] != pids[2]  # one warm process for tasks 1-2, a new one after it died


def test_worker_is_started_before_the_first_task_and_then_reused(tmp_path):
    """prestart(): the worker imports while the node is idle; the first task goes to that process."""
    from flower_compat.testing import TaskType

    sink = tmp_path / "tasks.jsonl"
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER_HEAD +
                      f"open({str(sink)!r} + '.started', 'w').write(str(os.getpid()))\n"
                      f"for line in sys.stdin:\n    open({str(sink)!r}, 'a').write(str(os.getpid()) + ' ' + line)\n"
                      "    done.write('x\\n')\n")
    executor = warm._executor_class()(worker_cmd=[sys.executable, str(script)])
    try:
        executor.prestart()
        started = executor.worker
        assert started is not None and started.poll() is None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not Path(str(sink) + ".started").exists():
            time.sleep(0.05)
        assert Path(str(sink) + ".started").read_text() == str(started.pid)  # running before any task
        executor.launch(_spec(TaskType.CLIENT_APP, "tok-1", 1))
        assert executor.worker is started
        while time.monotonic() < deadline and not sink.exists():
            time.sleep(0.05)
    finally:
        executor.close()
    assert sink.read_text().split(" ", 1)[0] == str(started.pid)


def test_prestart_failure_is_left_to_the_first_task():
    executor = warm._executor_class()(worker_cmd=["/nonexistent/python-for-cityfed-test"])
    executor.prestart()  # no exception: the first task reports it
    assert executor.worker is None


def test_executor_starts_other_task_types_as_flower_does(monkeypatch):
    from flower_compat.testing import LaunchResult, SubprocessExecutor, TaskType

    seen = []
    monkeypatch.setattr(SubprocessExecutor, "launch", lambda self, spec: seen.append(spec) or LaunchResult.accepted())
    executor = warm._executor_class()(worker_cmd=[sys.executable, "-c", "raise SystemExit(1)"])
    server_app = next(t for t in TaskType if t != TaskType.CLIENT_APP)
    executor.launch(_spec(server_app))
    assert [s.task_type for s in seen] == [server_app] and executor.worker is None


def test_node_logs_carry_millisecond_timestamps(capsys):
    """fl-client's SuperNode and worker print Flower's log with the time (Flower: only at DEBUG)."""
    import logging

    from flower_compat.testing import FLOWER_LOGGER, ConsoleHandler, supercore_logger

    handlers = [h for h in FLOWER_LOGGER.handlers if isinstance(h, ConsoleHandler)]
    assert handlers, "Flower's console handler moved; clients.warm.timestamped_logs needs a new hook"
    try:
        warm.timestamped_logs()
        record = logging.LogRecord("flwr", logging.INFO, __file__, 1, "Received successfully", None, None)
        line = handlers[0].format(record)
        assert __import__("re").search(r"INFO \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", line), line
    finally:
        supercore_logger.update_console_handler(timestamps=False)


def _deploy_latency():
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_latency", ROOT / "benchmarks" / "deploy_latency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_latency_breakdown_follows_the_slowest_node_and_adds_up():
    from datetime import datetime

    dl = _deploy_latency()

    def log(events):  # Flower's timestamped INFO format, colour codes included
        return "".join(f"\x1b[92mINFO {datetime.fromtimestamp(t).strftime('%Y-%m-%d %H:%M:%S,%f')[:-3]}\x1b[0m:      {w}\n"
                       for t, w in events)

    t0 = datetime(2026, 11, 23, 12, 0, 0).timestamp()
    fast = log([(t0 + 0.2, "Receiving: train message (ID: a)"), (t0 + 0.3, "Received successfully"),
                (t0 + 0.5, "Sending: train message (ID: b)"), (t0 + 0.6, "Sent successfully")])
    slow = log([(t0 + 0.1, "Receiving: train message (ID: c)"), (t0 + 0.4, "Received successfully"),
                (t0 + 0.5, "INFO: unrelated line"), (t0 + 1.4, "Sending: train message (ID: d)"),
                (t0 + 1.9, "Sent successfully")])
    ex = {"fast": dl.node_exchanges(fast), "slow": dl.node_exchanges(slow)}
    assert len(ex["fast"]) == len(ex["slow"]) == 1
    parts = dl.breakdown(t0, 2.5, ex, compute=0.7)
    expect = {"to_node": 0.1, "downlink": 0.3, "clientapp": 1.0 - 0.7, "compute": 0.7, "uplink": 0.5, "to_server": 0.6}
    assert parts == pytest.approx(expect, abs=2e-3)
    assert sum(parts.values()) == pytest.approx(2.5, abs=2e-3)
    # a message outside the phase window is not counted
    assert dl.breakdown(t0 + 5, 1.0, ex, compute=0.0)["to_server"] == pytest.approx(1.0)


def test_idle_cpu_counts_a_process_tree_and_only_what_it_used_in_the_window():
    """deploy_latency's idle figure: CPU of a process and its children, over the window only."""
    import subprocess
    import sys
    import time

    dl = _deploy_latency()
    busy = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\ntime.sleep(60)"
    # the parent burns 0.3 s of CPU, then starts a child that burns 1.0 s inside the window
    code = ("import subprocess, sys, time\n" + busy.format(s=0.3).replace("time.sleep(60)", "") +
            f"\nsubprocess.Popen([sys.executable, '-c', {busy.format(s=1.0)!r}])\ntime.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.2)
        before = dl.tree_cpu_seconds(p.pid)
        time.sleep(5.0)  # the child's second of CPU done, even on a loaded machine
        shares = dl.idle_cpu(p.pid, {}, 0.5)  # both asleep by now: nothing used in this window
        after = dl.tree_cpu_seconds(p.pid)
    finally:
        p.kill()
        p.wait()
    assert after - before >= 0.9, (before, after)  # the child's second counted with the parent's
    assert after <= 0.3 + 1.0 + 1.0  # interpreter start-ups, no more
    assert shares["coordinator"] == pytest.approx(0.0, abs=0.05)
    assert dl.tree_cpu_seconds(2 ** 22 + 12345) == 0.0  # no such process


def test_a_task_abandoned_by_the_supernode_does_not_block_the_next(tmp_path, monkeypatch):
    """A worker still busy with an earlier task when a new one arrives is restarted.

    Seen in the coordinator-crash test: the SuperNode created a task, then dropped its message
    (run no longer RUNNING) before pulling the objects; the worker waited for them (Flower: up to
    2 h) and the resumed run's tasks queued behind it, so the node never replied.
    """
    from flower_compat.testing import TaskType

    monkeypatch.setattr(warm, "STUCK_GRACE_S", 0.5)
    sink = tmp_path / "tasks.jsonl"
    script = tmp_path / "fake_worker.py"  # task "stuck" never finishes; others finish at once
    script.write_text(FAKE_WORKER_HEAD +
                      "import json, time\n"
                      f"for line in sys.stdin:\n    open({str(sink)!r}, 'a').write(str(os.getpid()) + ' ' + line)\n"
                      "    if json.loads(line)['token'] == 'stuck':\n        time.sleep(600)\n"
                      "    done.write('x\\n')\n")
    executor = warm._executor_class()(worker_cmd=[sys.executable, str(script)])
    try:
        executor.launch(_spec(TaskType.CLIENT_APP, "ok-1", 1))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and executor.in_flight:
            time.sleep(0.05)
        assert executor.in_flight == 0  # the worker reported task 1 done
        first = executor.worker
        executor.launch(_spec(TaskType.CLIENT_APP, "stuck", 2))
        executor.launch(_spec(TaskType.CLIENT_APP, "ok-3", 3))  # waits 0.5 s, then replaces the worker
        assert first.poll() is not None and executor.worker is not first
        while time.monotonic() < deadline and len(sink.read_text().splitlines()) < 3:
            time.sleep(0.05)
    finally:
        executor.close()
    lines = [ln.split(" ", 1) for ln in sink.read_text().splitlines()]
    assert [json.loads(body)["token"] for _, body in lines] == ["ok-1", "stuck", "ok-3"]
    assert lines[0][0] == lines[1][0] != lines[2][0]


# --------------------------------------------------------------------------- cold mode (fl-client --cold)


def test_cold_executor_starts_a_task_process_per_clientapp_task(tmp_path):
    """fl-client --cold: a fresh `python -m clients.warm task` per task, the task line on its stdin (not argv)."""
    from flower_compat.testing import LaunchResultStatus, TaskType

    sink = tmp_path / "tasks.jsonl"
    script = tmp_path / "fake_task.py"  # stands in for `python -m clients.warm task --parent-pid P`
    script.write_text("import os, sys\n"
                      f"open({str(sink)!r}, 'a').write(str(os.getpid()) + ' ' + ' '.join(sys.argv[1:]) + ' '"
                      " + sys.stdin.readline())\n")
    executor = warm._cold_executor_class()(task_cmd=[sys.executable, str(script)])
    for i in (1, 2):
        assert executor.launch(_spec(TaskType.CLIENT_APP, f"tok-{i}", i)).status == LaunchResultStatus.ACCEPTED
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not sink.exists() or len(sink.read_text().splitlines()) < 2):
        time.sleep(0.05)
    rows = [ln.split(" ", 3) for ln in sorted(sink.read_text().splitlines(), key=lambda ln: "tok-2" in ln)]
    assert [json.loads(r[3])["token"] for r in rows] == ["tok-1", "tok-2"]
    assert rows[0][0] != rows[1][0]  # one process per task
    assert rows[0][1] == "--parent-pid" and "tok-1" not in " ".join(rows[0][:3])  # the token is not on the command line


def test_cold_supernode_keeps_flowers_polling_and_routes_tasks_through_run_task(monkeypatch):
    from flower_compat.testing import supernode_cli as sn_cli
    from flower_compat.testing import supernode_start_client_internal as sci

    monkeypatch.setattr(sn_cli, "flower_supernode", lambda: None)
    monkeypatch.setattr(warm, "timestamped_logs", lambda: None)
    for attr in ("time", "subprocess", "pull_objects", "_pull_and_store_message", "_push_messages"):
        monkeypatch.setattr(sci, attr, getattr(sci, attr))  # restored after the test
    pulls = sci.pull_objects
    warm.run_supernode(["--insecure"], warm=False)
    assert sci.time is time and sci.pull_objects is pulls  # Flower's polling and object-pull backoff
    assert sci.subprocess.command == "cold-superexec"
    assert sci._pull_and_store_message._cityfed_drops_stale  # a stale pull leaves no task, cold mode too
    assert sci._push_messages._cityfed_skips_stale  # ... and no reply pushed in place of the next one
    warm.run_supernode(["--insecure"], warm=True)
    assert isinstance(sci.time, warm._CappedTime) and sci.subprocess.command == "superexec"


def test_task_entry_point_runs_run_task_once(monkeypatch):
    seen = []
    monkeypatch.setattr(warm, "run_task", lambda task: seen.append(task) or 0)
    monkeypatch.setattr(warm, "timestamped_logs", lambda: None)
    monkeypatch.setattr(warm.pinning, "prepare", lambda: seen.append("prepared"))
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO('{"token": "t", "task_id": 3}\n'))
    with pytest.raises(SystemExit) as done:
        warm.main(["task"])
    assert done.value.code == 0 and seen == ["prepared", {"token": "t", "task_id": 3}]
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("garbage\n"))
    with pytest.raises(SystemExit) as bad:
        warm.main(["task"])
    assert bad.value.code == 2


def _stale_pull_setup(monkeypatch):
    """A SuperNode state that knows run 7 and one train message of it, as Flower 1.41 pulls it."""
    from flower_compat.testing import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)  # a message is made in a ServerApp of run 7
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    from flwr.app import Message, RecordDict

    from flower_compat.testing import NodeStateFactory, ObjectStoreFactory, Run, get_object_tree

    state = NodeStateFactory(ObjectStoreFactory()).state()
    store = state.object_store
    state.set_node_id(5)
    run = Run.create_empty(7)
    run.fab_hash = "ab" * 32
    state.store_run(run)
    msg = Message(RecordDict(), dst_node_id=5, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return state, store, msg, get_object_tree(msg)


def test_a_run_that_ends_mid_pull_leaves_no_task_or_message_on_the_node(monkeypatch):
    """flwr 1.41 kept the task and the empty message when the run stopped while the node pulled it."""
    from flower_compat.superlink import Status, SubStatus
    from flower_compat.testing import supernode_start_client_internal as sci

    state, store, msg, tree = _stale_pull_setup(monkeypatch)

    def stopped(*_a, **_k):
        raise sci.RunNotRunningException("run 7 stopped")

    kwargs = dict(node_config={}, receive=lambda: (msg, tree), get_run=None, get_fab=None,
                  pull_object=stopped, confirm_message_received=stopped, trusted_entities=None)
    flowers = getattr(sci._pull_and_store_message, "__wrapped__", sci._pull_and_store_message)  # unpatched
    assert flowers(state=state, object_store=store, **kwargs) is None
    leftover = [t for t in state.get_tasks() if t.status.status != Status.FINISHED]
    assert leftover, "Flower's own function leaves a pending task (the defect): the test would not see a fix"

    state2, store2, msg2, tree2 = _stale_pull_setup(monkeypatch)
    kwargs.update(receive=lambda: (msg2, tree2))
    pull = flower_warm.drop_stale_pulls(flowers)
    assert flower_warm.drop_stale_pulls(pull) is pull
    assert pull(state=state2, object_store=store2, **kwargs) is None
    tasks = state2.get_tasks()
    assert tasks and all(t.status.status == Status.FINISHED and t.status.sub_status == SubStatus.STOPPED
                         for t in tasks)
    assert state2.get_messages_legacy() == []  # nothing left for a later task to pick up
    assert msg2.metadata.message_id not in getattr(store2, "store", {})


def test_a_normal_pull_is_left_as_flower_does_it(monkeypatch):
    from flower_compat.superlink import Status
    from flower_compat.testing import supernode_start_client_internal as sci

    state, store, msg, tree = _stale_pull_setup(monkeypatch)
    objects = {}
    from flower_compat.testing import get_all_nested_objects

    for oid, obj in get_all_nested_objects(msg).items():
        objects[oid] = obj.deflate()
    confirmed = []
    pull = flower_warm.drop_stale_pulls(getattr(sci._pull_and_store_message, "__wrapped__", sci._pull_and_store_message))
    run_id = pull(state=state, object_store=store, node_config={}, receive=lambda: (msg, tree), get_run=None,
                  get_fab=None, pull_object=lambda run, oid: objects[oid],
                  confirm_message_received=lambda run, mid: confirmed.append(mid), trusted_entities=None)
    assert run_id == 7 and confirmed == [msg.metadata.message_id]
    assert [t.status.status for t in state.get_tasks()] == [Status.PENDING]
    assert [m.metadata.message_id for m in state.get_messages_legacy()] == [msg.metadata.message_id]


def _reply(msg):
    from flwr.app import Message, RecordDict

    return Message(RecordDict(), reply_to=msg)


@pytest.mark.parametrize("stale_reply_at", ["during the pull", "before the next pull", "while waiting to push"])
def test_a_reply_to_a_dropped_message_is_never_pushed_in_place_of_the_next_reply(monkeypatch, stale_reply_at):
    """flwr 1.42: the task of a message whose run stopped mid-pull can already be running (the warm worker
    takes it at once); its reply then waited in the node's state and the push after the *next* message
    sent it instead of that message's reply, so every later reply went one message late (CI, 2026-12-04:
    the resumed run dropped the node at SecAgg+ setup)."""
    from flower_compat.testing import supernode_start_client_internal as sci

    flowers_pull = getattr(sci._pull_and_store_message, "__wrapped__", sci._pull_and_store_message)
    flowers_push = getattr(sci._push_messages, "__wrapped__", sci._push_messages)
    pull = flower_warm.drop_stale_pulls(flowers_pull)
    push = flower_warm.skip_stale_replies(flowers_push)
    assert flower_warm.skip_stale_replies(push) is push

    def node_after_a_stale_pull(pull):
        """The node state once run 7's first message was dropped mid-pull and a next message of it arrived."""
        state, store, stale, tree = _stale_pull_setup(monkeypatch)

        def stopped(*_a, **_k):
            if stale_reply_at == "during the pull":  # the worker answered before the pull gave up
                sci._insert_message(_reply(stale), state, store)
            raise sci.RunNotRunningException("run 7 stopped")

        assert pull(state=state, object_store=store, node_config={}, receive=lambda: (stale, tree), get_run=None,
                    get_fab=None, pull_object=stopped, confirm_message_received=stopped, trusted_entities=None) is None
        if stale_reply_at == "before the next pull":
            sci._insert_message(_reply(stale), state, store)
        from flwr.app import ConfigRecord, Message, RecordDict

        nxt = Message(RecordDict({"c": ConfigRecord({"round": 2})}), dst_node_id=5, message_type="train")
        nxt.metadata.__dict__["_message_id"] = nxt.object_id
        from flower_compat.testing import get_all_nested_objects, get_object_tree

        objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(nxt).items()}
        assert pull(state=state, object_store=store, node_config={}, receive=lambda: (nxt, get_object_tree(nxt)),
                    get_run=None, get_fab=None, pull_object=lambda run, oid: objects[oid],
                    confirm_message_received=lambda run, mid: None, trusted_entities=None) == 7
        return state, store, stale, nxt

    def pushed_replies(pull_fn, push_fn):
        state, store, stale, nxt = node_after_a_stale_pull(pull_fn)
        late = [_reply(stale)] if stale_reply_at == "while waiting to push" else []

        class Clock:  # the push stage's waits: the stale reply lands first, the next message's reply after it
            def __getattr__(self, name):
                return getattr(time, name)

            def sleep(self, _s):
                sci._insert_message(late.pop() if late else _reply(nxt), state, store)

        monkeypatch.setattr(sci, "time", Clock())
        if late:
            sci._insert_message(late.pop(), state, store)
        elif stale_reply_at != "while waiting to push":
            sci._insert_message(_reply(nxt), state, store)
        sent = []
        push_fn(state=state, object_store=store, send=lambda m, t, rt: (sent.append(m.metadata.reply_to_message_id),
                                                                        (set(), "session"))[1],
                push_object=lambda *a: None)
        return sent, stale.metadata.message_id, nxt.metadata.message_id, state

    sent, stale_id, _, _ = pushed_replies(flowers_pull, flowers_push)
    assert sent[0] == stale_id, "Flower's own push sends the stale reply first (the defect): the test would not see a fix"
    sent, stale_id, next_id, state = pushed_replies(pull, push)
    assert sent == [next_id]  # the next message is answered by its own reply, in time
    assert all(m.metadata.reply_to_message_id != stale_id for m in state.get_messages_legacy())  # the stale one is gone


def _running(pid: int) -> bool:
    """``pid`` exists and has not exited (a zombie nobody reaped yet counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("stderr_reader_gone", [False, True], ids=["stderr-open", "stderr-broken-pipe"])
def test_a_clientapp_process_whose_superexec_dies_exits_even_when_its_task_is_stuck(tmp_path, stderr_reader_gone):
    """The warm worker outlived a killed node when its task ignored Flower's SIGINT: the backstop ends it.

    With ``stderr-broken-pipe`` the process's stderr is a pipe whose reader is gone, as when the
    ``fl-client`` that read the node's output was killed: the backstop's own message then fails
    (EPIPE), and it must exit all the same (it did not: the watcher thread died on the error).
    """
    import signal as _signal

    pidfile = tmp_path / "child.pid"
    broken = "r, w = os.pipe(); os.dup2(w, 2); os.close(r); os.close(w)\n" if stderr_reader_gone else ""
    child = (
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {str(Path(warm.__file__).resolve().parents[1])!r})\n"
        "from clients import warm\n"
        + broken +
        "signal.signal(signal.SIGINT, signal.SIG_IGN)  # a task that does not end on Flower's interrupt\n"
        "warm.exit_when_orphaned(os.getppid(), grace=0.5)\n"
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {child!r}])\n"
                               "time.sleep(120)\n"])
    try:
        end = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < end:
            time.sleep(0.1)
        pid = int(pidfile.read_text())
        time.sleep(1.5)
        assert _running(pid)  # alive while its parent is
        parent.kill()
        parent.wait(timeout=10)
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if not _running(pid):
                break
            time.sleep(0.2)
        else:
            os.kill(pid, _signal.SIGKILL)
            raise AssertionError("the orphaned ClientApp process did not exit")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_timestamped_logs_and_routing_survive_a_closed_console_stream(monkeypatch):
    """Flower's console handler keeps the stderr of the moment ``flwr`` was first imported: in one
    process that had run a CLI under a captured stderr (click's CliRunner, a closed pipe), asking
    it ``isatty()`` raised ValueError and ``fl-server start`` exited 1 (found as an order-dependent
    failure of tests/test_audit.py after tests/test_sim_bad_input.py). A closed stream is no terminal."""
    import io
    import logging

    from flower_compat import logging as compat_logging
    from flower_compat.testing import supercore_logger

    handler = compat_logging.console_handler()
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(handler, "stream", closed)
    try:
        compat_logging.timestamped_logs()
        compat_logging.route_logs_through_flower()
        record = logging.LogRecord("flwr", logging.INFO, __file__, 1, "Received successfully", None, None)
        assert "\x1b[" not in handler.format(record)  # not coloured: not a terminal
    finally:
        supercore_logger.update_console_handler(timestamps=False)
