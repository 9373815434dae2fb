"""Node-side clipping of the model update for central-DP runs (run config ``central-dp = true``).

The coordinator's DP wrapper (:mod:`server.central_dp`, Flower's
``DifferentialPrivacyClientSideFixedClipping``) asks each node to clip its update to
``clipping_norm`` (Flower's config key). What leaves the node is decided here, by the node's code
and policy: the norm applied is ``min(asked, policy.central_max_clipping_norm)`` (the coordinator
may ask for less, never more; a missing, non-finite or non-positive norm is refused). The
clipping itself is Flower's ``fixedclipping_mod`` (plain train messages) or, under SecAgg+,
:func:`clients.secagg.secagg_train`'s bound on the update before masking.

After a successful reply the node records its participation in its ledger
(:meth:`privacy.ledger.PrivacyLedger.record_central`): the norm asked and applied and the
coordinator's *claimed* central epsilon/delta/noise. That row is a claim the node cannot check
(the coordinator adds the noise) and never counts toward the node's epsilon: the node's own
guarantee is its DP-SGD, which a central-DP run does not switch off (``require_dp`` still
refuses a job without it).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

from flwr.app import Context, Error, Message
from flwr.clientapp.mod import fixedclipping_mod

from flower_compat.dp import KEY_CLIPPING_NORM

from clients.replies import audit_reply, is_train
from clients.secagg import is_secagg_fit
from contract.keys import CENTRAL_CLAIM_KEYS

log = logging.getLogger("cityfed.node")

#: Error code for a central-DP train message whose clipping norm the node cannot use.
BAD_CLIPPING_NORM = 4032


class ClippingRefused(ValueError):
    """The coordinator's clipping norm is unusable (missing, not a number, not finite, not positive)."""


def is_central_dp(cfg) -> bool:
    """Whether a train config comes from a central-DP run (it names Flower's clipping-norm key)."""
    return KEY_CLIPPING_NORM in cfg


def applied_norm(asked, policy) -> float:
    """The update clipping norm this node applies: the coordinator's ``asked``, capped by its policy.

    Parameters
    ----------
    asked : float
        The coordinator's ``clipping_norm``.
    policy : privacy.policy.PrivacyPolicy
        ``central_max_clipping_norm`` (None: no cap of its own).

    Raises
    ------
    ClippingRefused
        ``asked`` missing, not a number, not finite or not positive.
    """
    if isinstance(asked, bool) or not isinstance(asked, (int, float)) or not math.isfinite(asked) or asked <= 0:
        raise ClippingRefused(f"central DP: the coordinator's clipping norm {asked!r} is not a positive finite number")
    cap = getattr(policy, "central_max_clipping_norm", None)
    return float(asked) if cap is None else min(float(asked), float(cap))


def record_participation(spec, cfg: dict, asked: float, applied: float) -> None:
    """Ledger row and audit entry: this node sent an update clipped to ``applied`` to a central-DP round.

    The coordinator's claimed central epsilon/delta are stored as claims (never composed into the
    node's epsilon). A failed write raises: the reply does not leave without its record.
    """
    from privacy.ledger import PrivacyLedger

    claimed = {k: cfg.get(v) for k, v in CENTRAL_CLAIM_KEYS.items()}  # set by server.central_dp
    run_id, rnd = str(cfg.get("run-id", "")), int(cfg.get("server-round", 0))
    PrivacyLedger(spec.ledger_path, accountant=spec.policy.accountant).record_central(
        site=spec.site, department=spec.department, run_id=run_id, round=rnd, clipping_norm_asked=float(asked),
        clipping_norm_applied=float(applied), claimed=claimed)
    spec.audit("central-dp", run=run_id, round=rnd, clipping_norm_asked=float(asked),
               clipping_norm_applied=float(applied), claimed_epsilon=claimed["epsilon"], claimed_delta=claimed["delta"],
               note="claimed by the coordinator; not this node's guarantee (that is its DP-SGD ledger rows)")
    if applied < asked:
        log.info("%s/%s: central DP: update clipped to %g (policy central_max_clipping_norm), coordinator asked %g",
                 spec.department, spec.site, applied, asked)


def central_clipping_mod(spec_of: Callable[[Context], object]):
    """ClientApp mod: clip central-DP train replies at the node's norm (Flower's ``fixedclipping_mod``).

    Parameters
    ----------
    spec_of : callable
        ``spec_of(context) -> clients.node.NodeSpec`` (the node's policy and ledger).

    Returns
    -------
    callable
        The mod. Messages other than plain central-DP train messages pass through untouched
        (SecAgg+ train messages are clipped in :func:`clients.secagg.secagg_train`).
    """

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        if (not is_train(msg) or "config" not in msg.content.config_records
                or is_secagg_fit(msg) or not is_central_dp(msg.content["config"])):
            return call_next(msg, ctxt)
        cfg = msg.content["config"]
        spec = spec_of(ctxt)
        asked = cfg[KEY_CLIPPING_NORM]
        try:
            applied = applied_norm(asked, spec.policy)
        except ClippingRefused as exc:
            error = Error(code=BAD_CLIPPING_NORM, reason=f"{spec.department}/{spec.site}: refused: {exc}")
            audit_reply(spec, msg, error=error)
            return Message(error, reply_to=msg)
        cfg[KEY_CLIPPING_NORM] = applied  # Flower's mod clips at what the node decided
        reply = fixedclipping_mod(msg, ctxt, call_next)
        if not reply.has_error():
            record_participation(spec, dict(cfg), float(asked), applied)
        return reply

    return mod
