"""Supervision of the coordinator's Flower processes, inside ``fl-server start``.

One job: keep the SuperExec and the runs' ServerApps going. :class:`CoordinatorSupervisor`
restarts a SuperExec that exited, resumes a run whose ServerApp process died, and probes the
SuperLink's health; :func:`install_supervisor` hooks it into Flower's SuperLink (its lifespan
and its stop requests). The ``/proc`` readers it watches processes with (:func:`proc_stat`,
:func:`proc_cmdline`, :func:`proc_children`) and :func:`wait_serverapp_exit` (``fl-server stop``
waits on the ServerApps it publishes in ``serverapps.json``) live here too.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from contract.files import write_atomic
from privacy.safe_cli import make_console
from server.errors import CliError
from server.flwr_calls import _bin
from server.launches import UNREADABLE, _checkpoint_round, read_launch, write_run_results

#: Flower's SuperExec starts one of these per run (``flwr-serverapp ... --token T --parent-pid``).
SERVERAPP_COMMAND = "flwr-serverapp"
#: Live ServerApp processes by Flower run ID, written by ``start`` for ``stop`` (``{run-id: {pid, start}}``).
SERVERAPPS_FILE = "serverapps.json"


def proc_stat(pid: int) -> dict | None:
    """State, parent, process group, start time and wait status of ``pid`` (Linux ``/proc/<pid>/stat``).

    Returns
    -------
    dict or None
        ``state`` (``R``, ``S``, ``Z`` ...), ``ppid``, ``pgid``, ``start`` (clock ticks after
        boot: with the PID, identifies the process) and ``exit`` (the wait(2) status of a
        zombie, else 0); None when there is no such process or no ``/proc``.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may hold spaces and ')'
    return {"state": fields[0], "ppid": int(fields[1]), "pgid": int(fields[2]), "start": int(fields[19]),
            "exit": int(fields[49]) if len(fields) > 49 else None}


def proc_cmdline(pid: int) -> list[str]:
    """The command line of ``pid`` (empty when it is gone, a zombie, or there is no ``/proc``)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def proc_children(pid: int) -> list[int]:
    """PIDs of the direct children of ``pid`` (``/proc/<pid>/task/*/children``, else a scan of ``/proc``)."""
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except (OSError, ValueError):
        pass
    try:
        pids = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]
    except OSError:
        return []
    return [p for p in pids if (proc_stat(p) or {}).get("ppid") == pid]


def describe_exit(returncode: int | None) -> str:
    """``exit status N`` / ``killed by SIGKILL`` for a ``Popen.returncode`` (negative = signal)."""
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _returncode(wait_status: int | None) -> int | None:
    """A wait(2) status (``/proc`` ``exit`` field) as a ``Popen.returncode``."""
    if wait_status is None:
        return None
    return -(wait_status & 0x7F) if wait_status & 0x7F else (wait_status >> 8) & 0xFF


def _backoff(n: int, first: float, cap: float) -> float:
    """The ``n``-th wait (1-based): ``first`` doubled ``n - 1`` times, at most ``cap`` (both finite, >= 0)."""
    if not (math.isfinite(first) and math.isfinite(cap)) or first < 0 or cap < 0:
        raise ValueError(f"backoff {first!r} / backoff-max {cap!r}: must be finite numbers of seconds >= 0")
    return min(first * 2 ** min(max(n - 1, 0), 64), cap)


@dataclass
class _ServerApp:
    """A ``flwr-serverapp`` process the supervisor watches (``start`` guards against PID reuse)."""

    pid: int
    start: int
    token: str
    run_id: int | None = None
    task_id: int | None = None


class CoordinatorSupervisor:
    """Keep the coordinator's Flower processes alive from inside ``fl-server start``.

    ``fl-server start`` runs Flower's SuperLink in its own process; the SuperLink starts a
    **SuperExec** process, which starts one **ServerApp** process per run. A thread of
    ``fl-server start`` checks them every ``poll_s`` seconds:

    * a SuperExec that exited is restarted after ``backoff`` s (doubling up to
      ``backoff_max``), at most ``max_restarts`` times in a row (a SuperExec that ran
      ``stable_s`` resets the count); then ``fl-server start`` exits 1 with the reason.
      Without it no run can start (a new run stays ``pending``).
    * a ServerApp that died mid-run (killed, out of memory, its SuperExec gone) is detected
      from its process (within ``poll_s``) and Flower's run status, and the run is resumed
      from its last checkpoint with ``fl-server run --resume`` after a backoff, at most
      ``max_resumes`` times per run folder. A run whose process vanished without reporting
      is marked ``finished:failed`` (with the reason) ``settle_s`` seconds later, not at once
      and not only when Flower's heartbeat check expires it (up to a minute): nodes still
      pulling a complete message of it finish cleanly, and nodes waiting for objects the dead
      process never pushed are released; the resume waits for that. A ServerApp that raised
      an exception is not resumed (the same error would recur): its run folder gets
      ``results.json`` (``failed: ...``) and ``report.html``.
    * the SuperLink itself (this process) is probed on its own ``/health`` every
      ``health_every_s`` s; after ``health_failures`` failed probes in a row it is hung and
      ``fl-server start`` exits 1 (systemd restarts it).

    Every action is logged with its reason on ``console``. Only ServerApps this process
    saw start are resumed: runs cut off by a coordinator crash are resumed by the operator
    (``fl-server run --resume``), as before.

    Parameters
    ----------
    state_dir : Path
        The coordinator's state folder (``serverapps.json`` is written there).
    health_url : str or None
        ``https://<admin address>/health`` of this SuperLink; None disables the probe.
    max_restarts, max_resumes : int
    backoff, backoff_max, stable_s, poll_s, settle_s : float
    health_every_s, health_timeout_s : float
    health_failures : int
    console : Console, optional
    resume : callable, optional
        ``resume(folder) -> new run ID``; default runs ``fl-server run --resume``.
    on_fatal : callable, optional
        ``on_fatal(reason)``; default: stop this process gracefully (SIGTERM to itself; forced
        exit after ``exit_grace_s``), after which ``fl-server start`` exits 1.
    """

    def __init__(self, state_dir: Path, *, health_url: str | None = None, max_restarts: int = 5, max_resumes: int = 3,
                 backoff: float = 2.0, backoff_max: float = 60.0, stable_s: float = 300.0, poll_s: float = 1.0,
                 settle_s: float = 5.0, health_every_s: float = 15.0, health_timeout_s: float = 10.0, health_failures: int = 4,
                 stop_grace_s: float = 10.0, exit_grace_s: float = 30.0, console: Console | None = None,
                 resume: Callable[[Path], str] | None = None, on_fatal: Callable[[str], None] | None = None):
        for what, value in (("backoff", backoff), ("backoff_max", backoff_max)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                # NaN would never schedule a restart (now >= now + nan is never true): a silent hang
                raise ValueError(f"{what} {value!r}: must be a finite number of seconds >= 0")
        self.state_dir = Path(state_dir)
        self.health_url = health_url
        self.max_restarts, self.max_resumes = max_restarts, max_resumes
        self.backoff, self.backoff_max, self.stable_s, self.poll_s = backoff, backoff_max, stable_s, poll_s
        self.settle_s = settle_s
        self.health_every_s, self.health_timeout_s, self.health_failures = health_every_s, health_timeout_s, health_failures
        self.stop_grace_s, self.exit_grace_s = stop_grace_s, exit_grace_s
        self.console = console or make_console(stderr=True)
        self.resume = resume or self._resume_with_cli
        self.on_fatal = on_fatal or self._exit_gracefully
        self.lifespan = None
        self.fatal: str | None = None
        self.apps: dict[int, _ServerApp] = {}
        self.resumes: dict[str, int] = {}
        self._due: list[tuple[float, Path, int]] = []
        self._to_fail: list[tuple[float, int, int, str]] = []  # (when, run ID, task ID, why)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.stop_requested = threading.Event()  # the coordinator is shutting down: no restart, no resume
        self._thread: threading.Thread | None = None
        self._se_started = time.monotonic()
        self._se_failures = 0
        self._se_restart_at: float | None = None
        self._se_dead_since: float | None = None
        self._health_next = time.monotonic() + health_every_s
        self._health_bad = 0

    # -- lifecycle ---------------------------------------------------------------------
    def attach(self, lifespan) -> None:
        """Start watching ``lifespan`` (Flower's ``SuperLinkLifespan``, after its start-up)."""
        from flower_compat.superlink import superexec_process

        self.lifespan = lifespan
        self._se_started = time.monotonic()
        proc = superexec_process(lifespan)
        self.log(f"supervising the SuperExec (pid {proc.pid if proc else '-'}) and the ServerApps it starts "
                 f"(restarts: at most {self.max_restarts} in a row; automatic resumes: at most {self.max_resumes} per run)")
        self._thread = threading.Thread(target=self._loop, name="cityfed-supervisor", daemon=True)
        self._thread.start()

    def detach(self) -> None:
        """Stop watching (before Flower stops the SuperExec at shutdown)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def log(self, text: str, style: str = "") -> None:
        """One timestamped line on the coordinator's log (stderr)."""
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        self.console.print(f"{stamp} fl-server start: " + (f"[{style}]{escape(text)}[/]" if style else escape(text)))

    def fail(self, reason: str) -> None:
        """Give up: log ``reason`` and end ``fl-server start`` with exit status 1."""
        if self.fatal is not None:
            return
        self.fatal = reason
        self._stop.set()
        self.log(f"giving up: {reason}", "bold red")
        self.on_fatal(reason)

    def _exit_gracefully(self, reason: str) -> None:
        def force() -> None:
            self.console.print(f"[bold red]fl-server start: the SuperLink did not stop within {self.exit_grace_s:g} s; "
                               f"exiting now: {escape(reason)}[/]")
            os._exit(1)

        timer = threading.Timer(self.exit_grace_s, force)
        timer.daemon = True
        timer.start()
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts the SuperLink down cleanly, then start exits 1

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check_once()
            except Exception as exc:  # noqa: BLE001 - the supervisor must outlive any one bad check
                self.log(f"supervision check failed ({type(exc).__name__}: {exc}); retrying", "red")

    def check_once(self, now: float | None = None) -> None:
        """One round of checks: SuperExec, ServerApps, due resumes, the SuperLink's health."""
        now = time.monotonic() if now is None else now
        if self.lifespan is None or self._stop.is_set() or self.stop_requested.is_set():
            return
        self._check_superexec(now)
        if self._stop.is_set():
            return
        self._check_serverapps()
        self._fail_dead_runs(now)
        self._start_due_resumes(now)
        self._check_health(now)

    # -- SuperExec ---------------------------------------------------------------------
    def _check_superexec(self, now: float) -> None:
        from flower_compat.superlink import restart_superexec, superexec_process

        ls = self.lifespan
        proc = superexec_process(ls)
        if proc is None:
            return
        if self._se_restart_at is not None:
            if now >= self._se_restart_at:
                self._se_restart_at = None
                restart_superexec(ls)
                self._se_started = now
                self.log(f"SuperExec restarted (pid {superexec_process(ls).pid}); pending runs start now", "green")
            return
        rc = proc.poll()
        if rc is None:
            if self._se_failures and now - self._se_started >= self.stable_s:
                self._se_failures = 0
            return
        if rc in (0, -signal.SIGTERM, -signal.SIGINT):  # 0: Flower's graceful exit on SIGTERM/SIGINT
            # a stop request (systemd stops the whole unit) also reaches this process: let its shutdown come first
            self._se_dead_since = self._se_dead_since or now
            if now - self._se_dead_since < self.stop_grace_s:
                return
        self._se_dead_since = None
        if now - self._se_started >= self.stable_s:
            self._se_failures = 0
        self._se_failures += 1
        reason = describe_exit(rc)
        if self._se_failures > self.max_restarts:
            times = f"{self._se_failures} time{'s' if self._se_failures != 1 else ''}"
            self.fail(f"the SuperExec (it starts every run's ServerApp) exited ({reason}) {times} in a row; no run can "
                      f"start without it (--max-restarts {self.max_restarts}). Fix: read its lines above in this log, "
                      "then start fl-server again (under systemd, Restart=on-failure does it)")
            return
        wait = _backoff(self._se_failures, self.backoff, self.backoff_max)
        self.log(f"the SuperExec (pid {proc.pid}) exited ({reason}): no run can start without it; restarting it in "
                 f"{wait:g} s (restart {self._se_failures}/{self.max_restarts})", "yellow")
        self._se_restart_at = now + wait

    # -- ServerApps --------------------------------------------------------------------
    def _state(self):
        from flower_compat.superlink import link_state

        return link_state(self.lifespan)

    def _check_serverapps(self) -> None:
        from flower_compat.superlink import superexec_process

        proc = superexec_process(self.lifespan)
        changed = False
        if proc is not None and proc.poll() is None:
            for pid in proc_children(proc.pid):
                if pid in self.apps:
                    continue
                cmd = proc_cmdline(pid)
                st = proc_stat(pid)
                if st is None or "--token" not in cmd[:-1] or not any(Path(a).name == SERVERAPP_COMMAND for a in cmd[:2]):
                    continue
                self.apps[pid] = _ServerApp(pid, st["start"], cmd[cmd.index("--token") + 1])
                changed = True
        for app in list(self.apps.values()):
            if app.run_id is None:
                task = self._state().get_task_by_token(app.token)
                if task is not None:
                    app.run_id, app.task_id = int(task.run_id), int(task.task_id)
                    changed = True
            st = proc_stat(app.pid)
            same = st is not None and st["start"] == app.start
            if same and st["state"] not in ("Z", "X"):
                continue
            del self.apps[app.pid]
            changed = True
            how = describe_exit(_returncode(st["exit"])) if same and st["exit"] is not None else "exit status unknown"
            self._serverapp_ended(app, how)
        if changed:
            self._publish()

    def _publish(self) -> None:
        data = {str(a.run_id): {"pid": a.pid, "start": a.start} for a in self.apps.values() if a.run_id is not None}
        write_atomic(self.state_dir / SERVERAPPS_FILE, json.dumps(data, indent=2).encode())

    def _run_folder(self, run_id: int) -> Path | None:
        runs = self._state().get_run_info(run_ids=[run_id])
        run_dir = (dict(runs[0].override_config) if runs else {}).get("run-dir")
        return Path(str(run_dir)) if run_dir else None

    def _serverapp_ended(self, app: _ServerApp, how: str) -> None:
        from flower_compat.superlink import Status, SubStatus

        if app.run_id is None:
            self.log(f"a ServerApp (pid {app.pid}) exited ({how}) before it took its run; nothing to resume", "yellow")
            return
        state = self._state()
        st = state.get_run_status({app.run_id}).get(app.run_id)
        if st is None:
            return
        settle = 0.0
        if st.status != Status.FINISHED:
            why = f"its ServerApp process (pid {app.pid}) died ({how}) without reporting"
            self._to_fail.append((time.monotonic() + self.settle_s, app.run_id, app.task_id, why))
            settle = self.settle_s + 1.0
        elif st.sub_status in (SubStatus.COMPLETED, SubStatus.STOPPED):
            return  # the ServerApp wrote results.json; `fl-server stop` writes it for a stopped run
        elif st.details.startswith("ServerApp failed with exception"):
            self._failed(app.run_id, st.details)
            return
        else:
            why = f"its ServerApp process (pid {app.pid}) ended ({how}): {st.details.rstrip('.') or 'no details'}"
        self._schedule_resume(app.run_id, why, not_before=settle)

    def _fail_dead_runs(self, now: float) -> None:
        """Mark runs whose ServerApp died without reporting ``finished:failed``, ``settle_s`` after the death."""
        from flower_compat.superlink import Status, SubStatus

        due = [d for d in self._to_fail if d[0] <= now]
        self._to_fail = [d for d in self._to_fail if d[0] > now]
        for _, run_id, task_id, why in due:
            st = self._state().get_run_status({run_id}).get(run_id)
            if st is not None and st.status != Status.FINISHED:
                self._state().finish_task(task_id, SubStatus.FAILED, f"{why}; detected by fl-server start")
                self.log(f"run {run_id}: marked finished:failed ({why})")

    def _failed(self, run_id: int, details: str) -> None:
        folder = self._run_folder(run_id)
        where = f" ({folder.name})" if folder else ""
        self.log(f"run {run_id}{where} failed: {details}. Not resumed automatically (the same error would recur). "
                 f"Fix: read `fl-server logs {run_id}`, correct the cause, then `fl-server run --resume "
                 f"{shlex.quote(folder.name) if folder else run_id}`", "bold red")
        if folder is not None and (folder / "launch.json").exists():
            self._write_results(folder, f"failed: {details}", run_id)

    def _write_results(self, folder: Path, status: str, run_id: int) -> None:
        try:
            write_run_results(folder, status, str(run_id), written_by="fl-server start")
        except Exception as exc:  # noqa: BLE001 - logged; the run's checkpoint stays
            self.log(f"results.json/report.html not written in {folder}: {type(exc).__name__}: {exc}", "red")

    def _schedule_resume(self, run_id: int, why: str, not_before: float = 0.0) -> None:
        folder = self._run_folder(run_id)
        if folder is None or not (folder / "launch.json").exists():
            self.log(f"run {run_id}: {why}; it was not launched with `fl-server run` (no launch.json), so it is not "
                     "resumed", "bold red")
            return
        try:
            launch = read_launch(folder / "launch.json")
        except ValueError as exc:
            self.log(f"run {run_id}: {why}; not resumed: {UNREADABLE} {folder / 'launch.json'} ({exc}). Fix: "
                     f"restore it, then `fl-server run --resume {shlex.quote(folder.name)}`", "bold red")
            return
        if str(run_id) != str((launch.get("run-ids") or [""])[-1]):
            return  # this folder was resumed since (as another run)
        with self._lock:
            n = self.resumes.get(str(folder), 0) + 1
            if n > self.max_resumes:
                limit = ("automatic resumes are off (--max-resumes 0)" if self.max_resumes == 0 else
                         f"it was resumed automatically {self.max_resumes} time(s) already (--max-resumes)")
                self.log(f"run {run_id} ({folder.name}): {why}; not resumed: {limit}. Fix: read `fl-server logs "
                         f"{run_id}`, then `fl-server run --resume {shlex.quote(folder.name)}`", "bold red")
                self._write_results(folder, f"failed: {why}", run_id)
                return
            self.resumes[str(folder)] = n
            wait = max(_backoff(n, max(self.backoff, 1.0), self.backoff_max), not_before)
            self._due.append((time.monotonic() + wait, folder, run_id))
        done = _checkpoint_round(folder)
        self.log(f"run {run_id} ({folder.name}): {why}; resuming it after round {done} (its last checkpoint) in "
                 f"{wait:g} s (automatic resume {n}/{self.max_resumes})", "yellow")

    def _start_due_resumes(self, now: float) -> None:
        with self._lock:
            due = [d for d in self._due if d[0] <= now]
            self._due = [d for d in self._due if d[0] > now]
        for _, folder, run_id in due:
            if self.stop_requested.is_set():
                return
            threading.Thread(target=self._resume_thread, args=(folder, run_id), daemon=True,
                             name=f"cityfed-resume-{folder.name}").start()

    def _resume_thread(self, folder: Path, run_id: int) -> None:
        try:
            new = self.resume(folder)
        except Exception as exc:  # noqa: BLE001 - counted as an attempt, retried with backoff
            self._schedule_resume(run_id, f"its automatic resume failed ({exc})")
            return
        self.log(f"run {run_id} ({folder.name}) resumed as run {new}", "green")

    def _resume_with_cli(self, folder: Path) -> str:
        cmd = [_bin("fl-server"), "run", "--resume", str(folder), "--runs-dir", str(folder.parent),
               "--state-dir", str(self.state_dir), "--wait-start", "0"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` exited {res.returncode}: {(res.stderr or res.stdout).strip()[-1500:]}")
        return (res.stdout.strip().splitlines() or ["?"])[-1]

    # -- the SuperLink itself ----------------------------------------------------------
    def _check_health(self, now: float) -> None:
        if self.health_url is None or now < self._health_next:
            return
        import httpx

        self._health_next = now + self.health_every_s
        try:  # liveness of this very process over loopback: nothing is sent, so the certificate is not checked
            ok = httpx.get(self.health_url, verify=False, timeout=self.health_timeout_s).status_code == 200
        except httpx.HTTPError:
            ok = False
        self._health_bad = 0 if ok else self._health_bad + 1
        if not ok:
            self.log(f"the SuperLink did not answer {self.health_url} ({self._health_bad}/{self.health_failures})", "yellow")
        if self._health_bad >= self.health_failures:
            self.fail(f"the SuperLink has not answered {self.health_url} {self._health_bad} times in a row "
                      f"({self.health_every_s:g} s apart): it is hung. Exiting so that systemd (Restart=on-failure) "
                      "starts it again; runs resume with `fl-server run --resume`")


def install_supervisor(supervisor: CoordinatorSupervisor) -> None:
    """Make Flower's SuperLink hand its lifespan (SuperExec, state) to ``supervisor`` when it starts.

    Flower 1.42 builds the SuperLink app from ``flower_superlink.SuperLinkLifespan`` (looked up
    when ``flower_superlink()`` runs): it is replaced by a subclass whose ``startup`` attaches
    the supervisor and whose ``shutdown`` detaches it before the SuperExec is stopped.

    Raises
    ------
    CliError
        When this Flower version has no such hook (code 1).
    """
    from flower_compat.superlink import supervise_lifespan

    if not supervision_hook_available():
        raise CliError("fl-server cannot supervise the SuperExec in this Flower version (needs flwr's "
                       "SuperLinkLifespan); refusing to start an unsupervised coordinator", 1)
    supervise_lifespan(lambda lifespan: supervisor.attach(lifespan), lambda: supervisor.detach())  # looked up per call
    _watch_stop_requests(supervisor)


def _watch_stop_requests(supervisor: CoordinatorSupervisor) -> None:
    """Stop supervising as soon as SIGTERM/SIGINT reaches the SuperLink's server.

    A stop request (``systemctl stop``: SIGTERM to every process of the unit) also ends the
    SuperExec and the ServerApps: they must not be restarted or resumed while the coordinator
    shuts down. uvicorn installs its own signal handlers (``Server.handle_exit``); this
    wraps it (once) so that the supervisor stops first.
    """
    try:
        import uvicorn.server
    except ImportError:
        return
    server = uvicorn.server.Server
    original = getattr(server.handle_exit, "_cityfed_original", server.handle_exit)

    def handle_exit(self, sig, frame):
        _stop_requested.set()
        return original(self, sig, frame)

    handle_exit._cityfed_original = original  # type: ignore[attr-defined]
    server.handle_exit = handle_exit
    supervisor.stop_requested = _stop_requested


#: Set when SIGTERM/SIGINT reached the SuperLink's server (:func:`_watch_stop_requests`).
_stop_requested = threading.Event()


def supervision_hook_available() -> bool:
    """Whether flwr's SuperLink exposes what :func:`install_supervisor` relies on."""
    from flower_compat.superlink import lifespan_hook_available

    return lifespan_hook_available()


class _StopRequested(BaseException):
    """SIGTERM/SIGINT reached ``fl-server start`` (raised once uvicorn has shut the SuperLink down)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum, _frame) -> None:
    raise _StopRequested(signum)


def wait_serverapp_exit(state_dir: Path, run_id: str, timeout: float, poll: float = 0.2) -> bool:
    """Wait until the ServerApp process of ``run_id`` has exited (as ``fl-server start`` publishes them).

    Returns
    -------
    bool
        True once it is gone (or was never listed), False after ``timeout`` seconds.
    """
    end = time.monotonic() + timeout
    while True:
        try:
            entry = json.loads((state_dir / SERVERAPPS_FILE).read_text()).get(str(run_id))
        except (OSError, ValueError, AttributeError):
            entry = None
        if not entry:
            return True
        st = proc_stat(int(entry["pid"]))
        if st is None or st["start"] != entry.get("start") or st["state"] in ("Z", "X"):
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(poll)
