"""Simulation: the ServerApp starts its first round only once every virtual node is registered."""

from __future__ import annotations

import logging

from flwr.app import Context, RecordDict
from flwr.serverapp import ServerApp

from simulations.run import after_registration, wait_for_nodes


class _RegisteringGrid:
    """A grid whose nodes register one batch per look (as Flower's engine registers them in a thread)."""

    def __init__(self, total: int, per_look: int):
        self.total, self.per_look, self.registered = total, per_look, 0

    def get_node_ids(self):
        ids = list(range(1, self.registered + 1))
        self.registered = min(self.total, self.registered + self.per_look)
        return ids


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_wait_for_nodes_waits_for_every_node():
    grid, clock = _RegisteringGrid(1000, 70), _Clock()
    assert wait_for_nodes(grid, 1000, sleep=clock.sleep, clock=clock) == 1000


def test_wait_for_nodes_gives_up_at_the_timeout_and_says_so(caplog):
    grid, clock = _RegisteringGrid(1000, 1), _Clock()
    with caplog.at_level(logging.WARNING, logger="cityfed.simulation"):
        got = wait_for_nodes(grid, 1000, timeout_s=5.0, sleep=clock.sleep, clock=clock)
    assert got < 1000 and clock.t >= 5.0
    assert f"only {got} of 1000 simulated nodes registered" in caplog.text


def test_the_servers_main_sees_every_node():
    seen = []
    inner = ServerApp()

    @inner.main()
    def _main(grid, context):
        seen.append(len(grid.get_node_ids()))

    outer = after_registration(inner, 300)
    outer(_RegisteringGrid(300, 40), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    assert seen == [300]
