"""Empirical privacy audit: LiRA membership inference and canaries against one node's training.

What is audited: the release of one department node's **local training** as the project does
it, :func:`clients.training.fit` (non-private, or Opacus DP-SGD through :mod:`privacy.dp` at a
target epsilon) with ``fl-sim baselines``' hyper-parameters for the department's model. Each
trained model's DP-SGD release is recorded in a real :class:`privacy.ledger.PrivacyLedger`,
and the epsilon shown next to the empirical bound is that ledger's.

How (Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1) Training Run", run on
several independent target models; LiRA from Carlini et al. 2022):

1. The audit pool is the department's training records (the chosen sites) plus ``canaries``
   synthetic records (atypical feature values, random label). Every record is included in
   each model's training set independently with probability 1/2 (the masks are drawn once and
   reused for every privacy setting).
2. ``shadows`` reference models and ``targets`` audited models are trained per setting, all by
   the same code. The shadows' memberships are known to the attacker; the targets' are not.
3. Each target's records are scored by online LiRA: the logit-scaled confidence of the record's
   label (forecasting: minus the log of the window's squared error) is compared with Gaussians
   fitted to the shadows that included it (IN) and those that did not (OUT), global variance.
4. The attacker guesses "member" for the top ``k+`` scores and "non-member" for the bottom
   ``k-`` and abstains on the rest; ``k+`` and ``k-`` are chosen on the shadows (leave one
   shadow out), never on the targets. The number of correct guesses gives, by Steinke et al.'s
   Theorem (their Appendix D p-value, with the delta term), an epsilon ``eps_lb`` such that the
   mechanism is **not** ``(eps_lb, delta)``-DP, with the stated confidence. Records and
   canaries are audited separately (two tests; each at half of ``1 - confidence``, Bonferroni).

The pooled targets are one run of the product mechanism (each record's inclusion affects one
target only) and the shadows are independent of the targets' memberships, so the theorem's
conditions hold for the pooled count.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

#: Fractions of the audited examples guessed as members (top scores) tried on the shadows.
GUESS_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)

#: False-positive rates at which the ROC's true-positive rate is reported.
LOW_FPRS = (0.001, 0.01, 0.1)


# --------------------------------------------------------------------------------------
# the epsilon lower bound (Steinke, Nasr, Jagielski 2023, Appendix D)
# --------------------------------------------------------------------------------------


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int (got {value!r})")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m (correct guesses <= guesses <= audited examples); got m={m}, r={r}, v={v}")


def audit_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of at least ``v`` correct guesses out of ``r`` under ``(eps, delta)``-DP.

    Steinke et al. 2023, Theorem 5.2 / Appendix D: ``m`` audited examples, each included
    independently with probability 1/2; the attacker makes ``r`` guesses (abstaining on the
    rest), ``v`` of them correct. Under the null hypothesis "the mechanism is (eps, delta)-DP"
    the probability of ``>= v`` correct guesses is at most
    ``P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta * alpha`` (alpha as in the paper).

    Parameters
    ----------
    m, r, v : int
        Audited examples, guesses, correct guesses (``0 <= v <= r <= m``).
    eps : float
        Epsilon of the null hypothesis (``>= 0``).
    delta : float
        Delta of the null hypothesis, in ``[0, 1]``.

    Returns
    -------
    float
        The p-value, in ``[0, 1]``.
    """
    from scipy.stats import binom

    _check_counts(m, r, v)
    if not (eps >= 0) or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and 0 <= delta <= 1 (got eps={eps!r}, delta={delta!r})")
    q = 1.0 / (1.0 + math.exp(-eps)) if eps < 700 else 1.0
    beta = float(binom.sf(v - 1, r, q))
    alpha = 0.0
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        alpha = float(np.max(np.cumsum(binom.pmf(v - i, r, q)) / i))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest epsilon the audit rejects: the mechanism is not ``(eps, delta)``-DP, at ``confidence``.

    Parameters
    ----------
    m, r, v : int
        Audited examples, guesses, correct guesses (:func:`audit_p_value`).
    delta : float
        The mechanism's delta.
    confidence : float
        In (0, 1), e.g. 0.95.

    Returns
    -------
    float
        ``sup {eps : p-value(eps) < 1 - confidence}`` to within 1e-6 relative (bisection), or
        0.0 when even ``eps = 0`` is not rejected (a random guesser gets 0 almost always). A
        perfect attacker with ``r = v`` guesses and ``delta = 0`` gets ``log(q / (1 - q))`` with
        ``q = (1 - confidence) ** (1 / r)``: the sample size caps the bound.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) (got {confidence!r})")
    p = 1.0 - confidence
    if audit_p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while audit_p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2
        if hi > 512:  # beyond any meaningful epsilon
            return lo
    for _ in range(60):
        if hi - lo <= 1e-6 * hi:
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if audit_p_value(m, r, v, mid, delta) < p else (lo, mid)
    return float(lo)


def guess_outcome(scores: np.ndarray, members: np.ndarray, k_pos: int, k_neg: int) -> tuple[int, int]:
    """Guesses and correct guesses when the top ``k_pos`` scores are called members, the bottom ``k_neg`` not.

    Returns
    -------
    (r, v) : tuple of int
        ``r = k_pos + k_neg`` guesses (clipped to the number of examples, no example guessed
        twice), ``v`` correct ones.
    """
    scores = np.asarray(scores, dtype=float).ravel()
    members = np.asarray(members, dtype=bool).ravel()
    if scores.shape != members.shape:
        raise ValueError(f"scores and members differ in length ({scores.size} vs {members.size})")
    m = scores.size
    k_pos = int(min(max(k_pos, 0), m))
    k_neg = int(min(max(k_neg, 0), m - k_pos))
    order = np.argsort(-scores, kind="stable")
    v = int(members[order[:k_pos]].sum()) + int((~members[order[m - k_neg:]]).sum() if k_neg else 0)
    return k_pos + k_neg, v


def guess_grid(m: int) -> list[tuple[int, int]]:
    """``(k+, k-)`` pairs tried: top fractions of :data:`GUESS_FRACTIONS`, with and without as many bottom guesses."""
    out = []
    for f in GUESS_FRACTIONS:
        k = max(1, int(round(f * m)))
        out += [(k, 0), (k, k)] if 2 * k <= m else [(k, 0)]
    return sorted(set(out))


def one_run_audit(scores: np.ndarray, members: np.ndarray, delta: float, confidence: float,
                  k_pos: int, k_neg: int) -> dict:
    """The epsilon lower bound of one fixed guessing rule on audited ``scores``.

    Returns
    -------
    dict
        ``m``, ``guesses`` (r), ``correct`` (v), ``k_pos``, ``k_neg``, ``eps_lb``,
        ``confidence``, ``delta``.
    """
    m = int(np.asarray(members).size)
    r, v = guess_outcome(scores, members, k_pos, k_neg)
    return {"m": m, "guesses": r, "correct": v, "k_pos": int(k_pos), "k_neg": int(k_neg),
            "eps_lb": epsilon_lower_bound(m, r, v, delta, confidence), "confidence": confidence, "delta": delta}


def choose_guesses(scores: np.ndarray, members: np.ndarray, delta: float, confidence: float,
                   m_target: int) -> tuple[float, float]:
    """The guessing rule (fractions of k+ and k-) with the highest bound on reference scores.

    Parameters
    ----------
    scores, members : ndarray
        Scores and true memberships of models the attacker knows (the shadows).
    m_target : int
        Number of examples the rule will be applied to (the bound's ``m``).

    Returns
    -------
    (f_pos, f_neg) : tuple of float
        Fractions of the examples to guess as members (top) and non-members (bottom).
    """
    scores = np.asarray(scores, dtype=float).ravel()
    members = np.asarray(members, dtype=bool).ravel()
    m = scores.size
    best, rule = -1.0, (GUESS_FRACTIONS[0], 0.0)
    for k_pos, k_neg in guess_grid(m):
        r, v = guess_outcome(scores, members, k_pos, k_neg)
        # bound as if this many guesses were made among m_target examples at the same accuracy
        scale = m_target / m
        rs, vs = max(1, int(round(r * scale))), int(round(v * scale))
        eps = epsilon_lower_bound(max(m_target, rs), rs, min(vs, rs), delta, confidence)
        if eps > best + 1e-12:
            best, rule = eps, (k_pos / m, k_neg / m)
    return rule


# --------------------------------------------------------------------------------------
# LiRA
# --------------------------------------------------------------------------------------


def membership_signal(outputs: np.ndarray, y: np.ndarray, task: str) -> np.ndarray:
    """The per-record statistic LiRA models as Gaussian.

    Classification: the logit-scaled confidence of the true label, ``log(p / (1 - p))``,
    which for one logit ``z`` is ``z`` for label 1 and ``-z`` for label 0. Forecasting: minus
    the log of the window's mean squared error (higher = better fitted).
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if task == "binary-classification":
        return (2.0 * y.reshape(outputs.shape) - 1.0) * outputs
    n = len(y)
    err = ((outputs.reshape(n, -1) - y.reshape(n, -1)) ** 2).mean(axis=1)
    return -np.log(err + 1e-8)


def lira_scores(phi_ref: np.ndarray, in_ref: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Online LiRA log-likelihood ratios (member vs non-member) with global variances.

    Parameters
    ----------
    phi_ref : ndarray, shape (S, N)
        :func:`membership_signal` of ``S`` reference (shadow) models on ``N`` records.
    in_ref : ndarray of bool, shape (S, N)
        Whether each shadow trained on each record.
    phi : ndarray, shape (T, N) or (N,)
        The audited models' signals.

    Returns
    -------
    ndarray, same shape as ``phi``
        ``log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)`` per record: higher = more
        likely a member. ``mu`` per record; ``s`` one per side (Carlini et al.'s choice
        below 64 shadows). A record no shadow included (or none excluded) gets the other
        side's mean shifted by the median IN - OUT difference.
    """
    phi_ref = np.asarray(phi_ref, dtype=np.float64)
    in_ref = np.asarray(in_ref, dtype=bool)
    if phi_ref.shape != in_ref.shape or phi_ref.ndim != 2:
        raise ValueError(f"phi_ref and in_ref must have the same (S, N) shape (got {phi_ref.shape}, {in_ref.shape})")
    n_in, n_out = in_ref.sum(0), (~in_ref).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_in = np.where(in_ref, phi_ref, 0.0).sum(0) / n_in
        mu_out = np.where(~in_ref, phi_ref, 0.0).sum(0) / n_out
    both = (n_in > 0) & (n_out > 0)
    shift = float(np.median((mu_in - mu_out)[both])) if both.any() else 0.0
    mu_in = np.where(n_in > 0, mu_in, mu_out + shift)
    mu_out = np.where(n_out > 0, mu_out, mu_in - shift)
    dev_in = (phi_ref - mu_in)[in_ref]
    dev_out = (phi_ref - mu_out)[~in_ref]
    floor = 1e-6 + 1e-3 * float(np.std(phi_ref))
    s_in = max(float(np.sqrt(np.mean(dev_in**2))) if dev_in.size else 1.0, floor)
    s_out = max(float(np.sqrt(np.mean(dev_out**2))) if dev_out.size else 1.0, floor)
    phi = np.asarray(phi, dtype=np.float64)
    # log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out), the 2 pi terms cancel
    return 0.5 * ((phi - mu_out) / s_out) ** 2 - 0.5 * ((phi - mu_in) / s_in) ** 2 + math.log(s_out / s_in)


def lira_scores_leave_one_out(phi_ref: np.ndarray, in_ref: np.ndarray) -> np.ndarray:
    """LiRA scores of each reference model computed from the other ones (shape (S, N))."""
    S = len(phi_ref)
    keep = np.ones(S, dtype=bool)
    out = np.empty_like(np.asarray(phi_ref, dtype=np.float64))
    for s in range(S):
        keep[:] = True
        keep[s] = False
        out[s] = lira_scores(phi_ref[keep], in_ref[keep], phi_ref[s])
    return out


def roc_summary(scores: np.ndarray, members: np.ndarray, fprs=LOW_FPRS) -> dict:
    """ROC-AUC and the true-positive rate at low false-positive rates.

    Returns
    -------
    dict
        ``auc`` and ``tpr_at_fpr`` (``{"0.001": tpr, ...}``: the largest TPR of a threshold
        whose FPR is at most the given rate), ``n_members``, ``n_nonmembers``.
    """
    from shared_models.scoring import roc_auc

    scores = np.asarray(scores, dtype=float).ravel()
    members = np.asarray(members, dtype=bool).ravel()
    pos, neg = int(members.sum()), int((~members).sum())
    order = np.argsort(-scores, kind="stable")
    s_sorted, m_sorted = scores[order], members[order]
    tp, fp = np.cumsum(m_sorted), np.cumsum(~m_sorted)
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # thresholds between distinct scores only
    tpr, fpr = tp[last] / max(pos, 1), fp[last] / max(neg, 1)
    at = {}
    for f in fprs:
        ok = fpr <= f
        at[str(f)] = float(tpr[ok].max()) if ok.any() else 0.0
    return {"auc": roc_auc(members, scores), "p_value": auc_p_value(scores, members), "tpr_at_fpr": at,
            "n_members": pos, "n_nonmembers": neg}


def auc_p_value(scores: np.ndarray, members: np.ndarray) -> float:
    """One-sided p-value of "members score higher than non-members" (the Mann-Whitney U test of the AUC > 0.5).

    Parameters
    ----------
    scores : array
        The attack's membership scores.
    members : array of bool
        Which scores are of members.

    Returns
    -------
    float
        The chance of an AUC at least this high if membership did not change the scores (1.0 where
        either side is empty). Ties are handled by SciPy's tie correction.
    """
    from scipy.stats import mannwhitneyu

    scores = np.asarray(scores, dtype=float).ravel()
    members = np.asarray(members, dtype=bool).ravel()
    if members.all() or not members.any():
        return 1.0
    return float(mannwhitneyu(scores[members], scores[~members], alternative="greater").pvalue)


# --------------------------------------------------------------------------------------
# canaries
# --------------------------------------------------------------------------------------


def make_canaries(X: np.ndarray, y: np.ndarray, k: int, rng: np.random.Generator, task: str) -> tuple[np.ndarray, np.ndarray]:
    """``k`` synthetic records built to be memorised if trained on.

    Classification: each feature drawn independently; a feature with more than two distinct
    values in ``X`` is put 2.5-4 standard deviations from its mean (random side), any other
    takes one of its observed values; the label is random. Forecasting: a random window's
    inputs with a random target (standard normal times 3 in scaled units): a (window, target)
    pair no site produced. Canaries never leave the audit (they are not written anywhere).
    """
    X = np.asarray(X, dtype=np.float32)
    if k <= 0:
        return X[:0].copy(), np.asarray(y, dtype=np.float32)[:0].copy()
    if task == "binary-classification":
        can = np.empty((k, X.shape[1]), dtype=np.float32)
        for j in range(X.shape[1]):
            col = X[:, j]
            values = np.unique(col)
            if values.size > 2:
                side = rng.choice([-1.0, 1.0], size=k)
                can[:, j] = col.mean() + side * rng.uniform(2.5, 4.0, size=k) * (col.std() or 1.0)
            else:
                can[:, j] = rng.choice(values, size=k)
        return can, rng.integers(0, 2, size=k).astype(np.float32)
    idx = rng.integers(0, len(X), size=k)
    ys = (3.0 * rng.standard_normal((k,) + np.asarray(y).shape[1:])).astype(np.float32)
    return X[idx].copy(), ys


# --------------------------------------------------------------------------------------
# the audit
# --------------------------------------------------------------------------------------


@dataclass
class AuditSettings:
    """What ``fl-sim audit`` runs (its options)."""

    department: str = "health"
    #: Target epsilons of the DP settings audited (a non-private control is always added).
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    shadows: int = 16
    targets: int = 4
    canaries: int = 64
    seed: int = 0
    #: Sites whose training records form the pool (None = all of the department's).
    sites: tuple[str, ...] | None = None
    accountant: str = "rdp"
    confidence: float = 0.95
    max_grad_norm: float = 1.0
    #: Forecasting: at most this many windows in the pool (evenly spaced; 0 = all).
    max_records: int = 2000
    #: Include the non-private control.
    control: bool = True


@dataclass
class _Pool:
    X: np.ndarray
    y: np.ndarray
    n_records: int
    X_test: np.ndarray
    y_test: np.ndarray
    sites: list[str] = field(default_factory=list)


def _pool(settings: AuditSettings, ds, task: str, rng: np.random.Generator) -> _Pool:
    sites = list(settings.sites) if settings.sites else list(ds.sites)
    unknown = [s for s in sites if s not in ds.sites]
    if unknown:
        raise ValueError(f"unknown site(s) {', '.join(map(repr, unknown))} for {settings.department}; "
                         f"{ds.site_choices(unknown[0])}")
    parts = [ds.site_data(s) for s in sites]
    X = np.concatenate([p.train.X for p in parts]).astype(np.float32)
    y = np.concatenate([p.train.y for p in parts]).astype(np.float32)
    Xt = np.concatenate([p.test.X for p in parts]).astype(np.float32)
    yt = np.concatenate([p.test.y for p in parts]).astype(np.float32)
    if task != "binary-classification" and settings.max_records and len(X) > settings.max_records:
        keep = np.linspace(0, len(X) - 1, settings.max_records).round().astype(int)
        X, y = X[keep], y[keep]
    cX, cy = make_canaries(X, y, settings.canaries, rng, task)
    return _Pool(np.concatenate([X, cX]), np.concatenate([y, cy]), len(X), Xt, yt, sites)


#: The control's AUC must be beyond chance at this level (one-sided Mann-Whitney p-value), split over the
#: two parts tested (records and canaries, Bonferroni), besides being at least 0.6.
LEAKAGE_ALPHA = 0.05


def _clear(part: dict | None) -> bool:
    """A part's AUC >= 0.6 and beyond chance (an audit before p-values: the AUC alone)."""
    if not part:
        return False
    return part["auc"] >= 0.6 and part.get("p_value", 0.0) < LEAKAGE_ALPHA / 2


def _verdict(row: dict) -> str:
    """Issue 12's reading: the control must leak clearly (AUC >= 0.6 on records or canaries, or eps_lb > 1).

    An AUC counts only where it is also beyond chance (:data:`LEAKAGE_ALPHA`): on a few canaries an AUC of
    0.64 is what chance gives one time in ten (independent privacy audit, 2026-12-07). The bound
    ``eps_lb`` is a one-sided test of its own at the audit's confidence.
    """
    if row["epsilon"] is None:
        if any(_clear(row.get(k)) for k in ("records", "canaries")) or row["eps_lb"] > 1.0:
            return "clear leakage (the attack can test DP bounds)"
        return "attack too weak: no clear leakage even without DP, so the DP rows prove nothing"
    if row["eps_lb"] > row["ledger_epsilon"] + 1e-9:
        return "BOUND ABOVE LEDGER EPSILON: a bug in the accounting, the DP training or the audit"
    return "consistent with the ledger"


class AuditOutputError(OSError):
    """The audit's result could not be written at its end (``out/audit.json``); nothing of the run was kept.

    Attributes
    ----------
    path : Path
        The file that could not be written.
    reason : str
        The operating system's reason (e.g. ``No space left on device``); never a record's value.
    """

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot write {path} ({reason})")
        self.path, self.reason = Path(path), reason


#: Files the audit writes in its output folder at its end (``report.html``: fl-sim audit, after run_audit).
FIXED_OUTPUTS = ("audit.json", "audit.json.tmp", "report.html", "report.html.tmp")


def ledger_name(eps: float) -> str:
    """File name of the audit ledger of DP setting ``eps`` (in ``OUT/ledgers``): ``audit-eps{eps:g}.sqlite``.

    Parameters
    ----------
    eps : float
        Target epsilon of the setting.

    Returns
    -------
    str
        The name; two epsilons with the same name (equal to 6 significant digits) share one ledger.
    """
    return f"audit-eps{eps:g}.sqlite"


def same_ledger(epsilons) -> tuple[float, float] | None:
    """The first two of ``epsilons`` that would share one ledger (:func:`ledger_name`), or None.

    Two such settings would compose in one ledger: the second row would report both
    settings' epsilon, and both rows are labelled alike. ``fl-sim audit`` refuses them.

    Parameters
    ----------
    epsilons : iterable of float
        Target epsilons, in the order given.

    Returns
    -------
    tuple of (float, float) or None
        The earlier and the later value of the first collision.
    """
    seen: dict[str, float] = {}
    for e in epsilons:
        name = ledger_name(e)
        if name in seen:
            return seen[name], e
        seen[name] = e
    return None


def repeated_site(sites) -> str | None:
    """The first site named more than once in ``sites`` (its records would be in the pool twice), or None.

    Parameters
    ----------
    sites : iterable of str or None

    Returns
    -------
    str or None
    """
    seen: set[str] = set()
    for s in sites or ():
        if s in seen:
            return s
        seen.add(s)
    return None


def run_audit(settings: AuditSettings, out: Path, *,
              on_model: Callable[[str, int, int], None] | None = None) -> dict:
    """Train shadows and targets per privacy setting, attack them, bound epsilon; write ``out/audit.json``.

    Parameters
    ----------
    settings : AuditSettings
    out : Path
        Folder for ``audit.json`` and ``ledgers/audit-*.sqlite`` (one ledger per DP setting,
        one site per target model). Existing audit ledgers there are an error (they would be
        added to): remove them or choose another folder. So is a folder at ``audit.json``
        (or ``audit.json.tmp``) or a file at ``ledgers``: found before anything is trained.
    on_model : callable, optional
        Called as ``on_model(setting_label, index, total)`` before each model is trained.

    Returns
    -------
    dict
        What ``audit.json`` holds: ``meta`` (mechanism, settings, pool sizes, seconds) and
        ``rows``, one per privacy setting (ledger epsilon and delta, attack ROC, bounds, verdict).

    Raises
    ------
    ValueError
        Bad settings (counts, confidence, epsilons, two epsilons sharing a ledger, a site twice).
    FileExistsError, IsADirectoryError, NotADirectoryError
        Earlier audit ledgers in ``out``, or an output path of the wrong kind (before training).
    AuditOutputError
        ``audit.json`` could not be written at the end (e.g. a full disk): its temporary file
        and this run's ledgers are removed, so nothing half-written blocks a rerun.
    """
    import torch

    from citydata import load_department
    from clients.training import TrainConfig, fit
    from shared_models.scoring import predict, roc_auc
    from privacy.dp import DPSettings, default_delta
    from privacy.ledger import PrivacyLedger, Release
    from shared_models import build_model, default_model_config, model_kinds
    from simulations.baselines import DEFAULT_TRAIN

    t_start = time.perf_counter()
    if settings.shadows < 2 or settings.targets < 1:
        raise ValueError(f"need at least 2 shadows and 1 target (got shadows={settings.shadows}, targets={settings.targets})")
    if settings.canaries < 0:
        raise ValueError(f"canaries must be >= 0 (got {settings.canaries})")
    if not 0 < settings.confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) (got {settings.confidence})")
    if any(not (e > 0 and math.isfinite(e)) for e in settings.epsilons):
        raise ValueError(f"every epsilon must be a finite number > 0 (got {list(settings.epsilons)})")
    clash = same_ledger(settings.epsilons)
    if clash:
        raise ValueError(f"epsilons {clash[0]!r} and {clash[1]!r} are one setting (both eps={clash[0]:g}, ledger "
                         f"{ledger_name(clash[0])}): the second would be composed with the first; give each once")
    twice = repeated_site(settings.sites)
    if twice is not None:
        raise ValueError(f"site {twice!r} given more than once (its records would be in the pool twice); "
                         "give each site once")
    out = Path(out)
    ledger_dir = out / "ledgers"
    for p in (out / "audit.json", out / "audit.json.tmp"):  # found before the training, not after it
        if p.exists() and not p.is_file():
            raise IsADirectoryError(f"{p} exists and is not a file: the audit writes it at its end. Remove it or "
                                    "choose another --out")
    if ledger_dir.exists() and not ledger_dir.is_dir():
        raise NotADirectoryError(f"{ledger_dir} is a file: the audit writes its ledgers in that folder. Remove it "
                                 "or choose another --out")
    stale = sorted(ledger_dir.glob("audit-*.sqlite")) if ledger_dir.exists() else []
    if stale:
        raise FileExistsError(f"{stale[0]} exists: an audit's ledgers would be added to. Remove {ledger_dir}/audit-* "
                              "or choose another --out")
    ds = load_department(settings.department, seed=settings.seed)
    task = ds.schema.task
    kind = model_kinds(settings.department)[0]
    base_cfg: TrainConfig = DEFAULT_TRAIN[(settings.department, kind)]
    rng = np.random.default_rng(settings.seed)
    pool = _pool(settings, ds, task, rng)
    n_all = len(pool.y)
    n_models = settings.shadows + settings.targets
    masks = rng.random((n_models, n_all)) < 0.5
    delta = default_delta(int(round(n_all / 2)))
    is_canary = np.arange(n_all) >= pool.n_records
    # each test at half the error rate when both records and canaries are audited (Bonferroni)
    n_tests = 1 + int(settings.canaries > 0)
    test_conf = 1.0 - (1.0 - settings.confidence) / n_tests

    setting_list: list[float | None] = ([None] if settings.control else []) + list(settings.epsilons)
    rows = []
    made: list[Path] = []  # this run's ledgers (removed if its result cannot be written)
    for si, eps in enumerate(setting_list):
        label = "no DP" if eps is None else f"eps={eps:g}"
        t0 = time.perf_counter()
        phi = np.empty((n_models, n_all))
        ledger = None
        if eps is not None:
            ledger_dir.mkdir(parents=True, exist_ok=True)
            ledger = PrivacyLedger(ledger_dir / ledger_name(eps), accountant=settings.accountant)
            made.append(ledger_dir / ledger_name(eps))
        target_info = []
        test_scores = []
        for j in range(n_models):
            if on_model:
                on_model(label, j, n_models)
            model_seed = settings.seed * 1_000_003 + si * 10_007 + j
            torch.manual_seed(model_seed)
            model = build_model(default_model_config(ds.schema, kind))
            cfg = copy.copy(base_cfg)
            cfg.seed = model_seed
            idx = np.flatnonzero(masks[j])
            data = torch.utils.data.TensorDataset(torch.from_numpy(pool.X[idx]), torch.from_numpy(pool.y[idx]))
            dp = None if eps is None else DPSettings(target_epsilon=eps, max_grad_norm=settings.max_grad_norm,
                                                     delta=delta, accountant=settings.accountant)
            result = fit(model, data, task, cfg, dp, device=torch.device("cpu"))
            phi[j] = membership_signal(predict(model, pool.X, device=torch.device("cpu")), pool.y, task)
            if j < settings.shadows:
                continue
            test_out = predict(model, pool.X_test, device=torch.device("cpu"))
            if task == "binary-classification":
                test_scores.append(float(((test_out > 0).astype(np.float32) == pool.y_test).mean()))
            else:
                n_t = len(pool.y_test)
                test_scores.append(float(((test_out.reshape(n_t, -1) - pool.y_test.reshape(n_t, -1)) ** 2).mean()))
            info = {"model": j, "n_train": int(len(idx))}
            if ledger is not None:
                site = f"target-{j - settings.shadows}"
                rid = ledger.begin(Release(noise_multiplier=float(result.noise_multiplier),
                                           sample_rate=float(result.sample_rate), steps=int(result.steps),
                                           delta=float(result.delta), run_id=f"fl-sim-audit-{label}", round=0,
                                           site=site, department=settings.department))
                ledger.commit(rid, steps=int(result.steps))
                info.update(site=site, ledger_epsilon=ledger.epsilon(site, delta), fit_epsilon=result.epsilon,
                            noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate,
                            steps=result.steps)
            target_info.append(info)

        S = settings.shadows
        ref_phi, ref_in = phi[:S], masks[:S]
        tgt_scores = lira_scores(ref_phi, ref_in, phi[S:])
        shadow_scores = lira_scores_leave_one_out(ref_phi, ref_in)
        audits = {}
        for part, cols in (("records", ~is_canary), ("canaries", is_canary)):
            if not cols.any():
                continue
            scores, members = tgt_scores[:, cols], masks[S:, cols]
            m = int(members.size)
            f_pos, f_neg = choose_guesses(shadow_scores[:, cols], ref_in[:, cols], delta, test_conf, m)
            k_pos, k_neg = int(round(f_pos * m)), int(round(f_neg * m))
            bound = one_run_audit(scores, members, delta, test_conf, max(k_pos, 1), k_neg)
            audits[part] = {**roc_summary(scores, members), **bound,
                            "signal_auc": roc_auc(members.ravel(), phi[S:, cols].ravel())}
        eps_lb = max(a["eps_lb"] for a in audits.values())
        row = {
            "setting": label,
            "epsilon": eps,
            "ledger_epsilon": None if eps is None else max(t["ledger_epsilon"] for t in target_info),
            "delta": delta,
            "accountant": settings.accountant if eps is not None else None,
            "noise_multiplier": None if eps is None else float(np.mean([t["noise_multiplier"] for t in target_info])),
            "eps_lb": eps_lb,
            "confidence": settings.confidence,
            "records": audits.get("records"),
            "canaries": audits.get("canaries"),
            "targets": target_info,
            "test_accuracy" if task == "binary-classification" else "test_mse": float(np.mean(test_scores)),
            "seconds": time.perf_counter() - t0,
        }
        row["verdict"] = _verdict(row)
        row["ok"] = not row["verdict"].startswith("BOUND ABOVE")
        rows.append(row)

    cfg = base_cfg
    meta = {
        "command": "fl-sim audit",
        "department": settings.department,
        "model": kind,
        "mechanism": (
            f"one node's local training of {kind} by clients.training.fit ({cfg.epochs} epochs, batch {cfg.batch_size}, "
            f"lr {cfg.lr:g}, Adam; fl-sim baselines' settings), non-private or DP-SGD (privacy.dp: Opacus, Poisson "
            f"sampling, clipping norm {settings.max_grad_norm:g}, noise calibrated to the target epsilon at delta "
            f"{delta:.3g} by the {settings.accountant} accountant) on a random half of the pool"),
        "pool": {"sites": pool.sites, "records": pool.n_records, "canaries": settings.canaries,
                 "expected_train_size": n_all / 2},
        "attack": {"name": "LiRA (online, global variance)", "signal": (
            "logit-scaled confidence of the label" if task == "binary-classification" else "minus log window MSE"),
                   "shadows": settings.shadows, "targets": settings.targets, "inclusion_probability": 0.5,
                   "guesses": "top k+ members / bottom k- non-members, k chosen on the shadows (leave one out)"},
        "bound": {"method": "Steinke, Nasr, Jagielski 2023 (one-run audit, Appendix D p-value with delta), targets pooled",
                  "confidence": settings.confidence, "tests": n_tests, "per_test_confidence": test_conf},
        "settings": asdict(settings),
        "seconds": time.perf_counter() - t_start,
    }
    meta["settings"]["epsilons"] = list(settings.epsilons)
    result = {"meta": meta, "rows": rows,
              "ok": all(r["ok"] for r in rows),
              "control_leaks": None if not settings.control else rows[0]["verdict"].startswith("clear")}
    import contextlib
    import json

    from server.artefacts import write_atomic

    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "audit.json", json.dumps(result, indent=2, default=float).encode())  # no .tmp left on failure
    except OSError as exc:  # nothing half-written: no ledger without its result either (it would block a rerun)
        for ledger_path in made:
            for suffix in ("", "-wal", "-shm", "-journal"):
                p = ledger_path.with_name(ledger_path.name + suffix)
                with contextlib.suppress(OSError):
                    p.unlink(missing_ok=True)
        raise AuditOutputError(out / "audit.json", exc.strerror or type(exc).__name__) from exc
    return result
