"""Secure aggregation (Flower's SecAgg+) for the train step of a round.

With run config ``secagg = true`` the coordinator never sees a node's individual update:
each round's train step runs Flower's own :class:`~flwr.server.workflow.SecAggPlusWorkflow`
(four message stages: setup, share keys, collect masked vectors, unmask) and obtains only
the example-weighted *mean* of the nodes' updates. Everything else of a run is unchanged:
:func:`server.app.run_federation`'s loop, evaluation, checkpoints, resume and history, and,
on the nodes, the same policy check, ledger and DP-SGD (:mod:`clients.secagg`).

Flower 1.42 runs SecAgg+ only through its legacy path (a ``LegacyContext`` with a legacy
strategy, see DESIGN.md §3), so :func:`secagg_train_round` builds that context for a single
round around the nodes the run's strategy sampled. :class:`SecAggStrategy` plugs it into
the Message-API loop: its ``configure_train`` samples nodes as usual but sends no plain
train message, and its ``aggregate_train`` runs the protocol, checks what can still be
checked, and hands the mean update to the run's strategy (FedAvg applies it; FedAdam and
FedYogi use it as their pseudo-gradient).

What is still checked when individual updates are hidden:

* the aggregate is finite and its L2 norm is at most ``max-update-norm``; otherwise the
  round is rejected (global model unchanged, logged in ``history["excluded"]`` with
  node ``"secure-aggregate"``);
* each node clips its own update to ``max-update-norm`` and to the quantisation range
  before masking (:mod:`clients.secagg`);
* at least :data:`MIN_SECAGG_NODES` nodes are sampled and must contribute, so that no node
  can recover another one's update as (sum - its own);
* nodes' whitelisted metrics still arrive in plaintext (self-reported, recorded only).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, SimpleClientManager
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flower_compat.secagg import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, GridClientProxy, Stage, WorkflowKey
from flower_compat.secagg import recorddict_compat as compat

from contract.keys import MAX_UPDATE_NORM, PARAM_NAMES_KEY, SECAGG_MOD_RANGE, SERVER_ROUND
from server.grid import DeadlineGrid, Deadlines, RoundTimeout
from server.strategy import GuardedStrategy, TooFewUpdates, aggregate_metrics

log = logging.getLogger("cityfed.server")

#: Strategies whose aggregation only needs the (weighted) mean of the updates.
SECAGG_STRATEGIES = ("fedavg", "fedadam", "fedyogi")
#: Fewest nodes sampled for, and contributing to, a SecAgg+ round.
MIN_SECAGG_NODES = 3
#: SecAgg+ ``max_weight`` (Flower's default): a node's update is scaled by num-examples / this
#: before quantisation to [-clipping-range, clipping-range].
MAX_WEIGHT = 1000.0


def check_settings(cfg: dict) -> None:
    """Cross-key checks of a validated run config for ``secagg = true``.

    Parameters
    ----------
    cfg : dict
        Run config with defaults filled in (hyphenated keys).

    Raises
    ------
    ValueError
        Naming the key: a strategy that needs individual updates, an even
        ``secagg-num-shares`` (crashes SecAgg+ clients in Flower 1.42), or a
        ``secagg-threshold`` not below ``secagg-num-shares``.
    """
    if not cfg.get("secagg"):
        return
    if cfg["strategy"] not in SECAGG_STRATEGIES:
        raise ValueError(f"run config 'strategy': {cfg['strategy']!r} needs individual updates and cannot run with "
                         f"'secagg' = true; choose one of {', '.join(SECAGG_STRATEGIES)} or set 'secagg' = false")
    shares, threshold = int(cfg["secagg-num-shares"]), int(cfg["secagg-threshold"])
    if shares % 2 == 0:
        raise ValueError(f"run config 'secagg-num-shares': must be odd (got {shares}); an even number of shares "
                         "crashes SecAgg+ clients (IndexError in Flower's _share_keys)")
    if not 2 <= threshold < shares:
        raise ValueError(f"run config 'secagg-threshold': must be at least 2 and below 'secagg-num-shares' = {shares} "
                         f"(got {threshold})")


@dataclass
class SecAggRound:
    """Outcome of one SecAgg+ train step.

    Attributes
    ----------
    mean_update : dict or None
        Example-weighted mean of the contributing nodes' updates (name -> float64 array);
        None when the protocol stopped before unmasking (see ``halted``).
    nodes : dict
        Node id -> its plaintext, self-reported train metrics (contributors only).
    refused : list of dict
        Error replies from nodes (``node``, ``stage``, ``code``, ``reason``) in any stage:
        refusals (policy, budget) and protocol aborts.
    dropped : list of dict
        Nodes that stopped answering (``node``, ``stage``, ``reason``): no reply within the
        stage's deadline, or reported unavailable by the SuperLink. A node that drops only in
        the unmask stage still contributed (its mask is recovered from its neighbours' shares).
    halted : str or None
        Why the protocol stopped before a mean was obtained (readable, names the nodes).
    stages : dict
        Stage -> ``seconds`` it took, its ``deadline`` and the deadline's ``basis``.
    """

    mean_update: dict[str, np.ndarray] | None
    nodes: dict[int, dict] = field(default_factory=dict)
    refused: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    halted: str | None = None
    stages: dict[str, dict] = field(default_factory=dict)


class CityfedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's :class:`SecAggPlusWorkflow` that tolerates dropouts in every stage, and stops early.

    Flower 1.42's workflow keeps every *sampled* node in the set whose secrets the unmask
    stage reconstructs. A node that left in the setup or share-keys stage never distributed
    key shares, so the nodes that remain are asked for shares they do not hold (they fail
    with ``KeyError``) and the coordinator finds no shares for it ("Not enough shares to
    recover secret"): one dropout before training halted the round although the threshold
    allows it. Such a node also left no mask in anybody's vector (a node masks only with the
    neighbours whose key shares it received). Here, after the setup and share-keys stages,
    the nodes that did not answer are removed from the protocol (the sampled set and every
    neighbourhood); the unmask stage then reconstructs exactly the nodes that shared keys:
    the contributors' private masks and, for nodes that left afterwards, their pairwise masks.

    The protocol also stops as soon as fewer than ``min_live`` nodes remain (the run's
    ``min-accepted``, at least :data:`MIN_SECAGG_NODES`): before training when it happens in
    setup or share-keys (nobody spends privacy budget for a round that would be refused), and
    before unmasking when it happens in the collect stage (the coordinator never unmasks a sum
    it would refuse). ``halted`` then says why.

    Parameters
    ----------
    min_live : int
        Fewest nodes that must remain in each stage.
    **kwargs
        :class:`SecAggPlusWorkflow` arguments.
    """

    def __init__(self, *, min_live: int = MIN_SECAGG_NODES, **kwargs):
        super().__init__(**kwargs)
        self.min_live = int(min_live)
        self.halted: str | None = None
        self._stage = ""

    def setup_stage(self, grid, context, state) -> bool:  # noqa: D102
        self._stage = Stage.SETUP
        return super().setup_stage(grid, context, state)

    def share_keys_stage(self, grid, context, state) -> bool:  # noqa: D102
        self._stage = Stage.SHARE_KEYS
        return super().share_keys_stage(grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:  # noqa: D102
        self._stage = Stage.COLLECT_MASKED_VECTORS
        return super().collect_masked_vectors_stage(grid, context, state)

    def unmask_stage(self, grid, context, state) -> bool:  # noqa: D102
        self._stage = Stage.UNMASK
        live = set(state.active_node_ids)
        ok = super().unmask_stage(grid, context, state)
        if not ok:
            answered = set(state.active_node_ids)
            self.halted = (f"too few nodes answered the unmask stage to reconstruct the masks ({len(answered)} of "
                           f"{len(live)}; every node's secret needs {state.threshold} shares from live neighbours)")
        return ok

    def _check_threshold(self, state) -> bool:
        """Called by Flower after setup, share-keys and collect: trim departed nodes, check what remains."""
        live = set(state.active_node_ids)
        if self._stage in (Stage.SETUP, Stage.SHARE_KEYS):
            # left before its key shares went out: no secret of it to reconstruct, no mask of it anywhere
            state.sampled_node_ids = set(live)
            for nid in list(state.nid_to_neighbours):
                state.nid_to_neighbours[nid] = state.nid_to_neighbours[nid] & live
        if len(live) < self.min_live:
            what = "sent a masked update" if self._stage == Stage.COLLECT_MASKED_VECTORS else \
                f"answered the {self._stage} stage"
            after = "nothing was unmasked" if self._stage == Stage.COLLECT_MASKED_VECTORS else "no node trained"
            self.halted = (f"only {len(live)} node(s) {what}, fewer than min-accepted={self.min_live}; "
                           f"the protocol stopped ({after})")
            return False
        for nid in sorted(state.sampled_node_ids):
            have = state.nid_to_neighbours[nid] & live
            if len(have) < state.threshold:
                self.halted = (f"node {nid} kept {len(have)} live neighbour(s) (itself included) after the "
                               f"{self._stage} stage, fewer than secagg-threshold={state.threshold}: its secrets "
                               "could not be reconstructed")
                return False
        return True


def _readable(reason: str) -> str:
    """A node's error reason, with Flower's ``<class 'KeyError'>:<'2'>`` wrapper spelled out."""
    m = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", reason.strip(), flags=re.S)
    if m:
        return (f"the node's ClientApp failed with {m.group(1)} ({m.group(2)!r}) and left the round "
                "(a node without cityfed's SecAgg+ abort handling, or a bug: see its log)")
    return reason


class _OneRoundFedAvg(LegacyFedAvg):
    """Legacy strategy for one SecAgg+ round: fixed nodes, fixed job, pass-through aggregate.

    The workflow has already replaced every result's parameters by the unmasked weighted
    mean, so ``aggregate_fit`` returns it as is and only records the per-node metrics.
    """

    def __init__(self, proxies: list[GridClientProxy], job: dict):
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(proxies),
                         min_available_clients=len(proxies))
        self.proxies = proxies
        self.job = job
        self.results: dict[int, dict] = {}

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: D102
        return [(p, FitIns(parameters, dict(self.job))) for p in self.proxies]

    def aggregate_fit(self, server_round, results, failures):  # noqa: D102
        self.results = {int(proxy.node_id): dict(res.metrics) for proxy, res in results}
        if not results:
            return None, {}
        return results[0][1].parameters, {}


def secagg_train_round(grid: Grid, node_ids: list[int], global_arrays: ArrayRecord, job: dict, server_round: int,
                       workflow: SecAggPlusWorkflow) -> SecAggRound:
    """Run one round's train step through the SecAgg+ workflow.

    Parameters
    ----------
    grid : Grid
        The run's grid (nodes answer with :func:`clients.secagg.secagg_train`); a
        :class:`~server.grid.DeadlineGrid` gives each stage its deadline (any other grid is
        wrapped without deadlines).
    node_ids : list of int
        Sampled nodes.
    global_arrays : ArrayRecord
        Current global model; sent as the legacy ``FitIns.parameters``.
    job : dict
        Train config (scalars only); the parameter names are added under
        :data:`contract.keys.PARAM_NAMES_KEY`.
    server_round : int
        Round number the nodes see.
    workflow : SecAggPlusWorkflow
        Usually :class:`CityfedSecAggPlusWorkflow` (its ``halted`` reason is reported).

    Returns
    -------
    SecAggRound
    """
    names = list(global_arrays.keys())
    if not isinstance(grid, DeadlineGrid):
        grid = DeadlineGrid(grid, Deadlines(RoundTimeout(), bounded=False))
    first = len(grid.exchanges)
    proxies = [GridClientProxy(int(nid), grid, 0) for nid in node_ids]
    manager = SimpleClientManager()
    for p in proxies:
        manager.register(p)
    strategy = _OneRoundFedAvg(proxies, {**job, SERVER_ROUND: int(server_round), PARAM_NAMES_KEY: "\n".join(names)})
    ctx = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                        strategy=strategy, client_manager=manager)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: int(server_round)})
    before = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([global_arrays[n].numpy() for n in names]), keep_input=True)
    ctx.state.array_records[MAIN_PARAMS_RECORD] = before
    workflow(grid, ctx)
    after = ctx.state.array_records[MAIN_PARAMS_RECORD]
    refused, dropped, stages, gone = [], [], {}, set()
    for ex in grid.exchanges[first:]:
        stages[ex.kind] = {"seconds": round(ex.seconds, 3), "deadline": ex.deadline, "basis": ex.basis}
        for node, (code, why) in sorted(ex.errors.items()):
            refused.append({"node": node, "stage": ex.kind, "code": code, "reason": f"SecAgg+ {ex.kind}: {_readable(why)}"})
        for node, why in sorted(ex.missing.items()):
            if node not in gone:
                gone.add(node)
                dropped.append({"node": node, "stage": ex.kind, "reason": why})
    halted = getattr(workflow, "halted", None)
    if after is before:  # the protocol stopped before unmasking
        why = halted or "the SecAgg+ protocol halted (too few live nodes to unmask)"
        return SecAggRound(None, {}, refused, dropped, why, stages)
    mean = parameters_to_ndarrays(compat.arrayrecord_to_parameters(after, keep_input=True))
    return SecAggRound({n: np.asarray(a, dtype=np.float64) for n, a in zip(names, mean, strict=True)},
                       strategy.results, refused, dropped, None, stages)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of named NumPy arrays (keeps names, order and dtypes)."""
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


class SecAggStrategy(GuardedStrategy):
    """:class:`~server.strategy.GuardedStrategy` whose train step runs under SecAgg+.

    Node sampling, evaluation, checkpoints and history are the guarded strategy's; only the
    train step differs: ``configure_train`` samples nodes but returns no message (the plain
    train broadcast is replaced by the protocol), ``aggregate_train`` runs
    :func:`secagg_train_round`, checks the aggregate and lets ``inner`` (FedAvg, FedAdam or
    FedYogi) apply the mean update.

    Parameters
    ----------
    inner : Strategy
        The run's Flower strategy (one of :data:`SECAGG_STRATEGIES`).
    num_shares : int
        Shares of each node's secrets (odd, >= 3): each node masks with ``num_shares - 1``
        neighbours.
    threshold : int
        Shares needed to reconstruct a secret (2 <= threshold < num_shares); the protocol
        tolerates dropouts while every node keeps at least this many live neighbours.
    clipping_range : float
        Each coordinate of (update x num-examples / :data:`MAX_WEIGHT`) is quantised in
        [-clipping_range, clipping_range] with 2**22 levels.
    **guarded
        Keyword arguments of :class:`~server.strategy.GuardedStrategy`.
        ``min_accepted`` is raised to at least :data:`MIN_SECAGG_NODES`, and so are the
        inner strategy's minimum train/available nodes. Its ``round_timeout`` gives each of
        the four protocol stages its own deadline (:class:`~server.grid.DeadlineGrid`).
    """

    def __init__(self, inner: Strategy, *, num_shares: int, threshold: int, clipping_range: float, **guarded):
        super().__init__(inner, **guarded)
        check_settings({"secagg": True, "strategy": "fedavg", "secagg-num-shares": num_shares,
                        "secagg-threshold": threshold})
        self.workflow_args = dict(num_shares=int(num_shares), reconstruction_threshold=int(threshold),
                                  clipping_range=float(clipping_range), max_weight=MAX_WEIGHT,
                                  modulus_range=SECAGG_MOD_RANGE)  # the only modulus a node accepts
        SecAggPlusWorkflow(**self.workflow_args)  # Flower's own parameter checks, before any round
        if self.min_accepted < MIN_SECAGG_NODES:
            log.info("secagg: min-accepted raised from %d to %d", self.min_accepted, MIN_SECAGG_NODES)
            self.min_accepted = MIN_SECAGG_NODES
        self.raise_node_minimums(self.min_accepted)
        self._pending: tuple[Grid, list[int], dict] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Sample the round's nodes (as the inner strategy does); send nothing yet."""
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        job = dict(msgs[0].content["config"]) if msgs else {}
        self._pending = (grid, [int(m.metadata.dst_node_id) for m in msgs], job)
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Run SecAgg+ with the sampled nodes, check the aggregate, apply it with ``inner``."""
        rnd = server_round + self.round_offset
        grid, node_ids, job = self._pending
        self._pending = None
        job = {**job, MAX_UPDATE_NORM: float(self.max_update_norm)}  # nodes clip their own updates
        res = secagg_train_round(grid, node_ids, _record(self._global), job, rnd,
                                 CityfedSecAggPlusWorkflow(min_live=self.min_accepted, **self.workflow_args))
        for e in res.refused:
            self.history["refused"].append({"round": rnd, **e})
            log.warning("round %d: node %d sent no update: %s", rnd, e["node"], e["reason"])
        for d in res.dropped:
            self.history["dropped"].append({"round": rnd, **d})
            log.warning("round %d: node %d dropped out of SecAgg+ (%s stage): %s", rnd, d["node"], d["stage"], d["reason"])
        entry = self._round(rnd)
        entry["train"] = {"nodes": res.nodes, "accepted": len(res.nodes) if res.mean_update is not None else 0,
                          "secagg": {"sampled": len(node_ids), "dropped": res.dropped}, **self._timing("train"),
                          "stages": res.stages}
        if res.mean_update is None or len(res.nodes) < self.min_accepted:
            why = res.halted if res.mean_update is None else \
                f"{len(res.nodes)} contributing node(s), fewer than min-accepted={self.min_accepted}"
            who = "".join(f"; node {d['node']} ({d['reason']})" for d in res.dropped) + \
                "".join(f"; node {e['node']} refused ({e['reason']})" for e in res.refused)
            reason = f"round {rnd}: SecAgg+: {why}{who}; global model unchanged, run ended"
            log.warning(reason)
            entry["train"]["stopped"] = reason
            self._save()
            raise TooFewUpdates(reason)
        metrics = aggregate_metrics([{"metrics": m} for m in res.nodes.values()], "num-examples")
        norm = math.sqrt(sum(float((u ** 2).sum()) for u in res.mean_update.values()))
        finite = all(np.isfinite(u).all() for u in res.mean_update.values())
        metrics["aggregate-update-norm"] = norm if finite else float("nan")
        entry["train"]["aggregate"] = dict(metrics)
        if not finite or norm > self.max_update_norm:
            reason = ("aggregate update is not finite" if not finite
                      else f"aggregate update norm {norm:.4g} exceeds max-update-norm {self.max_update_norm:g}")
            self.history["excluded"].append({"round": rnd, "node": "secure-aggregate", "reason": reason})
            entry["train"]["rejected"] = reason
            log.warning("round %d: rejected the secure aggregate: %s; global model unchanged", rnd, reason)
            self._save(_record(self._global))
            return None, metrics
        # the mean update as one reply of weight 1: FedAvg returns global + mean, FedAdam/FedYogi step on it
        proposal = {k: (self._global[k].astype(np.float64) + res.mean_update[k]).astype(self._global[k].dtype)
                    for k in self._global}
        reply = Message(RecordDict({"arrays": _record(proposal),
                                    "metrics": MetricRecord({"num-examples": 1})}),
                        dst_node_id=0, message_type="train")
        central = {"contributors": len(res.nodes)} if hasattr(self.inner, "central_state") else {}  # central DP noise
        arrays, _ = self.inner.aggregate_train(rnd, [reply], **central)
        self._record_central_dp(entry, arrays)
        self._pending_arrays = arrays
        self._save(arrays)
        return arrays, metrics
