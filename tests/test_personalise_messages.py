"""The personalise messages are built with Flower's Message constructor, not the deprecated Grid.create_message.

On the Ray engine Flower's in-memory grid logged ``DEPRECATED FEATURE: Grid.create_message`` once per run with
personalisation (README claims no deprecation warnings; found following the README literally, 2026-12-07).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from contract.tasks import METRICS, PERSONALISE_MESSAGE
from flower_compat.inprocess import set_task_identity
from server.personalise import personalise_nodes


def test_personalise_messages_do_not_use_the_deprecated_create_message():
    set_task_identity(7, 0, 1)
    sent = []

    class Grid:  # no create_message: calling it fails the test
        def get_node_ids(self):
            return [5, 6]

        def send_and_receive(self, msgs, timeout):
            msgs = list(msgs)
            sent.extend(msgs)
            return [Message(RecordDict({METRICS: MetricRecord({"epochs": 1})}), reply_to=m) for m in msgs]

    out = personalise_nodes(Grid(), {"personalise-epochs": 1}, ArrayRecord(), 3)
    assert [m.metadata.dst_node_id for m in sent] == [5, 6]
    assert {m.metadata.message_type for m in sent} == {PERSONALISE_MESSAGE}
    assert {m.metadata.group_id for m in sent} == {"personalise"}
    assert sorted(out["nodes"]) == ["5", "6"] and out["asked"] == 2
