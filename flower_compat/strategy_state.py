"""Seam ``strategy-state``: where Flower's server optimisers keep the state a checkpoint must carry.

Flower's ``FedAdam``/``FedYogi`` (``FedOpt``) keep their first and second moment estimates in
``m_t``/``v_t`` and the model they step from in ``current_arrays``; ``FedAvgM`` keeps its server
momentum in ``momentum_vector`` and its model in ``current_arrays``. None of that is public
API (the strategies have no state export). :func:`owned_state_base` subclasses such a strategy
so that those attributes are properties over ``self.optimiser_state``, a dict under cityfed's
own names (:data:`STATE_NAMES`): Flower's code reads and writes the state as before, and
cityfed's strategies (:mod:`server.strategy`) export and restore it with
``state_dict()``/``load_state_dict()`` without touching a Flower attribute.
:func:`from_legacy_names` reads checkpoints written before, which stored Flower's names.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

from flower_compat import register

#: Flower strategy -> {cityfed state name: the Flower attribute that holds it}.
_ATTRS: dict[type, dict[str, str]] = {
    FedAdam: {"model": "current_arrays", "first-moment": "m_t", "second-moment": "v_t"},
    FedYogi: {"model": "current_arrays", "first-moment": "m_t", "second-moment": "v_t"},
    FedAvgM: {"model": "current_arrays", "momentum": "momentum_vector"},
}

#: Flower strategy -> the cityfed names of the state it keeps.
STATE_NAMES: dict[type, tuple[str, ...]] = {cls: tuple(m) for cls, m in _ATTRS.items()}


def _state_property(name: str) -> property:
    def get(self):
        return self.__dict__.setdefault("optimiser_state", {}).get(name)

    def set_(self, value) -> None:
        self.__dict__.setdefault("optimiser_state", {})[name] = value

    return property(get, set_, doc=f"Flower's view of cityfed's optimiser_state[{name!r}].")


def owned_state_base(cls: type) -> type:
    """``cls`` (``FedAdam``, ``FedYogi`` or ``FedAvgM``) with its state kept in ``self.optimiser_state``.

    Parameters
    ----------
    cls : type
        One of the Flower strategies in :data:`STATE_NAMES`.

    Returns
    -------
    type
        A subclass whose ``STATE_NAMES`` lists the keys of ``optimiser_state``.
    """
    if cls not in _ATTRS:
        raise ValueError(f"{cls.__name__}: no known optimiser state; one of {', '.join(c.__name__ for c in _ATTRS)}")
    ns = {flower: _state_property(ours) for ours, flower in _ATTRS[cls].items()}
    ns["STATE_NAMES"] = STATE_NAMES[cls]
    return type(f"Owned{cls.__name__}", (cls,), ns)


def from_legacy_names(state: dict) -> dict:
    """A checkpoint's ``strategy_state`` with Flower's attribute names (earlier cityfed versions) renamed to cityfed's."""
    legacy = {flower: ours for m in _ATTRS.values() for ours, flower in m.items()}
    return {legacy.get(k, k): v for k, v in state.items()}


@register("strategy-state")
def _self_test() -> None:
    """Each strategy's methods still read and write the attributes mapped here."""
    for cls, mapping in _ATTRS.items():
        used = set()
        for klass in cls.__mro__[:-1]:  # without object
            for fn in vars(klass).values():
                code = getattr(fn, "__code__", None)
                if code is not None:
                    used.update(code.co_names)
        missing = [a for a in mapping.values() if a not in used]
        assert not missing, f"{cls.__name__} no longer uses the attribute(s) {missing}"
