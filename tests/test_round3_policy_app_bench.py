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
