"""The node's own policy on secure aggregation, and the audit of replies its mods send.

``require_secure_aggregation = true``: the node's update leaves only masked by SecAgg+; a plain
train message is refused before any training or ledger row. ``min_secagg_num_shares`` and
``min_secagg_threshold``: the node leaves a SecAgg+ round at its setup stage (before any key or
record is used) when the coordinator's masking is weaker. Each such refusal, a SecAgg+ protocol
abort and a central-DP clipping refusal are written to the node's audit log: an audit of what
left that misses an error reply is not an audit.
"""

import math
import warnings

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import clients.secagg as csecagg
from clients.app import REFUSED, app as client_app
from flower_compat.inprocess import set_task_identity
from flower_compat.secagg import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from privacy.audit import AuditLog
from privacy.ledger import PrivacyLedger
from privacy.policy import PolicyError, parse_policy
from server.app import run_federation
from simulations.inprocess import InProcessGrid

warnings.filterwarnings("ignore", category=UserWarning)
from fed_helpers import POLICY, SITES  # noqa: E402


def _nodes(tmp_path, extra: str, count: int = 4) -> list[dict]:
    out = []
    for site in SITES[:count]:
        pol = tmp_path / f"{site}.toml"
        pol.write_text(POLICY.format(eps=8.0) + extra)
        out.append({"department": "health", "site": site, "policy": str(pol), "ledger": str(tmp_path / f"{site}.sqlite"),
                    "audit-log": str(tmp_path / f"{site}.audit.jsonl")})
    return out


def _cfg(tmp_path, **kw):
    return {"department": "health", "num-rounds": 1, "local-epochs": 1, "batch-size": 64, "lr": 0.02,
            "noise-multiplier": 1.0, "run-dir": str(tmp_path / "run"), **kw}


def _audit(node: dict) -> list[dict]:
    return AuditLog(node["audit-log"]).entries()


def _error_replies(node: dict) -> list[dict]:
    """The fields of the node's audited error replies."""
    return [e["data"] for e in _audit(node) if e["kind"] == "reply" and "error_code" in e["data"]]


def test_a_node_that_requires_secure_aggregation_refuses_a_plain_round(tmp_path):
    nodes = _nodes(tmp_path, "require_secure_aggregation = true\n")
    res = run_federation(InProcessGrid(client_app, nodes), _cfg(tmp_path, secagg=False), run_id="plain")
    assert {(r["node"], r["code"]) for r in res["refused"]} == {(i, REFUSED) for i in range(1, 5)}
    assert all("require_secure_aggregation" in r["reason"] for r in res["refused"])
    for node in nodes:
        assert PrivacyLedger(node["ledger"]).releases(node["site"]) == []  # nothing trained, nothing spent
        (reply,) = _error_replies(node)
        assert reply["error_code"] == REFUSED and "require_secure_aggregation" in reply["reason"]


def test_a_node_that_requires_secure_aggregation_trains_under_secagg(tmp_path):
    nodes = _nodes(tmp_path, "require_secure_aggregation = true\n")
    res = run_federation(InProcessGrid(client_app, nodes), _cfg(tmp_path, secagg=True), run_id="masked")
    assert res["status"] == "completed" and res["refused"] == []
    assert res["rounds"][0]["train"]["accepted"] == 4
    for node in nodes:
        # a fresh DP node first releases its (noised) training-record count, then trains
        assert [r["mechanism"] for r in PrivacyLedger(node["ledger"]).releases(node["site"])] == ["gaussian-count",
                                                                                                  "dp-sgd"]
        replies = [e["data"] for e in _audit(node) if e["kind"] == "reply" and e["data"]["message"].startswith("train")]
        (sent,) = [r for r in replies if "arrays" in r]
        assert all(a["masked"] for a in sent["arrays"])
        # every stage's reply is in the audit log: what it sent (names, never keys or shares), and in the
        # unmask stage whose secrets it revealed shares of
        stages = {r["stage"]: r for r in replies if "stage" in r}
        assert set(stages) == {"setup", "share_keys", "unmask"}
        assert stages["setup"]["sent"] == ["pk1", "pk2"]
        assert sorted(stages["unmask"]["mask_seed_shares_of"]) and stages["unmask"]["mask_key_shares_of"] == []


def test_a_node_leaves_a_secagg_round_whose_threshold_is_below_its_minimum(tmp_path):
    nodes = _nodes(tmp_path, "min_secagg_threshold = 3\n")
    res = run_federation(InProcessGrid(client_app, nodes),
                         _cfg(tmp_path, secagg=True, **{"secagg-num-shares": 3, "secagg-threshold": 2}), run_id="weak")
    assert res["rounds"][0]["train"].get("accepted", 0) == 0
    for node in nodes:
        assert PrivacyLedger(node["ledger"]).releases(node["site"]) == []  # left at setup: nothing trained
        replies = _error_replies(node)
        assert replies and all(r["error_code"] == REFUSED for r in replies)
        assert "min_secagg_threshold" in replies[0]["reason"] and "setup" in replies[0]["reason"]


def _setup_message(shares: int, threshold: int) -> Message:
    cfg = ConfigRecord({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 5, Key.SHARE_NUMBER: shares, Key.THRESHOLD: threshold,
                        Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: 1000.0})
    return Message(RecordDict({RECORD_KEY_CONFIGS: cfg}), dst_node_id=1, message_type="train", group_id="1")


def _context(tmp_path, extra: str) -> tuple[Context, dict]:
    (node,) = _nodes(tmp_path, extra, count=1)
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}), node


@pytest.mark.parametrize("extra,shares,threshold,key", [
    ("min_secagg_threshold = 3\n", 5, 2, "min_secagg_threshold"),
    ("min_secagg_num_shares = 5\n", 3, 2, "min_secagg_num_shares"),
])
def test_the_setup_stage_is_checked_against_the_policy(tmp_path, extra, shares, threshold, key):
    set_task_identity(1, 0, 1)
    ctx, node = _context(tmp_path, extra)
    reply = client_app(_setup_message(shares, threshold), ctx)
    assert reply.has_error() and reply.error.code == REFUSED and key in reply.error.reason
    assert RECORD_KEY_STATE not in ctx.state.config_records  # no keys generated for this round
    (entry,) = _error_replies(node)
    assert entry["reason"] == reply.error.reason


def test_the_setup_stage_passes_at_the_policys_minimums(tmp_path):
    set_task_identity(1, 0, 1)
    ctx, node = _context(tmp_path, "min_secagg_threshold = 3\nmin_secagg_num_shares = 5\n")
    reply = client_app(_setup_message(5, 3), ctx)
    assert not reply.has_error()  # the node's public keys for the next stage
    assert _error_replies(node) == []


def test_a_protocol_abort_is_audited(tmp_path):
    from flower_compat.testing import SecAggPlusState

    set_task_identity(1, 0, 1)
    ctx, node = _context(tmp_path, "")
    st = SecAggPlusState(current_stage=Stage.COLLECT_MASKED_VECTORS, nid=1, threshold=2)
    st.rd_seed_share_dict, st.sk1_share_dict = {1: b"a", 3: b"b"}, {1: b"c", 3: b"d"}
    ctx.state.config_records[RECORD_KEY_STATE] = ConfigRecord(st.to_dict())
    cfg = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 3], Key.DEAD_NODE_ID_LIST: [2]})
    msg = Message(RecordDict({RECORD_KEY_CONFIGS: cfg}), dst_node_id=1, message_type="train", group_id="1")
    reply = client_app(msg, ctx)
    assert reply.has_error() and reply.error.code == csecagg.SECAGG_ABORTED
    (entry,) = _error_replies(node)
    assert entry["error_code"] == csecagg.SECAGG_ABORTED and entry["reason"] == reply.error.reason


def test_a_central_dp_clipping_refusal_is_audited(tmp_path):
    from clients.clipping import BAD_CLIPPING_NORM
    from flower_compat.dp import KEY_CLIPPING_NORM
    from shared_models import build_model, default_model_config
    from citydata import load_department

    set_task_identity(1, 0, 1)
    ctx, node = _context(tmp_path, "")
    torch.manual_seed(0)
    model = build_model(default_model_config(load_department("health").schema))
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "c1", "server-round": 1,
           "local-epochs": 1, "batch-size": 64, "lr": 0.01, "dp": True, "noise-multiplier": 1.0, "clipping-norm": 1.0,
           KEY_CLIPPING_NORM: -1.0}
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(cfg)}),
                  dst_node_id=1, message_type="train")
    reply = client_app(msg, ctx)
    assert reply.has_error() and reply.error.code == BAD_CLIPPING_NORM
    (entry,) = _error_replies(node)
    assert entry["error_code"] == BAD_CLIPPING_NORM and entry["run"] == "c1" and entry["round"] == 1
    assert PrivacyLedger(node["ledger"]).releases() == []


@pytest.mark.parametrize("text,field", [
    ("require_secure_aggregation = 1\n", "require_secure_aggregation"),
    ("min_secagg_threshold = 1\n", "min_secagg_threshold"),
    ("min_secagg_num_shares = 4\n", "min_secagg_num_shares"),
    ("min_secagg_num_shares = 1\n", "min_secagg_num_shares"),
])
def test_bad_secagg_policy_values_name_the_field(text, field):
    with pytest.raises(PolicyError, match=field):
        parse_policy(POLICY.format(eps=8.0) + text)


def _plain_train(ds_state_cfg: dict | None = None, message_type: str = "train") -> Message:
    from shared_models import build_model, default_model_config
    from citydata import load_department

    torch.manual_seed(0)
    model = build_model(default_model_config(load_department("health").schema))
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "p1", "server-round": 1,
           "local-epochs": 1, "batch-size": 64, "lr": 0.01, "dp": True, "noise-multiplier": 1.0, "clipping-norm": 1.0,
           **(ds_state_cfg or {})}
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(cfg)}),
                   dst_node_id=1, message_type=message_type)


@pytest.mark.parametrize("message_type", ["train", "train.default"])
def test_every_type_routed_to_the_train_handler_is_checked(tmp_path, message_type):
    """Flower routes 'train.default' to the same handler as 'train': the policy applies to both (audit finding)."""
    set_task_identity(1, 0, 1)
    ctx, node = _context(tmp_path, "require_secure_aggregation = true\n")
    reply = client_app(_plain_train(message_type=message_type), ctx)
    assert reply.has_error() and reply.error.code == REFUSED and "require_secure_aggregation" in reply.error.reason
    assert PrivacyLedger(node["ledger"]).releases() == []


def test_central_clipping_applies_to_train_default(tmp_path):
    from flower_compat.dp import KEY_CLIPPING_NORM

    set_task_identity(1, 0, 1)
    ctx, node = _context(tmp_path, "central_max_clipping_norm = 0.001\n")
    msg = _plain_train({KEY_CLIPPING_NORM: 1.0}, message_type="train.default")
    before = msg.content["arrays"].to_torch_state_dict()
    reply = client_app(msg, ctx)
    after = reply.content["arrays"].to_torch_state_dict()
    norm = math.sqrt(sum(float(((after[k] - before[k]).double() ** 2).sum()) for k in before))
    assert norm <= 0.001 * (1 + 1e-3)


def test_the_train_handler_refuses_an_unmasked_update_even_without_the_mod(tmp_path, monkeypatch):
    """Defence in depth: a plain train message that reaches the handler past the mod is still refused."""
    import clients.app as capp

    monkeypatch.setattr(capp, "secure_aggregation_mod", lambda spec_of: (lambda m, c, call_next: call_next(m, c)))
    bare = capp.build_client_app()
    set_task_identity(1, 0, 1)
    ctx, node = _context(tmp_path, "require_secure_aggregation = true\n")
    reply = bare(_plain_train(), ctx)
    assert reply.has_error() and reply.error.code == REFUSED and "require_secure_aggregation" in reply.error.reason
    assert PrivacyLedger(node["ledger"]).releases() == []


@pytest.mark.parametrize("active,dead,needle", [([1, 3], [3], "both active and dropped out"),
                                                 ([1, 3, 3], [], "more than once")])
def test_an_unmask_request_that_would_reveal_both_secrets_is_refused(tmp_path, active, dead, needle):
    """A coordinator that names a neighbour both active and dropped out gets nothing (audit finding: with
    Flower's mod alone both of the neighbour's secrets were reconstructed, so its update could be unmasked)."""
    from flower_compat.testing import SecAggPlusState

    set_task_identity(1, 0, 1)
    ctx, node = _context(tmp_path, "")
    st = SecAggPlusState(current_stage=Stage.COLLECT_MASKED_VECTORS, nid=1, threshold=2)
    st.rd_seed_share_dict, st.sk1_share_dict = {1: b"a", 3: b"b"}, {1: b"c", 3: b"d"}
    ctx.state.config_records[RECORD_KEY_STATE] = ConfigRecord(st.to_dict())
    cfg = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})
    reply = client_app(Message(RecordDict({RECORD_KEY_CONFIGS: cfg}), dst_node_id=1, message_type="train",
                               group_id="1"), ctx)
    assert reply.has_error() and reply.error.code == csecagg.SECAGG_ABORTED and needle in reply.error.reason
    assert RECORD_KEY_STATE not in ctx.state.config_records
    (entry,) = _error_replies(node)
    assert entry["stage"] == "unmask" and needle in entry["reason"]


def test_an_honest_unmask_request_is_answered_and_audited(tmp_path):
    from flower_compat.testing import SecAggPlusState

    set_task_identity(1, 0, 1)
    ctx, node = _context(tmp_path, "")
    st = SecAggPlusState(current_stage=Stage.COLLECT_MASKED_VECTORS, nid=1, threshold=2)
    st.rd_seed_share_dict, st.sk1_share_dict = {1: b"a", 3: b"b", 4: b"e"}, {1: b"c", 3: b"d", 4: b"f"}
    ctx.state.config_records[RECORD_KEY_STATE] = ConfigRecord(st.to_dict())
    cfg = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 3], Key.DEAD_NODE_ID_LIST: [4]})
    reply = client_app(Message(RecordDict({RECORD_KEY_CONFIGS: cfg}), dst_node_id=1, message_type="train",
                               group_id="1"), ctx)
    assert not reply.has_error()
    sent = dict(reply.content.config_records[RECORD_KEY_CONFIGS])
    assert list(sent[Key.SHARE_LIST]) == [b"a", b"b", b"f"]  # seed shares of 1 and 3, key share of 4
    (entry,) = [e["data"] for e in _audit(node) if e["kind"] == "reply"]
    assert entry["stage"] == "unmask" and entry["mask_seed_shares_of"] == [1, 3] and entry["mask_key_shares_of"] == [4]
    assert entry["sent"] == sorted([Key.NODE_ID_LIST, Key.SHARE_LIST])  # names of what was sent, not the shares


def test_the_collect_layout_without_the_protocol_is_refused_by_the_handler(tmp_path, monkeypatch):
    """Defence in depth: a message in SecAgg+'s collect layout (legacy FitIns) that reaches the
    handler with no SecAgg+ mod around it would send its update unmasked: refused under the policy."""
    from flwr.common import FitIns, ndarrays_to_parameters

    import clients.app as capp
    from contract.keys import PARAM_NAMES_KEY
    from flower_compat.secagg import recorddict_compat as compat

    monkeypatch.setattr(capp, "secure_aggregation_mod", lambda spec_of: (lambda m, c, call_next: call_next(m, c)))
    bare = capp.build_client_app()
    set_task_identity(1, 0, 1)
    ctx, node = _context(tmp_path, "require_secure_aggregation = true\n")
    plain = _plain_train()
    state = plain.content["arrays"].to_torch_state_dict()
    cfg = {**dict(plain.content["config"]), PARAM_NAMES_KEY: "\n".join(state)}
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([v.numpy() for v in state.values()]), cfg),
                                          keep_input=True)
    reply = bare(Message(content, dst_node_id=1, message_type="train"), ctx)
    assert reply.has_error() and reply.error.code == REFUSED and "require_secure_aggregation" in reply.error.reason
    assert PrivacyLedger(node["ledger"]).releases() == []
