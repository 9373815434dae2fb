"""Seam ``dispatch``: a linear-time message dispatcher for Flower's Simulation Engine.

Flower's ``vce_api.add_messages_to_queue`` thread sweeps every 0.1 s and, for **every** virtual
node, calls ``InMemoryLinkState.get_message_ins(node_id, limit=1)``, which walks **every**
stored message and re-validates it (expiry, federation membership). A sweep therefore costs
nodes x messages validations: with 1,000 nodes and 1,000 messages in flight that is a million
checks every 0.1 s, and a profile of a 1,000-client run (py-spy, 40 s) put 88 % of the
coordinator process' samples there, saturating one of the machine's two cores.

:func:`add_messages_to_queue` does the same job in one walk over the stored messages per
sweep: each undelivered message whose destination is a simulated node is validated with the
state's own check, marked delivered and queued, at most one per node per sweep (Flower's
``limit=1``). For any state other than ``InMemoryLinkState`` it runs Flower's loop unchanged.
:func:`install` puts it in place; :mod:`simulations.run` calls it before starting the simulation.

Private Flower names used (checked by the ``dispatch`` self-test): ``vce_api.add_messages_to_queue``,
``InMemoryLinkState`` (``lock``, ``message_ins_store``, ``_check_stored_messages``) and
``flwr.supercore.date.now``. No public API exposes the Simulation Engine's dispatcher.
"""

from __future__ import annotations

import os
import threading
from queue import Queue

from flower_compat import check_version, register

#: Environment switch: ``flower`` keeps Flower's own dispatcher (for side-by-side measurements).
ENV = "CITYFED_SIM_DISPATCH"


def take_pending(state, nodes) -> list:
    """Undelivered, valid messages for ``nodes``, at most one per node, marked delivered.

    Parameters
    ----------
    state : flwr.server.superlink.linkstate.InMemoryLinkState
        The simulation's link state.
    nodes : container of int
        Node IDs of the simulated nodes.

    Returns
    -------
    list of flwr.app.Message
        In storage order (the order Flower would deliver them).
    """
    from flwr.supercore.date import now

    taken: dict[int, object] = {}
    with state.lock:
        for msg_id, msg in list(state.message_ins_store.items()):
            md = msg.metadata
            if md.delivered_at != "" or md.dst_node_id in taken or md.dst_node_id not in nodes:
                continue
            state._check_stored_messages({msg_id})  # expired / left the federation: deleted  # noqa: SLF001
            if msg_id in state.message_ins_store:
                taken[md.dst_node_id] = msg
        stamp = now().isoformat()
        for msg in taken.values():
            msg.metadata.delivered_at = stamp
    return list(taken.values())


def add_messages_to_queue(state, queue: Queue, nodes_mapping, f_stop: threading.Event) -> None:
    """Drop-in for ``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    if not isinstance(state, InMemoryLinkState):
        return _flower_add_messages_to_queue(state, queue, nodes_mapping, f_stop)
    nodes = set(nodes_mapping.keys())
    while not f_stop.is_set():
        for msg in take_pending(state, nodes):
            queue.put(msg)
        f_stop.wait(0.1)
    return None


_flower_add_messages_to_queue = None


def install() -> bool:
    """Replace Flower's dispatcher in ``vce_api`` (idempotent).

    Returns
    -------
    bool
        False when ``CITYFED_SIM_DISPATCH=flower`` keeps Flower's own dispatcher.

    Raises
    ------
    flower_compat.CompatError
        When the installed flwr is not :data:`flower_compat.FLWR_VERSION`.
    """
    global _flower_add_messages_to_queue
    check_version()
    from flwr.server.superlink.fleet.vce import vce_api

    if os.environ.get(ENV) == "flower":
        return False
    if vce_api.add_messages_to_queue is not add_messages_to_queue:
        _flower_add_messages_to_queue = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = add_messages_to_queue
    return True


@register("dispatch")
def _self_test() -> None:
    """The Simulation Engine internals :func:`install` and :func:`take_pending` use."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.supercore.date import now  # noqa: F401

    assert callable(vce_api.add_messages_to_queue), "vce_api.add_messages_to_queue is gone"
    for name in ("_check_stored_messages", "get_message_ins"):
        assert hasattr(InMemoryLinkState, name), f"InMemoryLinkState.{name} is gone"
    set_in_init = InMemoryLinkState.__init__.__code__.co_names  # attributes __init__ assigns
    for attr in ("lock", "message_ins_store"):
        assert attr in set_in_init, f"InMemoryLinkState.{attr} is no longer set in __init__"
