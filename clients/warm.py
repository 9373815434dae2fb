"""How a department node runs ClientApp tasks: every task goes through :func:`run_task`.

:func:`run_task` is the one place where a node loads a run's app bundle (FAB): it pulls the
task's message, context, run and FAB from the node-local Runtime API, asks
:func:`clients.pinning.admit_fab` whether this department runs that FAB (**before** the FAB
is extracted, installed or any of its modules imported; a refused FAB gets an error reply
naming its sha256 and the differing files), then installs it, loads its ClientApp, calls
it and pushes the reply and the task status, with the same steps as ``flwr-clientapp``.
``fl-client`` runs the SuperNode through this module in one of two modes, and neither
starts Flower's ``flwr-clientapp``:

**warm** (default)::

    python -m clients.warm supernode <flower-supernode arguments>

Flower 1.42's SuperNode (``--isolation subprocess``) starts ``flower-superexec``, and that
starts a **fresh** ``flwr-clientapp`` process for every message. On a 2-core node that costs
7-14 s per message (Python, torch, opacus, pandas and the app imported again), against 1-2 s
of DP-SGD compute for the health model. The SuperNode also sleeps a hard-coded 3 s whenever
no message is waiting, and waits for a reply in 0.5 s steps. Warm mode changes three things:

1. the SuperNode's sleeps (idle poll 3 s, reply wait 0.5 s) are capped at
   ``CITYFED_NODE_POLL_S`` seconds (default 0.1); once no message came for 30 s the idle poll
   waits ``CITYFED_NODE_IDLE_POLL_S`` (default 1 s) instead, until the next message; its retries of not-yet-available
   message objects start at 20 ms instead of 1 s (:func:`flower_compat.warm.fast_pulls`; same in the worker);
2. the SuperExec it starts is ``python -m clients.warm superexec`` (Flower's own SuperExec
   main loop) with a :class:`WarmClientAppExecutor`: ClientApp tasks go to one long-lived
   worker process; every other task type is started as Flower does (a subprocess);
3. the worker (``python -m clients.warm worker``, started with the SuperExec, so its imports
   are done before the first message arrives) runs each task with :func:`run_task` and does
   not exit afterwards, so heavy third-party libraries stay imported and the ClientApp's
   caches (the node's data) stay warm.

**cold** (``fl-client --cold``)::

    python -m clients.warm cold-supernode <flower-supernode arguments>

Flower's SuperNode with its own polling (no caps, Flower's object-pull backoff); its SuperExec
(``python -m clients.warm cold-superexec``) starts a **fresh** ``python -m clients.warm task``
process for every ClientApp task, which runs :func:`run_task` once and exits: Flower's
process-per-message behaviour, with the same app check.

In warm mode the app's own modules are always the FAB's: before a FAB is loaded, every module
of the FAB's top-level packages that was not loaded from that FAB's folder is dropped from
``sys.modules`` (a new FAB, or a copy of the package installed on the node, is never reused
by accident). Tasks run one after another (a SuperNode hands out one message at a time). If
the worker dies (OOM, crash), the next task starts a new one; the lost task expires as a
crashed ``flwr-clientapp`` would.

In both modes, a message whose run ends while the SuperNode is still receiving it leaves no
task behind (:func:`flower_compat.warm.drop_stale_pulls`; flwr 1.42 left one, and the node then answered every later
message one reply late).

Every Flower internal this relies on (``start_client_internal``'s module-level ``time`` and
``subprocess`` and its ``_pull_and_store_message``, ``run_superexec.get_executor``,
``run_clientapp``'s helpers) is wired in :mod:`flower_compat.warm` (why Flower's own
``--isolation process`` cannot replace it is said there); :func:`check_flwr` is the compat
layer's one version gate and refuses other versions with a clear message, in both modes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

# bound now, from the node's installed release: a warm worker later drops the FAB packages'
# modules (``clients`` included) from sys.modules, so a late import could find a FAB's copy
from clients import pinning
from flower_compat import CompatError, check_version
from flower_compat import warm as flower_warm
from flower_compat.logging import timestamped_logs
#: Environment: cap (seconds) on the SuperNode's polling sleeps.
POLL_ENV = "CITYFED_NODE_POLL_S"
DEFAULT_POLL_S = 0.1
#: Environment: cap (seconds) on the SuperNode's idle poll once no message came for
#: :data:`flower_compat.warm.HOT_S` seconds (never below ``CITYFED_NODE_POLL_S``).
IDLE_POLL_ENV = "CITYFED_NODE_IDLE_POLL_S"
DEFAULT_IDLE_POLL_S = 1.0
#: Environment: third-party modules the worker imports at start (comma-separated).
PRELOAD_ENV = "CITYFED_WARM_PRELOAD"
DEFAULT_PRELOAD = ("numpy", "pandas", "torch", "opacus", "flwr.clientapp", "flwr.app")


class WarmSetupError(RuntimeError):
    """The installed Flower is not the version whose internals this module adapts."""


def check_flwr() -> None:
    """Raise :class:`WarmSetupError` unless flwr is the version :mod:`flower_compat` adapts (its one gate)."""
    try:
        check_version()
    except CompatError as exc:
        raise WarmSetupError(str(exc)) from None


def poll_cap() -> float:
    """The SuperNode polling cap from ``CITYFED_NODE_POLL_S`` (seconds, 0.01-3)."""
    raw = os.environ.get(POLL_ENV, str(DEFAULT_POLL_S))
    try:
        value = float(raw)
    except ValueError:
        raise WarmSetupError(f"{POLL_ENV}={raw!r}: not a number. Fix: seconds between 0.01 and 3, e.g. 0.1.") from None
    if not 0.01 <= value <= 3.0:
        raise WarmSetupError(f"{POLL_ENV}={raw!r}: out of range. Fix: seconds between 0.01 and 3, e.g. 0.1.")
    return value


# --------------------------------------------------------------------------- SuperNode


#: ``time`` stand-in with capped sleeps; ``subprocess`` stand-in that starts this module's SuperExec.
_CappedTime = flower_warm.CappedTime


def _SuperExecLauncher(command: str = "superexec") -> flower_warm.SuperExecLauncher:  # noqa: N802 (was a class)
    """The SuperNode's SuperExec is ``python -m clients.warm COMMAND`` (``superexec`` or ``cold-superexec``)."""
    return flower_warm.SuperExecLauncher(command, module="clients.warm")


def idle_poll(cap: float) -> float:
    """The SuperNode's idle-poll cap from ``CITYFED_NODE_IDLE_POLL_S`` (seconds, 0.01-3; at least ``cap``).

    An idle node (no message for :data:`flower_compat.warm.HOT_S` s) asks the coordinator for
    work once per this many seconds instead of once per ``cap``: each poll is a TLS request the
    coordinator authenticates, so at 0.1 s every idle node costs it a few percent of a core.
    The first message of a new run then waits at most this long; later rounds wait ``cap``.
    """
    raw = os.environ.get(IDLE_POLL_ENV, str(DEFAULT_IDLE_POLL_S))
    fix = f"Fix: seconds between 0.01 and 3, e.g. {DEFAULT_IDLE_POLL_S}, or unset it."
    try:
        value = float(raw)
    except ValueError:
        raise WarmSetupError(f"{IDLE_POLL_ENV}={raw!r}: not a number. {fix}") from None
    if not 0.01 <= value <= 3.0:  # NaN fails too
        raise WarmSetupError(f"{IDLE_POLL_ENV}={raw!r}: out of range. {fix}")
    return max(value, cap)


def run_supernode(argv: list[str], warm: bool = True) -> None:
    """Run Flower's SuperNode whose SuperExec runs ClientApp tasks through :func:`run_task`.

    ``warm``: capped polling, fast object pulls and the warm worker (see module docstring);
    otherwise Flower's polling and a fresh ``python -m clients.warm task`` process per task.
    """
    check_flwr()
    cap = poll_cap() if warm else None
    idle_cap = idle_poll(cap) if warm else None
    timestamped_logs()
    flower_warm.run_supernode(argv, cap=cap, idle_cap=idle_cap,
                              launcher=_SuperExecLauncher("superexec" if warm else "cold-superexec"))


# --------------------------------------------------------------------------- SuperExec


def _task_line(spec) -> str:
    """One ClientApp task as the JSON line :func:`run_task` reads (what Flower passes to ``flwr-clientapp``)."""
    return json.dumps(flower_warm.task_of(spec)) + "\n"


def _cold_executor_class():
    class ColdClientAppExecutor(flower_warm.client_app_executor_base()):
        """SuperExec executor: a fresh ``python -m clients.warm task`` process per ClientApp task."""

        def __init__(self, task_cmd: list[str] | None = None):
            self.task_cmd = task_cmd or [sys.executable, "-m", "clients.warm", "task"]

        def launch_client_app(self, spec) -> str | None:
            cmd = [*self.task_cmd, "--parent-pid", str(spec.parent_pid if spec.parent_pid is not None else os.getpid())]
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if spec.suppress_output else {}
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, text=True, **quiet)
                assert proc.stdin is not None
                proc.stdin.write(_task_line(spec))  # the token travels on a pipe, not on the command line
                proc.stdin.close()
            except OSError as exc:
                return f"ClientApp task process could not start: {exc}"
            threading.Thread(target=proc.wait, daemon=True).start()  # reap it (no zombies)
            return None

    return ColdClientAppExecutor


def _executor_class():
    class WarmClientAppExecutor(flower_warm.client_app_executor_base()):
        """SuperExec executor: ClientApp tasks go to one warm worker, the rest start as in Flower."""

        def __init__(self, worker_cmd: list[str] | None = None):
            self.worker_cmd = worker_cmd or [sys.executable, "-m", "clients.warm", "worker",
                                             "--parent-pid", str(os.getpid())]
            self.worker: subprocess.Popen | None = None
            self.lock = threading.Lock()
            self.idle = threading.Condition()
            self.in_flight = 0  # tasks handed to the current worker and not reported done

        def _watch(self, worker: subprocess.Popen, done_r: int) -> None:
            """Count the worker's "task done" lines (its ``--done-fd``) until it exits."""
            with os.fdopen(done_r, "r") as done:
                for _ in done:
                    with self.idle:
                        if self.worker is worker:
                            self.in_flight = max(0, self.in_flight - 1)
                            self.idle.notify_all()

        def _live_worker(self) -> subprocess.Popen:
            if self.worker is None or self.worker.poll() is not None:
                done_r, done_w = os.pipe()
                try:
                    self.worker = subprocess.Popen([*self.worker_cmd, "--done-fd", str(done_w)], stdin=subprocess.PIPE,
                                                   text=True, pass_fds=(done_w,))
                except OSError:
                    os.close(done_r)
                    raise
                finally:
                    os.close(done_w)
                self.in_flight = 0
                threading.Thread(target=self._watch, args=(self.worker, done_r), daemon=True).start()
            return self.worker

        def _replace_stuck_worker(self) -> None:
            """Kill the worker if it still holds an earlier task (see :data:`STUCK_GRACE_S`)."""
            with self.idle:
                if self.worker is None or self.worker.poll() is not None:
                    self.in_flight = 0  # a dead worker is replaced by _live_worker
                    return
                if self.in_flight and not self.idle.wait_for(lambda: self.in_flight == 0, timeout=STUCK_GRACE_S):
                    worker = self.worker
                    if worker is not None and worker.poll() is None:
                        print(f"warm ClientApp worker: a new task arrived while task(s) handed out earlier were still "
                              f"running after {STUCK_GRACE_S:.0f} s (the SuperNode abandoned them); restarting the "
                              f"worker (pid {worker.pid})", file=sys.stderr, flush=True)
                        worker.kill()
                        worker.wait()
                    self.worker, self.in_flight = None, 0

        def prestart(self) -> None:
            """Start the worker now, so its imports happen while the node waits for its first message.

            A worker that cannot start is not an error here: the first task tries again (and
            reports a failure then).
            """
            with self.lock:
                try:
                    self._live_worker()
                except OSError:
                    self.worker = None

        def launch_client_app(self, spec) -> str | None:
            line = _task_line(spec)
            with self.lock:
                self._replace_stuck_worker()
                for attempt in (1, 2):  # a worker that died since the last task is replaced once
                    try:
                        worker = self._live_worker()
                        assert worker.stdin is not None
                        with self.idle:
                            self.in_flight += 1
                        worker.stdin.write(line)
                        worker.stdin.flush()
                        return None
                    except (OSError, ValueError) as exc:
                        self.worker = None
                        if attempt == 2:
                            return f"warm ClientApp worker could not take the task: {exc}"
            return "unreachable"

        def close(self) -> None:
            with self.lock:
                worker, self.worker = self.worker, None
            if worker is not None and worker.poll() is None:
                try:
                    assert worker.stdin is not None
                    worker.stdin.close()  # EOF: the worker finishes its task and exits
                    worker.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    worker.kill()

    return WarmClientAppExecutor


def run_superexec(argv: list[str], warm: bool = True) -> None:
    """Run Flower's SuperExec whose subprocess executor is the warm (or, ``warm=False``, the cold) ClientApp executor."""
    check_flwr()
    cls = _executor_class() if warm else _cold_executor_class()

    def make_executor():
        executor = cls()
        if warm:
            executor.prestart()  # imports off the first round's critical path
        return executor

    flower_warm.run_superexec(argv, make_executor)


# --------------------------------------------------------------------------- worker


def _fab_packages(app_dir: Path) -> set[str]:
    """Top-level module and package names an installed FAB folder provides."""
    names = set()
    for entry in app_dir.iterdir():
        if entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
        elif entry.suffix == ".py":
            names.add(entry.stem)
    return names


def use_fab_modules(app_dir: Path) -> list[str]:
    """Drop cached modules of the FAB's packages that were not loaded from ``app_dir``.

    Returns the dropped module names. Modules loaded from ``app_dir`` itself stay (warm reuse
    of the same FAB); a previous FAB's or a node-installed copy is dropped, so the next import
    resolves to ``app_dir`` (which ``load_app`` puts first on ``sys.path``).
    """
    app_dir = Path(app_dir).resolve()
    tops = _fab_packages(app_dir)
    dropped = []
    for name, module in list(sys.modules.items()):
        if name.split(".", 1)[0] not in tops:
            continue
        origin = getattr(module, "__file__", None)
        try:
            inside = origin is not None and Path(origin).resolve().is_relative_to(app_dir)
        except OSError:
            inside = False
        if not inside:
            del sys.modules[name]
            dropped.append(name)
    for entry in list(sys.path):  # other FAB folders (siblings under FLWR_HOME/apps) must not shadow this one
        if entry and Path(entry).resolve().parent == app_dir.parent and Path(entry).resolve() != app_dir:
            sys.path.remove(entry)
    return dropped


#: Names this process in the task log lines ("warm ClientApp worker", or the cold mode's task process).
_LABEL = "warm ClientApp worker"


def run_task(task: dict) -> int:
    """Run one ClientApp task as ``flwr-clientapp --token`` does, with the app check; returns its exit code.

    The one place where a node loads a FAB (warm worker and cold task process alike): the
    FAB is checked by :func:`clients.pinning.admit_fab` right after it is pulled, before it is
    installed or anything of it imported. A refused FAB gets an error reply (code
    :data:`clients.pinning.APP_REFUSED`) whose reason names its sha256 and the differing files.
    Flower's side of the task (Runtime API, install, load, push) is
    :func:`flower_compat.warm.run_clientapp_task`.

    Parameters
    ----------
    task : dict
        ``runtime_api_address``, ``token``, ``insecure``, ``root_certificates_path``,
        ``runtime_dependency_install`` (what Flower's SuperExec passes to ``flwr-clientapp``).
    """
    return flower_warm.run_clientapp_task(
        task,
        admit=lambda content, announced, run_id: pinning.admit_fab(content, announced=announced, run_id=run_id),
        refused_code=pinning.APP_REFUSED,
        installed_mismatch=pinning.installed_mismatch,
        prepare_app=lambda app_dir: use_fab_modules(app_dir),  # looked up per task (tests replace it)
        failure_reason=lambda ex: failure_reason(ex),
        label=_LABEL,
    )


#: Seconds a new ClientApp task waits for the worker to finish an earlier one before the worker
#: is restarted. A SuperNode hands out its next message only after the previous reply is pushed,
#: so a busy worker at that point normally finishes within milliseconds; one still busy holds a
#: task the SuperNode abandoned (e.g. its run stopped while the message's objects were being
#: pulled: the worker would wait for them for Flower's PULL_MAX_TIME, 2 h, blocking every later
#: task). Flower's process-per-task executor never queues tasks, so it does not need this.
STUCK_GRACE_S = 5.0

def failure_reason(ex: BaseException) -> str:
    """What a failed task tells the coordinator and the node's log about ``ex``.

    cityfed's own errors carry messages written for operators; any other exception is reported
    by type and place only (its message could quote a value from the node's records; see
    :func:`privacy.safe_cli.describe`). ``CITYFED_DEBUG=1`` adds the traceback to the node's own log.
    """
    from privacy.safe_cli import describe

    return describe(ex)


#: Seconds a ClientApp process may outlive its SuperExec before it exits without waiting for its task.
ORPHAN_GRACE_S = 5.0


def exit_when_orphaned(parent_pid: int, grace: float = ORPHAN_GRACE_S) -> threading.Thread:
    """End this process ``grace`` s after its parent ``parent_pid`` is gone, whatever it is doing.

    Flower's parent monitor raises SIGINT in the main thread; a task blocked in a call that
    never returns (pulling from or pushing to a SuperNode that was killed) or one that catches
    the interrupt outlives it, and the worker stayed behind holding the node's data in memory
    (seen after ``kill -9`` of a node while it evaluated). This backstop checks every 0.5 s
    whether the process was re-parented (its parent died) and then calls ``os._exit(1)`` after
    the grace period, also when its farewell message cannot be written (stderr a broken pipe:
    that error once ended the watcher instead of the process). Returns the (daemon) watcher thread.
    """
    def watch() -> None:
        gone_at = None
        while True:
            time.sleep(0.5)
            if os.getppid() == parent_pid:
                continue
            gone_at = gone_at or time.monotonic()
            if time.monotonic() - gone_at >= grace:
                try:  # stderr may be a pipe nobody reads any more (the node that read it was killed)
                    print(f"ClientApp process {os.getpid()}: its SuperExec (pid {parent_pid}) is gone; exiting",
                          file=sys.stderr, flush=True)
                finally:
                    os._exit(1)

    t = threading.Thread(target=watch, name="cityfed-orphan-watch", daemon=True)
    t.start()
    return t


def run_worker(argv: list[str]) -> None:
    """Worker main loop: one JSON task per stdin line, run in order, until EOF."""
    import argparse
    import importlib

    ap = argparse.ArgumentParser(prog="python -m clients.warm worker")
    ap.add_argument("--parent-pid", type=int)
    ap.add_argument("--done-fd", type=int, help="file descriptor to write one line to after each task")
    args = ap.parse_args(argv)
    done = os.fdopen(args.done_fd, "w", buffering=1) if args.done_fd is not None else None
    check_flwr()
    timestamped_logs()
    if args.parent_pid is not None:
        flower_warm.start_parent_monitor(args.parent_pid)
        exit_when_orphaned(args.parent_pid)
    pinning.prepare()  # the installed release's manifest and the audit log, before any FAB is loaded
    flower_warm.fast_object_pulls()
    preload = [m.strip() for m in os.environ.get(PRELOAD_ENV, ",".join(DEFAULT_PRELOAD)).split(",") if m.strip()]
    for name in preload:  # third-party only; the app's own modules always come from the FAB
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"warm ClientApp worker: preload {name!r} failed: {exc}", file=sys.stderr, flush=True)
    code = 0
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                task = json.loads(line)
            except json.JSONDecodeError:
                print(f"warm ClientApp worker: ignored a malformed task line ({len(line)} bytes)", file=sys.stderr,
                      flush=True)
                continue
            try:
                run_task(task)
            finally:
                if done is not None:
                    done.write(f"{task.get('task_id')}\n")
    except BaseException as exc:  # noqa: BLE001 (a broken done-pipe, an interrupt: the worker ends either way)
        code = 1
        with contextlib.suppress(Exception):
            print(f"warm ClientApp worker: ending after {type(exc).__name__}", file=sys.stderr, flush=True)
    # End here rather than in interpreter teardown: a thread left by a task (a gRPC channel to a
    # SuperNode that was killed) kept the worker alive at exit, holding the node's data in memory.
    # Every task has finished (ledger rows are written and synced inside the task).
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(code)


def run_cold_task(argv: list[str]) -> None:
    """``python -m clients.warm task``: run the one ClientApp task read from stdin, then exit with its code."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m clients.warm task")
    ap.add_argument("--parent-pid", type=int)
    args = ap.parse_args(argv)
    global _LABEL
    _LABEL = "ClientApp task process"
    check_flwr()
    timestamped_logs()
    if args.parent_pid is not None:
        flower_warm.start_parent_monitor(args.parent_pid)
    line = sys.stdin.readline()
    try:
        task = json.loads(line)
    except json.JSONDecodeError:
        raise WarmSetupError(f"task: expected one JSON task line on stdin, got {len(line)} bytes") from None
    pinning.prepare()
    raise SystemExit(run_task(task))


def main(argv: list[str] | None = None) -> None:
    """``python -m clients.warm {supernode|superexec|worker|cold-supernode|cold-superexec|task} [args...]``."""
    from functools import partial

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"supernode": run_supernode, "superexec": run_superexec, "worker": run_worker,
                "cold-supernode": partial(run_supernode, warm=False),
                "cold-superexec": partial(run_superexec, warm=False), "task": run_cold_task}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m clients.warm {{{'|'.join(commands)}}} [args...]\n\n" + (__doc__ or ""), file=sys.stderr)
        raise SystemExit(2)
    try:
        commands[argv[0]](argv[1:])
    except WarmSetupError as exc:
        print(f"clients.warm: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
