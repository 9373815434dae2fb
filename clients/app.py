"""The department ClientApp: one app for simulation and deployment (Flower Message API).

Train messages carry the global model (``ArrayRecord`` "arrays") and the job
(``ConfigRecord`` "config"); replies carry the updated arrays and whitelisted metrics
(``MetricRecord`` "metrics"), or an error whose reason says why the node refused.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.energy import EnergyMeter
from clients.node import (EVAL_METRICS, TRAIN_METRICS, JobRefused, NoTrainingData, handle_evaluate, handle_train,
                          node_from_config)
from clients.clipping import central_clipping_mod
from clients.secagg import conditional_secaggplus_mod, is_secagg_fit, secagg_train

#: Error code for a job refused by the node's privacy policy or budget.
REFUSED = 4031
#: Error code for a node without training records (nothing to send).
NO_DATA = 4041
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
        Run-config defaults baked in (simulation: ``flwr.simulation.run_simulation`` gives
        nodes an empty run config). Deployment uses the module-level :data:`app`, configured
        by the node config (``fl-client``) and the run config.
    """
    defaults = dict(defaults or {})
    # SecAgg+ (run config secagg=true) and the node's central-DP update clipping (central-dp=true) only when asked
    capp = ClientApp(mods=[conditional_secaggplus_mod, central_clipping_mod(lambda c: spec(c))])

    def spec(context: Context):
        return node_from_config(dict(context.node_config), {**defaults, **dict(context.run_config)})

    @capp.train()
    def _train(msg: Message, context: Context) -> Message:
        if is_secagg_fit(msg):  # SecAgg+ collect stage: same train(), the update goes out masked
            return secagg_train(msg, spec(context), context, train)
        return train(msg, spec(context))

    @capp.train("personalise")
    def _personalise(msg: Message, context: Context) -> Message:
        return personalise(msg, spec(context))

    @capp.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, spec(context))

    return capp


def whitelisted(metrics: dict, allowed: tuple[str, ...]) -> MetricRecord:
    """``metrics`` as a ``MetricRecord``; any key outside ``allowed`` is a bug, never sent."""
    extra = sorted(set(metrics) - set(allowed))
    if extra:
        raise RuntimeError(f"refusing to send non-whitelisted metric(s) {extra}")
    return MetricRecord(metrics)


def _audit_reply(spec, msg: Message, content: RecordDict | None, error: Error | None = None) -> None:
    """Record in the node's audit log what leaves in a reply (names, shapes, bytes; metric keys)."""
    cfg = dict(msg.content["config"]) if "config" in msg.content else {}
    fields = {"run": str(cfg.get("run-id", "")), "round": int(cfg.get("server-round", 0)),
              "message": str(msg.metadata.message_type)}
    if error is not None:
        fields.update(error_code=int(error.code), reason=str(error.reason))
    else:
        arrays = content["arrays"] if "arrays" in content else {}
        fields["arrays"] = [{"name": k, "shape": list(a.shape), "bytes": len(a.data)} for k, a in arrays.items()]
        fields["metrics"] = sorted(content["metrics"].keys()) if "metrics" in content else []
    spec.audit("reply", **fields)


def _answer(msg: Message, spec, work) -> Message:
    """Run ``work()`` (it returns the reply's RecordDict) and answer ``msg``; a refusal becomes an Error reply.

    The policy's refusals (:class:`~clients.node.JobRefused`) and a node without training data
    (:class:`~clients.node.NoTrainingData`) are answered with their code and reason; either way
    the reply is recorded in the node's audit log.
    """
    try:
        content = work()
    except JobRefused as exc:
        error = Error(code=REFUSED, reason=str(exc))
    except NoTrainingData as exc:
        error = Error(code=NO_DATA, reason=str(exc))
    else:
        _audit_reply(spec, msg, content)
        return Message(content, reply_to=msg)
    _audit_reply(spec, msg, None, error)
    return Message(error, reply_to=msg)


def train(msg: Message, spec) -> Message:
    """Local DP-SGD on the node's own data, under its own policy and ledger."""

    def work() -> RecordDict:
        with _compute_timer("train"), EnergyMeter() as energy:
            new_state, metrics = handle_train(msg.content["arrays"].to_torch_state_dict(), dict(msg.content["config"]),
                                              spec)
        return RecordDict({"arrays": ArrayRecord(new_state),
                           "metrics": whitelisted({**metrics, **energy.metrics()}, TRAIN_METRICS)})

    return _answer(msg, spec, work)


def personalise(msg: Message, spec) -> Message:
    """Fine-tune the run's final model on the node's records, keep it on the node; reply with no arrays.

    The node's policy decides (``personalisation``); the release is accounted in its ledger
    (:mod:`clients.personalise`). The reply carries only :data:`PERSONALISE_METRICS`.
    """
    from clients.personalise import PERSONALISE_METRICS, handle_personalise

    def work() -> RecordDict:
        with _compute_timer("personalise"):
            metrics = handle_personalise(msg.content["arrays"].to_torch_state_dict(), dict(msg.content["config"]), spec)
        return RecordDict({"metrics": whitelisted(metrics, PERSONALISE_METRICS)})

    return _answer(msg, spec, work)


def evaluate(msg: Message, spec) -> Message:
    """The node's policy decides: refuse, or DP-noised metrics of the model on its test split."""

    def work() -> RecordDict:
        with _compute_timer("evaluate"), EnergyMeter() as energy:
            metrics = handle_evaluate(msg.content["arrays"].to_torch_state_dict(), dict(msg.content["config"]), spec)
        return RecordDict({"metrics": whitelisted({**metrics, **energy.metrics()}, EVAL_METRICS)})

    return _answer(msg, spec, work)


#: The ClientApp for deployment (``flwr`` app entry point ``clients.app:app``).
app = build_client_app()
