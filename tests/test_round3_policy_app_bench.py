"""Round-3 fixes: the policy check's echo of user values (D8), a bad run config in the
ServerApp (D9), and the benchmark scripts' argument checks (D10).

D8: every place ``privacy/policy.py`` shows a value it was given (a policy field, a key, a job's
department or task) shows it shortened, as the field validators already did for ``department``:
a 100,000-character ``allowed_tasks`` entry made a 100 KB error line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from privacy.policy import PolicyError, check_allowed_tasks, job_conflict, parse_policy  # noqa: E402

POLICY_TEXT = (ROOT / "examples" / "policies" / "health.toml").read_text()
LONG = "a" * 100_000


# --------------------------------------------------------------------------- D8


def _policy(**replace: str):
    text = POLICY_TEXT
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


def test_d8_long_allowed_tasks_entry_is_shortened():
    pol = parse_policy(_policy(**{'allowed_tasks = ["heart-disease"]': f'allowed_tasks = ["{LONG}"]'}), "p.toml")
    with pytest.raises(PolicyError) as exc:
        check_allowed_tasks(pol, "heart-disease", "p.toml")
    msg = str(exc.value)
    assert len(msg) < 600, len(msg)
    assert msg.startswith("p.toml: field 'allowed_tasks':") and "'aaaa" in msg and "..." in msg
    assert "'heart-disease'" in msg and 'Fix: write allowed_tasks = ["heart-disease"]' in msg


def test_d8_many_allowed_tasks_are_shortened():
    many = ", ".join(f'"task-{i}"' for i in range(20_000))
    pol = parse_policy(_policy(**{'allowed_tasks = ["heart-disease"]': f"allowed_tasks = [{many}]"}), "p.toml")
    with pytest.raises(PolicyError) as exc:
        check_allowed_tasks(pol, "heart-disease", "p.toml")
    msg = str(exc.value)
    assert len(msg) < 600 and "'task-0'" in msg and "Fix:" in msg, msg[:300]


def test_d8_long_unknown_key_is_shortened():
    with pytest.raises(PolicyError) as exc:
        parse_policy(POLICY_TEXT.replace("[releases]", f"{LONG} = 1\n[releases]", 1), "p.toml")
    msg = str(exc.value)
    assert len(msg) < 1500, len(msg)
    assert "p.toml: field 'aaaa" in msg and "is not a policy field" in msg and "Fix: remove it" in msg


def test_d8_long_unknown_releases_key_is_shortened():
    with pytest.raises(PolicyError) as exc:
        parse_policy(POLICY_TEXT + f"\n{LONG} = 1\n", "p.toml")
    msg = str(exc.value)
    assert len(msg) < 1500 and "releases.aaaa" in msg and "Fix: remove it" in msg, len(msg)


@pytest.mark.parametrize("job", [dict(department=LONG, task="heart-disease"), dict(department="health", task=LONG)])
def test_d8_job_conflict_shortens_the_jobs_values(job):
    pol = parse_policy(POLICY_TEXT, "p.toml")
    setting, reason = job_conflict(pol, dp=True, noise_multiplier=1.0, clipping_norm=1.0, **job)
    assert setting in ("department", "task") and len(reason) < 400 and "'aaaa" in reason and "..." in reason, reason


def test_d8_job_conflict_shortens_the_policys_tasks():
    pol = parse_policy(_policy(**{'allowed_tasks = ["heart-disease"]': f'allowed_tasks = ["{LONG}"]'}), "p.toml")
    setting, reason = job_conflict(pol, department="health", task="heart-disease", dp=True, noise_multiplier=1.0,
                                   clipping_norm=1.0)
    assert setting == "task" and len(reason) < 400 and "'heart-disease'" in reason, reason


# --------------------------------------------------------------------------- D9


@pytest.fixture(autouse=True)
def _flower_console_on_stderr(monkeypatch):
    """Flower's console handler keeps the stderr of the test that imported flwr (closed since, under pytest)."""
    from flower_compat.logging import console_handler

    monkeypatch.setattr(console_handler(), "stream", sys.stderr)


def _run_server_app(run_config: dict):
    """Call the ServerApp as Flower does; return the exception it raised (None if none)."""
    from unittest import mock

    from flwr.app import Context, RecordDict

    from server.app import build_server_app

    sapp = build_server_app()
    context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    try:
        sapp(mock.MagicMock(name="grid"), context)
    except Exception as exc:  # noqa: BLE001 - Flower's own handler catches everything too
        return exc
    return None


def _flower_reports(exc: BaseException, entity: str = "ServerApp") -> None:
    """What Flower's run_serverapp / simulation app do with a ServerApp's exception."""
    from logging import ERROR

    from flower_compat.logging import log as flwr_log

    flwr_log(ERROR, "%s raised an exception", entity, exc_info=exc)


def _lines(caplog) -> list[str]:
    import logging

    return [logging.Formatter().format(r) for r in caplog.records]


@pytest.mark.parametrize(("change", "key", "value"), [
    ({"num-rounds": "two"}, "num-rounds", "'two'"),
    ({"local-epochs": -1}, "local-epochs", "-1"),
    ({"num_rounds": 2}, "num_rounds", "'num_rounds'"),
])
def test_d9_bad_run_config_is_one_line_without_traceback(tmp_path, caplog, change, key, value):
    import logging

    from server.app import RunConfigError

    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO)
    exc = _run_server_app({"department": "health", "run-dir": str(run_dir), **change})
    assert isinstance(exc, RunConfigError), exc  # still raised: Flower marks the run failed
    for entity in ("ServerApp", "Simulation"):
        _flower_reports(exc, entity)
    text = "\n".join(_lines(caplog))
    assert "Traceback" not in text and "raised an exception" not in text, text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, text
    line = errors[0].getMessage()
    assert "\n" not in line and key in line and value in line and "fix:" in line.lower(), line
    assert not run_dir.exists()  # nothing half-written


def test_d9_legacy_checkpoint_is_one_line_without_traceback(tmp_path, caplog):
    import logging

    from server.artefacts import ArtefactError

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pkl").write_bytes(b"old")
    caplog.set_level(logging.INFO)
    exc = _run_server_app({"department": "health", "run-dir": str(run_dir), "resume": True})
    assert isinstance(exc, ArtefactError), exc
    _flower_reports(exc)
    text = "\n".join(_lines(caplog))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in text and len(errors) == 1 and "checkpoint.pkl" in errors[0].getMessage(), text
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pkl"]


def test_d9_other_errors_keep_flowers_traceback(caplog):
    import logging

    caplog.set_level(logging.INFO)
    try:
        raise RuntimeError("a bug")
    except RuntimeError as exc:
        _flower_reports(exc)
    text = "\n".join(_lines(caplog))
    assert "ServerApp raised an exception" in text and "Traceback" in text and "a bug" in text, text


def test_d9_cityfed_debug_keeps_the_traceback(tmp_path, caplog, monkeypatch):
    import logging

    monkeypatch.setenv("CITYFED_DEBUG", "1")
    caplog.set_level(logging.INFO)
    exc = _run_server_app({"department": "health", "run-dir": str(tmp_path / "run"), "num-rounds": "two"})
    _flower_reports(exc)
    text = "\n".join(_lines(caplog))
    assert "run stopped: run config 'num-rounds'" in text and "Traceback" in text, text


# --------------------------------------------------------------------------- D10

BENCH = ROOT / "benchmarks"


def _bench(script: str, *args: str, timeout: float = 60):
    import subprocess

    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})


@pytest.mark.parametrize(("script", "args", "needles"), [
    ("accountant_noise.py", ["--department", "finance"], ["--department", "'finance'", "health", "traffic", "utility"]),
    ("accountant_noise.py", ["--epsilon", "-1"], ["--epsilon", "-1", "> 0"]),
    ("accountant_noise.py", ["--epsilon", "3", "nan"], ["--epsilon", "nan", "finite"]),
    ("accountant_noise.py", ["--epsilon", "inf"], ["--epsilon", "inf", "finite"]),
    ("dp_overhead.py", ["--models", "nosuch"], ["--models", "'nosuch'", "heart-mlp", "gru", "patchtst"]),
    ("dp_overhead.py", ["--epochs", "-1", "--models", "heart-mlp"], ["--epochs", "-1", ">= 1"]),
    ("dp_overhead.py", ["--repeats", "0", "--models", "heart-mlp"], ["--repeats", "0", ">= 1"]),
    ("dp_overhead.py", ["--batch", "0", "--models", "heart-mlp"], ["--batch", "0", ">= 1"]),
    ("dp_overhead.py", ["--min-time", "nan", "--models", "heart-mlp"], ["--min-time", "nan", "finite"]),
    ("dp_overhead.py", ["--models"], ["--models"]),
    ("secagg_overhead.py", ["--sizes", "0"], ["--sizes", "0", ">= 3"]),
    ("secagg_overhead.py", ["--sizes", "3", "2"], ["--sizes", "2", ">= 3"]),
    ("secagg_overhead.py", ["--rounds", "0"], ["--rounds", "0", ">= 1"]),
    ("secagg_overhead.py", ["--repeats", "-2"], ["--repeats", "-2", ">= 1"]),
    ("personalise_start.py", ["/nonexistent", "Cleveland", "--max-epochs", "0"], ["--max-epochs", "0", ">= 1"]),
    ("personalise_start.py", ["/nonexistent", "Cleveland", "--lr", "-1"], ["--lr", "-1", "> 0"]),
])
def test_d10_bad_benchmark_arguments_are_refused_at_once(script, args, needles):
    out = _bench(script, *args)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "usage:" in out.stderr and out.stdout == "", out.stderr
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)


@pytest.fixture()
def bad_inputs(tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    other = tmp_path / "notresults.json"
    other.write_text('{"a": 1}')
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"scenario": "x"}\n[1, 2]\n')
    return {"garbage": garbage, "other": other, "bad_rows": bad_rows, "dir": tmp_path}


@pytest.mark.parametrize(("script", "args", "needles"), [
    ("compare_tables.py", ["/nonexistent.json"], ["/nonexistent.json", "Fix:"]),
    ("compare_tables.py", ["{garbage}"], ["garbage.json", "Fix:"]),
    ("compare_tables.py", ["{other}"], ["notresults.json", "not an `fl-sim compare` results.json", "Fix:"]),
    ("seed_spread.py", ["{garbage}"], ["garbage.json", "Fix:"]),
    ("seed_spread.py", ["{other}"], ["notresults.json", "not an `fl-sim compare` results.json", "Fix:"]),
    ("personalise_start.py", ["/nonexistent", "Cleveland"], ["/nonexistent/results.json", "Fix:"]),
    ("fault_table.py", ["--render", "/nonexistent.jsonl"], ["/nonexistent.jsonl", "no such file"]),
    ("fault_table.py", ["--render", "{bad_rows}"], ["bad.jsonl:2", "not a fault-table row"]),
])
def test_d10_bad_input_file_exits_2_with_its_message(bad_inputs, script, args, needles):
    out = _bench(script, *(a.format(**bad_inputs) for a in args))
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and out.stdout == "", out.stderr
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)
