"""The coordinator ServerApp: one app for simulation and deployment.

Its run config (``--run-config`` / ``[tool.flwr.app.config]`` / ``fl-sim``) is validated by
:class:`RunSettings`: every key is documented there, and a bad value or an unknown key is an
error naming the key. Keys that only department nodes read (``policy``, ``ledger``,
``ledger-dir``, ``data``, ``dropout-probability``, virtual-site partitioning) pass through.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from citydata import DATASETS
from contract.keys import NODE_KEYS, OPTIMIZERS, RUN_ID
from contract.tasks import TASKS
from privacy.policy import MAX_EPSILON
from server.artefacts import CHECKPOINT, MODEL, ArtefactError, require_no_legacy_checkpoint, save_model, write_checkpoint
from server.personalise import personalise_config, personalise_nodes
from server.secagg import SecAggStrategy
from server.central_dp import NORM_SLACK as CENTRAL_NORM_SLACK
from server.central_dp import STATE_KEY as CENTRAL_STATE_KEY
from server.central_dp import CentralDPFixedClipping
from server.central_dp import check_settings as check_central_dp
from server.central_dp import unnoised_message, unnoised_rounds
from server.secagg import check_settings as check_secagg
from server.strategy import STRATEGIES, GuardedStrategy, TooFewUpdates, load_checkpoint, make_strategy
from shared_models import build_model, default_model_config, model_kinds

log = logging.getLogger("cityfed.server")

#: Bounds of the run config's numbers: far above any sensible value, low enough to catch typos and
#: unit slips (``1e308``, ``99999999999999999999``) that would otherwise run, or fail mid-run.
MAX_ROUNDS = 100_000
MAX_EPOCHS = 10_000
MAX_NODES = 1_000_000
MAX_BATCH = 1_000_000
MAX_LR = 1e3
MAX_SCALE = 1e6  # noise multipliers, clipping norms, proximal weights, SecAgg+ range
MAX_SEED = 2**32 - 1  # numpy's legacy seeding (and the nodes' splits) take at most 32 bits
#: ``noise-multiplier`` value meaning "calibrate the noise from target-epsilon" (the default).
CALIBRATE = -1.0


class RunConfigError(ValueError):
    """A run config key or value that is not valid; the message names the key, the value and the fix.

    A cityfed error (its message is shown by :func:`privacy.safe_cli.run_app`); a ``ValueError``
    for the callers that catch those.

    Attributes
    ----------
    keys : tuple of str
        The run-config keys whose own value is refused, in the message's order (a CLI names the
        option that set each); empty for a problem of several keys together (e.g. ``secagg`` with
        a strategy that needs individual updates).
    together : tuple of str
        For a problem of several keys together: the keys involved, in the message's order (a CLI
        names the options that set them); empty otherwise.
    """

    def __init__(self, message: str, keys: tuple[str, ...] = (), together: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = tuple(keys)
        self.together = tuple(together)


class RunSettings(BaseModel):
    """A federated run's settings (run-config keys are the hyphenated field aliases).

    Every number is finite (``inf``/``nan`` are refused) and within the bounds its field states;
    a ``true``/``false`` is not a number.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    department: Literal["health", "traffic", "utility"] = Field(description="Department whose nodes train.")
    model: str = Field("", description="Model kind (heart-mlp; gru, patchtst); empty = the department's first.")
    num_rounds: int = Field(5, ge=1, le=MAX_ROUNDS, alias="num-rounds", description="Federated rounds.")
    strategy: Literal[STRATEGIES] = Field("fedavg", description="Flower aggregation strategy.")
    proximal_mu: float = Field(0.1, ge=0, le=MAX_SCALE, alias="proximal-mu", description="FedProx proximal weight (fedprox only).")
    server_lr: float = Field(1e-2, gt=0, le=MAX_LR, alias="server-lr", description="Server learning rate eta (fedadam, fedyogi).")
    server_momentum: float = Field(0.9, ge=0, lt=1, alias="server-momentum",
                                   description="Server momentum (fedavgm only; its server learning rate is 1).")
    trim_beta: float = Field(0.2, gt=0, lt=0.5, alias="trim-beta", description="Fraction trimmed at each end (trimmed-mean).")
    krum_malicious: int = Field(1, ge=0, le=MAX_NODES, alias="krum-malicious", description="Nodes Krum assumes malicious.")
    local_epochs: int = Field(1, ge=1, le=MAX_EPOCHS, alias="local-epochs", description="Local epochs per round.")
    batch_size: int = Field(64, ge=1, le=MAX_BATCH, alias="batch-size", description="Expected local batch size (Poisson sampling).")
    lr: float = Field(1e-2, gt=0, le=MAX_LR, description="Local learning rate (of the optimizer below).")
    optimizer: Literal[OPTIMIZERS] = Field(
        "adam", description="Local optimizer of the rounds: adam, or sgd (SGD with momentum 0.9). Under DP-SGD's noise "
                            "Adam's steps are noise-normalised; sgd takes lr as given (README, 'Local optimizer'). The "
                            "personalisation trains with Adam.")
    dp: bool = Field(True, description="DP-SGD on every node (example policies require it).")
    target_epsilon: float = Field(3.0, gt=0, le=MAX_EPSILON, alias="target-epsilon",
                                  description="Epsilon each node reaches after num-rounds (nodes calibrate their noise); "
                                              "at most a policy's highest lifetime max_epsilon.")
    noise_multiplier: float = Field(CALIBRATE, alias="noise-multiplier",
                                    description="Fixed noise multiplier (>= 0); -1 (default) = calibrate from target-epsilon.")
    clipping_norm: float = Field(1.0, gt=0, le=MAX_SCALE, alias="clipping-norm", description="Per-sample clipping norm.")
    fraction_train: float = Field(1.0, gt=0, le=1, alias="fraction-train", description="Share of nodes sampled to train per round.")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, alias="fraction-evaluate",
                                     description="Share of nodes asked to evaluate per round (0 = none). A node answers "
                                                 "only if its policy allows DP-noised local evaluation; otherwise it "
                                                 "declines, and the run is scored on central-data.")
    min_nodes: int = Field(1, ge=1, le=MAX_NODES, alias="min-nodes", description="Nodes that must be connected before a round starts.")
    min_accepted: int = Field(1, ge=1, le=MAX_NODES, alias="min-accepted",
                              description="A round with fewer acceptable updates ends the run cleanly. min-nodes is "
                                          "raised to it: a round waits (within its deadline) for that many "
                                          "connected nodes and samples at least as many.")
    max_update_norm: float = Field(1e3, gt=0, alias="max-update-norm",
                                   description="Replies whose update L2 norm exceeds this are excluded.")
    round_timeout: float | str = Field(
        "auto", alias="round-timeout",
        description="How long the coordinator waits for the nodes' replies in each message exchange (train, evaluate, "
                    "each SecAgg+ stage, and for enough nodes to be connected); a node that has not answered by then is "
                    "recorded as dropped, with the reason, and the round goes on with the others (or ends the run "
                    "cleanly under min-accepted). 'auto' (default): the first exchange of each kind may take 600 s, "
                    "every later one 5 x the slowest reply of the last 3 exchanges of its kind, at least 30 s and at "
                    "most 600 s; tune as 'auto:first=600,factor=5,floor=30,max=600'. A number: that many seconds for every "
                    "exchange.")
    central_data: str = Field("", alias="central-data",
                              description="Records the coordinator holds (a file in the department schema, or "
                                          "'bundled' for the department's packaged public data): every site's test "
                                          "split in it is scored each round, exactly. Empty = none.")
    central_data_seed: int = Field(0, ge=0, le=MAX_SEED, alias="central-data-seed",
                                   description="Seed of the train/test split of central-data (health: a seeded random "
                                               "draw per hospital). Simulations set it, and each node's data-seed, to "
                                               "the run's seed, so the coordinator scores the test records the nodes "
                                               "hold out.")
    personalise_epochs: int = Field(0, ge=0, le=MAX_EPOCHS, alias="personalise-epochs",
                                    description="After the last round, each node whose policy allows it (personalisation "
                                                "= true) fine-tunes the final model on its own records for this many "
                                                "epochs and keeps it; under DP the run's target-epsilon covers it. 0 = off.")
    personalise_lr: float = Field(1e-3, gt=0, le=MAX_LR, alias="personalise-lr", description="Learning rate of the personalisation (Adam).")
    personalise_layers: Literal["all", "head"] = Field("all", alias="personalise-layers",
                                                       description="Parameters personalised: all, or the output layer only.")
    personalise_batch_size: int = Field(0, ge=0, le=MAX_BATCH, alias="personalise-batch-size",
                                        description="Batch size of the personalisation (DP-SGD: its expected batch, which "
                                                    "the nodes' noise calibration uses). 0 = the run's batch-size.")
    personalise_mu: float = Field(0.0, ge=0, le=MAX_SCALE, alias="personalise-mu",
                                  description="Proximal pull of the personalised model towards the global one (Ditto-like).")
    personalise_own_lr: float = Field(0.0, ge=0, le=MAX_LR, alias="personalise-own-lr",
                                      description="Without DP: each node also trains a model from the run's initialisation "
                                                  "on its own records alone at this learning rate and keeps whichever of it "
                                                  "and the personalised federated model scores better on its validation split "
                                                  "(a node never keeps a model worse there than its own). 0 = off; ignored "
                                                  "under DP (a second model would be a second release).")
    personalise_own_batch_size: int = Field(0, ge=0, le=MAX_BATCH, alias="personalise-own-batch-size",
                                            description="Batch size of that own-records model. 0 = the personalisation's.")
    run_dir: str = Field("runs/latest", alias="run-dir", description="Folder for checkpoint.safetensors, model.safetensors, results.json.")
    resume: bool = Field(False, description="Continue from run-dir/checkpoint.safetensors.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the initial model and of local sampling.")
    secagg: bool = Field(False, description="Aggregate train updates under Flower's SecAgg+: the coordinator only sees "
                                            "their weighted mean (fedavg, fedadam, fedyogi only; at least 3 nodes per round).")
    secagg_num_shares: int = Field(3, ge=3, le=1023, alias="secagg-num-shares",
                                   description="SecAgg+ shares of each node's secrets = neighbours + 1 (odd). A node "
                                               "masks with at least 2 neighbours or leaves the round: under 3, a node "
                                               "that drops out at setup takes its 2 neighbours with it; 5 survives it.")
    secagg_threshold: int = Field(2, ge=2, le=1022, alias="secagg-threshold",
                                  description="SecAgg+ shares needed to unmask (< secagg-num-shares); a round survives "
                                              "dropouts while each node keeps this many live neighbours.")
    secagg_clipping_range: float = Field(8.0, gt=0, le=MAX_SCALE, alias="secagg-clipping-range",
                                         description="SecAgg+ quantises each coordinate of update*num-examples/1000 in "
                                                     "[-r, r] with 2**22 levels: error <= 2r/2**22 per node (~1e-5 on "
                                                     "the mean, far below DP noise); nodes scale larger updates down.")
    central_dp: bool = Field(False, alias="central-dp",
                             description="Central DP of the published model (server/central_dp.py): each node clips "
                                         "its model update (to central-clipping-norm, or less where its policy's "
                                         "central_max_clipping_norm says so), the coordinator divides the sum of the "
                                         "updates by the nodes asked, each weighing 1, adds Gaussian noise (Flower's DP "
                                         "wrapper), and accounts the "
                                         "rounds (user level) in the checkpoint. Protects the model against its users, "
                                         "not the nodes against the coordinator; nodes still run their own DP-SGD. "
                                         "fedavg and fedprox only.")
    central_noise_multiplier: float = Field(1.0, gt=0, le=MAX_SCALE, alias="central-noise-multiplier",
                                            description="Central DP: noise std on the sum of the updates over the W nodes "
                                                        "asked = this x central-clipping-norm / W.")
    central_clipping_norm: float = Field(1.0, gt=0, le=MAX_SCALE, alias="central-clipping-norm",
                                         description="Central DP: L2 norm each node clips its model update to (an "
                                                     "upper bound: a node's policy may clip tighter, never looser).")
    central_delta: float = Field(1e-5, gt=0, lt=1, alias="central-delta",
                                 description="Central DP: delta of the coordinator's (user-level) accountant; keep it "
                                             "well below 1 / number of nodes.")
    central_accountant: Literal["rdp", "prv"] = Field("rdp", alias="central-accountant",
                                                      description="Central DP: accountant of the central epsilon "
                                                                  "(Opacus RDP, or PRV: tighter).")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value, info):
        if isinstance(value, bool) and _NUMBER_KIND.get(info.field_name):  # true is not 1
            raise ValueError("a number, not true/false")
        return value

    @field_validator("noise_multiplier")
    @classmethod
    def _noise(cls, value: float) -> float:
        if value != CALIBRATE and not 0 <= value <= MAX_SCALE:
            raise ValueError("out of range")  # settings() words it (_range_text)
        return value

    @field_validator("round_timeout", mode="before")
    @classmethod
    def _round_timeout(cls, value):
        from server.grid import RoundTimeout

        rule = RoundTimeout.parse(value)  # ValueError names the accepted forms
        return rule.fixed if rule.fixed is not None else str(value).strip()

    def as_config(self) -> dict:
        """The settings as a run-config dict (hyphenated keys)."""
        return self.model_dump(by_alias=True)


#: Defaults of every key (hyphenated), for documentation and tools.
DEFAULTS = {f.alias or k: f.default for k, f in RunSettings.model_fields.items() if k != "department"}


def _fmt(x) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(name: str) -> str:
    """What a numeric field accepts, from its bounds: 'a finite number > 0 and <= 100'."""
    import annotated_types as at

    info = RunSettings.model_fields[name]
    if name == "noise_multiplier":
        return (f"a finite number >= 0 and <= {_fmt(MAX_SCALE)}, or -1 (the default) to calibrate the noise from "
                "'target-epsilon'")
    parts = []
    for m in info.metadata:
        for cls_, attr, op in ((at.Gt, "gt", ">"), (at.Ge, "ge", ">="), (at.Lt, "lt", "<"), (at.Le, "le", "<=")):
            if isinstance(m, cls_):
                parts.append(f"{op} {_fmt(getattr(m, attr))}")
    what = "a whole number" if _NUMBER_KIND[name] is int else "a finite number"
    return what + (" " + " and ".join(parts) if parts else "")


#: The numeric fields (int or float; not round-timeout, a number or a rule) -> their kind.
_NUMBER_KIND = {k: f.annotation for k, f in RunSettings.model_fields.items() if f.annotation in (int, float)}
#: Hyphenated key -> what it accepts (run-config errors say it).
_ACCEPTS = {RunSettings.model_fields[k].alias or k: _range_text(k) for k in _NUMBER_KIND}


#: Every key a run config may hold: the hyphenated RunSettings keys and ``department`` (node-side keys aside).
RUN_CONFIG_KEYS = ("department", *DEFAULTS)


def unknown_key_message(key: str) -> str:
    """Why ``key`` is not a run-config key, with the closest known key ("did you mean") and the fix."""
    import difflib

    known = [*RUN_CONFIG_KEYS, *NODE_KEYS]
    close = difflib.get_close_matches(str(key).replace("_", "-").lower(), known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    fix = f"use {close[0]!r}" if close else "use one of the keys listed"
    return (f"unknown run config key {key!r}{hint} (run-config keys are hyphenated; known: "
            f"{', '.join(sorted(RUN_CONFIG_KEYS))}); fix: {fix} (`fl-server app-config` lists every key and its default)")


def _refuse_unknown_keys(raw: dict) -> None:
    """Refuse keys that are no run-config key, field names (``local_epochs``) included.

    RunSettings also takes its field names (``populate_by_name``); Flower does not, and would
    refuse the run after it was submitted.

    Raises
    ------
    RunConfigError
        Naming each unknown key, with the closest known one.
    """
    unknown = [k for k in raw if k not in RUN_CONFIG_KEYS]
    if unknown:
        raise RunConfigError("; ".join(unknown_key_message(k) for k in unknown), tuple(map(str, unknown)))


def settings(run_config: dict) -> dict:
    """Validate a run config; return it with defaults filled in (hyphenated keys).

    Node-side keys (:data:`contract.keys.NODE_KEYS`) pass through unchecked; any other key that is not a
    hyphenated run-config key (:data:`RUN_CONFIG_KEYS`; a field name such as ``local_epochs`` included) is refused.

    Raises
    ------
    RunConfigError
        (a ``ValueError``) Naming the key, the value and the allowed values.
    """
    raw = dict(run_config)
    node_side = {k: raw.pop(k) for k in list(raw) if k in NODE_KEYS or k == RUN_ID}  # run-id: in-process grid
    _refuse_unknown_keys(raw)
    try:
        parsed = RunSettings.model_validate(raw)
    except ValidationError as exc:
        problems, keys = [], []
        for err in exc.errors():
            key = ".".join(str(x) for x in err["loc"]) or "?"
            keys.append(key)
            if err["type"] == "extra_forbidden":
                problems.append(unknown_key_message(key))
            elif key in _ACCEPTS:
                problems.append(f"run config {key!r}: must be {_ACCEPTS[key]} (got {err.get('input')!r})")
            else:
                msg = str(err["msg"]).removeprefix("Value error, ")
                problems.append(f"run config {key!r}: {msg} (got {err.get('input')!r})")
        raise RunConfigError("; ".join(problems), tuple(dict.fromkeys(keys))) from None
    cfg = parsed.as_config()
    try:
        check_secagg(cfg)
        check_central_dp(cfg)
    except ValueError as exc:  # their messages name the key ("run config 'KEY': ...") and what is wrong
        named = re.match(r"run config '(secagg-num-shares|secagg-threshold)':", str(exc))  # a key's own value
        if named:
            raise RunConfigError(str(exc), (named.group(1),)) from None
        known = {f.alias or k for k, f in RunSettings.model_fields.items()}  # keys together: the ones it quotes
        together = tuple(dict.fromkeys(k for k in re.findall(r"'([a-z][a-z-]*)'", str(exc)) if k in known))
        raise RunConfigError(str(exc), together=together) from None
    cfg["model"] = cfg["model"] or model_kinds(cfg["department"])[0]
    if cfg["model"] not in model_kinds(cfg["department"]):
        raise RunConfigError(f"run config 'model': {cfg['model']!r} is not a {cfg['department']} model; "
                             f"choose one of {', '.join(model_kinds(cfg['department']))}", ("model",))
    return {**cfg, **node_side}


def _strategy_kwargs(cfg: dict) -> dict:
    name = cfg["strategy"]
    if name == "fedprox":
        return {"proximal_mu": float(cfg["proximal-mu"])}
    if name in ("fedadam", "fedyogi"):
        return {"eta": float(cfg["server-lr"])}
    if name == "fedavgm":
        return {"server_momentum": float(cfg["server-momentum"])}
    if name == "trimmed-mean":
        return {"beta": float(cfg["trim-beta"])}
    if name == "krum":
        return {"num_malicious_nodes": int(cfg["krum-malicious"])}
    return {}


def job_config(cfg: dict, run_id: str) -> dict:
    """The job config every train, evaluate and personalise message of a run carries.

    Only keys of the job contract (:data:`contract.keys.JOB_KEYS`); Flower's strategies add
    ``server-round``, central DP its clipping norm and claims, SecAgg+ the parameter names and
    the update bound.

    Parameters
    ----------
    cfg : dict
        A validated run config (:func:`settings`).
    run_id : str
        The run's identity (kept across resumes).
    """
    dept = cfg["department"]
    job = {
        "department": dept, "task": TASKS[dept], "model": cfg["model"], RUN_ID: run_id,
        "local-epochs": int(cfg["local-epochs"]), "batch-size": int(cfg["batch-size"]), "lr": float(cfg["lr"]),
        "optimizer": str(cfg["optimizer"]), "dp": bool(cfg["dp"]), "clipping-norm": float(cfg["clipping-norm"]), "num-rounds": int(cfg["num-rounds"]),
        "seed": int(cfg["seed"]),
    }
    if float(cfg["noise-multiplier"]) >= 0:
        job["noise-multiplier"] = float(cfg["noise-multiplier"])
    else:
        job["target-epsilon"] = float(cfg["target-epsilon"])
    if cfg["strategy"] == "fedprox":
        job["proximal-mu"] = float(cfg["proximal-mu"])
    job.update(personalise_config(cfg))  # nodes reserve the personalisation's steps in their calibration
    return job


def central_evaluator(cfg: dict, strategy: GuardedStrategy):
    """``evaluate_fn`` for Flower's ``strategy.start``: score the global model on ``central-data``.

    The file is read with the department's adapter (same schema checks as a node's file);
    every site's test split is scored and the example-weighted mean reported.
    """
    from citydata import load_department
    from shared_models.scoring import evaluation_metrics

    source = cfg["central-data"]
    ds = load_department(cfg["department"], None if source == "bundled" else source, seed=int(cfg.get("central-data-seed", 0)))
    model = build_model(default_model_config(ds.schema, cfg["model"]))
    sites = {s: ds.site_data(s) for s in ds.sites}  # once: data-quality warnings are printed once, not per round

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        per_site = {s: evaluation_metrics(model, site, ds.schema.task) for s, site in sites.items()}
        scored = [m for m in per_site.values() if m["num-examples"]]
        total = sum(m["num-examples"] for m in scored) or 1
        agg = {k: sum(m[k] * m["num-examples"] for m in scored) / total for k in scored[0] if k != "num-examples"} \
            if scored else {}
        agg["num-examples"] = total
        strategy.record_central(server_round, agg, per_site)
        return MetricRecord(agg)

    return evaluate_fn


def record_resume(ckpt: Path, saved: dict, history: dict, launch_id: str) -> dict:
    """Append this launch to the run's ``resumes`` and write it into the checkpoint at once.

    ``resumes`` in ``results.json`` is the explicit link between a run's launches. The entry
    goes into ``history`` (the strategy's, which becomes ``results.json``) and, before any
    round of this launch runs, into ``ckpt``: a launch that dies before its first round's
    checkpoint (crash, SIGKILL, ``fl-server stop``) would otherwise leave no trace, and the
    next resume, which reads the checkpoint, would drop it.

    Parameters
    ----------
    ckpt : Path
        The run's ``checkpoint.safetensors``, as ``saved`` was read from it.
    saved : dict
        The checkpoint blob (:func:`server.strategy.load_checkpoint`); written back with ``history``.
    history : dict
        The run history this launch keeps (``GuardedStrategy.history``); updated in place.
    launch_id : str
        This launch's own (Flower) run ID.

    Returns
    -------
    dict
        The entry: ``flower-run-id``, ``after-round`` (rounds done before this launch) and ``at`` (UTC).
    """
    entry = {"flower-run-id": str(launch_id), "after-round": int(saved["round"]),
             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    history.setdefault("resumes", []).append(entry)
    write_checkpoint(ckpt, {**saved, "history": history})  # atomic: temporary file, fsync, rename
    return entry


def run_federation(grid: Grid, run_config: dict, *, run_id: str, on_round=None) -> dict:
    """Run (or resume) a federated training run on ``grid`` and write its artefacts.

    ``on_round(entry)`` is called after each round's evaluation (progress display).
    Returns the results dict also written to ``run-dir/results.json``.
    """
    cfg = settings(run_config)
    dept = cfg["department"]
    run_dir = Path(cfg["run-dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / CHECKPOINT
    if cfg["resume"]:
        require_no_legacy_checkpoint(run_dir)  # an earlier version's pickle: never unpickled, the error says what to do
    schema = DATASETS[dept].schema
    torch.manual_seed(int(cfg["seed"]))
    model = build_model(default_model_config(schema, cfg["model"]))
    arrays = ArrayRecord(model.state_dict())
    offset, history, central_state, saved_state = 0, None, None, None
    saved = None  # the checkpoint blob this launch resumes from
    inner = make_strategy(cfg["strategy"], fraction_train=float(cfg["fraction-train"]),
                          fraction_evaluate=float(cfg["fraction-evaluate"]), min_nodes=int(cfg["min-nodes"]),
                          **_strategy_kwargs(cfg))
    launch_id = str(run_id)  # this launch's own (Flower) run ID; a resumed run keeps its first one
    if cfg["resume"] and ckpt.exists():
        saved = load_checkpoint(ckpt)
        offset, history = int(saved["round"]), saved["history"]
        run_id = saved.get("run_id", run_id)
        if saved["arrays"]:
            arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in saved["arrays"].items()})
        else:  # an earlier version's checkpoint of a run stopped before round 1 held no model: the seed's initial one
            log.warning("run %s: its checkpoint holds no model (stopped before round 1): starting from the initial "
                        "model of seed %s", run_id, cfg["seed"])
        saved_state = saved["strategy_state"]  # the server optimiser's state_dict, restored below
        central_state = saved_state.get(CENTRAL_STATE_KEY)  # the central-DP accountant (JSON)
        log.warning("resuming run %s after round %d of %d (this launch is Flower run %s); rounds continue at %d",
                    run_id, offset, int(cfg["num-rounds"]), launch_id, offset + 1)
    if cfg["central-dp"]:  # Flower's client-side fixed-clipping DP wrapper; its accountant continues on resume
        unnoised = unnoised_rounds(saved["history"]) if saved is not None else []
        if unnoised:  # a central epsilon counted from the resume on would cover a model published without noise
            raise RunConfigError(f"{unnoised_message(str(run_id), unnoised)}; fix: resume it with "
                                 "'central-dp' = false (its model then claims no central epsilon), or start a new run "
                                 "(another run-dir) with 'central-dp' = true from round 1", ("central-dp",))
        inner = CentralDPFixedClipping(inner, noise_multiplier=float(cfg["central-noise-multiplier"]),
                                       clipping_norm=float(cfg["central-clipping-norm"]), delta=float(cfg["central-delta"]),
                                       sample_rate=float(cfg["fraction-train"]), accountant=cfg["central-accountant"],
                                       state=central_state)
    elif central_state:
        log.warning("central DP: run %s was resumed with central-dp = false: its central epsilon (%.4g after %s "
                    "round(s)) no longer covers the rounds to come", run_id, float(central_state.get("epsilon", "nan")),
                    central_state.get("rounds"))
    max_update_norm = float(cfg["max-update-norm"])
    if cfg["central-dp"]:  # an update over the clipping norm (a node that did not clip) would void the noise's calibration
        max_update_norm = min(max_update_norm, float(cfg["central-clipping-norm"]) * CENTRAL_NORM_SLACK)
    guard = dict(max_update_norm=max_update_norm, checkpoint=ckpt, round_offset=offset, history=history,
                 run_id=run_id, on_round=on_round, min_accepted=int(cfg["min-accepted"]), round_timeout=cfg["round-timeout"])
    strategy = GuardedStrategy(inner, **guard) if not cfg["secagg"] else SecAggStrategy(
        inner, num_shares=int(cfg["secagg-num-shares"]), threshold=int(cfg["secagg-threshold"]),
        clipping_range=float(cfg["secagg-clipping-range"]), **guard)
    strategy.num_rounds = int(cfg["num-rounds"])
    if saved_state:
        strategy.load_state_dict(saved_state)  # FedAdam/FedYogi moments, FedAvgM momentum continue
    # record what the run actually uses: SecAgg+ raises the minimums (server/secagg.py)
    cfg = {**cfg, "min-accepted": strategy.min_accepted,
           "min-nodes": max(int(cfg["min-nodes"]), int(getattr(inner, "min_train_nodes", 0) or 0))}
    remaining = int(cfg["num-rounds"]) - offset
    job = job_config(cfg, run_id)
    evaluate_fn = central_evaluator(cfg, strategy) if cfg["central-data"] else None
    if saved is not None:  # recorded once nothing is left to refuse this resume (e.g. another strategy's state)
        record_resume(ckpt, saved, strategy.history, launch_id)
    t0 = time.perf_counter()
    status = "completed"
    if remaining > 0:
        try:
            result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=remaining, train_config=ConfigRecord(job),
                                    evaluate_config=ConfigRecord(job), evaluate_fn=evaluate_fn)
            if len(result.arrays.keys()):
                arrays = result.arrays
        except TooFewUpdates as exc:
            status = f"stopped: {exc}"
    final = load_checkpoint(ckpt) if ckpt.exists() else {"arrays": {k: v.numpy() for k, v in arrays.items()}}
    save_model(run_dir / MODEL, final["arrays"], metadata={"run-id": str(run_id)})
    if job.get("personalise-epochs") and status == "completed":  # each node fine-tunes on-site, keeps its model
        strategy.history["personalise"] = personalise_nodes(
            grid, job, ArrayRecord({k: torch.from_numpy(v) for k, v in final["arrays"].items()}), int(cfg["num-rounds"]))
    out = {"run_id": run_id, "status": status, "config": cfg, "job": job, "seconds": time.perf_counter() - t0,
           **strategy.history}
    if cfg["central-dp"]:  # the published model's central epsilon (the coordinator's accountant, all launches)
        out["central-dp"] = strategy.strategy_state()[CENTRAL_STATE_KEY]
    from server.energy import summarise as energy_summary

    out["energy"] = energy_summary(out)  # per node and for the run, as the nodes reported it (server/energy.py)
    from server.artefacts import write_atomic

    write_atomic(run_dir / "results.json", json.dumps(out, indent=2, default=float).encode())  # never half a file
    try:  # the same report.html + plots as fl-sim (which rewrites it with the sites' names)
        from server.report import write_run_report

        write_run_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - a plot must never turn a finished run into a failed one
        log.error("report.html not written in %s: %s: %s", run_dir, type(exc).__name__, exc)
    return out


#: The fix a run-config refusal without one of its own gets in the ServerApp's log.
RUN_CONFIG_FIX = ("correct the value with `flwr run . <federation> --run-config \"KEY=VALUE\"` or in "
                  "[tool.flwr.app.config] of pyproject.toml (`fl-server app-config` lists every key, its default "
                  "and what it accepts)")


def config_errors() -> tuple[type[Exception], ...]:
    """The errors a ServerApp run stops on that are the operator's input, not a bug.

    A bad run config (:class:`RunConfigError`), a run folder's artefact (:class:`server.artefacts.ArtefactError`:
    an earlier version's checkpoint, an unreadable one), a bad ``CITYFED_GRID_POLL_S``
    (:class:`server.errors.CliError`) and a bad ``central-data`` file (:class:`citydata.base.DataFileError`).
    Their messages name the key, file or variable, the value and the fix, and never a record value.

    Returns
    -------
    tuple of type
    """
    from citydata.base import DataFileError
    from server.errors import CliError

    return RunConfigError, ArtefactError, CliError, DataFileError


class _DropReported(logging.Filter):
    """Drop Flower's "ServerApp raised an exception" record (and its traceback) for an error already logged."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102 - logging.Filter's
        exc = record.exc_info[1] if record.exc_info else None
        return not getattr(exc, "cityfed_reported", False)


def report_stop(exc: Exception) -> None:
    """Log ``exc``, one of :func:`config_errors`, as one line with its fix, and keep Flower from adding a traceback.

    The ServerApp's main re-raises ``exc`` afterwards, so that Flower still marks the run failed
    (``flwr ls``: failed; its exit code) - Flower marks a main that returns as completed. Flower logs a
    main's exception with its full traceback (``ERROR : ServerApp raised an exception``, or
    ``Simulation`` under ``flwr run`` with a simulation federation); a filter on Flower's ``flwr`` logger
    drops that record for an exception reported here. ``CITYFED_DEBUG=1`` keeps the traceback.

    Parameters
    ----------
    exc : Exception
        The error; its message names the key, file or variable, the value and the fix.
    """
    from privacy.safe_cli import DEBUG_ENV

    message = " ".join(str(exc).split("\n")).strip()
    if isinstance(exc, RunConfigError) and "fix:" not in message.lower():
        message = f"{message}; fix: {RUN_CONFIG_FIX}"
    log.error("run stopped: %s", message)
    if os.environ.get(DEBUG_ENV) == "1":
        return
    exc.cityfed_reported = True
    flower_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _DropReported) for f in flower_logger.filters):
        flower_logger.addFilter(_DropReported())


def build_server_app(defaults: dict | None = None, on_round=None) -> ServerApp:
    """The coordinator ServerApp (``defaults`` are baked-in run-config values for simulation).

    A bad run config, run folder, ``CITYFED_GRID_POLL_S`` or ``central-data`` file (:func:`config_errors`)
    is logged as one line naming the key, file or variable, the value and the fix, without a traceback
    (:func:`report_stop`); the run still ends failed.
    """
    defaults = dict(defaults or {})
    sapp = ServerApp()

    @sapp.main()
    def _main(grid: Grid, context: Context) -> None:
        from flower_compat.logging import route_logs_through_flower
        from server.grid import fast_poll  # deployment: poll replies every 0.1 s, not Flower's 3 s

        # the run's log (`flwr log`, `fl-server logs`): each line once (Opacus' root handler doubled them), the
        # coordinator's own lines in it, colour codes only where this process writes to a terminal
        route_logs_through_flower()
        try:
            run_federation(fast_poll(grid), {**defaults, **dict(context.run_config)}, run_id=str(context.run_id),
                           on_round=on_round)
        except config_errors() as exc:
            report_stop(exc)
            raise  # Flower marks the run failed (a main that returns is "completed"); its traceback is dropped

    return sapp


#: The ServerApp for deployment (``flwr`` app entry point ``server.app:app``).
app = build_server_app()
