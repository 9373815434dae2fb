"""A node's energy figure leaves only when its own policy says so (``[releases] energy``).

``energy-j`` is measured from the task's compute, which follows the site's exact record count
and, under DP-SGD's Poisson sampling, each round's realised batch sizes, which the accountant's
subsampling analysis assumes stay hidden. It is not accounted in the ledger, so by default
nothing of it leaves (README "Energy per run and per site").
"""

import pytest

from clients.app import app
from contract.energy import ENERGY_METRICS
from privacy.policy import PolicyError, ReleasePolicy, load_policy
from test_clientapp import _identity, _msg, _node  # noqa: F401 (fixture)


def _train_metrics(tmp_path, releases=""):
    ctx, _ = _node(tmp_path, releases=releases)
    reply = app(_msg()[0], ctx)
    assert not reply.has_error()
    return dict(reply.content["metrics"])


def test_default_policy_sends_no_energy(tmp_path, monkeypatch):
    monkeypatch.delenv("CITYFED_ENERGY", raising=False)
    assert ReleasePolicy().energy == "off"
    metrics = _train_metrics(tmp_path)
    assert not set(ENERGY_METRICS) & set(metrics), metrics
    assert "num-examples" in metrics and "epsilon" in metrics  # the reply itself is complete


def test_policy_that_opts_in_sends_it(tmp_path, monkeypatch):
    monkeypatch.delenv("CITYFED_ENERGY", raising=False)
    metrics = _train_metrics(tmp_path, releases='energy = "sent"')
    assert set(ENERGY_METRICS) <= set(metrics) and metrics["energy-j"] > 0


def test_node_switch_still_turns_it_off(tmp_path, monkeypatch):
    monkeypatch.setenv("CITYFED_ENERGY", "off")
    metrics = _train_metrics(tmp_path, releases='energy = "sent"')
    assert not set(ENERGY_METRICS) & set(metrics)


@pytest.mark.parametrize("value", ['"on"', "true", "1", '""'])
def test_bad_energy_setting_names_the_field(tmp_path, value):
    pol = tmp_path / "policy.toml"
    pol.write_text('department = "health"\nmax_epsilon = 3.0\nallowed_tasks = ["heart-disease"]\n'
                   f"[releases]\nenergy = {value}\n")
    with pytest.raises(PolicyError) as exc:
        load_policy(pol)
    msg = str(exc.value)
    assert "releases.energy" in msg and str(pol) in msg and "sent" in msg


def test_example_policies_send_no_energy():
    from clients.app import example_policy

    for dept in ("health", "traffic", "utility"):
        assert load_policy(example_policy(dept)).releases.energy == "off", dept
