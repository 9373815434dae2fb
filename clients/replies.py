"""The node's audit record of each reply it sends (what left, or the error it answered with).

Every reply of the ClientApp is recorded here, whichever part of the node answers: the task
handlers (:mod:`clients.app`), the SecAgg+ mod (:mod:`clients.secagg`: its refusals and protocol
aborts; the masked update is recorded by :func:`clients.secagg.secagg_train`, written only once the
mod has masked it and returns it) and the central-DP clipping mod (:mod:`clients.clipping`). An
audit of what left that missed error replies would not show everything the coordinator was told.
"""

from __future__ import annotations

from flwr.app import Error, Message, RecordDict

from contract.tasks import ARRAYS, CONFIG, METRICS, REFUSED  # noqa: F401 - REFUSED: the contract's code



def is_train(msg: Message) -> bool:
    """Whether ``msg`` goes to the ClientApp's default train handler: type ``train`` or ``train.default``.

    Flower routes both to the handler registered with ``@app.train()``; a check of what leaves
    that looked for ``train`` alone was skipped by a coordinator that sent ``train.default``.
    (``train.personalise`` goes to its own handler, whose reply carries no arrays.)
    """
    return str(msg.metadata.message_type) in ("train", "train.default")


def audit_reply(spec, msg: Message, content: RecordDict | None = None, error: Error | None = None, **extra) -> None:
    """Append a ``reply`` entry to the node's audit log (nothing when it keeps none).

    Parameters
    ----------
    spec : clients.node.NodeSpec
        The node (its :meth:`~clients.node.NodeSpec.audit`).
    msg : Message
        The message answered: its job config gives the run and round; a SecAgg+ stage message,
        which carries no job config, gives its round (Flower's group ID). Every entry also
        names the message's Flower run ID (``flower-run``), which the stage messages carry too.
    content : RecordDict, optional
        The reply's content: array names, shapes and bytes and the metric keys are recorded.
    error : Error, optional
        The error replied instead: its code and reason are recorded.
    **extra
        More fields (e.g. the SecAgg+ ``stage``).
    """
    cfg = dict(msg.content[CONFIG]) if CONFIG in msg.content.config_records else {}
    group = str(msg.metadata.group_id or "")
    rnd = cfg.get("server-round", int(group) if group.isdigit() else 0)
    fields = {"run": str(cfg.get("run-id", "")), "flower-run": str(msg.metadata.run_id), "round": int(rnd),
              "message": str(msg.metadata.message_type), **extra}
    if error is not None:
        fields.update(error_code=int(error.code), reason=str(error.reason))
    elif content is not None:
        arrays = content[ARRAYS] if ARRAYS in content.array_records else {}
        fields["arrays"] = [{"name": k, "shape": list(a.shape), "bytes": len(a.data)} for k, a in arrays.items()]
        fields["metrics"] = sorted(content[METRICS].keys()) if METRICS in content.metric_records else []
    spec.audit("reply", **fields)
