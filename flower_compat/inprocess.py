"""Seam ``task-identity``: the process-wide task identity Flower reads when it creates a Message.

Since flwr 1.42 a ``Message`` built in a process takes its run, node and task IDs from
``flwr.supercore.task_identity.TaskIdentity`` (set by Flower's ServerApp/ClientApp runners).
cityfed's in-process grid (:mod:`simulations.inprocess`) runs the ServerApp and its nodes in
one plain Python process, without those runners, so it sets that identity itself.
"""

from __future__ import annotations

from flower_compat import register


def set_task_identity(run_id: int, node_id: int, task_id: int) -> None:
    """Set the identity Flower stamps on Messages created in this process.

    Parameters
    ----------
    run_id, node_id, task_id : int
        The IDs Flower's ServerApp runner would set (the in-process grid uses 1, 0, 1).
    """
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id


@register("task-identity")
def _self_test() -> None:
    """``TaskIdentity`` with settable ``run_id``, ``node_id`` and ``task_id``."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("run_id", "node_id", "task_id"):
        prop = getattr(type(TaskIdentity), name, None)
        assert isinstance(prop, property) and prop.fset is not None, f"TaskIdentity.{name} is not a settable property"
