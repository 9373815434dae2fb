"""``fl-server``: the coordinator operator's tool (typer + rich).

Wraps Flower 1.42's SuperLink and ``flwr`` CLI with this project's safe defaults:

* ``start``: SuperLink with TLS, node authentication, a persistent state DB, no runtime
  dependency installation, and the Control/Runtime guard (:mod:`server.guard`);
* ``register`` / ``unregister`` / ``nodes``: department node keys (``flwr supernode ...``);
* ``run`` / ``runs`` / ``logs`` / ``stop``: federated runs of this project's app
  (``flwr run`` / ``ls`` / ``log`` / ``stop``), artefacts in a run folder under ``--runs-dir``.

Everything lives under ``--state-dir`` (env ``CITYFED_STATE_DIR``, default
``~/.cityfed/coordinator``)::

    state.db              SuperLink state (runs, registered nodes); survives restarts
    superlink-home/       FLWR_HOME of the SuperLink (installed FABs)
    flwr-home/config.toml FLWR_HOME of the operator's ``flwr`` CLI: connection "cityfed"
    coordinator.json      what ``start`` was given (address, CA, admin networks)
    audit.jsonl(.head)    tamper-evident audit log (runs, node keys, stops, refusals; ``fl-server audit``)
    audit.key / audit.pub EC P-256 key signing it (0600, made on first use) / its public half
    serverapps.json       live ServerApp processes by run (written by ``start``, read by ``stop``)
    runs/<name>/          one folder per run: launch.json, run-config.toml, checkpoint.safetensors,
                          model.safetensors, results.json, report.html (+ metric.png, epsilon.png)

Exit codes: 0 ok, 1 the SuperLink or ``flwr`` reported a failure, 2 bad input (file,
option or run-config value), 3 the coordinator is not started / not reachable.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from privacy.safe_cli import make_console
from rich.markup import escape
from rich.table import Table

#: Name of the ``flwr`` connection written into ``$FLWR_HOME/config.toml``.
CONNECTION = "cityfed"
#: Default SuperLink port (all of Fleet, Control and Runtime in Flower 1.42).
DEFAULT_PORT = 9092
#: Project root (holds pyproject.toml with ``[tool.flwr.app]``): the app ``fl-server run`` ships.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

app = typer.Typer(
    name="fl-server",
    epilog="Errors print a message naming the file, field and fix, never a traceback (it could show records); add --debug anywhere on the command line for the full traceback.",
    help=(
        "Coordinator of the city's federated learning (Flower SuperLink + this project's ServerApp).\n\n"
        "Order: [bold]start[/] the coordinator (TLS + node auth + guarded control plane), "
        "[bold]register[/] each department's node.pub, then [bold]run[/] a training run and watch it with "
        "[bold]runs[/] / [bold]logs[/]; [bold]stop[/] ends one. Every command reads --state-dir "
        "(env CITYFED_STATE_DIR, default ~/.cityfed/coordinator) to find the coordinator.\n\n"
        "Exit codes: 0 ok, 1 Flower reported a failure, 2 bad input, 3 coordinator not started/reachable."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)


class CliError(Exception):
    """An operator-facing error: message names the file/option and the fix; ``code`` is the exit code.

    Attributes
    ----------
    code : int
        The exit status.
    flower_code : int or None
        Flower's error code (``[code: 16]``) when the error is Flower's answer.
    """

    def __init__(self, message: str, code: int = 2, flower_code: int | None = None):
        super().__init__(message)
        self.code = code
        self.flower_code = flower_code


#: Flower's error codes (``flwr.supercore.error.ApiErrorCode``) that mean a bad run or node ID.
RUN_ID_NOT_FOUND = 16
NODE_NOT_FOUND = 24
#: Largest run or node ID (Flower's are unsigned 64-bit integers).
MAX_FLOWER_ID = 2**64 - 1
#: The fix for a run that is not known (here or to Flower).
FIX_RUN = "use a folder name or run ID from `fl-server runs`"
#: The fix for a node ID that is not known to Flower.
FIX_NODE = "use a node ID from `fl-server nodes`"


def _command(name: str, hidden: bool = False) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def register(fn: Callable[..., None]) -> Callable[..., None]:
        paragraphs = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
        return app.command(name, help="\n\n".join(" ".join(p.split("\n")) for p in paragraphs), hidden=hidden)(fn)

    return register


def _out() -> Console:
    return make_console()


def _err() -> Console:
    return make_console(stderr=True)


def _print_rows(title: str, cols: tuple[str, ...], rows: list[dict], as_json: bool) -> None:
    """Print ``rows`` as JSON, or as a rich table of ``cols``."""
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title=title)
    cells = [[escape(str(r.get(col, ""))) for col in cols] for r in rows]
    for i, col in enumerate(cols):
        # IDs and run folders are what `unregister`, `logs` and `stop` take: never cut them,
        # however narrow the terminal (the other columns fold instead)
        whole = col.endswith("-id") or col == "folder"
        t.add_column(col, no_wrap=whole, overflow="fold",
                     min_width=max([len(col), *(len(c[i]) for c in cells)]) if whole else None)
    for c in cells:
        t.add_row(*c)
    _out().print(t)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except CliError as err:
        _err().print(f"[bold red]error:[/] {escape(str(err))}")
        raise typer.Exit(err.code) from None


# --------------------------------------------------------------------------- state dir


def default_state_dir() -> Path:
    """``$CITYFED_STATE_DIR`` or ``~/.cityfed/coordinator``."""
    return Path(os.environ.get("CITYFED_STATE_DIR") or Path.home() / ".cityfed" / "coordinator")


StateDir = Annotated[
    Optional[Path],
    typer.Option("--state-dir", help="Coordinator state folder (state.db, flwr homes, runs/). "
                 "Default: $CITYFED_STATE_DIR or ~/.cityfed/coordinator. Use the same one for every command."),
]
RunsDir = Annotated[
    Optional[Path],
    typer.Option("--runs-dir", help="Folder for run folders (model.safetensors, results.json, checkpoint.safetensors). "
                 "Default: <state-dir>/runs. Must be on the coordinator machine."),
]


def _state(state_dir: Path | None) -> Path:
    """The coordinator's state folder (``--state-dir``, else :func:`default_state_dir`), resolved.

    Exits 2 (after saying why) when it is a file or lies under one.
    """
    sd = Path(state_dir or default_state_dir()).expanduser().resolve()
    option = ("--state-dir" if state_dir else
              "--state-dir (from $CITYFED_STATE_DIR)" if os.environ.get("CITYFED_STATE_DIR") else "--state-dir (default)")
    with _errors():
        check_folder_option(sd, option)
    return sd


def check_folder_option(path: Path, option: str, must_exist: bool = False) -> Path:
    """Refuse a folder option that names a file, lies under a file, or (``must_exist``) does not exist.

    Parameters
    ----------
    path : Path
        The folder, resolved.
    option : str
        The option that gave it (``--state-dir``), for the message.
    must_exist : bool
        Refuse a folder that does not exist (a command that only reads it).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    CliError
        Code 2, naming the option, the path and the fix.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise CliError(f"{option} {path}: is a file, not a folder; fix: pass a folder (or move that file away)")
        return path
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise CliError(f"{option} {path}: cannot be a folder, {blocker} is a file; fix: pass a folder that is not "
                       "under a file")
    if must_exist:
        raise CliError(f"{option} {path}: no such folder; fix: pass the folder the runs were launched with "
                       "(`fl-server run --runs-dir`), or leave the option out for <state-dir>/runs")
    return path


def _audit_default_pub(log: Path) -> Path:
    """``audit.pub`` beside the log (its state dir), else the coordinator's state dir's."""
    beside = audit_paths(Path(log).expanduser().resolve().parent)[2]
    return beside if beside.is_file() else audit_paths(_state(None))[2]


def audit_paths(state_dir: Path) -> tuple[Path, Path, Path]:
    """``(audit.jsonl, audit.key, audit.pub)`` of the coordinator (see :mod:`privacy.audit`)."""
    return state_dir / "audit.jsonl", state_dir / "audit.key", state_dir / "audit.pub"


def record(state_dir: Path, kind: str, **fields) -> None:
    """Append a signed entry to the coordinator's audit log (key created on first use).

    Raises
    ------
    CliError
        When the entry cannot be written (code 1; an action already done stays done).
    """
    from privacy.audit import AuditError, AuditLog, ensure_signing_key

    log, key, pub = audit_paths(state_dir)
    try:
        AuditLog(log, key_path=ensure_signing_key(key, pub)).append(kind, **fields)
    except AuditError as exc:
        raise CliError(f"{kind!r} NOT recorded in the coordinator's audit log: {exc}", 1) from None


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
    path = state_dir / "coordinator.json"
    if not (cli_home(state_dir) / "config.toml").exists() or not path.exists():
        raise CliError(f"no coordinator set up in {state_dir} (missing {path}); fix: run `fl-server start "
                       f"--state-dir {shlex.quote(str(state_dir))} ...` first, or pass the --state-dir you started "
                       "it with", 3)
    return json.loads(path.read_text())


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
    from flower_compat.logging import plain

    isatty = getattr(stream, "isatty", None)
    return text if callable(isatty) and isatty() else plain(text)


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


# --------------------------------------------------------------------------- app config


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return repr(v)
    raise TypeError(f"unsupported run-config value {v!r}")


def app_config_toml() -> str:
    """The ``[tool.flwr.app.config]`` section: every RunSettings key with its default.

    ``department`` (required by RunSettings, no default) is listed as ``"health"`` so that
    ``--run-config`` may override it.
    """
    from server.app import DEFAULTS

    rows = [f"department = {_toml_value('health')}"] + [f"{k} = {_toml_value(v)}" for k, v in DEFAULTS.items()]
    return "[tool.flwr.app.config]\n" + "\n".join(rows) + "\n"


@_command("app-config")
def app_config_cmd() -> None:
    """Print the \\[tool.flwr.app.config] section for pyproject.toml (every run-config key and its default).

    Paste it over the section in pyproject.toml after adding a RunSettings field; the
    test suite fails while the two differ.
    """
    print(app_config_toml(), end="")


# --------------------------------------------------------------------------- start


def admin_networks(admin_net: list[str], host: str) -> list:
    """The networks ``fl-server start`` lets use the Control/Runtime APIs.

    Always loopback (``127.0.0.1/32``, ``::1/128``) and the address the other ``fl-server``
    commands on the coordinator dial (:func:`_admin_address`, when ``--host`` is an IP address),
    plus each ``--admin-net``: without them those commands would be refused (HTTP 403).

    Raises
    ------
    CliError
        An ``--admin-net`` item that is not an IP network (code 2).
    """
    import ipaddress

    from server.guard import DEFAULT_ADMIN_NETS, parse_networks

    try:
        given = parse_networks(admin_net)
    except ValueError as exc:
        raise CliError(f"--admin-net: {exc}; fix: pass a CIDR such as 10.20.0.0/16, or an IP address") from None
    own = list(DEFAULT_ADMIN_NETS)
    dialled = _admin_address(host, 1).rsplit(":", 1)[0].strip("[]")
    try:
        own.append(str(ipaddress.ip_network(dialled)))
    except ValueError:  # a host name: the commands dial it, its address is not known here
        pass
    return list(dict.fromkeys([*parse_networks(own), *given]))


def check_tls_key(cert: Path, key: Path) -> None:
    """Refuse a ``--key`` that is not the private key of ``--cert``.

    Raises
    ------
    CliError
        Code 2: not a PEM private key (e.g. a certificate), encrypted, or another key pair's.
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    from privacy.pki import _same_key

    fix = "pass the server.key that `fl-pki server-cert` wrote next to this --cert"
    try:
        private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    except TypeError:
        raise CliError(f"--key {key}: is encrypted; fix: {fix} (unencrypted, mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CliError(f"--key {key}: not a PEM private key (a certificate or public key?); fix: {fix}") from None
    public = x509.load_pem_x509_certificate(Path(cert).read_bytes()).public_key()
    if not _same_key(private.public_key(), public):
        raise CliError(f"--key {key}: does not belong to --cert {cert} (another key pair's private key); fix: {fix}, "
                       "or the certificate issued for this key")


#: ``fl-server start`` holds an exclusive lock on this file in the state dir (it holds the owner's PID).
LOCK_FILE = "fl-server.lock"


def _second_start(state_dir: Path, holder: str) -> CliError:
    return CliError(f"--state-dir {state_dir}: another `fl-server start` (pid {holder}) runs the coordinator of this "
                    f"state dir; a second one would run a second SuperLink on its state.db and take its "
                    f"coordinator.json; fix: use the running one (every fl-server command with --state-dir "
                    f"{shlex.quote(str(state_dir))} "
                    f"talks to it), stop it first (kill -TERM {holder}, or `systemctl stop` its unit), or give this "
                    "one another --state-dir")


def check_not_started(state_dir: Path) -> None:
    """Refuse when another ``fl-server start`` holds ``<state-dir>/fl-server.lock`` (nothing is written).

    Raises
    ------
    CliError
        Code 2, naming the other process's PID and the fix.
    """
    import fcntl

    try:
        fh = open(Path(state_dir) / LOCK_FILE)  # noqa: SIM115 - closed below
    except OSError:  # no lock file (or no state dir yet): nobody holds it
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _second_start(state_dir, fh.read().strip() or "?") from None


def take_start_lock(state_dir: Path):
    """Lock ``<state-dir>/fl-server.lock`` for this process (one ``fl-server start`` per state dir).

    The lock is released when the returned file is closed or this process ends (a killed
    ``fl-server start`` leaves no stale lock); the file holds this process's PID.

    Returns
    -------
    file object
        Keep it open as long as the coordinator runs.

    Raises
    ------
    CliError
        Code 2 when another ``fl-server start`` holds it.
    """
    from privacy.safe_cli import pid_lock

    fh, holder = pid_lock(Path(state_dir) / LOCK_FILE)
    if fh is None:
        raise _second_start(state_dir, holder)
    return fh


def check_port_free(host: str, port: int) -> None:
    """Refuse a ``--host``/``--port`` that cannot be listened on now (in use, or not an address of this machine).

    ``fl-server start`` and ``fl-server console`` both check their address with it.

    Raises
    ------
    CliError
        Code 2, naming the options and the fix (for the port in use: what to stop or change; for
        an address that is not this machine's or a name that does not resolve: --host).
    """
    import errno

    from server.console import bind_error

    exc = bind_error(host, port)
    if exc is None:
        return
    problem = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        fix = (f"stop what uses the port (e.g. another coordinator or console: `ss -ltnp 'sport = :{port}'` shows "
               "it), or choose another --port")
    elif exc.errno == errno.EACCES:
        fix = "choose a --port above 1023 (lower ones need root or CAP_NET_BIND_SERVICE)"
    else:  # EADDRNOTAVAIL, a name that does not resolve (socket.gaierror), ...
        fix = "pass an address of this machine as --host (`ip -brief address` lists them), or its host name"
    raise CliError(f"--host {host} --port {port}: cannot listen there ({problem}); fix: {fix}")


def _admin_address(host: str, port: int) -> str:
    h = "127.0.0.1" if host in ("0.0.0.0", "::", "", "localhost", "127.0.0.1") else host
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


def superlink_args(*, host: str, port: int, state_dir: Path, ca: Path | None, cert: Path | None, key: Path | None,
                   insecure: bool) -> list[str]:
    """``flower-superlink`` arguments for ``fl-server start`` (without the program name).

    TLS + ``--enable-supernode-auth`` unless ``insecure``; always ``--database
    <state-dir>/state.db`` and ``--disable-runtime-dependency-installation``.
    """
    args = ["--host", host, "--port", str(port), "--database", str(state_dir / "state.db"),
            "--disable-runtime-dependency-installation"]
    if insecure:
        args.append("--insecure")
    else:
        args += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                 "--enable-supernode-auth"]
    return args


# --------------------------------------------------------------------------- supervision (start)

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
    return min(first * 2 ** max(n - 1, 0), cap)


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
        self.state_dir = Path(state_dir)
        self.health_url = health_url
        self.max_restarts, self.max_resumes = max_restarts, max_resumes
        self.backoff, self.backoff_max, self.stable_s, self.poll_s = backoff, backoff_max, stable_s, poll_s
        self.settle_s = settle_s
        self.health_every_s, self.health_timeout_s, self.health_failures = health_every_s, health_timeout_s, health_failures
        self.stop_grace_s, self.exit_grace_s = stop_grace_s, exit_grace_s
        self.console = console or _err()
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
        path = self.state_dir / SERVERAPPS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)

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


def _checkpoint_round(folder: Path) -> int:
    """Rounds completed according to ``folder/checkpoint.safetensors`` (0 without one)."""
    from server.artefacts import CHECKPOINT

    ckpt = Path(folder) / CHECKPOINT
    if not ckpt.exists():
        return 0
    from server.strategy import load_checkpoint

    try:
        return int(load_checkpoint(ckpt)["round"])
    except Exception:  # noqa: BLE001 - a damaged checkpoint: the resume will say so
        return 0


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


# --------------------------------------------------------------------------- run results


def _app_defaults() -> dict:
    """The shipped app's run-config defaults (``[tool.flwr.app.config]`` of the project)."""
    try:
        return dict(tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return {}


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename (never a half-written file)."""
    from server.artefacts import write_atomic

    write_atomic(Path(path), text.encode())


def write_run_results(folder: Path, status: str, flwr_run_id: str, *, written_by: str) -> dict:
    """Write ``results.json``, ``model.safetensors`` and ``report.html`` for a run the ServerApp did not finish.

    For a run stopped by the operator (``fl-server stop``) or one whose ServerApp failed:
    the rounds completed so far come from the run's checkpoint (its history: per-round
    metrics, refusals, excluded replies), ``model.safetensors`` is the last completed round's model.

    Parameters
    ----------
    folder : Path
        The run folder (``launch.json``, ``checkpoint.safetensors``).
    status : str
        The run's own status, e.g. ``stopped by operator`` or ``failed: ...``.
    flwr_run_id : str
        The Flower run that ended (the folder's logical ``run_id`` stays the first one's).
    written_by : str
        Which command wrote it (recorded in the file).

    Returns
    -------
    dict
        What was written to ``results.json``.
    """
    folder = Path(folder)
    launch = read_launch(folder / "launch.json")  # ValueError: malformed (the callers say so)
    from server.artefacts import CHECKPOINT, MODEL, require_no_legacy_checkpoint, save_model

    require_no_legacy_checkpoint(folder)  # an earlier version's pickle is never unpickled
    ckpt = folder / CHECKPOINT
    saved = None
    if ckpt.exists():
        from server.strategy import load_checkpoint

        saved = load_checkpoint(ckpt)
    history = dict(saved["history"]) if saved else {"rounds": [], "excluded": [], "refused": []}
    done = int(saved["round"]) if saved else 0
    history["rounds"] = [e for e in history.get("rounds", []) if int(e.get("round", 0)) <= done]
    out = {"run_id": str((saved or {}).get("run_id") or (launch.get("run-ids") or [flwr_run_id])[0]), "status": status,
           "config": {**_app_defaults(), **launch.get("config", {})}, "job": None, "seconds": None, **history,
           "rounds-completed": done, "flwr-run-id": str(flwr_run_id), "written-by": written_by,
           "written-at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    from server.energy import summarise as energy_summary

    out["energy"] = energy_summary(out)  # per node and for the run, as the nodes reported it
    if saved:
        save_model(folder / MODEL, saved["arrays"], metadata={"run-id": out["run_id"]})
    _write_atomic(folder / "results.json", json.dumps(out, indent=2, default=float))
    from server.report import write_run_report

    write_run_report(folder)
    return out


def run_result(folder: Path, launch: dict, run_id: str, status: str) -> str:
    """The run's own outcome for ``fl-server runs``: ``results.json``'s status where it belongs to ``run_id``.

    ``resumed as run N`` for a Flower run that a later one continued, ``""`` while the run
    is not finished, ``no results.json`` for a finished run without one.
    """
    ids = [str(r) for r in launch.get("run-ids", [])]
    if run_id in ids and run_id != ids[-1]:
        return f"resumed as run {ids[ids.index(run_id) + 1]}"
    if not str(status).startswith("finished"):
        return ""
    path = Path(folder) / "results.json"
    try:
        data = json.loads(path.read_text())
        written = path.stat().st_mtime
    except (OSError, ValueError):
        return "no results.json"
    launched = launch.get("launched") or []
    if launched and written < datetime.fromisoformat(launched[-1]).timestamp() - 2:
        return "no results.json (only an earlier launch's)"
    return str(data.get("status", "?"))


def check_tls_files(ca: Path | None, cert: Path | None, key: Path | None, host: str,
                    port: int) -> tuple[Path, Path, Path]:
    """``fl-server start``'s TLS checks: all three given and readable, --cert signed by --ca and
    covering the address the local commands dial, --key its private key.

    Returns
    -------
    tuple of Path
        ``(ca, cert, key)``, resolved.

    Raises
    ------
    CliError
        Code 2, naming the option and the fix.
    """
    missing = [f for f, v in (("--ca", ca), ("--cert", cert), ("--key", key)) if v is None]
    if missing:
        raise CliError(f"refusing to start without TLS: {', '.join(missing)} not given; fix: create them with "
                       "`fl-pki init` and `fl-pki server-cert`, then pass --ca ca.crt --cert server.crt --key "
                       "server.key (or --insecure for a throwaway local test only)")
    ca, cert, key = (Path(p).expanduser().resolve() for p in (ca, cert, key))
    for flag, p in (("--ca", ca), ("--cert", cert), ("--key", key)):
        if not p.is_file() or not os.access(p, os.R_OK):
            raise CliError(f"{flag} {p}: file missing or unreadable; fix: pass the file from `fl-pki` "
                           "(check the path and permissions)")
    from privacy import pki

    try:
        pki.verify_server_cert(ca, cert)
    except pki.PKIError as exc:
        raise CliError(f"--cert: {exc}") from None
    admin = _admin_address(host, port).rsplit(":", 1)[0].strip("[]")
    try:
        pki.verify_server_cert(ca, cert, admin)
    except pki.PKIError:
        raise CliError(f"--cert {cert} does not cover {admin}: the fl-server commands on this machine (register, "
                       f"run, nodes, stop) dial {admin} and would fail TLS. Fix: reissue it with `fl-pki "
                       f"server-cert ... --san {shlex.quote(admin)}` next to the names departments dial") from None
    check_tls_key(cert, key)
    return ca, cert, key


@_command("start")
def start_cmd(
    ca: Annotated[Optional[Path], typer.Option("--ca", help="City CA certificate (ca.crt from `fl-pki init`).")] = None,
    cert: Annotated[Optional[Path], typer.Option("--cert", help="Coordinator TLS certificate (server.crt from `fl-pki server-cert`); its SANs must cover the name departments dial and 127.0.0.1.")] = None,
    key: Annotated[Optional[Path], typer.Option("--key", help="Coordinator TLS private key (server.key, mode 0600, never copied elsewhere).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. 0.0.0.0 = every interface (departments connect from other machines); 127.0.0.1 = this machine only.")] = "0.0.0.0",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port for the Fleet API (departments) and the guarded Control/Runtime APIs (operator). Open it to department machines only.")] = DEFAULT_PORT,
    state_dir: StateDir = None,
    admin_net: Annotated[list[str], typer.Option("--admin-net", help="CIDR allowed to use the Control/Runtime APIs (launch runs, register nodes), in addition to loopback (127.0.0.1/32 and ::1/128, and the --host address when it is an IP), which is always allowed: the other fl-server commands on the coordinator dial it. Repeatable; default loopback only, i.e. run fl-server commands on the coordinator itself or through an SSH tunnel. Never list department networks.")] = [],  # noqa: B006
    insecure: Annotated[bool, typer.Option("--insecure", help="Plaintext HTTP without TLS and WITHOUT node authentication: anyone on the network can join or read models. Only for a throwaway local test.")] = False,
    max_restarts: Annotated[int, typer.Option("--max-restarts", min=0, help="Restarts in a row of a SuperExec that exited (it starts every run's ServerApp) before fl-server start gives up and exits 1 (one that ran 5 minutes resets the count).")] = 5,
    max_resumes: Annotated[int, typer.Option("--max-resumes", min=0, help="Automatic resumes (from the last checkpoint, as `fl-server run --resume`) of one run whose ServerApp process died mid-run; 0 = never. A ServerApp that raised an exception is never resumed automatically.")] = 3,
    backoff: Annotated[float, typer.Option("--backoff", min=0.0, help="First wait before a SuperExec restart or an automatic resume, seconds; doubles each time.")] = 2.0,
    backoff_max: Annotated[float, typer.Option("--backoff-max", min=0.0, help="Longest wait between restarts or resumes, seconds.")] = 60.0,
) -> None:
    """Run the coordinator (Flower SuperLink) in the foreground until Ctrl-C / SIGTERM.

    Serves departments over TLS with node authentication (only keys added with `fl-server
    register` can join), keeps runs and registered nodes in <state-dir>/state.db (a restart
    with the same --state-dir resumes them), never installs packages at run time, and
    refuses Control/Runtime calls (launching runs, registering nodes) from any address
    outside loopback and --admin-net with HTTP 403. Also writes the `flwr` connection
    "cityfed" used by the other fl-server commands. Refuses to start without
    --ca/--cert/--key unless --insecure is given, with a --key that is not --cert's, on a
    port in use, and while another `fl-server start` runs on the same --state-dir (it
    names its PID): exit 2, nothing written.

    Supervises Flower's processes: a SuperExec that exits is restarted with backoff (exit 1
    after --max-restarts in a row), a run whose ServerApp process died mid-run is resumed
    from its checkpoint (at most --max-resumes times), a hung SuperLink ends it with exit 1;
    each action is logged with its reason.
    """
    from server.guard import guard_installed_in_superlink, install_guard

    sd = _state(state_dir)
    with _errors():
        nets = admin_networks(admin_net, host)
        if insecure:
            if any([ca, cert, key]):
                raise CliError("--insecure cannot be combined with --ca/--cert/--key; fix: drop --insecure (recommended)")
            _err().print("[bold red on white] WARNING [/][bold red] --insecure: NO TLS and NO node authentication. Any machine "
                         "that reaches this port can join the federation, receive the model and send updates. "
                         "Never use this outside a throwaway local test.[/]")
        else:
            ca, cert, key = check_tls_files(ca, cert, key, host, port)
        check_not_started(sd)  # before the port: a second start on this state dir names the running one
        check_port_free(host, port)
        sd.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = take_start_lock(sd)  # held until this process ends
        superlink_home(sd).mkdir(parents=True, exist_ok=True, mode=0o700)
        address = _admin_address(host, port)
        write_connection(sd, address, ca, insecure)
        _write_atomic(sd / "coordinator.json", json.dumps({
            "address": address, "host": host, "port": port, "ca": str(ca) if ca else None, "insecure": insecure,
            "admin-nets": [str(n) for n in nets], "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2))
        install_guard(nets)
        if not guard_installed_in_superlink():
            raise CliError("the control-plane guard could not be installed in this Flower version (needs flwr 1.42's "
                           "superlink extensions hook); refusing to start an unguarded coordinator", 1)
        record(sd, "start", argv=list(sys.argv), address=address, insecure=insecure, **{"admin-nets": [str(n) for n in nets]})
    # the SuperExec and ServerApp processes inherit these (Flower starts them with Popen and this environment)
    from privacy.audit import ENV_KEY, ENV_LOG

    audit_log, audit_key, _ = audit_paths(sd)
    os.environ[ENV_LOG], os.environ[ENV_KEY] = str(audit_log), str(audit_key)
    os.environ["FLWR_HOME"] = str(superlink_home(sd))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    c = _err()
    c.print(f"[green]cityfed coordinator[/] on {host}:{port} ({'PLAINTEXT' if insecure else 'TLS + node auth'}); "
            f"control plane only from {', '.join(map(str, nets))}; state {sd}")
    from flower_compat.logging import timestamped_logs
    from flower_compat.superlink import flower_superlink

    timestamped_logs()  # Flower prints times only at DEBUG; operators need them
    sys.argv = ["flower-superlink", *superlink_args(host=host, port=port, state_dir=sd, ca=ca, cert=cert, key=key,
                                                    insecure=insecure)]
    sup = CoordinatorSupervisor(sd, health_url=f"{'http' if insecure else 'https'}://{address}/health",
                                max_restarts=max_restarts, max_resumes=max_resumes, backoff=backoff,
                                backoff_max=backoff_max, console=c)
    with _errors():
        install_supervisor(sup)
    # uvicorn shuts the SuperLink down on SIGTERM/SIGINT, then re-raises the signal into these
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_stop)
    stopped = None
    try:
        flower_superlink()
    except _StopRequested as req:
        stopped = req.signum
    finally:
        sup.detach()
        lock.close()
    if sup.fatal:
        _err().print(f"[bold red]error:[/] {escape(sup.fatal)}")
        raise typer.Exit(1)
    if stopped is None:
        _err().print("[bold red]error:[/] the SuperLink stopped serving without a stop request (see the lines above); "
                     "fix: correct what they name, then start fl-server again (under systemd, Restart=on-failure does it)")
        raise typer.Exit(1)
    c.print(f"fl-server start: coordinator stopped ({signal.Signals(stopped).name})")


# --------------------------------------------------------------------------- nodes


def _node_labels(state_dir: Path) -> dict:
    """Names and fingerprints recorded by ``fl-server register`` (Flower's list does not show them)."""
    path = state_dir / "nodes.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


#: What Flower 1.42's SuperLink answers a RegisterNode of a key it already holds ([code: 23]).
KEY_IN_USE = "Public key already in use"


def registered_nodes_by_key(state_dir: Path) -> list[dict]:
    """Every node the coordinator lists (unregistered ones too), each with its key's ``fingerprint``.

    Flower's ``flwr supernode ls --format json`` leaves the public key out; its Control API's
    ``ListNodes`` (what that command sends) carries it, so this asks that API directly
    (:mod:`flower_compat.superlink`). ``fingerprint`` is the OpenSSH ``SHA256:...`` form that
    ``fl-pki show`` prints (empty when Flower holds no readable key for the node).

    Raises
    ------
    CliError
        When the coordinator cannot be asked (code 3).
    """
    from cryptography.hazmat.primitives import serialization

    from flower_compat.superlink import list_nodes_keys, list_nodes_request
    from privacy import pki

    nodes = []
    for node in list_nodes_keys(_control_post(state_dir, "/v1/control/list-nodes", list_nodes_request(),
                                              "the registered nodes")):
        try:
            node["fingerprint"] = pki.ssh_fingerprint(serialization.load_pem_public_key(node["public-key"]))
        except (ValueError, TypeError):
            node["fingerprint"] = ""
        nodes.append(node)
    return nodes


def _node_of_key_in_use(state_dir: Path, public_key: Path, info) -> dict:
    """The node the SuperLink holds ``public_key`` for, after it answered "Public key already in use".

    Matches the key itself (its fingerprint), never a name or label: another key's node is never
    taken for this one.

    Raises
    ------
    CliError
        The key's node was unregistered (Flower never admits that key again), or the key is not
        among the nodes this operator can list (code 1); the message names the key file and the fix.
    """
    path = Path(public_key).expanduser().resolve()
    parts = info.comment.split(":")
    # the key's own department and site, quoted for a shell (a site may hold spaces: "VA Long Beach");
    # placeholders stay as they are when the key's comment is not fl-pki's
    dept, site = ((shlex.quote(parts[1]), shlex.quote(parts[2])) if len(parts) == 3 and parts[0] == "cityfed"
                  else ("<department>", "<site>"))
    new_key = (f"on the department's machine create a new key with `fl-pki node-key --department {dept} --site {site} "
               f"--out <its key folder> --force`, then register the new node.pub here with `fl-server register <new node.pub>`")
    mine = [n for n in registered_nodes_by_key(state_dir) if n["fingerprint"] == info.fingerprint]
    live = [n for n in mine if n["status"] != "unregistered"]
    if len(live) == 1:
        return live[0]
    if mine and not live:
        n = mine[-1]
        raise CliError(f"{path} ({info.fingerprint}) was registered as node {n['node-id']} and that node was "
                       f"unregistered ({n['unregistered-at'] or 'time unknown'}); Flower never registers an "
                       f"unregistered key again ([code: 23] {KEY_IN_USE}); fix: {new_key}", 1)
    raise CliError(f"{path} ({info.fingerprint}) is already registered at the coordinator ([code: 23] {KEY_IN_USE}), "
                   "but not as one node among those this operator can list (`fl-server nodes`), so its node ID is not "
                   f"known here; fix: ask whoever registered it to `fl-server unregister` that node, or {new_key}", 1)


@_command("register")
def register_cmd(
    public_key: Annotated[Path, typer.Argument(help="The department's node.pub (from `fl-pki node-key` on the department machine). Never node.key.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Label shown by `fl-server nodes`; default department-site from the key's comment.")] = None,
    state_dir: StateDir = None,
) -> None:
    """Allow a department node to join: register its public key with the coordinator.

    Prints the node ID (needed for `fl-server unregister`). Until a key is registered, a
    node using it is refused at connection time (HTTP 412, nothing is exchanged).
    Registering a key the coordinator already holds (e.g. after an interrupted register)
    prints that key's node ID and records it (exit 0); a key that was unregistered cannot
    be registered again (the error says how to make a new one).
    """
    from privacy import pki

    sd = _state(state_dir)
    with _errors():
        try:
            info = pki.load_public_key(public_key)
        except pki.PKIError as exc:
            raise CliError(str(exc)) from None
        if not info.key_type.startswith("ecdsa-sha2-nistp"):
            raise CliError(f"{public_key}: {info.key_type} key; Flower needs an ECDSA NIST-curve key; fix: create it "
                           "with `fl-pki node-key`")
        if name is None and info.comment.startswith("cityfed:"):
            name = "-".join(info.comment.split(":")[1:])
        args = ["supernode", "register", str(Path(public_key).expanduser().resolve()), CONNECTION]
        if name:
            args += ["--name", re.sub(r"[^A-Za-z0-9._-]", "-", name)]
        try:
            node_id, already = str(flwr(sd, *args, json_out=True).get("node-id")), None
        except CliError as exc:
            if KEY_IN_USE.lower() not in str(exc).lower():
                raise
            already = _node_of_key_in_use(sd, public_key, info)
            node_id = already["node-id"]
    labels = _node_labels(sd)
    labels[node_id] = {"name": name or "", "fingerprint": info.fingerprint, "public-key": str(Path(public_key).resolve())}
    (sd / "nodes.json").write_text(json.dumps(labels, indent=2))
    with _errors():
        record(sd, "register", **{"node-id": node_id, "public-key": str(Path(public_key).resolve())}, name=name or "",
               fingerprint=info.fingerprint, **({"already-registered": True} if already else {}))
    if already:
        _out().print(f"[green]already registered[/] {escape(str(public_key))} ({info.fingerprint}) is node "
                     f"[bold]{node_id}[/] (status {escape(already['status'])}, registered at {escape(already['registered-at'])}); "
                     f"recorded in {escape(str(sd / 'nodes.json'))}")
    else:
        _out().print(f"[green]registered[/] {escape(str(public_key))} ({info.fingerprint}) as node [bold]{node_id}[/]")
    print(node_id)


@_command("unregister")
def unregister_cmd(
    node_id: Annotated[str, typer.Argument(help="Node ID shown by `fl-server register` or `fl-server nodes`.")],
    state_dir: StateDir = None,
) -> None:
    """Remove a department node: its key can no longer connect (a connected node is dropped).

    Use it when a department leaves, or when its node.key may have leaked (then register
    the new node.pub it generates).
    """
    sd = _state(state_dir)
    with _errors():
        node_id = check_flower_id(node_id, "node ID", FIX_NODE)
        try:
            flwr(sd, "supernode", "unregister", node_id, CONNECTION, json_out=True)
        except CliError as exc:
            if exc.flower_code != NODE_NOT_FOUND:
                raise
            raise CliError(f"node ID {node_id}: not registered at this coordinator ([code: {NODE_NOT_FOUND}] Node ID "
                           f"not found); fix: {FIX_NODE}") from None
        label = _node_labels(sd).get(str(node_id), {})
        record(sd, "unregister", **{"node-id": str(node_id)}, name=label.get("name", ""),
               fingerprint=label.get("fingerprint", "unknown (not registered with fl-server register)"))
    _out().print(f"[green]unregistered[/] node {node_id}")


def list_nodes(state_dir: Path) -> list[dict]:
    """Registered department nodes: Flower's ``supernode ls`` records plus the name and fingerprint
    ``register`` recorded (what ``fl-server nodes`` and ``fl-server console`` show).

    Raises
    ------
    CliError
        When the coordinator cannot be asked (see :func:`flwr`).
    """
    nodes = flwr(state_dir, "supernode", "ls", CONNECTION, json_out=True).get("nodes", [])
    labels = _node_labels(state_dir)
    for n in nodes:
        n.update({k: v for k, v in labels.get(str(n.get("node-id")), {}).items() if k in ("name", "fingerprint")})
    return nodes


@_command("nodes")
def nodes_cmd(
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print Flower's JSON instead of a table.")] = False,
) -> None:
    """List registered department nodes with their status (online/offline/unregistered)."""
    sd = _state(state_dir)
    with _errors():
        nodes = list_nodes(sd)
    _print_rows("department nodes", ("node-id", "name", "status", "online-at", "offline-at", "fingerprint"), nodes,
                as_json)


# --------------------------------------------------------------------------- runs


def _parse_value(raw: str):
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # bare words (fedprox, /abs/path) are strings


def parse_run_config(items: list[str]) -> dict:
    """Parse ``k=v`` items; values are TOML (``3``, ``0.5``, ``true``, ``"x"``) or a bare string.

    Raises
    ------
    CliError
        For an item without ``=`` or without a key, and for a key given twice (code 2).
    """
    out, given = {}, {}
    for item in items:
        if "=" not in item:
            raise CliError(f"-c/--run-config {item!r}: expected key=value; fix: e.g. -c local-epochs=2")
        k, v = (part.strip() for part in item.split("=", 1))
        if not k:
            raise CliError(f"-c/--run-config {item!r}: the item has no key (nothing before '='); fix: -c key=value, "
                           "e.g. -c local-epochs=2 (`fl-server app-config` lists every key)")
        if k in out:
            raise CliError(f"-c/--run-config: key {k!r} given twice ({given[k]!r} and {item!r}); fix: give each "
                           "run-config key once")
        out[k], given[k] = _parse_value(v), item
    return out


#: Run-config keys ``fl-server run`` sets itself -> what to use instead.
SET_BY_RUN = {"run-dir": "--name (and --runs-dir): the run folder is <runs-dir>/<name>",
              "resume": "--resume RUN to continue a run"}
#: Run-config keys that an option of ``fl-server run`` sets -> that option.
OPTION_KEYS = {"department": "--department", "num-rounds": "--rounds", "secagg": "--secagg/--no-secagg",
               "secagg-num-shares": "--secagg-num-shares", "secagg-threshold": "--secagg-threshold"}


def _same_value(a, b) -> bool:
    return type(a) is type(b) and a == b  # true is not 1


def explicit_options(department, rounds, secagg, num_shares, threshold) -> dict[str, tuple[str, object]]:
    """``{run-config key: (the option as given, its value)}`` for the options of ``fl-server run`` that were given."""
    given = {"department": (f"--department {department}", department),
             "num-rounds": (f"--rounds {rounds}", rounds),
             "secagg": ("--secagg" if secagg else "--no-secagg", secagg),
             "secagg-num-shares": (f"--secagg-num-shares {num_shares}", num_shares),
             "secagg-threshold": (f"--secagg-threshold {threshold}", threshold)}
    return {k: v for k, v in given.items() if v[1] is not None}


def check_overrides(overrides: dict, explicit: dict[str, tuple[str, object]]) -> None:
    """Refuse ``-c`` keys ``fl-server run`` sets itself, and ``-c`` values that contradict an option given.

    Raises
    ------
    CliError
        Code 2, naming the ``-c`` item, the option and the fix.
    """
    for key, instead in SET_BY_RUN.items():
        if key in overrides:
            raise CliError(f"-c {key}={_toml_value_or_text(overrides[key])}: `fl-server run` sets {key!r} itself; "
                           f"fix: drop it, and use {instead}")
    for key, (option, value) in explicit.items():
        if key in overrides and not _same_value(overrides[key], value):
            raise CliError(f"{option} and -c {key}={_toml_value_or_text(overrides[key])} disagree; fix: give "
                           f"{OPTION_KEYS[key]} only (drop the -c item)")


def _toml_value_or_text(v) -> str:
    try:
        return _toml_value(v).strip('"') if isinstance(v, str) else _toml_value(v)
    except TypeError:
        return str(v)


def check_app_keys(cfg: dict, app_dir: Path) -> None:
    """Refuse run-config keys that the app's ``[tool.flwr.app.config]`` lacks: Flower would refuse the run.

    Node-side keys (``data``, ``policy`` ...) are the department nodes' own (``fl-client``), never
    taken from the coordinator's run config.

    Raises
    ------
    CliError
        Code 2: ``--app`` has no readable pyproject.toml, or a key it does not declare.
    """
    from contract.keys import NODE_KEYS

    path = Path(app_dir) / "pyproject.toml"
    try:
        known = tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        raise CliError(f"--app {app_dir}: no readable pyproject.toml with [tool.flwr.app.config]; fix: pass the cityfed "
                       "project folder") from None
    for key in cfg:
        if key in NODE_KEYS:
            raise CliError(f"-c {key}={_toml_value_or_text(cfg[key])}: {key!r} is a department node's own setting "
                           "(fl-client's node config), never taken from the coordinator's run config; fix: drop it "
                           "(set it on each node's fl-client)")
        if key not in known:
            raise CliError(f"-c {key}={_toml_value_or_text(cfg[key])}: {key!r} is not a run-config key of the app in "
                           f"--app {app_dir} (its [tool.flwr.app.config]), so Flower would refuse the run; fix: drop "
                           "it, or pass the cityfed project folder as --app")


def _runs_dir(state_dir: Path, runs_dir: Path | None, must_exist: bool = False) -> Path:
    """``--runs-dir``, else ``<state-dir>/runs``, resolved and checked (:func:`check_folder_option`).

    ``must_exist``: a ``--runs-dir`` given explicitly must exist (commands that only read it);
    the default one may not exist yet (no run launched).

    Raises
    ------
    CliError
        Code 2, naming ``--runs-dir``.
    """
    path = Path(runs_dir or state_dir / "runs").expanduser().resolve()
    option = "--runs-dir" if runs_dir else "--runs-dir (default <state-dir>/runs)"
    return check_folder_option(path, option, must_exist=must_exist and runs_dir is not None)


def _is_run_id(value) -> bool:
    """A Flower run ID as launch.json holds it: an int, or a string of digits, within 64 bits."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return False
    text = str(value)
    return re.fullmatch(r"[0-9]+", text) is not None and int(text) <= MAX_FLOWER_ID


def read_launch(path: Path) -> dict:
    """A run folder's ``launch.json`` (what ``fl-server run`` wrote), its shape checked.

    Returns
    -------
    dict
        With ``run-ids`` (list of Flower run IDs, first to latest) and ``config`` (dict) always present.

    Raises
    ------
    ValueError
        Saying what is wrong: unreadable, not JSON (e.g. truncated), not an object, ``run-ids``
        not a list of run IDs, ``config`` not an object, ``launched`` not a list of ISO times.
    """
    try:
        d = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno}; truncated?)") from None
    if not isinstance(d, dict):
        raise ValueError(f"a JSON {type(d).__name__} where an object is expected")
    d.setdefault("run-ids", [])
    d.setdefault("config", {})
    if not isinstance(d["run-ids"], list) or not all(_is_run_id(r) for r in d["run-ids"]):
        raise ValueError(f"'run-ids' must be a list of Flower run IDs (got {json.dumps(d['run-ids'])[:80]})")
    if not isinstance(d["config"], dict):
        raise ValueError(f"'config' must be an object of run-config keys (got {json.dumps(d['config'])[:80]})")
    launched = d.get("launched", [])
    if not isinstance(launched, list) or not all(isinstance(t, str) for t in launched):
        raise ValueError(f"'launched' must be a list of ISO 8601 times (got {json.dumps(launched)[:80]})")
    try:
        [datetime.fromisoformat(t) for t in launched]
    except ValueError:
        raise ValueError(f"'launched' must be a list of ISO 8601 times (got {json.dumps(launched)[:80]})") from None
    return d


#: ``(path, mtime, size)`` of the malformed launch.json files already warned about (once each).
_WARNED_LAUNCHES: set[tuple[str, int, int]] = set()
#: What ``fl-server runs`` and the console show for a run folder whose launch.json is malformed.
UNREADABLE = "unreadable launch.json"


def _warn_launch_once(path: Path, reason: str) -> None:
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        key = (str(path), 0, 0)
    if key in _WARNED_LAUNCHES:
        return
    _WARNED_LAUNCHES.add(key)
    _err().print(f"[yellow]warning:[/] {escape(str(path))}: {UNREADABLE} ({escape(reason)}); its run folder matches "
                 "no run (listed as unreadable). Fix: restore it (it holds the folder's Flower run IDs and settings), "
                 "or move the folder out of the runs folder")


def _launches(runs: Path) -> list[dict]:
    """Every run folder's launch record under ``runs`` (with ``folder``), by folder name.

    A malformed ``launch.json`` (:func:`read_launch`) is warned about once and listed as
    ``{"folder", "run-ids": [], "config": {}, "unreadable": reason}``: it matches no run.
    """
    out = []
    for f in sorted(runs.glob("*/launch.json")):
        try:
            d = read_launch(f)
        except ValueError as exc:
            _warn_launch_once(f, str(exc))
            d = {"run-ids": [], "config": {}, "unreadable": str(exc)}
        d["folder"] = f.parent.name
        out.append(d)
    return out


def resolve_run(runs: Path, run: str) -> dict:
    """Find a run's launch record by folder name, folder path, or Flower run ID.

    Raises
    ------
    CliError
        If no run folder under ``runs`` matches, or its launch.json is malformed (code 2).
    """
    p = Path(run).expanduser()
    folder = p if p.is_absolute() else runs / run
    if (folder / "launch.json").is_file():
        try:
            d = read_launch(folder / "launch.json")
        except ValueError as exc:
            raise CliError(f"{folder / 'launch.json'}: {UNREADABLE} ({exc}); fix: restore it (it holds the run's "
                           "Flower run IDs and settings), or use a Flower run ID from `fl-server runs`") from None
        d["folder"] = folder.name
        return d
    for d in _launches(runs):
        if run in [str(r) for r in d.get("run-ids", [])]:
            return d
    raise CliError(f"no run {run!r} under {runs}; fix: {FIX_RUN}")


def check_flower_id(value: str, what: str, fix: str) -> str:
    """Refuse a run or node ID that is not a whole number from 0 to 2**64 - 1 (Flower's IDs).

    Returns
    -------
    str
        ``value`` without leading zeros.

    Raises
    ------
    CliError
        Code 2, naming the value and ``fix``.
    """
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]+", text) or int(text) > MAX_FLOWER_ID:
        raise CliError(f"{what} {value!r}: not a Flower {what.split()[0]} ID (a whole number from 0 to "
                       f"{MAX_FLOWER_ID}); fix: {fix}")
    return str(int(text))


def _flwr_run_id(runs: Path, run: str) -> str:
    """The Flower run ID of ``run`` (a run folder name or path, or a Flower run ID).

    Raises
    ------
    CliError
        Code 2: no such run folder, a malformed launch.json, or digits outside Flower's 64 bits.
    """
    if re.fullmatch(r"[0-9]+", run) and not (runs / run / "launch.json").exists():
        return check_flower_id(run, "run ID", FIX_RUN)
    rec = resolve_run(runs, run)
    if not rec["run-ids"]:
        raise CliError(f"run folder {rec['folder']} has no Flower run ID in its launch.json; fix: {FIX_RUN}")
    return str(rec["run-ids"][-1])


def unknown_run(run: str, rid: str) -> CliError:
    """The error for a run ID the coordinator does not know (Flower's ``[code: 16]``)."""
    shown = f"run {run!r}" + (f" (Flower run {rid})" if str(run) != str(rid) else "")
    return CliError(f"{shown}: not known to the coordinator ([code: {RUN_ID_NOT_FOUND}] Run ID not found); fix: "
                    f"{FIX_RUN}", 2)


def secagg_config(cfg: dict, secagg: bool | None, num_shares: int | None, threshold: int | None) -> dict:
    """The SecAgg+ run-config keys ``fl-server run`` sets.

    SecAgg+ is on by default: ``secagg = true`` unless ``--no-secagg`` is given or the
    run config (``-c secagg=false``, or a resumed run's stored config) already says so;
    an explicit ``--secagg/--no-secagg`` wins over a resumed run's stored config (a ``-c``
    item that contradicts it is refused before: :func:`check_overrides`). ``--secagg-num-shares``
    and ``--secagg-threshold`` are passed through as ``secagg-num-shares`` /
    ``secagg-threshold``.
    """
    out = {"secagg": cfg.get("secagg", True) if secagg is None else secagg}
    if num_shares is not None:
        out["secagg-num-shares"] = num_shares
    if threshold is not None:
        out["secagg-threshold"] = threshold
    return out


def secagg_banner(cfg: dict) -> str:
    """One line saying which aggregation mode a (validated) run uses."""
    if cfg.get("secagg"):
        shares, threshold = int(cfg["secagg-num-shares"]), int(cfg["secagg-threshold"])
        least = max(3, int(cfg.get("min-accepted", 1)))  # server.secagg.MIN_SECAGG_NODES
        return (f"[bold green]secure aggregation ON[/] (SecAgg+, {shares} shares, threshold {threshold}: the coordinator "
                f"only sees the mean update of >= {least} nodes per round; tolerates {shares - threshold} dropped "
                f"node(s) per neighbourhood of {shares} in any stage while >= {least} nodes still contribute: with "
                f"exactly {least} nodes a dropout before the unmask stage ends the run cleanly, so run >= {least + 1} "
                f"nodes to train through one)")
    return ("[bold yellow]secure aggregation OFF[/] (--no-secagg): the coordinator receives each node's updated "
            "weights individually")


class _Phases:
    """Progress of a multi-step command on stderr (stdout stays for results: ``run`` prints the run ID last).

    Each step is a timestamped line (elapsed seconds since the command started); on a
    terminal a spinner also shows the current step and its live status.
    """

    def __init__(self, console: Console):
        self.console = console
        self.t0 = time.monotonic()
        self.text = ""
        self._status = None

    def __enter__(self) -> "_Phases":
        if self.console.is_terminal:
            self._status = self.console.status("")
            self._status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)
            self._status = None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def step(self, text: str) -> None:
        """Start a step: one line ``[  12.3 s] text ...``."""
        self.text = text
        self.console.print(f"[dim][{self.elapsed():6.1f} s][/] {escape(text)} ...")
        self.update("")

    def update(self, detail: str) -> None:
        """Live detail of the current step (spinner only: no line per poll)."""
        if self._status is not None:
            self._status.update(f"{escape(self.text)} {escape(detail)} ({self.elapsed():.0f} s)")


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


@_command("run")
def run_cmd(
    department: Annotated[Optional[str], typer.Option("--department", help="Department whose nodes train: health, traffic or utility (nodes of other departments refuse the job).")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", min=1, help="Federated rounds (run-config num-rounds; default 5).")] = None,
    run_config: Annotated[list[str], typer.Option("--run-config", "-c", help="Override a run setting, key=value, repeatable: e.g. -c strategy=fedprox -c target-epsilon=2.0 -c min-nodes=3. `fl-server app-config` lists every key and default.")] = [],  # noqa: B006
    name: Annotated[Optional[str], typer.Option("--name", help="Run folder name under --runs-dir (default <department>-<UTC time>).")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Continue an interrupted run (e.g. after a coordinator crash) from its checkpoint: give its folder name or run ID. Same settings, same folder; the completed rounds are not repeated.")] = None,
    runs_dir: RunsDir = None,
    app_dir: Annotated[Path, typer.Option("--app", help="Project folder whose ServerApp/ClientApp is shipped (the FAB is built from it; use a clean checkout).")] = PROJECT_ROOT,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the run's log until it ends.")] = False,
    secagg: Annotated[Optional[bool], typer.Option("--secagg/--no-secagg", show_default=False, help="Secure aggregation (Flower SecAgg+), ON by default: the coordinator only learns the weighted mean of the nodes' updates, never one node's update. Needs fedavg, fedadam or fedyogi and at least 3 nodes per round. --no-secagg sends each node's updated weights to the coordinator in the clear (TLS still protects them on the wire); use it only for strategies that need individual updates (krum, trimmed-mean, fedprox). A resumed run keeps its mode unless given.")] = None,
    secagg_num_shares: Annotated[Optional[int], typer.Option("--secagg-num-shares", min=3, help="SecAgg+: shares of each node's secrets = neighbours + 1 (odd; run config secagg-num-shares, default 3).")] = None,
    secagg_threshold: Annotated[Optional[int], typer.Option("--secagg-threshold", min=2, help="SecAgg+: shares needed to unmask (< num-shares; run config secagg-threshold, default 2). A round survives num-shares - threshold dropped nodes per neighbourhood.")] = None,
    wait_start: Annotated[float, typer.Option("--wait-start", min=0.0, help="Seconds to wait, after submitting, for the run's ServerApp to start running (progress on stderr); 0 = return once submitted. A run still pending then is reported, not cancelled.")] = 60.0,
    state_dir: StateDir = None,
) -> None:
    """Launch a federated training run of this project's app on the registered nodes.

    Secure aggregation (SecAgg+) is on unless --no-secagg is given: the coordinator then
    only sees the mean update of at least 3 nodes. Works offline (nothing is installed:
    both sides use their own environment). The run's artefacts (checkpoint.safetensors every
    round, model.safetensors, results.json, report.html) land in <runs-dir>/<name>/ on the coordinator.
    Shows each launch step on stderr (checking the config, building and submitting the app
    bundle, waiting for the run to start) and prints the run ID as the last line of stdout;
    follow it with `fl-server logs RUN` and `fl-server runs`.
    """
    sd = _state(state_dir)
    started = None
    with _Phases(_err()) as phases, _errors():
        phases.step("checking the run config")
        runs = _runs_dir(sd, runs_dir)
        overrides = parse_run_config(run_config)
        explicit = explicit_options(department, rounds, secagg, secagg_num_shares, secagg_threshold)
        check_overrides(overrides, explicit)
        if resume:
            rec, folder, cfg = _resumed_run(runs, resume, department, overrides)
        else:
            rec, folder, cfg = _new_run(runs, department, name, overrides)
        if rounds is not None:
            cfg["num-rounds"] = rounds
        cfg.update(secagg_config(cfg, secagg, secagg_num_shares, secagg_threshold))
        cfg["run-dir"] = str(folder)
        checked = _checked_settings(cfg, explicit)
        check_app_keys(cfg, app_dir)
        if resume:
            done, planned = _checkpoint_round(folder), int(checked["num-rounds"])
            if done >= planned:
                raise CliError(f"run {resume} already completed all {planned} rounds (its checkpoint is after round "
                               f"{done}); nothing to resume. Fix: continue it with more rounds (--resume "
                               f"{shlex.quote(str(resume))} "
                               f"--rounds {done + 1} or more), or start a new run")
        _coordinator(sd)  # after the run config: a bad one is exit 2 whether or not the coordinator is up
        phases.step(f"building the app bundle from {Path(app_dir).resolve()} and submitting it to the coordinator (flwr run)")
        cfg_text = "".join(f"{k} = {_toml_value(v)}\n" for k, v in cfg.items())
        data = _submit(sd, app_dir, cfg_text)
        folder.mkdir(parents=True, exist_ok=True)  # only now: a refused submission leaves no folder behind
        _write_atomic(folder / "run-config.toml", cfg_text)
        run_id = str(data.get("run-id"))
        stored = {k: v for k, v in cfg.items() if k != "resume"}
        if data.get("fab-hash"):  # the app bundle this launch ran: model cards (fl-server export) cite it
            rec["fab-hash"] = str(data["fab-hash"])
        rec.update({"config": stored, "run-ids": [*rec.get("run-ids", []), run_id],
                    "launched": [*rec.get("launched", []), datetime.now(timezone.utc).isoformat(timespec="seconds")]})
        rec.pop("folder", None)
        _write_atomic(folder / "launch.json", json.dumps(rec, indent=2))
        record(sd, "run", argv=list(sys.argv), **{"run-id": run_id}, department=cfg["department"], folder=str(folder),
               resumed=bool(resume), config=stored)
        if wait_start > 0:
            phases.step(f"run {run_id} submitted (app bundle {data.get('fab-hash', '?')}); waiting for the coordinator "
                        "to start its ServerApp")
            started = wait_run_started(sd, run_id, wait_start, on_status=phases.update)
    _out().print(secagg_banner(checked))
    _out().print(f"[green]{'resumed' if resume else 'launched'}[/] run [bold]{run_id}[/] "
                 f"({cfg['department']}, {cfg.get('num-rounds', 5)} rounds) -> {escape(str(folder))}")
    failed = _report_start(run_id, started, wait_start, phases.elapsed())
    print(run_id)
    if failed:
        raise typer.Exit(1)
    if follow:
        raise typer.Exit(flwr(sd, "log", str(run_id), CONNECTION, "--stream", stream=True))


#: A run folder name (``--name``): what ``fl-server run`` accepts.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _departments() -> tuple[str, ...]:
    from typing import get_args

    from server.app import RunSettings

    return get_args(RunSettings.model_fields["department"].annotation)


def _new_run(runs: Path, department: str | None, name: str | None, overrides: dict) -> tuple[dict, Path, dict]:
    """``(launch record, folder, run config)`` of a new run; refuses a missing department or a bad --name."""
    depts = _departments()
    if not department:
        given = f" (not -c department={overrides['department']})" if "department" in overrides else ""
        raise CliError(f"--department is required; fix: --department {'|'.join(depts)}{given}")
    if department not in depts:
        raise CliError(f"--department {department!r}: not a department; fix: --department {'|'.join(depts)}")
    folder_name = name or f"{department}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    if not RUN_NAME.fullmatch(folder_name):
        shown = folder_name if len(folder_name) <= 60 else f"{folder_name[:57]}... ({len(folder_name)} characters)"
        raise CliError(f"--name {shown!r}: a run folder name is 1 to 100 characters, letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit; fix: choose such a name (e.g. health-trial-2)")
    folder = runs / folder_name
    if (folder / "launch.json").exists():
        raise CliError(f"run folder {folder} exists; fix: choose another --name, or --resume {shlex.quote(folder_name)}")
    if folder.exists() and not folder.is_dir():
        raise CliError(f"--name {folder_name}: {folder} is a file; fix: choose another --name")
    return {"run-ids": []}, folder, {"department": department, **overrides}


def _resumed_run(runs: Path, resume: str, department: str | None, overrides: dict) -> tuple[dict, Path, dict]:
    """``(launch record, folder, run config)`` of a run to resume; refuses another department."""
    rec = resolve_run(runs, resume)
    stored = rec["config"].get("department")
    for option, value in (("--department", department), ("-c department", overrides.get("department"))):
        if value is not None and value != stored:
            shown = f"{option} {value}" if option.startswith("--") else f"{option}={value}"
            raise CliError(f"{shown} but run {resume} is a {stored} run (a resumed run keeps its department); "
                           f"fix: drop {option}")
    return rec, runs / rec["folder"], {**rec["config"], **overrides, "resume": True}


def _checked_settings(cfg: dict, explicit: dict[str, tuple[str, object]]) -> dict:
    """:func:`server.app.settings` of ``cfg``; a refusal is exit 2 naming the key, the option or -c item, and the fix."""
    from server.app import RunConfigError, settings

    try:
        return settings(cfg)
    except RunConfigError as exc:
        msg = str(exc)
        if cfg.get("secagg") is True and "'secagg' = true" in msg:
            msg += (f" (secure aggregation is on by default in `fl-server run`: strategy {cfg.get('strategy')!r} "
                    "needs each node's individual update; fix: -c strategy=fedavg, or --no-secagg to send "
                    "individual updates to the coordinator)")
        elif "fix:" not in msg:
            options = [explicit[k][0].split()[0] for k in exc.keys if k in explicit]
            fix = (f"give {' and '.join(dict.fromkeys(options))} a value the message allows" if options else
                   f"-c {exc.keys[0]}=<a value the message allows>" if exc.keys else
                   "change the run-config keys the message names (-c KEY=VALUE)")
            msg += f"; fix: {fix} (`fl-server app-config` lists every key and its default)"
        raise CliError(msg) from None


def _submit(state_dir: Path, app_dir: Path, cfg_text: str) -> dict:
    """``flwr run`` of the app in ``app_dir`` with the run config ``cfg_text`` (a temporary TOML file); its answer."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fl-server-run-") as tmp:
        cfg_file = Path(tmp) / "run-config.toml"
        cfg_file.write_text(cfg_text)
        return flwr(state_dir, "run", str(Path(app_dir).resolve()), CONNECTION, "--run-config", str(cfg_file),
                    json_out=True)


def _report_start(run_id: str, started: dict | None, waited: float, elapsed: float) -> bool:
    """Say on stderr how the launch ended; True when the run already failed."""
    err = _err()
    if started is None:
        err.print(f"submitted in {elapsed:.1f} s (not waiting for it to start: --wait-start 0)")
        return False
    status, details = started["status"], started.get("details", "")
    if status == "running":
        err.print(f"[green]run {run_id} is running[/] ({elapsed:.1f} s after `fl-server run` started)")
    elif status == "finished:failed":
        err.print(f"[bold red]error:[/] run {run_id} failed as it started: {escape(details or 'no details')}; "
                  f"fix: read `fl-server logs {run_id}`")
        return True
    elif status.startswith("finished"):
        err.print(f"run {run_id} already ended ({status}{': ' + escape(details) if details else ''}); see `fl-server runs`")
    elif status == "unknown":
        err.print(f"[yellow]note:[/] could not check that run {run_id} started: {escape(details)}")
    else:
        err.print(f"[yellow]warning:[/] run {run_id} is still {status} after {waited:g} s: the coordinator has not "
                  "started its ServerApp yet. Fix: check the `fl-server start` log (it restarts a SuperExec that "
                  "died and says why); the run starts as soon as it can")
    return False


def list_runs(state_dir: Path, runs: Path) -> list[dict]:
    """Flower's run records (``flwr ls``) with each run's ``folder`` under ``runs`` and its ``result``
    (:func:`run_result`): what ``fl-server runs`` and ``fl-server console`` show.

    Raises
    ------
    CliError
        When the coordinator cannot be asked (see :func:`flwr`).
    """
    data = flwr(state_dir, "ls", CONNECTION, json_out=True)
    records = _launches(runs)
    launches = {str(r): d for d in records for r in d.get("run-ids", [])}
    out = data.get("runs", [])
    for r in out:
        d = launches.get(str(r.get("run-id")))
        r["folder"] = d["folder"] if d else ""
        r["result"] = run_result(runs / d["folder"], d, str(r.get("run-id")), str(r.get("status", ""))) if d else ""
    # a folder whose launch.json is malformed matches no run: listed on its own, so that it is seen
    out += [{"run-id": "", "status": "", "result": f"{UNREADABLE}: {d['unreadable']}", "folder": d["folder"]}
            for d in records if d.get("unreadable")]
    return out


@_command("runs")
def runs_cmd(
    state_dir: StateDir = None,
    runs_dir: RunsDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (Flower's run records + the run folder).")] = False,
) -> None:
    """List runs: Flower run ID, status, result, elapsed time and run folder.

    status is Flower's (pending/starting/running/finished:completed|failed|stopped): whether
    the ServerApp process ended cleanly. result is the run's own outcome from its
    results.json (completed; stopped: too few updates ...; stopped by operator; failed: ...),
    or "resumed as run N" for a run continued by a later one; empty while it runs.
    """
    sd = _state(state_dir)
    with _errors():
        runs = list_runs(sd, _runs_dir(sd, runs_dir, must_exist=True))
    if not as_json:
        runs = [{**r, "elapsed": f"{r['elapsed']:.0f} s"} if isinstance(r.get("elapsed"), (int, float)) else r
                for r in runs]
    _print_rows("runs", ("run-id", "status", "result", "elapsed", "pending-at", "finished-at", "folder"), runs, as_json)


@_command("logs")
def logs_cmd(
    run: Annotated[str, typer.Argument(help="Run ID or run folder name (from `fl-server runs`).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the run ends.")] = False,
    state_dir: StateDir = None,
    runs_dir: RunsDir = None,
) -> None:
    """Print the ServerApp log of a run (round progress, refusals, errors)."""
    sd = _state(state_dir)
    with _errors():
        rid = _flwr_run_id(_runs_dir(sd, runs_dir, must_exist=True), run)
        if follow:
            _refuse_unknown_run(sd, rid, run)  # here, not in the box Flower would stream
            raise typer.Exit(flwr(sd, "log", rid, CONNECTION, "--stream", stream=True))
        try:
            text = flwr(sd, "log", rid, CONNECTION, "--show", timeout=60)
        except CliError as exc:
            raise (unknown_run(run, rid) if exc.flower_code == RUN_ID_NOT_FOUND else exc) from None
        print(for_output(text, sys.stdout))


def _refuse_unknown_run(state_dir: Path, rid: str, run: str) -> None:
    """Refuse (code 2) a run ID the coordinator says it does not know; any other answer, or none, lets the caller go on."""
    try:
        control_run_status(state_dir, rid, shown=run)
    except CliError as exc:
        if exc.code == 2:
            raise


def stop_run(state_dir: Path, runs: Path, run: str, **audit_fields) -> str:
    """Stop a run (``flwr stop``) and record the stop in the coordinator's audit log.

    ``fl-server stop`` and the console's stop button both call it; the results of the stopped
    run are written afterwards by :func:`_stopped_results`.

    Parameters
    ----------
    state_dir, runs : Path
        The coordinator's state folder and its runs folder.
    run : str
        Run ID or run folder name.
    **audit_fields
        Extra fields of the audit entry (e.g. ``via="console"``).

    Returns
    -------
    str
        The Flower run ID that was stopped.

    Raises
    ------
    CliError
        Unknown run (here or to the coordinator: code 2), or ``flwr stop`` failed.
    """
    rid = _flwr_run_id(runs, run)
    try:
        flwr(state_dir, "stop", rid, CONNECTION, json_out=True)
    except CliError as exc:
        if exc.flower_code == RUN_ID_NOT_FOUND:
            raise unknown_run(run, rid) from None
        try:
            status = control_run_status(state_dir, rid)["status"]
        except CliError:
            status = ""
        if status.startswith("finished"):
            raise CliError(f"run {run} (Flower run {rid}) has already finished ({status}); nothing to stop. Its results: "
                           "`fl-server runs`, and results.json in its run folder", 2) from None
        raise
    record(state_dir, "stop", argv=list(sys.argv), **{"run-id": rid}, **audit_fields)
    return rid


@_command("stop")
def stop_cmd(
    run: Annotated[str, typer.Argument(help="Run ID or run folder name (from `fl-server runs`).")],
    state_dir: StateDir = None,
    runs_dir: RunsDir = None,
    wait: Annotated[float, typer.Option("--wait", min=0.0, help="Seconds to wait for the run's ServerApp to exit (so that its last checkpoint is final) before results.json is written.")] = 60.0,
) -> None:
    """Stop a run now (status finished:stopped) and leave its results in its folder.

    Once the run's ServerApp has exited, writes results.json (status "stopped by operator",
    the rounds completed so far from the run's checkpoint), model.safetensors (the last completed
    round's model) and report.html, like a run that ends by itself. `fl-server run
    --resume RUN` continues it later from that checkpoint.
    """
    sd = _state(state_dir)
    with _errors():
        rid = stop_run(sd, _runs_dir(sd, runs_dir, must_exist=True), run)
    _out().print(f"[green]stopped[/] run {rid}")
    _stopped_results(sd, _runs_dir(sd, runs_dir), rid, wait)


def _stopped_results(state_dir: Path, runs: Path, run_id: str, wait: float) -> None:
    """``fl-server stop``'s second half: wait for the ServerApp, then results.json, model.safetensors, report.html."""
    rec = next((d for d in _launches(runs) if run_id in [str(r) for r in d.get("run-ids", [])]), None)
    if rec is None:
        _err().print(f"[yellow]note:[/] run {run_id} has no run folder under {escape(str(runs))} (not launched with "
                     "`fl-server run`, or pass its --runs-dir): no results.json written")
        return
    folder = runs / rec["folder"]
    ids = [str(r) for r in rec.get("run-ids", [])]
    if run_id != ids[-1]:
        _err().print(f"[yellow]note:[/] run {run_id} was resumed as run {ids[ids.index(run_id) + 1]}; "
                     f"{escape(str(folder))} is left as it is")
        return
    with _err().status(f"waiting for the ServerApp of run {run_id} to exit (up to {wait:g} s)"):
        exited = wait_serverapp_exit(state_dir, run_id, wait)
    if not exited:
        _err().print(f"[yellow]warning:[/] the ServerApp of run {run_id} is still running after {wait:g} s; "
                     "results.json is written from its checkpoint as it is now")
    with _errors():
        try:
            out = write_run_results(folder, "stopped by operator", run_id, written_by="fl-server stop")
        except Exception as exc:  # noqa: BLE001 - the run is stopped; say what is missing and why
            raise CliError(f"run {run_id} is stopped, but its results could not be written in {folder} "
                           f"({type(exc).__name__}: {exc}); its checkpoint.safetensors is kept: `fl-server run --resume "
                           f"{shlex.quote(str(rec['folder']))}` continues it", 1) from None
    _out().print(f"results.json: stopped by operator after {out['rounds-completed']} completed round(s) -> "
                 f"{escape(str(folder / 'results.json'))}; report: {escape(str(folder / 'report.html'))}")


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


def wait_for_run(state_dir: Path, run_id: str, timeout: float, poll: float = 1.0) -> dict:
    """Poll ``flwr ls --run-id`` until the run is finished; return its record.

    Raises
    ------
    CliError
        On timeout (code 1).
    """
    end = time.monotonic() + timeout
    while True:
        data = flwr(state_dir, "ls", CONNECTION, "--run-id", str(run_id), json_out=True)
        runs = data.get("runs", [])
        if runs and str(runs[0].get("status", "")).startswith("finished"):
            return runs[0]
        if time.monotonic() > end:
            raise CliError(f"run {run_id} not finished after {timeout:.0f} s (status {runs[0].get('status') if runs else '?'})", 1)
        time.sleep(poll)


@_command("console")
def console_cmd(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Default 127.0.0.1 (this machine only); any other address needs --allow-remote, --certfile and --keyfile.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8090,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a non-loopback --host (the admin network only); HTTPS (--certfile/--keyfile) is then required.")] = False,
    certfile: Annotated[Optional[Path], typer.Option("--certfile", help="TLS certificate (PEM) for HTTPS, e.g. the coordinator's from `fl-pki`.")] = None,
    keyfile: Annotated[Optional[Path], typer.Option("--keyfile", help="TLS private key (PEM) of --certfile.")] = None,
    refresh: Annotated[int, typer.Option("--refresh", min=0, help="Seconds between page reloads while a run is live (0 = never).")] = 10,
    state_dir: StateDir = None,
    runs_dir: RunsDir = None,
) -> None:
    """Serve the operator console: a web page of nodes, runs, the audit log, reports; stop a run.

    Reads what `nodes`, `runs`, `logs` and `audit` read (the coordinator and the run folders)
    and shows epsilon as the nodes reported it. Every page needs the admin token in
    <state-dir>/console.token (made on first use, mode 0600): open the login URL printed at
    start. Listens on 127.0.0.1 unless --allow-remote is given with HTTPS. See README:
    operator console.
    """
    from server.console import serve

    sd = _state(state_dir)
    with _errors():
        serve(sd, _runs_dir(sd, runs_dir, must_exist=True), host=host, port=port, allow_remote=allow_remote,
              certfile=certfile, keyfile=keyfile, refresh=refresh)


def _mount_audit() -> None:
    from privacy.audit_cli import make_audit_app

    app.add_typer(make_audit_app("coordinator", lambda: audit_paths(_state(None))[0], _audit_default_pub), name="audit")


_mount_audit()


from serving.commands import server_export as _server_export  # noqa: E402  (fl-server export: serving/commands.py)

_command("export")(_server_export)


def main() -> None:
    """Console entry point ``fl-server``."""
    from privacy.safe_cli import run_app

    from flower_compat import self_test

    # the Flower internals fl-server relies on: checked first
    seams = ("superlink", "grid", "secagg", "dp", "logging", "strategy-state")
    run_app(app, "fl-server", startup=lambda: self_test(seams))  # errors: a message, never a traceback (--debug shows it)


if __name__ == "__main__":
    # `python -m server.cli`: this file runs as __main__, a second copy of server.cli. The modules it
    # calls (server.console, serving.commands) raise server.cli.CliError, which this copy's _errors()
    # would not catch (exit 1 instead of the error's code): run the importable module's main instead.
    from server.cli import main as _main

    _main()
