"""The local SuperLink that ``flwr run .`` starts: find it and stop it, by PID.

With a local connection (``address = ":local:"``, the default ``local`` connection of
``$FLWR_HOME/config.toml``), flwr 1.42's ``flwr run`` starts ``flower-superlink --simulation``
detached (its own session) when nothing answers on ``127.0.0.1:39091``
(``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``), and leaves it running for the next run; Flower has no
command that stops it. Its command line names its log file,
``$FLWR_HOME/local-superlink/superlink.log``, which tells the SuperLink of one ``FLWR_HOME``
from any other. :func:`stop_local_superlink` ends it and the processes it started (its SuperExec,
a run's ``flwr-simulation`` and Ray's processes), by PID; Linux (``/proc``).

``python -m simulations.flwr_local stop`` does it for ``$FLWR_HOME`` (default ``~/.flwr``).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path


def _flwr_home(flwr_home: str | Path | None) -> Path:
    if flwr_home is not None:
        return Path(flwr_home)
    return Path(os.environ["FLWR_HOME"]) if os.environ.get("FLWR_HOME") else Path.home() / ".flwr"


def _processes() -> dict[int, tuple[int, list[str], str]]:
    """``{pid: (ppid, argv, state)}`` of the processes this user can read."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile, or not ours
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        out[int(entry.name)] = (int(fields[1]), [a.decode(errors="replace") for a in argv if a], fields[0])
    return out


def local_superlink_pids(flwr_home: str | Path | None = None) -> list[int]:
    """PIDs of the ``flower-superlink`` processes ``flwr`` started for ``flwr_home``.

    Parameters
    ----------
    flwr_home : str or Path, optional
        Flower's home folder (default: ``$FLWR_HOME``, else ``~/.flwr``).

    Returns
    -------
    list of int
        Usually one PID; empty when none runs.
    """
    log_file = str(_flwr_home(flwr_home) / "local-superlink" / "superlink.log")
    pids = []
    for pid, (_, argv, state) in _processes().items():
        if state == "Z" or not any(Path(a).name == "flower-superlink" for a in argv[:2]):
            continue
        if "--log-file" in argv and argv.index("--log-file") + 1 < len(argv) and argv[argv.index("--log-file") + 1] == log_file:
            pids.append(pid)
    return sorted(pids)


def _descendants(root: int, procs: dict[int, tuple[int, list[str], str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def stop_local_superlink(flwr_home: str | Path | None = None, timeout: float = 20.0) -> list[int]:
    """Stop the local SuperLink of ``flwr_home`` and every process it started; return their PIDs.

    SIGTERM to the SuperLink(s) and their descendants (found before any of them ends), then
    SIGKILL to whatever is still running after ``timeout`` seconds.

    Parameters
    ----------
    flwr_home : str or Path, optional
        Flower's home folder (default: ``$FLWR_HOME``, else ``~/.flwr``).
    timeout : float
        Seconds to wait for a clean exit before SIGKILL.

    Returns
    -------
    list of int
        The PIDs signalled (empty: no local SuperLink of ``flwr_home`` was running).
    """
    procs = _processes()
    pids = []
    for root in local_superlink_pids(flwr_home):
        pids += [root] + _descendants(root, procs)
    pids = sorted({p for p in pids if procs.get(p, (0, [], "Z"))[2] != "Z"})
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        if not any(_alive(p) for p in pids):
            break
    return pids


def main(argv: list[str] | None = None) -> int:
    """``python -m simulations.flwr_local stop [--flwr-home DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m simulations.flwr_local",
                                     description="Stop the local SuperLink that `flwr run` started for FLWR_HOME.")
    parser.add_argument("action", choices=["stop", "status"])
    parser.add_argument("--flwr-home", default=None, help="Flower's home folder (default: $FLWR_HOME or ~/.flwr)")
    args = parser.parse_args(argv)
    home = _flwr_home(args.flwr_home)
    if args.action == "status":
        pids = local_superlink_pids(home)
        print(f"local SuperLink of {home}: " + (f"running (PID {', '.join(map(str, pids))})" if pids else "not running"))
        return 0
    pids = stop_local_superlink(home)
    print(f"local SuperLink of {home}: " + (f"stopped PID(s) {', '.join(map(str, pids))}" if pids else "not running"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
