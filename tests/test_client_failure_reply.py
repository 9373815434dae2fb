"""An error the ClientApp does not handle itself leaves the node as a fixed reason, never its message.

Flower answers an exception that escapes a ClientApp with ``"<class ...>:<'message'>"``: the
message goes to the coordinator. A message may quote the node's records (a library's conversion
error, a bad cell), so the node's outermost mod (:func:`clients.app.failure_guard_mod`) turns any
escaping error into code ``FAILED`` with :func:`clients.app.failed_reason`'s fixed text, keeps the
cause in the node's own log and records the reply in its audit log.
"""

import pytest

import clients.secagg as csecagg
from clients.app import FAILED
from flower_compat.secagg import RECORD_KEY_STATE
from test_secagg_collect_audit import _collect, _collect_replies, _up_to_collect

SECRET = "patient 17 chol=412 age=63"  # stands for a record a library quoted in its error message


@pytest.mark.timeout(180)
def test_an_error_after_training_in_the_collect_stage_leaves_as_a_fixed_reason(tmp_path, monkeypatch, caplog):
    nodes, ctxs, inbox = _up_to_collect(tmp_path)

    def broken(update, max_norm, coord_bound):
        raise ValueError(f"could not bound the update of {SECRET}")

    monkeypatch.setattr(csecagg, "bound_update", broken)
    reply = _collect(ctxs[1], inbox[1])  # no exception escapes to Flower (it would send str(exc))
    assert reply.has_error() and reply.error.code == FAILED
    assert SECRET not in reply.error.reason and "ValueError" in reply.error.reason
    assert "health/" in reply.error.reason and "node's log" in reply.error.reason
    assert RECORD_KEY_STATE not in ctxs[1].state.config_records  # the next round starts from setup
    (entry,) = _collect_replies(nodes[0])  # what left is audited: the fixed reason, no update
    assert entry["error_code"] == FAILED and entry["reason"] == reply.error.reason and "arrays" not in entry
    assert SECRET not in str(entry)


@pytest.mark.timeout(180)
def test_an_error_in_a_mod_leaves_as_a_fixed_reason(tmp_path, monkeypatch):
    nodes, ctxs, inbox = _up_to_collect(tmp_path)

    def broken(msg, ctxt, call_next):
        raise RuntimeError(f"mod failed on {SECRET}")

    monkeypatch.setattr(csecagg, "secaggplus_mod", broken)
    reply = _collect(ctxs[1], inbox[1])
    assert reply.has_error() and reply.error.code == FAILED and SECRET not in reply.error.reason
    (entry,) = _collect_replies(nodes[0])
    assert entry["error_code"] == FAILED and SECRET not in str(entry)


def test_a_failed_audit_write_escapes_without_the_nodes_paths(tmp_path):
    """No reply leaves without its audit entry, so a failed audit write escapes the ClientApp; Flower
    (and cityfed's warm worker) then sent that error's message, which named the node's state folder
    (independent privacy review, 2026-12-07). What escapes now names no path; the node's log keeps it."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from citydata import load_department
    from clients.app import app
    from clients.warm import failure_reason
    from flower_compat.inprocess import set_task_identity
    from shared_models import build_model, default_model_config

    set_task_identity(7, 0, 1)
    state_dir = tmp_path / "node-state-SECRETPATH"
    (state_dir / "audit.jsonl").mkdir(parents=True)  # the audit log cannot be opened: every audit write fails
    pol = state_dir / "policy.toml"
    pol.write_text('department = "health"\nmax_epsilon = 8.0\nmin_noise_multiplier = 0.5\nmax_clipping_norm = 1.0\n'
                   'allowed_tasks = ["heart-disease"]\nmax_rounds_per_run = 5\n')
    ctx = Context(run_id=7, node_id=1, node_config={"department": "health", "site": "Cleveland", "policy": str(pol),
                  "ledger": str(state_dir / "ledger.sqlite"), "audit-log": str(state_dir / "audit.jsonl")},
                  state=RecordDict(), run_config={})
    model = build_model(default_model_config(load_department("health").schema))
    cfg = {"department": "health", "task": "heart-disease", "run-id": "a1", "server-round": 1, "local-epochs": 1,
           "batch-size": 32, "lr": 0.01, "dp": True, "noise-multiplier": 1.0, "clipping-norm": 1.0}
    msg = Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(cfg)}),
                  dst_node_id=1, message_type="train")
    with pytest.raises(Exception) as info:  # no reply without its audit entry
        app(msg, ctx)
    flower_reason = f"{type(info.value)}:<'{info.value}'>"  # what Flower's own flwr-clientapp sends
    for reason in (flower_reason, failure_reason(info.value)):  # ... and what cityfed's warm worker sends
        assert "SECRETPATH" not in reason and "audit.jsonl" not in reason, reason
        assert "audit" in reason, reason
