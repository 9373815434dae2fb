"""A Grid wrapper that polls for replies every 0.1 s instead of Flower's hard-coded 3 s.

In Flower 1.41 the deployment grid (``flwr.superlink.grid.http_grid.HttpGrid``) implements
``send_and_receive`` as ``push_messages`` followed by a ``pull_messages`` loop that sleeps
**3 s** between pulls. Every train and every evaluate step of a round therefore waits up to
3 s after the last reply has arrived. :class:`FastPollGrid` keeps the same semantics
(same timeout rule, same returned replies) with a short sleep, using only the public
``Grid`` methods, so no Flower patch is needed.

Only deployment grids are wrapped (:func:`fast_poll`): the simulation grids deliver
replies in their own ``send_and_receive``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

#: Seconds between two ``pull_messages`` calls while replies are outstanding.
POLL_INTERVAL_S = 0.1
#: Environment variable overriding the poll interval (<= 0: do not wrap).
POLL_ENV = "CITYFED_GRID_POLL_S"


class FastPollGrid(Grid):
    """Delegate to ``inner`` except for ``send_and_receive``, which polls every ``interval`` s.

    Parameters
    ----------
    inner : Grid
        The grid Flower gave the ServerApp.
    interval : float
        Sleep between pulls while replies are outstanding (seconds, > 0).
    """

    def __init__(self, inner: Grid, interval: float = POLL_INTERVAL_S):
        if interval <= 0:
            raise ValueError(f"poll interval must be > 0 seconds, got {interval}")
        self.inner = inner
        self.interval = float(interval)

    def set_run(self, run) -> None:  # noqa: D102
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # noqa: D102
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def get_nodes(self):  # noqa: D102
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull replies every :attr:`interval` seconds.

        Returns when every message has a reply or, if ``timeout`` is given, when it has
        passed (the replies received so far are returned, as in Flower's grids).
        """
        msg_ids = set(self.inner.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while msg_ids and (timeout is None or time.monotonic() < end):
            got = list(self.inner.pull_messages(msg_ids))
            replies.extend(got)
            msg_ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if msg_ids:
                time.sleep(self.interval)
        return replies

    def __getattr__(self, name):
        # anything else a Flower version adds (close, ...) goes to the real grid
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def fast_poll(grid: Grid, interval: float = POLL_INTERVAL_S) -> Grid:
    """Wrap a deployment grid in :class:`FastPollGrid`; return any other grid unchanged.

    Parameters
    ----------
    grid : Grid
        What Flower passed to the ServerApp's main.
    interval : float
        Poll interval in seconds; the environment variable ``CITYFED_GRID_POLL_S`` (in the
        SuperLink's environment, inherited by the ServerApp process) overrides it, and a
        value <= 0 there disables the wrapper (Flower's 3 s loop, for measurements).
    """
    from flwr.superlink.grid.http_grid import HttpGrid

    interval = float(os.environ.get(POLL_ENV, interval))
    if interval <= 0:  # measurement switch: keep Flower's own 3 s loop
        return grid
    if isinstance(grid, HttpGrid) and not isinstance(grid, FastPollGrid):
        import flwr.superlink.grid.http_grid as http_grid

        from clients.warm import fast_pulls

        # a reply is listed before its objects are stored: retry after 20 ms, not Flower's 1 s
        http_grid.pull_objects = fast_pulls(http_grid.pull_objects)
        return FastPollGrid(grid, interval)
    return grid
