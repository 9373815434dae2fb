"""The department ClientApp: one app for simulation and deployment (Flower Message API).

Train messages carry the global model (``ArrayRecord`` "arrays") and the job
(``ConfigRecord`` "config"); replies carry the updated arrays and whitelisted metrics
(``MetricRecord`` "metrics"), or an error whose reason says why the node refused.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.energy import EnergyMeter
from clients.node import JobRefused, NoTrainingData, handle_evaluate, handle_train, node_from_config
from clients.clipping import central_clipping_mod
from clients.replies import audit_reply
from clients.secagg import (is_secagg_fit, masking_active, plain_in_collect_refusal, secagg_train,
                            secure_aggregation_mod, unmasked_refusal)
from contract.tasks import (ARRAYS, CONFIG, EVAL_METRICS, FAILED, METRICS, NO_DATA, PERSONALISE_ACTION,  # noqa: F401
                            PERSONALISE_METRICS, REFUSED, TRAIN_METRICS)  # the reply error codes: the contract's

class NodeSetupError(ValueError):
    """A simulated node's set-up does not fit its run (``flwr run``'s node count): configuration, never records.

    Its message names the setting, its value and the fix and holds no record value, so the node's
    log shows it (:func:`privacy.safe_cli.describe` hides a plain ``ValueError``'s message).
    """


class ExamplePolicyNotFound(FileNotFoundError):
    """No example policy where :func:`example_policy` looks: names the folders and the fix (shown in logs)."""


class ReplyWithheld(RuntimeError):
    """The node could not write a reply's audit entry, so no reply leaves (the node's log has the cause).

    Its message names no node path: it is what Flower sends the coordinator for an error that
    escapes a ClientApp.
    """


class MetricsNotWhitelisted(RuntimeError):
    """A bug: a reply's metrics hold a key outside its whitelist (the message names the keys, never values)."""


#: Environment: when "1" (``fl-client`` sets it), each message's own compute time is logged
#: ("cityfed: train compute 1.734 s"): the numerator of the deployment latency breakdown.
LOG_COMPUTE_ENV = "CITYFED_LOG_COMPUTE"


@contextmanager
def _compute_timer(kind: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if os.environ.get(LOG_COMPUTE_ENV) == "1":
            from flower_compat.logging import log

            log(20, "cityfed: %s compute %.3f s", kind, time.perf_counter() - t0)


def build_client_app(defaults: dict | None = None) -> ClientApp:
    """The department ClientApp.

    Parameters
    ----------
    defaults : dict, optional
        Run-config defaults baked in (``fl-sim``: its ServerApp and ClientApp objects carry the
        whole run config, policy and ledger folder included). Deployment uses the module-level
        :data:`app`, configured by the node config (``fl-client``) and the run config; under
        ``flwr run .`` the module-level app's simulated nodes get :func:`flwr_run_node_defaults`.
    """
    defaults = dict(defaults or {})
    # SecAgg+ (run config secagg=true) under the node's own policy on it, and the node's central-DP update
    # clipping (central-dp=true) only when asked
    # outermost: no error escapes to Flower, which would send its message to the coordinator
    capp = ClientApp(mods=[failure_guard_mod(lambda c: spec(c)), secure_aggregation_mod(lambda c: spec(c)),
                           central_clipping_mod(lambda c: spec(c))])

    def spec(context: Context):
        run_config = {**defaults, **dict(context.run_config)}
        node_config = dict(context.node_config)
        return node_from_config(node_config, {**flwr_run_node_defaults(node_config, run_config), **run_config})

    def guarded(msg: Message, context: Context, handle) -> Message:
        # the node's set-up (its policy, config) failing: a fixed reason leaves, the cause is logged here
        try:
            node = spec(context)
        except Exception as exc:  # noqa: BLE001
            _log_failure(_kind(msg), exc)
            return Message(Error(code=FAILED, reason=failed_reason(_kind(msg), exc)), reply_to=msg)
        return handle(node)

    @capp.train()
    def _train(msg: Message, context: Context) -> Message:
        if is_secagg_fit(msg):  # SecAgg+ collect stage: same train(), the update goes out masked
            # ... only inside the SecAgg+ mod: the collect layout without the protocol is a plain update
            return guarded(msg, context, lambda node: (None if masking_active() else unmasked_refusal(msg, node))
                           or secagg_train(msg, node, context, lambda m, n: train(m, n, audit=False),
                                           audit=lambda **f: node.audit("reply", **f)))
        if masking_active():  # inside SecAgg+'s collect stage only the FitIns layout is masked: this one would
            # train, then fail to mask (the masked reply never leaves): refused before training
            return guarded(msg, context, lambda node: plain_in_collect_refusal(msg, node))
        return guarded(msg, context, lambda node: unmasked_refusal(msg, node) or train(msg, node))

    @capp.train(PERSONALISE_ACTION)
    def _personalise(msg: Message, context: Context) -> Message:
        return guarded(msg, context, lambda node: personalise(msg, node))

    @capp.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return guarded(msg, context, lambda node: evaluate(msg, node))

    return capp


def example_policy(department: str) -> Path:
    """The example policy of ``department`` (``examples/policies/<department>.toml`` of the project).

    Looked up next to this module (a cityfed clone: ``fl-sim``), else next to the installed
    ``simulations`` package: under ``flwr run .`` this module runs from the app bundle Flower
    installed into ``$FLWR_HOME/apps/`` (only ``.py`` files travel in it, see
    :mod:`clients.pinning`), while ``simulations`` never travels and resolves to the clone that
    ``make install`` (``pip install -e .``) installed.

    Raises
    ------
    ExamplePolicyNotFound
        A ``FileNotFoundError`` naming the places looked in and the fix.
    """
    import importlib.util

    roots = [Path(__file__).resolve().parents[1]]
    spec = importlib.util.find_spec("simulations")
    if spec is not None and spec.origin:
        roots.append(Path(spec.origin).resolve().parents[1])
    for root in roots:
        path = root / "examples" / "policies" / f"{department}.toml"
        if path.is_file():
            return path
    raise ExamplePolicyNotFound(
        f"no example policy for department {department!r} in {', '.join(str(r / 'examples' / 'policies') for r in roots)}. "
        "Fix: run flwr run from a cityfed clone installed with `make install` (pip install -e .)")


def flwr_run_node_defaults(node_config: dict, run_config: dict) -> dict:
    """Node-side keys for a node that ``flwr run .`` simulates: the example policy, ledgers in run-dir.

    ``flwr run .`` runs the module-level apps with the app's run config only
    (``[tool.flwr.app.config]``), which names no policy or ledger: those are a node's own keys.
    A simulated node (Flower's node config has ``partition-id``, no ``department``) then applies
    its department's example policy (:func:`example_policy`) and keeps its ledger under
    ``<run-dir>/ledgers/``, as ``fl-sim run`` does. Nothing is added for a department node
    (``fl-client`` names its department in the node config) nor when the run config already
    names a policy (``fl-sim``).

    Parameters
    ----------
    node_config : dict
        Flower's node config of this node.
    run_config : dict
        The run config the node received (defaults included).

    Returns
    -------
    dict
        ``{"policy": ..., "ledger-dir": ...}`` or ``{}``.

    Raises
    ------
    NodeSetupError
        A ``ValueError``: the number of simulated nodes (``num-partitions``) is not the department's
        number of sites (one node per site); it names the ``flwr run`` option that sets it, and the
        node's log shows it. Or the run-dir's ledger folder accounts for other nodes (virtual
        sites: :mod:`privacy.ledger_partition`); it names the folder and the fix.
    """
    if "department" in node_config or "partition-id" not in node_config or run_config.get("policy"):
        return {}
    from citydata import load_department

    department = str(run_config["department"])
    sites = load_department(department, str(run_config.get("data") or "") or None).sites
    nodes = int(node_config.get("num-partitions", 0))
    if nodes != len(sites):
        raise NodeSetupError(
            f"flwr run: {nodes} simulated node(s) for department {department!r}, which has {len(sites)} site(s) "
            f"({', '.join(sites)}): one node per site. Fix: flwr run . --federation-config "
            f"'num-supernodes={len(sites)}' --run-config 'department=\"{department}\"'")
    ledger_dir = Path(str(run_config.get("run-dir") or "runs/latest")) / "ledgers"
    # the folder's ledgers must account for these nodes (the department's sites), as fl-sim checks: a folder
    # of virtual sites' ledgers holds releases of the same records that these nodes' fresh ledgers never saw
    from privacy.ledger_partition import LedgerPartitionError, check_partition, record_partition

    node_cfg = {"data": run_config.get("data") or ""}
    try:
        check_partition(ledger_dir, department, node_cfg)
    except LedgerPartitionError as exc:
        raise NodeSetupError(f"flwr run: {exc.what}; fix: pass another run-dir (flwr run . --run-config "
                             "'run-dir=\"runs/NEW\"')") from None
    record_partition(ledger_dir, department, node_cfg)
    return {"policy": str(example_policy(department)), "ledger-dir": str(ledger_dir)}


def whitelisted(metrics: dict, allowed: tuple[str, ...]) -> MetricRecord:
    """``metrics`` as a ``MetricRecord``; any key outside ``allowed`` is a bug, never sent."""
    extra = sorted(set(metrics) - set(allowed))
    if extra:
        raise MetricsNotWhitelisted(f"refusing to send non-whitelisted metric(s) {extra}")
    return MetricRecord(metrics)


def failed_reason(kind: str, exc: BaseException, spec=None) -> str:
    """What the coordinator is told about a task that failed with ``exc``: never the error's message.

    A message may quote the node's records (a data file's bad cell and its row, a library's
    conversion error), its file paths or its configuration; only the node, the task and the
    error's type leave. The node's own log has the cause (:func:`_log_failure`).

    Parameters
    ----------
    kind : str
        The message type ("train", "evaluate", "train.personalise").
    exc : BaseException
        What the task raised.
    spec : clients.node.NodeSpec, optional
        The node (names its department and site); None when the node could not be set up.

    Returns
    -------
    str
    """
    who = f"{spec.department}/{spec.site}: " if spec is not None else ""
    return (f"{who}the node could not complete this {kind} task ({type(exc).__name__}); the node's operator "
            "finds the cause in the node's log")


def failure_guard_mod(spec_of):
    """ClientApp mod (the outermost): an error no handler or mod answered leaves as a fixed reason.

    Flower answers an exception that escapes a ClientApp with its type and message, and a message
    may quote the node's records. This mod answers it like the task handlers do: code
    :data:`FAILED`, :func:`failed_reason`'s text (the node, the task and the error's type), the
    cause in the node's own log, and the reply in its audit log. Python exceptions that
    are not errors (``KeyboardInterrupt``, ``SystemExit``) pass.

    Parameters
    ----------
    spec_of : callable
        ``spec_of(context) -> clients.node.NodeSpec`` (the node, for the reason and the audit log);
        if it fails too, the reason names no node and no audit entry can be written.

    Returns
    -------
    callable
        The mod ``(msg, context, call_next) -> Message``.
    """
    def mod(msg: Message, context: Context, call_next) -> Message:
        try:
            return call_next(msg, context)
        except Exception as exc:  # noqa: BLE001 - the point: only a fixed reason leaves
            kind = _kind(msg)
            _log_failure(kind, exc)
            try:
                node = spec_of(context)
            except Exception:  # noqa: BLE001 - the node's set-up failed: answered without naming it
                node = None
            error = Error(code=FAILED, reason=failed_reason(kind, exc, node))
            if node is not None:
                try:
                    audit_reply(node, msg, None, error)
                except Exception as audit_exc:  # noqa: BLE001 - no reply without its audit entry
                    _log_failure(kind, audit_exc)  # the cause (the audit log's path) stays in the node's log
                    raise ReplyWithheld(f"{kind}: the node could not write its audit log, so no reply is sent "
                                        "(the node's log has the cause)") from None
            return Message(error, reply_to=msg)

    return mod


def _log_failure(kind: str, exc: BaseException) -> None:
    """The node's own log: the cause (:func:`privacy.safe_cli.describe`), the traceback with ``CITYFED_DEBUG=1``."""
    from flower_compat.logging import log
    from privacy.safe_cli import DEBUG_ENV, describe

    log(40, "cityfed: %s task failed: %s", kind, describe(exc),
        exc_info=exc if os.environ.get(DEBUG_ENV) == "1" else None)


def _kind(msg: Message) -> str:
    return str(msg.metadata.message_type)


def _answer(msg: Message, spec, work, audit: bool = True) -> Message:
    """Run ``work()`` (it returns the reply's RecordDict) and answer ``msg``; a refusal becomes an Error reply.

    The policy's refusals (:class:`~clients.node.JobRefused`) and a node without training data
    (:class:`~clients.node.NoTrainingData`) are answered with their code and reason. Any other
    error is answered with :data:`FAILED` and :func:`failed_reason` (no message of the error
    leaves; the node's log has it). Every reply is recorded in the node's audit log, unless
    ``audit`` is False: the caller sends something else and records that (SecAgg+: the masked update).
    """
    try:
        content = work()
    except JobRefused as exc:
        error = Error(code=REFUSED, reason=str(exc))
    except NoTrainingData as exc:
        error = Error(code=NO_DATA, reason=str(exc))
    except Exception as exc:  # noqa: BLE001: the cause stays on the node, a fixed reason leaves
        _log_failure(_kind(msg), exc)
        error = Error(code=FAILED, reason=failed_reason(_kind(msg), exc, spec))
    else:
        if audit:
            audit_reply(spec, msg, content)
        return Message(content, reply_to=msg)
    if audit:
        audit_reply(spec, msg, None, error)
    return Message(error, reply_to=msg)


def train(msg: Message, spec, audit: bool = True) -> Message:
    """Local DP-SGD on the node's own data, under its own policy and ledger.

    ``audit=False``: the reply is not what leaves (SecAgg+ masks it; :func:`clients.secagg.secagg_train`
    records the reply it sends).
    """

    def work() -> RecordDict:
        with _compute_timer("train"), EnergyMeter() as energy:
            new_state, metrics = handle_train(msg.content[ARRAYS].to_torch_state_dict(), dict(msg.content[CONFIG]),
                                              spec)
        return RecordDict({ARRAYS: ArrayRecord(new_state),
                           METRICS: whitelisted({**metrics, **energy.metrics(spec.policy.releases.energy)}, TRAIN_METRICS)})

    return _answer(msg, spec, work, audit=audit)


def personalise(msg: Message, spec) -> Message:
    """Fine-tune the run's final model on the node's records, keep it on the node; reply with no arrays.

    The node's policy decides (``personalisation``); the release is accounted in its ledger
    (:mod:`clients.personalise`). The reply carries only :data:`contract.tasks.PERSONALISE_METRICS`.
    """
    from clients.personalise import handle_personalise

    def work() -> RecordDict:
        with _compute_timer("personalise"):
            metrics = handle_personalise(msg.content[ARRAYS].to_torch_state_dict(), dict(msg.content[CONFIG]), spec)
        return RecordDict({METRICS: whitelisted(metrics, PERSONALISE_METRICS)})

    return _answer(msg, spec, work)


def evaluate(msg: Message, spec) -> Message:
    """The node's policy decides: refuse, or DP-noised metrics of the model on its test split."""

    def work() -> RecordDict:
        with _compute_timer("evaluate"), EnergyMeter() as energy:
            metrics = handle_evaluate(msg.content[ARRAYS].to_torch_state_dict(), dict(msg.content[CONFIG]), spec)
        return RecordDict({METRICS: whitelisted({**metrics, **energy.metrics(spec.policy.releases.energy)}, EVAL_METRICS)})

    return _answer(msg, spec, work)


#: The ClientApp for deployment (``flwr`` app entry point ``clients.app:app``).
app = build_client_app()
