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
