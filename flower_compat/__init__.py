"""The one place cityfed touches Flower's private internals, behind one version gate.

Everything else in cityfed uses Flower's public API. Each submodule of this package adapts one
internal seam and registers a self-test of the private names it relies on:

=================  =====================  ==================================================
seam               module                 used by
=================  =====================  ==================================================
warm-worker        :mod:`.warm`           ``clients/warm.py`` (SuperNode, SuperExec, flwr-clientapp)
grid               :mod:`.grid`           ``server/grid.py`` (HttpGrid pulls, InMemoryGrid)
superlink          :mod:`.superlink`      ``server/guard.py``, ``server/cli.py``,
                                          ``server/supervisor.py``, ``server/flwr_calls.py``
                                          (middleware, lifespan, run status, Control API protobufs)
dispatch           :mod:`.dispatch`       ``simulations/run.py`` (Simulation Engine dispatcher)
secagg             :mod:`.secagg`         ``server/secagg.py``, ``clients/secagg.py``, ``server/grid.py``
dp                 :mod:`.dp`             ``server/central_dp.py``, ``clients/clipping.py``, ``clients/secagg.py``
logging            :mod:`.logging`        ``clients/app.py``, ``clients/warm.py``, ``server/cli.py``,
                                          ``server/flwr_calls.py``, ``simulations/cli.py``,
                                          ``privacy/dp.py``
task-identity      :mod:`.inprocess`      ``simulations/inprocess.py``
strategy-state     :mod:`.strategy_state` ``server/strategy.py`` (FedAdam/FedYogi/FedAvgM state)
testing            :mod:`.testing`        ``tests/`` only (what the tests build or patch of Flower's
                                          SuperNode, SuperExec, SuperLink, FABs and node keys)
=================  =====================  ==================================================

What counts as public
---------------------
:data:`PUBLIC_MODULES`: the modules of Flower's API reference
(https://flower.ai/docs/framework/ref-api/flwr.html: ``flwr.app``, ``flwr.clientapp`` with
``mod``, ``flwr.serverapp`` with ``strategy``, ``flwr.simulation``, ``flwr.common``,
``flwr.client`` with ``mod``, ``flwr.server`` with ``strategy`` and ``workflow``; plus
``flwr.agentapp``), imported by exactly those names. Everything else is private: their
submodules (``flwr.app.error``, ``flwr.server.workflow.constant``, ...), ``flwr.supercore``,
``flwr.supernode``, ``flwr.superlink``, ``flwr.server.superlink``, ``flwr.server.compat``,
``flwr.compat``, ``flwr.common.constant``, ``flwr.common.logger``, ``flwr.common.config``,
``flwr.common.secure_aggregation``, ``flwr.proto``, ``flwr.cli``. ``tests/test_compat.py``
fails on any import of a private module outside this package, the tests included (and on a
``monkeypatch.setattr`` of a ``"flwr.<private module>.<name>"`` string).

:data:`FLWR_VERSION` is the one Flower release these adapters were written and tested
against (pinned in ``pyproject.toml`` and ``constraints.txt``). :func:`check_version` and
:func:`self_test` run in the test suite and at start-up of every cityfed command that loads
Flower's internals (every ``fl-server`` command but ``server.cli.QUICK_COMMANDS``, the
``fl-client`` node itself, ``fl-sim``); commands that only ask the running coordinator or read
files (``fl-server runs``, ``nodes``, ``logs``, ``app-config``; ``fl-client app ...`` and
``audit ...``) check the version gate only (:func:`check_version`, no Flower import), so that
they answer in a fraction of a second. A mismatch fails with the fix
named instead of breaking deep inside Flower.
"""

from __future__ import annotations

from typing import Callable, Iterable

#: The Flower release every adapter in this package is written against.
FLWR_VERSION = "1.42.0"

#: Flower modules that are public API (Flower's API reference); any other ``flwr`` module is private.
PUBLIC_MODULES = frozenset({
    "flwr", "flwr.agentapp", "flwr.app", "flwr.clientapp", "flwr.clientapp.mod", "flwr.serverapp",
    "flwr.serverapp.strategy", "flwr.simulation", "flwr.common", "flwr.client", "flwr.client.mod", "flwr.server",
    "flwr.server.strategy", "flwr.server.workflow",
})


def is_private(module: str) -> bool:
    """Whether importing ``module`` (a dotted name) touches Flower internals.

    Parameters
    ----------
    module : str
        E.g. ``"flwr.serverapp"`` (public), ``"flwr.supercore.logger"`` (private); modules of
        other packages (``flwr_datasets``, ``numpy``) are not Flower's and never private.
    """
    if module != "flwr" and not module.startswith("flwr."):
        return False
    return module not in PUBLIC_MODULES

#: Seams only cityfed's tests use (:mod:`flower_compat.testing`): checked by the test suite, never
#: at a command's start-up (a Flower name only a test needs must not stop a department's node).
TEST_ONLY_SEAMS = ("testing",)

#: name -> callable raising ``CompatError`` when the private names a seam uses are missing.
_CHECKS: dict[str, Callable[[], None]] = {}


class CompatError(RuntimeError):
    """Installed Flower does not provide the internals a cityfed seam adapts."""


def installed_version() -> str | None:
    """Return the installed ``flwr`` version string, or ``None`` when flwr is missing.

    ``flwr.__version__`` when Flower is already imported; otherwise the installed distribution's
    version (``importlib.metadata``, which is what ``flwr.__version__`` reads), so that the gate
    costs no import of Flower (0.7 s on 2 cores) for a command that never loads it.
    """
    import sys

    flwr = sys.modules.get("flwr")
    if flwr is not None:
        return getattr(flwr, "__version__", None)
    from importlib import metadata

    try:
        return metadata.version("flwr")
    except metadata.PackageNotFoundError:
        return None


def check_version() -> None:
    """Raise :class:`CompatError` unless the installed flwr is :data:`FLWR_VERSION`.

    Raises
    ------
    CompatError
        With the installed and the required version and the fix.
    """
    version = installed_version()
    if version != FLWR_VERSION:
        raise CompatError(
            f"cityfed adapts flwr {FLWR_VERSION} internals (flower_compat) but flwr {version} is installed. "
            f"Fix: pip install -c constraints.txt 'flwr[simulation,dp]=={FLWR_VERSION}' (pyproject.toml pins it)."
        )


def register(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Decorator: register ``fn`` as the self-test of seam ``name``.

    Parameters
    ----------
    name : str
        Seam name shown in the self-test report (e.g. ``"warm-worker"``).
    """

    def deco(fn: Callable[[], None]) -> Callable[[], None]:
        _CHECKS[name] = fn
        return fn

    return deco


def self_test(seams: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> dict[str, str]:
    """Check the version gate, then every registered seam (or only ``seams``); return ``{seam: "ok"}``.

    Parameters
    ----------
    seams : iterable of str, optional
        Names of the seams to check (what one entry point uses); default all.
    exclude : iterable of str, optional
        Seams not to check (an entry point's start-up leaves out :data:`TEST_ONLY_SEAMS`).

    Raises
    ------
    CompatError
        Naming every seam whose private Flower names are missing, and the fix; or an unknown
        seam name in ``seams``.
    """
    import importlib
    import pkgutil

    check_version()
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    wanted = sorted(_CHECKS) if seams is None else sorted(set(seams))
    skip = set(exclude)
    unknown = [n for n in [*wanted, *sorted(skip)] if n not in _CHECKS]
    wanted = [n for n in wanted if n not in skip]
    if unknown:
        raise CompatError(f"flower_compat.self_test: unknown seam(s) {unknown}; known: {sorted(_CHECKS)}")
    failures: dict[str, str] = {}
    for name, fn in ((n, _CHECKS[n]) for n in wanted):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - each seam's failure is reported by name
            failures[name] = f"{type(exc).__name__}: {exc}"
    if failures:
        lines = "; ".join(f"{k}: {v}" for k, v in failures.items())
        raise CompatError(f"flwr {installed_version()} lacks internals cityfed adapts ({lines}). "
                          f"Fix: pip install -c constraints.txt 'flwr[simulation,dp]=={FLWR_VERSION}'.")
    return {name: "ok" for name in wanted}
