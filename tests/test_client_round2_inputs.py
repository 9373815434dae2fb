"""Bad input to ``fl-client app``/``audit``, ``fl-pki show`` and ``CITYFED_GRID_POLL_S`` (round 2 of the bad-input review).

Fast: no network, no training. Each refusal is checked for its exit status (2), a message that
names the option, variable or file with the bad value and a fix, and that nothing was written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clients import cli as client_cli  # noqa: E402
from clients import pinning  # noqa: E402

runner = CliRunner(env={"COLUMNS": "250"})
SHA = "1" * 64


def cli(*args) -> tuple[int, str]:
    res = runner.invoke(client_cli.app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, " ".join(res.output.split())


def tree(path: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``path``: to show that nothing changed."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """An empty $HOME (no ~/.cityfed) and no $CITYFED_NODE_HOME: only what the test names is a node."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path / "home"))
    monkeypatch.delenv(pinning.HOME_ENV, raising=False)
    monkeypatch.delenv(pinning.KEY_ENV, raising=False)
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


@pytest.fixture(scope="module")
def node_key(tmp_path_factory) -> Path:
    from privacy import pki

    keys = tmp_path_factory.mktemp("keys")
    pki.create_node_key(keys, "health", "Cleveland")
    return keys / "node.key"


def node_state(path: Path, key: Path) -> Path:
    """A state dir as fl-client leaves it after a start (node.json naming its key)."""
    pinning.write_json(path / client_cli.NODE_FILE, {"department": "health", "site": "Cleveland", "key": str(key)})
    return path


# --------------------------------------------------------------------------- D11: which node


APP_COMMANDS = [("app", "approve", SHA), ("app", "revoke", SHA), ("app", "list"), ("app", "review", SHA[:12])]


@pytest.mark.parametrize("command", APP_COMMANDS, ids=lambda c: c[1])
def test_app_commands_refuse_a_state_dir_that_does_not_exist(home, tmp_path, command):
    typo = tmp_path / "node" / "typo-dir"
    code, text = cli(*command, "--state-dir", typo)
    assert code == 2, text
    assert f"--state-dir {typo}" in text and "does not exist" in text and "fix:" in text, text
    assert "Traceback" not in text
    assert not typo.exists() and not typo.parent.exists()  # nothing created: the approval cannot land in a typo


@pytest.mark.parametrize("command", APP_COMMANDS, ids=lambda c: c[1])
def test_app_commands_refuse_a_folder_no_node_wrote(home, tmp_path, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = cli(*command, "--state-dir", empty)
    assert code == 2, text
    assert f"--state-dir {empty}" in text and "node.json" in text and "fix:" in text, text
    assert list(empty.iterdir()) == []


def test_a_state_dir_that_is_a_file_is_refused(home, tmp_path):
    f = tmp_path / "state"
    f.write_text("x")
    code, text = cli("app", "approve", SHA, "--state-dir", f)
    assert code == 2 and f"--state-dir {f}" in text and "not a folder" in text and "fix:" in text, text
    assert f.read_text() == "x"


@pytest.mark.parametrize(("args", "needle"), [
    (["--department", "nosuch", "--site", "x"], "--department 'nosuch'"),
    (["--department", "Health", "--site", "x"], "did you mean 'health'"),
    (["--department", "health", "--site", "../x"], "--site '../x'"),
    (["--department", "health", "--site", "a/b"], "--site 'a/b'"),
    (["--department", "health", "--site", ".."], "--site '..'"),
])
@pytest.mark.parametrize("where", ["after", "before"])  # `fl-client app list --site` and `fl-client --site .. app list`
def test_department_and_site_get_fl_clients_checks(home, args, needle, where):
    command = ["app", "list"]
    code, text = cli(*(command + args if where == "after" else args + command))
    assert code == 2, text
    assert needle in text and "fix:" in text, text
    assert list(home.iterdir()) == []  # no ~/.cityfed/node-health-../x


def test_department_and_site_of_a_node_that_never_ran_are_refused(home):
    code, text = cli("app", "approve", SHA, "--department", "health", "--site", "Cleveland")
    assert code == 2, text
    assert "--department/--site" in text and str(home / ".cityfed" / "node-health-Cleveland") in text, text
    assert "fix:" in text and not (home / ".cityfed").exists()


def test_node_home_variable_naming_no_node_is_refused(home, tmp_path, monkeypatch):
    monkeypatch.setenv(pinning.HOME_ENV, str(tmp_path / "gone"))
    code, text = cli("app", "list")
    assert code == 2 and f"${pinning.HOME_ENV}" in text and str(tmp_path / "gone") in text and "fix:" in text, text
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize(("content", "needle"), [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"department": "health"}', "no `key`"),
    ('{"key": 5}', "no `key`"),
    ("\ufeff{}", "not JSON"),
])
@pytest.mark.parametrize("verb", ["approve", "revoke"])
def test_a_damaged_node_json_is_named_and_nothing_changes(home, tmp_path, node_key, content, needle, verb):
    state = node_state(tmp_path / "node", node_key)
    if verb == "revoke":
        pinning.Approvals(state).approve(SHA)
    (state / client_cli.NODE_FILE).write_text(content, encoding="utf-8")
    before = tree(state)
    code, text = cli("app", verb, SHA, "--state-dir", state)
    assert code == 2, text
    assert f"{state / client_cli.NODE_FILE}" in text and needle in text and "--key" in text and "fix:" in text, text
    assert tree(state) == before  # no approval or revocation without its signed audit entry


@pytest.mark.parametrize("verb", ["approve", "revoke"])
def test_a_key_that_cannot_sign_is_refused_before_the_decision(home, tmp_path, node_key, verb):
    state = node_state(tmp_path / "node", node_key)
    if verb == "revoke":
        pinning.Approvals(state).approve(SHA)
    before = tree(state)
    for bad in (tmp_path / "nokey", node_key.with_name("node.pub")):
        code, text = cli("app", verb, SHA, "--state-dir", state, "--key", bad)
        assert code == 2 and f"--key {bad}" in text and "fix:" in text, text
        assert tree(state) == before
    # the key node.json names is gone: named with node.json, nothing changes
    node_state(state, tmp_path / "moved.key")
    before = tree(state)
    code, text = cli("app", verb, SHA, "--state-dir", state)
    assert code == 2 and str(tmp_path / "moved.key") in text and client_cli.NODE_FILE in text, text
    assert tree(state) == before


def test_a_good_node_still_approves_signed(home, tmp_path, node_key):
    audit = pytest.importorskip("privacy.audit")
    state = node_state(tmp_path / "node", node_key)
    code, text = cli("app", "approve", SHA, "--state-dir", state)
    assert code == 0 and f"approved {SHA}" in text and "unsigned" not in text, text
    assert audit.verify(state / "audit.jsonl", public_key_path=node_key.with_name("node.pub")).ok
    code, text = cli("app", "list", "--state-dir", state, "--json")
    assert code == 0 and list(json.loads(text)["approved"]) == [SHA]


def test_audit_commands_name_a_bad_state_dir(home, tmp_path):
    pytest.importorskip("privacy.audit_cli")
    typo = tmp_path / "typo"
    for sub in ("show", "verify", "export"):
        code, text = cli("--state-dir", typo, "audit", sub)
        assert code == 2 and f"--state-dir {typo}" in text and "does not exist" in text and "fix:" in text, text
    code, text = cli("--department", "health", "--site", "../x", "audit", "show")
    assert code == 2 and "--site '../x'" in text, text
    assert not typo.exists() and list(home.iterdir()) == []


def test_audit_verify_names_a_damaged_node_json(home, tmp_path, node_key):
    pytest.importorskip("privacy.audit_cli")
    state = node_state(tmp_path / "node", node_key)
    assert cli("app", "approve", SHA, "--state-dir", state)[0] == 0
    (state / client_cli.NODE_FILE).write_text("[1, 2]")
    code, text = cli("audit", "verify", "--log", state / "audit.jsonl")
    assert code == 2 and str(state / client_cli.NODE_FILE) in text and "--pub" in text, text
    code, text = cli("audit", "verify", "--log", state / "audit.jsonl", "--pub", node_key.with_name("node.pub"))
    assert code == 0 and "OK" in text, text


# --------------------------------------------------------------------------- fl-pki show


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    from privacy import pki

    base = tmp_path_factory.mktemp("pki")
    pki.create_ca(base / "ca", "Round Two CA")
    pki.create_node_key(base / "node", "health", "Cleveland")
    return {"crt": base / "ca" / "ca.crt", "pub": base / "node" / "node.pub", "key": base / "node" / "node.key"}


def test_pki_show_ends_with_which_files_were_not_shown(certs, tmp_path):
    from privacy.pki_cli import app as pki_app

    missing, folder = tmp_path / "missing.crt", tmp_path
    res = runner.invoke(pki_app, ["show", str(certs["crt"]), str(missing), str(certs["key"]), str(folder),
                                  str(certs["pub"])])
    assert res.exit_code == 2, res.output
    assert "CN=Round Two CA" in res.stdout and "Fingerprint" in res.stdout  # the good files are shown
    assert "BEGIN" not in res.output and "PRIVATE KEY-----" not in res.output
    last = " ".join(res.stderr.strip().splitlines()[-1].split())
    assert last.startswith("fl-pki show: 3 of 5 files not shown:"), last
    for bad in (missing, certs["key"], folder):
        assert str(bad) in last, last
    assert res.stdout.index("Fingerprint") > res.stdout.index("CN=Round Two CA")  # order of the arguments kept


def test_pki_show_all_good_exits_0_without_summary(certs):
    from privacy.pki_cli import app as pki_app

    res = runner.invoke(pki_app, ["show", str(certs["crt"]), str(certs["pub"])])
    assert res.exit_code == 0 and "not shown" not in res.output, res.output


# --------------------------------------------------------------------------- CITYFED_GRID_POLL_S


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-inf", "-1", "1e9", "", " ", "0.1s"])
def test_grid_poll_variable_is_checked(monkeypatch, value):
    from server.errors import CliError
    from server.grid import POLL_ENV, poll_interval_from_env

    monkeypatch.setenv(POLL_ENV, value)
    with pytest.raises(CliError) as info:
        poll_interval_from_env()
    msg = str(info.value)
    assert info.value.code == 2
    assert POLL_ENV in msg and repr(value) in msg and "fix:" in msg and "0.1" in msg, msg


@pytest.mark.parametrize(("value", "expected"), [(None, 0.1), ("0.5", 0.5), (" 2 ", 2.0), ("0", 0.0), ("60", 60.0)])
def test_grid_poll_variable_good_values(monkeypatch, value, expected):
    from server.grid import POLL_ENV, poll_interval_from_env

    if value is None:
        monkeypatch.delenv(POLL_ENV, raising=False)
    else:
        monkeypatch.setenv(POLL_ENV, value)
    assert poll_interval_from_env() == expected


def test_fast_poll_names_a_bad_variable_and_ignores_it_for_simulation_grids(monkeypatch):
    from flower_compat.testing import HttpGrid
    from server.errors import CliError
    from server.grid import POLL_ENV, fast_poll
    from simulations.inprocess import InProcessGrid

    monkeypatch.setenv(POLL_ENV, "abc")
    other = object.__new__(InProcessGrid)
    assert fast_poll(other) is other  # the variable is for deployment grids only: a simulation is not stopped
    with pytest.raises(CliError, match=POLL_ENV):
        fast_poll(object.__new__(HttpGrid))


def test_audit_show_names_a_folder_given_as_log(home, tmp_path):
    for sub in ("show", "verify", "export"):
        code, text = cli("audit", sub, "--log", tmp_path)
        assert code == 2 and f"audit log {tmp_path}: is a directory" in text, text
        assert f"--log {tmp_path / 'audit.jsonl'}" in text and "does not exist" not in text, text


@pytest.mark.parametrize("content", ["[1,2]\n", "not json\n", '{"seq": 1}\n[3]\n'])
def test_audit_export_refuses_what_show_refuses(home, tmp_path, content):
    log = tmp_path / "audit.jsonl"
    log.write_text(content)
    code, shown = cli("audit", "show", "--log", log)
    assert code == 2 and "not a JSON entry" in shown, shown
    code, text = cli("audit", "export", "--log", log, "-o", tmp_path / "copy.jsonl")
    assert code == 2 and str(log) in text and "not a JSON entry" in text and "fix:" in text, text
    assert not (tmp_path / "copy.jsonl").exists() and "exported" not in text
    res = runner.invoke(client_cli.app, ["audit", "export", "--log", str(log)])  # to standard output: nothing written
    assert res.exit_code == 2 and res.stdout == "", res.output


@pytest.mark.parametrize("verb", ["approve", "revoke"])
def test_a_decision_whose_audit_entry_cannot_be_written_is_not_silent(home, tmp_path, node_key, verb):
    """An approval is never left in force without its audit entry; a revocation (the safe way) stays, loudly."""
    pytest.importorskip("privacy.audit")
    state = node_state(tmp_path / "node", node_key)
    if verb == "revoke":
        pinning.Approvals(state).approve(SHA)
    (state / "audit.jsonl").mkdir()  # the log cannot be appended to (as a full disk or a read-only file)
    code, text = cli("app", verb, SHA, "--state-dir", state)
    assert code == 1, text
    assert "audit" in text and str(state / "audit.jsonl") in text and "fix:" in text, text
    approved = list(pinning.Approvals(state).approved())
    assert approved == [], approved  # approve: undone; revoke: kept
    if verb == "approve":
        assert "not approved" in text, text
    else:
        assert "revoked" in text, text


def test_an_approval_that_cannot_be_undone_says_so_and_how_to_revoke(home, tmp_path, node_key, monkeypatch):
    pytest.importorskip("privacy.audit")
    state = node_state(tmp_path / "node", node_key)
    (state / "audit.jsonl").mkdir()  # the entry cannot be written ...

    def full_disk(self, digest):  # ... nor the undo
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pinning.Approvals, "revoke", full_disk)
    code, text = cli("app", "approve", SHA, "--state-dir", state)
    assert code == 1, text
    assert "approved without an audit entry" in text and "No space left" in text, text
    assert f"fl-client app revoke {SHA}" in text and "Traceback" not in text, text
