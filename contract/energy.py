"""Energy figures a node's reply may carry, and what their method codes mean.

A node meters its train and evaluate tasks (:mod:`clients.energy`); the coordinator adds the
figures up per node and run (:mod:`server.energy`).
"""

from __future__ import annotations

#: Keys a node adds to its train/evaluate replies (part of the reply whitelists, :mod:`contract.tasks`).
ENERGY_METRICS = ("energy-j", "energy-method")
#: ``energy-method`` codes and what they mean.
METHODS = {
    0: "measured: RAPL (CPU package)",
    1: "estimate: process CPU time × W per core",
    2: "measured: RAPL (CPU package) + NVML (GPU)",
    3: "estimate: process CPU time × W per core, + NVML (GPU, measured)",
}
