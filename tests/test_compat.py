"""flower_compat: the one version gate, the seams' self-tests, and no Flower internals anywhere else."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import flower_compat  # noqa: E402
from flower_compat import CompatError, is_private  # noqa: E402

#: Seams cityfed adapts (a seam removed or renamed must be removed here too).
SEAMS = {"dispatch", "dp", "grid", "logging", "secagg", "strategy-state", "superlink", "task-identity", "testing",
         "warm-worker"}

#: Folders the scan skips: the compat layer itself (the one place Flower internals are imported) and what is
#: not project code. Tests are project code: they reach Flower internals through flower_compat too.
SKIP_DIRS = {"flower_compat", ".venv", ".git", "build", "dist", "runs", "__pycache__", "node_modules"}

#: Files outside flower_compat/ the scan skips: this one, which names private modules as the data it checks.
SKIP_FILES = {Path("tests", "test_compat.py")}


def test_self_test_passes_for_every_seam():
    report = flower_compat.self_test()
    assert SEAMS <= set(report) and set(report.values()) == {"ok"}


def test_self_test_of_some_seams_and_an_unknown_seam():
    assert flower_compat.self_test(["dp", "logging"]) == {"dp": "ok", "logging": "ok"}
    with pytest.raises(CompatError, match="unknown seam.*'no-such-seam'"):
        flower_compat.self_test(["no-such-seam"])


def test_a_wrong_flower_version_fails_with_the_fix(monkeypatch):
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.41.0")
    with pytest.raises(CompatError) as err:
        flower_compat.self_test()
    msg = str(err.value)
    assert "flwr 1.41.0 is installed" in msg and f"flwr[simulation,dp]=={flower_compat.FLWR_VERSION}" in msg
    assert "constraints.txt" in msg


@pytest.mark.parametrize("module, name, seam", [
    ("flwr.supernode.start_client_internal", "_pull_and_store_message", "warm-worker"),
    ("flwr.supernode.start_client_internal", "_push_messages", "warm-worker"),
    ("flwr.supercore.superexec.run_superexec", "get_executor", "warm-worker"),
    ("flwr.superlink.grid.http_grid", "pull_objects", "grid"),
    ("flwr.superlink.main", "_get_middleware", "superlink"),
    ("flwr.server.superlink.linkstate.in_memory_linkstate.InMemoryLinkState", "_check_stored_messages", "dispatch"),
    ("flwr.supercore.logger", "update_console_handler", "logging"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "RECORD_KEY_STATE", "secagg"),
    ("flwr.supercore.differential_privacy", "KEY_CLIPPING_NORM", "dp"),
    ("flwr.cli.build", "build_fab_from_files", "testing"),
    ("flwr.supercore.exit.exit", "threading", "testing"),
])
def test_a_seam_whose_flower_name_is_gone_fails_naming_the_seam(monkeypatch, module, name, seam):
    import importlib

    try:
        owner = importlib.import_module(module)
    except ImportError:  # a class: module path + class name
        mod, cls = module.rsplit(".", 1)
        owner = getattr(importlib.import_module(mod), cls)
    monkeypatch.delattr(owner, name)
    with pytest.raises(CompatError) as err:
        flower_compat.self_test()
    msg = str(err.value)
    assert f"{seam}: " in msg and name in msg and "Fix: " in msg
    others = SEAMS - {seam, "grid"}  # (grid reuses the warm-worker's fast_pulls, not its names)
    assert all(f"{s}: " not in msg for s in others if s != seam), msg


def test_public_and_private_flower_modules():
    for public in ("flwr", "flwr.app", "flwr.clientapp", "flwr.clientapp.mod", "flwr.serverapp",
                   "flwr.serverapp.strategy", "flwr.simulation", "flwr.common", "flwr.client.mod", "flwr.server",
                   "flwr.server.strategy", "flwr.server.workflow"):
        assert not is_private(public), public
    for private in ("flwr.supercore.logger", "flwr.supernode.cli", "flwr.superlink.grid.http_grid",
                    "flwr.server.superlink.fleet.vce", "flwr.server.compat.grid_client_proxy", "flwr.compat.common",
                    "flwr.common.constant", "flwr.common.logger", "flwr.common.secure_aggregation.secaggplus_constants",
                    "flwr.proto.control_pb2", "flwr.cli.install", "flwr.app.error", "flwr.server.workflow.constant"):
        assert is_private(private), private
    assert not is_private("flwr_datasets.partitioner") and not is_private("numpy")


def _target_module(target: str) -> str:
    """The module of a dotted ``monkeypatch.setattr`` target (``"flwr.supercore.logger.log"`` ->
    ``"flwr.supercore.logger"``): its longest prefix that is a module, as pytest resolves it."""
    import importlib.util

    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        try:
            if importlib.util.find_spec(".".join(parts[:end])) is not None:
                return ".".join(parts[:end])
        except (ImportError, ValueError, AttributeError):
            pass
    return target.rsplit(".", 1)[0]


def _private_imports(path: Path) -> list[str]:
    """``file:line module`` for each import of a private Flower module in ``path`` (import statements,
    ``from`` imports of private submodules, ``importlib.import_module``/``__import__`` of a literal) and
    each ``monkeypatch.setattr``/``delattr`` whose target is a string in a private Flower module."""
    import importlib.util

    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        mods: list[str] = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
            if node.module == "flwr" or node.module.startswith("flwr."):
                for a in node.names:  # `from flwr.server import superlink`: a private submodule
                    full = f"{node.module}.{a.name}"
                    if is_private(full) and importlib.util.find_spec(node.module) is not None:
                        try:
                            if importlib.util.find_spec(full) is not None:
                                mods.append(full)
                        except (ImportError, ValueError):
                            pass
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__"):
                mods = [node.args[0].value]
            elif name in ("setattr", "delattr") and isinstance(fn, ast.Attribute) \
                    and (node.args[0].value == "flwr" or node.args[0].value.startswith("flwr.")):
                mods = [_target_module(node.args[0].value)]  # monkeypatch.setattr("flwr.x.y.attr", ...)
        found += [f"{path.relative_to(ROOT)}:{node.lineno} {m}" for m in mods if is_private(m)]
    return found


def _project_files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel in SKIP_FILES:
            continue
        if not (set(rel.parts[:-1]) & SKIP_DIRS) and not any(p.startswith(".") or p.endswith(".egg-info")
                                                           for p in rel.parts[:-1]):
            out.append(path)
    return out


def test_no_flower_internals_outside_the_compat_layer():
    files = _project_files()
    assert any(f.parts[-2:] == ("clients", "warm.py") for f in files)  # the scan sees the project ...
    assert any(f.parts[-2:] == ("tests", "test_warm.py") for f in files)  # ... its tests too
    assert not any(f.parts[-2:] == ("tests", "test_compat.py") for f in files)  # (but not this file)
    offenders = [hit for f in files for hit in _private_imports(f)]
    assert offenders == [], ("Flower internals imported outside flower_compat/ (move them into a seam module "
                             "there, with a self-test; what only tests use: flower_compat/testing.py):\n"
                             + "\n".join(offenders))


def test_the_scan_finds_each_kind_of_private_import(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    bad = tmp_path / "bad.py"
    bad.write_text("import flwr.supercore.logger\n"
                   "from flwr.common.constant import Status\n"
                   "from flwr.server import superlink\n"
                   "import importlib\n"
                   "importlib.import_module('flwr.proto.control_pb2')\n"
                   "from flwr.app import Message\n"
                   "from flwr_datasets import FederatedDataset\n"
                   "monkeypatch.setattr('flwr.supercore.logger.update_console_handler', None)\n"
                   "monkeypatch.delattr('flwr.superlink.cli.flower_superlink.SuperLinkLifespan')\n"
                   "monkeypatch.setattr('flwr.serverapp.strategy.FedAvg.start', None)\n"
                   "monkeypatch.setattr('flwr.app.Message', None)\n"
                   "setattr('flwr.supercore.logger', 'name', None)\n")  # (the builtin: no target string)
    assert [h.split(" ", 1)[1] for h in _private_imports(bad)] == [
        "flwr.supercore.logger", "flwr.common.constant", "flwr.server.superlink", "flwr.proto.control_pb2",
        "flwr.supercore.logger", "flwr.superlink.cli.flower_superlink"]


def test_checkpoint_state_from_earlier_versions_uses_cityfed_names():
    from flower_compat.strategy_state import from_legacy_names

    legacy = {"current_arrays": 1, "m_t": 2, "v_t": 3, "momentum_vector": 4, "central_dp": {"rounds": 1}}
    assert from_legacy_names(legacy) == {"model": 1, "first-moment": 2, "second-moment": 3, "momentum": 4,
                                         "central_dp": {"rounds": 1}}


def test_server_optimiser_state_dict_round_trip_and_unknown_keys():
    import numpy as np

    from server.strategy import CityFedAdam, CityFedAvgM

    adam = CityFedAdam()
    assert adam.state_dict() == {}  # nothing before the first round
    state = {"first-moment": {"w": np.ones(2)}, "second-moment": {"w": np.full(2, 4.0)}}
    adam.load_state_dict(state)
    assert adam.state_dict() == state
    assert adam.m_t is state["first-moment"]  # Flower's FedAdam steps from what was loaded
    with pytest.raises(ValueError, match=r"'momentum'.*resume with the strategy that wrote the checkpoint"):
        adam.load_state_dict({"momentum": [np.ones(2)]})
    avgm = CityFedAvgM(server_momentum=0.9)
    avgm.load_state_dict({"momentum": [np.ones(2)]})
    assert avgm.momentum_vector[0].tolist() == [1.0, 1.0]


def _run_cli(monkeypatch, capsys, main, prog: str, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", [prog, *args])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err


@pytest.mark.parametrize("prog", ["fl-client", "fl-server", "fl-sim"])
def test_cli_start_up_refuses_a_wrong_flower_version(monkeypatch, capsys, prog):
    import importlib

    import flwr

    main = importlib.import_module({"fl-client": "clients.cli", "fl-server": "server.cli",
                                    "fl-sim": "simulations.cli"}[prog]).main
    monkeypatch.setenv("CITYFED_DEBUG", "0")  # recorded, so the "1" that --debug sets below is undone after the test
    monkeypatch.setattr(flwr, "__version__", "1.41.0")
    code, err = _run_cli(monkeypatch, capsys, main, prog, "--no-such-option-either")
    assert code == 1 and "CompatError" in err and "flwr 1.41.0 is installed" in err and "Fix: pip install" in err
    assert "Traceback" not in err
    code, err = _run_cli(monkeypatch, capsys, main, prog, "--no-such-option-either", "--debug")
    assert code == 1 and "Traceback" in err and "CompatError" in err
    code, err = _run_cli(monkeypatch, capsys, main, prog, "--help")  # help needs no check
    assert code == 0


def test_a_broken_test_only_seam_does_not_stop_fl_sim(monkeypatch, capsys):
    """The ``testing`` seam holds names only tests use: the test suite checks it, fl-sim's start-up does not."""
    from simulations import cli

    flower_compat.self_test(["testing"])  # registers it

    def gone() -> None:
        raise AttributeError("a test-only Flower name is gone")

    monkeypatch.setitem(flower_compat._CHECKS, "testing", gone)
    with pytest.raises(CompatError, match="testing: AttributeError"):
        flower_compat.self_test()  # the suite's full check still reports it
    assert "testing" not in flower_compat.self_test(exclude=flower_compat.TEST_ONLY_SEAMS)
    with pytest.raises(CompatError, match="unknown seam"):
        flower_compat.self_test(exclude=["no-such-seam"])
    monkeypatch.setenv("CITYFED_DEBUG", "0")
    monkeypatch.setattr(sys, "argv", ["fl-sim", "run", "--no-such-option"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 2  # the app's usage error: start-up passed despite the broken test-only seam
    assert "CompatError" not in capsys.readouterr().err
