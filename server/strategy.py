"""Strategy selection, reply validation and per-round checkpoints around Flower's strategies.

:class:`GuardedStrategy` wraps any ``flwr.serverapp.strategy`` strategy: it validates each
train reply (finite, same names/shapes/dtypes as the global model, update norm bounded)
and drops bad ones with a logged reason, records refusals and per-node metrics, and
writes a checkpoint after every aggregated round so a restarted coordinator resumes at
the next round.
"""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from flower_compat.strategy_state import from_legacy_names, owned_state_base
from contract.keys import STRATEGIES  # re-exported: the strategies a run config may name
from contract.tasks import ARRAYS, CONFIG, EVAL_METRICS, FAILED, NUM_EXAMPLES, TRAIN_METRICS
from contract.text import peer_text
from server.artefacts import read_checkpoint, write_checkpoint
from server.grid import DeadlineGrid, deadline_grid
from server.validation import unexpected_metrics, validate_update

log = logging.getLogger("cityfed.server")



def aggregate_metrics(records: list, weighting_key: str) -> MetricRecord:
    """Aggregate node metrics: example-weighted mean, but the *largest* epsilon (worst node).

    Each key is averaged over the nodes that reported it (a node without test data reports
    only ``num-examples = 0`` and weighs nothing); labels such as ``partition-id`` and
    ``energy-method`` are not averaged; ``energy-j`` is summed; ``epsilon`` becomes ``epsilon-max``.
    """
    sums: dict[str, float] = {}
    wsums: dict[str, float] = {}
    out: dict[str, float] = {}
    total = 0.0
    for rec in records:
        m = rec["metrics"]
        w = float(m[weighting_key])
        total += w
        for k, v in m.items():
            if k in ("partition-id", "energy-method", weighting_key):
                continue
            if k in ("num-examples", "energy-j"):  # totals (weighted by another key, e.g. central DP's 1 per node, too)
                out[k] = out.get(k, 0.0) + float(v)
                continue
            if k == "epsilon":
                out["epsilon-max"] = max(out.get("epsilon-max", 0.0), float(v))
                continue
            if w > 0:
                sums[k] = sums.get(k, 0.0) + float(v) * w
                wsums[k] = wsums.get(k, 0.0) + w
    out.update({k: sums[k] / wsums[k] for k in sums})
    out[weighting_key] = total
    return MetricRecord(out)


#: Key of the server optimiser's state in ``GuardedStrategy.strategy_state()`` (and so in the checkpoint).
OPTIMISER_KEY = "optimiser"


class ServerOptimiserState:
    """Mixin: a server optimiser whose state (``self.optimiser_state``, cityfed's names) a checkpoint carries.

    The Flower strategy it is mixed into reads and writes that state through
    :func:`flower_compat.strategy_state.owned_state_base`; cityfed only uses
    :meth:`state_dict` and :meth:`load_state_dict`.
    """

    STATE_NAMES: tuple[str, ...]  # set by owned_state_base: the keys of optimiser_state

    def state_dict(self) -> dict:
        """The optimiser's state by cityfed name (``model``, ``first-moment``, ``second-moment``, ``momentum``).

        Entries not yet set (before the first aggregated round) are left out.
        """
        state = self.__dict__.get("optimiser_state", {})
        return {k: state[k] for k in self.STATE_NAMES if state.get(k) is not None}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (e.g. a checkpoint's).

        Raises
        ------
        ValueError
            ``state`` names an entry this optimiser does not keep (the fix: resume with the
            strategy that wrote the checkpoint).
        """
        unknown = sorted(set(state) - set(self.STATE_NAMES))
        if unknown:
            raise ValueError(f"{type(self).__name__}: saved optimiser state has {unknown}, which it does not keep "
                             f"(it keeps {list(self.STATE_NAMES)}). Fix: resume with the strategy that wrote the "
                             "checkpoint, or start a new run")
        self.__dict__.setdefault("optimiser_state", {}).update(state)


class CityFedAdam(ServerOptimiserState, owned_state_base(FedAdam)):
    """Flower's FedAdam; its moment estimates and model are checkpointed with :meth:`state_dict`."""


class CityFedYogi(ServerOptimiserState, owned_state_base(FedYogi)):
    """Flower's FedYogi; its moment estimates and model are checkpointed with :meth:`state_dict`."""


class CityFedAvgM(ServerOptimiserState, owned_state_base(FedAvgM)):
    """Flower's FedAvgM; its server momentum and model are checkpointed with :meth:`state_dict`."""


def optimiser_state(strategy_state: dict) -> dict:
    """The server optimiser's part of a checkpoint's ``strategy_state`` (also of checkpoints from earlier versions)."""
    if OPTIMISER_KEY in strategy_state:
        return dict(strategy_state[OPTIMISER_KEY])
    from server.central_dp import STATE_KEY

    return from_legacy_names({k: v for k, v in strategy_state.items() if k != STATE_KEY})


def make_strategy(name: str, *, fraction_train: float = 1.0, fraction_evaluate: float = 1.0, min_nodes: int = 1,
                  **kw) -> Strategy:
    """Build a Flower strategy by name.

    Parameters
    ----------
    name : {"fedavg", "fedprox", "fedadam", "fedyogi", "trimmed-mean", "krum", "fedavgm"}
    fraction_train, fraction_evaluate : float
        Share of nodes sampled for training / evaluation each round.
    min_nodes : int
        Minimum nodes to train/evaluate/be available.
    **kw
        Extra keyword arguments for the strategy (e.g. ``proximal_mu`` for FedProx, ``eta``
        for FedAdam, ``server_momentum`` for FedAvgM, ``beta`` for trimmed mean, ``num_malicious_nodes`` for Krum).
    """
    common = dict(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate, min_train_nodes=min_nodes,
                  min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes,
                  train_metrics_aggr_fn=aggregate_metrics, evaluate_metrics_aggr_fn=aggregate_metrics,
                  arrayrecord_key=ARRAYS, configrecord_key=CONFIG, weighted_by_key=NUM_EXAMPLES)  # the job contract's names
    classes = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": CityFedAdam, "fedyogi": CityFedYogi,
               "trimmed-mean": FedTrimmedAvg, "krum": Krum, "fedavgm": CityFedAvgM}
    if name not in classes:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "fedprox":
        kw.setdefault("proximal_mu", 0.1)
    if name == "fedavgm":  # FedAvg with server momentum (Hsu et al. 2019)
        kw.setdefault("server_momentum", 0.9)
    if name in ("fedadam", "fedyogi"):
        kw.setdefault("eta", 1e-2)
        kw.setdefault("eta_l", 1e-2)
    return classes[name](**common, **kw)


class TooFewUpdates(RuntimeError):
    """Fewer acceptable updates than the run's ``min-accepted`` in a round: the run ends cleanly."""


class GuardedStrategy(Strategy):
    """Validate replies, log refusals, checkpoint each round; delegate the rest to ``inner``.

    Parameters
    ----------
    inner : Strategy
        A Flower strategy (aggregation is Flower's).
    max_update_norm : float
        Replies whose update norm exceeds this are excluded.
    checkpoint : Path, optional
        File written after every aggregated round.
    round_offset : int
        Rounds already completed (when resuming): round numbers sent to nodes continue.
    history : dict, optional
        History restored from a checkpoint (rounds, excluded replies, refusals).
    run_id : str
        Identity of the run (kept across resumes; nodes' ledgers record it).
    on_round : callable, optional
        ``on_round(entry)`` after each round's evaluation (progress display).
    min_accepted : int
        A round with fewer acceptable updates ends the run cleanly (:class:`TooFewUpdates`)
        after logging why and checkpointing. The inner strategy's ``min_train_nodes`` and
        ``min_available_nodes`` are raised to it: a round waits for that many connected nodes.
    round_timeout : float or str, optional
        The run config's ``round-timeout`` (seconds, or ``"auto"``: deadlines from measured
        reply times, :class:`server.grid.RoundTimeout`); None: the ``timeout`` given to
        :meth:`start`. Every exchange gets its deadline (:class:`server.grid.DeadlineGrid`);
        nodes that miss it are recorded in ``history["dropped"]`` with the reason, and a round
        waits at most its deadline for enough connected nodes (then the run ends cleanly).
    """

    def __init__(self, inner: Strategy, *, max_update_norm: float, checkpoint: Path | None = None, round_offset: int = 0,
                 history: dict | None = None, run_id: str = "", on_round=None, min_accepted: int = 1,
                 round_timeout: float | str | None = None):
        self.min_accepted = max(1, int(min_accepted))
        self.run_id = run_id
        self.on_round = on_round
        self.inner = inner
        self.max_update_norm = max_update_norm
        self.checkpoint = checkpoint
        self.round_offset = round_offset
        self._global: dict[str, np.ndarray] = {}
        self.history: dict = history or {"rounds": [], "excluded": [], "refused": []}
        self._started: dict[str, tuple[float, float]] = {}
        # refusals/exclusions already in the (restored) history were audited by the earlier process
        self._audited = {k: len(self.history.get(k, [])) for k in ("refused", "excluded")}
        self._audit_log = None
        self.round_timeout = round_timeout
        self.history.setdefault("dropped", [])
        self._grid: DeadlineGrid | None = None
        self._eval_skipped: str | None = None
        self._carried_central: dict | None = None  # see load_state_dict
        self.raise_node_minimums(self.min_accepted)

    def raise_node_minimums(self, least: int) -> None:
        """Raise the inner strategy's minimum train/available nodes to ``least`` (logged).

        A round that trained fewer nodes than ``min_accepted`` could only end the run: it
        waits (within its deadline) for that many connected nodes, and samples at least as many.
        """
        for attr in ("min_train_nodes", "min_available_nodes"):
            now = getattr(self.inner, attr, None)
            if now is not None and int(now) < least:
                log.info("%s raised from %d to %d (min-accepted)", attr.replace("_", "-"), int(now), least)
                setattr(self.inner, attr, least)

    def _start(self, phase: str) -> None:
        self._started[phase] = (time.monotonic(), time.time())

    def _timing(self, phase: str) -> dict:
        """``seconds`` since ``configure_<phase>`` of this round (messages out, replies back) and
        ``started`` (its Unix time, for lining up with node logs)."""
        t = self._started.pop(phase, None)
        if t is None:
            return {"seconds": None, "started": None}
        return {"seconds": round(time.monotonic() - t[0], 3), "started": round(t[1], 3)}

    # -- delegation ---------------------------------------------------------------------
    def summary(self) -> None:
        self.inner.summary()

    #: The run's total rounds (set by run_federation): the log numbers rounds within the whole run.
    num_rounds: int | None = None

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600, **kwargs):
        """Flower's round loop over ``grid`` wrapped in a :class:`~server.grid.DeadlineGrid`.

        The deadline of every exchange comes from ``round_timeout`` (else ``timeout``); the
        measured reply times are kept in ``history["reply-times"]`` (saved with checkpoints).
        """
        if not self._global:  # a checkpoint written before round 1 (the round-0 score) holds the initial model
            self._global = {k: v.numpy() for k, v in initial_arrays.items()}
        rule = self.round_timeout if self.round_timeout is not None else timeout
        self._grid = deadline_grid(grid, rule, self.history.setdefault("reply-times", {}))
        log.info("cityfed: deadlines: %s", self._grid.deadlines.rule.describe())
        return super().start(grid=self._grid, initial_arrays=initial_arrays, num_rounds=num_rounds, timeout=timeout,
                             **kwargs)

    def _connected(self, grid: Grid, rnd: int, phase: str) -> tuple[Grid, str]:
        """``(grid, "")`` with enough connected nodes for ``phase`` (waiting at most its deadline), else ``(grid, why)``.

        Flower's strategies wait for ``min_available_nodes`` without a time limit; with a
        :class:`~server.grid.DeadlineGrid` the wait is bounded and the strategy samples from
        the nodes found (a pinned list, so that it never waits itself). Evaluation does not
        wait: with too few nodes connected it is skipped.
        """
        fraction = getattr(self.inner, f"fraction_{phase}", 1.0)
        if not isinstance(grid, DeadlineGrid) or not fraction:
            return grid, ""
        needed = max(int(getattr(self.inner, "min_available_nodes", 1) or 1),
                     int(getattr(self.inner, f"min_{phase}_nodes", 1) or 1))
        ids, why = grid.await_nodes(needed, rnd, wait=phase == "train")  # evaluation is skipped at once
        return (grid.pinned(ids), "") if ids is not None else (grid, why)

    def _dropouts(self, kind: str, rnd: int) -> list[dict]:
        """Nodes that gave no reply in the last ``kind`` exchange of round ``rnd`` (``node``, ``reason``)."""
        grid = self._grid
        ex = grid.exchanges[-1] if grid is not None and grid.exchanges else None
        if ex is None or ex.kind != kind or ex.round != rnd:
            return []
        return [{"node": n, "reason": why} for n, why in ex.missing.items()]

    def _deadline(self, kind: str, rnd: int) -> dict:
        ex = self._grid.exchanges[-1] if self._grid is not None and self._grid.exchanges else None
        if ex is None or ex.kind != kind or ex.round != rnd:
            return {}
        return {"deadline": {"seconds": ex.deadline, "basis": ex.basis}}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = {k: v.numpy() for k, v in arrays.items()}
        self._start("train")
        if self.round_offset:  # Flower numbers this launch's rounds from 1; the run's numbering continues
            log.info("cityfed: round %d/%s of run %s (resumed after round %d)", server_round + self.round_offset,
                     self.num_rounds or "?", self.run_id, self.round_offset)
        rnd = server_round + self.round_offset
        sampling, why = self._connected(grid, rnd, "train")
        if why:
            reason = f"round {rnd}: {why}; global model unchanged, run ended"
            log.warning(reason)
            self._round(rnd)["train"] = {"nodes": {}, "accepted": 0, "stopped": reason, **self._timing("train")}
            self._save()
            raise TooFewUpdates(reason)
        return self.inner.configure_train(rnd, arrays, config, sampling)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._start("evaluate")
        rnd = server_round + self.round_offset
        sampling, why = self._connected(grid, rnd, "evaluate")
        self._eval_skipped = f"evaluation skipped: {why}" if why else None
        if why:  # the round's model is already saved: skip its evaluation, the next round decides
            log.warning("round %d: %s", rnd, self._eval_skipped)
            return []
        return self.inner.configure_evaluate(rnd, arrays, config, sampling)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        rnd = server_round + self.round_offset
        declined = {int(m.metadata.src_node_id): peer_text(m.error.reason) for m in replies if m.has_error()}
        if declined:
            log.info("round %d: %d node(s) declined evaluation (e.g. %s)", rnd, len(declined), next(iter(declined.values())))
        kept, excluded = [], {}
        for m in (m for m in replies if not m.has_error()):
            why = unexpected_metrics(m.content["metrics"], EVAL_METRICS) if "metrics" in m.content else "reply lacks 'metrics'"
            if why:
                excluded[int(m.metadata.src_node_id)] = why
                log.warning("round %d: excluded the evaluation of node %d: %s", rnd, int(m.metadata.src_node_id), why)
            else:
                kept.append(m)
        per_node = {int(m.metadata.src_node_id): dict(m.content["metrics"]) for m in kept}
        agg = self.inner.aggregate_evaluate(rnd, kept)
        entry = self._round(rnd)
        entry["evaluate"] = {"aggregate": dict(agg) if agg else None, "nodes": per_node, "declined": declined,
                             **self._timing("evaluate"), **self._deadline("evaluate", rnd)}
        if excluded:
            entry["evaluate"]["excluded"] = excluded
        dropped = self._dropouts("evaluate", rnd)
        for d in dropped:
            log.warning("round %d: node %d gave no evaluation: %s", rnd, d["node"], d["reason"])
        if dropped:
            entry["evaluate"]["dropped"] = dropped
        if self._eval_skipped:
            entry["evaluate"]["skipped"], self._eval_skipped = self._eval_skipped, None
        self._save()
        if self.on_round:
            self.on_round(entry)
        return agg

    # -- the guard ----------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        good: list[Message] = []
        nodes = {}
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                reason = peer_text(msg.error.reason)  # the node's own words: escaped, cut (contract.text)
                self.history["refused"].append({"round": rnd, "node": node, "code": msg.error.code, "reason": reason})
                log.warning("round %d: node %d sent no update: %s", rnd, node, reason)
                continue
            reason = None
            if "arrays" not in msg.content or "metrics" not in msg.content:
                reason = "reply lacks 'arrays' or 'metrics'"
            else:
                reason = unexpected_metrics(msg.content["metrics"], TRAIN_METRICS) or \
                    validate_update(msg.content["arrays"], self._global, self.max_update_norm)
            if reason:
                self.history["excluded"].append({"round": rnd, "node": node, "reason": reason})
                log.warning("round %d: excluded node %d: %s", rnd, node, reason)
                continue
            nodes[node] = dict(msg.content["metrics"])
            good.append(msg)
        dropped = self._dropouts("train", rnd)
        for d in dropped:
            self.history["dropped"].append({"round": rnd, "stage": "train", **d})
            log.warning("round %d: node %d sent no update: %s", rnd, d["node"], d["reason"])
        entry = self._round(rnd)
        entry["train"] = {"nodes": nodes, "accepted": len(good), **self._timing("train"), **self._deadline("train", rnd)}
        if dropped:
            entry["train"]["dropped"] = dropped
        if len(good) < self.min_accepted:
            silent = "".join(f"; node {d['node']} ({d['reason']})" for d in dropped)
            failed = sum(1 for r in self.history["refused"] if r.get("code") == FAILED)
            reason = (f"round {rnd}: {len(good)} acceptable update(s), fewer than min-accepted={self.min_accepted} "
                      f"({len(self.history['refused']) - failed} refusal(s), {failed} node failure(s), "
                      f"{len(self.history['excluded'])} exclusion(s) so far{silent}); global model unchanged, run ended")
            log.warning(reason)
            entry["train"]["stopped"] = reason
            self._save()
            raise TooFewUpdates(reason)
        arrays, metrics = self.inner.aggregate_train(rnd, good)
        arrays = self._in_model_dtypes(arrays)
        entry["train"]["aggregate"] = dict(metrics) if metrics else None
        self._record_central_dp(entry, arrays)
        self._pending_arrays = arrays
        self._save(arrays)
        return arrays, metrics

    def _in_model_dtypes(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The aggregate in the global model's dtypes (FedAdam/FedYogi's optimiser returns float64).

        A float64 global model made every float32 node reply fail validation from the next
        round on, so FedAdam and FedYogi runs ended after one round. The server optimiser's own
        state (moments, ``current_arrays``) keeps its precision; only the model sent on is cast.
        """
        if arrays is None or not self._global:
            return arrays
        from flwr.app import Array

        out, changed = {}, False
        for k, v in arrays.items():
            ref = self._global.get(k)
            a = v.numpy()
            if ref is not None and a.dtype != ref.dtype:
                a, changed = a.astype(ref.dtype), True
            out[k] = Array(np.ascontiguousarray(a))
        return ArrayRecord(out) if changed else arrays

    # -- checkpoints --------------------------------------------------------------------
    def _round(self, rnd: int) -> dict:
        for e in self.history["rounds"]:
            if e["round"] == rnd:
                return e
        e = {"round": rnd}
        self.history["rounds"].append(e)
        return e

    def record_central(self, server_round: int, metrics: dict, per_site: dict | None = None) -> None:
        """Store the coordinator-side evaluation of round ``server_round`` (0 = initial model).

        ``per_site`` maps each site of the coordinator's data to its exact metrics.
        """
        if server_round:
            entry = self._round(server_round + self.round_offset)
        elif self.round_offset and self.history.get("initial"):
            # a resumed launch's "round 0" scores the checkpoint's model: the run's initial score stays
            entry = self.history.setdefault("resumed-from", {})
        else:
            entry = self.history.setdefault("initial", {})
        entry["central"] = dict(metrics)
        if per_site is not None:
            entry["central-sites"] = {k: dict(v) for k, v in per_site.items()}
        self._save()
        if self.on_round and server_round:  # progress shows the central score (Flower scores after evaluating)
            self.on_round(entry)

    def strategy_state(self) -> dict:
        """What the checkpoint keeps of the strategy: the server optimiser's :meth:`~ServerOptimiserState.state_dict`
        (FedAdam/FedYogi moments, FedAvgM momentum) under :data:`OPTIMISER_KEY` and, under central DP, the
        accountant's JSON state under ``"central_dp"`` (:data:`server.central_dp.STATE_KEY`)."""
        out = {}
        if isinstance(self.inner, ServerOptimiserState):
            out[OPTIMISER_KEY] = self.inner.state_dict()
        from server.central_dp import STATE_KEY

        if hasattr(self.inner, "central_state"):
            out[STATE_KEY] = self.inner.central_state()
        elif self._carried_central is not None:  # a launch without central DP keeps the earlier launches' accountant
            out[STATE_KEY] = self._carried_central
        return out

    state_dict = strategy_state

    def load_state_dict(self, state: dict) -> None:
        """Continue the server optimiser from a checkpoint's ``strategy_state`` (see :meth:`strategy_state`).

        The central-DP accountant is restored when the wrapper is built (its ``state``
        argument); a saved optimiser state that the run's strategy does not keep (the run
        resumed with another strategy) is logged and not used.
        """
        from server.central_dp import STATE_KEY

        if not hasattr(self.inner, "central_state") and state.get(STATE_KEY):
            # this launch runs without central DP: the accountant of the rounds that had it stays in the checkpoint
            # (a resume with central DP continues it, where no round of this launch published without the noise)
            self._carried_central = state[STATE_KEY]
        saved = optimiser_state(state)
        if not saved:
            return
        if isinstance(self.inner, ServerOptimiserState):
            self.inner.load_state_dict(saved)
        else:
            log.warning("resume: the checkpoint holds server-optimiser state (%s) that %s does not keep; not used",
                        ", ".join(sorted(saved)), type(self.inner).__name__)

    def _record_central_dp(self, entry: dict, arrays) -> None:
        """Whether the round published an aggregate (``entry["train"]["published"]``) and, under central DP, its
        central epsilon and delta (and noise) in ``entry["train"]["central-dp"]``.

        A published round without ``central-dp`` bars any later resume with central DP
        (:func:`server.central_dp.unnoised_rounds`).
        """
        last = getattr(self.inner, "last", None) if hasattr(self.inner, "central_state") else None
        entry["train"]["published"] = arrays is not None
        if arrays is not None and last is not None:
            entry["train"]["central-dp"] = dict(last)

    def _audit_new(self) -> None:
        """Append refusals/exclusions recorded since the last call to the coordinator's audit log.

        Only where ``$CITYFED_AUDIT_LOG`` is set (``fl-server start`` sets it for the ServerApp);
        simulations write nothing. A failed write is logged, never fatal to the run.
        """
        from privacy.audit import ENV_LOG, AuditError, audit_log_from_env

        for kind in ("refused", "excluded"):
            new, self._audited[kind] = self.history[kind][self._audited[kind]:], len(self.history[kind])
            if not new or not os.environ.get(ENV_LOG):
                continue
            try:
                self._audit_log = self._audit_log or audit_log_from_env()
                for e in new:
                    self._audit_log.append(kind, **{"run-id": self.run_id, **e})
            except AuditError as exc:
                log.error("audit log: %d %s entr%s NOT recorded: %s", len(new), kind, "y" if len(new) == 1 else "ies", exc)

    def _save(self, arrays: ArrayRecord | None = None) -> None:
        self._audit_new()
        if self.checkpoint is None:
            return
        prev = load_checkpoint(self.checkpoint) if self.checkpoint.exists() else None
        if arrays is None:
            arrays_np = prev["arrays"] if prev else {k: v for k, v in self._global.items()}
            done = prev["round"] if prev else self.round_offset
        else:
            arrays_np = {k: v.numpy() for k, v in arrays.items()}
            done = max(e["round"] for e in self.history["rounds"])
        blob = {"run_id": self.run_id, "round": done, "arrays": arrays_np, "strategy_state": self.strategy_state(), "history": self.history}
        write_checkpoint(self.checkpoint, blob)  # safetensors + JSON, temp file + fsync + rename (server/artefacts.py)


def load_checkpoint(path: Path) -> dict:
    """Load a coordinator checkpoint: ``round`` done, ``arrays``, ``strategy_state``, ``history``.

    Reads ``checkpoint.safetensors`` (:func:`server.artefacts.read_checkpoint`); a pickle
    ``checkpoint.pkl`` of an earlier version raises
    :class:`~server.artefacts.LegacyCheckpointError` and is never unpickled.
    """
    return read_checkpoint(path)
