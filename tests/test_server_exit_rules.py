"""The CLI exit rule for ``fl-server console`` and copy-pasteable commands in hints.

The rule (README, ``fl-server --help``): exit 0 = done, exit 2 = input the operator can fix (the
message names the option, file or value and the fix), exit 1 = failed otherwise; no traceback
without ``--debug``.

* ``fl-server console`` given a port in use (or a --host that is not an address of this machine)
  exits 2 with the message ``fl-server start`` prints for it (the same check), before it writes
  its token file; so do its other bad inputs (state dir, token file, TLS files, port numbers).
* A command printed in a hint (``fix: `fl-pki node-key ... --site VA Long Beach` ``) is quoted
  with ``shlex.quote`` wherever it holds a value the user gave (a site, a path): pasted into a
  shell it gets that value back as one word.

Nothing here serves: ``uvicorn.run`` is replaced by a stand-in that fails the test. Sockets are
bound on 127.0.0.1 only and closed by the fixtures.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from privacy import pki  # noqa: E402
from server import cli as server_cli  # noqa: E402
from server import console  # noqa: E402

BIN = Path(sys.executable).parent
runner = CliRunner(env={"COLUMNS": "250"})
#: Site names as departments' data files spell them (a space, an apostrophe).
SITES = ["VA Long Beach", "St. Mary's"]


def _text(res) -> str:
    return " ".join((res.output + (res.stderr if res.stderr_bytes is not None else "")).split())


def _words_after(command: str, option: str) -> str:
    """The word after ``option`` in ``command`` as a POSIX shell splits it."""
    words = shlex.split(command)
    return words[words.index(option) + 1]


def _backticked(text: str, starts: str) -> str:
    """The first `...` span of ``text`` that starts with ``starts``."""
    found = [m for m in re.findall(r"`([^`]*)`", text) if m.startswith(starts)]
    assert found, f"no `{starts} ...` in: {text}"
    return found[0]


@pytest.fixture(autouse=True)
def never_serve(monkeypatch):
    import uvicorn

    def refuse(*args, **kw):
        raise AssertionError("fl-server console went on to serve; it should have refused its input")

    monkeypatch.setattr(uvicorn, "run", refuse)


@pytest.fixture
def busy_port():
    """A port on 127.0.0.1 another process (this test) listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def state(tmp_path) -> Path:
    """A coordinator state dir as the console needs it (with runs/); no coordinator behind it."""
    sd = tmp_path / "state"
    (sd / "runs").mkdir(parents=True)
    return sd


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pki")
    pki.create_ca(d / "ca")
    key, cert = pki.issue_server_cert(d / "ca", d / "server", ["127.0.0.1", "localhost"])
    return cert, key


def _console(sd: Path, *args: str):
    return runner.invoke(server_cli.app, ["console", "--state-dir", str(sd), *args])


# --------------------------------------------------------------------------- 1. port in use


def test_console_on_a_busy_port_exits_2_with_the_message_start_gives(state, busy_port):
    res = _console(state, "--port", str(busy_port))
    text = _text(res)
    assert res.exit_code == 2, text
    with pytest.raises(server_cli.CliError) as start:  # what `fl-server start` refuses the port with
        server_cli.check_port_free("127.0.0.1", busy_port)
    assert start.value.code == 2
    assert f"error: {' '.join(str(start.value).split())}" in text
    assert f"--port {busy_port}" in text and "fix:" in text and "another --port" in text
    assert not (state / console.TOKEN_FILE).exists()  # refused before anything is written


def test_fl_server_console_on_a_busy_port_as_the_operator_runs_it(state, busy_port):
    """The installed script: exit 2, one line, no traceback."""
    res = subprocess.run([str(BIN / "fl-server"), "console", "--port", str(busy_port), "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "250"})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --host 127.0.0.1 --port") and "fix:" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_python_m_server_cli_console_on_a_busy_port_exits_2(state, busy_port):
    """``python -m server.cli`` (as tests and developers start it) keeps the exit codes too."""
    res = subprocess.run([sys.executable, "-m", "server.cli", "console", "--port", str(busy_port), "--state-dir",
                          str(state)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "250"})
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: --host 127.0.0.1 --port") and "CliError" not in res.stderr, res.stderr


@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])
def test_a_host_that_is_not_this_machines_exits_2_naming_host(host, state, busy_port, server_tls):
    cert, key = server_tls
    res = _console(state, "--host", host, "--port", str(busy_port), "--allow-remote", "--certfile", str(cert),
                   "--keyfile", str(key))
    text = _text(res)
    assert res.exit_code == 2, text
    assert f"--host {host}" in text and "fix:" in text and "address of this machine" in text, text
    assert not (state / console.TOKEN_FILE).exists()
    # fl-server start's check says the same (the fix is about --host, not about another process)
    with pytest.raises(server_cli.CliError, match="address of this machine") as start:
        server_cli.check_port_free(host, busy_port)
    assert start.value.code == 2


# --------------------------------------------------------------------------- 3. other bad input of fl-server console


@pytest.mark.parametrize("port", ["0", "70000", "abc", "-1"])
def test_console_port_out_of_range_or_not_a_number_exits_2(state, port):
    res = _console(state, "--port", port)
    assert res.exit_code == 2 and "--port" in _text(res), _text(res)
    assert not (state / console.TOKEN_FILE).exists()


def test_console_state_dir_missing_or_a_file_exits_2(tmp_path):
    (tmp_path / "a-file").write_text("x")
    for sd, says in ((tmp_path / "missing", "no such folder"), (tmp_path / "a-file", "not a folder"),
                     (tmp_path / "a-file" / "below", "is a file")):
        res = _console(sd)
        text = _text(res)
        assert res.exit_code == 2 and "--state-dir" in text and says in text and "fix:" in text, text


def test_console_state_dir_it_cannot_write_the_token_in_exits_2(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    if os.geteuid() != 0:
        sd = tmp_path / "read-only"
        sd.mkdir(mode=0o500)
    else:  # root writes anywhere on a normal file system; sysfs refuses new files even to root
        sd = Path("/sys/kernel")
        if not sd.is_dir() or os.access(sd / console.TOKEN_FILE, os.F_OK):
            pytest.skip("no folder this user cannot write in")
    res = _console(sd, "--runs-dir", str(runs))
    text = _text(res)
    assert res.exit_code == 2, text
    assert f"--state-dir {sd}" in text and console.TOKEN_FILE in text and "fix:" in text, text
    assert "Traceback" not in text and "raised at" not in text


def test_console_token_file_that_is_a_folder_exits_2(state):
    (state / console.TOKEN_FILE).mkdir(mode=0o700)
    res = _console(state)
    text = _text(res)
    assert res.exit_code == 2, text
    assert str(state / console.TOKEN_FILE) in text and "folder" in text and "fix:" in text, text
    assert "chmod" not in text  # not a permission problem
    (state / console.TOKEN_FILE).chmod(0o755)
    res = _console(state)
    assert res.exit_code == 2 and "folder" in _text(res) and "chmod" not in _text(res), _text(res)


def test_console_token_file_that_is_not_text_exits_2(state):
    path = state / console.TOKEN_FILE
    path.write_bytes(b"\xff\xfe\xfa not a token, not even UTF-8 \xff\n")
    path.chmod(0o600)
    res = _console(state)
    text = _text(res)
    assert res.exit_code == 2 and str(path) in text and "fix:" in text, text


def test_console_token_file_fix_is_a_command_that_names_that_file(tmp_path):
    sd = tmp_path / "coordinator state"
    path = sd / console.TOKEN_FILE
    console.load_token(sd)
    path.chmod(0o644)
    with pytest.raises(console.ConsoleError) as err:
        console.load_token(sd)
    fix = str(err.value).split("fix: ", 1)[1]
    assert fix.startswith(f"chmod 600 {shlex.quote(str(path))}"), fix
    assert shlex.split(fix.split(",")[0]) == ["chmod", "600", str(path)]


def test_console_empty_host_exits_2(state, server_tls):
    cert, key = server_tls
    res = _console(state, "--host", "", "--allow-remote", "--certfile", str(cert), "--keyfile", str(key))
    text = _text(res)
    assert res.exit_code == 2 and "--host" in text and "fix:" in text, text
    assert not (state / console.TOKEN_FILE).exists()


def test_console_tls_files_that_are_not_a_certificate_and_its_key_exit_2(state, tmp_path, server_tls, busy_port):
    cert, key = server_tls
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM\n")
    for c, k in ((junk, key), (cert, junk), (key, cert)):
        res = _console(state, "--host", "127.0.0.2", "--allow-remote", "--certfile", str(c), "--keyfile", str(k))
        text = _text(res)
        assert res.exit_code == 2, text
        assert "--certfile" in text and "--keyfile" in text and "fix:" in text and "fl-pki" in text, text
    assert not (state / console.TOKEN_FILE).exists()


# --------------------------------------------------------------------------- 2. quoted commands in hints


def _key_in_use(monkeypatch, tmp_path, site: str, nodes=lambda info: []):
    """``fl-server register`` of a key the SuperLink says is in use; ``nodes(info)``: the node list it gives."""
    keys = tmp_path / "keys"
    pki.create_node_key(keys, "health", site)
    pub = keys / "node.pub"
    info = pki.load_public_key(pub)

    def in_use(sd, *args, **kw):
        raise server_cli.CliError(f"`flwr {' '.join(args)}` failed: [code: 23] Public key already in use.", 1)

    monkeypatch.setattr(server_cli, "flwr", in_use)
    monkeypatch.setattr(server_cli, "registered_nodes_by_key", lambda sd: nodes(info))
    res = runner.invoke(server_cli.app, ["register", str(pub), "--state-dir", str(tmp_path / "state")])
    text = _text(res)
    assert res.exit_code == 1 and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("site", SITES)
def test_key_in_use_hint_quotes_the_site(site, tmp_path, monkeypatch):
    text = _key_in_use(monkeypatch, tmp_path, site)
    assert "already registered" in text, text
    command = _backticked(text, "fl-pki node-key")
    assert _words_after(command, "--site") == site, command
    assert _words_after(command, "--department") == "health", command


@pytest.mark.parametrize("site", SITES)
def test_unregistered_key_hint_quotes_the_site(site, tmp_path, monkeypatch):
    text = _key_in_use(monkeypatch, tmp_path, site, lambda info: [
        {"node-id": "42", "status": "unregistered", "unregistered-at": "2026-01-01", "fingerprint": info.fingerprint}])
    assert "was unregistered" in text, text
    assert _words_after(_backticked(text, "fl-pki node-key"), "--site") == site


def test_not_started_hint_quotes_the_state_dir(tmp_path):
    sd = tmp_path / "coordinator state"
    res = runner.invoke(server_cli.app, ["nodes", "--state-dir", str(sd)])
    text = _text(res)
    assert res.exit_code == 3, text
    assert _words_after(_backticked(text, "fl-server start"), "--state-dir") == str(sd)


def test_second_start_hint_quotes_the_state_dir(tmp_path):
    sd = tmp_path / "coordinator state"
    msg = str(server_cli._second_start(sd, "1234"))
    assert f"--state-dir {shlex.quote(str(sd))} talks to it" in msg, msg


def test_client_not_writable_hint_quotes_the_folder(tmp_path, monkeypatch):
    import tempfile

    from clients import cli as client_cli

    folder = tmp_path / "node state"
    folder.mkdir()

    def denied(*args, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(client_cli.SetupError) as err:
        client_cli.check_writable(folder, "--state-dir", folder)
    msg = str(err.value)
    assert shlex.split(_backticked(msg, "sudo chown"))[-1] == str(folder), msg
    assert shlex.split(_backticked(msg, "chmod 700")) == ["chmod", "700", str(folder)], msg


def test_client_cannot_create_state_dir_hint_quotes_it(tmp_path, monkeypatch):
    from clients import cli as client_cli

    home = tmp_path / "node state"

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(client_cli, "make_private_dirs", denied)
    with pytest.raises(client_cli.SetupError) as err:
        client_cli.check_state_dir(home)
    assert shlex.split(_backticked(str(err.value), "sudo install"))[-1] == str(home), str(err.value)


def test_client_key_readable_by_others_hint_quotes_it(tmp_path, capsys):
    from clients import cli as client_cli

    keys = tmp_path / "my keys"
    pki.create_node_key(keys, "health", "VA Long Beach")
    key = keys / "node.key"
    key.chmod(0o644)
    with pytest.raises(client_cli.SetupError) as info:  # refused since 2026-12-07 (was a warning)
        client_cli.check_key(key)
    err = " ".join(str(info.value).split())
    fix = err.split("fix: ", 1)[1].split(" (and", 1)[0]
    assert shlex.split(fix) == ["chmod", "600", str(key)], err


def test_fl_pki_next_steps_quote_the_paths(tmp_path):
    from privacy.pki_cli import app as pki_app

    ca, srv = tmp_path / "city ca", tmp_path / "server files"
    res = runner.invoke(pki_app, ["init", "--out", str(ca)])
    assert res.exit_code == 0, res.output
    nxt = next(line for line in res.output.splitlines() if line.startswith("Next: "))
    assert _words_after(nxt.removeprefix("Next: "), "--ca-dir") == str(ca), nxt
    res = runner.invoke(pki_app, ["server-cert", "--ca-dir", str(ca), "--out", str(srv), "--san", "127.0.0.1"])
    assert res.exit_code == 0, res.output
    check = next(line for line in res.output.splitlines() if line.startswith("Check it with: "))
    command = check.removeprefix("Check it with: ")
    assert _words_after(command, "--ca") == str(ca / pki.CA_CERT), check
    assert _words_after(command, "--cert") == str(srv / "server.crt"), check


# --------------------------------------------------------------------------- 4. a damaged coordinator.json


@pytest.mark.parametrize("content, says", [
    ("{bad\n", "not JSON"),
    ("[1, 2]\n", "not a JSON object"),
    ('{"address": 5, "ca": null}\n', "'address'"),
    ('{"ca": "/x/ca.crt"}\n', "'address'"),
    ('{"address": "127.0.0.1:9092", "ca": 7}\n', "'ca'"),
])
@pytest.mark.parametrize("command", [["nodes"], ["run", "--department", "health", "--wait-start", "0"]])
def test_damaged_coordinator_json_is_named_as_damaged_with_the_fix(tmp_path, content, says, command):
    """Was: exit 3 'no coordinator set up ... (missing .../coordinator.json)' for a file that is there."""
    sd = tmp_path / "coordinator state"
    sd.mkdir()
    (sd / "coordinator.json").write_text(content)
    res = runner.invoke(server_cli.app, [*command, "--state-dir", str(sd)])
    text = _text(res)
    assert res.exit_code == 2, text
    assert f"{sd / 'coordinator.json'}: damaged" in text and says in text and "missing" not in text, text
    assert _words_after(_backticked(text, "fl-server start"), "--state-dir") == str(sd), text
    assert "Traceback" not in text
    assert (sd / "coordinator.json").read_text() == content  # nothing changed


def test_coordinator_json_without_the_connection_names_the_missing_file(tmp_path):
    sd = tmp_path / "state"
    sd.mkdir()
    (sd / "coordinator.json").write_text('{"address": "127.0.0.1:9092", "ca": null, "insecure": true}')
    res = runner.invoke(server_cli.app, ["nodes", "--state-dir", str(sd)])
    text = _text(res)
    assert res.exit_code == 3, text
    assert "missing" in text and "config.toml" in text and f"missing {sd / 'coordinator.json'}" not in text, text


# --------------------------------------------------------------------------- 5. the console's certificate, as start checks it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("when, says", [(-400, "expired on"), (400, "not valid before")])
def test_console_refuses_a_certfile_out_of_date_as_start_does(state, tmp_path, when, says):
    """Was: HTTPS served with an expired certificate without a word (fl-server start refuses it, exit 2)."""
    from datetime import datetime, timedelta, timezone

    then = datetime.now(timezone.utc) + timedelta(days=when)
    pki.create_ca(tmp_path / "ca", now=then)
    key, cert = pki.issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["127.0.0.1"], days=30, now=then)
    res = _console(state, "--host", "0.0.0.0", "--allow-remote", "--certfile", str(cert), "--keyfile", str(key),
                   "--port", str(_free_port()))
    text = _text(res)
    assert res.exit_code == 2, text
    assert f"--certfile {cert}" in text and says in text and "fix:" in text and "fl-pki server-cert" in text, text
    assert not (state / console.TOKEN_FILE).exists()
    # the same words as fl-server start's check (one check, server/start_checks.py)
    with pytest.raises(server_cli.CliError) as start:
        server_cli.check_tls_files(tmp_path / "ca" / "ca.crt", cert, key, "127.0.0.1", 1)
    assert says in str(start.value)


def test_console_refuses_a_keyfile_of_another_certificate(state, tmp_path, server_tls):
    cert, _ = server_tls
    pki.create_ca(tmp_path / "ca")
    other_key, _ = pki.issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["127.0.0.1"])
    res = _console(state, "--host", "0.0.0.0", "--allow-remote", "--certfile", str(cert), "--keyfile", str(other_key),
                   "--port", str(_free_port()))
    text = _text(res)
    assert res.exit_code == 2 and "--keyfile" in text and "fix:" in text, text
    assert not (state / console.TOKEN_FILE).exists()
