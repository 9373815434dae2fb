"""The job contract (:mod:`contract`): the server package imports nothing from the client package.

Both sides import the same contract objects; the coordinator's job config carries only keys
of the contract, and the node reads only keys the contract names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path`` (absolute; relative ones resolved inside its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = path.relative_to(ROOT).parent.parts
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..clients import y
                base = package[: len(package) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            out.append((node.lineno, node.args[0].value))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            out.append((node.lineno, node.args[0].value))
    return out


def _client_imports(folder: str) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, mod in _imports(path):
            if mod == "clients" or mod.startswith("clients."):
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {mod}")
    return found


def test_server_package_imports_nothing_from_clients():
    found = _client_imports("server")
    assert not found, "the server package must not import the client package (use contract/, citydata/, " \
                      "shared_models/):\n" + "\n".join(found)


@pytest.mark.parametrize("folder", ["contract", "citydata"])
def test_neutral_packages_import_neither_side(folder):
    found = _client_imports(folder)
    for path in sorted((ROOT / folder).rglob("*.py")):
        found += [f"{path.relative_to(ROOT)}:{line}: imports {mod}" for line, mod in _imports(path)
                  if mod == "server" or mod.startswith("server.")]
    assert not found, "\n".join(found)


def test_scan_sees_every_import_form(tmp_path, monkeypatch):
    """The scan is not blind: absolute, from-, relative and dynamic imports of clients are all found."""
    pkg = tmp_path / "server"
    pkg.mkdir()
    (pkg / "bad.py").write_text(textwrap.dedent("""\
        import clients.node
        from clients import app
        from ..clients.secagg import x
        def f():
            from clients.energy import METHODS
            __import__("clients.datasets")
            import importlib
            importlib.import_module("clients")
        import clientsx  # not the client package
        """))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = _client_imports("server")
    assert [f.rsplit(" ", 1)[1] for f in found] == ["clients.node", "clients", "clients.secagg", "clients.energy",
                                                    "clients.datasets", "clients"]


def test_server_app_imports_without_the_client_package():
    """``import server.app`` (and the coordinator's other modules) with ``clients`` unimportable."""
    code = textwrap.dedent("""\
        import sys

        class NoClients:
            def find_spec(self, name, path=None, target=None):
                if name == "clients" or name.startswith("clients."):
                    raise ImportError(f"the client package is not importable here ({name})")
                return None

        sys.meta_path.insert(0, NoClients())
        import server.app, server.secagg, server.energy, server.central_dp, server.personalise, server.console_pages
        import server.strategy, server.report
        try:
            import clients.node
        except ImportError:
            pass
        else:
            raise SystemExit("the finder did not block clients")
        assert not [m for m in sys.modules if m == "clients" or m.startswith("clients.")]
        print("ok")
        """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_both_sides_use_the_same_contract_objects():
    import clients.app
    import clients.clipping
    import clients.node
    import clients.secagg
    import server.app
    import server.central_dp
    import server.energy
    import server.secagg
    from contract import energy, keys, tasks

    assert clients.node.NODE_KEYS is keys.NODE_KEYS is server.app.NODE_KEYS
    assert server.app.TASKS is tasks.TASKS
    assert clients.app.TRAIN_METRICS is tasks.TRAIN_METRICS and clients.app.EVAL_METRICS is tasks.EVAL_METRICS
    assert clients.secagg.PARAM_NAMES_KEY is keys.PARAM_NAMES_KEY is server.secagg.PARAM_NAMES_KEY
    assert clients.secagg.MAX_UPDATE_NORM is keys.MAX_UPDATE_NORM is server.secagg.MAX_UPDATE_NORM
    assert clients.clipping.CENTRAL_CLAIM_KEYS is keys.CENTRAL_CLAIM_KEYS is server.central_dp.CENTRAL_CLAIM_KEYS
    assert server.energy.METHODS is energy.METHODS


def test_one_source_no_copies_of_contract_names():
    """No module of either side (or of the simulations) assigns a name the contract defines."""
    import contract.energy
    import contract.keys
    import contract.tasks

    defined = {n for m in (contract.energy, contract.keys, contract.tasks) for n in vars(m) if n.isupper()}
    copies = []
    for folder in ("server", "clients", "simulations", "serving", "privacy", "citydata", "shared_models"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                    if isinstance(node, ast.AnnAssign) else []
                copies += [f"{path.relative_to(ROOT)}:{node.lineno}: {t.id}" for t in targets
                           if isinstance(t, ast.Name) and t.id in defined]
    assert not copies, "defined in contract/, import it from there:\n" + "\n".join(copies)


def test_the_job_config_carries_only_contract_keys():
    from contract.keys import JOB_KEYS, NODE_KEYS
    from contract.tasks import TASKS
    from server.app import job_config, settings

    for dept in TASKS:
        for extra in ({}, {"strategy": "fedprox", "noise-multiplier": 1.0, "personalise-epochs": 2}):
            job = job_config(settings({"department": dept, **extra}), "run-1")
            assert set(job) <= set(JOB_KEYS), sorted(set(job) - set(JOB_KEYS))
            assert job["task"] == TASKS[dept]
    assert not set(JOB_KEYS) & set(NODE_KEYS)  # a key is the coordinator's or the node's, never both


def _keys_read(path: Path) -> set[str]:
    """String keys read from a config mapping in ``path``: ``cfg.get("k")``, ``cfg["k"]`` (names ending in cfg/config)."""
    names = ("cfg", "config", "merged", "run_config", "node_config")
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        target = key = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
            target, key = node.func.value, node.args[0]
        elif isinstance(node, ast.Subscript):
            target, key = node.value, node.slice
        if isinstance(target, ast.Name) and target.id in names and isinstance(key, ast.Constant) \
                and isinstance(key.value, str):
            out.add(key.value)
    return out


def test_the_node_reads_only_contract_keys():
    from contract.keys import JOB_KEYS, NODE_KEYS

    read = set().union(*(_keys_read(p) for p in (ROOT / "clients").glob("*.py") if p.name not in ("cli.py", "warm.py",
                                                                                                     "pinning.py")))
    assert {"run-id", "batch-size", "policy"} <= read  # the scan sees the node's reads
    # department: the node config's (fl-client) or the run's; run-dir: where `flwr run .` keeps simulated ledgers
    unknown = sorted(read - set(JOB_KEYS) - set(NODE_KEYS) - {"run-dir"})
    assert not unknown, f"the node reads config keys that the job contract does not name: {unknown}"


def _round_replies(metrics_per_node: dict[int, dict], kind: str = "train"):
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from flower_compat.inprocess import set_task_identity

    set_task_identity(1, 0, 1)
    glob = {"w": np.zeros(3, dtype=np.float32)}
    out = Message(RecordDict({"arrays": ArrayRecord({"w": Array(glob["w"])})}), dst_node_id=1, message_type=kind)
    replies = []
    for node, m in metrics_per_node.items():
        sent = Message(out.content, dst_node_id=node, message_type=kind)
        content = {"metrics": MetricRecord(m)}
        if kind == "train":
            content["arrays"] = ArrayRecord({"w": Array(np.full(3, 0.1, dtype=np.float32))})
        replies.append(Message(RecordDict(content), reply_to=sent))
    return glob, replies


def test_the_coordinator_accepts_only_whitelisted_reply_metrics():
    """A train reply with a metric outside the contract's whitelist is excluded, naming the key; the rest aggregate."""
    from server.strategy import GuardedStrategy, make_strategy

    glob, replies = _round_replies({5: {"num-examples": 10, "epsilon": 1.0},
                                    6: {"num-examples": 10, "mean-age": 54.2}})
    s = GuardedStrategy(make_strategy("fedavg"), max_update_norm=10.0, run_id="r")
    s._global = glob
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None and s.history["rounds"][0]["train"]["accepted"] == 1
    (ex,) = s.history["excluded"]
    assert ex["node"] == 6 and "mean-age" in ex["reason"] and "contract" in ex["reason"]
    assert 6 not in s.history["rounds"][0]["train"]["nodes"]


def test_the_coordinator_keeps_no_evaluation_metric_outside_the_whitelist():
    from server.strategy import GuardedStrategy, make_strategy

    _, replies = _round_replies({5: {"num-examples": 10, "accuracy": 0.8},
                                 6: {"num-examples": 10, "accuracy": 0.7, "record-0-age": 63.0}}, kind="evaluate")
    s = GuardedStrategy(make_strategy("fedavg"), max_update_norm=10.0, run_id="r")
    agg = s.aggregate_evaluate(1, replies)
    ev = s.history["rounds"][0]["evaluate"]
    assert set(ev["nodes"]) == {5} and "record-0-age" in ev["excluded"][6]
    assert agg is not None and dict(agg)["accuracy"] == pytest.approx(0.8)
