"""``fl-client``: run a department node (Flower SuperNode + this project's ClientApp).

Start-up checks fail fast with exit status 2 and a message naming the file and the fix:
empty option values, department, node key, privacy policy, data file, CA certificate, state
folder (created, and probed for writing), ledger location, coordinator reachability (TCP; exit
status 4 instead, since a coordinator that is down or not yet up is transient) and the
coordinator's certificate (TLS handshake against the CA, host name checked, in date). Then
``flower-supernode`` runs under supervision: it is restarted with exponential backoff when it
exits (e.g. the connection dropped for longer than ``--reconnect-window``), at most
``--max-restarts`` times in a row; SIGTERM/SIGINT are forwarded to it.

Exit codes: 0 stopped by SIGTERM/SIGINT (or ``--check`` passed), 1 gave up after
``--max-restarts``, 2 bad start-up input, 3 the coordinator refused this node's key
(not registered, or unregistered), 4 the coordinator was not reachable at start-up (restart later).

Sub-commands (``fl-client app ...``, ``fl-client audit ...``): the department's approvals of
app bundles the coordinator ships (:mod:`clients.pinning`: ``review``, ``approve``,
``revoke``, ``list``) and the node's signed audit log (:mod:`privacy.audit_cli`).
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Optional

import click
import typer
from rich.console import Console
from privacy.safe_cli import finite_seconds, make_console
from rich.markup import escape
from typer.core import TyperGroup

#: Value of ``--data`` meaning "the department's bundled real records" (demos and tests).
BUNDLED = "bundled"
#: SuperNode log lines meaning the coordinator refused this node's key (no point retrying).
REFUSED_MARKERS = ("Failed to activate SuperNode", "[code: 2004]", "No SuperNode found with the given public key")
#: Flower's SuperNode log line when it stops retrying a lost coordinator (--reconnect-window spent).
GAVE_UP_MARKER = "Giving up reconnection"
#: Seconds a SuperNode that gave up reconnecting may take to exit before the supervisor ends it: one that
#: had been connected does not exit by itself (its Runtime-API server thread keeps the process alive).
GAVE_UP_GRACE_S = 15.0
#: Environment defaults of the SuperNode and the SuperExec / ClientApp processes it starts (the caller's environment wins).
NODE_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1", "CITYFED_NODE_POLL_S": "0.1", "CITYFED_LOG_COMPUTE": "1",
            "FLWR_TELEMETRY_ENABLED": "0"}

#: Terminal colour/control sequences (Flower colours its log lines), taken out of a log that is not a terminal.
from flower_compat.logging import ANSI_ESCAPE  # noqa: E402

EXIT_OK, EXIT_GAVE_UP, EXIT_SETUP, EXIT_REFUSED = 0, 1, 2, 3
#: Exit status when the coordinator cannot be reached at start-up: transient (down, not yet up,
#: network), so a service manager should restart the node (not in RestartPreventExitStatus).
EXIT_UNREACHABLE = 4


class SetupError(Exception):
    """A start-up problem: the message names the file or option and the fix (exit status 2)."""


class CoordinatorUnreachable(SetupError):
    """The coordinator's address does not answer (exit status 4: restart later, no person needed)."""


def check_site_name(site: str) -> None:
    """Refuse a ``--site`` that is not a plain name: it names the node's state folder and ledger key.

    Raises
    ------
    SetupError
        For a path separator, a control character, ``.`` or ``..``, or more than 100 characters.
    """
    bad = ("/" in site or "\\" in site or site.strip() in ("", ".", "..") or len(site) > 100
           or any(ord(c) < 32 or ord(c) == 127 for c in site))
    if bad:
        raise SetupError(f"--site {ascii(site[:60])}: not a site name (it becomes a folder name under the state dir "
                         "and the ledger's key, so no path separator, no control character, not '.' or '..', at most "
                         "100 characters); fix: pass the site as the data file names it, e.g. --site Cleveland")


#: What to pass instead of an empty value, per option of the node command (parameter name -> option, fix).
#: An empty path would silently mean the working folder (``Path("")`` is ``.``): with an unset
#: variable in a service unit, ``--state-dir ""`` started a fresh privacy ledger there.
EMPTY_FIXES = {
    "department": ("--department", "pass this node's department: health, traffic or utility"),
    "site": ("--site", "pass this node's site as the data file names it, e.g. --site Cleveland"),
    "data": ("--data", f"pass this department's records file (CSV or Parquet), or {BUNDLED!r} for the packaged "
             "demo data"),
    "policy": ("--policy", "pass this department's privacy policy file (TOML, e.g. /etc/cityfed/health.toml)"),
    "coordinator": ("--coordinator", "pass the coordinator's HOST:PORT, e.g. coord.city.example:9092"),
    "ca": ("--ca", "pass the city's ca.crt from the coordinator team"),
    "key": ("--key", "pass this node's node.key (made on this machine by `fl-pki node-key`)"),
    "ledger": ("--ledger", "give the privacy ledger's file, or leave the option out for the default "
               "(<state-dir>/ledger.sqlite); keep the same file for the node's whole life"),
    "state_dir": ("--state-dir", "give the node's state folder, e.g. /var/lib/cityfed-node, or leave the option out "
                  "for the default (~/.cityfed/node-<department>-<site>)"),
    "date_format": ("--date-format", "pass DMY, MDY, ISO or a strftime pattern, or leave the option out for "
                    "year-first dates"),
    "ranges": ("--ranges", "pass a plausibility-ranges TOML file, or leave the option out for the schema's ranges"),
    "test_start": ("--test-start", "pass the first time of the test period, e.g. --test-start 2024-05-07 (traffic and "
                   "utility files)"),
}


def check_not_empty(params: dict, names=None) -> None:
    """Refuse an option given an empty (or all-blank) value, e.g. from an unset shell variable.

    Parameters
    ----------
    params : dict
        The command's parameters as click parsed them (``ctx.params``: a path option still
        holds the text given, ``""`` rather than ``Path(".")``).
    names : iterable of str, optional
        The parameters to check (keys of :data:`EMPTY_FIXES`); default all of them.

    Raises
    ------
    SetupError
        Naming the first empty option and what to pass instead.
    """
    for name in EMPTY_FIXES if names is None else names:
        value = params.get(name)
        if isinstance(value, (str, os.PathLike)) and not str(value).strip():
            option, fix = EMPTY_FIXES[name]
            blank = " (only white space)" if str(value) else ""
            raise SetupError(f"{option} is empty{blank}; fix: {fix}")


def check_node_environment() -> None:
    """Refuse at start-up a bad setting that every task of the node reads.

    ``$CITYFED_DEVICE`` (:func:`shared_models.device.pick_device`: an unknown value, or CUDA
    where torch sees none) and ``$CITYFED_CPU_WATTS_PER_CORE``
    (:func:`clients.energy.watts_per_core`, each train and evaluate task meters its energy
    with it): a bad value would fail every task of the node, named only in the node's log.

    Raises
    ------
    SetupError
        Naming the variable, its value and the fix.
    """
    from clients.energy import watts_per_core
    from shared_models.device import DeviceError, pick_device

    try:
        pick_device()
    except DeviceError as exc:
        raise SetupError(f"{exc.problem}; fix: {exc.fix}") from None
    try:
        watts_per_core()
    except ValueError as exc:
        raise SetupError(str(exc)) from None


def check_department(department: str) -> None:
    """Refuse a ``--department`` that is not one of the federation's departments (case-sensitive).

    Checked before the policy is read, so the message blames the option rather than the policy.

    Raises
    ------
    SetupError
        Naming the value, the closest department ("did you mean") and the valid names.
    """
    from contract.tasks import TASKS

    if department in TASKS:
        return
    import difflib

    known = ", ".join(TASKS)
    plain = department.strip().lower()
    close = plain if plain in TASKS else next(iter(difflib.get_close_matches(plain, list(TASKS), n=1)), None)
    hint = ""
    if close is not None:
        why = " (department names are lower-case, without spaces)" if plain == close else ""
        hint = f"; did you mean {close!r}?{why}"
    raise SetupError(f"--department {department!r}: not a department of this federation{hint}; fix: pass one of "
                     f"{known} (the one your policy's `department` names)")


def check_input_file(option: str, path, fix: str, *, inside: str | None = None) -> Path:
    """Check that ``path`` is a regular file before it is opened.

    A named pipe would block the read forever, a directory gives a misleading "cannot read
    it", a device is no file to parse: each is named as such.

    Parameters
    ----------
    option : str
        The option, for the message (``--key``).
    path : str or Path
        Its value.
    fix : str
        What to pass instead (after ``fix:``).
    inside : str, optional
        The file usually found in a folder given by mistake (``node.key``): the fix then shows
        ``<folder>/<inside>``.

    Returns
    -------
    Path

    Raises
    ------
    SetupError
        Missing, a directory, a FIFO, a device, a socket, a broken link or not inspectable.
    """
    from citydata.base import path_kind

    path = Path(path)
    kind = path_kind(path)
    if kind is None:
        return path
    if kind == "file not found":
        raise SetupError(f"{option} {path}: file not found; fix: {fix}")
    what = f"is {kind}, not a regular file" if kind.startswith("a ") else kind
    if kind == "a directory":
        fix = f"pass the file in that folder, e.g. {path / inside} (or: {fix})" if inside else \
            f"pass the file itself, not a folder: {fix}"
    raise SetupError(f"{option} {path}: {what}; fix: {fix}")


def _user() -> str:
    """This process's user name (for fixes such as ``chown USER``)."""
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError, OSError):
        return "the user that runs fl-client"


def _not_a_folder(path: Path) -> Path | None:
    """The first of ``path``'s ancestors (or ``path`` itself) that exists but is not a folder, if any.

    None also when that cannot be told (a folder this user may not search): ``mkdir`` then
    says why.
    """
    try:
        for d in [*reversed(path.parents), path]:
            if d.is_dir():
                continue
            return d if d.exists() or d.is_symlink() else None
    except OSError:
        pass
    return None


def make_private_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents, each with mode 0700 (as the state folder).

    ``Path.mkdir(parents=True, mode=...)`` gives the mode to the last folder only; a node's
    folders (state, ledger) hold private files, so every folder made for them is private.

    Returns
    -------
    list of Path
        The folders created, outermost first.

    Raises
    ------
    OSError
        From ``mkdir`` (permission, a file in the way, read-only file system).
    """
    made = []
    for d in [*reversed(Path(path).parents), Path(path)]:
        if d.is_dir():
            continue
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue
        made.append(d)
    return made


def check_writable(folder: Path, option: str, value, fix: str | None = None) -> None:
    """Probe that this process can create (and remove) a file in ``folder``.

    A real write, not a look at the mode bits: ``--check`` then catches a folder the node
    could not write when it runs (another user's, a read-only mount), for root too.

    Parameters
    ----------
    folder : Path
        The folder to probe (it exists).
    option, value
        The option and its value, for the message (the value may be a file in ``folder``).
    fix : str, optional
        The fix; default: let this user write the folder, or pass another one.

    Raises
    ------
    SetupError
        Naming the option, its value, the folder, the system's reason and the fix.
    """
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".fl-client-write-check-", dir=folder)
    except OSError as exc:
        user = _user()
        q = shlex.quote(str(folder))
        fix = fix or (f"let {user} write it (e.g. `sudo chown {shlex.quote(user)} {q}` and `chmod 700 {q}`), or pass a "
                      f"folder {user} can write")
        where = "" if Path(folder) == Path(value) else f": its folder {folder}"
        raise SetupError(f"{option} {value}{where} is not writable by this user ({exc.strerror or exc}); "
                         f"fix: {fix}") from None
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass


def check_state_dir(home: Path, option: str = "--state-dir") -> None:
    """Create the node's state folder (mode 0700, missing parents too) and probe that it is writable.

    Parameters
    ----------
    home : Path
        The state folder.
    option : str
        How messages name it: ``--state-dir``, or ``--state-dir (default)`` when the option
        was left out.

    Raises
    ------
    SetupError
        Naming the option, the folder and the fix: a file at that path or in the way, a
        folder that cannot be created (permission, read-only file system) or written.
    """
    home = Path(home)
    blocker = _not_a_folder(home)
    fix = "pass a folder for the node's state with --state-dir, e.g. /var/lib/cityfed-node"
    if blocker == home:
        raise SetupError(f"{option} {home}: is a file, not a folder; fix: {fix}, or move that file away")
    if blocker is not None:
        raise SetupError(f"{option} {home}: cannot create it: {blocker} is a file, not a folder; fix: {fix}")
    try:
        make_private_dirs(home)
    except OSError as exc:
        user = _user()
        at = f" at {exc.filename}" if exc.filename and str(exc.filename) != str(home) else ""
        raise SetupError(f"{option} {home}: cannot create it ({exc.strerror or exc}{at}); fix: create it for {user} "
                         f"(e.g. `sudo install -d -m 700 -o {shlex.quote(user)} {shlex.quote(str(home))}`), or pass a "
                         f"folder {user} can write") from None
    check_writable(home, option, home)


def _reword(message: str, source: str, option: str) -> str:
    """``option: message``, where ``message`` names ``source`` at the start of its lines: the file named once.

    ``PolicyError``/``DataFileError`` messages start with the file (``X: field ...``,
    ``X, column 'age': ...``); under ``--policy X`` that read ``--policy X: X: field ...``.
    Their ``. Fix:`` becomes ``; fix:``; a message of several lines keeps them, indented.
    """
    lines = []
    for line in message.splitlines() or [""]:
        rest = line[len(source):] if line.startswith(source) else ""
        if rest.startswith((": ", ", ")):  # "X: field ..." / "X, column 'age': ..."
            line = rest[2:]
        lines.append(line.replace(". Fix: ", "; fix: "))
    return "\n  ".join([f"{option}: {lines[0]}", *lines[1:]])


# --------------------------------------------------------------------------- checks


def check_key(path: Path) -> str:
    """Check the node's Flower authentication key (``node.key`` from ``fl-pki node-key``).

    Returns
    -------
    str
        The key's fingerprint (``SHA256:...``), to compare with what the coordinator registered.

    Raises
    ------
    SetupError
        Missing/unreadable file, not a regular file (a folder, a FIFO: checked before it is
        opened), not an OpenSSH EC private key, passphrase-protected, or a non-NIST curve.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from privacy.pki import ssh_fingerprint

    from privacy.pki import PKIError, finish_interrupted_replace, load_public_key

    fix = "create it on this machine with `fl-pki node-key --out DIR --department D --site S` and pass DIR/node.key"
    try:  # a `fl-pki node-key --force` killed part-way: finished first, so key and node.pub are one pair
        finish_interrupted_replace(Path(path).expanduser().parent)
    except PKIError as exc:
        raise SetupError(f"--key {path}: {exc}") from None
    check_input_file("--key", path, fix, inside="node.key")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SetupError(f"--key {path}: file not found; fix: {fix}") from None
    except PermissionError as exc:
        raise SetupError(f"--key {path}: cannot read it ({exc.strerror}); fix: run fl-client as the user that owns "
                         "the key (mode 0600)") from None
    except OSError as exc:
        raise SetupError(f"--key {path}: cannot read it ({exc.strerror or exc}); fix: {fix}") from None
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise SetupError(f"--key {path}: is passphrase-protected; Flower needs an unencrypted key; fix: {fix}") from None
    except Exception:  # noqa: BLE001 - cryptography raises ValueError, UnsupportedAlgorithm, ... for garbage
        hint = " (this is a public key: pass node.key, not node.pub)" if data.startswith(b"ecdsa-") else ""
        raise SetupError(f"--key {path}: not an OpenSSH private key{hint}; fix: {fix}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in (
            "secp256r1", "secp384r1", "secp521r1", "secp224r1", "secp192r1"):
        raise SetupError(f"--key {path}: Flower accepts only ECDSA NIST-curve keys; fix: {fix}")
    mode = Path(path).stat().st_mode & 0o077
    if mode:  # as ssh refuses an unprotected private key: it is the node's identity and signs its audit log
        raise SetupError(f"--key {path}: other users can {'read' if mode & 0o044 else 'use'} this private key (mode "
                         f"{Path(path).stat().st_mode & 0o777:04o}); fix: chmod 600 {shlex.quote(str(path))} (and, if "
                         "anyone else may have copied it, make a new key with `fl-pki node-key --force` and have the "
                         "coordinator register its node.pub)")
    fingerprint = ssh_fingerprint(key.public_key())
    pub = Path(path).expanduser().with_name("node.pub")
    if Path(path).name == "node.key" and pub.is_file():  # the pair fl-pki wrote: node.pub is what gets registered
        try:
            pub_fp = load_public_key(pub).fingerprint
        except PKIError:
            pub_fp = None  # not a public key: nothing to compare (fl-pki show names the problem)
        if pub_fp is not None and pub_fp != fingerprint:
            raise SetupError(f"--key {path}: the node.pub beside it is another key's ({pub_fp}; this key is {fingerprint}): "
                             "the coordinator registers node.pub, so it would refuse this node; fix: make a new pair "
                             "with `fl-pki node-key --force` and have the coordinator register its node.pub")
    return fingerprint


def check_policy(path: Path, department: str):
    """Load the node's privacy policy and check it belongs to ``department``.

    Raises
    ------
    SetupError
        With :class:`privacy.policy.PolicyError`'s message (field, fix; the file named once), a
        path that is not a regular file (checked before it is opened: a FIFO would block), a
        file saved with a UTF-8 byte-order mark (named by ``load_policy``), a department mismatch, or an ``allowed_tasks`` without the department's task
        (:data:`contract.tasks.TASKS`): either way the node would refuse every job.
    """
    from privacy.policy import PolicyError, load_policy

    from contract.tasks import TASKS
    from privacy.policy import check_allowed_tasks

    check_input_file("--policy", path, "pass this department's privacy policy (TOML; examples/policies/)")
    try:  # a UTF-8 byte-order mark is named by load_policy itself
        policy = load_policy(path)
    except PolicyError as exc:
        raise SetupError(_reword(str(exc), str(path), f"--policy {path}")) from None
    if policy.department != department:
        raise SetupError(f"--policy {path}: department = {policy.department!r} but this node is --department "
                         f"{department}; fix: pass this department's policy (or correct `department` in it)")
    try:  # a policy that does not list the department's task refuses every job: say so now, not per job
        check_allowed_tasks(policy, TASKS[department], str(path))
    except PolicyError as exc:
        raise SetupError(_reword(str(exc), str(path), f"--policy {path}")) from None
    return policy


@dataclass
class DataReport:
    """What :func:`check_data` found: the site's record counts and arrays, and the data warnings.

    Attributes
    ----------
    site : str
    source : str
        The ``--data`` value.
    records : int
        The site's records in the file (after dropped rows).
    train, test : int
        Training and test records (forecasting: windows), as training will use them.
    unit : str
        ``"records"`` or ``"windows"``.
    x_shape, y_shape : tuple of int
        Shapes of the training tensors.
    warnings : list of str
        Every :class:`~citydata.DataQualityWarning` (counts, never record values).
    test_start : str
        Forecasting: the public test start the split used (configuration, not from the records).
    """

    site: str
    source: str
    records: int
    train: int
    test: int
    unit: str
    x_shape: tuple
    y_shape: tuple
    warnings: list = field(default_factory=list)
    test_start: str = ""

    def summary(self) -> str:
        """One line: ``site S: N records -> a training and b test records (X ..., y ...)``."""
        x = "x".join(map(str, self.x_shape))
        y = "x".join(map(str, self.y_shape))
        return (f"data {self.source}, site {self.site}: {self.records} records -> {self.train} training and {self.test} "
                f"test {self.unit}" + (f" (test from {self.test_start})" if self.test_start else "")
                + f" (training tensors X {x}, y {y}); {len(self.warnings)} data warning(s)")


def check_data(department: str, data: str, site: str, *, date_format: str | None = None,
               ranges: str | None = None, test_start: str | None = None) -> DataReport:
    """Open the department's data file and build ``site``'s arrays exactly as training will.

    The same calls as the node's (:meth:`clients.node.NodeSpec.site_data`):
    :func:`citydata.load_department`, ``site_data(site)`` (the site's train/test split,
    scalers, windows for forecasting) and the training tensors, so a file that passes cannot
    fail later on its own records. Every data-quality warning is collected for the report.

    Parameters
    ----------
    department, data, site : str
        ``--department``, ``--data`` (a file, or ``bundled``), ``--site``.
    date_format : str, optional
        ``--date-format`` (DMY, MDY, ISO or a strftime pattern).
    ranges : str, optional
        ``--ranges``: a plausibility-ranges TOML file.
    test_start : str, optional
        ``--test-start``: the public test start of an own traffic or utility file
        (:func:`citydata.forecasting.parse_test_start`); default ``CITYFED_TEST_START``.

    Returns
    -------
    DataReport

    Raises
    ------
    SetupError
        With :class:`citydata.DataFileError`'s message (file, column, rows, kind of problem, fix; never a cell's value): a
        path that is not a regular file (says what it is; ``--ranges`` too), a bad file or ranges
        file, a site not in the file, a site too small for a train/test split or one DP-SGD batch, a
        single-class site; an own traffic or utility file without a test start; or a bad
        ``--date-format``/``--department``/``--test-start`` (or one given for health or the bundled data),
        or a bad ``CITYFED_DATE_FORMAT``, ``CITYFED_RANGES`` or ``CITYFED_TEST_START`` (named, with its
        value: the loader's defaults when the option is left out).
    """
    import warnings

    from citydata import load_department
    from citydata.base import DataFileError, DataQualityWarning, path_kind, shown_name
    from citydata.timestamps import DATE_FORMAT_FIX, check_date_format

    try:
        date_format = check_date_format(date_format)
    except ValueError as exc:
        raise SetupError(f"--date-format {date_format!r}: {exc}; {DATE_FORMAT_FIX}") from None
    if ranges is not None:
        check_input_file("--ranges", ranges, "pass a plausibility-ranges TOML file (README: plausibility ranges), or "
                         "leave the option out for the schema's ranges")
    path = None if data == BUNDLED else data
    extra = {}
    if test_start is not None:
        extra["test_start"] = check_test_start(test_start, department, path is not None)
    if path is not None:
        kind = path_kind(Path(path))
        if kind == "file not found":
            raise SetupError(f"--data {data}: file not found; fix: pass this department's records file (CSV or Parquet)")
        if kind is not None:
            what = f"is {kind}, not a regular file" if kind.startswith("a ") else kind
            raise SetupError(f"--data {data}: {what}; fix: pass the path of this department's records file "
                             "(one CSV or Parquet file)" + (" inside that directory" if kind == "a directory" else ""))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataQualityWarning)
        try:
            ds = load_department(department, path, date_format=date_format, ranges=ranges, **extra)
            if site not in ds.sites:
                raise SetupError(f"--site {shown_name(site)} is not in --data {data} ({ds.site_choices(site)}); "
                                 f"fix: pass the site as the file's {shown_name(ds.schema.site_column)} column writes "
                                 "it, or the file holding this site's records")
            sd = ds.site_data(site)  # the node's own call: split, scalers, windows, size and finiteness checks
            train, _test = sd.train.tensors(), sd.test.tensors()
        except DataFileError as exc:
            if getattr(exc, "setting", None):  # CITYFED_RANGES/CITYFED_DATE_FORMAT: the message names the variable
                option = exc.path
            elif ranges is not None and exc.path == str(ranges):
                option = f"--ranges {ranges}"
            else:
                option = f"--data {data}"
            raise SetupError(_reword(str(exc), exc.path, option)) from None
        except ValueError as exc:  # unknown department
            raise SetupError(f"--department: {exc}") from None
    notes = [str(w.message) for w in caught if issubclass(w.category, DataQualityWarning)]
    forecasting = ds.schema.task == "forecasting"
    records = int(sd.meta.get("records", sd.meta.get("patients", len(sd.train) + len(sd.test))))
    return DataReport(site=site, source=data, records=records, train=len(sd.train), test=len(sd.test),
                      unit="windows" if forecasting else "records", x_shape=tuple(train.tensors[0].shape),
                      y_shape=tuple(train.tensors[1].shape), warnings=notes,
                      test_start=str(sd.meta["split_time"]) if forecasting else "")


def check_test_start(test_start: str, department: str, own_file: bool) -> str:
    """``--test-start`` as the ISO text the loader reads.

    Raises
    ------
    SetupError
        Naming ``--test-start``: not a date (or a date and time of day), given for health (split
        per patient, not in time), or given with the bundled data (whose sites have their own).
    """
    from citydata.forecasting import TEST_START_FORMAT, parse_test_start

    if department not in ("traffic", "utility"):
        raise SetupError(f"--test-start: {department} is not split in time (each record is drawn to training or test on "
                         "its own); fix: leave --test-start out, it is for traffic and utility files")
    if not own_file:
        raise SetupError(f"--test-start: the bundled sites have their own public test starts; fix: leave --test-start out, "
                         f"or give it with your own --data file")
    try:
        return parse_test_start(test_start).isoformat()
    except ValueError as exc:
        raise SetupError(f"--test-start: {exc}; fix: write it as {TEST_START_FORMAT}") from None


def check_ledger(path: Path, option: str = "--ledger") -> None:
    """Check the ledger can be created/opened and written (missing folders are created, mode 0700).

    Parameters
    ----------
    path : Path
        The ledger file.
    option : str
        How messages name it: ``--ledger``, or ``--ledger (default)`` when the option was left out.

    Raises
    ------
    SetupError
        Naming ``--ledger`` and the fix: a directory (or FIFO, device) at that path, a file in
        the way of its folder, a folder that cannot be created or written (SQLite writes its
        journal next to the ledger), a read-only ledger, or a file that is not a ledger.
    """
    from citydata.base import path_kind
    from privacy.ledger import LedgerError, PrivacyLedger

    path = Path(path)
    keep = "keep the same file for the node's whole life: it holds its lifetime privacy budget"
    blocker = _not_a_folder(path.parent)
    if blocker is not None:
        raise SetupError(f"{option} {path}: cannot create its folder: {blocker} is a file, not a folder; fix: pass a "
                         f"path whose folders are folders, e.g. <state-dir>/ledger.sqlite ({keep})")
    kind = path_kind(path)
    if kind not in (None, "file not found"):
        what = f"is {kind}, not a ledger file" if kind.startswith("a ") else kind
        example = f"e.g. {path / 'ledger.sqlite'}" if kind == "a directory" else "e.g. <state-dir>/ledger.sqlite"
        raise SetupError(f"{option} {path}: {what}; fix: pass the ledger file's path ({example}; {keep})")
    try:
        make_private_dirs(path.parent)
    except OSError as exc:
        raise SetupError(f"{option} {path}: cannot create its folder {exc.filename or path.parent} "
                         f"({exc.strerror or exc}); fix: pass a path on this machine's disk that {_user()} can write "
                         f"({keep})") from None
    check_writable(path.parent, option, path, f"pass a ledger path in a folder {_user()} can write (SQLite writes its "
                   f"journal next to the ledger), e.g. <state-dir>/ledger.sqlite ({keep})")
    if kind is None and not os.access(path, os.R_OK | os.W_OK):
        raise SetupError(f"{option} {path}: this user ({_user()}) cannot read and write it; fix: run fl-client as the "
                         f"ledger's owner, or `chmod 600` it ({keep})")
    try:
        PrivacyLedger(path)
    except (OSError, LedgerError) as exc:  # the ledger's own problem and fix where it gives them (one fix, not two)
        problem = getattr(exc, "problem", None) or str(exc).removeprefix(f"privacy ledger {str(path)!r}: ")
        fix = getattr(exc, "fix", None) or "pass a writable path on this machine's disk"
        raise SetupError(f"{option} {path}: {problem}; fix: {fix} ({keep})") from None


def check_audit_log(path: Path) -> None:
    """Refuse a node audit log that would refuse the node's next entry (every task appends one before it runs).

    Raises
    ------
    SetupError
        Naming the log, what is wrong and the fix (:meth:`privacy.audit.AuditLog.check_appendable`).
    """
    from privacy.audit import AuditError, AuditLog

    try:
        AuditLog(path).check_appendable()
    except AuditError as exc:
        text = str(exc)
        raise SetupError(text if "fix:" in text else f"{text}; fix: run `fl-client audit verify`") from None


def check_ledger_holds_audited_releases(path: Path, audit_path: Path, department: str, site: str,
                                         option: str = "--ledger") -> None:
    """Refuse a ledger that holds fewer of the site's releases than the node's own audit log records.

    The node commits a release to its ledger before it writes the release's audit entry, so the
    ledger always holds at least as many: fewer means the ledger was deleted or replaced by an
    older copy, and starting on it would under-count the site's spent budget. A missing or
    unreadable audit log is left to its own checks (``fl-client audit verify``); a ledger that
    cannot be opened, to :func:`check_ledger`.

    Parameters
    ----------
    path : Path
        The ledger (``--ledger``); it may not exist yet.
    audit_path : Path
        The node's audit log (``<state-dir>/audit.jsonl``).
    department, site : str
        The node's department and site.
    option : str
        How messages name the ledger.

    Raises
    ------
    SetupError
        Naming both files, both counts and the fix.
    """
    from privacy.audit import AuditError, AuditLog
    from privacy.ledger import LedgerError, PrivacyLedger

    try:
        audited = sum(1 for e in AuditLog(audit_path).entries()
                      if e.get("kind") == "release" and isinstance(e.get("data"), dict)
                      and e["data"].get("site") == site and e["data"].get("department") == department)
    except (AuditError, OSError):
        return
    if not audited:
        return
    held = 0
    if Path(path).is_file():
        try:
            held = PrivacyLedger(path).site_releases(site)
        except (OSError, LedgerError):
            return
    if held < audited:
        plural = lambda n: f"{n} release{'' if n == 1 else 's'}"  # noqa: E731
        raise SetupError(
            f"{option} {path}: {'does not exist' if not Path(path).is_file() else 'holds ' + plural(held)} of "
            f"{department}/{site}, but this node's audit log {audit_path} records {plural(audited)} of it: the ledger "
            "lost releases (deleted, or replaced by an older copy), and the site's spent privacy budget would be "
            "under-counted; fix: restore the ledger that holds them (this node's latest ledger backup, or pass its "
            "path with --ledger); never start a node on a ledger with fewer releases than it made")


#: Beside the node key (``<key>.ledger.json``): the ledger this key spends its site's budget against.
KEY_LEDGER_SUFFIX = ".ledger.json"


def check_key_ledger_binding(key: Path, ledger_path: Path, department: str, site: str,
                             option: str = "--ledger") -> str | None:
    """Refuse a node key that spent its site's budget against another ledger; record the binding.

    A key is the node's identity, and its site's spent privacy budget is in the ledger it spent it
    against. Started with another state folder (a second unit file, another account's default, a
    typo in ``--state-dir``), the node got a fresh ledger and its budget started again. The ledger
    the key is bound to is recorded beside the key (``<key>.ledger.json``: the ledger's path and
    its random id, :meth:`privacy.ledger.PrivacyLedger.ledger_id`); a start with another ledger is
    refused while the recorded one holds releases of the site, or is gone (its releases unknown).
    A recorded ledger without any release of the site holds no budget: the key moves to the new one.

    Returns
    -------
    str or None
        A warning when the binding could not be recorded (the key's folder is not writable).

    Raises
    ------
    SetupError
        Naming the key, both ledgers and the fix; or an unreadable binding file.
    """
    from privacy.ledger import LedgerError, PrivacyLedger

    key = Path(key).expanduser().resolve()
    ledger_path = Path(ledger_path).expanduser().resolve()
    record_path = key.with_name(key.name + KEY_LEDGER_SUFFIX)
    current = PrivacyLedger(ledger_path).ledger_id()
    record = None
    if os.path.lexists(record_path):
        try:
            if record_path.is_symlink() or record_path.stat().st_size > 64 * 1024:
                raise ValueError("not a binding file")
            record = json.loads(record_path.read_text())
            bound, bound_id = Path(str(record["ledger"])), str(record["ledger-id"])
        except (OSError, ValueError, KeyError, TypeError):
            raise SetupError(f"--key {key}: {record_path} (the ledger this key spends against) cannot be read; fix: "
                             "restore it from this node's backup (it names the ledger), or remove it only if this key "
                             "has never trained") from None
        if bound_id != current:
            held = None
            try:
                if bound.is_file() and PrivacyLedger(bound).ledger_id() == bound_id:
                    held = PrivacyLedger(bound).site_releases(site)
            except (OSError, LedgerError, IndexError):
                held = None
            if held is None:
                raise SetupError(
                    f"--key {key}: this key spent {department}/{site}'s privacy budget against the ledger {bound}, which "
                    f"is not there now (or is another ledger); {option} {ledger_path} is a different ledger, on which "
                    "the site's budget would start again; fix: restore that ledger from this node's backup (to "
                    f"{bound}, or pass the restored copy with --ledger: a copy keeps its id); if it is lost for good, "
                    "the site's spent budget is unknown, and only the department's data-protection officer can decide "
                    f"to start a new one: then move {record_path} aside (keep it with the decision) and start again")
            if held:
                plural = f"{held} release{'' if held == 1 else 's'}"
                raise SetupError(
                    f"--key {key}: this key spends {department}/{site}'s privacy budget against the ledger {bound}, which "
                    f"holds {plural} of it; {option} {ledger_path} is another ledger (a second state folder?), on which "
                    f"the budget would start again; fix: start the node with --ledger {bound} (or the --state-dir that "
                    "holds it)")
    if record is not None and record.get("ledger-id") == current and record.get("ledger") == str(ledger_path):
        return None
    body = json.dumps({"ledger": str(ledger_path), "ledger-id": current, "department": department, "site": site},
                      indent=1).encode()
    from contract.files import write_atomic

    try:
        write_atomic(record_path, body, mode=0o600)
    except OSError as exc:
        return (f"cannot record beside --key {key} which ledger it spends against ({exc.strerror or exc}): a start with "
                "another ledger would not be refused; fix: let this account write the key's folder")
    return None


_PORT = re.compile(r"[1-9][0-9]{0,4}")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ADDRESS_FIX = "fix: write HOST:PORT, e.g. coord.city.example:9092, 10.0.0.5:9092 or [2001:db8::5]:9092"


def _valid_host(host: str) -> str | None:
    """Why ``host`` (no brackets) is not a DNS name or IPv4 address, or ``None`` if it is one."""
    if not host:
        return "empty host"
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host!r} is not a valid IPv4 address (four numbers 0-255, no leading zeros)"
        return None
    if len(host) > 253:
        return f"host name of {len(host)} characters (at most 253)"
    labels = host.split(".")
    for lb in labels:
        if not _LABEL.fullmatch(lb):
            why = ("an empty label (two dots, or a dot at either end)" if not lb else
                   f"label {lb!r} longer than 63 characters" if len(lb) > 63 else
                   f"label {lb!r} (letters, digits and inner hyphens only)")
            return f"{host!r} is not a valid host name: {why}"
    if labels[-1].isdigit():
        return f"{host!r} is neither a valid IPv4 address nor a host name"
    return None


def parse_address(value: str) -> tuple[str, int]:
    """Split and validate ``HOST:PORT`` strictly (IPv6 as ``[2001:db8::5]:9092``).

    HOST is a DNS name (letters, digits, hyphens; labels of 1-63 characters), an IPv4 address,
    or an IPv6 address in brackets (brackets only around IPv6). PORT is 1-65535 in ASCII digits
    without a sign or leading zeros. Nothing else: no scheme (``https://``), path, user name,
    spaces, non-ASCII characters (e.g. Arabic-Indic digits) or zone index; the address goes to
    gRPC as it is, so what is not clearly valid is refused rather than misread.

    Returns
    -------
    (str, int)
        The host (without brackets) and the port.

    Raises
    ------
    SetupError
        Naming the value as given, what is wrong with it and the expected form.
    """

    def bad(problem: str) -> SetupError:
        return SetupError(f"--coordinator {value!r}: {problem}; {_ADDRESS_FIX}")

    if not isinstance(value, str) or not value:
        raise bad("empty address")
    if "://" in value:
        raise bad(f"no scheme: drop {value.split('://', 1)[0] + '://'!r} (the connection is always gRPC over TLS)")
    if any(c.isspace() for c in value):
        raise bad("contains a space or other whitespace")
    if not value.isascii():
        odd = next(c for c in value if not c.isascii())
        kind = "a non-ASCII digit" if odd.isdigit() or odd.isnumeric() else "a non-ASCII character"
        raise bad(f"contains {kind} {odd!r} (U+{ord(odd):04X}); ports and host names use ASCII digits and letters only")
    odd = next((c for c in value if not (c.isalnum() or c in ".-:[]")), None)
    if odd is not None:
        raise bad(f"contains {odd!r}; only letters, digits, '.', '-', ':' and brackets around an IPv6 address belong in it")
    if value.count("[") != value.count("]") or value.count("[") > 1:
        raise bad("unbalanced or repeated brackets: write an IPv6 address as [2001:db8::5]:9092")
    if value.startswith("["):
        close = value.index("]")
        host, rest = value[1:close], value[close + 1:]
        if not rest.startswith(":"):
            raise bad("no port after the bracketed address" if not rest else f"{rest!r} after the ']' (expected :PORT)")
        port = rest[1:]
        if not host:
            raise bad("empty host between the brackets")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            what = "an IPv4 address" if re.fullmatch(r"[0-9.]+", host) else "a host name" if ":" not in host else None
            if what:
                raise bad(f"brackets go only around an IPv6 address, not {what}: write {host}:PORT") from None
            raise bad(f"{host!r} is not a valid IPv6 address") from None
    else:
        if "[" in value or "]" in value:
            raise bad("unbalanced or misplaced brackets: write an IPv6 address as [2001:db8::5]:9092")
        if value.count(":") == 0:
            raise bad("no port")
        if value.count(":") > 1:
            raise bad("an IPv6 address (or more than one ':') must be written in brackets, e.g. [2001:db8::5]:9092")
        host, _, port = value.partition(":")
        why = _valid_host(host)
        if why:
            raise bad(why)
    if not port:
        raise bad("empty port")
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise bad(f"port {port!r} is not a number 1-65535 (ASCII digits, no sign, no leading zeros)")
    return host, int(port)


def check_ca(path: Path) -> ssl.SSLContext:
    """Load the city CA certificate into a TLS client context (host names checked).

    Raises
    ------
    SetupError
        Missing, not a regular file (a folder, a FIFO: checked before it is opened),
        unreadable or not a PEM certificate.
    """
    fix = "get the city's ca.crt from the coordinator team"
    check_input_file("--ca", path, fix, inside="ca.crt")
    try:
        Path(path).read_bytes()
    except FileNotFoundError:
        raise SetupError(f"--ca {path}: file not found; fix: {fix}") from None
    except OSError as exc:
        raise SetupError(f"--ca {path}: cannot read it ({exc.strerror or exc}); fix: make it readable by "
                         f"{_user()} (ca.crt is not secret: `chmod 644 {shlex.quote(str(path))}`)") from None
    try:
        context = ssl.create_default_context(cafile=str(path))
    except ssl.SSLError:
        raise SetupError(f"--ca {path}: not a PEM CA certificate; fix: pass ca.crt (not a key, not server.crt) "
                         "from the coordinator team") from None
    from privacy import pki

    try:
        certs = pki.load_certificates(Path(path), "CA certificate", fix, pem_for="--ca")
    except pki.PKIError as exc:
        raise SetupError(str(exc)) from None
    if not any(pki.is_ca(c) for c in certs):
        raise SetupError(f"--ca {path}: is not a CA certificate (no CA:TRUE basic constraint: a server's or another "
                         f"leaf certificate); fix: pass the city's ca.crt (not server.crt), {fix}")
    return context


#: OpenSSL's verification results for a certificate outside its validity period.
_X509_NOT_YET_VALID, _X509_EXPIRED = 9, 10
_RENEW_FIX = ("ask the coordinator team to renew the coordinator's certificate (`fl-pki server-cert --force` on the "
              "coordinator, then restart fl-server), then start fl-client again")


def _peer_certificate(host: str, port: int, timeout: float):
    """The coordinator's certificate as presented, read without verifying it (None if it cannot be had)."""
    from cryptography import x509

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None
    except (OSError, ValueError):
        return None


def _out_of_date_message(host: str, port: int, ca: Path, code: int, timeout: float) -> str:
    """The message for a certificate that failed verification as expired or not yet valid.

    Tells which certificate is out of date (the coordinator's, else the city CA in ``--ca``),
    since when or from when, and this machine's clock (a wrong clock gives the same error).
    """
    from datetime import datetime, timezone

    from cryptography import x509

    now = datetime.now(timezone.utc)
    clock = f"this machine's clock says {now:%Y-%m-%d %H:%M} UTC"

    def state(cert) -> str | None:
        if now > cert.not_valid_after_utc:
            return f"has expired (it expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; {clock})"
        if now < cert.not_valid_before_utc:
            return f"is not yet valid (it is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; {clock})"
        return None

    where = f"--coordinator {host}:{port}"
    try:
        cas = x509.load_pem_x509_certificates(Path(ca).read_bytes())
    except (OSError, ValueError):
        cas = []
    ca_state = next((st for st in map(state, cas) if st), None)
    peer = _peer_certificate(host, port, timeout)
    peer_state = state(peer) if peer is not None else None
    if peer_state is None and ca_state is not None:  # the root of trust: a new server certificate would not do
        return (f"{where}: the city CA certificate in --ca {ca} {ca_state}; fix: if this machine's clock is right, ask "
                "the coordinator team for a new CA (`fl-pki init`), a coordinator certificate signed by it and the new "
                "ca.crt")
    if peer_state is None:  # not readable: say what OpenSSL said
        peer_state = ("is not yet valid" if code == _X509_NOT_YET_VALID else "has expired") + f" ({clock})"
    also = f" (the city CA certificate in --ca {ca} {ca_state.split(' (')[0]} too)" if ca_state else ""
    clock_fix = ("check this machine's clock first (`timedatectl`); if it is right, " if code == _X509_NOT_YET_VALID
                 else "if this machine's clock is wrong, correct it; otherwise ")
    return f"{where}: the coordinator's certificate {peer_state}{also}; fix: {clock_fix}{_RENEW_FIX}"


def check_coordinator(host: str, port: int, ctx: ssl.SSLContext, ca: Path, timeout: float) -> None:
    """TCP connect to the coordinator, then a TLS handshake verified against the CA.

    Raises
    ------
    SetupError
        Unreachable (names host, port, timeout), a certificate that has expired or is not yet
        valid (says which, since when, and to have it renewed: ``fl-pki server-cert --force``
        on the coordinator), or a certificate mismatch (names the CA file).
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise CoordinatorUnreachable(
            f"--coordinator {host}:{port}: not reachable ({exc.strerror or exc}, timeout {timeout:g} s); fix: check the "
            "address, that `fl-server start` is running there, and that the firewall lets this machine reach the port "
            f"(exit status {EXIT_UNREACHABLE}: a service manager may restart the node until the coordinator is up)") from None
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            tls.getpeercert()
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code in (_X509_EXPIRED, _X509_NOT_YET_VALID):
            raise SetupError(_out_of_date_message(host, port, ca, exc.verify_code, timeout)) from None
        raise SetupError(f"--coordinator {host}:{port}: its certificate does not verify against --ca {ca} "
                         f"({exc.verify_message}); fix: get the right ca.crt from the coordinator team, or dial the "
                         "name/IP listed in the coordinator's certificate (`fl-pki show server.crt`)") from None
    except ssl.SSLError as exc:
        raise SetupError(f"--coordinator {host}:{port}: TLS handshake failed ({exc.reason or exc}); fix: is the "
                         "coordinator started with TLS (not --insecure)?") from None
    except OSError as exc:
        raise SetupError(f"--coordinator {host}:{port}: connection dropped during the TLS handshake ({exc}); "
                         "fix: is this the coordinator's Fleet port?") from None
    finally:
        sock.close()


# --------------------------------------------------------------------------- supervision

#: One fl-client per node: an exclusive lock on this file in the state dir (it holds the owner's PID).
LOCK_FILE = "fl-client.lock"
#: Seconds the coordinator may still count a node online after its SuperNode vanished without
#: signing off (Flower: 2 heartbeats of 30 s), plus a margin; a refusal within it is retried once.
ONLINE_GRACE_S = 75.0
#: Seconds a SuperNode (or what is left of its process group) gets after SIGTERM before SIGKILL.
STOP_GRACE_S = 15.0
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when the process starting it dies (Linux).

    ``prctl(PR_SET_PDEATHSIG)``: the kernel signals the SuperNode as soon as ``fl-client``
    ends, even by SIGKILL, so it never outlives it. SIGTERM lets the SuperNode sign off at
    the coordinator (the node is shown offline at once and a restarted fl-client can join
    with the same key). If ``fl-client`` died before the signal was armed, the child
    signals itself. None where ``prctl`` is not available (not Linux).
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def _proc_stat(pid: int) -> dict | None:
    """``state``, ``ppid``, ``pgid`` of ``pid`` from ``/proc`` (None: no such process, or no ``/proc``)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return {"state": fields[0], "ppid": int(fields[1]), "pgid": int(fields[2])}


def _proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts as exited)."""
    st = _proc_stat(pid)
    if st is not None:
        return st["state"] in ("Z", "X")
    if Path("/proc/self/stat").exists():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def supernodes_using_key(key: Path) -> list[dict]:
    """SuperNode processes on this machine authenticating with ``key`` (Linux ``/proc``; else none).

    Returns
    -------
    list of dict
        ``pid``, ``pgid``, ``parent`` (its parent's PID and ``parent-cmd``), ``owner`` (the PID
        of the live ``fl-client`` that runs it, else None) and ``orphan``: True when its
        parent is gone (it was adopted by PID 1 or a systemd manager), i.e. the fl-client that
        started it died.
    """
    key = Path(key).expanduser().resolve()
    try:
        pids = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]
    except OSError:
        return []
    out = []
    for pid in pids:
        if pid == os.getpid():
            continue
        cmd = _proc_cmdline(pid)
        if "--auth-supernode-private-key" not in cmd[:-1]:
            continue
        arg = Path(cmd[cmd.index("--auth-supernode-private-key") + 1])
        if not arg.is_absolute():
            try:
                arg = Path(os.readlink(f"/proc/{pid}/cwd")) / arg
            except OSError:
                continue
        st = _proc_stat(pid)
        if st is None or st["state"] in ("Z", "X") or arg.resolve() != key:
            continue
        parent = _proc_cmdline(st["ppid"])
        owned = any(Path(a).name == "fl-client" or a == "clients.cli" for a in parent)
        adopted = st["ppid"] == 1 or not parent or Path(parent[0]).name.startswith("systemd")
        out.append({"pid": pid, "pgid": st["pgid"], "parent": st["ppid"], "parent-cmd": " ".join(parent)[:200],
                    "owner": st["ppid"] if owned else None, "orphan": adopted and not owned})
    return out


def stop_process_tree(pid: int, pgid: int | None = None, grace: float = STOP_GRACE_S) -> str:
    """SIGTERM ``pid`` (its whole process group when it leads one), SIGKILL after ``grace`` s.

    Returns
    -------
    str
        What it took: ``stopped by SIGTERM`` or ``killed (SIGKILL after N s)``.
    """
    group = pgid is not None and pgid == pid

    def send(sig: int) -> None:
        try:
            os.killpg(pid, sig) if group else os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    send(signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if _gone(pid):
            return "stopped by SIGTERM"
        time.sleep(0.1)
    send(signal.SIGKILL)
    return f"killed (SIGKILL after {grace:g} s)"


@dataclass
class NodeLaunch:
    """Everything needed to start ``flower-supernode`` for one department node."""

    coordinator: str
    ca: Path
    key: Path
    home: Path
    node_config: dict
    runtime_port: int = 9094
    reconnect_window: float = 300.0
    extra_env: dict = field(default_factory=dict)
    warm: bool = True

    def command(self) -> list[str]:
        """The SuperNode command line (node config passed as a TOML file).

        Flower's SuperNode through :mod:`clients.warm`, whose SuperExec runs every ClientApp
        task through :func:`clients.warm.run_task` (the app check of :mod:`clients.pinning`
        first). ``warm`` (default): one long-lived ClientApp worker, polling capped at
        ``CITYFED_NODE_POLL_S``; otherwise Flower's polling and a new process per message.
        Both print timestamped logs.
        """
        cfg_file = self.home / "node-config.toml"
        cfg_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in self.node_config.items()))
        head = [sys.executable, "-m", "clients.warm", "supernode" if self.warm else "cold-supernode"]
        cmd = [*head, "--superlink", self.coordinator,
               "--root-certificates", str(self.ca), "--auth-supernode-private-key", str(self.key),
               "--port", str(self.runtime_port), "--node-config", str(cfg_file),
               "--max-wait-time", str(self.reconnect_window)]
        return cmd

    def env(self) -> dict:
        """The SuperNode's environment: FLWR_HOME, fast SuperExec polling, this venv on PATH.

        ``CITYFED_DP_SEED_FROM_JOB`` (simulations only) is removed: a node's DP noise is
        always seeded from OS entropy. ``CITYFED_NODE_HOME`` (state dir: approved apps,
        quarantine, audit log) and ``CITYFED_NODE_KEY`` (signs audit entries) tell the
        ClientApp tasks where the node's app approvals live; ``PYTHONSAFEPATH=1`` keeps the
        working directory off ``sys.path``, so the node's code and the release a FAB is
        compared with are the installed ones.
        """
        from clients.pinning import HOME_ENV, KEY_ENV

        env = {**NODE_ENV, **os.environ, **self.extra_env, "FLWR_HOME": str(self.home),
               HOME_ENV: str(self.home), KEY_ENV: str(self.key), "PYTHONSAFEPATH": "1"}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # a department node's DP noise is always seeded from OS entropy, never from the
        # coordinator's job seed, whatever the shell exported (privacy.dp.dp_seeds)
        from privacy import SEED_FROM_JOB_ENV

        env.pop(SEED_FROM_JOB_ENV, None)
        return env

    def popen_kwargs(self) -> dict:
        """How the SuperNode process is started: its own process group, and on Linux a parent-death signal.

        ``fl-client`` can then end the SuperNode's whole tree (SuperExec, ClientApp worker)
        by process group, and the SuperNode gets SIGTERM the moment ``fl-client`` dies, even
        by SIGKILL (:func:`die_with_parent`).
        """
        kwargs: dict = {"process_group": 0}
        preexec = die_with_parent()
        if preexec is not None:
            kwargs["preexec_fn"] = preexec
        return kwargs


class Supervisor:
    """Run the SuperNode, restart it with exponential backoff when it exits, forward SIGTERM/SIGINT.

    The SuperNode never outlives ``fl-client`` and a node never runs twice:

    * it is started in its own process group (with its SuperExec and ClientApp worker), and
      on Linux with a parent-death signal (:func:`die_with_parent`): when ``fl-client`` dies,
      even by SIGKILL, the kernel sends the SuperNode SIGTERM and it signs off at the
      coordinator; whatever is left of its group when it exits is stopped too;
    * before starting, ``fl-client`` locks ``<state-dir>/fl-client.lock`` (a second fl-client
      on the same node exits 2) and looks for SuperNodes authenticating with the same key
      (:func:`supernodes_using_key`): one run by another live fl-client makes it exit 2, one
      left without its fl-client (an orphan) is stopped first;
    * a refusal of the key shortly after a SuperNode of this node vanished without signing
      off (SIGKILL, crash) is retried once after ``online_grace_s``: the coordinator still
      counts that node online until its heartbeats expire.

    Parameters
    ----------
    launch : NodeLaunch
    max_restarts : int
        Restarts in a row before giving up (a run of ``stable_s`` seconds resets the count).
    backoff : float
        First wait before a restart (seconds); doubled each time up to ``backoff_max``.
    backoff_max : float
    stable_s : float
        A child that ran this long is considered healthy (count and backoff reset).
    online_grace_s : float
        See above (default :data:`ONLINE_GRACE_S`).
    stop_grace_s : float
        SIGTERM to SIGKILL, for an orphaned SuperNode or what is left of a group.
    """

    def __init__(self, launch: NodeLaunch, *, max_restarts: int = 5, backoff: float = 2.0, backoff_max: float = 60.0,
                 stable_s: float = 300.0, online_grace_s: float = ONLINE_GRACE_S, stop_grace_s: float = STOP_GRACE_S,
                 console: Console | None = None):
        self.launch = launch
        self.max_restarts, self.backoff, self.backoff_max, self.stable_s = max_restarts, backoff, backoff_max, stable_s
        self.online_grace_s, self.stop_grace_s = online_grace_s, stop_grace_s
        self.console = console or Console(stderr=True, highlight=False, emoji=False)
        self.child: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.refused = threading.Event()
        self.joined = threading.Event()
        self.gave_up = threading.Event()
        self._unsigned_end: float | None = None

    def _signal(self, signum, _frame) -> None:
        self.stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _pump(self, stream) -> None:
        plain = not sys.stderr.isatty()  # a log file or the journal: no colour codes
        for line in iter(stream.readline, ""):
            sys.stderr.write(ANSI_ESCAPE.sub("", line) if plain else line)
            sys.stderr.flush()
            if any(m in line for m in REFUSED_MARKERS):
                self.refused.set()
            if "SuperNode ID:" in line:
                self.joined.set()
            if GAVE_UP_MARKER in line:
                self._gave_up_at = time.monotonic()
                self.gave_up.set()
        stream.close()

    def _wait_child(self) -> int:
        assert self.child is not None
        while True:
            try:
                return self.child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if self.stopping.is_set():
                    try:
                        return self.child.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        self.child.kill()
                        return self.child.wait()
                if self.gave_up.is_set() and time.monotonic() - self._gave_up_at > GAVE_UP_GRACE_S:
                    self.console.print(f"[yellow]fl-client: the SuperNode gave up reconnecting to the coordinator "
                                       f"but did not exit within {GAVE_UP_GRACE_S:g} s; ending it to start a new "
                                       "one[/]")
                    self.child.terminate()
                    try:
                        return self.child.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        self.child.kill()
                        return self.child.wait()

    def _end_group(self, pgid: int) -> None:
        """Stop what is left of the SuperNode's process group (its SuperExec, ClientApp worker)."""
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        end = time.monotonic() + self.stop_grace_s
        while time.monotonic() < end:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _take_lock(self):
        """Lock ``<state-dir>/fl-client.lock``; None (after saying why) when another fl-client holds it."""
        from privacy.safe_cli import pid_lock

        home = Path(self.launch.home)
        home.mkdir(parents=True, exist_ok=True)
        fh, holder = pid_lock(home / LOCK_FILE)  # held (and closed) by run()
        if fh is None:
            self.console.print(f"[bold red]fl-client: another fl-client (pid {escape(holder)}) runs this node[/] "
                               f"(state dir {escape(str(home))}); two would run two SuperNodes on one key. Fix: stop "
                               "that one first (systemctl stop ...), or give this one its own --state-dir and key")
            return None
        return fh

    def _clear_stale(self) -> bool:
        """Stop orphaned SuperNodes of this key; False (after saying why) when a live fl-client runs one."""
        found = supernodes_using_key(self.launch.key)
        for f in found:
            if f["orphan"]:
                continue
            by = (f"run by fl-client pid {f['owner']}" if f["owner"] is not None else
                  f"started by pid {f['parent']}: {f['parent-cmd']}")
            self.console.print(f"[bold red]fl-client: this node's key {escape(str(self.launch.key))} is in use by "
                               f"another SuperNode (pid {f['pid']}, {escape(by)})[/]: two SuperNodes must not share "
                               f"one key. Fix: stop {'that fl-client' if f['owner'] is not None else 'it'} first")
            return False
        for f in found:
            self.console.print(f"[yellow]fl-client: a SuperNode with this node's key is still running without its "
                               f"fl-client (pid {f['pid']}; its fl-client was killed?): stopping it first, so that "
                               "this node does not run twice[/]")
            how = stop_process_tree(f["pid"], f["pgid"], self.stop_grace_s)
            self.console.print(f"fl-client: orphaned SuperNode {f['pid']} {how}")
            if how.startswith("killed"):
                self._unsigned_end = time.monotonic()
        return True

    def run(self) -> int:
        """Supervise until stopped; return the exit status (see module docstring)."""
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        lock = self._take_lock()
        if lock is None:
            return EXIT_SETUP
        try:
            if not self._clear_stale():
                return EXIT_SETUP
            return self._supervise()
        finally:
            lock.close()

    def _supervise(self) -> int:
        failures = 0
        retried_online = False
        while not self.stopping.is_set():
            started = time.monotonic()
            self.refused.clear()
            self.joined.clear()
            self.gave_up.clear()
            self.child = subprocess.Popen(self.launch.command(), env=self.launch.env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, bufsize=1, **self.launch.popen_kwargs())
            pump = threading.Thread(target=self._pump, args=(self.child.stdout,), daemon=True)
            pump.start()
            rc = self._wait_child()
            pump.join(timeout=5)
            self._end_group(self.child.pid)
            if self.joined.is_set() and rc < 0:  # killed by a signal it could not handle: it did not sign off
                self._unsigned_end = time.monotonic()
            if self.stopping.is_set():
                self.console.print(f"fl-client: stopped (SuperNode exit status {rc})")
                return EXIT_OK
            if self.refused.is_set():
                since = None if self._unsigned_end is None else time.monotonic() - self._unsigned_end
                if since is not None and since < self.online_grace_s and not retried_online:
                    retried_online = True
                    wait = self.online_grace_s - since
                    self.console.print(f"[yellow]fl-client: the coordinator refused this node's key, but a SuperNode of "
                                       f"this node ended {since:.0f} s ago without signing off and may still count as "
                                       f"online there; retrying in {wait:.0f} s[/]")
                    if self.stopping.wait(wait):
                        return EXIT_OK
                    continue
                self.console.print("[bold red]fl-client: the coordinator refused this node's key[/] (not registered, or "
                                   "unregistered). Fix: give node.pub to the coordinator operator "
                                   "(`fl-server register node.pub`), then start fl-client again; if this key was "
                                   "unregistered it is never admitted again: make a new one (`fl-pki node-key "
                                   "--department ... --site ... --out <key folder> --force`, which keeps the old "
                                   "node.pub for the audit log) and send that node.pub.")
                return EXIT_REFUSED
            if time.monotonic() - started >= self.stable_s:
                failures = 0
            failures += 1
            if failures > self.max_restarts:
                self.console.print(f"[bold red]fl-client: SuperNode exited (status {rc}) {failures} times in a row; "
                                   f"giving up after --max-restarts {self.max_restarts}[/]")
                return EXIT_GAVE_UP
            wait = min(self.backoff * 2 ** (failures - 1), self.backoff_max)
            self.console.print(f"[yellow]fl-client: SuperNode exited (status {rc}); restart {failures}/"
                               f"{self.max_restarts} in {wait:g} s[/]")
            if self.stopping.wait(wait):
                return EXIT_OK
        return EXIT_OK


# --------------------------------------------------------------------------- command

#: Options without which the node cannot run (optional in the signature only so that the
#: sub-commands ``fl-client app ...`` / ``fl-client audit ...`` work without them).
RUN_REQUIRED = ("department", "site", "data", "policy", "coordinator", "ca", "key")
#: Written into the state dir when the node starts: lets ``fl-client app``/``audit`` find its key.
NODE_FILE = "node.json"


def data_env(date_format: str | None, ranges: Path | None, test_start: str | None = None) -> dict:
    """Environment that makes the node's ClientApp processes read ``--data`` as ``--check`` did.

    The node opens the file itself (``clients.node``: ``load_department(department, data)``);
    the loader takes its date format, ranges file and test start from ``CITYFED_DATE_FORMAT``,
    ``CITYFED_RANGES`` and ``CITYFED_TEST_START`` when none is passed.
    """
    from citydata.forecasting import TEST_START_ENV, parse_test_start
    from citydata.plausibility import RANGES_ENV
    from citydata.timestamps import DATE_FORMAT_ENV, check_date_format

    env = {}
    if test_start is not None:
        env[TEST_START_ENV] = parse_test_start(test_start).isoformat()
    if date_format is not None:
        env[DATE_FORMAT_ENV] = check_date_format(date_format) or ""
    if ranges is not None:
        env[RANGES_ENV] = str(Path(ranges).resolve())
    return env


def default_state_dir(department: str, site: str) -> Path:
    """``~/.cityfed/node-<department>-<site>`` (spaces in the site become ``_``)."""
    return Path.home() / ".cityfed" / f"node-{department}-{site.replace(' ', '_')}"


#: The Flower internals the node itself relies on (SuperNode, SuperExec, ClientApp worker; SecAgg+
#: and DP names): self-tested before a node starts (the ``app`` and ``audit`` sub-commands load none).
SEAMS = ("warm-worker", "logging", "dp", "secagg")


def fl_client(
    ctx: typer.Context,
    department: Annotated[Optional[str], typer.Option("--department", help="\\[required] This node's department: health, traffic or utility. Must match the policy's `department`.", show_default=False)] = None,
    site: Annotated[Optional[str], typer.Option("--site", help="\\[required] This node's site as named in the data file (e.g. Cleveland); it is the key of the node's privacy ledger.", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option("--data", help=f"\\[required] This department's records (CSV/Parquet in the department schema; README lists the columns). They never leave this machine. '{BUNDLED}' = the packaged real data (demos).", show_default=False)] = None,
    policy: Annotated[Optional[Path], typer.Option("--policy", help="\\[required] This department's privacy policy (TOML; examples/policies/). Every job is checked against it before any data is touched.", show_default=False)] = None,
    coordinator: Annotated[Optional[str], typer.Option("--coordinator", help="\\[required] HOST:PORT of the coordinator (fl-server start --port). HOST must be a name or IP in the coordinator's certificate.", show_default=False)] = None,
    ca: Annotated[Optional[Path], typer.Option("--ca", help="\\[required] The city's CA certificate (ca.crt from the coordinator team); the coordinator's certificate must verify against it.", show_default=False)] = None,
    key: Annotated[Optional[Path], typer.Option("--key", help="\\[required] This node's private key (node.key from `fl-pki node-key` on THIS machine; never copy it). Its node.pub must be registered by the coordinator. It also signs the node's audit log.", show_default=False)] = None,
    ledger: Annotated[Optional[Path], typer.Option("--ledger", help="Privacy ledger (SQLite) holding every DP release of this node: its lifetime budget. Keep it, back it up, never delete it. Default: <state-dir>/ledger.sqlite.")] = None,
    state_dir: Annotated[Optional[Path], typer.Option("--state-dir", help="Node working folder (FLWR_HOME: received app bundles, node-config.toml; apps/approved.json, apps/quarantine/, audit.jsonl). Default ~/.cityfed/node-<department>-<site>.")] = None,
    runtime_port: Annotated[int, typer.Option("--runtime-port", min=1, max=65535, help="Local port of the node's own Runtime API (127.0.0.1 only). Change it when several nodes run on one machine.")] = 9094,
    max_restarts: Annotated[int, typer.Option("--max-restarts", min=0, help="Restarts in a row of a failed SuperNode before giving up (exit 1).")] = 5,
    backoff: Annotated[float, typer.Option("--backoff", min=0.0, callback=finite_seconds("--backoff", 2, 3600), help="First wait before a restart, seconds; doubles each time; at most 3600.")] = 2.0,
    backoff_max: Annotated[float, typer.Option("--backoff-max", min=0.0, callback=finite_seconds("--backoff-max", 60, 86400), help="Longest wait between restarts, seconds; at most 86400.")] = 60.0,
    reconnect_window: Annotated[float, typer.Option("--reconnect-window", min=1.0, callback=finite_seconds("--reconnect-window", 300, 604800), help="Seconds the SuperNode keeps retrying a lost connection before it exits and is restarted; at most 604800 (7 days).")] = 300.0,
    connect_timeout: Annotated[float, typer.Option("--connect-timeout", min=0.1, callback=finite_seconds("--connect-timeout", 5, 600), help="Seconds for the start-up reachability and TLS checks; at most 600.")] = 5.0,
    cold: Annotated[bool, typer.Option("--cold", help="Start a new ClientApp process for every message and keep Flower's polling (3 s idle), as plain flower-supernode does. Default: one warm ClientApp worker per node and 0.1 s polling (clients/warm.py; docs/DEPLOYMENT.md §5). Both run only approved app code.")] = False,
    date_format: Annotated[Optional[str], typer.Option("--date-format", help="Order of the dates in --data when they are not year-first: DMY (18/04/2024, day first), MDY (04/18/2024, month first), ISO (the default: year first only), or a strftime pattern such as '%d.%m.%Y %H:%M'. Dates like 01/04/2024 are refused without it.", show_default=False)] = None,
    ranges: Annotated[Optional[Path], typer.Option("--ranges", help="TOML file that replaces the schema's plausibility ranges of some columns (README: plausibility ranges), e.g. \\[trestbps] max = 320. Out-of-range values are errors unless the file says action = \"missing\".", show_default=False)] = None,
    test_start: Annotated[Optional[str], typer.Option("--test-start", help="traffic/utility: first time of the test period in --data, YYYY-MM-DD or 'YYYY-MM-DD HH:MM' (windows whose targets all lie before it train, later ones are tested). Required for your own forecasting file (or CITYFED_TEST_START); keep it the same for every run. Not for health or the bundled data.", show_default=False)] = None,
    check: Annotated[bool, typer.Option("--check", help="Run the start-up checks, build this site's training arrays exactly as training will, print the record counts and data warnings, and exit (0 = ready).")] = False,
) -> None:
    """Run this department's node: join the city's federation and train under this department's own privacy policy.

    Checks everything first and exits with status 2 (4: the coordinator cannot be reached) naming the file and the fix: no empty
    option value, department, coordinator address, node key, policy (and that it allows this
    department's task), data file and site (the site's training arrays are built as training
    builds them; counts and data warnings are printed), CA, state folder (writable), ledger,
    coordinator reachable, coordinator certificate (in date, verified against the CA).
    Then runs Flower's SuperNode and restarts it with backoff if it fails; Ctrl-C/SIGTERM
    stops it. Exit 3: the coordinator refused the key (ask the operator to `fl-server
    register` your node.pub).

    The node runs only app code this department approved: a run's app bundle must be the
    cityfed release installed here, or approved with `fl-client app approve`; anything else
    is refused before it is installed or imported, and kept for `fl-client app review`.

    Sub-commands: [bold]app[/] (review, approve, revoke, list app bundles) and [bold]audit[/]
    (verify, show, export the node's signed audit log), e.g. `fl-client app list --state-dir DIR`.
    """
    if ctx.invoked_subcommand is not None:
        return  # `fl-client app ...` / `fl-client audit ...`: the node options are not needed
    from flower_compat import self_test

    self_test(SEAMS)  # the node itself loads Flower's internals: checked first (the sub-commands do not)
    for name in RUN_REQUIRED:
        if ctx.params.get(name) is None:
            param = next(p for p in ctx.command.params if p.name == name)
            raise click.MissingParameter(ctx=ctx, param=param)
    err = make_console(stderr=True)
    try:
        check_not_empty(ctx.params)  # before any Path("") (= the working folder) is used
        check_site_name(site)
        check_department(department)
        check_node_environment()
    except SetupError as exc:
        err.print(f"[bold red]fl-client: cannot start:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_SETUP) from None
    home = Path(state_dir or default_state_dir(department, site)).expanduser().resolve()
    ledger_path = Path(ledger or home / "ledger.sqlite").expanduser().resolve()
    try:
        host, port = parse_address(coordinator)
        fingerprint = check_key(key)
        check_policy(policy, department)
        report = check_data(department, data, site, date_format=date_format, ranges=None if ranges is None else str(ranges),
                            test_start=test_start)
        ctx_tls = check_ca(ca)  # every input file is checked before the first thing is written
        check_state_dir(home, "--state-dir" if state_dir else "--state-dir (default)")
        check_audit_log(home / "audit.jsonl")
        check_ledger_holds_audited_releases(ledger_path, home / "audit.jsonl", department, site,
                                            "--ledger" if ledger else "--ledger (default)")
        check_ledger(ledger_path, "--ledger" if ledger else "--ledger (default)")
        binding_note = check_key_ledger_binding(key, ledger_path, department, site,
                                                "--ledger" if ledger else "--ledger (default)")
        check_coordinator(host, port, ctx_tls, ca, connect_timeout)
    except SetupError as exc:
        err.print(f"[bold red]fl-client: cannot start:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_UNREACHABLE if isinstance(exc, CoordinatorUnreachable) else EXIT_SETUP) from None
    for note in report.warnings:
        err.print(f"[yellow]data warning:[/] {escape(note)}")
    if binding_note:
        err.print(f"[yellow]warning:[/] {escape(binding_note)}")
    err.print(escape(report.summary()))
    err.print(f"[green]fl-client ready[/]: {department}/{escape(site)}, key {fingerprint}, coordinator {host}:{port} "
              f"(TLS verified), ledger {escape(str(ledger_path))}")
    if check:
        raise typer.Exit(EXIT_OK)
    from clients.pinning import write_json

    write_json(home / NODE_FILE, {"department": department, "site": site, "key": str(Path(key).resolve())})
    node_config = {"department": department, "site": site,
                   "data": "" if data == BUNDLED else str(Path(data).resolve()),
                   "policy": str(Path(policy).resolve()), "ledger": str(ledger_path),
                   # the node's signed audit log (clients.node records jobs and releases there;
                   # clients.pinning the app decisions, through CITYFED_NODE_HOME/CITYFED_NODE_KEY)
                   "audit-log": str(home / "audit.jsonl"), "audit-key": str(Path(key).resolve())}
    launch = NodeLaunch(coordinator=coordinator, ca=Path(ca).resolve(), key=Path(key).resolve(), home=home,
                        node_config=node_config, runtime_port=runtime_port, reconnect_window=reconnect_window,
                        warm=not cold, extra_env=data_env(date_format, ranges, test_start))
    sup = Supervisor(launch, max_restarts=max_restarts, backoff=backoff, backoff_max=backoff_max, console=err)
    raise typer.Exit(sup.run())


# --------------------------------------------------------------------------- sub-commands: which node


class NoNodeNamed(SetupError):
    """No option or variable names a node, and there is not exactly one ``~/.cityfed/node-*`` folder."""


class NodeFileError(SetupError):
    """``<state-dir>/node.json`` (written by ``fl-client`` at each start) cannot be read or is damaged.

    Attributes
    ----------
    path : Path
        The file.
    problem : str
        What is wrong with it (the message without the fix).
    """

    def __init__(self, path: Path, problem: str, fix: str):
        super().__init__(f"{path}: {problem}; fix: {fix}")
        self.path, self.problem = path, problem


#: What ``fl-client`` and its node write in the state dir: a folder holding none of these is no node's.
NODE_MARKERS = (NODE_FILE, "ledger.sqlite", "audit.jsonl", "apps")


def check_node_home(home: Path, named: str, fix: str) -> None:
    """Refuse a state dir that is no node's: missing, not a folder, or holding nothing ``fl-client`` wrote.

    The ``app`` and ``audit`` sub-commands work on an existing node's state: a mistyped folder
    must not be created, nor an approval recorded where no node reads it.

    Parameters
    ----------
    home : Path
        The resolved state dir.
    named : str
        What gave it, for the message (``--state-dir``, ``$CITYFED_NODE_HOME``, ...).
    fix : str
        What to pass instead.

    Raises
    ------
    SetupError
        Naming ``named``, the folder and ``fix``.
    """
    new = " (a new node's is made by its first `fl-client` start, `--check` included)"
    if not home.exists():
        raise SetupError(f"{named} {home}: does not exist, so it is no node's state dir; fix: {fix}{new}")
    if not home.is_dir():
        raise SetupError(f"{named} {home}: is a file, not a folder; fix: {fix}")
    if not any((home / name).exists() for name in NODE_MARKERS):
        raise SetupError(f"{named} {home}: holds nothing fl-client wrote (no {NODE_FILE}, ledger.sqlite, audit.jsonl "
                         f"or apps/), so it is no node's state dir; fix: {fix}{new}")


def node_home(state_dir: Path | None = None, department: str | None = None, site: str | None = None) -> Path:
    """The state dir a sub-command works on: an existing node's (see :func:`check_node_home`).

    In order: ``--state-dir``; ``--department``/``--site`` (``fl-client``'s default); the
    same options given before the sub-command (``fl-client --state-dir D app list``);
    ``$CITYFED_NODE_HOME``; the only ``~/.cityfed/node-*`` folder. ``--department`` and
    ``--site`` get ``fl-client``'s own checks (:func:`check_department`,
    :func:`check_site_name`) wherever they are given.

    Parameters
    ----------
    state_dir, department, site : optional
        The sub-command's own options (the root command's are read from click's context).

    Returns
    -------
    Path
        The resolved state dir; it exists and holds something ``fl-client`` wrote.

    Raises
    ------
    NoNodeNamed
        Nothing names a node and there is not exactly one ``~/.cityfed/node-*`` folder.
    SetupError
        An option given empty (``--state-dir ""``), a bad department or site, only one of
        ``--department``/``--site``, or a state dir that is no node's.
    """
    from clients.pinning import HOME_ENV

    ctx = click.get_current_context(silent=True)
    root = ctx.find_root().params if ctx is not None else {}
    for params in ([ctx.params] if ctx is not None else []) + [root]:  # "" would be the working folder
        check_not_empty(params, ("state_dir", "department", "site", "key"))
    state_dir = state_dir or root.get("state_dir")
    department, site = department or root.get("department"), site or root.get("site")
    if site is not None:
        check_site_name(site)  # "../x" would name a folder outside ~/.cityfed
    if department is not None:
        check_department(department)
    fix = "pass the --state-dir fl-client runs with (it holds node.json and ledger.sqlite), e.g. /var/lib/cityfed-node"
    if state_dir:
        home = Path(state_dir).expanduser().resolve()
        check_node_home(home, "--state-dir", fix)
        return home
    if department and site:
        home = default_state_dir(department, site).expanduser().resolve()
        check_node_home(home, "--department/--site: state dir",
                        "pass the --department and --site fl-client runs with, or its --state-dir")
        return home
    if department or site:
        raise SetupError("--department and --site go together (they name ~/.cityfed/node-<department>-<site>); "
                         "fix: pass both, or --state-dir")
    if os.environ.get(HOME_ENV):
        home = Path(os.environ[HOME_ENV]).expanduser().resolve()
        check_node_home(home, f"${HOME_ENV}", f"set it to the --state-dir fl-client runs with, or unset it and {fix}")
        return home
    found = sorted(p for p in (Path.home() / ".cityfed").glob("node-*") if p.is_dir())
    if len(found) == 1:
        home = found[0].resolve()
        check_node_home(home, "the only node folder", fix)
        return home
    listed = f" (found: {', '.join(str(p) for p in found)})" if found else f" (no {Path.home() / '.cityfed'}/node-* folder)"
    raise NoNodeNamed(f"which node? pass --state-dir (the folder fl-client runs with) or --department and --site{listed}")


def node_key(home: Path, key: Path | None = None) -> Path | None:
    """The node's private key: ``--key``, else the one ``fl-client`` last ran with (``<state-dir>/node.json``).

    Parameters
    ----------
    home : Path
        The node's state dir.
    key : Path, optional
        ``--key`` of the sub-command (else the root command's).

    Returns
    -------
    Path or None
        None where no key is given and the state dir has no ``node.json``.

    Raises
    ------
    NodeFileError
        ``node.json`` cannot be read, is not a JSON object, or has no ``key`` naming a file.
    """
    ctx = click.get_current_context(silent=True)
    key = key or (ctx.find_root().params.get("key") if ctx is not None else None)
    if key:
        return Path(key).expanduser().resolve()
    path = Path(home) / NODE_FILE
    fix = f"pass --key with this node's node.key (fl-client rewrites {NODE_FILE} at its next start)"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise NodeFileError(path, "is a directory, not fl-client's node file", fix) from None
    except OSError as exc:
        raise NodeFileError(path, f"cannot read it ({exc.strerror or exc})", fix) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        bom = " (it starts with a byte-order mark)" if raw.startswith(b"\xef\xbb\xbf") else ""
        raise NodeFileError(path, f"not JSON{bom}: the file is damaged", fix) from None
    if not isinstance(data, dict):
        raise NodeFileError(path, f"is a JSON {type(data).__name__}, not a JSON object: the file is damaged", fix)
    recorded = data.get("key")
    if not isinstance(recorded, str) or not recorded.strip():
        raise NodeFileError(path, "no `key` naming the node's key file: the file is damaged", fix)
    return Path(recorded)


def signing_key(home: Path, key: Path | None = None) -> Path | None:
    """The key that signs an ``app`` decision's audit entry, checked before the decision is changed.

    Parameters
    ----------
    home : Path
        The node's state dir.
    key : Path, optional
        ``--key``; default the one ``node.json`` names (:func:`node_key`).

    Returns
    -------
    Path or None
        None where no key is known (the entry is then written unsigned, with a note).

    Raises
    ------
    SetupError
        ``node.json`` is damaged, or the key is not a readable, unencrypted EC private key
        (named as ``--key`` or as the key ``node.json`` names).
    """
    ctx = click.get_current_context(silent=True)
    given = key or (ctx.find_root().params.get("key") if ctx is not None else None)
    path = node_key(home, key)
    if path is None:
        return None
    named = "--key" if given else f"{Path(home) / NODE_FILE} names key"
    fix = "pass --key with this node's node.key (made on this machine by `fl-pki node-key`)"
    check_input_file(named, path, fix, inside="node.key")
    try:
        from privacy.audit import AuditError, load_private_key
    except Exception:  # noqa: BLE001 - pinning notes a missing audit module itself
        return path
    try:
        load_private_key(path)
    except AuditError as exc:
        reason = str(exc).removeprefix(f"audit signing key {path.expanduser()}").lstrip(": ")
        raise SetupError(f"{named} {path}: cannot sign the audit entry: {reason}") from None
    return path


def _out() -> Console:
    return make_console()


def _err() -> Console:
    return make_console(stderr=True)


class _Errors:
    """``with _Errors():`` prints an operator error (SetupError, PinningError) in red and exits 2, no traceback."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from clients.pinning import PinningError

        if isinstance(exc, (SetupError, PinningError)):
            _err().print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(EXIT_SETUP) from None
        return False


StateDirOpt = Annotated[Optional[Path], typer.Option("--state-dir", help="The node's state folder (fl-client --state-dir); it must exist and hold what fl-client wrote there (node.json, ledger.sqlite, audit.jsonl or apps/). Default: from --department/--site (~/.cityfed/node-<department>-<site>), else $CITYFED_NODE_HOME, else the only ~/.cityfed/node-* folder.", show_default=False)]
DepartmentOpt = Annotated[Optional[str], typer.Option("--department", help="With --site: the node's default state folder (checked as fl-client checks them).", show_default=False)]
SiteOpt = Annotated[Optional[str], typer.Option("--site", help="With --department: the node's default state folder.", show_default=False)]
KeyOpt = Annotated[Optional[Path], typer.Option("--key", help="Node key that signs the audit entry (checked before anything is recorded). Default: the key fl-client last ran with (<state-dir>/node.json).", show_default=False)]


# --------------------------------------------------------------------------- fl-client app

app_cmds = typer.Typer(
    suggest_commands=False,  # click says "Did you mean ...?" itself (typer repeated it)
    name="app",
    help=("The app bundles (FABs) this node runs. By default a node runs a run's app only if it is the cityfed "
          "release installed here, byte for byte; anything else is refused before it is installed or imported and "
          "kept in <state-dir>/apps/quarantine/.\n\n"
          "[bold]review[/] shows how a FAB differs (with diffs), [bold]approve[/] lets this node run one exact FAB "
          "(by its sha256), [bold]revoke[/] withdraws that, [bold]list[/] shows the release and the approvals. "
          "Exit codes: 0 ok, 2 bad input."),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)


def _decision(digest: str, findings: list, approved: dict) -> str:
    if digest in approved:
        return "[green]runs[/] (approved by this department)"
    if not findings:
        return "[green]runs[/] (identical to the installed release)"
    return "[bold red]refused[/] (differs from the installed release, not approved)"


@app_cmds.command("review")
def review_cmd(
    fab: Annotated[str, typer.Argument(help="A .fab file, the sha256 (or a prefix) of a quarantined FAB, or a Flower run ID this node refused.", show_default=False)],
    state_dir: StateDirOpt = None,
    department: DepartmentOpt = None,
    site: SiteOpt = None,
    diff: Annotated[bool, typer.Option("--diff/--no-diff", help="Print a unified diff of each differing .py file against the installed release.")] = True,
    context_lines: Annotated[int, typer.Option("--context", min=0, help="Lines of context around each change.")] = 3,
) -> None:
    """Show how an app bundle differs from the cityfed release installed on this node, file by file.

    Lists every file that is modified, extra, missing or not allowed (anything but .py files,
    pyproject.toml and Flower's .info/CONTENT), then a unified diff of each differing .py file
    (installed release -> FAB). Read it before `fl-client app approve`.
    """
    from rich.syntax import Syntax
    from rich.table import Table

    from clients import pinning

    with _Errors():
        home = node_home(state_dir, department, site)
        digest, content, where = pinning.resolve_fab(fab, home)
        approved = pinning.Approvals(home).approved()
        manifest = pinning.release_manifest()
    out = _out()
    runs = pinning.Quarantine(home).runs_of(digest)
    out.print(f"FAB sha256 [bold]{digest}[/]")
    out.print(f"  from: {escape(where)}" + (f"; refused in run(s) {', '.join(runs)}" if runs else ""))
    if content is None:
        out.print(f"  its bytes are not kept on this node; decision on this node: {_decision(digest, [None], approved)}")
        return
    files, findings = pinning.read_fab(content)
    if files:
        findings += pinning.compare(files, manifest)
    same = sum(1 for f in files if f.endswith(".py") and f in manifest) - sum(f.status == "modified" for f in findings)
    out.print(f"  {len(content)} bytes, {len(files)} files; {same} .py file(s) identical to the installed release "
              f"({len(manifest)} .py files, manifest {pinning.manifest_hash(manifest)[:16]})")
    out.print(f"  decision on this node: {_decision(digest, findings, approved)}")
    if not findings:
        return
    t = Table(title="files that differ")
    t.add_column("file", overflow="fold")
    t.add_column("status", no_wrap=True)
    t.add_column("detail", overflow="fold")
    for f in findings:
        size = f" ({len(files[f.path])} bytes, sha256 {pinning.sha256(files[f.path])[:16]})" \
            if f.status == "not allowed" and f.path in files else ""
        t.add_row(escape(f.path), escape(f.status), escape(f.detail + size))
    out.print(t)
    if not diff:
        return
    release = pinning.release_files()
    for f in findings:
        if f.path.endswith(".py") and f.status in ("modified", "extra", "missing"):
            text = pinning.file_diff(f.path, files.get(f.path), release.get(f.path), context_lines)
            if text:
                out.print(f"\n[bold]{escape(f.path)}[/] ({f.status})")
                out.print(Syntax(text, "diff", theme="ansi_dark", background_color="default", word_wrap=True))
        elif f.path == pinning.PYPROJECT and f.status == "components changed":
            out.print(f"\n[bold]pyproject.toml[/]: {escape(f.detail)}")


def _audit(home: Path, kind: str, key: Path | None, **fields) -> None:
    from clients import pinning

    if key is None:
        _err().print(f"[yellow]note:[/] no node key known for {escape(str(home))} (pass --key): the audit entry is unsigned")
    pinning.audit(home, kind, key_path=key, strict=True, **fields)


@app_cmds.command("approve")
def approve_cmd(
    sha256: Annotated[str, typer.Argument(help="The FAB's sha256 as in the refusal message (or a prefix of a quarantined FAB's).", show_default=False)],
    state_dir: StateDirOpt = None,
    department: DepartmentOpt = None,
    site: SiteOpt = None,
    key: KeyOpt = None,
) -> None:
    """Let this node run one exact app bundle (by the sha256 of its bytes), even though it differs from the release.

    Review it first (`fl-client app review`). Takes effect from the node's next task, without a
    restart; recorded in <state-dir>/apps/approved.json and in the node's audit log
    (app-approved). Refused (exit 2, nothing recorded) for a state dir that fl-client did not
    make, a damaged <state-dir>/node.json, or a key that cannot sign the audit entry. Undone
    (exit 1) if the audit entry cannot be written (a full disk, an unwritable audit.jsonl).
    """
    from clients import pinning

    with _Errors():
        home = node_home(state_dir, department, site)
        digest = pinning.full_sha256(sha256, home)
        signer = signing_key(home, key)  # before the decision: an approval is never left without its entry
        new = pinning.Approvals(home).approve(digest)
    known = pinning.Quarantine(home).fab_path(digest).is_file()
    if not new:
        _out().print(f"already approved: {digest}")
        return
    try:
        _audit(home, "app-approved", signer, **{"fab-sha256": digest, "by": pinning._user()})
    except pinning.PinningError as exc:  # an approval is never left in force without its entry
        try:
            pinning.Approvals(home).revoke(digest)
        except Exception as undo:  # noqa: BLE001 - said in words: the operator must revoke it
            _err().print(f"[red]approved without an audit entry[/] {digest}: {escape(str(exc))}; undoing the approval "
                         f"failed too ({escape(str(undo))}); fix: free the disk, then `fl-client app revoke {digest}`")
            raise typer.Exit(1) from None
        _err().print(f"[red]not approved[/] {digest}: {escape(str(exc))}; the approval was undone")
        raise typer.Exit(1) from None
    _out().print(f"[green]approved[/] {digest}: this node runs that app bundle from its next task")
    if not known:
        _err().print("[yellow]note:[/] this node has not quarantined that FAB; make sure you reviewed it "
                     "(`fl-client app review FILE.fab`)")


@app_cmds.command("revoke")
def revoke_cmd(
    sha256: Annotated[str, typer.Argument(help="An approved FAB's sha256 (or a prefix of a quarantined FAB's).", show_default=False)],
    state_dir: StateDirOpt = None,
    department: DepartmentOpt = None,
    site: SiteOpt = None,
    key: KeyOpt = None,
) -> None:
    """Withdraw an approval: from the node's next task on, that app bundle is refused again (unless it is the release).

    Recorded in <state-dir>/apps/approved.json and in the node's audit log (app-revoked).
    Refused (exit 2, nothing recorded) as `approve` is. If the audit entry cannot be written the
    revocation stays in force (refusing is the safe way) and the command exits 1, saying so.
    """
    from clients import pinning

    with _Errors():
        home = node_home(state_dir, department, site)
        digest = pinning.full_sha256(sha256, home)
        signer = signing_key(home, key)  # before the decision: a revocation is never left without its entry
        store = pinning.Approvals(home)
        if not store.revoke(digest):
            raise pinning.PinningError(f"{digest} is not approved in {store.path}; fix: `fl-client app list` shows "
                                       "the approved sha256 values")
    try:
        _audit(home, "app-revoked", signer, **{"fab-sha256": digest, "by": pinning._user()})
    except pinning.PinningError as exc:  # the revocation stays: refusing the bundle is the safe way
        _err().print(f"[yellow]revoked[/] {digest}, but {escape(str(exc))}; the revocation stays in force "
                     "(the node refuses that bundle) with no audit entry for it")
        raise typer.Exit(1) from None
    _out().print(f"[green]revoked[/] {digest}: this node refuses that app bundle from its next task")


@app_cmds.command("list")
def list_cmd(
    state_dir: StateDirOpt = None,
    department: DepartmentOpt = None,
    site: SiteOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the installed release (what runs without approval), the approved app bundles and the quarantined ones."""
    from rich.table import Table

    from clients import pinning

    with _Errors():
        home = node_home(state_dir, department, site)
        manifest = pinning.release_manifest()
        data = pinning.Approvals(home).load()
    q = pinning.Quarantine(home)
    runs = q.index()["runs"]
    quarantined = [{"sha256": d, "runs": q.runs_of(d),
                    "files": next((runs[r]["files"] for r in q.runs_of(d)), [])} for d in q.fabs()]
    release = {"manifest-sha256": pinning.manifest_hash(manifest), "files": len(manifest),
               "packages": {k: str(v) for k, v in pinning.release_dirs().items()}}
    if as_json:
        print(json.dumps({"state-dir": str(home), "release": release, "approved": data["approved"],
                          "revoked": data["revoked"], "quarantined": quarantined}, indent=2))
        return
    out = _out()
    out.print(f"node state: {escape(str(home))}")
    out.print(f"installed release: manifest sha256 [bold]{release['manifest-sha256']}[/] ({len(manifest)} .py files "
              f"in {', '.join(escape(v) for v in release['packages'].values())})")
    if not data["approved"]:
        out.print("approved app bundles: none (only the installed release runs)")
    else:
        t = Table(title="approved app bundles")
        for col in ("sha256", "approved at", "by"):
            t.add_column(col, no_wrap=col == "sha256", overflow="fold")
        for digest, info in sorted(data["approved"].items(), key=lambda kv: str(kv[1].get("approved-at", ""))):
            t.add_row(digest, escape(str(info.get("approved-at", ""))), escape(str(info.get("by", ""))))
        out.print(t)
    if quarantined:
        t = Table(title="quarantined (refused) app bundles")
        for col in ("sha256", "runs", "differs"):
            t.add_column(col, no_wrap=col == "sha256", overflow="fold")
        for row in quarantined:
            files = row["files"]
            shown = ", ".join(files[:4]) + (f", +{len(files) - 4}" if len(files) > 4 else "")
            t.add_row(row["sha256"], escape(", ".join(row["runs"])), escape(shown))
        out.print(t)


# --------------------------------------------------------------------------- fl-client audit


def _audit_default_log() -> Path:
    """``<state-dir>/audit.jsonl`` of the node the root options name (a bad one is refused, naming the option)."""
    from privacy.audit import AuditError

    try:
        return node_home() / "audit.jsonl"
    except NoNodeNamed:  # audit's own "does not exist" message then says where the log lives
        return Path.home() / ".cityfed" / "node-<department>-<site>" / "audit.jsonl"
    except SetupError as exc:
        raise AuditError(str(exc)) from None


def _audit_default_pub(log: Path) -> Path | None:
    """``node.pub`` next to the key the node last ran with: from the log's own folder (a state dir), else the node's."""
    from privacy.audit import AuditError

    for home in (lambda: Path(log).expanduser().resolve().parent, node_home):
        try:
            key = node_key(home())
        except NodeFileError as exc:  # say which file is damaged rather than "no public key found"
            raise AuditError(f"{exc.path}: {exc.problem}, so the node's key (and node.pub next to it) is not known; "
                             "fix: pass --pub with the node's node.pub") from None
        except SetupError:
            continue
        if key is not None and key.with_name("node.pub").is_file():
            return key.with_name("node.pub")
    return None


def _audit_command() -> click.Command:
    """``fl-client audit`` from :mod:`privacy.audit_cli` (imported only when it is used)."""
    try:
        from privacy.audit_cli import make_audit_app
    except Exception as exc:  # noqa: BLE001 - fl-client must run without it
        reason = f"{type(exc).__name__}: {exc}"

        @click.command("audit", help=f"The node's audit log (unavailable here: {reason}).")
        def unavailable() -> None:
            _err().print(f"[bold red]error:[/] `fl-client audit` is not available: privacy.audit_cli cannot be "
                         f"imported ({escape(reason)}); fix: reinstall cityfed on this node")
            raise typer.Exit(EXIT_SETUP)

        return unavailable
    cmd = typer.main.get_command(make_audit_app("node", _audit_default_log, _audit_default_pub))
    cmd.name = "audit"
    return cmd


class _NodeGroup(TyperGroup):
    """``fl-client``: the node itself (no sub-command) plus ``app`` and a lazily imported ``audit`` group."""

    def list_commands(self, ctx):
        return [*super().list_commands(ctx), *(["audit"] if "audit" not in self.commands else [])]

    def get_command(self, ctx, name):
        if name == "audit" and name not in self.commands:
            self.add_command(_audit_command(), "audit")
        return super().get_command(ctx, name)


app = typer.Typer(name="fl-client", cls=_NodeGroup, add_completion=False, suggest_commands=False, rich_markup_mode="rich",
                  epilog="Errors print a message naming the file, field and fix, never a traceback (it could show records); add --debug anywhere on the command line for the full traceback.",
                  pretty_exceptions_show_locals=False)
# the help wraps by paragraph at the terminal's width (the docstring's own line breaks cut sentences)
app.callback(invoke_without_command=True, help="\n\n".join(
    " ".join(p.split()) for p in inspect.cleandoc(fl_client.__doc__ or "").split("\n\n")))(fl_client)
app.add_typer(app_cmds, name="app")


def main() -> None:
    """Console entry point ``fl-client``."""
    from privacy.safe_cli import run_app

    from flower_compat import check_version

    # the version gate first, for every command (no Flower import); the node itself also self-tests
    # the internals it loads (SEAMS, in fl_client), `app ...` and `audit ...` do not load them
    run_app(app, "fl-client", startup=check_version)  # errors: a message, never a traceback (--debug shows it)


if __name__ == "__main__":
    main()
