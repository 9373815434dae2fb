"""Seam ``secagg``: the SecAgg+ names Flower keeps outside its public API.

Flower runs SecAgg+ only through its legacy path: the public ``SecAggPlusWorkflow``
(``flwr.server.workflow``) and ``secaggplus_mod`` (``flwr.client.mod``) exchange their stage and
state under record keys defined in ``flwr.common.secure_aggregation.secaggplus_constants``,
the legacy workflow reads the round and parameters from records named in
``flwr.server.workflow.constant``, a legacy strategy reaches nodes through
``flwr.server.compat.GridClientProxy``, and the Message-API <-> legacy conversions live in
``flwr.compat.common.recorddict_compat``. :mod:`server.secagg`, :mod:`clients.secagg` and
:mod:`server.grid` (which names SecAgg+ stages in its deadlines) take them from here.
"""

from __future__ import annotations

from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from flower_compat import register

__all__ = ["MAIN_CONFIGS_RECORD", "MAIN_PARAMS_RECORD", "RECORD_KEY_CONFIGS", "RECORD_KEY_STATE", "GridClientProxy",
           "Key", "Stage", "WorkflowKey", "recorddict_compat"]


@register("secagg")
def _self_test() -> None:
    """The SecAgg+ constants, conversions and the legacy client proxy this seam re-exports."""
    import flwr.common.secure_aggregation.secaggplus_constants as sc
    import flwr.server.workflow.constant as wc

    for name in ("RECORD_KEY_CONFIGS", "RECORD_KEY_STATE", "Key", "Stage"):
        assert hasattr(sc, name), f"secaggplus_constants.{name} is gone"
    for name in ("SETUP", "SHARE_KEYS", "COLLECT_MASKED_VECTORS", "UNMASK"):
        assert hasattr(sc.Stage, name), f"secaggplus_constants.Stage.{name} is gone"
    assert hasattr(sc.Key, "STAGE"), "secaggplus_constants.Key.STAGE is gone"
    assert hasattr(wc.Key, "CURRENT_ROUND") and wc.MAIN_CONFIGS_RECORD and wc.MAIN_PARAMS_RECORD, \
        "flwr.server.workflow.constant changed"
    for name in ("recorddict_to_fitins", "fitres_to_recorddict", "parameters_to_arrayrecord",
                 "arrayrecord_to_parameters"):
        assert callable(getattr(recorddict_compat, name, None)), f"recorddict_compat.{name} is gone"
