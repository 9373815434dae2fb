"""Client side of secure aggregation (Flower's SecAgg+) for the department ClientApp.

Two pieces, both used by :func:`clients.app.build_client_app`, so one ClientApp serves
plain and SecAgg+ runs:

* :func:`secure_aggregation_mod` applies the node's own policy on secure aggregation
  (``require_secure_aggregation``, ``min_secagg_num_shares``, ``min_secagg_threshold``), then
  :func:`conditional_secaggplus_mod` runs Flower's ``secaggplus_mod`` only on train
  messages that carry its ``secaggplus_configs`` record (the bare mod raises ``KeyError``
  on every plain train message). The mod masks the node's reply, so the coordinator
  only ever receives masked, quantised vectors.
* :func:`secagg_train` answers the protocol's "collect masked vectors" stage: the legacy
  ``FitIns`` it receives is turned into a plain train message and handled by the *same*
  :func:`clients.app.train` (policy check, ledger, DP-SGD: nothing duplicated); the reply
  is the node's **update** (new - global) as a legacy ``FitRes``, bounded on the node
  because the server can no longer check it: L2 norm at most ``max-update-norm`` and
  every coordinate inside the range SecAgg+ quantises (uniform scaling, which keeps the
  update's direction, instead of the mod's silent per-coordinate clipping).

A refusal (policy, budget, no data) inside the protocol becomes the node's error reply:
the node drops out of the round and SecAgg+ removes its masks from the others' sum as
long as enough neighbours remain (``secagg-threshold``). So does a protocol abort (a stage
out of order, too few neighbours, a request for key shares this node does not hold): one
warning line in the node's log and an error reply with code :data:`SECAGG_ABORTED` whose
reason names the stage and what was wrong, never a bare ``KeyError`` or a traceback.

The node's records of the masked update (its audit-log entry, and under central DP its participation
row and entry) are written only once ``secaggplus_mod`` has masked the update and the reply is about to
leave: an abort after training leaves the abort entry alone. The DP-SGD release of that training stays
committed in the node's ledger (:func:`clients.node.handle_train` commits it when training ends).
"""

from __future__ import annotations

import logging
import math
from contextvars import ContextVar
from typing import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from flower_compat.dp import KEY_CLIPPING_NORM
from flower_compat.secagg import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flower_compat.secagg import recorddict_compat as compat

from clients.replies import REFUSED, audit_reply, is_train
from contract.keys import MAX_UPDATE_NORM, PARAM_NAMES_KEY, SECAGG_MIN_NEIGHBOURS, SECAGG_MOD_RANGE
from privacy.policy import secagg_conflict
from privacy.policy import shown_value as shown

log = logging.getLogger("cityfed.node")

#: Error code for an update the node will not send (not finite).
INVALID_UPDATE = 4221
#: Error code for a SecAgg+ protocol abort on this node (it leaves the round; nothing of its update was sent).
SECAGG_ABORTED = 4222


#: Set by :func:`conditional_secaggplus_mod` while ``secaggplus_mod`` runs: the records of the masked update
#: (:func:`_when_sent`) wait here and are written only when the masked reply is returned.
_UNTIL_SENT: ContextVar[list[Callable[[], None]] | None] = ContextVar("cityfed_secagg_until_sent", default=None)


def masking_active() -> bool:
    """Whether the caller runs inside Flower's ``secaggplus_mod`` (via :func:`conditional_secaggplus_mod`).

    Only then is the update that :func:`secagg_train` returns masked before it leaves; a message in
    SecAgg+'s collect layout that reaches the handler any other way (no SecAgg+ configs record)
    would send the bounded update in the clear.
    """
    return _UNTIL_SENT.get() is not None


def _when_sent(write: Callable[[], None]) -> None:
    """Write a record of the update when it leaves: inside SecAgg+, once masked; elsewhere, now."""
    waiting = _UNTIL_SENT.get()
    if waiting is None:
        write()
    else:
        waiting.append(write)


class _NoUpdate(Exception):
    """The train handler answered with an error inside the SecAgg+ protocol."""

    def __init__(self, error: Error):
        super().__init__(error.reason)
        self.error = error


class _HandlerFailed(Exception):
    """The train handler itself raised (a bug or a failure of training, not of the protocol)."""

    def __init__(self, exc: BaseException):
        super().__init__(repr(exc))
        self.exc = exc


def abort_reason(stage: str, exc: Exception) -> str:
    """Why ``secaggplus_mod`` aborted at ``stage``, in words (its exceptions name node IDs and stages only).

    Parameters
    ----------
    stage : str
        The stage the coordinator asked for (``setup``, ``share_keys``,
        ``collect_masked_vectors``, ``unmask``).
    exc : Exception
        What Flower's mod raised.
    """
    if isinstance(exc, KeyError):
        key = exc.args[0] if exc.args else "?"
        if isinstance(key, int):
            what = (f"the coordinator asked for key shares or keys of node {key}, which this node never received "
                    "(that node left before sharing its keys, or this node restarted during the round)")
        else:
            what = f"the coordinator's {stage} message lacks {key!r}"
    else:
        what = str(exc) or type(exc).__name__
    return f"SecAgg+ aborted on this node in the {stage} stage: {what}; this node leaves the round (no update sent)"


def secure_aggregation_mod(spec_of: Callable[[Context], object]):
    """ClientApp mod: the node's policy on secure aggregation, then SecAgg+ on SecAgg+ train messages.

    The node's policy (:func:`privacy.policy.secagg_conflict`) decides, not the coordinator:

    * ``require_secure_aggregation = true``: a plain train message is refused (:data:`REFUSED`)
      before the handler runs, so nothing is trained or ledgered;
    * ``min_secagg_num_shares`` / ``min_secagg_threshold``: SecAgg+'s setup stage asking for
      fewer is refused before the node makes its keys, and the node leaves the round.

    Each refusal and each protocol abort is recorded in the node's audit log
    (:func:`clients.replies.audit_reply`).

    Parameters
    ----------
    spec_of : callable
        ``spec_of(context) -> clients.node.NodeSpec`` (the node's policy and audit log).

    Returns
    -------
    callable
        The mod (:func:`conditional_secaggplus_mod` with the node's policy and audit log).
    """

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        return conditional_secaggplus_mod(msg, ctxt, call_next, spec_of=spec_of)

    return mod


def _node(spec_of, ctxt: Context):
    """The node's spec, or None where it cannot be set up (the handler then answers with that failure)."""
    if spec_of is None:
        return None
    try:
        return spec_of(ctxt)
    except Exception:  # noqa: BLE001 - clients.app.guarded reports it, with a fixed reason
        return None


def _refuse(msg: Message, node, setting: str, reason: str, stage: str | None = None) -> Message:
    where = f" at SecAgg+'s {stage} stage" if stage else ""
    fix = ("the coordinator runs it with SecAgg+ (secagg = true)" if setting == "require_secure_aggregation"
           else f"the coordinator raises it, or this node's operator lowers {setting} in the node's policy")
    error = Error(code=REFUSED, reason=f"{node.department}/{node.site}: refused{where}: {reason}; this node "
                  f"leaves the round (no update sent). Fix: {fix}")
    log.warning("%s", error.reason)
    audit_reply(node, msg, error=error, **({"stage": stage} if stage else {}))
    return Message(error, reply_to=msg)


def plain_in_collect_refusal(msg: Message, node) -> Message:
    """The node's answer to a plain-layout train message inside SecAgg+'s collect stage (audited).

    Only the collect layout (a legacy ``FitIns``, :func:`secagg_train`) is masked by Flower's mod;
    a plain message there would be trained, recorded as a reply and then fail to mask. It is
    refused before training.
    """
    error = Error(code=SECAGG_ABORTED, reason=(
        f"SecAgg+ aborted on this node in the {Stage.COLLECT_MASKED_VECTORS} stage: the train message is not in "
        "the protocol's collect layout (fitins), so its update could not be masked; nothing was trained; this "
        "node leaves the round"))
    log.warning("%s", error.reason)
    audit_reply(node, msg, error=error, stage=Stage.COLLECT_MASKED_VECTORS)
    return Message(error, reply_to=msg)


def unmasked_refusal(msg: Message, node) -> Message | None:
    """The node's refusal of a train message whose update would leave unmasked, or None if its policy allows it.

    :func:`secure_aggregation_mod` applies it before the handler; the train handler applies it
    again to every plain train message it gets, so no routing of a message around the mod
    (another message type, another mod order) sends an unmasked update against the policy.

    Parameters
    ----------
    msg : Message
        A plain (not SecAgg+) train message.
    node : clients.node.NodeSpec

    Returns
    -------
    Message or None
        The refusal (code :data:`clients.replies.REFUSED`, audited) under ``require_secure_aggregation``.
    """
    conflict = secagg_conflict(node.policy, secagg=False)
    return _refuse(msg, node, *conflict) if conflict else None


def conditional_secaggplus_mod(msg: Message, ctxt: Context, call_next, spec_of=None) -> Message:
    """ClientApp mod: apply ``secaggplus_mod`` only to SecAgg+ train messages.

    When the train handler refuses inside the protocol (an error reply), the node replies
    with that error and leaves the round; its protocol state is reset so that the next
    round starts cleanly.

    In the collect stage the handler's records of the masked update (:func:`secagg_train`) are
    written only after ``secaggplus_mod`` has masked it, just before the masked reply is returned.
    When the stage ends otherwise (the handler's error reply, the handler raising, a protocol
    abort) they are dropped: the audit log holds only the reply that left.

    Parameters
    ----------
    msg : Message
    ctxt : Context
        The node's context (``secaggplus_mod`` keeps its state in ``ctxt.state``).
    call_next : callable
        The next mod or the handler.
    spec_of : callable, optional
        ``spec_of(context) -> NodeSpec``: the node's policy on secure aggregation is applied and
        refusals and aborts are audited (:func:`secure_aggregation_mod`); None: neither.
    """
    if not is_train(msg):
        return call_next(msg, ctxt)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:  # a plain train message: the update leaves unmasked
        node = _node(spec_of, ctxt)
        refusal = unmasked_refusal(msg, node) if node is not None else None
        return refusal or call_next(msg, ctxt)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = str(configs.get(Key.STAGE, "?"))  # the mod pops it
    node = _node(spec_of, ctxt)

    def abort(what: str) -> Message:
        ctxt.state.config_records.pop(RECORD_KEY_STATE, None)
        named = stage if stage in (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK) \
            else shown(stage)
        reason = f"SecAgg+ aborted on this node in the {named} stage: {what}; this node leaves the round"
        log.warning("%s (round %s)", reason, msg.metadata.group_id or "?")
        error = Error(code=SECAGG_ABORTED, reason=reason)
        if node is not None:
            audit_reply(node, msg, error=error, stage=stage)
        return Message(error, reply_to=msg)

    if str(msg.metadata.message_type) != "train":  # Flower's mod masks type "train" only: another type
        # (train.default, routed to the same handler) would pass through it and leave unmasked
        return abort(f"a SecAgg+ message of type {shown(str(msg.metadata.message_type))}; the protocol runs "
                     "on type 'train' only, which Flower's mod masks")
    if stage == Stage.SETUP:
        if node is not None:
            shares, threshold = configs.get(Key.SHARE_NUMBER), configs.get(Key.THRESHOLD)
            conflict = secagg_conflict(node.policy, secagg=True,
                                       num_shares=int(shares) if isinstance(shares, int) else None,
                                       threshold=int(threshold) if isinstance(threshold, int) else None)
            if conflict:
                ctxt.state.config_records.pop(RECORD_KEY_STATE, None)
                return _refuse(msg, node, *conflict, stage=stage)
        weak = setup_conflict(configs)
        if weak:
            return abort(weak)
    elif stage == Stage.SHARE_KEYS:
        few = share_keys_conflict(configs, msg.metadata.dst_node_id,
                                  node.policy.min_secagg_num_shares if node is not None else None)
        if few:
            return abort(few)
    elif stage == Stage.UNMASK:
        overlap = unmask_conflict(configs.get(Key.ACTIVE_NODE_ID_LIST, []), configs.get(Key.DEAD_NODE_ID_LIST, []))
        if overlap:
            return abort(overlap)

    def handler(m: Message, c: Context) -> Message:
        try:
            reply = call_next(m, c)
        except Exception as exc:  # noqa: BLE001 - re-raised unchanged below
            raise _HandlerFailed(exc) from exc
        if reply.has_error():
            raise _NoUpdate(reply.error)
        return reply

    waiting: list[Callable[[], None]] = []  # collect: the masked update's records, written once it is masked
    token = _UNTIL_SENT.set(waiting)
    try:
        reply = secaggplus_mod(msg, ctxt, handler)
    except _NoUpdate as exc:
        ctxt.state.config_records.pop(RECORD_KEY_STATE, None)
        return Message(exc.error, reply_to=msg)
    except _HandlerFailed as exc:  # training failed: the ClientApp's own error handling reports it
        ctxt.state.config_records.pop(RECORD_KEY_STATE, None)
        raise exc.exc from None
    except (KeyError, ValueError, TypeError, IndexError) as exc:  # the protocol, not this node, went wrong
        ctxt.state.config_records.pop(RECORD_KEY_STATE, None)
        reason = abort_reason(stage, exc)
        log.warning("%s (round %s)", reason, msg.metadata.group_id or "?")
        error = Error(code=SECAGG_ABORTED, reason=reason)
        if node is not None:
            audit_reply(node, msg, error=error, stage=stage)
        return Message(error, reply_to=msg)
    finally:
        _UNTIL_SENT.reset(token)
    if stage == Stage.COLLECT_MASKED_VECTORS and not _only_masked(reply):  # defence in depth: nothing else leaves
        waiting.clear()
        return abort("the collect stage's reply holds something other than masked vectors (not sent)")
    try:
        for write in waiting:  # the masked update leaves: its records first (a failed write stops the reply)
            write()
    except BaseException:
        ctxt.state.config_records.pop(RECORD_KEY_STATE, None)
        raise
    if node is not None and stage != Stage.COLLECT_MASKED_VECTORS:  # collect: secagg_train recorded the masked update
        audit_reply(node, msg, stage=stage, **_stage_sent(stage, configs, reply))
    return reply


def _number(value) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def setup_conflict(configs) -> str | None:
    """Why the setup stage's quantisation settings must be refused, or None (the node's own constants).

    The coordinator chooses them and Flower's ``secaggplus_mod`` (1.42) checks only their types:

    * ``mod_range`` must be :data:`contract.keys.SECAGG_MOD_RANGE` (2**32): masks are drawn below
      it, so a modulus of 2 makes every mask 0 and the "masked" vector is the quantised update;
    * ``target_range`` (the quantisation levels) an integer in (0, mod_range);
    * ``clipping_range`` and ``max_weight`` finite and > 0.

    Parameters
    ----------
    configs : mapping
        The setup stage's ``secaggplus_configs`` record.
    """
    mod = configs.get(Key.MOD_RANGE)
    if isinstance(mod, bool) or mod != SECAGG_MOD_RANGE:
        return (f"{Key.MOD_RANGE} {shown(mod)} is not {SECAGG_MOD_RANGE} (2**32), the only modulus this node "
                "masks with (a smaller one gives weaker masks: with 2 every mask is 0)")
    target = configs.get(Key.TARGET_RANGE)
    if isinstance(target, bool) or not isinstance(target, int) or not 0 < target < SECAGG_MOD_RANGE:
        return f"{Key.TARGET_RANGE} {shown(target)} is not an integer in (0, 2**32)"
    for key in (Key.CLIPPING_RANGE, Key.MAX_WEIGHT):
        value = _number(configs.get(key))
        if value is None or not math.isfinite(value) or value <= 0:
            return f"{key} {shown(configs.get(key))} is not a finite number > 0"
    return None


def share_keys_conflict(configs, own_id: int, min_shares: int | None) -> str | None:
    """Why the share-keys stage's neighbourhood is too small to mask with, or None.

    The setup stage only *claims* ``secagg-num-shares``; the share-keys stage names the nodes
    this node actually masks with (its pairwise masks). Flower's mod accepts as few as the
    threshold, itself included: one neighbour at the default threshold 2. Refused below
    ``max(SECAGG_MIN_NEIGHBOURS, min_secagg_num_shares - 1)`` neighbours (the policy's
    "masks with that many - 1 neighbours").

    Parameters
    ----------
    configs : mapping
        The share-keys stage's ``secaggplus_configs`` record (node ID -> public keys, and the stage).
    own_id : int
        This node's ID.
    min_shares : int or None
        The node policy's ``min_secagg_num_shares`` (None: no policy known).
    """
    ids = set()
    for key in configs:
        if key != Key.STAGE:
            try:
                ids.add(int(key))  # as Flower's mod reads them: "01" and "1" are one node
            except (TypeError, ValueError):
                continue  # Flower's mod refuses the stage itself
    others = ids - {int(own_id)}
    need = max(SECAGG_MIN_NEIGHBOURS, (min_shares or 0) - 1)
    if len(others) < need:
        return (f"the coordinator named {len(others)} neighbour(s) to mask with, fewer than {need} "
                f"(max({SECAGG_MIN_NEIGHBOURS}, policy min_secagg_num_shares {min_shares} - 1)); with too few "
                "neighbours the masks could be removed")
    return None


def _only_masked(reply: Message) -> bool:
    """Whether a collect-stage reply carries masked vectors and no array record (nothing in the clear)."""
    if reply.has_error():
        return True  # an error reply carries no update
    content = reply.content
    if any(len(rec) for rec in content.array_records.values()):
        return False
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    return configs is not None and Key.MASKED_PARAMETERS in configs


def unmask_conflict(active, dead) -> str | None:
    """Why an unmask request must not be answered, or None.

    For each neighbour the node reveals one secret share: of its private mask seed when the
    coordinator says the neighbour's masked vector arrived (active), of its mask key when it says
    the neighbour dropped out (dead). A node named in both lists (or twice) would have both
    revealed, and with enough neighbours' answers the coordinator could remove every mask from
    that neighbour's vector: its individual update. Flower's ``secaggplus_mod`` (1.42) does not
    check this; SecAgg+ still assumes a coordinator that follows the protocol otherwise
    (README's trust table).
    """
    active, dead = [int(n) for n in active or []], [int(n) for n in dead or []]
    both = sorted(set(active) & set(dead))
    twice = sorted({n for n in active + dead if (active + dead).count(n) > 1} - set(both))
    if both:
        return (f"the coordinator named node(s) {', '.join(map(str, both))} both active and dropped out: answering "
                "would reveal both secrets that hide their update; refused")
    if twice:
        return f"the coordinator named node(s) {', '.join(map(str, twice))} more than once; refused"
    return None


def _stage_sent(stage: str, configs, reply: Message) -> dict:
    """What a SecAgg+ stage reply sent, for the node's audit log (never a key or share itself)."""
    sent = sorted(reply.content.config_records[RECORD_KEY_CONFIGS].keys()) \
        if RECORD_KEY_CONFIGS in reply.content.config_records else []
    fields: dict = {"sent": sent}
    if stage == Stage.UNMASK:  # whose secrets it revealed shares of, and which secret
        fields.update(mask_seed_shares_of=[int(n) for n in configs.get(Key.ACTIVE_NODE_ID_LIST, [])],
                      mask_key_shares_of=[int(n) for n in configs.get(Key.DEAD_NODE_ID_LIST, [])])
    return fields


def is_secagg_fit(msg: Message) -> bool:
    """Whether ``msg`` is SecAgg+'s train instruction (legacy ``FitIns`` layout)."""
    return "fitins.parameters" in msg.content.array_records


def bound_update(update: list[np.ndarray], max_norm: float, coord_bound: float) -> tuple[list[np.ndarray], float]:
    """Scale ``update`` so its L2 norm is <= ``max_norm`` and every coordinate within ``coord_bound``.

    Returns
    -------
    (update, scale)
        The (possibly) scaled update and the factor applied (1.0 = unchanged).
    """
    norm = math.sqrt(sum(float((u.astype(np.float64) ** 2).sum()) for u in update))
    scale = 1.0 if norm <= max_norm else max_norm / norm
    peak = max((float(np.abs(u).max()) for u in update if u.size), default=0.0) * scale
    if peak > coord_bound:
        scale *= coord_bound / peak
    return ([u * scale for u in update] if scale < 1.0 else update), scale


def secagg_train(msg: Message, spec, context: Context, train: Callable[[Message, object], Message],
                 audit: Callable[..., None] | None = None) -> Message:
    """Train handler for SecAgg+'s collect stage: legacy ``FitIns`` in, update as ``FitRes`` out.

    Parameters
    ----------
    msg : Message
        Carries ``fitins.parameters`` (the global model) and ``fitins.config`` (the job,
        plus :data:`contract.keys.PARAM_NAMES_KEY`).
    spec : clients.node.NodeSpec
    context : Context
        The node's context; ``secaggplus_mod`` stored the round's ``clipping_range`` and
        ``max_weight`` in it at the setup stage.
    train : callable
        :func:`clients.app.train` (plain train message in, reply or refusal out; it does not audit).
    audit : callable, optional
        ``audit(**fields)`` records the reply that leaves in the node's audit log: the update's
        names and shapes and the metric keys, or the error's code and reason. An error is recorded
        at once (it leaves as it is). The update is masked by ``secaggplus_mod`` after this
        returns, and may never leave (the mod aborts): under :func:`conditional_secaggplus_mod` its
        entry, and under central DP the participation record
        (:func:`clients.clipping.record_participation`), are written only when the masked reply is
        returned; called outside the mod, they are written before this returns.

    Returns
    -------
    Message
        Legacy ``FitRes`` with the bounded update and the node's whitelisted metrics, or
        the refusal (an error reply).
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    masked = masking_active()  # outside the mod the bounded update leaves as it is: audited so
    cfg = dict(fitins.config)
    names = str(cfg.pop(PARAM_NAMES_KEY)).split("\n")

    def leave(reply: Message, **what) -> Message:
        if audit is not None:
            fields = {"run": str(cfg.get("run-id", "")), "round": int(cfg.get("server-round", 0) or 0),
                      "message": "train (SecAgg+ collect)"}
            if reply.has_error():
                fields.update(error_code=int(reply.error.code), reason=str(reply.error.reason))
                audit(**fields)
            else:
                fields.update(what)
                _when_sent(lambda: audit(**fields))
        return reply

    arrays = parameters_to_ndarrays(fitins.parameters)
    global_state = {n: torch.from_numpy(np.array(a, copy=True)) for n, a in zip(names, arrays, strict=True)}
    # same metadata as the received message: a node process has no task identity to create a new one
    plain = Message(content=RecordDict({"arrays": ArrayRecord(global_state), "config": ConfigRecord(cfg)}),
                    metadata=msg.metadata)
    reply = train(plain, spec)
    if reply.has_error():
        return leave(Message(reply.error, reply_to=msg))
    new_state = reply.content["arrays"].to_torch_state_dict()
    metrics = dict(reply.content["metrics"])
    update = [(new_state[n].double() - global_state[n].double()).numpy() for n in names]
    if not all(np.isfinite(u).all() for u in update):
        return leave(Message(Error(code=INVALID_UPDATE, reason=f"{spec.department}/{spec.site}: update not finite; "
                                   "not sent"), reply_to=msg))
    sa = context.state.config_records.get(RECORD_KEY_STATE, {})
    clip, max_weight = float(sa.get("clipping_range", 0.0)), float(sa.get("max_weight", 0.0))
    n = max(1, int(metrics["num-examples"]))
    max_norm = float(cfg.get(MAX_UPDATE_NORM, math.inf))
    central = None
    if KEY_CLIPPING_NORM in cfg:  # central DP: the node clips at its own norm, every node weighs the same
        from clients.clipping import ClippingRefused, applied_norm

        try:
            central = (float(cfg[KEY_CLIPPING_NORM]), applied_norm(cfg[KEY_CLIPPING_NORM], spec.policy))
        except ClippingRefused as exc:
            from clients.clipping import BAD_CLIPPING_NORM

            return leave(Message(Error(code=BAD_CLIPPING_NORM, reason=f"{spec.department}/{spec.site}: refused: {exc}"),
                                 reply_to=msg))
        max_norm = min(max_norm, central[1])
        n = int(max_weight) if max_weight >= 1 else 1
    # secaggplus_mod clips each coordinate of update * n / max_weight to +-clip: stay inside it
    coord_bound = clip * max_weight / n if clip > 0 and max_weight > 0 else math.inf
    update, scale = bound_update(update, max_norm, coord_bound)
    if scale < 1.0:
        log.log(logging.INFO if central else logging.WARNING,
                "%s/%s: update scaled by %.3g to fit max-update-norm%s / the SecAgg+ clipping range",
                spec.department, spec.site, scale, " / the central-DP clipping norm" if central else "")
    fitres = FitRes(status=Status(code=Code.OK, message="ok"), parameters=ndarrays_to_parameters(update),
                    num_examples=n if central else int(metrics["num-examples"]), metrics=metrics)
    if central:
        from clients.clipping import record_participation

        _when_sent(lambda: record_participation(spec, {**cfg, "server-round": cfg.get("server-round", 0)}, *central))
    return leave(Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg),
                 arrays=[{"name": k, "shape": list(u.shape), "masked": masked} for k, u in zip(names, update)],
                 metrics=sorted(metrics), update_scale=float(scale))
