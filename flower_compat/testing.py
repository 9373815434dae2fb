"""Seam ``testing``: the Flower internals only cityfed's tests reach (never imported by project code).

The tests build what Flower's runners would (a SuperNode's node state, a SuperExec's execution
spec, a FAB, a node's signed request), call Flower's own loaders to check cityfed's files against
them, and patch module attributes of Flower's SuperNode, SuperExec, SuperLink and ClientApp
runtime to run cityfed's seams without a network. None of that has a public Flower API, so the
tests take it from here, by the names in :data:`INTERNALS`::

    from flower_compat.testing import TaskType, supernode_start_client_internal as sci

Each name is resolved (imported) when it is used: importing this module (as :func:`self_test`
does at every entry point's start-up) imports nothing of Flower's. A name is either an
attribute of a Flower module or, where the tests patch or read attributes of a module, the
module itself (named after its path below ``flwr``, dots as underscores: ``supercore_logger``
is ``flwr.supercore.logger``). The attributes tests patch on such a module are the ones the
production seams wrap (:mod:`.warm`, :mod:`.grid`, :mod:`.superlink`, :mod:`.logging`), whose
self-tests check them, and those in :data:`ALSO_PATCHED`; this seam's self-test checks that
every name below still resolves and that those attributes exist.

Names other seams already provide are not repeated here: setting the task identity
(:func:`flower_compat.inprocess.set_task_identity`; the class is here for tests that clear
it), the SecAgg+ constants and conversions (:mod:`.secagg`), the clipping-norm key
(:mod:`.dp`), Flower's console handler (:func:`flower_compat.logging.console_handler`), the
SuperLink's node ID and error code (:mod:`.grid`) and the run status names (:mod:`.superlink`).
"""

from __future__ import annotations

import importlib

from flower_compat import register

#: name -> (Flower module, attribute of it; ``None``: the module itself).
INTERNALS: dict[str, tuple[str, str | None]] = {
    # the task identity a Message is stamped with (tests clear its private fields, as a node process has none)
    "TaskIdentity": ("flwr.supercore.task_identity", "TaskIdentity"),
    # SuperExec: execution specs, task types, launch results, Flower's subprocess executor
    "ExecutionSpec": ("flwr.supercore.superexec.executor", "ExecutionSpec"),
    "LaunchResult": ("flwr.supercore.superexec.executor", "LaunchResult"),
    "LaunchResultStatus": ("flwr.supercore.superexec.executor", "LaunchResultStatus"),
    "SubprocessExecutor": ("flwr.supercore.superexec.executor.subprocess_executor", "SubprocessExecutor"),
    "TaskType": ("flwr.supercore.constant", "TaskType"),
    # SuperNode: its node state, object store, runs and message object trees
    "NodeStateFactory": ("flwr.supernode.nodestate", "NodeStateFactory"),
    "ObjectStoreFactory": ("flwr.supercore.object_store", "ObjectStoreFactory"),
    "Run": ("flwr.supercore.run", "Run"),
    "get_object_tree": ("flwr.supercore.inflatable.inflatable_object", "get_object_tree"),
    "get_all_nested_objects": ("flwr.supercore.inflatable.inflatable_object", "get_all_nested_objects"),
    "inflate_object_from_contents": ("flwr.supercore.inflatable.inflatable_utils", "inflate_object_from_contents"),
    # FABs: Flower's builder, its Fab and the folder a FAB is installed in
    "Fab": ("flwr.supercore.fab", "Fab"),
    "build_fab_from_files": ("flwr.cli.build", "build_fab_from_files"),
    "build_fab_from_disk": ("flwr.cli.build", "build_fab_from_disk"),
    "get_project_dir": ("flwr.common.config", "get_project_dir"),
    # node keys and signed requests: Flower's own loaders, signing and verification
    "try_load_public_key": ("flwr.cli.supernode.register", "try_load_public_key"),
    "try_setup_client_authentication": ("flwr.supernode.cli.flower_supernode", "_try_setup_client_authentication"),
    "bytes_to_public_key": ("flwr.supercore.primitives.asymmetric", "bytes_to_public_key"),
    "public_key_to_bytes": ("flwr.supercore.primitives.asymmetric", "public_key_to_bytes"),
    "sign_message": ("flwr.supercore.primitives.asymmetric", "sign_message"),
    "verify_signature": ("flwr.supercore.primitives.asymmetric", "verify_signature"),
    "uses_nist_ec_curve": ("flwr.supercore.primitives.asymmetric", "uses_nist_ec_curve"),
    "now": ("flwr.supercore.date", "now"),
    # SecAgg+: the node-side protocol state secaggplus_mod keeps in the Context
    "SecAggPlusState": ("flwr.client.mod.secure_aggregation.secaggplus_mod", "SecAggPlusState"),
    # Flower's logger and its console handler class
    "FLOWER_LOGGER": ("flwr.supercore.logger", "FLOWER_LOGGER"),
    "ConsoleHandler": ("flwr.supercore.logger", "ConsoleHandler"),
    "HttpGrid": ("flwr.superlink.grid.http_grid", "HttpGrid"),
    # modules whose attributes the tests patch or read (each restored by pytest's monkeypatch)
    "supercore_logger": ("flwr.supercore.logger", None),
    "supercore_exit_exit": ("flwr.supercore.exit.exit", None),
    "supercore_heartbeat": ("flwr.supercore.heartbeat", None),
    "supercore_runtime": ("flwr.supercore.runtime", None),
    "supercore_superexec_run_superexec": ("flwr.supercore.superexec.run_superexec", None),
    "supernode_cli": ("flwr.supernode.cli", None),
    "supernode_start_client_internal": ("flwr.supernode.start_client_internal", None),
    "supernode_runtime_run_clientapp": ("flwr.supernode.runtime.run_clientapp", None),
    "superlink_extensions": ("flwr.superlink.extensions", None),
    "superlink_main": ("flwr.superlink.main", None),
    "superlink_cli_flower_superlink": ("flwr.superlink.cli.flower_superlink", None),  # (the package shadows
    "cli_install": ("flwr.cli.install", None),                                        # it with a function)
    "clientapp_utils": ("flwr.clientapp.utils", None),
}

#: Attributes tests patch on a module above that no production seam's self-test checks.
ALSO_PATCHED: tuple[tuple[str, str], ...] = (
    ("flwr.supercore.exit.exit", "threading"),  # tests/test_pki.py: keep flwr_exit's os._exit thread from starting
)

__all__ = sorted(INTERNALS)


def _resolve(name: str):
    module, attr = INTERNALS[name]
    mod = importlib.import_module(module)  # the module itself, also where its package shadows the name
    return mod if attr is None else getattr(mod, attr)


def __getattr__(name: str):
    if name not in INTERNALS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _resolve(name)  # on each use: a module attribute a test patched is seen as patched


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(INTERNALS))


@register("testing")
def _self_test() -> None:
    """Every name in :data:`INTERNALS` still resolves (its module imports, its attribute exists), and
    the attributes in :data:`ALSO_PATCHED` exist."""
    missing = []
    for module, attr in [*INTERNALS.values(), *ALSO_PATCHED]:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{module} ({exc})")
            continue
        if attr is not None and not hasattr(mod, attr):
            missing.append(f"{module}.{attr}")
    assert not missing, f"gone: {', '.join(missing)}"
