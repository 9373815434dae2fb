"""Shared fixtures-as-functions for the federation tests: four health hospitals with their own policies."""

import os

# These tests are simulations on one machine: they compare runs (with and without a bad reply,
# before and after a resume), so DP noise follows the job's seed, as under fl-sim. The default
# on a department node (noise seeded from OS entropy) is tested in tests/test_dp.py.
os.environ.setdefault("CITYFED_DP_SEED_FROM_JOB", "1")


SITES = ["Cleveland", "Hungary", "VA Long Beach", "Switzerland"]

#: A health node's policy (``{eps}``: its lifetime budget).
POLICY = """department = "health"
max_epsilon = {eps}
delta = 1e-3
min_noise_multiplier = 0.5
max_clipping_norm = 1.0
allowed_tasks = ["heart-disease"]
max_rounds_per_run = 20
require_dp = true
"""


def site_delta(site: str, ceiling: float | None = 1e-3) -> float:
    """The delta a health node accounts at: 1/(10 n) of the site's training records, or the ceiling if smaller."""
    from citydata import load_department

    n = len(load_department("health").site_data(site).train)
    return min(1 / (10 * n), ceiling if ceiling is not None else 1.0)


def released_delta(ledger, site: str, policy) -> float:
    """The delta a DP node accounts at: that of its released (noised) training count, not the exact one.

    ``ledger`` is the node's ledger path, ``policy`` its policy file (the count's rounding).
    """
    from clients.node import public_count
    from privacy.ledger import PrivacyLedger
    from privacy.policy import load_policy

    (count,) = PrivacyLedger(ledger).counts(site, split="train")
    return public_count(count["value"], load_policy(policy))[1]


def health_nodes(tmp_path, eps=(8.0, 8.0, 8.0, 8.0)) -> list[dict]:
    """Node configs of the first ``len(eps)`` hospitals, each with a policy file and a ledger under ``tmp_path``."""
    out = []
    for site, e in zip(SITES, eps):
        pol = tmp_path / f"{site}.toml"
        pol.write_text(POLICY.format(eps=e))
        out.append({"department": "health", "site": site, "policy": str(pol), "ledger": str(tmp_path / f"{site}.sqlite")})
    return out
