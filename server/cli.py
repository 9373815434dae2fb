"""``fl-server``: the coordinator operator's tool (typer + rich).

Wraps Flower 1.42's SuperLink and ``flwr`` CLI with this project's safe defaults:

* ``start``: SuperLink with TLS, node authentication, a persistent state DB, no runtime
  dependency installation, and the Control/Runtime guard (:mod:`server.guard`);
* ``register`` / ``unregister`` / ``nodes``: department node keys (``flwr supernode ...``);
* ``run`` / ``runs`` / ``logs`` / ``stop``: federated runs of this project's app
  (``flwr run`` / ``ls`` / ``log`` / ``stop``), artefacts in a run folder under ``--runs-dir``.

This module holds the typer app, its commands and their glue; the work is done by
:mod:`server.errors` (:class:`CliError`, Flower IDs), :mod:`server.flwr_calls` (the ``flwr`` CLI
and the Control API), :mod:`server.launches` (run folders and their results),
:mod:`server.run_config` (``fl-server run``'s run config), :mod:`server.start_checks`
(``fl-server start``'s checks) and :mod:`server.supervisor` (the SuperExec and ServerApps kept
going by ``fl-server start``).

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

import contextlib
import functools
import inspect
import json
import math
import os
import re
import shlex
import signal
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from contract.text_files import printable
from privacy.safe_cli import finite_seconds, make_console
from rich.markup import escape
from rich.table import Table

# fl-server's parts, one job each. Every name they define is re-exported here (tests, server.console,
# server.console_pages and serving.commands use them as server.cli.<name>); a test patches a name in the
# module that looks it up: here for what the commands below call, else the module that defines it.
from server.errors import (  # noqa: F401
    FIX_NODE, FIX_RUN, MAX_FLOWER_ID, NODE_NOT_FOUND, RUN_ID_NOT_FOUND, CliError, check_flower_id, unknown_run,
)
from server.flwr_calls import (  # noqa: F401
    CONNECTION, _answer_code, _bin, cli_home, _control_post, control_run_status, _coordinator, _env, flower_code,
    flower_message, flwr, for_output, _stream, superlink_home, wait_run_started, write_connection,
)
from server.launches import (  # noqa: F401
    extended_dp_run_warning,
    PROJECT_ROOT, UNREADABLE, _WARNED_LAUNCHES, _app_defaults, _checkpoint_round, _flwr_run_id, _is_run_id,
    _launches, read_launch, resolve_run, run_result, _warn_launch_once, _write_atomic, write_run_results,
)
from server.run_config import (  # noqa: F401
    OPTION_KEYS, RUN_NAME, SET_BY_RUN, app_config_toml, check_app_defaults, check_app_keys, check_central_data, check_overrides, check_resumed_config, _checked_settings,
    _departments, explicit_options, _new_run, parse_run_config, _parse_value, _resumed_run, _same_value,
    secagg_banner, secagg_config, _toml_value, _toml_value_or_text,
)
from server.start_checks import (  # noqa: F401
    LOCK_FILE, _admin_address, admin_networks, check_host, check_not_started, check_port_free, check_tls_files, check_tls_key,
    _second_start, superlink_args, take_start_lock,
)
from server.supervisor import (  # noqa: F401
    SERVERAPP_COMMAND, SERVERAPPS_FILE, CoordinatorSupervisor, _ServerApp, _StopRequested, _backoff, describe_exit,
    install_supervisor, proc_children, proc_cmdline, proc_stat, _raise_stop, _returncode, _stop_requested,
    supervision_hook_available, wait_serverapp_exit, _watch_stop_requests,
)

#: Default SuperLink port (all of Fleet, Control and Runtime in Flower 1.42).
DEFAULT_PORT = 9092

app = typer.Typer(
    suggest_commands=False,  # click says "Did you mean ...?" itself (typer repeated it)
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


#: Commands that only ask the running coordinator (through the ``flwr`` CLI) or read files, and that
#: operators and scripts call in watch loops: they pass the version gate and load no Flower internals.
#: Every other command self-tests :data:`SEAMS` first (:func:`check_seams`).
QUICK_COMMANDS = frozenset({"runs", "nodes", "logs", "app-config"})


def _command(name: str, hidden: bool = False) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def register(fn: Callable[..., None]) -> Callable[..., None]:
        paragraphs = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
        command = fn
        if name not in QUICK_COMMANDS:
            @functools.wraps(fn)  # typer reads the options from the wrapped signature
            def command(*args, **kwargs):
                check_seams()
                return fn(*args, **kwargs)

        return app.command(name, help="\n\n".join(" ".join(p.split("\n")) for p in paragraphs), hidden=hidden)(command)

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
    # a value with a control character (a label recorded before register checked it) is shown escaped, never raw
    cells = [[escape(_cell_text(r.get(col, ""))) for col in cols] for r in rows]
    for i, col in enumerate(cols):
        # IDs and run folders are what `unregister`, `logs` and `stop` take: never cut them,
        # however narrow the terminal (the other columns fold instead)
        whole = col.endswith("-id") or col == "folder"
        t.add_column(col, no_wrap=whole, overflow="fold",
                     min_width=max([len(col), *(len(c[i]) for c in cells)]) if whole else None)
    for c in cells:
        t.add_row(*c)
    _out().print(t)


def _cell_text(value) -> str:
    """``str(value)`` for a table cell; one holding a non-printable character (ESC, newline) is shown escaped."""
    text = str(value)
    return text if text.isprintable() else _printable_repr(text)[1:-1]


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except CliError as err:
        _err().print(f"[bold red]error:[/] {escape(str(err))}")
        raise typer.Exit(err.code) from None


#: The Flower internals fl-server's coordinator relies on (its SuperLink guard and supervisor, and the
#: ServerApp it starts): self-tested by every command but :data:`QUICK_COMMANDS` (:func:`check_seams`).
SEAMS = ("superlink", "grid", "secagg", "dp", "logging", "strategy-state")


def check_seams() -> None:
    """Self-test :data:`SEAMS` (:func:`flower_compat.self_test`): first thing in every command but :data:`QUICK_COMMANDS`.

    Every command passes the version gate at start-up (:func:`main`); the others (``start``,
    ``run``, ``stop``, ``register``, ``console``, ...) also load Flower's internals (or launch a
    ServerApp that does), so a Flower whose internals differ fails there, naming the seam and the
    fix, instead of deep in a run. The quick ones only ask the running coordinator or read files,
    and answer without importing Flower.

    Raises
    ------
    flower_compat.CompatError
        Naming each seam whose Flower names are missing (``run_app`` prints it; exit 1).
    """
    from flower_compat import self_test

    self_test(SEAMS)


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


# --------------------------------------------------------------------------- app config


@_command("app-config")
def app_config_cmd() -> None:
    """Print the \\[tool.flwr.app.config] section for pyproject.toml (every run-config key and its default).

    Paste it over the section in pyproject.toml after adding a RunSettings field; the
    test suite fails while the two differ.
    """
    print(app_config_toml(), end="")


# --------------------------------------------------------------------------- start


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
    backoff: Annotated[float, typer.Option("--backoff", min=0.0, callback=finite_seconds("--backoff", 2, 3600), help="First wait before a SuperExec restart or an automatic resume, seconds (finite, >= 0); doubles each time; at most 3600.")] = 2.0,
    backoff_max: Annotated[float, typer.Option("--backoff-max", min=0.0, callback=finite_seconds("--backoff-max", 60, 86400), help="Longest wait between restarts or resumes, seconds (finite, >= 0); at most 86400.")] = 60.0,
) -> None:
    """Run the coordinator (Flower SuperLink) in the foreground until Ctrl-C / SIGTERM.

    Serves departments over TLS with node authentication (only keys added with `fl-server
    register` can join), keeps runs and registered nodes in <state-dir>/state.db (a restart
    with the same --state-dir resumes them), never installs packages at run time, and
    refuses Control/Runtime calls (launching runs, registering nodes) from any address
    outside loopback and --admin-net with HTTP 403. Also writes the `flwr` connection
    "cityfed" used by the other fl-server commands. Refuses to start without
    --ca/--cert/--key unless --insecure is given, with a --key that is not --cert's, on a
    port in use, while another `fl-server start` runs on the same --state-dir (it
    names its PID), and with a bad CITYFED_GRID_POLL_S: exit 2, nothing written.

    Supervises Flower's processes: a SuperExec that exits is restarted with backoff (exit 1
    after --max-restarts in a row), a run whose ServerApp process died mid-run is resumed
    from its checkpoint (at most --max-resumes times), a hung SuperLink ends it with exit 1;
    each action is logged with its reason.
    """
    from server.guard import guard_installed_in_superlink, install_guard

    sd = _state(state_dir)
    with _errors():
        from server.grid import poll_interval_from_env

        poll_interval_from_env()  # the ServerApp processes inherit it: a bad value is refused before anything starts
        check_host(host)  # first: the TLS and port checks would blame the certificate or the network
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


#: Longest node label (``register --name``): a department, '-' and a site name of up to 100 characters fit.
MAX_NODE_LABEL = 120


def shown_label(label: str, limit: int = 60) -> str:
    """A node label for a message or a table: quoted, control characters escaped, cut to ``limit`` characters.

    Parameters
    ----------
    label : str
        The label (as given or as recorded in nodes.json, which may predate the checks).
    limit : int
        Longest part shown; a longer label is cut and its length given.

    Returns
    -------
    str
        ``repr`` of the label (or of its first ``limit`` characters), never holding a raw control character.
    """
    text = str(label)
    if len(text) <= limit:
        return _printable_repr(text)
    return f"{_printable_repr(text[:limit])}... ({len(text)} characters)"


def _printable_repr(text: str) -> str:
    """``repr(text)`` with every non-printable character escaped (``repr`` keeps some, e.g. U+202E)."""
    return printable(repr(text))


def check_node_label(label: str, option: str = "--name") -> str:
    """Refuse a node label (``fl-server register --name``) that cannot be stored and printed safely.

    A label is 1 to :data:`MAX_NODE_LABEL` printable characters (spaces and letters of any
    language are fine), not only spaces: no control character (ESC, newline, tab ...), no
    other non-printable character (bidirectional overrides, line separators).

    Parameters
    ----------
    label : str
        The label.
    option : str
        Where it came from, for the message (``--name``, or the key comment it defaults to).

    Returns
    -------
    str
        ``label``, unchanged.

    Raises
    ------
    CliError
        Code 2, naming the option, the label (escaped and cut) and the fix.
    """
    fix = "fix: pass --name with letters, digits, spaces, '.', '_' or '-', e.g. --name health-Cleveland"
    if not label.strip():
        raise CliError(f"{option} {shown_label(label)}: empty; {fix}")
    if len(label) > MAX_NODE_LABEL:
        raise CliError(f"{option} {shown_label(label)}: more than {MAX_NODE_LABEL} characters; {fix}")
    bad = next((c for c in label if not c.isprintable()), None)
    if bad is not None:
        kind = "a control character" if unicodedata.category(bad) == "Cc" else "a non-printable character"
        raise CliError(f"{option} {shown_label(label)}: holds {kind} ({bad.encode('unicode_escape').decode('ascii')}), "
                       f"which would be written raw to the terminal of `fl-server nodes`; {fix}")
    return label


@_command("register")
def register_cmd(
    public_key: Annotated[Path, typer.Argument(help="The department's node.pub (from `fl-pki node-key` on the department machine). Never node.key.")],
    name: Annotated[Optional[str], typer.Option("--name", help=f"Label shown by `fl-server nodes`: 1 to {MAX_NODE_LABEL} printable characters (no control characters; Flower gets it with every character other than letters, digits, '.', '_' and '-' made '-'); default department-site from the key's comment.")] = None,
    state_dir: StateDir = None,
) -> None:
    """Allow a department node to join: register its public key with the coordinator.

    Prints the node ID (needed for `fl-server unregister`). Until a key is registered, a
    node using it is refused at connection time (HTTP 412, nothing is exchanged).
    Registering a key the coordinator already holds (e.g. after an interrupted register)
    prints that key's node ID and records it (exit 0); without --name it keeps the label
    recorded for it, and with another --name it relabels it and says so (old and new
    label). A key that was unregistered cannot be registered again (the error says how to
    make a new one). A --name (or a key comment, without --name) that is empty, longer than
    the limit or holds a control character is refused: exit 2, nothing registered.
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
        given = name is not None
        if name is None and info.comment.startswith("cityfed:"):
            name = "-".join(info.comment.split(":")[1:])
        if name is not None:
            check_node_label(name, "--name" if given else f"--name (default from the comment of {public_key})")
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
    labels = labels if isinstance(labels, dict) else {}
    before = labels.get(node_id, {}).get("name") if already and isinstance(labels.get(node_id), dict) else None
    if already and not given and before is not None:
        name = before  # re-registered without --name: the label recorded for this key stays
    labels[node_id] = {"name": name or "", "fingerprint": info.fingerprint, "public-key": str(Path(public_key).resolve())}
    _write_atomic(sd / "nodes.json", json.dumps(labels, indent=2))
    relabelled = already is not None and before is not None and before != (name or "")
    with _errors():
        record(sd, "register", **{"node-id": node_id, "public-key": str(Path(public_key).resolve())}, name=name or "",
               fingerprint=info.fingerprint, **({"already-registered": True} if already else {}),
               **({"previous-name": before} if relabelled else {}))
    if already:
        _out().print(f"[green]already registered[/] {escape(str(public_key))} ({info.fingerprint}) is node "
                     f"[bold]{node_id}[/] (status {escape(already['status'])}, registered at {escape(already['registered-at'])}); "
                     f"recorded in {escape(str(sd / 'nodes.json'))}")
        if relabelled:
            _out().print(f"[yellow]label changed[/]: node {node_id} was labelled {escape(shown_label(before))}, now "
                         f"{escape(shown_label(name or ''))} (--name); `fl-server nodes` shows the new label (Flower keeps "
                         "the name it was registered with)")
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


#: Seconds ``fl-server run`` waits for another launch on the same state folder to finish before refusing.
LAUNCH_LOCK_WAIT_S = 120.0


def _launch_lock(sd: Path, phases):
    """Hold ``<state-dir>/launch.lock`` while a run is launched: one launch at a time per coordinator state folder.

    Two launches into one run folder (``--name``, ``--resume``) both passed the "folder exists"
    check while the other was submitting (seconds), both trained on the nodes, and the later one's
    launch.json replaced the other's. A launch now waits for another one to finish (up to
    :data:`LAUNCH_LOCK_WAIT_S`), then checks the folder as usual.

    Raises
    ------
    CliError
        Code 2 when the other launch has not finished in time.
    """
    import time

    from privacy.safe_cli import pid_lock

    if not sd.is_dir():  # no coordinator was started here: the coordinator check below says so
        return None
    deadline = time.monotonic() + LAUNCH_LOCK_WAIT_S
    while True:
        fh, holder = pid_lock(sd / "launch.lock")
        if fh is not None:
            return fh
        if time.monotonic() >= deadline:
            raise CliError(f"another fl-server run (PID {holder}) has been launching a run on {sd} for "
                           f"{LAUNCH_LOCK_WAIT_S:g} s; fix: wait for it to finish (`fl-server runs`), then run this "
                           "command again", 2)
        phases.update(f"waiting for another launch on this state folder to finish (PID {holder})")
        time.sleep(0.5)


@_command("run")
def run_cmd(
    department: Annotated[Optional[str], typer.Option("--department", help="Department whose nodes train: health, traffic or utility (nodes of other departments refuse the job).")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", min=1, help="Federated rounds (run-config num-rounds; default 5).")] = None,
    run_config: Annotated[list[str], typer.Option("--run-config", "-c", help="Override a run setting, key=value, repeatable: e.g. -c strategy=fedprox -c target-epsilon=2.0 -c min-nodes=3. `fl-server app-config` lists every key and default.")] = [],  # noqa: B006
    name: Annotated[Optional[str], typer.Option("--name", help="Run folder name under --runs-dir (default <department>-<UTC time>): 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit, not digits only (that reads as a run ID).")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Continue an interrupted run (e.g. after a coordinator crash) from its checkpoint: give its folder name or run ID. Same settings, same folder; the completed rounds are not repeated. Refused (exit 2) while the run is still pending, starting or running: `fl-server stop` it first.")] = None,
    runs_dir: RunsDir = None,
    app_dir: Annotated[Path, typer.Option("--app", help="Project folder whose ServerApp/ClientApp is shipped (the FAB is built from it; use a clean checkout).")] = PROJECT_ROOT,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the run's log until it ends.")] = False,
    secagg: Annotated[Optional[bool], typer.Option("--secagg/--no-secagg", show_default=False, help="Secure aggregation (Flower SecAgg+), ON by default: the coordinator only learns the weighted mean of the nodes' updates, never one node's update. Needs fedavg, fedadam or fedyogi and at least 3 nodes per round. --no-secagg sends each node's updated weights to the coordinator in the clear (TLS still protects them on the wire); use it only for strategies that need individual updates (krum, trimmed-mean, fedprox). A resumed run keeps its mode unless given.")] = None,
    secagg_num_shares: Annotated[Optional[int], typer.Option("--secagg-num-shares", min=3, help="SecAgg+: shares of each node's secrets = neighbours + 1 (odd; run config secagg-num-shares, default 3).")] = None,
    secagg_threshold: Annotated[Optional[int], typer.Option("--secagg-threshold", min=2, help="SecAgg+: shares needed to unmask (< num-shares; run config secagg-threshold, default 2). A round survives num-shares - threshold dropped nodes per neighbourhood.")] = None,
    wait_start: Annotated[float, typer.Option("--wait-start", min=0.0, callback=finite_seconds("--wait-start", 60), help="Seconds to wait, after submitting, for the run's ServerApp to start running (progress on stderr); 0 = return once submitted (NaN and infinity are refused). A run still pending then is reported, not cancelled.")] = 60.0,
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
    with _Phases(_err()) as phases, _errors(), contextlib.ExitStack() as held:
        phases.step("checking the run config")
        runs = _runs_dir(sd, runs_dir)
        overrides = parse_run_config(run_config)
        explicit = explicit_options(department, rounds, secagg, secagg_num_shares, secagg_threshold)
        check_overrides(overrides, explicit)
        launch_lock = _launch_lock(sd, phases)  # held until this launch has written launch.json (or failed)
        if launch_lock is not None:
            held.callback(launch_lock.close)
        if resume:
            rec, folder, cfg = _resumed_run(runs, resume, department, overrides)
        else:
            rec, folder, cfg = _new_run(runs, department, name, overrides)
        if rounds is not None:
            cfg["num-rounds"] = rounds
        cfg.update(secagg_config(cfg, secagg, secagg_num_shares, secagg_threshold))
        cfg["run-dir"] = str(folder)
        if resume:
            check_resumed_config(folder, cfg, overrides, explicit)  # a stored value refused: launch.json is named
        _checked_settings(cfg, explicit)  # the operator's options and -c items first: they are named
        check_app_keys(cfg, app_dir)
        checked = check_app_defaults(cfg, app_dir, explicit)  # with --app's defaults, as the ServerApp merges them
        if checked.get("central-data") not in (None, "", "bundled"):  # -c item or --app's default
            cfg.setdefault("central-data", checked["central-data"])
            phases.step(f"reading central-data {cfg['central-data']} as the ServerApp will")
            check_central_data(cfg)
        if resume:
            done, planned = _checkpoint_round(folder), int(checked["num-rounds"])
            extended = extended_dp_run_warning(folder, planned)
            if extended:
                _err().print(f"[yellow]warning:[/] {escape(extended)}")
            if done >= planned:
                raise CliError(f"run {resume} already completed all {planned} rounds (its checkpoint is after round "
                               f"{done}); nothing to resume. Fix: continue it with more rounds (--resume "
                               f"{shlex.quote(str(resume))} "
                               f"--rounds {done + 1} or more), or start a new run")
        _coordinator(sd)  # after the run config: a bad one is exit 2 whether or not the coordinator is up
        if resume:
            phases.step("checking that the run to resume has ended")
            refuse_resume_of_a_live_run(sd, rec, resume, folder)
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
        if launch_lock is not None:
            launch_lock.close()  # launch.json is written: the next launch may check the folder
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


def refuse_resume_of_a_live_run(state_dir: Path, rec: dict, resume: str, folder: Path) -> None:
    """Refuse ``fl-server run --resume`` of a run whose latest Flower run has not finished.

    A second ServerApp on the same run folder would share its checkpoint and results with
    the first one. The coordinator's Control API (:func:`control_run_status`, the status
    ``fl-server runs`` shows) is asked for the folder's latest run ID (``launch.json``); a run
    it does not know (e.g. a new state.db) cannot be running and passes. When the coordinator
    cannot be reached, the submission that follows needs it too and fails the same way (exit
    3): a note says so and the caller goes on.

    Parameters
    ----------
    state_dir : Path
        The coordinator's state folder.
    rec : dict
        The run's launch record (``run-ids``, first to latest).
    resume : str
        ``--resume`` as given, for the message.
    folder : Path
        The run folder.

    Raises
    ------
    CliError
        Code 2 when the run is pending, starting or running (naming it, its status and the fix);
        code 1 when the coordinator answers with another error (the run's status is unknown).
    """
    ids = [str(r) for r in rec.get("run-ids", [])]
    if not ids:
        return
    try:
        status = control_run_status(state_dir, ids[-1], shown=resume)["status"]
    except CliError as exc:
        if exc.code == 2:  # the coordinator does not know this run: nothing of it is running
            return
        if exc.code == 3:  # not reachable: `flwr run` cannot submit either, and says so
            _err().print(f"[yellow]note:[/] could not check that run {ids[-1]} has ended: {escape(str(exc))}")
            return
        raise CliError(f"--resume {shlex.quote(str(resume))}: could not learn whether its run {ids[-1]} has ended "
                       f"({exc}); nothing resumed; fix: check `fl-server runs`, `fl-server stop` the run if it is still "
                       "running, then resume it", 1) from None
    if not status.startswith("finished"):
        ref = shlex.quote(str(resume))
        raise CliError(f"--resume {ref}: its run {ids[-1]} is still {status}, not finished; resuming it now would start a "
                       f"second ServerApp on the same run folder {folder} and checkpoint; fix: `fl-server stop {ref}` "
                       f"first (or wait for it to end; `fl-server runs` shows its status), then `fl-server run --resume "
                       f"{ref}`; after a coordinator crash, Flower marks a run whose ServerApp is gone finished:failed "
                       "within about a minute")


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
    wait: Annotated[float, typer.Option("--wait", min=0.0, callback=finite_seconds("--wait", 60), help="Seconds to wait for the run's ServerApp to exit (so that its last checkpoint is final) before results.json is written (finite, >= 0).")] = 60.0,
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


@_command("console")
def console_cmd(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Default 127.0.0.1 (this machine only); any other address needs --allow-remote, --certfile and --keyfile.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8090,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a non-loopback --host (the admin network only); HTTPS (--certfile/--keyfile) is then required.")] = False,
    certfile: Annotated[Optional[Path], typer.Option("--certfile", help="TLS certificate (PEM) for HTTPS, e.g. the coordinator's from `fl-pki`.")] = None,
    keyfile: Annotated[Optional[Path], typer.Option("--keyfile", help="TLS private key (PEM) of --certfile.")] = None,
    refresh: Annotated[int, typer.Option("--refresh", min=0, max=86400, help="Seconds between page reloads while a run is live (0 = never; at most 86400, a day).")] = 10,
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

    from flower_compat import check_version

    # the version gate first, for every command (no Flower import); all but QUICK_COMMANDS also
    # self-test the internals they load (check_seams, in _command)
    run_app(app, "fl-server", startup=check_version)  # errors: a message, never a traceback (--debug shows it)


if __name__ == "__main__":
    # `python -m server.cli`: this file runs as __main__, a second copy of server.cli (its own app and
    # module globals) beside the one that server.console and serving.commands import and call: run the
    # importable module's main instead, so that there is one. (CliError lives in server.errors: one class.)
    from server.cli import main as _main

    _main()
