"""A Flower ``Grid`` that calls the ClientApp in this process (fast tests, no Ray).

Same ServerApp logic, same ClientApp: only the transport is replaced by a function call.
Optional ``tamper`` and ``drop`` hooks inject faults (bad replies, failed nodes) for tests.
"""

from __future__ import annotations

import copy
import random
from typing import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from flower_compat.inprocess import set_task_identity


class InProcessGrid(Grid):
    """Grid over in-process nodes.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
    node_configs : list of dict
        One node config per node (department, site, policy, ledger, ...).
    run_config : dict
        Shared run config (given to every node's Context).
    tamper : callable, optional
        ``tamper(node_id, reply) -> reply`` applied to train replies (fault injection).
    drop_probability : float
        Chance that a node fails to answer a message (simulated failure).
    seed : int
    """

    def __init__(self, client_app, node_configs: list[dict], run_config: dict | None = None, *,
                 tamper: Callable[[int, Message], Message] | None = None, drop_probability: float = 0.0, seed: int = 0):
        self.client_app = client_app
        self.contexts = {
            i + 1: Context(run_id=1, node_id=i + 1, node_config=dict(nc), state=RecordDict(), run_config=dict(run_config or {}))
            for i, nc in enumerate(node_configs)
        }
        self.tamper = tamper
        self.drop_probability = drop_probability
        self._rng = random.Random(seed)
        self._run = None
        set_task_identity(run_id=1, node_id=0, task_id=1)  # Messages built here take their IDs from it

    def set_run(self, run) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self):  # noqa: D102
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: D102
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover - send_and_receive is used
        raise NotImplementedError("InProcessGrid only supports send_and_receive")

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError("InProcessGrid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver each message to its node's ClientApp and collect the replies."""
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if self._rng.random() < self.drop_probability:
                continue  # the node failed: no reply, like a timeout
            # each node gets its own copy, like a real transport (secaggplus_mod edits content in place)
            msg = Message(copy.deepcopy(msg.content), dst_node_id=node, message_type=msg.metadata.message_type,
                          group_id=msg.metadata.group_id)
            reply = self.client_app(msg, self.contexts[node])
            if self.tamper and msg.metadata.message_type == "train" and not reply.has_error():
                reply = self.tamper(node, reply)
            replies.append(reply)
        return replies
