"""The coordinator's last step of a run: ask every node to personalise the final model on-site.

Sent only when the run config's ``personalise-epochs`` > 0 and the run completed. Each node
decides by its own policy (:mod:`clients.personalise`); a reply carries the DP-SGD parameters and
the node's epsilon, never arrays. Replies and refusals are recorded in ``results.json``
``"personalise"``.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from contract.keys import SERVER_ROUND
from contract.tasks import ARRAYS, CONFIG, METRICS, PERSONALISE_MESSAGE
from contract.text import peer_text

log = logging.getLogger("cityfed.server")


def personalise_config(cfg: dict) -> dict:
    """The personalisation keys of a validated run config that go into every job config.

    Empty when ``personalise-epochs`` is 0. Sent with every train message too, so that each
    node reserves the personalisation's steps when it calibrates its rounds' noise.
    """
    epochs = int(cfg.get("personalise-epochs", 0) or 0)
    if epochs <= 0:
        return {}
    return {"personalise-epochs": epochs, "personalise-lr": float(cfg["personalise-lr"]),
            "personalise-layers": str(cfg["personalise-layers"]), "personalise-mu": float(cfg["personalise-mu"]),
            "personalise-batch-size": int(cfg.get("personalise-batch-size", 0) or 0),
            "personalise-own-lr": float(cfg.get("personalise-own-lr", 0.0) or 0.0),
            "personalise-own-batch-size": int(cfg.get("personalise-own-batch-size", 0) or 0)}


def personalise_nodes(grid: Grid, job: dict, arrays: ArrayRecord, num_rounds: int, *, timeout: float = 600.0) -> dict:
    """Send the final model to every connected node with a personalise message; collect the replies.

    Parameters
    ----------
    grid : Grid
    job : dict
        The run's job config (with the personalisation keys of :func:`personalise_config`).
    arrays : ArrayRecord
        The run's final global model.
    num_rounds : int
        The run's last round (the release's round in the nodes' ledgers).
    timeout : float
        Seconds to wait for the replies.

    Returns
    -------
    dict
        ``{"nodes": {node_id: metrics}, "refused": [{"node", "code", "reason"}], "asked": n}``.
    """
    config = ConfigRecord({**job, SERVER_ROUND: int(num_rounds)})
    ids = list(grid.get_node_ids())
    # Flower's Message constructor (Grid.create_message is deprecated and logged so on the Ray engine)
    msgs = [Message(RecordDict({ARRAYS: arrays, CONFIG: config}), nid, PERSONALISE_MESSAGE, group_id="personalise")
            for nid in ids]
    out: dict = {"asked": len(ids), "nodes": {}, "refused": []}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            reason = peer_text(str(reply.error.reason))  # the node's own words: escaped, cut (contract.text)
            out["refused"].append({"node": node, "code": int(reply.error.code), "reason": reason})
            log.warning("node %s did not personalise: %s", node, reason)
        elif METRICS in reply.content:
            out["nodes"][str(node)] = dict(reply.content[METRICS])
    return out
