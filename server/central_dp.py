"""Central differential privacy of the published model (run config ``central-dp = true``).

Flower's :class:`~flwr.serverapp.strategy.DifferentialPrivacyClientSideFixedClipping` wraps
the run's FedAvg/FedProx: each node clips its own model update (its code, at a norm no larger
than its policy allows: :mod:`clients.clipping`), and the coordinator publishes the global model
plus the *sum* of the clipped updates that arrived divided by the ``W`` nodes it asked in the
round (the fixed-denominator estimator of McMahan et al. 2018's user-level DP-FedAvg; an update
that did not arrive counts as zero), plus Gaussian noise of std ``central-noise-multiplier x
central-clipping-norm / W`` (Flower's own noise function). One node's whole contribution to a
round, present or absent, moves that aggregate by at most ``C / W``, so the *published* model
sequence is (epsilon, delta)-DP with respect to any one node's participation at noise
multiplier ``z``, and neither the noise nor the divisor depends on who replied.

Until 2026-12-07 the aggregate was the *mean* of the ``k`` updates that arrived with noise
``z C / k``: one node joining moved it by up to ``2 C / k`` while ``z`` was accounted (an
independent privacy audit), and the noise's spread told ``k`` (a review of that fix). A
checkpoint of such a run is re-read at ``z / 2`` (:meth:`CentralAccountant.from_state`).

:class:`CentralAccountant` composes the rounds as a sampled Gaussian mechanism (noise
multiplier ``z``, node sampling rate ``q = fraction-train`` or the larger share of the connected
nodes FedAvg samples where its minimum forces more, one step per aggregated round)
with the ledger's accountants (:func:`privacy.accounting.epsilon`, Opacus RDP or PRV). Its
state is plain JSON (:meth:`CentralAccountant.state`) saved in the run checkpoint under
:data:`STATE_KEY` and restored on resume, so a resumed run's central epsilon continues.

What it does NOT do: protect a department from the coordinator. The coordinator adds the noise
itself, so it sees the noiseless sum (under SecAgg+ only the sum, never one node's update).
Each node's own guarantee remains its local DP-SGD, accounted in its own ledger; the central
epsilon is the coordinator's *claim*, which nodes record as such (mechanism "central", claimed).

Sampling: Flower samples a fixed number of nodes per round (without replacement); the
accountant uses the Poisson analysis at ``q = fraction-train``, the usual approximation of
DP-FedAvg. With ``fraction-train = 1`` (the default) no amplification is claimed (``q = 1``).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, Strategy

from contract.keys import CENTRAL_CLAIM_KEYS
from flower_compat.dp import KEY_CLIPPING_NORM, compute_stdv

from privacy.accounting import ACCOUNTANTS
from privacy.accounting import epsilon as composed_epsilon

log = logging.getLogger("cityfed.server")

#: Key of the accountant's state in ``GuardedStrategy.strategy_state()`` (and so in the checkpoint).
STATE_KEY = "central_dp"
#: Metric the wrapped FedAvg weighs replies by under central DP: 1 for every node (unweighted mean).
WEIGHT_KEY = "central-dp-weight"
#: Under central DP the coordinator excludes any update whose L2 norm exceeds the clipping norm times
#: this (float rounding of the node's clip stays far below it): a node that did not clip (older code, a
#: fault) cannot void the noise's calibration. Under SecAgg+ only the mean's norm can be checked.
NORM_SLACK = 1.001
#: Version of :meth:`CentralAccountant.state`. Version 2 (2026-12-07): the history's noise multipliers
#: are relative to one node's largest move of the published aggregate (``C / W``, fixed denominator).
#: A state without a version is of the mean over the updates that arrived, whose largest move was
#: ``2 C / k``: its multipliers are halved when read.
STATE_VERSION = 2
#: Strategies whose aggregation is FedAvg's mean (the noise is calibrated to it).
CENTRAL_STRATEGIES = ("fedavg", "fedprox")

__all__ = ["CENTRAL_STRATEGIES", "CentralAccountant", "CentralDPFixedClipping", "KEY_CLIPPING_NORM", "STATE_KEY",
           "STATE_VERSION", "WEIGHT_KEY", "check_settings", "unnoised_rounds"]


def check_settings(cfg: dict) -> None:
    """Cross-key checks of a validated run config for ``central-dp = true``.

    Raises
    ------
    ValueError
        Naming the key and the fix: a strategy whose aggregate is not FedAvg's mean (the noise
        would not match its sensitivity).
    """
    if not cfg.get("central-dp"):
        return
    if cfg["strategy"] not in CENTRAL_STRATEGIES:
        raise ValueError(f"run config 'strategy': {cfg['strategy']!r} cannot run with 'central-dp' = true (the noise "
                         f"is calibrated to FedAvg's mean of clipped updates); choose one of "
                         f"{', '.join(CENTRAL_STRATEGIES)} or set 'central-dp' = false")
    if cfg.get("secagg") and cfg["strategy"] != "fedavg":
        raise ValueError("run config 'strategy': 'central-dp' with 'secagg' needs 'fedavg' "
                         f"(got {cfg['strategy']!r})")


def _published(train: dict) -> bool:
    """Whether a round's ``train`` entry published an aggregate (a new global model)."""
    if "published" in train:  # recorded since 2026-12-07 (GuardedStrategy._record_central_dp)
        return bool(train["published"])
    # an earlier checkpoint: an aggregate that was neither rejected (SecAgg+'s norm check) nor stopped
    return train.get("aggregate") is not None and not train.get("rejected") and not train.get("stopped")


def unnoised_rounds(history: dict | None) -> list[int]:
    """The rounds of a run's history that published an aggregate without central DP's noise.

    A run resumed with ``central-dp = true`` claims a central epsilon for its published model. That
    claim holds only if every aggregate the coordinator ever published had the noise: a round of a
    launch with ``central-dp = false`` published its aggregate as it was, so the model has no
    central-DP guarantee at all (epsilon is infinite), and the run must not continue under central
    DP. A round that published nothing (a SecAgg+ aggregate rejected by the norm check, a round that
    stopped for too few updates) needs no noise. The history is the checkpoint's (carried over every
    launch); each round's ``train`` entry has ``central-dp`` when its aggregate was noised.

    Parameters
    ----------
    history : dict or None
        The checkpoint's ``history`` (``rounds``: one entry per round).

    Returns
    -------
    list of int
        The rounds, in order; empty when every published aggregate was noised.
    """
    out = []
    for entry in (history or {}).get("rounds") or []:
        train = entry.get("train") if isinstance(entry, dict) else None
        if isinstance(train, dict) and _published(train) and "central-dp" not in train:
            out.append(int(entry.get("round", 0)))
    return out


def unnoised_message(run: str, rounds: list[int]) -> str:
    """The refusal of a resume under central DP of a run whose ``rounds`` published without it (names no value)."""
    which = ", ".join(map(str, rounds[:5])) + (f" and {len(rounds) - 5} more" if len(rounds) > 5 else "")
    return (f"run {run}: its round(s) {which} published an aggregate without central DP (without the "
            "coordinator's noise), so no central epsilon covers this run's model, and it cannot continue with "
            "'central-dp' = true")


class CentralAccountant:
    """User-level accountant of the central-DP rounds of one run: a JSON-serialisable history.

    Parameters
    ----------
    delta : float
        The run's central delta (``central-delta``).
    accountant : {"rdp", "prv"}
        :func:`privacy.accounting.epsilon`'s accountant.
    history : list of [noise, q, steps], optional
        Rounds already composed (restored from a checkpoint).
    """

    def __init__(self, delta: float, accountant: str = "rdp", history: Iterable | None = None):
        if not 0.0 < float(delta) < 1.0:
            raise ValueError(f"central delta must be in (0, 1) (got {delta!r})")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"central accountant must be one of {', '.join(ACCOUNTANTS)} (got {accountant!r})")
        self.delta = float(delta)
        self.accountant = accountant
        self.history: list[list] = []
        for z, q, steps in history or []:
            self._add(float(z), float(q), int(steps))

    def _add(self, z: float, q: float, steps: int) -> None:
        if not (z > 0 and math.isfinite(z)) or not 0.0 < q <= 1.0 or steps < 0:
            raise ValueError(f"invalid central-DP accountant entry (noise {z!r}, q {q!r}, steps {steps!r})")
        if self.history and self.history[-1][0] == z and self.history[-1][1] == q:
            self.history[-1][2] += steps
        else:
            self.history.append([z, q, steps])

    @property
    def rounds(self) -> int:
        """Rounds composed so far."""
        return sum(int(h[2]) for h in self.history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Compose one noised aggregate (a round) at ``noise_multiplier`` and node sampling rate ``sample_rate``."""
        self._add(float(noise_multiplier), float(sample_rate), 1)

    def epsilon(self, extra: tuple[float, float] | None = None) -> float:
        """Epsilon at :attr:`delta` of the rounds so far (plus one ``(noise, q)`` round if ``extra``); 0 when none."""
        hist = [(float(z), float(q), int(s)) for z, q, s in self.history]
        if extra is not None:
            hist.append((float(extra[0]), float(extra[1]), 1))
        return float(composed_epsilon(hist, self.delta, self.accountant)) if hist else 0.0

    def state(self) -> dict:
        """Plain JSON state (what the checkpoint keeps under :data:`STATE_KEY`)."""
        return {"version": STATE_VERSION, "delta": self.delta, "accountant": self.accountant,
                "history": [list(h) for h in self.history], "rounds": self.rounds, "epsilon": self.epsilon()}

    @classmethod
    def from_state(cls, state: dict | None, *, delta: float, accountant: str = "rdp") -> "CentralAccountant":
        """Continue a saved history (``state`` from a checkpoint, or None) at this launch's ``delta`` and accountant.

        The history is what counts: a resume with another delta or accountant recomputes the
        epsilon of every round so far with them (never forgets a round). A state without a
        ``version`` (before :data:`STATE_VERSION` 2) accounted the mean over the updates that
        arrived at ``z`` where one node moved it by up to ``2 C / k``: its rounds are composed at
        ``z / 2``.
        """
        history = (state or {}).get("history") or []
        if not isinstance(history, list):
            raise ValueError(f"checkpoint {STATE_KEY!r}: 'history' must be a list of [noise, q, steps] (got {history!r})")
        if state and int(state.get("version", 1) or 1) < STATE_VERSION:
            history = [[float(z) / 2.0, q, steps] for z, q, steps in history]
        return cls(delta, accountant, history)


class CentralDPFixedClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper with cityfed's accountant and unweighted mean.

    Parameters
    ----------
    strategy : FedAvg
        The run's FedAvg or FedProx (its ``weighted_by_key`` is set to :data:`WEIGHT_KEY`:
        every node weighs 1, whatever its record count; their mean is then rescaled to the sum
        over the ``W`` nodes asked).
    noise_multiplier, clipping_norm : float
        ``z`` and ``C``: noise std ``z * C / W`` on the sum of the clipped updates over ``W``.
    delta : float
        Central delta of the accountant.
    sample_rate : float
        Node sampling rate per round (``fraction-train``).
    accountant : {"rdp", "prv"}
    state : dict, optional
        :meth:`central_state` of an earlier launch of the run (resume).

    Notes
    -----
    Flower's own accountant (``accountant=`` of the wrapper) needs no-amplification sampling and
    equal weights; cityfed passes none and keeps :class:`CentralAccountant` instead (Opacus
    RDP/PRV, sampling rate, JSON state in the checkpoint).
    """

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clipping_norm: float, delta: float,
                 sample_rate: float = 1.0, accountant: str = "rdp", state: dict | None = None):
        if not isinstance(strategy, FedAvg) or strategy.__class__.aggregate_train is not FedAvg.aggregate_train:
            raise ValueError("central DP needs a strategy aggregating with FedAvg.aggregate_train (fedavg, fedprox)")
        for name, value in (("noise multiplier", noise_multiplier), ("clipping norm", clipping_norm)):
            if not (math.isfinite(float(value)) and float(value) > 0):  # NaN passes `> 0` tests the other way round
                raise ValueError(f"central {name} must be finite and > 0 (got {value!r})")
        super().__init__(strategy, float(noise_multiplier), float(clipping_norm), 1)
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"central sample rate must be in (0, 1] (got {sample_rate!r})")
        strategy.weighted_by_key = WEIGHT_KEY
        self.sample_rate = float(sample_rate)
        self.central = CentralAccountant.from_state(state, delta=delta, accountant=accountant)
        self.last: dict | None = None
        self._rates: dict[int, float] = {}
        self._asked: dict[int, tuple[int, dict]] = {}  # round -> (W, the global weights sent)

    # the wrapped strategy's sampling settings, read and raised through the wrapper (GuardedStrategy,
    # SecAggStrategy raise min_train_nodes / min_available_nodes)
    def __getattr__(self, name: str):
        inner = self.__dict__.get("strategy")
        if inner is not None and name.startswith(("fraction_", "min_")):
            return getattr(inner, name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        inner = self.__dict__.get("strategy")
        if inner is not None and name.startswith(("fraction_", "min_")):
            setattr(inner, name, value)
        else:
            super().__setattr__(name, value)

    def central_state(self) -> dict:
        """The accountant's JSON state (saved in the checkpoint under :data:`STATE_KEY`)."""
        return self.central.state()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Flower's wrapper (adds the clipping norm) plus what nodes record as the coordinator's claim."""
        q = self.round_sample_rate(grid)
        self._rates[server_round] = q
        # the epsilon claimed is the one the published model will have once this round's noised aggregate is out
        claims = {"noise_multiplier": self.noise_multiplier, "delta": self.central.delta,
                  "accountant": self.central.accountant, "sample_rate": q,
                  "epsilon": self.central.epsilon((self.noise_multiplier, q))}
        for name, value in claims.items():  # the job-config keys the nodes' ledgers record as the claim
            config[CENTRAL_CLAIM_KEYS[name]] = value
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # the fixed denominator: the nodes asked, known before any of them answers
        self._asked[server_round] = (len(messages), _numpy(arrays))
        return messages

    def round_sample_rate(self, grid: Grid) -> float:
        """Node sampling rate of this round: ``fraction-train``, or more where FedAvg's minimum forces more.

        FedAvg samples ``max(int(n * fraction_train), min_train_nodes)`` of the ``n`` connected
        nodes; the accountant never uses less than that share.
        """
        if self.sample_rate >= 1.0:
            return 1.0
        n = len(list(grid.get_node_ids()))
        if n <= 0:
            return 1.0
        size = max(int(n * self.strategy.fraction_train), int(self.strategy.min_train_nodes))
        return float(min(1.0, max(self.sample_rate, size / n)))

    def aggregate_train(self, server_round: int, replies: Iterable[Message], *,
                        contributors: int | None = None) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unweighted mean of the (node-clipped) updates plus Flower's Gaussian noise; account the round.

        Parameters
        ----------
        replies : iterable of Message
            Accepted replies (new weights = global + clipped update).
        contributors : int, optional
            Nodes behind ``replies`` when that is not one reply each (SecAgg+ hands over one
            reply: the mean of ``contributors`` updates).
        """
        replies = list(replies)
        k = int(contributors) if contributors is not None else len(replies)
        if k < 1 or not replies:
            self._asked.pop(server_round, None)
            return None, None
        for r in replies:
            r.content["metrics"][WEIGHT_KEY] = 1.0
        asked, sent = self._asked.pop(server_round, (k, None))  # a round not configured here: all were asked
        asked = max(int(asked), k)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)  # the unweighted mean of k
        if not arrays:
            return arrays, metrics
        if sent is not None and k < asked:  # the sum over the W nodes asked: the mean's update times k / W
            arrays = _shrunk(arrays, sent, k / asked)
        self.num_sampled_clients = asked  # Flower's noise std: z C / W
        arrays = self._add_noise_to_aggregated_arrays(arrays)
        q = self._rates.pop(server_round, 1.0)  # a round not configured here: no amplification claimed
        self.central.step(self.noise_multiplier, q)
        self.last = {"epsilon": self.central.epsilon(), "delta": self.central.delta,
                     "accountant": self.central.accountant, "noise-multiplier": self.noise_multiplier,
                     "clipping-norm": self.clipping_norm, "sample-rate": q, "contributors": k, "nodes-asked": asked,
                     "noise-std": compute_stdv(self.noise_multiplier, self.clipping_norm, asked),
                     "rounds-accounted": self.central.rounds}
        log.info("central DP: round %d: noise std %.4g on the sum of %d update(s) over the %d node(s) asked; central "
                 "epsilon %.4g at delta %g after %d round(s)", server_round, self.last["noise-std"], k, asked,
                 self.last["epsilon"], self.central.delta, self.central.rounds)
        return arrays, metrics
        q = self._rates.pop(server_round, 1.0)  # a round not configured here: no amplification claimed
        self.central.step(self.noise_multiplier, q)
        self.last = {"epsilon": self.central.epsilon(), "delta": self.central.delta,
                     "accountant": self.central.accountant, "noise-multiplier": self.noise_multiplier,
                     "clipping-norm": self.clipping_norm, "sample-rate": q, "contributors": k,
                     "noise-std": compute_stdv(self.noise_multiplier, self.clipping_norm, k),
                     "rounds-accounted": self.central.rounds}
        log.info("central DP: round %d: noise std %.4g on the mean of %d update(s); central epsilon %.4g at delta %g "
                 "after %d round(s)", server_round, self.last["noise-std"], k, self.last["epsilon"], self.central.delta,
                 self.central.rounds)
        return arrays, metrics


def _numpy(arrays: ArrayRecord) -> dict:
    """``arrays`` as ``{name: numpy array}`` (copies)."""
    return {k: np.array(v.numpy(), copy=True) for k, v in arrays.items()}


def _shrunk(mean: ArrayRecord, sent: dict, factor: float) -> ArrayRecord:
    """``sent + factor * (mean - sent)``: the mean update of the ``k`` that arrived as their sum over the ``W`` asked."""
    from flwr.app import Array

    out = {}
    for name, arr in mean.items():
        m = arr.numpy()
        base = sent[name].astype(np.float64)
        out[name] = Array(np.asarray(base + factor * (m.astype(np.float64) - base), dtype=m.dtype))
    return ArrayRecord(out)
