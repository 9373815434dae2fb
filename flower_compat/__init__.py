"""The one place cityfed touches Flower's private internals, behind one version gate.

Everything else in cityfed uses Flower's public API (``flwr.app``, ``flwr.serverapp``,
``flwr.clientapp``, ``flwr.simulation``...). Each submodule of this package adapts one
internal seam (the warm worker, the grid's object pulls, the simulation dispatcher, the
control-plane middleware, ...) and registers a self-test of the private names it relies on.

:data:`FLWR_VERSION` is the one Flower release these adapters were written and tested
against (pinned in ``pyproject.toml`` and ``constraints.txt``). :func:`check_version` and
:func:`self_test` run at start-up of every cityfed entry point that uses a seam and in the
test suite; a mismatch fails with the fix named instead of breaking deep inside Flower.
"""

from __future__ import annotations

from typing import Callable

#: The Flower release every adapter in this package is written against.
FLWR_VERSION = "1.42.0"

#: name -> callable raising ``CompatError`` when the private names a seam uses are missing.
_CHECKS: dict[str, Callable[[], None]] = {}


class CompatError(RuntimeError):
    """Installed Flower does not provide the internals a cityfed seam adapts."""


def installed_version() -> str | None:
    """Return the installed ``flwr`` version string, or ``None`` when flwr is missing."""
    try:
        import flwr
    except ImportError:
        return None
    return getattr(flwr, "__version__", None)


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


def self_test() -> dict[str, str]:
    """Check the version gate, then every registered seam; return ``{seam: "ok"}``.

    Raises
    ------
    CompatError
        Naming every seam whose private Flower names are missing, and the fix.
    """
    import importlib
    import pkgutil

    check_version()
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    failures: dict[str, str] = {}
    for name, fn in sorted(_CHECKS.items()):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - each seam's failure is reported by name
            failures[name] = f"{type(exc).__name__}: {exc}"
    if failures:
        lines = "; ".join(f"{k}: {v}" for k, v in failures.items())
        raise CompatError(f"flwr {installed_version()} lacks internals cityfed adapts ({lines}). "
                          f"Fix: install flwr=={FLWR_VERSION}.")
    return {name: "ok" for name in sorted(_CHECKS)}
