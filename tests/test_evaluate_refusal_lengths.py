"""An evaluate message's refusal shows the coordinator's department/task cut short, as the train path does.

The reason goes back to the coordinator and into the node's audit log: a 100,000-character task
name was echoed in full (privacy.policy.shown_value cuts every other echoed value to 60 characters).
"""

import pytest

from clients.app import app
from privacy.policy import SHOWN_MAX
from test_clientapp import _identity, _msg, _node  # noqa: F401 (fixture)


@pytest.mark.parametrize("key", ["task", "department"])
def test_a_huge_task_or_department_is_cut_in_the_refusal(tmp_path, key):
    ctx, _ = _node(tmp_path)
    reply = app(_msg(kind="evaluate", **{key: "x" * 100_000})[0], ctx)
    assert reply.has_error()
    reason = reply.error.reason
    assert "refused" in reason and key in reason
    assert len(reason) < 400 and "x" * (SHOWN_MAX + 1) not in reason, len(reason)


def test_a_huge_non_number_in_the_job_config_is_cut_in_the_refusal(tmp_path):
    ctx, _ = _node(tmp_path)
    reply = app(_msg(**{"local-epochs": "9" * 100_000 + "x"})[0], ctx)
    assert reply.has_error()
    reason = reply.error.reason
    assert "local-epochs" in reason and len(reason) < 400, len(reason)
