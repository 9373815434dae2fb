"""Seam ``warm-worker``: the SuperNode, SuperExec and ``flwr-clientapp`` internals a cityfed node adapts.

:mod:`clients.warm` decides *what* a node does (capped polling, one long-lived ClientApp worker
or a process per task, the app check of :mod:`clients.pinning` before a FAB is installed);
this module holds *how* that is wired into Flower's private machinery:

* :func:`run_supernode`: Flower's ``flower-supernode`` main with its module-level ``time``
  replaced by :class:`CappedTime` (idle poll 3 s and reply wait 0.5 s capped; the idle poll
  backs off when no message came for a while, :func:`marks_activity`), its
  ``pull_objects`` by :func:`fast_pulls`, its ``_pull_and_store_message`` by
  :func:`drop_stale_pulls`, its ``_push_messages`` by :func:`skip_stale_replies`, and its ``subprocess`` by :class:`SuperExecLauncher` (the SuperExec
  it starts is cityfed's, ``python -m clients.warm superexec``);
* :func:`run_superexec`: Flower's ``flower-superexec`` main whose subprocess executor is a
  subclass of :func:`client_app_executor_base` (ClientApp tasks go to cityfed's
  ``launch_client_app``; every other task type starts as Flower does);
* :func:`run_clientapp_task`: the steps of ``flwr-clientapp --token`` (Runtime API client,
  heartbeat, pull of message/context/run/FAB, FAB install, ClientApp load and call, reply and
  task status push), with cityfed's admission hook between the pull and the install.

Why not Flower's own isolation modes (flwr 1.42.0, read from the installed source)
------------------------------------------------------------------------------------
``flower-supernode --isolation process`` (``flwr/supernode/cli/flower_supernode.py:264-276``)
only stops the SuperNode from starting the SuperExec itself
(``flwr/supernode/start_client_internal.py:206-222``); the independent SuperExec it then
expects is still ``flower-superexec``, whose executors are ``subprocess`` and ``kubernetes``
only (``flwr/supercore/constant.py:243-247``). The subprocess executor starts a fresh
``flwr-clientapp`` process for every task (``flwr/supercore/superexec/executor/subprocess_executor.py:54-83``),
which is the 7-14 s per message the warm worker removes. 1.42's new "warm executors"
are pre-started Kubernetes pods that each run one task (``warm_executor_dispatch.py:15``)
and exclude ClientApp tasks (``WARM_EXECUTOR_TASK_TYPES = {AGENT_APP, MODEL, CONNECTOR}``,
``warm_executor_pool.py:33``). So no public mode keeps a ClientApp process alive across
messages, and none lets the node compare a FAB's files with its installed release before the
FAB is installed (``--trusted-entities`` checks signatures, which the open-source SuperLink
does not provide; docs/DEPLOYMENT.md); the SuperNode's polling sleeps
(``start_client_internal.py:263``, ``:470``) have no setting. The
executor swap (``run_superexec.get_executor``) and the polling caps stay private seams here.
``--isolation process`` would replace only :class:`SuperExecLauncher` (cityfed would start
its SuperExec next to the SuperNode), at the cost of re-implementing the SuperNode's launch
arguments and parent monitoring; that trade is not taken.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

from flower_compat import register

#: Object-pull backoff (Flower: 1 s doubling to 10 s). The SuperNode makes a task available a
#: moment before the message's objects are in its store; with a warm worker that moment is hit
#: every time, and Flower's first retry alone costs 1 s, the second 2 s more.
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.02, 0.5


# --------------------------------------------------------------------------- SuperNode


#: Flower's SuperNode sleeps this long after a poll that found no message (``start_client_internal.py:263``);
#: its other sleeps (reply waits) are 0.5 s.
IDLE_SLEEP_S = 3.0
#: Seconds after the last message during which the SuperNode's idle poll stays at the cap.
HOT_S = 30.0


class CappedTime:
    """``time`` module stand-in whose ``sleep`` never waits longer than ``cap`` seconds; idle polls back off.

    With ``idle_cap``, Flower's idle sleep (:data:`IDLE_SLEEP_S` after a poll that found no
    message) waits ``cap`` while a message came in the last :data:`HOT_S` seconds (a run's
    rounds follow one another), and ``idle_cap`` after that: an idle node asks the coordinator
    ``1 / idle_cap`` times a second instead of ``1 / cap``. :func:`marks_activity` tells it when a
    message came; it starts as if one just had (a node that has just joined is about to be asked).
    Other sleeps (reply waits) always wait at most ``cap``.

    Parameters
    ----------
    cap : float
        Longest sleep, seconds.
    idle_cap : float, optional
        Longest idle-poll sleep once no message came for :data:`HOT_S` seconds (never below
        ``cap``); ``None``: always ``cap``.
    """

    def __init__(self, cap: float, idle_cap: float | None = None):
        self._cap = cap
        self._idle_cap = None if idle_cap is None else max(cap, idle_cap)
        self._last = time.monotonic()

    def active(self) -> None:
        """A message came: idle polls wait the cap for the next :data:`HOT_S` seconds."""
        self._last = time.monotonic()

    def sleep(self, seconds: float) -> None:
        seconds = float(seconds)
        cap = self._cap
        if self._idle_cap is not None and seconds >= IDLE_SLEEP_S and time.monotonic() - self._last > HOT_S:
            cap = self._idle_cap
        time.sleep(min(seconds, cap))

    def __getattr__(self, name):
        return getattr(time, name)


class SuperExecLauncher:
    """``subprocess`` stand-in: ``Popen(["flower-superexec", ...])`` starts ``python -m MODULE COMMAND ...``.

    Parameters
    ----------
    command : str
        Sub-command of ``module`` that runs the SuperExec (``"superexec"`` or ``"cold-superexec"``).
    module : str
        Module run with ``python -m`` (default ``clients.warm``).
    """

    def __init__(self, command: str = "superexec", module: str = "clients.warm"):
        self.command = command
        self.module = module

    def Popen(self, args, *pargs, **kwargs):  # noqa: N802 (mirrors subprocess.Popen)
        args = list(args)
        if args and Path(str(args[0])).name == "flower-superexec":
            args = [sys.executable, "-m", self.module, self.command, *args[1:]]
        return subprocess.Popen(args, *pargs, **kwargs)

    def __getattr__(self, name):
        return getattr(subprocess, name)


def fast_pulls(pull):
    """``pull`` (Flower's ``pull_objects`` / ``pull_and_inflate_object_from_tree``) with a 20 ms first retry.

    Same semantics (retry while an object is unavailable, give up after Flower's
    ``PULL_MAX_TIME``); only the waits between retries are shorter. Idempotent.
    """
    if isinstance(pull, partial) and pull.keywords.get("initial_backoff") == PULL_BACKOFF_S:
        return pull
    return partial(pull, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S, max_tries_per_object=None)


class _TaskRecorder:
    """A NodeState seen through: records the task and the message one pull creates."""

    def __init__(self, state):
        self._state = state
        self.task_id: int | None = None
        self.message_id: str | None = None

    def __getattr__(self, name):
        return getattr(self._state, name)

    def create_task(self, *args, **kwargs):
        self.task_id = self._state.create_task(*args, **kwargs)
        return self.task_id

    def store_message(self, message):
        if not message.metadata.reply_to_message_id:
            self.message_id = message.metadata.message_id
        return self._state.store_message(message)


def marks_activity(pull, clock: CappedTime):
    """Flower's ``_pull_and_store_message`` that tells ``clock`` when it pulled a message (a run ID back)."""

    def pull_and_store(**kwargs):
        run_id = pull(**kwargs)
        if run_id is not None:
            clock.active()
        return run_id

    return pull_and_store


def drop_stale_pulls(pull):
    """Flower's ``_pull_and_store_message`` that leaves nothing behind when the run ends mid-pull.

    flwr 1.41 and 1.42 create the ClientApp task and store the (still empty) message before they pull
    the message's objects. When the run stops in between (``fl-server stop``, a ServerApp that
    died), the pull raises ``RunNotRunningException`` and Flower only logs "Run ID ... is not in
    `RUNNING` status. Ignoring message": the task stays pending and the message stays stored.
    The node's SuperExec then runs that leftover task, its reply is pushed in place of the next
    run's reply, and from then on every reply is pushed one message late: the next run drops
    the node at its deadline, until ``fl-client`` restarts. Here, a pull that returns nothing
    after it created a task finishes that task (``stopped``) and deletes its message and objects,
    as Flower already does when the object pull fails. Idempotent.
    """
    if getattr(pull, "_cityfed_drops_stale", False):
        return pull

    def pull_and_store(*, state, object_store, **kwargs):
        rec = _TaskRecorder(state)
        run_id = pull(state=rec, object_store=object_store, **kwargs)
        if run_id is None and rec.task_id is not None:
            from flwr.common.constant import SubStatus

            if rec.message_id:
                _DROPPED.add(rec.message_id)
                _drop_replies_to(state, object_store, {rec.message_id})
                state.delete_messages(message_ids=[rec.message_id])
                object_store.delete(rec.message_id)
            if state.finish_task(rec.task_id, sub_status=SubStatus.STOPPED,
                                 details="the run ended while its message was being received"):
                from logging import INFO

                from flwr.common.logger import log

                log(INFO, "Dropped the message of a run that is no longer running (task %s)", rec.task_id)
        return run_id

    pull_and_store._cityfed_drops_stale = True  # type: ignore[attr-defined]
    pull_and_store.__wrapped__ = pull  # type: ignore[attr-defined]
    return pull_and_store


class _DroppedMessages:
    """IDs of messages :func:`drop_stale_pulls` dropped (the latest :attr:`KEEP`; a node drops a few a run)."""

    KEEP = 1024

    def __init__(self):
        self._ids: dict[str, None] = {}

    def add(self, message_id: str) -> None:
        self._ids[message_id] = None
        while len(self._ids) > self.KEEP:
            del self._ids[next(iter(self._ids))]

    def __contains__(self, message_id) -> bool:
        return message_id in self._ids


#: The messages this node process dropped mid-pull (one SuperNode per process).
_DROPPED = _DroppedMessages()


def _drop_replies_to(state, object_store, dropped) -> list:
    """Delete, from the node's state and object store, the replies to messages in ``dropped``; return the rest.

    Returns the reply messages that are *not* answers to a dropped message.
    """
    keep = []
    for reply in state.get_messages_legacy(is_reply=True):
        if reply.metadata.reply_to_message_id in dropped:
            state.delete_messages(message_ids=[reply.metadata.message_id])
            object_store.delete(reply.metadata.message_id)
            from logging import INFO

            from flwr.common.logger import log

            log(INFO, "Dropped the reply to message %s of a run that is no longer running",
                reply.metadata.reply_to_message_id)
        else:
            keep.append(reply)
    return keep


class _FreshReplies:
    """A NodeState seen by ``_push_messages``: replies to dropped messages are deleted, never pushed."""

    def __init__(self, state, object_store):
        self._state = state
        self._store = object_store

    def __getattr__(self, name):
        return getattr(self._state, name)

    def get_messages_legacy(self, *, is_reply=None, **kwargs):
        if is_reply and not kwargs:
            return _drop_replies_to(self._state, self._store, _DROPPED)
        return self._state.get_messages_legacy(is_reply=is_reply, **kwargs)


def skip_stale_replies(push):
    """Flower's ``_push_messages`` that never pushes a reply to a message :func:`drop_stale_pulls` dropped.

    The SuperExec can hand a task to its ClientApp the moment the task exists, before the
    message's objects are pulled (the warm worker always does). If the run stops during that
    pull, :func:`drop_stale_pulls` drops the message, but the ClientApp may already be answering
    it: its reply then lands in the node's state after (or while) the message is dropped. flwr
    1.42's push stage, run after the *next* message is pulled, pushes whatever reply it finds
    first: the stale one (ignored by the SuperLink), then returns, so the next message's reply
    waits for the message after it, and every later reply goes one message late (a resumed run
    dropped the node at SecAgg+ setup). Here the push stage deletes replies to dropped messages
    and waits for the reply it is owed. Idempotent.
    """
    if getattr(push, "_cityfed_skips_stale", False):
        return push

    def push_messages(*, state, object_store, **kwargs):
        return push(state=_FreshReplies(state, object_store), object_store=object_store, **kwargs)

    push_messages._cityfed_skips_stale = True  # type: ignore[attr-defined]
    push_messages.__wrapped__ = push  # type: ignore[attr-defined]
    return push_messages


def run_supernode(argv: list[str], *, cap: float | None, launcher: SuperExecLauncher,
                  idle_cap: float | None = None) -> None:
    """Run Flower's ``flower-supernode`` with ``argv``, patched as the module docstring says.

    Parameters
    ----------
    argv : list of str
        ``flower-supernode`` arguments.
    cap : float or None
        Cap (seconds) on the SuperNode's polling sleeps, with fast object pulls; ``None`` keeps
        Flower's polling and backoff (cold mode).
    launcher : SuperExecLauncher
        Stands in for the SuperNode's ``subprocess`` module (which SuperExec it starts).
    idle_cap : float, optional
        With ``cap``: the idle poll's cap once no message came for :data:`HOT_S` seconds
        (:class:`CappedTime`); ``None`` polls at ``cap`` always.
    """
    import flwr.supernode.start_client_internal as sci
    from flwr.supernode.cli import flower_supernode

    sci._pull_and_store_message = drop_stale_pulls(sci._pull_and_store_message)  # noqa: SLF001
    if cap is not None:
        clock = CappedTime(cap, idle_cap)
        sci.time = clock
        sci.pull_objects = fast_pulls(sci.pull_objects)  # messages from the coordinator
        sci._pull_and_store_message = marks_activity(sci._pull_and_store_message, clock)  # noqa: SLF001
    sci._push_messages = skip_stale_replies(sci._push_messages)  # noqa: SLF001
    sci.subprocess = launcher
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


# --------------------------------------------------------------------------- SuperExec


def task_of(spec) -> dict:
    """One ClientApp task (a SuperExec ``ExecutionSpec``) as the dict :func:`run_clientapp_task` reads."""
    return {"runtime_api_address": spec.runtime_api_address, "token": spec.token, "insecure": spec.insecure,
            "root_certificates_path": spec.root_certificates_path,
            "runtime_dependency_install": spec.runtime_dependency_install, "task_id": spec.task_id}


def client_app_executor_base() -> type:
    """Flower's ``SubprocessExecutor`` with ClientApp tasks routed to ``self.launch_client_app(spec)``.

    A subclass implements ``launch_client_app(spec) -> str | None``: ``None`` accepts the task,
    a string fails it with that reason. Every other task type starts as in Flower. ``spec``
    carries ``parent_pid`` and ``suppress_output``; :func:`task_of` gives the task itself.
    """
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    class ClientAppExecutor(SubprocessExecutor):
        def launch(self, spec):
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            failure = self.launch_client_app(spec)
            return LaunchResult.accepted() if failure is None else LaunchResult.failed(failure)

        def launch_client_app(self, spec) -> str | None:
            raise NotImplementedError

    return ClientAppExecutor


def run_superexec(argv: list[str], make_executor: Callable[[], object]) -> None:
    """Run Flower's ``flower-superexec`` with ``argv``; its subprocess executor is ``make_executor()``."""
    import flwr.supercore.superexec.run_superexec as rs
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import ExecutorType

    flower_get_executor = rs.get_executor

    def get_executor(executor_type, executor_config=None, **kwargs):
        if executor_type == ExecutorType.SUBPROCESS:
            return make_executor()
        return flower_get_executor(executor_type, executor_config, **kwargs)

    rs.get_executor = get_executor
    sys.argv = ["flower-superexec", *argv]
    flower_superexec()


def start_parent_monitor(parent_pid: int) -> None:
    """Flower's parent-process monitor (SIGINT to this process when ``parent_pid`` is gone)."""
    from flwr.supercore.app_utils import start_parent_process_monitor

    start_parent_process_monitor(parent_pid)


# --------------------------------------------------------------------------- ClientApp task


def fast_object_pulls() -> None:
    """Make ``run_clientapp.pull_task_input`` retry unavailable objects after 20 ms, not 1 s."""
    from flwr.supernode.runtime import run_clientapp as rc

    rc.pull_and_inflate_object_from_tree = fast_pulls(rc.pull_and_inflate_object_from_tree)


def install_fab(run, fab, installed_mismatch: Callable[[Path, bytes], list]) -> Path:
    """Install a FAB and return its folder, after checking it holds exactly the FAB's files.

    Flower reuses an existing ``apps/<publisher>.<name>.<version>.<hash prefix>`` folder; one
    left by another FAB with the same 8-hex prefix (``installed_mismatch`` lists its differing
    files) is replaced. The run's FAB ID and version (from the coordinator) must name the folder
    the FAB installs into, since Flower loads the ClientApp from the folder they name.
    """
    import shutil

    from flwr.cli.install import install_from_fab
    from flwr.common.config import get_project_dir

    app_dir = Path(install_from_fab(fab.content, skip_prompt=True))
    stale = installed_mismatch(app_dir, fab.content)
    if stale:
        print(f"cityfed: {app_dir} holds files of another FAB ({', '.join(stale[:5])}); reinstalling",
              file=sys.stderr, flush=True)
        shutil.rmtree(app_dir)
        app_dir = Path(install_from_fab(fab.content, skip_prompt=True))
        stale = installed_mismatch(app_dir, fab.content)
        if stale:
            raise RuntimeError(f"installed app folder {app_dir} does not match FAB {fab.hash_str}: {', '.join(stale[:5])}")
    named = Path(get_project_dir(run.fab_id, run.fab_version, fab.hash_str))
    if named.resolve() != app_dir.resolve():
        raise RuntimeError(f"run {run.run_id} names app {run.fab_id} {run.fab_version} ({named.name}) but its FAB "
                           f"installs as {app_dir.name}; not loading it")
    return app_dir


def run_clientapp_task(task: dict, *, admit: Callable, refused_code: int, installed_mismatch: Callable,
                       prepare_app: Callable[[Path], list], failure_reason: Callable[[BaseException], str],
                       label: str) -> int:
    """Run one ClientApp task as ``flwr-clientapp --token`` does, with an admission hook; return its exit code.

    Parameters
    ----------
    task : dict
        ``runtime_api_address``, ``token``, ``insecure``, ``root_certificates_path``,
        ``runtime_dependency_install``, ``task_id`` (:func:`task_of`).
    admit : callable
        ``admit(fab_content, fab_hash, run_id)`` -> verdict with ``accepted`` and ``reason()``;
        called right after the pull, before the FAB is installed or any of it imported.
    refused_code : int
        Error code of the reply to a refused FAB.
    installed_mismatch : callable
        ``(app_dir, fab_content) -> list`` of files that differ (see :func:`install_fab`).
    prepare_app : callable
        ``prepare_app(app_dir) -> list`` of dropped module names, called before the app is loaded.
    failure_reason : callable
        What an exception tells the coordinator and the log.
    label : str
        Names this process in the log lines.
    """
    from logging import DEBUG, ERROR, INFO, WARNING

    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.exit import ExitCode
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    if task.get("runtime_dependency_install"):
        # fl-server starts SuperLinks with runtime installation disabled; the app must use the
        # node's own environment (which is also what the app check compares against)
        log(ERROR, "%s: runtime dependency installation is not supported; the app runs in the node's own "
                   "environment", label)
    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=task["runtime_api_address"],
        insecure=bool(task["insecure"]),
        root_certificates=validate_and_resolve_root_certificates(task.get("root_certificates_path"),
                                                                 bool(task["insecure"])),
        interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(task["token"])],
        retry_invoker=retry_invoker,
    )
    heartbeat = None
    message = reply = context = None
    sub_status, details, code = SubStatus.FAILED, "ClientApp task failed due to unknown reason", ExitCode.SUCCESS
    t0 = time.perf_counter()
    steps: dict[str, float] = {}

    def mark(name: str) -> None:
        steps[name] = time.perf_counter() - t0 - sum(steps.values())

    try:
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        mark("pull")
        verdict = admit(fab.content, fab.hash_str, run.run_id)
        mark("check")
        if not verdict.accepted:
            log(WARNING, "cityfed: run %s: %s", run.run_id, verdict.reason(local=True))  # the node's own log
            reply = Message(Error(code=refused_code, reason=verdict.reason()), reply_to=message)
            sub_status, details = SubStatus.FAILED, verdict.reason()
        else:
            app_dir = install_fab(run, fab, installed_mismatch)
            mark("install")
            dropped = prepare_app(app_dir)
            if dropped:
                log(DEBUG, "%s: %d cached module(s) replaced by FAB %s", label, len(dropped), fab.hash_str[:12])
            client_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                run.fab_id, run.fab_version, fab.hash_str)
            mark("load")
            reply = client_app(message=message, context=context)
            mark("app")
            sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 (as flwr-clientapp: the error goes back as the reply)
        e_code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) \
            else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = ("An exception was raised when attempting to load `ClientApp`" if isinstance(ex, LoadClientAppError)
                  else failure_reason(ex))
        # the reason goes to the coordinator and the log: never a library message that may quote a record
        log(ERROR, "ClientApp raised an exception: %s", reason, exc_info=ex if os.environ.get("CITYFED_DEBUG") == "1" else None)
        sub_status, details = SubStatus.FAILED, reason
        if message is not None:
            reply = Message(Error(code=e_code, reason=reason), reply_to=message)
        code = ExitCode.TASK_PROC_EXCEPTION
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001
                log(ERROR, "Failed to push reply message", exc_info=ex)
                code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
        retry_invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        mark("push")
        if heartbeat is not None and heartbeat.is_running:
            heartbeat.stop()
        client.close()
        mark("close")
    log(INFO, "%s: task %s done in %.2f s (%s; %s)", label, task.get("task_id"),
        time.perf_counter() - t0, sub_status, ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
    return int(code)


@register("warm-worker")
def _self_test() -> None:
    """The SuperNode, SuperExec and flwr-clientapp names this seam patches or calls."""
    import importlib

    import flwr.supercore.superexec.run_superexec as rs
    import flwr.supernode.start_client_internal as sci
    from flwr.supernode.runtime import run_clientapp as rc

    for mod, names in ((sci, ("time", "subprocess", "pull_objects", "_pull_and_store_message", "_push_messages",
                             "RunNotRunningException")),
                       (rs, ("get_executor",)),
                       (rc, ("pull_and_inflate_object_from_tree", "pull_task_input", "push_message", "push_task_output"))):
        missing = [n for n in names if not hasattr(mod, n)]
        assert not missing, f"{mod.__name__} lacks {missing}"
    assert sci.time is time and sci.subprocess is subprocess, "start_client_internal no longer uses the time/subprocess modules"
    for mod, name in (("flwr.supernode.cli", "flower_supernode"), ("flwr.supercore.cli", "flower_superexec"),
                      ("flwr.supercore.constant", "TaskType"), ("flwr.supercore.constant", "ExecutorType"),
                      ("flwr.supercore.superexec.executor", "LaunchResult"),
                      ("flwr.supercore.superexec.executor.subprocess_executor", "SubprocessExecutor"),
                      ("flwr.supercore.app_utils", "start_parent_process_monitor"),
                      ("flwr.cli.install", "install_from_fab"), ("flwr.common.config", "get_project_dir"),
                      ("flwr.clientapp.utils", "get_load_client_app_fn"),
                      ("flwr.clientapp.client_app", "LoadClientAppError"),
                      ("flwr.supercore.heartbeat", "HeartbeatSender"),
                      ("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http"),
                      ("flwr.supercore.runtime", "RuntimeHttpClient"),
                      ("flwr.supercore.retry", "make_simple_http_retry_invoker"),
                      ("flwr.supercore.exit", "ExitCode")):
        assert hasattr(importlib.import_module(mod), name), f"{mod}.{name} is gone"
    from flwr.supercore.constant import TaskType

    assert hasattr(TaskType, "CLIENT_APP"), "TaskType.CLIENT_APP is gone"
