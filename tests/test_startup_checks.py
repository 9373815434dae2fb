"""Start-up checks of the CLIs: the version gate for every command, the seam self-tests where Flower is loaded.

``fl-server runs``/``nodes``/``logs``/``app-config`` and ``fl-client app ...`` only ask the
running coordinator or read files; they used to import every Flower internal cityfed adapts before doing so (2.3 s of
CPU on 2 cores for each call, which an operator's watch loop or a test polling every 2 s pays
again and again). Now they pass the version gate without importing Flower, and the commands that
load Flower's internals (every other ``fl-server`` command, the ``fl-client`` node) still refuse
to start when one is missing, naming the seam.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import flower_compat
from flower_compat import CompatError

ROOT = Path(__file__).resolve().parents[1]

#: Run one CLI's main() as its console script does, then report the Flower modules it imported.
PROBE = r"""
import json, sys
prog, module = sys.argv[1], sys.argv[2]
sys.argv = [prog, *sys.argv[3:]]
main = __import__(module, fromlist=["main"]).main
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "flwr": sorted(m for m in sys.modules if m == "flwr" or m.startswith("flwr."))}))
"""


def _probe(prog: str, module: str, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, prog, module, *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT), "CITYFED_DEBUG": "0",
                                                     "PYTHONPATH": str(ROOT)})
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("prog, module, args", [
    ("fl-server", "server.cli", ["runs", "--json"]),
    ("fl-server", "server.cli", ["nodes"]),
    ("fl-server", "server.cli", ["logs", "1"]),
    ("fl-client", "clients.cli", ["app", "list"]),
])
def test_a_query_command_imports_no_flower(tmp_path, prog, module, args):
    """Asked of a state dir with no coordinator or node, the command says so (exit 2 or 3), Flower never imported."""
    state = ["--state-dir", str(tmp_path)]
    got = _probe(prog, module, *args, *state)
    assert got["code"] in (2, 3), got
    assert got["flwr"] == [], got  # was: flwr and every seam's private module (superlink, supernode, ...)


def test_the_version_gate_reads_the_installed_distribution_without_importing_flower():
    got = subprocess.run([sys.executable, "-c", "import sys, flower_compat as c; v = c.installed_version(); "
                          "print(v, 'flwr' in sys.modules)"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert got.stdout.split() == [flower_compat.FLWR_VERSION, "False"], (got.stdout, got.stderr)


def _broken_seam(monkeypatch, seam: str) -> None:
    flower_compat.self_test([seam])  # its module imported, its check registered

    def gone() -> None:
        raise AttributeError(f"a {seam} name is gone")

    monkeypatch.setitem(flower_compat._CHECKS, seam, gone)


def _main(monkeypatch, capsys, main, prog: str, *args: str) -> tuple[int, str]:
    monkeypatch.setenv("CITYFED_DEBUG", "0")
    monkeypatch.setattr(sys, "argv", [prog, *args])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("command", [["start", "--insecure", "--host", "127.0.0.1"], ["run", "--department", "health"],
                                     ["console"], ["stop", "1"], ["register", "node.pub"]])
def test_fl_server_commands_that_load_flower_still_refuse_a_missing_internal(monkeypatch, capsys, tmp_path, command):
    from server import cli

    _broken_seam(monkeypatch, "superlink")
    code, err = _main(monkeypatch, capsys, cli.main, "fl-server", *command, "--state-dir", str(tmp_path))
    assert code == 1 and "CompatError" in err and "superlink: AttributeError" in err and "Fix: pip install" in err, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    # a query command is not stopped by it: it says there is no coordinator (exit 3)
    code, err = _main(monkeypatch, capsys, cli.main, "fl-server", "runs", "--state-dir", str(tmp_path))
    assert code == 3 and "no coordinator set up" in err and "CompatError" not in err, err


def test_the_fl_client_node_still_refuses_a_missing_internal(monkeypatch, capsys, tmp_path):
    from clients import cli

    _broken_seam(monkeypatch, "warm-worker")
    code, err = _main(monkeypatch, capsys, cli.main, "fl-client", "--department", "health", "--site", "Cleveland",
                      "--data", "bundled", "--policy", str(ROOT / "examples" / "policies" / "health.toml"),
                      "--coordinator", "127.0.0.1:9092", "--state-dir", str(tmp_path / "node"))
    assert code == 1 and "warm-worker: AttributeError" in err and "Traceback" not in err, err
    assert not (tmp_path / "node").exists()
    code, err = _main(monkeypatch, capsys, cli.main, "fl-client", "app", "list", "--state-dir", str(tmp_path / "node"))
    assert code != 1 and "CompatError" not in err and "does not exist" in err, err


def test_a_wrong_version_still_stops_a_query_command(monkeypatch, capsys, tmp_path):
    import flwr

    from server import cli

    monkeypatch.setattr(flwr, "__version__", "1.41.0")
    code, err = _main(monkeypatch, capsys, cli.main, "fl-server", "runs", "--state-dir", str(tmp_path))
    assert code == 1 and "flwr 1.41.0 is installed" in err, err
    with pytest.raises(CompatError):
        flower_compat.check_version()
