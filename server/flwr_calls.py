"""How ``fl-server`` talks to the running coordinator: Flower's ``flwr`` CLI and the SuperLink's Control API.

One job: every call to the coordinator. ``flwr`` runs on the ``cityfed`` connection that
``fl-server start`` writes (:func:`write_connection`, ``FLWR_HOME`` = ``<state-dir>/flwr-home``),
its failures become a :class:`~server.errors.CliError` with Flower's message made one plain
line (:func:`flower_message`, :func:`flower_code`) and its streamed log loses colour codes off a
terminal (:func:`for_output`); a run's status is asked from the Control API in this process,
without starting ``flwr`` (:func:`control_run_status`, :func:`wait_run_started`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from server.errors import FIX_RUN, RUN_ID_NOT_FOUND, CliError, check_flower_id, unknown_run

#: Name of the ``flwr`` connection written into ``$FLWR_HOME/config.toml``.
CONNECTION = "cityfed"


def cli_home(state_dir: Path) -> Path:
    """FLWR_HOME of the operator's ``flwr`` CLI (holds config.toml)."""
    return state_dir / "flwr-home"


def superlink_home(state_dir: Path) -> Path:
    """FLWR_HOME of the SuperLink process."""
    return state_dir / "superlink-home"


def _bin(name: str) -> str:
    """A console script of this venv (``flwr``, ``flower-superlink``, ...), else from PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_connection(state_dir: Path, address: str, ca: Path | None, insecure: bool) -> Path:
    """Write ``<state-dir>/flwr-home/config.toml`` with the ``cityfed`` connection.

    Parameters
    ----------
    state_dir : Path
    address : str
        ``host:port`` the operator's ``flwr`` CLI dials (loopback on the coordinator).
    ca : Path or None
        CA certificate (absolute path written; required unless ``insecure``).
    insecure : bool
        Plaintext connection (``fl-server start --insecure`` only).

    Returns
    -------
    Path
        The config file.
    """
    home = cli_home(state_dir)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f"address = {json.dumps(address)}"]
    if insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(Path(ca).resolve()))}")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _coordinator(state_dir: Path) -> dict:
    """What ``fl-server start`` recorded in ``<state-dir>/coordinator.json`` (address, CA, insecure).

    Raises
    ------
    CliError
        Code 3 when the coordinator was never set up here (``coordinator.json`` or the ``flwr``
        connection missing, each named); code 2 when ``coordinator.json`` is damaged (not JSON,
        not an object, ``address``/``ca``/``insecure`` missing or of the wrong type): the fix is
        to restart ``fl-server start`` with this state dir, which rewrites it.
    """
    path = state_dir / "coordinator.json"
    connection = cli_home(state_dir) / "config.toml"
    sd = shlex.quote(str(state_dir))
    restart = (f"fix: restart the coordinator (`fl-server start --state-dir {sd} ...` with its usual options), "
               "which rewrites it; or pass the --state-dir you started it with")
    missing = [p for p in (path, connection) if not p.exists()]
    if path in missing:
        raise CliError(f"no coordinator set up in {state_dir} (missing {path}); fix: run `fl-server start "
                       f"--state-dir {sd} ...` first, or pass the --state-dir you started it with", 3)
    try:
        coord = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"{path}: cannot be read ({exc.strerror or exc}); fix: run this command as the user that runs "
                       "`fl-server start`, or make the file readable by this user", 2) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CliError(f"{path}: damaged: not JSON ({exc}); {restart}", 2) from None
    problem = None
    if not isinstance(coord, dict):
        problem = f"not a JSON object (a {type(coord).__name__})"
    elif not isinstance(coord.get("address"), str) or not coord["address"].strip():
        problem = f"'address' is {coord.get('address')!r}, not the host:port the commands dial"
    elif coord.get("ca") is not None and not isinstance(coord["ca"], str):
        problem = f"'ca' is {coord['ca']!r}, not the path of the CA certificate"
    elif not isinstance(coord.get("insecure", False), bool):
        problem = f"'insecure' is {coord['insecure']!r}, not true or false"
    if problem:
        raise CliError(f"{path}: damaged: {problem}; {restart}", 2)
    if connection in missing:
        raise CliError(f"coordinator in {state_dir} not fully set up (missing {connection}, the flwr connection "
                       f"`fl-server start` writes); {restart}", 3)
    return coord


def flwr(state_dir: Path, *args: str, timeout: float | None = 120, json_out: bool = False, stream: bool = False):
    """Run the ``flwr`` CLI against the coordinator's ``cityfed`` connection.

    Parameters
    ----------
    state_dir : Path
    *args : str
        ``flwr`` arguments (e.g. ``"supernode", "ls"``); the connection name is appended by
        the caller where the command takes one.
    timeout : float, optional
    json_out : bool
        Append ``--format json`` and return the parsed JSON.
    stream : bool
        Print the output as it comes (``logs --follow``), without colour codes unless stdout
        is a terminal (:func:`for_output`); returns the exit code.

    Raises
    ------
    CliError
        When ``flwr`` fails (code 1, or 3 when the coordinator cannot be reached).
    """
    _coordinator(state_dir)
    cmd = [_bin("flwr"), *args] + (["--format", "json"] if json_out else [])
    env = _env(cli_home(state_dir))
    env["COLUMNS"] = env.get("COLUMNS", "200")
    if stream:
        return _stream(cmd, env, sys.stdout)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CliError(f"`flwr {' '.join(args)}` did not answer in {timeout:.0f} s; fix: check that `fl-server start` "
                       "is running (and its log)", 3) from None
    text = (proc.stdout or "").strip()
    if json_out:
        try:
            data = json.loads(text[text.index("{"):]) if "{" in text else {}
        except ValueError:
            data = {}
        if proc.returncode != 0 or not data.get("success", proc.returncode == 0):
            msg = flower_message(str(data.get("error-message") or proc.stderr or text))
            code = 3 if re.search(r"connect|unavailable|refused|timed out", msg, re.I) else 1
            raise CliError(f"`flwr {' '.join(args)}` failed: {msg}", code, flower_code(msg))
        return data
    if proc.returncode != 0:
        msg = flower_message(proc.stderr + "\n" + text)
        raise CliError(f"`flwr {' '.join(args)}` failed: {msg}", 1, flower_code(msg))
    return text


def flower_message(text: str, limit: int = 2000) -> str:
    """Flower's output as one plain line for an error message: no colour codes, no box, no blank lines.

    ``flwr`` colours its log lines and draws errors in a box (rich); neither belongs in a message
    that may end up in a file or the journal. The last ``limit`` characters are kept.
    """
    from flower_compat.logging import plain

    lines = (re.sub(r"[\u2500-\u257f]+", " ", line) for line in plain(text).splitlines())
    return " ".join(" ".join(line.split()) for line in lines if line.strip())[-limit:]


def flower_code(text: str) -> int | None:
    """Flower's error code in its output (``[code: 16] Run ID not found.`` gives 16), else None."""
    m = re.search(r"\[code: (\d+)\]", text)
    return int(m.group(1)) if m else None


def for_output(text: str, stream) -> str:
    """``text`` as it should be written to ``stream``: colour codes only where it is a terminal.

    Flower colours the level of its log lines; the ServerApp log of a run (``flwr log``) keeps
    them as they were written. In a file, a pipe or the journal they are noise.

    Parameters
    ----------
    text : str
    stream : file-like or None
        Where ``text`` goes (``sys.stdout``); ``None`` counts as not a terminal.
    """
    from flower_compat.logging import for_terminal, plain

    isatty = getattr(stream, "isatty", None)
    return for_terminal(text) if callable(isatty) and isatty() else plain(text)


def _stream(cmd: list[str], env: dict[str, str], out) -> int:
    """Run ``cmd``, writing its stdout to ``out`` line by line as it comes (:func:`for_output`); its exit code.

    On a terminal the command writes to it directly (colours, progress as ``flwr`` draws it);
    its stderr is this process's either way.
    """
    isatty = getattr(out, "isatty", None)
    if callable(isatty) and isatty():
        return subprocess.call(cmd, env=env)
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, encoding="utf-8", errors="replace") as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                out.write(for_output(line, out))
                out.flush()
        except KeyboardInterrupt:  # Ctrl-C ends the follow, as it ends `flwr log --stream`
            proc.terminate()
        return proc.wait()


def _control_post(state_dir: Path, path: str, body: bytes, what: str, timeout: float = 10.0) -> bytes:
    """POST a serialised protobuf to the coordinator's Control API, in this process (no ``flwr`` start-up).

    Parameters
    ----------
    state_dir : Path
    path : str
        E.g. ``"/v1/control/list-runs"``.
    body : bytes
        The request (from :mod:`flower_compat.superlink`).
    what : str
        What is asked, for the error message (``"run 7: status"``).

    Returns
    -------
    bytes
        The response body (a serialised protobuf).

    Raises
    ------
    CliError
        Not reachable (code 3).
    """
    import ssl

    import httpx

    coord = _coordinator(state_dir)
    insecure = bool(coord.get("insecure"))
    if not insecure and not coord.get("ca"):
        raise CliError(f"{what} not available: no CA recorded in {state_dir / 'coordinator.json'}; "
                       "fix: restart `fl-server start` with this version", 3)
    try:
        verify = False if insecure else ssl.create_default_context(cafile=str(coord["ca"]))
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"{what} not available: CA {coord['ca']}: {exc}", 3) from None
    url = f"{'http' if insecure else 'https'}://{coord['address']}{path}"
    try:
        resp = httpx.post(url, content=body, headers={"content-type": "application/protobuf"}, verify=verify,
                          timeout=timeout)
        resp.raise_for_status()
    except httpx.HTTPStatusError as exc:
        raise CliError(f"{what} not available from {url} ({flower_message(exc.response.text, 300) or exc})", 3,
                       _answer_code(exc.response)) from None
    except httpx.HTTPError as exc:
        raise CliError(f"{what} not available from {url} ({type(exc).__name__}: {exc})", 3) from None
    return resp.content


def _answer_code(resp) -> int | None:
    """Flower's error code in a Control API error answer (``{"code": 16, "detail": ...}``), else None."""
    try:
        code = resp.json().get("code")
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def control_run_status(state_dir: Path, run_id: str, timeout: float = 10.0, shown: str | None = None) -> dict:
    """One run's Flower status from the coordinator's Control API, in this process (no ``flwr`` start-up).

    ``shown``: how the operator named the run (a folder name), for the message of an unknown run.

    Returns
    -------
    dict
        ``status`` as ``fl-server runs`` shows it (``pending``, ``starting``, ``running``,
        ``finished:completed|failed|stopped``) and ``details``.

    Raises
    ------
    CliError
        Not reachable (code 3), or no such run (code 2 when the coordinator says so, else 1).
    """
    from flower_compat.superlink import list_runs_request, list_runs_statuses

    run_id = check_flower_id(str(run_id), "run ID", FIX_RUN)
    try:
        content = _control_post(state_dir, "/v1/control/list-runs", list_runs_request(int(run_id)),
                                f"run {run_id}: status", timeout)
    except CliError as exc:
        raise (unknown_run(shown or run_id, run_id) if exc.flower_code == RUN_ID_NOT_FOUND else exc) from None
    for status, sub_status, details in list_runs_statuses(content):
        return {"status": f"{status}:{sub_status}" if status == "finished" else status, "details": details}
    raise CliError(f"run {run_id}: not known to the coordinator", 1)


def wait_run_started(state_dir: Path, run_id: str, timeout: float, on_status: Callable[[str], None] | None = None,
                     poll: float = 0.5) -> dict:
    """Poll a run's status until its ServerApp runs (or the run finished), at most ``timeout`` seconds.

    Returns
    -------
    dict
        The last status (:func:`control_run_status`); ``status`` is ``unknown`` (with the
        reason in ``details``) when it could not be read.
    """
    end = time.monotonic() + timeout
    while True:
        try:
            st = control_run_status(state_dir, run_id)
        except CliError as exc:
            return {"status": "unknown", "details": str(exc)}
        if on_status is not None:
            on_status(f"(status {st['status']})")
        if st["status"] == "running" or st["status"].startswith("finished") or time.monotonic() >= end:
            return st
        time.sleep(poll)
