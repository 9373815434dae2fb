"""Seam ``grid``: which Grid Flower handed a ServerApp, and faster object pulls on the deployment one.

Flower's public ``Grid`` does not say whether it is the deployment grid (``HttpGrid``, talking
to a SuperLink) or the Simulation Engine's (``InMemoryGrid``); :mod:`server.grid` needs to know
(deadlines, fast polling) and patches ``HttpGrid``'s module-level ``pull_objects`` so that a
reply listed before its objects are stored is retried after 20 ms, not Flower's 1 s
(:func:`flower_compat.warm.fast_pulls`). The node ID Flower gives the SuperLink's own error
replies and the "node unavailable" error code are constants outside the public API.
"""

from __future__ import annotations

from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from flower_compat import register
from flower_compat.warm import fast_pulls

__all__ = ["NODE_UNAVAILABLE", "SUPERLINK_NODE_ID", "fast_http_pulls", "is_deployment_grid", "is_simulation_grid"]

#: Error code of a reply the SuperLink makes for a node that is gone.
NODE_UNAVAILABLE = ErrorCode.NODE_UNAVAILABLE


def is_deployment_grid(grid) -> bool:
    """True for Flower's deployment grid (``HttpGrid``, a ServerApp run by a SuperLink)."""
    from flwr.superlink.grid.http_grid import HttpGrid

    return isinstance(grid, HttpGrid)


def is_simulation_grid(grid) -> bool:
    """True for the Simulation Engine's grid (``InMemoryGrid``)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def fast_http_pulls() -> None:
    """Make ``HttpGrid`` retry a reply's unavailable objects after 20 ms instead of 1 s (idempotent)."""
    import flwr.superlink.grid.http_grid as http_grid

    http_grid.pull_objects = fast_pulls(http_grid.pull_objects)


@register("grid")
def _self_test() -> None:
    """The grid classes and the ``pull_objects`` this seam checks or patches."""
    import inspect

    import flwr.superlink.grid.http_grid as http_grid
    from flwr.serverapp import Grid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    assert issubclass(http_grid.HttpGrid, Grid) and issubclass(InMemoryGrid, Grid), "HttpGrid/InMemoryGrid not Grids"
    pull = getattr(http_grid.pull_objects, "func", http_grid.pull_objects)
    params = inspect.signature(pull).parameters
    missing = [p for p in ("initial_backoff", "backoff_cap", "max_tries_per_object") if p not in params]
    assert not missing, f"http_grid.pull_objects lacks parameters {missing}"
    assert isinstance(SUPERLINK_NODE_ID, int) and hasattr(ErrorCode, "NODE_UNAVAILABLE"), "flwr.common.constant changed"
