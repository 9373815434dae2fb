"""Seam ``simulation``: run ServerApp/ClientApp *objects* in Flower's Simulation Engine.

``fl-sim run`` builds one ServerApp and one ClientApp per department run (run-config defaults,
policy and ledger paths baked in; an ``on_round`` callback that feeds the progress display) and
runs them on Ray with the dispatcher of :mod:`flower_compat.dispatch` installed in the same
process. flwr 1.41 and 1.42 deprecate the one public function that does this,
``flwr.simulation.run_simulation`` (it logs "DEPRECATED FEATURE ... use `flwr run`" on every
call, once per department in ``make demo``).

Why not the supported runtime (a SuperLink in simulation mode, ``flwr run`` or
``flwr.simulation.run_simulation_process``): there the apps are loaded by ``"module:attr"``
from an app bundle (FAB) installed into ``FLWR_HOME``, in a separate ``flwr-simulation``
process that receives its inputs from a SuperLink over its Runtime API. None of fl-sim's needs
survive that boundary: the ``on_round`` callback is a Python function of the calling process
(the live progress table), the dispatcher replacement must be installed in the process that
runs the engine, and the apps are objects built per run (``fl-sim compare`` and ``fl-sim audit``
run dozens of them per command, each with its own defaults). Meeting them would mean a SuperLink
per run, a FAB build and install per run, and a second channel back for progress, for no gain
in what runs: both paths end in the same engine call. ``flwr run .`` itself is supported for the
project's module-level apps (README, "Flower-native: flwr run .").

So this seam calls the engine entry behind the deprecated wrapper,
``flwr.simulation.run_simulation._run_simulation``: the function that both ``run_simulation``
and Flower's own ``run_simulation_process`` call, with the same arguments the wrapper passes.
It returns Flower's ``SimulationRunResult`` (the ServerApp's final context and the engine's
metrics). Warnings are not filtered: nothing deprecated is called.

Private Flower names used (checked by the ``simulation`` self-test):
``flwr.simulation.run_simulation._run_simulation`` (keyword arguments ``num_supernodes``,
``exit_event``, ``client_app``, ``server_app``, ``backend_name``, ``backend_config``,
``verbose_logging``) and its telemetry events ``EventType.PYTHON_API_RUN_SIMULATION_ENTER`` /
``_LEAVE`` (``flwr.supercore.telemetry``; nothing is sent with ``FLWR_TELEMETRY_ENABLED=0``,
which the cityfed CLIs set by default).
"""

from __future__ import annotations

from flower_compat import CompatError, check_version, register

#: Keyword arguments of ``_run_simulation`` this seam passes.
_PARAMS = ("num_supernodes", "exit_event", "client_app", "server_app", "backend_name", "backend_config",
           "verbose_logging")


def run_apps(server_app, client_app, num_supernodes: int, backend_config: dict, *, backend_name: str = "ray",
             verbose_logging: bool = False):
    """Run ``server_app`` against ``num_supernodes`` virtual nodes of ``client_app``; block until done.

    Parameters
    ----------
    server_app : flwr.serverapp.ServerApp
        The ServerApp object (it runs in a thread of this process).
    client_app : flwr.clientapp.ClientApp
        The ClientApp object every virtual node runs (in the backend's workers).
    num_supernodes : int
        Number of virtual SuperNodes; node ``k`` gets node config ``partition-id = k``,
        ``num-partitions = num_supernodes``.
    backend_config : dict
        Flower's backend config: ``client_resources`` (``num_cpus``, ``num_gpus``),
        ``init_args`` (passed to ``ray.init``), ``actor``.
    backend_name : str
        Simulation backend (Flower ships ``"ray"``).
    verbose_logging : bool
        Flower's DEBUG logs.

    Returns
    -------
    flwr.simulation.run_simulation.SimulationRunResult
        ``context`` (the ServerApp's final context) and ``metrics`` (engine metrics).

    Raises
    ------
    CompatError
        When the installed flwr is not the version this seam was written for.
    """
    check_version()
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType, event

    event(EventType.PYTHON_API_RUN_SIMULATION_ENTER,
          event_details={"backend": backend_name, "num-supernodes": num_supernodes})
    return _run_simulation(num_supernodes=num_supernodes, client_app=client_app, server_app=server_app,
                           backend_name=backend_name, backend_config=backend_config,
                           verbose_logging=verbose_logging, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE)


@register("simulation")
def _self_test() -> None:
    import importlib
    import inspect

    from flwr.supercore.telemetry import EventType

    # the module, not the package attribute of the same name (the deprecated function)
    module = importlib.import_module("flwr.simulation.run_simulation")

    fn = getattr(module, "_run_simulation", None)
    if fn is None:
        raise CompatError("flwr.simulation.run_simulation._run_simulation is gone")
    missing = [p for p in _PARAMS if p not in inspect.signature(fn).parameters]
    if missing:
        raise CompatError(f"flwr.simulation.run_simulation._run_simulation lacks parameter(s) {missing}")
    for name in ("PYTHON_API_RUN_SIMULATION_ENTER", "PYTHON_API_RUN_SIMULATION_LEAVE"):
        if not hasattr(EventType, name):
            raise CompatError(f"flwr.supercore.telemetry.EventType.{name} is gone")
