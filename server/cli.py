"""``fl-server``: the coordinator operator's tool (typer + rich).

Wraps Flower 1.41's SuperLink and ``flwr`` CLI with this project's safe defaults:

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
    runs/<name>/          one folder per run: launch.json, run-config.toml, checkpoint.pkl,
                          model.pt, results.json

Exit codes: 0 ok, 1 the SuperLink or ``flwr`` reported a failure, 2 bad input (file,
option or run-config value), 3 the coordinator is not started / not reachable.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

#: Name of the ``flwr`` connection written into ``$FLWR_HOME/config.toml``.
CONNECTION = "cityfed"
#: Default SuperLink port (all of Fleet, Control and Runtime in Flower 1.41).
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
    """An operator-facing error: message names the file/option and the fix; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _command(name: str, hidden: bool = False) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def register(fn: Callable[..., None]) -> Callable[..., None]:
        paragraphs = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
        return app.command(name, help="\n\n".join(" ".join(p.split("\n")) for p in paragraphs), hidden=hidden)(fn)

    return register


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


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
    typer.Option("--runs-dir", help="Folder for run folders (model.pt, results.json, checkpoint.pkl). "
                 "Default: <state-dir>/runs. Must be on the coordinator machine."),
]


def _state(state_dir: Path | None) -> Path:
    return Path(state_dir or default_state_dir()).expanduser().resolve()


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
                       f"--state-dir {state_dir} ...` first, or pass the --state-dir you started it with", 3)
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
        Let the output go straight to the terminal (``logs --follow``); returns the exit code.

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
        return subprocess.call(cmd, env=env)
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
            msg = data.get("error-message") or (proc.stderr or text).strip()[-2000:]
            code = 3 if re.search(r"connect|unavailable|refused|timed out", msg, re.I) else 1
            raise CliError(f"`flwr {' '.join(args)}` failed: {msg}", code)
        return data
    if proc.returncode != 0:
        msg = (proc.stderr + "\n" + text).strip()[-2000:]
        raise CliError(f"`flwr {' '.join(args)}` failed: {msg}", 1)
    return text


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


@_command("start")
def start_cmd(
    ca: Annotated[Optional[Path], typer.Option("--ca", help="City CA certificate (ca.crt from `fl-pki init`).")] = None,
    cert: Annotated[Optional[Path], typer.Option("--cert", help="Coordinator TLS certificate (server.crt from `fl-pki server-cert`); its SANs must cover the name departments dial and 127.0.0.1.")] = None,
    key: Annotated[Optional[Path], typer.Option("--key", help="Coordinator TLS private key (server.key, mode 0600, never copied elsewhere).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. 0.0.0.0 = every interface (departments connect from other machines); 127.0.0.1 = this machine only.")] = "0.0.0.0",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port for the Fleet API (departments) and the guarded Control/Runtime APIs (operator). Open it to department machines only.")] = DEFAULT_PORT,
    state_dir: StateDir = None,
    admin_net: Annotated[list[str], typer.Option("--admin-net", help="CIDR allowed to use the Control/Runtime APIs (launch runs, register nodes). Repeatable; default loopback only (127.0.0.1/32 and ::1/128), i.e. run fl-server commands on the coordinator itself or through an SSH tunnel. Never list department networks.")] = [],  # noqa: B006
    insecure: Annotated[bool, typer.Option("--insecure", help="Plaintext HTTP without TLS and WITHOUT node authentication: anyone on the network can join or read models. Only for a throwaway local test.")] = False,
) -> None:
    """Run the coordinator (Flower SuperLink) in the foreground until Ctrl-C / SIGTERM.

    Serves departments over TLS with node authentication (only keys added with `fl-server
    register` can join), keeps runs and registered nodes in <state-dir>/state.db (a restart
    with the same --state-dir resumes them), never installs packages at run time, and
    refuses Control/Runtime calls (launching runs, registering nodes) from any address
    outside --admin-net with HTTP 403. Also writes the `flwr` connection "cityfed" used by
    the other fl-server commands. Refuses to start without --ca/--cert/--key unless
    --insecure is given.
    """
    from server.guard import DEFAULT_ADMIN_NETS, guard_installed_in_superlink, install_guard, parse_networks

    sd = _state(state_dir)
    with _errors():
        try:
            nets = parse_networks(admin_net or DEFAULT_ADMIN_NETS)
        except ValueError as exc:
            raise CliError(f"--admin-net: {exc}") from None
        tls = [ca, cert, key]
        if insecure:
            if any(tls):
                raise CliError("--insecure cannot be combined with --ca/--cert/--key; fix: drop --insecure (recommended)")
            _err().print("[bold red on white] WARNING [/][bold red] --insecure: NO TLS and NO node authentication. Any machine "
                         "that reaches this port can join the federation, receive the model and send updates. "
                         "Never use this outside a throwaway local test.[/]")
        else:
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
                _err().print(f"[yellow]warning:[/] {escape(str(cert))} does not cover {admin}; the fl-server "
                             f"commands on this machine dial {admin} and will fail TLS. Fix: reissue with "
                             f"`fl-pki server-cert ... --san {admin}`")
        sd.mkdir(parents=True, exist_ok=True, mode=0o700)
        superlink_home(sd).mkdir(parents=True, exist_ok=True, mode=0o700)
        address = _admin_address(host, port)
        write_connection(sd, address, ca, insecure)
        (sd / "coordinator.json").write_text(json.dumps({
            "address": address, "host": host, "port": port, "ca": str(ca) if ca else None, "insecure": insecure,
            "admin-nets": [str(n) for n in nets], "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2))
        install_guard(nets)
        if not guard_installed_in_superlink():
            raise CliError("the control-plane guard could not be installed in this Flower version (needs flwr 1.41's "
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
    from flwr.superlink.cli.flower_superlink import flower_superlink
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True)  # Flower prints times only at DEBUG; operators need them
    sys.argv = ["flower-superlink", *superlink_args(host=host, port=port, state_dir=sd, ca=ca, cert=cert, key=key,
                                                    insecure=insecure)]
    flower_superlink()


# --------------------------------------------------------------------------- nodes


def _node_labels(state_dir: Path) -> dict:
    """Names and fingerprints recorded by ``fl-server register`` (Flower's list does not show them)."""
    path = state_dir / "nodes.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@_command("register")
def register_cmd(
    public_key: Annotated[Path, typer.Argument(help="The department's node.pub (from `fl-pki node-key` on the department machine). Never node.key.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Label shown by `fl-server nodes`; default department-site from the key's comment.")] = None,
    state_dir: StateDir = None,
) -> None:
    """Allow a department node to join: register its public key with the coordinator.

    Prints the node ID (needed for `fl-server unregister`). Until a key is registered, a
    node using it is refused at connection time (HTTP 412, nothing is exchanged).
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
        data = flwr(sd, *args, json_out=True)
    node_id = str(data.get("node-id"))
    labels = _node_labels(sd)
    labels[node_id] = {"name": name or "", "fingerprint": info.fingerprint, "public-key": str(Path(public_key).resolve())}
    (sd / "nodes.json").write_text(json.dumps(labels, indent=2))
    with _errors():
        record(sd, "register", **{"node-id": node_id, "public-key": str(Path(public_key).resolve())}, name=name or "",
               fingerprint=info.fingerprint)
    _out().print(f"[green]registered[/] {escape(str(public_key))} ({info.fingerprint}) as node [bold]{node_id}[/]")
    print(node_id)


@_command("unregister")
def unregister_cmd(
    node_id: Annotated[int, typer.Argument(help="Node ID shown by `fl-server register` or `fl-server nodes`.")],
    state_dir: StateDir = None,
) -> None:
    """Remove a department node: its key can no longer connect (a connected node is dropped).

    Use it when a department leaves, or when its node.key may have leaked (then register
    the new node.pub it generates).
    """
    sd = _state(state_dir)
    with _errors():
        flwr(sd, "supernode", "unregister", str(node_id), CONNECTION, json_out=True)
        label = _node_labels(sd).get(str(node_id), {})
        record(sd, "unregister", **{"node-id": str(node_id)}, name=label.get("name", ""),
               fingerprint=label.get("fingerprint", "unknown (not registered with fl-server register)"))
    _out().print(f"[green]unregistered[/] node {node_id}")


@_command("nodes")
def nodes_cmd(
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print Flower's JSON instead of a table.")] = False,
) -> None:
    """List registered department nodes with their status (online/offline/unregistered)."""
    sd = _state(state_dir)
    with _errors():
        data = flwr(sd, "supernode", "ls", CONNECTION, json_out=True)
    nodes = data.get("nodes", [])
    labels = _node_labels(sd)
    for n in nodes:
        n.update({k: v for k, v in labels.get(str(n.get("node-id")), {}).items() if k in ("name", "fingerprint")})
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
        For an item without ``=``.
    """
    out = {}
    for item in items:
        if "=" not in item:
            raise CliError(f"--run-config {item!r}: expected key=value (e.g. --run-config local-epochs=2)")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def _runs_dir(state_dir: Path, runs_dir: Path | None) -> Path:
    return Path(runs_dir or state_dir / "runs").expanduser().resolve()


def _launches(runs: Path) -> list[dict]:
    out = []
    for f in sorted(runs.glob("*/launch.json")):
        try:
            d = json.loads(f.read_text())
        except ValueError:
            continue
        d["folder"] = f.parent.name
        out.append(d)
    return out


def resolve_run(runs: Path, run: str) -> dict:
    """Find a run's launch record by folder name, folder path, or Flower run ID.

    Raises
    ------
    CliError
        If no run folder under ``runs`` matches.
    """
    p = Path(run).expanduser()
    folder = p if p.is_absolute() else runs / run
    if (folder / "launch.json").exists():
        d = json.loads((folder / "launch.json").read_text())
        d["folder"] = folder.name
        return d
    for d in _launches(runs):
        if run in [str(r) for r in d.get("run-ids", [])]:
            return d
    raise CliError(f"no run {run!r} under {runs}; fix: use a folder name or run ID from `fl-server runs`")


def _flwr_run_id(runs: Path, run: str) -> str:
    if run.isdigit() and not (runs / run / "launch.json").exists():
        return run
    return str(resolve_run(runs, run)["run-ids"][-1])


def secagg_config(cfg: dict, secagg: bool | None, num_shares: int | None, threshold: int | None) -> dict:
    """The SecAgg+ run-config keys ``fl-server run`` sets.

    SecAgg+ is on by default: ``secagg = true`` unless ``--no-secagg`` is given or the
    run config (``-c secagg=false``, or a resumed run's stored config) already says so;
    an explicit ``--secagg/--no-secagg`` wins over the run config. ``--secagg-num-shares``
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
    state_dir: StateDir = None,
) -> None:
    """Launch a federated training run of this project's app on the registered nodes.

    Secure aggregation (SecAgg+) is on unless --no-secagg is given: the coordinator then
    only sees the mean update of at least 3 nodes. Works offline (nothing is installed:
    both sides use their own environment). The run's artefacts (checkpoint.pkl every
    round, model.pt, results.json) land in <runs-dir>/<name>/ on the coordinator. Prints
    the run ID; follow it with `fl-server logs RUN` and `fl-server runs`.
    """
    from server.app import settings

    sd = _state(state_dir)
    with _errors():
        _coordinator(sd)
        runs = _runs_dir(sd, runs_dir)
        overrides = parse_run_config(run_config)
        if resume:
            rec = resolve_run(runs, resume)
            folder = runs / rec["folder"]
            cfg = {**rec["config"], **overrides, "resume": True}
            if department and department != cfg["department"]:
                raise CliError(f"--department {department} but run {resume} is a {cfg['department']} run; fix: drop --department")
        else:
            if not department:
                raise CliError("--department is required (health, traffic or utility)")
            folder_name = name or f"{department}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", folder_name):
                raise CliError(f"--name {folder_name!r}: use letters, digits, '.', '_' or '-'")
            folder = runs / folder_name
            if (folder / "launch.json").exists():
                raise CliError(f"run folder {folder} exists; fix: choose another --name, or --resume {folder_name}")
            rec = {"run-ids": []}
            cfg = {"department": department, **overrides}
        if rounds is not None:
            cfg["num-rounds"] = rounds
        cfg.update(secagg_config(cfg, secagg, secagg_num_shares, secagg_threshold))
        cfg["run-dir"] = str(folder)
        try:
            checked = settings(cfg)
        except ValueError as exc:
            msg = str(exc)
            if cfg.get("secagg") is True and "'secagg' = true" in msg:
                msg += (f" (secure aggregation is on by default in `fl-server run`: strategy {cfg.get('strategy')!r} "
                        "needs each node's individual update; fix: -c strategy=fedavg, or --no-secagg to send "
                        "individual updates to the coordinator)")
            raise CliError(msg) from None
        if not (Path(app_dir) / "pyproject.toml").exists():
            raise CliError(f"--app {app_dir}: no pyproject.toml; fix: pass the cityfed project folder")
        folder.mkdir(parents=True, exist_ok=True)
        cfg_file = folder / "run-config.toml"
        cfg_file.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in cfg.items()))
        data = flwr(sd, "run", str(Path(app_dir).resolve()), CONNECTION, "--run-config", str(cfg_file), json_out=True)
        run_id = str(data.get("run-id"))
        stored = {k: v for k, v in cfg.items() if k != "resume"}
        rec.update({"config": stored, "run-ids": [*rec.get("run-ids", []), run_id],
                    "launched": [*rec.get("launched", []), datetime.now(timezone.utc).isoformat(timespec="seconds")]})
        rec.pop("folder", None)
        (folder / "launch.json").write_text(json.dumps(rec, indent=2))
        record(sd, "run", argv=list(sys.argv), **{"run-id": run_id}, department=cfg["department"], folder=str(folder),
               resumed=bool(resume), config=stored)
    _out().print(secagg_banner(checked))
    _out().print(f"[green]{'resumed' if resume else 'launched'}[/] run [bold]{run_id}[/] "
                 f"({cfg['department']}, {cfg.get('num-rounds', 5)} rounds) -> {escape(str(folder))}")
    print(run_id)
    if follow:
        raise typer.Exit(flwr(sd, "log", str(run_id), CONNECTION, "--stream", stream=True))


@_command("runs")
def runs_cmd(
    state_dir: StateDir = None,
    runs_dir: RunsDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (Flower's run records + the run folder).")] = False,
) -> None:
    """List runs: Flower run ID, status (pending/starting/running/finished:completed|failed|stopped), elapsed time and run folder."""
    sd = _state(state_dir)
    with _errors():
        data = flwr(sd, "ls", CONNECTION, json_out=True)
        folders = {str(r): d["folder"] for d in _launches(_runs_dir(sd, runs_dir)) for r in d.get("run-ids", [])}
    runs = data.get("runs", [])
    for r in runs:
        r["folder"] = folders.get(str(r.get("run-id")), "")
    if not as_json:
        runs = [{**r, "elapsed": f"{r['elapsed']:.0f} s"} if isinstance(r.get("elapsed"), (int, float)) else r
                for r in runs]
    _print_rows("runs", ("run-id", "status", "elapsed", "pending-at", "finished-at", "folder"), runs, as_json)


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
        rid = _flwr_run_id(_runs_dir(sd, runs_dir), run)
        if follow:
            raise typer.Exit(flwr(sd, "log", rid, CONNECTION, "--stream", stream=True))
        print(flwr(sd, "log", rid, CONNECTION, "--show", timeout=60))


@_command("stop")
def stop_cmd(
    run: Annotated[str, typer.Argument(help="Run ID or run folder name (from `fl-server runs`).")],
    state_dir: StateDir = None,
    runs_dir: RunsDir = None,
) -> None:
    """Stop a run now (status finished:stopped). The last completed round's checkpoint stays in its folder."""
    sd = _state(state_dir)
    with _errors():
        rid = _flwr_run_id(_runs_dir(sd, runs_dir), run)
        flwr(sd, "stop", rid, CONNECTION, json_out=True)
        record(sd, "stop", argv=list(sys.argv), **{"run-id": rid})
    _out().print(f"[green]stopped[/] run {rid}")


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


def _mount_audit() -> None:
    from privacy.audit_cli import make_audit_app

    app.add_typer(make_audit_app("coordinator", lambda: audit_paths(_state(None))[0],
                                 lambda: audit_paths(_state(None))[2]), name="audit")


_mount_audit()


def main() -> None:
    """Console entry point ``fl-server``."""
    from privacy.safe_cli import run_app

    run_app(app, "fl-server")  # errors: a message, never a traceback with records in it (--debug shows it)


if __name__ == "__main__":
    main()
