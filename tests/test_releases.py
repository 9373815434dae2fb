"""Gaussian-mechanism metric releases, their accounting, and noise calibration with reserved releases."""

import sqlite3

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from privacy.dp import CalibrationError, calibrate_noise, rdp_epsilon
from privacy.ledger import PrivacyLedger, Release
from privacy.releases import noisy_means


def test_noise_scale_is_sigma_over_n_of_the_range():
    """Released mean = (clipped sum + N(0, sigma^2)) / n * bound: spread sigma * bound / n.

    False-failure odds on a correct release (3000 draws; clipping at 0/bound is 6 sd away and the
    4-digit rounding adds ~3e-4 to a spread of 0.16, both negligible): the sample std has relative
    standard error 1/sqrt(2 * 2999) = 0.0129, so rel = 0.08 is 6.2 standard errors (5e-10, two-sided);
    the mean bound is 5 standard errors (5.7e-7; it was 4, 6.3e-5 per run).
    """
    n, sigma, bound = 50, 4.0, 2.0
    contrib = {"loss": np.full(n, 1.0)}  # true mean 1.0 = half the range: clipping at 0/bound is rare
    draws = np.array([noisy_means(contrib, {"loss": bound}, sigma).values["loss"] for _ in range(3000)])
    expected = sigma * bound / n
    assert draws.std() == pytest.approx(expected, rel=0.08)
    assert draws.mean() == pytest.approx(1.0, abs=5 * expected / np.sqrt(len(draws)))


def test_each_record_is_clipped_to_its_bound():
    """One huge (or NaN) value moves the release by at most bound / n: the sensitivity the noise assumes."""
    n = 20
    base = np.zeros(n)
    spiked = base.copy()
    spiked[0] = 1e9
    nan = base.copy()
    nan[1] = np.nan
    zero_noise = [noisy_means({"x": v}, {"x": 3.0}, 0.0).values["x"] for v in (base, spiked, nan)]
    assert zero_noise == [0.0, pytest.approx(3.0 / n), pytest.approx(3.0 / n)]


def test_release_differs_from_the_exact_mean():
    """The released mean carries the Gaussian noise: spread sigma / n around the exact mean 0.5.

    Releases are rounded to 4 significant digits, so a draw can land on 0.5 by chance (about
    2.4e-4 per draw here); the test counts such draws instead of forbidding them, and checks the
    spread, which a noiseless or under-noised release cannot fake.
    """
    contrib = {"accuracy": np.array([1.0, 0.0] * 30)}
    draws = np.array([noisy_means(contrib, {"accuracy": 1.0}, 10.0).values["accuracy"] for _ in range(400)])
    expected_sd = 10.0 / 60
    assert 0.8 * expected_sd < draws.std() < 1.2 * expected_sd
    assert abs(draws.mean() - 0.5) < 5 * expected_sd / np.sqrt(len(draws))
    assert np.count_nonzero(draws == 0.5) <= 3
    assert len(set(draws.tolist())) > 350


def test_gaussian_mechanism_is_accounted_as_sampled_gaussian_at_rate_one():
    """k noised sums at sigma cost what k Opacus steps at q = 1 cost: the two agree exactly."""
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=10.0, sample_rate=1.0)
    assert rdp_epsilon([(10.0, 1.0, 3)], 1e-4) == pytest.approx(acc.get_epsilon(delta=1e-4), rel=1e-12)


def test_calibration_reserves_the_planned_releases():
    """With evaluation releases planned, DP-SGD gets more noise and the total lands on the target."""
    delta, q, steps = 1e-4, 1 / 7, 7 * 15
    reserved = [(10.0, 1.0, 10)]
    plain = calibrate_noise(3.0, delta, q, steps)
    with_metrics = calibrate_noise(3.0, delta, q, steps, reserved)
    assert with_metrics > plain
    total = rdp_epsilon([(with_metrics, q, steps), *reserved], delta)
    assert 2.97 <= total <= 3.0  # on target, never above
    with pytest.raises(CalibrationError, match="already made or reserved"):
        calibrate_noise(0.2, delta, q, steps, [(1.0, 1.0, 50)])


def test_version_1_ledger_is_upgraded_in_place_and_keeps_its_budget(tmp_path):
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE releases (id INTEGER PRIMARY KEY AUTOINCREMENT, site TEXT NOT NULL, department TEXT NOT NULL,
          run_id TEXT NOT NULL, round INTEGER NOT NULL, noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL,
          steps INTEGER NOT NULL, planned_steps INTEGER NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL,
          status TEXT NOT NULL, reason TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
        INSERT INTO releases VALUES (1, 'Cleveland', 'health', 'r0', 1, 1.1, 0.1, 30, 30, 1e-3, 'rdp', 'committed',
          NULL, '2026-01-01', '2026-01-01');
        PRAGMA user_version = 1;""")
    con.close()
    led = PrivacyLedger(path)
    assert led.releases()[0]["mechanism"] == "dp-sgd"
    assert led.epsilon("Cleveland", 1e-4) == pytest.approx(rdp_epsilon([(1.1, 0.1, 30)], 1e-4))
    rid = led.begin(Release(10.0, 1.0, 2, 1e-4, "r1", 1, "Cleveland", "health", mechanism="gaussian-eval"))
    led.commit(rid)
    assert led.count("Cleveland", "r1", "gaussian-eval") == 1 and led.count("Cleveland", "r0", "gaussian-eval") == 0
    assert led.epsilon("Cleveland", 1e-4) == pytest.approx(rdp_epsilon([(1.1, 0.1, 30), (10.0, 1.0, 2)], 1e-4))
    with pytest.raises(ValueError, match="mechanism"):
        Release(1.0, 1.0, 1, 1e-4, "r", 1, "Cleveland", "health", mechanism="laplace")
