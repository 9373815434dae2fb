"""clients.pinning: a node runs only the installed cityfed release or an app its department approved.

Fast (no network): FABs are built in memory from the installed release with Flower's own
builder, then altered. The deployment version (coordinator ships a modified app, every node
refuses it before importing it, approval lets it run) is tests/test_pinning_slow.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clients import cli as client_cli  # noqa: E402
from clients import pinning, warm  # noqa: E402

runner = CliRunner()
#: Appended to clients/node.py: the department's policy check now accepts every job (what a
#: hostile coordinator would ship; the node's code looks check_job up at call time).
NO_POLICY_CHECK = """

_policy_check = check_job


def check_job(*args, **kwargs):  # the department's policy check, removed
    return _policy_check(*args, **kwargs)._replace(accepted=True, reason="")
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def release_fab() -> bytes:
    """The installed release as `fl-server run` ships it (Flower's FAB builder on the release's files)."""
    from flower_compat.testing import build_fab_from_files

    files = {rel: path for rel, path in pinning.release_files().items()}
    files["pyproject.toml"] = ROOT / "pyproject.toml"
    return build_fab_from_files(files)[0]


def fab_files(fab: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        return {n: z.read(n) for n in z.namelist()}


def rezip(files: dict[str, bytes]) -> bytes:
    """A FAB holding ``files`` (``.info/CONTENT`` rewritten as Flower writes it, so it also installs)."""
    buf = io.BytesIO()
    body = {n: d for n, d in files.items() if n != ".info/CONTENT"}
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in body.items():
            z.writestr(zipfile.ZipInfo(name, (2024, 10, 1, 0, 0, 0)), data)
        z.writestr(".info/CONTENT", "\n".join(f"{n},{sha(d)},{len(d) * 8}" for n, d in body.items()))
    return buf.getvalue()


def altered(fab: bytes, **changes) -> bytes:
    """``fab`` with files replaced/added (``path=bytes``; ``__`` in a keyword means ``/``) or removed (``None``)."""
    files = fab_files(fab)
    for key, data in changes.items():
        name = key.replace("__", "/").replace("_DOT_", ".")
        if data is None:
            files.pop(name, None)
        else:
            files[name] = data
    return rezip(files)


def without_policy_check(fab: bytes) -> bytes:
    node = fab_files(fab)["clients/node.py"]
    assert b"check_job(" in node
    return rezip({**fab_files(fab), "clients/node.py": node + NO_POLICY_CHECK.encode()})


def verdict(fab: bytes, approved=()) -> pinning.Verdict:
    return pinning.check_fab(fab, pinning.release_manifest(), set(approved))


# --------------------------------------------------------------------------- the installed release


def test_manifest_is_the_installed_release(monkeypatch, tmp_path):
    manifest = pinning.release_manifest()
    for rel in ("clients/node.py", "clients/app.py", "clients/pinning.py", "server/app.py", "privacy/policy.py",
                "shared_models/__init__.py"):
        assert rel in manifest
    assert not [r for r in manifest if "__pycache__" in r or not r.endswith(".py") or r.split("/")[0] == "tests"]
    assert manifest["clients/node.py"] == sha((ROOT / "clients" / "node.py").read_bytes())
    # located by importlib, not through the working directory: a `clients` folder there is ignored
    (tmp_path / "clients").mkdir()
    (tmp_path / "clients" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(pinning, "_release_dirs", None)
    assert pinning.release_dirs()["clients"] == (ROOT / "clients").resolve()
    assert pinning.manifest_hash(pinning.release_manifest()) == pinning.manifest_hash(manifest)


def test_manifest_cache_follows_file_changes(monkeypatch, tmp_path):
    pkg = tmp_path / "clients"
    pkg.mkdir()
    (pkg / "a.py").write_text("A = 1\n")
    (pkg / "test_a.py").write_text("")  # Flower's builder never ships test files: not in the manifest either
    monkeypatch.setattr(pinning, "release_dirs", lambda: {"clients": pkg})
    first = pinning.release_manifest()
    assert first == {"clients/a.py": sha(b"A = 1\n")}
    (pkg / "a.py").write_text("A = 22\n")
    assert pinning.release_manifest()["clients/a.py"] == sha(b"A = 22\n")


# --------------------------------------------------------------------------- decisions


def test_a_fab_of_the_installed_release_is_accepted(release_fab):
    v = verdict(release_fab)
    assert v.accepted and v.rule == "release" and v.findings == () and v.sha256 == sha(release_fab)
    names = set(fab_files(release_fab))
    assert names - set(pinning.release_manifest()) == {"pyproject.toml", ".info/CONTENT"}


@pytest.mark.parametrize("change, expected", [
    ("modified", [("clients/node.py", "modified")]),
    ("extra", [("evil.py", "extra")]),
    ("missing", [("clients/secagg.py", "missing")]),
    ("so", [("clients/node.cpython-311-x86_64-linux-gnu.so", "not allowed")]),
    ("pyc", [("clients/__pycache__/node.cpython-311.pyc", "not allowed")]),
    ("pth", [("cityfed-hook.pth", "not allowed")]),
    ("components", [("pyproject.toml", "components changed")]),
    ("info", [(".info/EXTRA", "not allowed")]),
])
def test_a_fab_that_differs_is_refused_naming_the_files(release_fab, change, expected):
    files = fab_files(release_fab)
    if change == "modified":
        fab = without_policy_check(release_fab)
    elif change == "extra":
        fab = rezip({**files, "evil.py": b"import os\n"})
    elif change == "missing":
        fab = altered(release_fab, clients__secagg_DOT_py=None)
    elif change == "components":
        toml = files["pyproject.toml"].decode().replace('clientapp = "clients.app:app"', 'clientapp = "evil:app"')
        fab = rezip({**files, "pyproject.toml": toml.encode(), "evil.py": b"app = None\n"})
        expected = expected + [("evil.py", "extra")]
    else:
        name = expected[0][0]
        fab = rezip({**files, name: b"\x7fELF binary"})
    v = verdict(fab)
    assert not v.accepted and v.rule == ""
    assert sorted((f.path, f.status) for f in v.findings) == sorted(expected)
    reason = v.reason()
    assert reason.startswith("app not approved by this department: FAB sha256 " + sha(fab))
    for path, status in expected:
        assert f"{path} ({status})" in reason
    assert f"fl-client app approve {sha(fab)}" in reason and f"fl-client app review {sha(fab)[:12]}" in reason


def test_unsafe_and_malformed_fabs_are_refused(release_fab):
    files = fab_files(release_fab)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("../outside.py", b"x = 1\n")
        z.writestr("clients/", b"")
    v = verdict(buf.getvalue())
    assert {(f.path, f.status) for f in v.findings} == {("../outside.py", "unsafe"), ("clients/", "unsafe")}
    assert verdict(b"not a zip").findings[0].status == "not a zip archive"
    # Flower installs and loads by the hash the coordinator announces: it must be the bytes' own
    v = pinning.check_fab(release_fab, pinning.release_manifest(), set(), announced="0" * 64)
    assert not v.accepted and "announced the FAB as sha256 " + "0" * 64 in v.reason()


def test_an_approved_hash_runs_and_a_revoked_one_is_refused_again(release_fab, tmp_path):
    fab = without_policy_check(release_fab)
    store = pinning.Approvals(tmp_path)
    assert not pinning.admit_fab(fab, run_id=1, home=tmp_path).accepted
    assert store.approve(sha(fab)) and not store.approve(sha(fab))
    v = pinning.admit_fab(fab, run_id=2, home=tmp_path)
    assert v.accepted and v.rule == "approved"
    data = json.loads((tmp_path / "apps" / "approved.json").read_text())
    assert set(data["approved"]) == {sha(fab)} and data["approved"][sha(fab)]["approved-at"]
    assert store.revoke(sha(fab)) and not store.revoke(sha(fab))
    assert not pinning.admit_fab(fab, run_id=3, home=tmp_path).accepted
    assert sha(fab) in json.loads((tmp_path / "apps" / "approved.json").read_text())["revoked"]


def test_a_damaged_approvals_file_fails_closed(release_fab, tmp_path, capsys):
    fab = without_policy_check(release_fab)
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "approved.json").write_text("{not json")
    assert not pinning.admit_fab(fab, home=tmp_path).accepted
    assert pinning.admit_fab(release_fab, home=tmp_path).accepted  # the release still runs
    assert "approved.json" in capsys.readouterr().err
    with pytest.raises(pinning.PinningError, match="approved.json"):
        pinning.Approvals(tmp_path).approve(sha(fab))


def test_refused_fab_is_quarantined_and_indexed_by_run(release_fab, tmp_path):
    fab = without_policy_check(release_fab)
    for _ in range(2):  # every message of a run is refused; the index keeps one entry
        pinning.admit_fab(fab, run_id=4242, home=tmp_path)
    q = pinning.Quarantine(tmp_path)
    assert q.fab_path(sha(fab)).read_bytes() == fab
    index = json.loads((tmp_path / "apps" / "quarantine" / "index.json").read_text())
    assert index["runs"]["4242"]["sha256"] == sha(fab)
    assert index["runs"]["4242"]["files"] == ["clients/node.py (modified)"]
    for ref in ("4242", sha(fab)[:10], str(q.fab_path(sha(fab)))):
        assert pinning.resolve_fab(ref, tmp_path)[:2] == (sha(fab), fab)
    with pytest.raises(pinning.PinningError, match="not a .fab file"):
        pinning.resolve_fab("999", tmp_path)


# --------------------------------------------------------------------------- the one place: run_task


class FakeRuntime:
    """Stands in for the node's Runtime API around :func:`clients.warm.run_task`."""

    def __init__(self, monkeypatch, fab: bytes, announced: str | None = None, run_id: int = 77):
        from flwr.app import Context, Message, RecordDict

        from flower_compat.inprocess import set_task_identity
        from flower_compat.testing import Fab
        from flower_compat.testing import cli_install as install_mod
        from flower_compat.testing import clientapp_utils as capp_utils
        from flower_compat.testing import supercore_heartbeat as hb
        from flower_compat.testing import supercore_runtime as rt
        from flower_compat.testing import supernode_runtime_run_clientapp as rc

        set_task_identity(run_id, 5, 1)
        self.message = Message(RecordDict(), dst_node_id=5, message_type="train")
        self.message.metadata.__dict__["_message_id"] = self.message.object_id
        self.context = Context(run_id=run_id, node_id=5, node_config={}, state=RecordDict(), run_config={})
        self.run = type("Run", (), {"run_id": run_id, "fab_id": "cityfed/cityfed", "fab_version": "0.1.0"})()
        self.fab = Fab(announced or sha(fab), fab, {})
        self.pushed, self.status, self.installed, self.loaded = [], [], [], []

        class Client:
            def close(self):
                pass

        class Heartbeat:
            is_running = False

            def __init__(self, *a):
                pass

            def start(self):
                pass

        real_install = install_mod.install_from_fab
        monkeypatch.setattr(rt.RuntimeHttpClient, "from_server_address", classmethod(lambda cls, **kw: Client()))
        monkeypatch.setattr(hb, "HeartbeatSender", Heartbeat)
        monkeypatch.setattr(rc, "pull_task_input", lambda client: (self.message, self.context, self.run, self.fab))
        monkeypatch.setattr(rc, "push_message", lambda client, reply, context: self.pushed.append(reply))
        monkeypatch.setattr(rc, "push_task_output", lambda **kw: self.status.append(kw["sub_status"]))
        monkeypatch.setattr(install_mod, "install_from_fab",
                            lambda content, **kw: self.installed.append(sha(content)) or real_install(content, **kw))
        monkeypatch.setattr(warm, "use_fab_modules", lambda app_dir: [])  # keep this test process's modules

        def loader(**kw):
            def load(fab_id, fab_version, fab_hash):
                self.loaded.append(fab_hash)
                return lambda message, context: Message(RecordDict(), reply_to=message)
            return load

        monkeypatch.setattr(capp_utils, "get_load_client_app_fn", loader)

    def run_task(self) -> int:
        return warm.run_task({"runtime_api_address": "127.0.0.1:1", "token": "t", "insecure": True,
                              "root_certificates_path": None, "runtime_dependency_install": False, "task_id": 1})


@pytest.fixture
def node_home(tmp_path, monkeypatch):
    home = tmp_path / "node"
    monkeypatch.setenv(pinning.HOME_ENV, str(home))
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.delenv(pinning.KEY_ENV, raising=False)
    return home


def test_run_task_refuses_before_installing_or_importing(release_fab, node_home, monkeypatch):
    fab = rezip({**fab_files(without_policy_check(release_fab)), "evil.py": b"raise SystemExit('imported!')\n"})
    rt = FakeRuntime(monkeypatch, fab)
    rt.run_task()
    assert rt.installed == [] and rt.loaded == []  # never extracted, never imported
    assert not list((node_home / "apps").glob("cityfed.*"))
    [reply] = rt.pushed
    assert reply.has_error() and reply.error.code == pinning.APP_REFUSED
    assert sha(fab) in reply.error.reason
    assert "clients/node.py (modified)" in reply.error.reason and "evil.py (extra)" in reply.error.reason
    assert rt.status == ["failed"]
    assert (node_home / "apps" / "quarantine" / f"{sha(fab)}.fab").read_bytes() == fab
    assert pinning.Quarantine(node_home).index()["runs"]["77"]["sha256"] == sha(fab)


def test_run_task_refuses_a_fab_announced_under_another_hash(release_fab, node_home, monkeypatch):
    rt = FakeRuntime(monkeypatch, release_fab, announced="f" * 64)
    rt.run_task()
    assert rt.installed == [] and rt.pushed[0].error.code == pinning.APP_REFUSED


def test_run_task_installs_and_runs_the_release_and_an_approved_fab(release_fab, node_home, monkeypatch):
    rt = FakeRuntime(monkeypatch, release_fab)
    rt.run_task()
    assert rt.installed == [sha(release_fab)] and rt.loaded == [sha(release_fab)]
    assert not rt.pushed[0].has_error() and rt.status == ["completed"]
    fab = without_policy_check(release_fab)
    pinning.Approvals(node_home).approve(sha(fab))
    rt = FakeRuntime(monkeypatch, fab, run_id=78)
    rt.run_task()
    assert rt.loaded == [sha(fab)] and not rt.pushed[0].has_error()


def test_run_task_replaces_an_app_folder_left_by_another_fab(release_fab, node_home, monkeypatch):
    """Flower reuses apps/<publisher>.<name>.<version>.<8 hex of the hash>: a stale folder is reinstalled."""
    from flower_compat.testing import get_project_dir

    app_dir = Path(get_project_dir("cityfed/cityfed", "0.1.0", sha(release_fab)))
    (app_dir / "clients").mkdir(parents=True)
    (app_dir / "clients" / "node.py").write_text("print('stale')\n")
    (app_dir / "sitecustomize.py").write_text("print('stale')\n")
    rt = FakeRuntime(monkeypatch, release_fab)
    rt.run_task()
    assert not rt.pushed[0].has_error()
    assert pinning.installed_mismatch(app_dir, release_fab) == [] and not (app_dir / "sitecustomize.py").exists()


# --------------------------------------------------------------------------- audit entries


@pytest.fixture
def node_key(tmp_path):
    from privacy import pki

    pki.create_node_key(tmp_path / "keys", "health", "Cleveland")
    return tmp_path / "keys" / "node.key"


def test_decisions_are_in_the_signed_audit_log(release_fab, node_home, node_key, monkeypatch):
    audit = pytest.importorskip("privacy.audit")
    monkeypatch.setenv(pinning.KEY_ENV, str(node_key))
    monkeypatch.setattr(pinning, "_accepted_seen", set())
    fab = without_policy_check(release_fab)
    pinning.admit_fab(fab, run_id=9, home=node_home)
    pinning.admit_fab(fab, run_id=9, home=node_home)  # same run, same FAB: one entry
    pinning.admit_fab(release_fab, run_id=9, home=node_home)
    entries = audit.AuditLog(node_home / "audit.jsonl").entries()
    assert [e["kind"] for e in entries] == ["app-refused", "app-accepted"]
    refused = entries[0]["data"]
    assert refused["run-id"] == "9" and refused["fab-sha256"] == sha(fab)
    assert refused["files"] == [{"path": "clients/node.py", "status": "modified"}]
    assert entries[1]["data"]["rule"] == "release"
    res = audit.verify(node_home / "audit.jsonl", public_key_path=node_key.with_name("node.pub"))
    assert res.ok and res.signatures_checked


def test_decision_stands_when_the_audit_module_is_missing(release_fab, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pinning, "_audit_class", None)
    monkeypatch.setattr(pinning, "_audit_failure", "ModuleNotFoundError: No module named 'privacy.audit'")
    monkeypatch.setattr(pinning, "_notes", set())
    fab = without_policy_check(release_fab)
    assert not pinning.admit_fab(fab, run_id=1, home=tmp_path).accepted
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "audit entries not written" in err and "privacy.audit" in err
    assert pinning.Quarantine(tmp_path).fab_path(sha(fab)).exists()


# --------------------------------------------------------------------------- fl-client app


def cli(*args):
    res = runner.invoke(client_cli.app, list(args))
    return res.exit_code, res.output + (res.stderr if res.stderr_bytes is not None else "")


def test_review_prints_each_file_and_a_diff(release_fab, tmp_path):
    fab = rezip({**fab_files(without_policy_check(release_fab)), "evil.py": b"import socket\n",
                 "clients/x.so": b"\x7fELF"})
    pinning.admit_fab(fab, run_id=31, home=tmp_path)
    for ref in (sha(fab)[:12], "31"):
        code, out = cli("app", "review", ref, "--state-dir", str(tmp_path))
        assert code == 0, out
        assert sha(fab) in out and "refused" in out and "run(s) 31" in out
        assert "clients/node.py" in out and "modified" in out and "evil.py" in out and "extra" in out
        assert "clients/x.so" in out and "not allowed" in out
        assert "+def check_job(*args, **kwargs):  # the department's policy check, removed" in out
        assert "+import socket" in out  # unified diffs, release -> FAB
    path = tmp_path / "given.fab"
    path.write_bytes(release_fab)
    code, out = cli("app", "review", str(path), "--state-dir", str(tmp_path))
    assert code == 0 and "identical to the installed release" in out
    code, out = cli("app", "review", "nope", "--state-dir", str(tmp_path))
    assert code == 2 and "nope" in out and "Traceback" not in out


def test_approve_list_revoke(release_fab, tmp_path, node_key, monkeypatch):
    audit = pytest.importorskip("privacy.audit")
    monkeypatch.setenv(pinning.KEY_ENV, str(node_key))  # the node's own decisions (run_task) sign with it too
    home = tmp_path / "node-health-Cleveland"
    fab = without_policy_check(release_fab)
    pinning.admit_fab(fab, run_id=5, home=home)
    code, out = cli("app", "approve", sha(fab)[:10], "--state-dir", str(home), "--key", str(node_key))
    assert code == 0 and f"approved {sha(fab)}" in " ".join(out.split())
    assert pinning.admit_fab(fab, home=home).rule == "approved"
    code, out = cli("app", "list", "--state-dir", str(home), "--json")
    listed = json.loads(out)
    assert list(listed["approved"]) == [sha(fab)] and listed["quarantined"][0]["runs"] == ["5"]
    assert listed["release"]["manifest-sha256"] == pinning.manifest_hash(pinning.release_manifest())
    code, out = cli("app", "list", "--state-dir", str(home))
    assert code == 0 and sha(fab) in out and "manifest sha256" in out
    code, out = cli("app", "revoke", sha(fab), "--state-dir", str(home), "--key", str(node_key))
    assert code == 0 and not pinning.admit_fab(fab, home=home).accepted
    code, out = cli("app", "revoke", sha(fab), "--state-dir", str(home))
    assert code == 2 and "approved.json" in out and "not approved" in out
    code, out = cli("app", "approve", "xyz", "--state-dir", str(home))
    assert code == 2 and "not a sha256" in out
    kinds = [e["kind"] for e in audit.AuditLog(home / "audit.jsonl").entries()]
    assert [k for k in kinds if k in ("app-approved", "app-revoked")] == ["app-approved", "app-revoked"]
    assert audit.verify(home / "audit.jsonl", public_key_path=node_key.with_name("node.pub")).ok


def test_app_commands_find_the_node_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(pinning.HOME_ENV, raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path))
    code, out = cli("app", "list")
    assert code == 2 and "--state-dir" in out and "Traceback" not in out
    pinning.Approvals(client_cli.default_state_dir("health", "VA Long Beach")).approve("a" * 64)
    for args in (["app", "list", "--department", "health", "--site", "VA Long Beach"],
                 ["--state-dir", str(tmp_path / ".cityfed" / "node-health-VA_Long_Beach"), "app", "list"],
                 ["app", "list"]):  # the only node folder under ~/.cityfed
        code, out = cli(*args, "--json")
        assert code == 0, out
        assert list(json.loads(out)["approved"]) == ["a" * 64]


def test_fl_client_still_runs_the_node_without_a_sub_command():
    code, out = cli()
    assert code == 2 and "Missing option '--department'" in out
    code, out = cli("--help")
    assert code == 0 and "app" in out and "audit" in out and "--department" in out


def test_node_launch_passes_the_state_dir_and_key_to_the_tasks(tmp_path):
    launch = client_cli.NodeLaunch(coordinator="127.0.0.1:9092", ca=tmp_path / "ca.crt", key=tmp_path / "node.key",
                                   home=tmp_path, node_config={})
    env = launch.env()
    assert env[pinning.HOME_ENV] == str(tmp_path) and env[pinning.KEY_ENV] == str(tmp_path / "node.key")
    assert env["PYTHONSAFEPATH"] == "1"  # the node's code is the installed one, not the working directory's
    assert launch.command()[1:4] == ["-m", "clients.warm", "supernode"]
    launch.warm = False
    assert launch.command()[1:4] == ["-m", "clients.warm", "cold-supernode"]  # same run_task, a process per task


def test_audit_group_reads_the_nodes_log_and_key(tmp_path, node_key):
    pytest.importorskip("privacy.audit_cli")
    home = tmp_path / "node"
    pinning.write_json(home / client_cli.NODE_FILE, {"key": str(node_key)})  # what fl-client records at start
    code, out = cli("app", "approve", "c" * 64, "--state-dir", str(home))
    assert code == 0, out
    code, out = cli("--state-dir", str(home), "audit", "verify")  # log and node.pub found from the state dir
    assert code == 0 and "OK" in out and "signed by" in out, out
    code, out = cli("--state-dir", str(home), "audit", "show")
    assert code == 0 and "app-approved" in out
    # --log alone: node.pub is found through the log's own folder (the state dir), not only the default node home
    code, out = cli("audit", "verify", "--log", str(home / "audit.jsonl"))
    assert code == 0 and "OK" in out and "signed by" in out, out
    code, out = cli("audit", "verify", "--log", str(home / "audit.jsonl"), "--pub", str(tmp_path / "none.pub"))
    assert code != 0, out


def test_quarantine_keeps_the_newest_fabs_only(tmp_path, monkeypatch):
    monkeypatch.setattr(pinning, "MAX_QUARANTINED", 3)
    for i in range(5):
        fab = rezip({"pyproject.toml": b"[tool]\n", "evil.py": f"x = {i}\n".encode()})
        assert not pinning.admit_fab(fab, run_id=i, home=tmp_path).accepted
    q = pinning.Quarantine(tmp_path)
    assert len(q.fabs()) == 3 and q.fab_path(sha(fab)).exists() and len(q.index()["runs"]) == 5
    weird = rezip({"pyproject.toml": b"tool = 1\n"})  # a pyproject of the wrong shape is refused, not a crash
    assert [f.status for f in verdict(weird).findings if f.path == "pyproject.toml"] == ["components changed"]


def test_release_packages_are_the_packages_a_fab_ships():
    """Every package of pyproject's ``fab-include`` is pinned: a FAB file outside them would be refused as
    extra, and a package the node imports but pinning skips (the data loaders, the job contract, the
    Flower compat layer) could be replaced by a coordinator's FAB unchecked."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["fab-include"]
    shipped = {p.split("/", 1)[0] for p in include if p.endswith("**/*.py")}
    assert set(pinning.RELEASE_PACKAGES) == shipped


def test_the_node_log_line_of_a_refused_app_gives_commands_that_work_with_its_state_dir(release_fab, tmp_path):
    """The refusal's `fl-client app review/approve` commands failed (exit 2, "which node?") on a node run with
    --state-dir, as the guide sets nodes up. The node's own log line now names its state dir; the reply to the
    coordinator does not (the node's paths are not the coordinator's business)."""
    home = tmp_path / "state dir"
    fab = altered(release_fab, evil_DOT_py=b"x = 1\n")
    v = pinning.admit_fab(fab, run_id=5, home=home)
    assert not v.accepted
    local = v.reason(local=True)
    assert f"fl-client app review {sha(fab)[:12]} --state-dir '{home}'" in local, local
    assert f"fl-client app approve {sha(fab)} --state-dir '{home}'" in local, local
    assert str(home) not in v.reason() and "fl-client app review" in v.reason()
