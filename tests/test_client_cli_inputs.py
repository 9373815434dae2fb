"""fl-client's bad start-up input: each gets exit 2 (never the generic internal error), a message
naming the option, the value and the fix, and nothing written before the input is checked.

The state folder (a file, under a file, not writable: --check must catch it), empty option
values (an unset variable in a service unit), --department spelling, FIFOs and directories
given as --policy/--key/--ca/--ranges (a FIFO used to hang), an expired or not-yet-valid
coordinator certificate, the ledger's folder, and a policy saved with a byte-order mark.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clients import cli as client_cli  # noqa: E402
from privacy import pki  # noqa: E402
from tls_helpers import TLSServer  # noqa: E402

runner = CliRunner(env={"COLUMNS": "250"})
POLICY = ROOT / "examples" / "policies" / "health.toml"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pki_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    past = datetime.now(timezone.utc) - timedelta(days=400)
    pki.create_ca(d / "ca", now=past)  # valid today (3650 days)
    pki.issue_server_cert(d / "ca", d / "server", ["127.0.0.1", "localhost"])
    pki.issue_server_cert(d / "ca", d / "expired", ["127.0.0.1", "localhost"], days=30, now=past)
    pki.issue_server_cert(d / "ca", d / "future", ["127.0.0.1", "localhost"], days=30,
                          now=datetime.now(timezone.utc) + timedelta(days=5))
    pki.create_node_key(d / "node", "health", "Cleveland")
    return d


@pytest.fixture(scope="module")
def tls_server(pki_files):
    srv = TLSServer(pki_files / "server" / "server.crt", pki_files / "server" / "server.key")
    yield srv
    srv.close()


def client_args(pki_files, tmp_path, port, **over) -> list[str]:
    """fl-client --check arguments that pass; ``over`` replaces (or, with None as value, adds a flag)."""
    args = {"--department": "health", "--site": "Cleveland", "--data": "bundled", "--policy": str(POLICY),
            "--coordinator": f"127.0.0.1:{port}", "--ca": str(pki_files / "ca" / "ca.crt"),
            "--key": str(pki_files / "node" / "node.key"), "--state-dir": str(tmp_path / "node"),
            "--connect-timeout": "2", "--check": None}
    args.update(over)
    out = []
    for k, v in args.items():
        out += [k] if v is None else [k, v]
    return out


def run_client(args) -> tuple[int, str, BaseException | None]:
    """Exit code, output (whitespace folded) and the uncaught exception (None when fl-client handled it)."""
    res = runner.invoke(client_cli.app, args)
    text = " ".join((res.output + (res.stderr if res.stderr_bytes is not None else "")).split())
    exc = None if res.exception is None or isinstance(res.exception, SystemExit) else res.exception
    return res.exit_code, text, exc


def assert_setup_error(code, text, exc, *needles):
    assert exc is None, f"uncaught {type(exc).__name__}: {exc}"
    assert code == client_cli.EXIT_SETUP, text
    assert "fix:" in text and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)


class FifoReleaser:
    """From ``after`` s on, open ``fifo`` for writing every 0.2 s, so a reader blocked on it (the bug) is released."""

    def __init__(self, fifo: Path, after: float):
        self.fifo, self.done = fifo, threading.Event()
        self.thread = threading.Thread(target=self._run, args=(after,), daemon=True)
        self.thread.start()

    def _run(self, after: float):
        if self.done.wait(after):
            return
        while not self.done.wait(0.2):
            try:
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader: nobody blocked on it
                pass

    def stop(self):
        self.done.set()
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------- 1. the state folder


def test_state_dir_that_is_a_file_is_a_setup_error(pki_files, tls_server, tmp_path):
    f = tmp_path / "state"
    f.write_text("not a folder\n")
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--state-dir": str(f)}))
    assert_setup_error(code, text, exc, f"--state-dir {f}", "is a file")
    assert f.read_text() == "not a folder\n"


def test_state_dir_under_a_file_is_a_setup_error(pki_files, tls_server, tmp_path):
    f = tmp_path / "state"
    f.write_text("")
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port,
                                             **{"--state-dir": str(f / "node")}))
    assert_setup_error(code, text, exc, f"--state-dir {f / 'node'}", f"{f} is a file")


def test_state_dir_that_cannot_be_written_fails_the_check(pki_files, tls_server, tmp_path, monkeypatch):
    """--check probes the state folder (create and remove a file): a ready node must be able to start."""
    import tempfile

    def refuse(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    state = tmp_path / "node"
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port,
                                             **{"--ledger": str(tmp_path / "elsewhere" / "ledger.sqlite")}))
    assert_setup_error(code, text, exc, f"--state-dir {state}", "not writable", "Permission denied")
    assert "ready" not in text


def test_state_dir_probe_leaves_nothing_behind(tmp_path):
    state = tmp_path / "a" / "b" / "node"
    client_cli.check_state_dir(state)
    assert state.is_dir() and list(state.iterdir()) == []
    for d in (tmp_path / "a", tmp_path / "a" / "b", state):  # every folder it made is private, as the state folder
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def _unprivileged() -> list[str] | None:
    """A command prefix that takes away root's power to write anywhere (None: cannot be done here)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    probe = subprocess.run([setpriv, "--bounding-set", "-dac_override,-dac_read_search", "true"], capture_output=True)
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"] if probe.returncode == 0 else None


@pytest.mark.parametrize("case", ["read-only state folder", "unwritable parent"])
def test_unwritable_state_dir_fails_check_for_real(pki_files, tls_server, tmp_path, case):
    """The tester's case end to end: --check said ready, then the start failed (exit 1) writing node.json."""
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot make a folder unwritable")
    ro = tmp_path / "ro"
    ro.mkdir()
    state = ro if case == "read-only state folder" else ro / "node"
    ro.chmod(0o500)
    try:
        args = client_args(pki_files, tmp_path, tls_server.port,
                           **{"--state-dir": str(state), "--ledger": str(tmp_path / "ledger" / "ledger.sqlite")})
        proc = subprocess.run([*prefix, sys.executable, "-m", "clients.cli", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120, env={**os.environ, "COLUMNS": "250"})
    finally:
        ro.chmod(0o700)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, text
    assert f"--state-dir {state}" in text and "Permission denied" in text and "fix:" in text, text
    assert "Traceback" not in text and "ready" not in text, text


# --------------------------------------------------------------------------- 2. empty values

_EMPTY = ["--state-dir", "--ledger", "--data", "--ranges", "--policy", "--key", "--ca", "--department",
          "--date-format", "--site", "--coordinator"]


@pytest.mark.parametrize("option", _EMPTY)
def test_empty_option_value_is_refused_before_anything_is_written(pki_files, tls_server, tmp_path, monkeypatch, option):
    """``--state-dir ""`` (an unset variable in a unit file) used to mean the working folder: a fresh ledger there."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{option: ""}))
    assert_setup_error(code, text, exc, option)
    assert "empty" in text, text
    assert list(cwd.iterdir()) == [], "written into the working folder"
    assert not (tmp_path / "node").exists() and not (tmp_path / "home").exists()


def test_blank_state_dir_is_refused_too(pki_files, tls_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--state-dir": "  "}))
    assert_setup_error(code, text, exc, "--state-dir", "empty")
    assert not (tmp_path / "  ").exists()


def test_empty_state_dir_message_says_what_to_give(pki_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the bug put a fresh ledger
    code, text, exc = run_client(client_args(pki_files, tmp_path, 1, **{"--state-dir": ""}))
    assert_setup_error(code, text, exc, "--state-dir is empty", "state folder", "leave the option out")


@pytest.mark.parametrize(("value", "needle"), [("HEALTH", "did you mean 'health'"), ("weather", "health, traffic, utility"),
                                               ("traffic ", "health, traffic, utility")])
def test_department_is_checked_before_the_policy(pki_files, tmp_path, monkeypatch, value, needle):
    monkeypatch.chdir(tmp_path)
    code, text, exc = run_client(client_args(pki_files, tmp_path, 1, **{"--department": value}))
    assert_setup_error(code, text, exc, f"--department {value!r}", needle)
    assert "--policy" not in text, text
    assert not (tmp_path / "node").exists()



@pytest.mark.parametrize("value", ["nan", "abc", "-1", "0", "inf"])
def test_bad_cpu_watts_per_core_is_refused_at_start_up(pki_files, tmp_path, monkeypatch, value):
    """A bad CITYFED_CPU_WATTS_PER_CORE failed every train and evaluate task of the node (an unnamed
    ValueError in the node's log, the coordinator seeing only failures); it is refused at start-up."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CITYFED_CPU_WATTS_PER_CORE", value)
    code, text, exc = run_client(client_args(pki_files, tmp_path, 1))
    assert_setup_error(code, text, exc, f"CITYFED_CPU_WATTS_PER_CORE={value!r}", "unset it")
    assert not (tmp_path / "node").exists()



@pytest.mark.parametrize("value", ["bogus", "cuda:x"])
def test_bad_device_is_refused_at_start_up(pki_files, tmp_path, monkeypatch, value):
    """A bad CITYFED_DEVICE failed every task of the node (named only in the node's log)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CITYFED_DEVICE", value)
    code, text, exc = run_client(client_args(pki_files, tmp_path, 1))
    assert_setup_error(code, text, exc, "CITYFED_DEVICE", value)
    assert not (tmp_path / "node").exists()


def test_empty_state_dir_of_app_subcommand_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(client_cli.app, ["app", "list", "--state-dir", ""])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "--state-dir is empty" in text and "fix:" in text, text
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 3. FIFOs and folders


@pytest.mark.parametrize("option", ["--policy", "--key", "--ca", "--ranges"])
def test_fifo_is_refused_without_hanging(pki_files, tls_server, tmp_path, option):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # without the check fl-client blocks reading it until the releaser opens the FIFO (40 s); with
    # it, it answers in well under 2 s here (the first call includes imports): the 30 s bound
    # leaves a slow, loaded CI box room and still fails a blocking read (it was 6 s of an 8 s release)
    releaser = FifoReleaser(fifo, 40.0)
    try:
        t0 = time.monotonic()
        code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{option: str(fifo)}))
        took = time.monotonic() - t0
    finally:
        releaser.stop()
    assert took < 30, f"fl-client blocked {took:.1f} s on the FIFO"
    assert_setup_error(code, text, exc, f"{option} {fifo}", "named pipe (FIFO)", "regular file")
    assert not (tmp_path / "node").exists()


@pytest.mark.parametrize("option", ["--policy", "--key", "--ca", "--ranges"])
def test_directory_is_named_as_such(pki_files, tls_server, tmp_path, option):
    folder = tmp_path / "folder"
    folder.mkdir()
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{option: str(folder)}))
    assert_setup_error(code, text, exc, f"{option} {folder}", "is a directory")
    assert "owns the key" not in text and "Is a directory" not in text, text


# --------------------------------------------------------------------------- 4. coordinator certificate dates


@pytest.mark.parametrize(("which", "needle"), [("expired", "has expired"), ("future", "not yet valid")])
def test_coordinator_certificate_out_of_date_says_renew_it(pki_files, tmp_path, which, needle):
    srv = TLSServer(pki_files / which / "server.crt", pki_files / which / "server.key")
    try:
        code, text, exc = run_client(client_args(pki_files, tmp_path, srv.port))
    finally:
        srv.close()
    assert_setup_error(code, text, exc, f"127.0.0.1:{srv.port}", needle, "fl-pki server-cert --force",
                       "restart fl-server", "coordinator team")
    assert "get the right ca.crt" not in text, text


def test_coordinator_expiry_names_the_date(pki_files):
    srv = TLSServer(pki_files / "expired" / "server.crt", pki_files / "expired" / "server.key")
    try:
        with pytest.raises(client_cli.SetupError) as info:
            ca = pki_files / "ca" / "ca.crt"
            client_cli.check_coordinator("127.0.0.1", srv.port, client_cli.check_ca(ca), ca, 2.0)
    finally:
        srv.close()
    end = (datetime.now(timezone.utc) - timedelta(days=370)).strftime("%Y-%m-%d")
    assert f"expired on {end}" in str(info.value), str(info.value)


def test_expired_city_ca_is_named(tmp_path, monkeypatch):
    """An expired CA cannot be fixed by a new coordinator certificate: the message says the CA."""
    past = datetime.now(timezone.utc) - timedelta(days=400)
    pki.create_ca(tmp_path / "ca", now=past, days=30)
    pki.issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["127.0.0.1"], days=20, now=past)
    ca = tmp_path / "ca" / "ca.crt"
    srv = TLSServer(tmp_path / "srv" / "server.crt", tmp_path / "srv" / "server.key")
    try:
        with pytest.raises(client_cli.SetupError) as both:
            client_cli.check_coordinator("127.0.0.1", srv.port, client_cli.check_ca(ca), ca, 2.0)
        monkeypatch.setattr(client_cli, "_peer_certificate", lambda *a: None)  # say the server's cert is unreadable
        with pytest.raises(client_cli.SetupError) as ca_only:
            client_cli.check_coordinator("127.0.0.1", srv.port, client_cli.check_ca(ca), ca, 2.0)
    finally:
        srv.close()
    assert "the coordinator's certificate has expired" in str(both.value) and f"--ca {ca} has expired too" in str(both.value)
    assert f"the city CA certificate in --ca {ca} has expired" in str(ca_only.value)
    assert "fl-pki init" in str(ca_only.value) and "fix:" in str(ca_only.value)


# --------------------------------------------------------------------------- 5. nitpicks


def test_policy_message_names_the_file_once(pki_files, tls_server, tmp_path):
    bad = tmp_path / "policy.toml"
    bad.write_text(POLICY.read_text().replace("max_epsilon = 8.0", 'max_epsilon = "eight"'))
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--policy": str(bad)}))
    assert_setup_error(code, text, exc, f"--policy {bad}: field 'max_epsilon'")
    assert f"{bad}: {bad}" not in text, text


def test_policy_with_byte_order_mark_says_so(pki_files, tls_server, tmp_path):
    bom = tmp_path / "policy.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + POLICY.read_bytes())
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--policy": str(bom)}))
    assert_setup_error(code, text, exc, f"--policy {bom}", "byte-order mark", "without BOM")


def test_ledger_under_a_file_is_named_without_errno(pki_files, tls_server, tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port,
                                             **{"--ledger": str(f / "ledger.sqlite")}))
    assert_setup_error(code, text, exc, f"--ledger {f / 'ledger.sqlite'}", f"{f} is a file")
    assert "[Errno" not in text, text


def test_ledger_that_is_a_directory(pki_files, tls_server, tmp_path):
    d = tmp_path / "ledgers"
    d.mkdir()
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--ledger": str(d)}))
    assert_setup_error(code, text, exc, f"--ledger {d}", "is a directory", str(d / "ledger.sqlite"))


def test_ledger_that_is_another_database_has_one_fix_and_is_left_as_it_was(pki_files, tls_server, tmp_path):
    """Another SQLite database given as --ledger: refused with the ledger's own fix only (the
    message had two, 'Fix: choose another ledger path.; fix: pass a writable path ...'), the file unchanged."""
    import sqlite3

    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("create table t(x)")
    con.commit()
    con.close()
    before = other.read_bytes()
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--ledger": str(other)}))
    assert_setup_error(code, text, exc, f"--ledger {other}", "not a privacy ledger")
    messages = text.split("fl-client: cannot start:")[1:]
    assert messages and all(m.lower().count("fix:") == 1 for m in messages), text
    assert other.read_bytes() == before


def test_new_nested_ledger_folders_are_private(pki_files, tls_server, tmp_path):
    ledger = tmp_path / "a" / "b" / "ledger.sqlite"
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--ledger": str(ledger)}))
    assert code == 0 and exc is None, text
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "node"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_ca_option_refuses_a_certificate_that_is_not_a_ca(pki_files):
    """`--ca server.crt` (its help says "not server.crt") passed the start-up check."""
    crt = pki_files / "server" / "server.crt"
    with pytest.raises(client_cli.SetupError) as info:
        client_cli.check_ca(crt)
    msg = str(info.value)
    assert msg.startswith(f"--ca {crt}") and "not a CA certificate" in msg and "ca.crt" in msg, msg
    client_cli.check_ca(pki_files / "ca" / "ca.crt")  # the CA itself passes


def test_fl_client_help_wraps_by_paragraph_and_keeps_its_example():
    """`fl-client --help` kept the docstring's line breaks (sentences cut at a fixed column whatever the terminal's
    width) and rich ate `[trestbps]` from the --ranges example as markup."""
    from typer.testing import CliRunner

    res = CliRunner(env={"COLUMNS": "400"}).invoke(client_cli.app, ["--help"])
    text = res.output
    assert res.exit_code == 0, text
    assert "no empty option value, department, coordinator address, node key, policy" in text, text
    assert "[trestbps] max = 320" in " ".join(text.split()), text


@pytest.mark.parametrize("option", ["--backoff", "--backoff-max", "--reconnect-window", "--connect-timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "1e300"])
def test_fl_client_seconds_options_refuse_nan_infinity_and_absurd_values(pki_files, tmp_path, option, value):
    """click's ``min=`` lets NaN through: ``--backoff nan`` made every restart wait ``sleep(nan)``
    (ValueError after the first failure), and ``--backoff 1e300 --backoff-max 1e300`` never restarted.
    Refused before anything starts (exit 2), as fl-server's seconds options are."""
    code, text, exc = run_client(client_args(pki_files, tmp_path, 1, **{option: value}))
    assert exc is None, f"uncaught {type(exc).__name__}: {exc}"
    assert code == 2, text
    assert option in text and "fix:" in text and "Traceback" not in text, text
    assert not (tmp_path / "node").exists()


def _own_key(pki_files, tmp_path) -> Path:
    """A copy of the module's node key for one test: a key is bound to the ledger it spends against, so a test
    that spends budget under it must not leave the shared key bound to its ledger."""
    import shutil

    d = tmp_path / "own-key"
    d.mkdir(mode=0o700)
    for name in ("node.key", "node.pub"):
        shutil.copy2(pki_files / "node" / name, d / name)
    return d / "node.key"


def _spend_one_round(state: Path, key: Path) -> float:
    """What a node that trained one DP round leaves in its state dir: a committed ledger row and its audit entry."""
    from privacy.audit import AuditLog
    from privacy.ledger import PrivacyLedger, Release

    ledger = PrivacyLedger(state / "ledger.sqlite")
    rid = ledger.begin(Release(noise_multiplier=1.0, sample_rate=0.25, steps=8, delta=1e-4, run_id="r1", round=1,
                               site="Cleveland", department="health"), max_epsilon=8.0, delta=1e-4)
    ledger.commit(rid)
    eps = ledger.epsilon("Cleveland", 1e-4)
    AuditLog(state / "audit.jsonl", key_path=key).append(
        "release", department="health", site="Cleveland", run="r1", round=1, mechanism="dp-sgd", noise_multiplier=1.0,
        sample_rate=0.25, steps=8, delta=1e-4, epsilon_before=0.0, epsilon_after=eps)
    return eps


@pytest.mark.parametrize("loss", ["deleted", "older copy"])
def test_a_ledger_that_lost_releases_its_audit_log_records_is_refused(pki_files, tls_server, tmp_path, loss):
    """A node whose ledger was deleted (or replaced by an older backup) started at a smaller spent budget,
    although its own signed audit log, in the same state dir, records the releases (independent
    reliability review, 2026-12-07): it now refuses to start, naming both files and the fix."""
    import shutil

    state = tmp_path / "node"
    state.mkdir(mode=0o700)
    key = _own_key(pki_files, tmp_path)
    if loss == "older copy":
        from privacy.ledger import PrivacyLedger

        PrivacyLedger(state / "ledger.sqlite")
        shutil.copy(state / "ledger.sqlite", tmp_path / "backup.sqlite")  # a backup taken before the round
    assert _spend_one_round(state, key) > 0
    for p in state.glob("ledger.sqlite*"):
        p.unlink()
    if loss == "older copy":
        shutil.copy(tmp_path / "backup.sqlite", state / "ledger.sqlite")
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--key": str(key)}))
    assert_setup_error(code, text, exc, str(state / "ledger.sqlite"), str(state / "audit.jsonl"), "1 release")
    assert "restore" in text


def test_a_ledger_with_every_audited_release_starts(pki_files, tls_server, tmp_path):
    state = tmp_path / "node"
    state.mkdir(mode=0o700)
    key = _own_key(pki_files, tmp_path)
    _spend_one_round(state, key)
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--key": str(key)}))
    assert code == 0 and exc is None, text


def _check_with(pki_files, tmp_path, port, key: Path, state: Path):
    return run_client(client_args(pki_files, tmp_path, port, **{"--key": str(key), "--state-dir": str(state)}))


def test_a_key_that_spent_budget_is_refused_with_a_second_fresh_ledger(pki_files, tls_server, tmp_path):
    """One node key, started with another state folder (a second unit file, another account's default, a
    typo in --state-dir), got a fresh ledger: its spent budget started again (independent reliability
    review, 2026-12-07, H1's second case). The key is now bound to the ledger it spends against."""
    key = _own_key(pki_files, tmp_path)
    first, second = tmp_path / "node-a", tmp_path / "node-b"
    code, text, exc = _check_with(pki_files, tmp_path, tls_server.port, key, first)
    assert code == 0 and exc is None, text
    assert _spend_one_round(first, key) > 0
    code, text, exc = _check_with(pki_files, tmp_path, tls_server.port, key, second)
    assert_setup_error(code, text, exc, f"--key {key}", str(first / "ledger.sqlite"), "1 release",
                       f"--ledger {first / 'ledger.sqlite'}")
    code, text, exc = _check_with(pki_files, tmp_path, tls_server.port, key, first)  # its own ledger: fine
    assert code == 0 and exc is None, text


def test_a_key_whose_ledger_is_gone_is_refused_with_a_fresh_one(pki_files, tls_server, tmp_path):
    key = _own_key(pki_files, tmp_path)
    first, second = tmp_path / "node-a", tmp_path / "node-b"
    assert _check_with(pki_files, tmp_path, tls_server.port, key, first)[0] == 0
    _spend_one_round(first, key)
    import shutil

    shutil.rmtree(first)  # the whole state folder lost (a disk, a migration without it)
    code, text, exc = _check_with(pki_files, tmp_path, tls_server.port, key, second)
    assert_setup_error(code, text, exc, f"--key {key}", str(first / "ledger.sqlite"), "not there", "restore")


def test_a_key_whose_first_ledger_released_nothing_moves_to_a_new_one(pki_files, tls_server, tmp_path):
    """A ledger with no release of the site (a node set up twice before its first round) holds no budget to keep."""
    key = _own_key(pki_files, tmp_path)
    assert _check_with(pki_files, tmp_path, tls_server.port, key, tmp_path / "node-a")[0] == 0
    code, text, exc = _check_with(pki_files, tmp_path, tls_server.port, key, tmp_path / "node-b")
    assert code == 0 and exc is None, text
    _spend_one_round(tmp_path / "node-b", key)
    code, text, exc = _check_with(pki_files, tmp_path, tls_server.port, key, tmp_path / "node-a")
    assert code == client_cli.EXIT_SETUP and str(tmp_path / "node-b" / "ledger.sqlite") in text, text


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_node_key_other_users_can_read_is_refused(pki_files, tls_server, tmp_path, mode):
    """A world- or group-readable node.key was accepted with a warning (as ssh does not: it refuses such
    a key; fl-pki refuses ca.key so). It signs the node's audit log and is its identity: exit 2."""
    import shutil

    key = tmp_path / "keys" / "node.key"
    key.parent.mkdir()
    shutil.copy(pki_files / "node" / "node.key", key)
    key.chmod(mode)
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--key": str(key)}))
    assert_setup_error(code, text, exc, f"--key {key}", "chmod 600")
    assert not (tmp_path / "node").exists()


@pytest.mark.parametrize("damage", ["folder", "cut"])
def test_an_audit_log_that_would_refuse_the_next_entry_stops_the_node_at_start(pki_files, tls_server, tmp_path, damage):
    """`fl-client --check` passed a state dir whose audit.jsonl was a folder, or whose log was cut (its
    head file records more entries); then every task failed at the node with AuditError, the coordinator
    seeing only "could not complete" (independent reliability review, 2026-12-07). Exit 2 at start now."""
    from privacy.audit import AuditLog

    state = tmp_path / "node"
    state.mkdir(mode=0o700)
    log = state / "audit.jsonl"
    if damage == "folder":
        log.mkdir()
    else:
        a = AuditLog(log, key_path=pki_files / "node" / "node.key")
        for i in range(3):
            a.append("job", run="r", round=i)
        log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:2]))  # the last entry cut off
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port))
    assert_setup_error(code, text, exc, str(log))


def test_a_whole_audit_log_passes_the_start_check(pki_files, tls_server, tmp_path):
    from privacy.audit import AuditLog

    state = tmp_path / "node"
    state.mkdir(mode=0o700)
    AuditLog(state / "audit.jsonl", key_path=pki_files / "node" / "node.key").append("job", run="r", round=1)
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port))
    assert code == 0 and exc is None, text


# --------------------------------------------------------------------------- --test-start (forecasting split)


@pytest.fixture(scope="module")
def own_traffic_file(tmp_path_factory):
    from citydata import TrafficCounts

    f = TrafficCounts().raw_frame()
    path = tmp_path_factory.mktemp("own") / "counts.csv"
    f[f["detector"] == 3].to_csv(path, index=False)
    return path


def _traffic_args(pki_files, tmp_path, port, path, **over):
    return client_args(pki_files, tmp_path, port, **{"--department": "traffic", "--site": "detector-3", "--data": str(path),
                                                     "--policy": str(ROOT / "examples" / "policies" / "traffic.toml"), **over})


def test_an_own_forecasting_file_needs_a_test_start(pki_files, tls_server, tmp_path, own_traffic_file, monkeypatch):
    """Without one the split would follow the file's first and last timestamp (privacy review 2026-12-07, H2)."""
    monkeypatch.delenv("CITYFED_TEST_START", raising=False)
    code, text, exc = run_client(_traffic_args(pki_files, tmp_path, tls_server.port, own_traffic_file))
    assert_setup_error(code, text, exc, f"--data {own_traffic_file}", "no test start", "--test-start", "CITYFED_TEST_START")
    code, text, exc = run_client(_traffic_args(pki_files, tmp_path, tls_server.port, own_traffic_file,
                                               **{"--test-start": "2024-05-07 12:00"}))
    assert exc is None and code == client_cli.EXIT_OK, text
    assert "1772 training and 620 test windows (test from 2024-05-07 12:00:00)" in text, text


@pytest.mark.parametrize("over,needles", [
    ({"--test-start": "07/05/2024"}, ["--test-start", "'07/05/2024' is not a date", "YYYY-MM-DD"]),
    ({"--test-start": "2024-02-30"}, ["--test-start", "not a calendar date"]),
    ({"--test-start": "2030-01-01"}, ["yields 2395 training and 0 test windows with the test start 2030-01-01 00:00:00",
                                      "choose a test start"]),
    ({"--test-start": "2024-05-07", "--data": "bundled"}, ["--test-start", "bundled sites have their own"]),
])
def test_a_bad_test_start_is_named(pki_files, tls_server, tmp_path, own_traffic_file, over, needles):
    code, text, exc = run_client(_traffic_args(pki_files, tmp_path, tls_server.port, own_traffic_file, **over))
    assert_setup_error(code, text, exc, *needles)


def test_a_test_start_for_health_is_refused(pki_files, tls_server, tmp_path):
    code, text, exc = run_client(client_args(pki_files, tmp_path, tls_server.port, **{"--test-start": "2024-01-01"}))
    assert_setup_error(code, text, exc, "--test-start", "health is not split in time")


def test_the_test_start_reaches_the_nodes_clientapp_processes():
    from citydata.forecasting import TEST_START_ENV

    assert client_cli.data_env(None, None, "2024-05-07 12:00") == {TEST_START_ENV: "2024-05-07T12:00:00"}
    assert TEST_START_ENV not in client_cli.data_env(None, None)
