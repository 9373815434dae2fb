"""The audit log of a SecAgg+ node records the masked update only when it leaves.

In the collect stage the node trains (inside Flower's ``secaggplus_mod``), then the mod masks the
update. When the mod aborts after training (a malformed or inconsistent collect message from the
coordinator) the node answers with an error instead: its audit log must then hold the abort entry
alone, never an entry for a masked update that was not sent. The DP-SGD release committed for the
training stays committed (counted once): the noise was computed from the node's records.

Each test drives the node's ClientApp through a real SecAgg+ message sequence (setup and share-keys
with three nodes, then collect for node 1).
"""

import warnings

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters

import clients.secagg as csecagg
from clients.app import REFUSED, app as client_app
from contract.keys import PARAM_NAMES_KEY
from flower_compat.dp import KEY_CLIPPING_NORM
from flower_compat.inprocess import set_task_identity
from flower_compat.secagg import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flower_compat.secagg import recorddict_compat as compat
from privacy.audit import AuditLog
from privacy.ledger import PrivacyLedger
from server.secagg import MAX_WEIGHT

warnings.filterwarnings("ignore", category=UserWarning)
from fed_helpers import health_nodes  # noqa: E402

NODES = (1, 2, 3)
COLLECT = "train (SecAgg+ collect)"


def _send(ctx: Context, nid: int, configs: dict, content: RecordDict | None = None) -> Message:
    content = content if content is not None else RecordDict()
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
    return client_app(Message(content, dst_node_id=nid, message_type="train", group_id="1"), ctx)


def _up_to_collect(tmp_path):
    """Three nodes through SecAgg+'s setup and share-keys stages.

    Returns
    -------
    (nodes, contexts, inbox)
        ``inbox[nid]``: the (source, ciphertext) pairs of key shares addressed to node ``nid``.
    """
    set_task_identity(1, 0, 1)
    nodes = health_nodes(tmp_path, (8.0,) * len(NODES))
    for node in nodes:
        node["audit-log"] = str(tmp_path / f"{node['site']}.audit.jsonl")
    ctxs = {nid: Context(run_id=1, node_id=nid, node_config=node, state=RecordDict(), run_config={})
            for nid, node in zip(NODES, nodes)}
    keys = {}
    for nid, ctx in ctxs.items():
        reply = _send(ctx, nid, {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: len(NODES), Key.SHARE_NUMBER: len(NODES),
                                 Key.THRESHOLD: 2, Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22,
                                 Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: MAX_WEIGHT})
        assert not reply.has_error(), reply.error
        sent = reply.content.config_records[RECORD_KEY_CONFIGS]
        keys[str(nid)] = [sent[Key.PUBLIC_KEY_1], sent[Key.PUBLIC_KEY_2]]
    inbox = {nid: [] for nid in NODES}
    for nid, ctx in ctxs.items():
        reply = _send(ctx, nid, {Key.STAGE: Stage.SHARE_KEYS, **keys})
        assert not reply.has_error(), reply.error
        sent = reply.content.config_records[RECORD_KEY_CONFIGS]
        for dst, ct in zip(sent[Key.DESTINATION_LIST], sent[Key.CIPHERTEXT_LIST], strict=True):
            inbox[int(dst)].append((nid, ct))
    return nodes, ctxs, inbox


def _fitins(**over) -> RecordDict:
    """The collect stage's FitIns: the global model and the job (as server.secagg sends them)."""
    from citydata import load_department
    from shared_models import build_model, default_model_config

    torch.manual_seed(0)
    model = build_model(default_model_config(load_department("health").schema))
    cfg = {"department": "health", "task": "heart-disease", "model": "heart-mlp", "run-id": "sa", "server-round": 1,
           "local-epochs": 1, "batch-size": 64, "lr": 0.01, "dp": True, "noise-multiplier": 1.0, "clipping-norm": 1.0,
           PARAM_NAMES_KEY: "\n".join(model.state_dict()), **over}
    arrays = [v.numpy() for v in model.state_dict().values()]
    return compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), cfg), keep_input=True)


def _collect(ctx, inbox, malformed: str | None = None, **job) -> Message:
    srcs, cts = [s for s, _ in inbox], [c for _, c in inbox]
    if malformed == "unknown source":  # a share said to come from a node that never shared keys with this one
        srcs = [*srcs[:-1], 9]
    elif malformed == "inconsistent lists":  # one source fewer than ciphertexts
        srcs = srcs[:-1]
    elif malformed == "too few neighbours":  # no shares at all: fewer neighbours than the threshold
        srcs, cts = [], []
    return _send(ctx, 1, {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: srcs, Key.CIPHERTEXT_LIST: cts},
                 _fitins(**job))


def _entries(node: dict) -> list[dict]:
    return AuditLog(node["audit-log"]).entries()


def _collect_replies(node: dict) -> list[dict]:
    """The node's audited replies to the collect message (the setup and share-keys replies left out)."""
    return [e["data"] for e in _entries(node)
            if e["kind"] == "reply" and e["data"].get("stage") not in (Stage.SETUP, Stage.SHARE_KEYS)]


def _central(central: bool) -> dict:
    return {KEY_CLIPPING_NORM: 1.0} if central else {}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("central", [False, True], ids=["local-dp", "central-dp"])
def test_the_masked_update_that_leaves_is_audited_once(tmp_path, central):
    nodes, ctxs, inbox = _up_to_collect(tmp_path)
    reply = _collect(ctxs[1], inbox[1], **_central(central))
    assert not reply.has_error(), reply.error
    assert Key.MASKED_PARAMETERS in reply.content.config_records[RECORD_KEY_CONFIGS]
    (entry,) = _collect_replies(nodes[0])
    assert entry["message"] == COLLECT and entry["run"] == "sa" and entry["round"] == 1 and "error_code" not in entry
    assert entry["arrays"] and all(a["masked"] for a in entry["arrays"])
    # the node's first DP round releases its (noised) training-record count first: one gaussian-count row
    count_row, row = PrivacyLedger(nodes[0]["ledger"]).releases(nodes[0]["site"])
    assert count_row["mechanism"] == "gaussian-count" and count_row["status"] == "committed"
    assert (count_row["run_id"], count_row["round"], count_row["noise_multiplier"]) == ("sa", 1, 10.0)
    assert row["mechanism"] == "dp-sgd" and row["status"] == "committed"
    (count,) = PrivacyLedger(nodes[0]["ledger"]).counts(nodes[0]["site"])
    assert count["split"] == "train" and count["release_id"] == count_row["id"]
    claims = PrivacyLedger(nodes[0]["ledger"]).central_claims()
    assert len(claims) == (1 if central else 0)
    assert len([e for e in _entries(nodes[0]) if e["kind"] == "central-dp"]) == len(claims)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("central", [False, True], ids=["local-dp", "central-dp"])
@pytest.mark.parametrize("malformed", ["unknown source", "inconsistent lists", "too few neighbours"])
def test_a_protocol_abort_after_training_is_audited_as_the_abort_alone(tmp_path, malformed, central):
    nodes, ctxs, inbox = _up_to_collect(tmp_path)
    node = nodes[0]
    reply = _collect(ctxs[1], inbox[1], malformed, **_central(central))
    assert reply.has_error() and reply.error.code == csecagg.SECAGG_ABORTED
    assert "collect_masked_vectors" in reply.error.reason
    assert RECORD_KEY_STATE not in ctxs[1].state.config_records  # the next round starts from setup
    # what left: the abort, and nothing else
    replies = _collect_replies(node)
    assert not [r for r in replies if "arrays" in r], replies  # no masked update was sent
    (entry,) = replies
    assert entry["error_code"] == csecagg.SECAGG_ABORTED and entry["reason"] == reply.error.reason
    assert entry["stage"] == Stage.COLLECT_MASKED_VECTORS
    # the node did train: its DP-SGD release stays committed, once (the noise was drawn from its records)
    ledger = PrivacyLedger(node["ledger"])
    # the training-record count was released (noised, accounted) before training: its row and audit entry come first
    count_row, row = ledger.releases(node["site"])
    assert count_row["mechanism"] == "gaussian-count" and count_row["status"] == "committed" and count_row["round"] == 1
    assert row["mechanism"] == "dp-sgd" and row["status"] == "committed" and row["round"] == 1
    releases = [e["data"] for e in _entries(node) if e["kind"] == "release"]
    assert [(r["mechanism"], r.get("split")) for r in releases] == [("gaussian-count", "train"), ("dp-sgd", None)]
    # no central-DP participation is recorded for an update that was not sent
    assert ledger.central_claims() == []
    assert not [e for e in _entries(node) if e["kind"] == "central-dp"]


@pytest.mark.timeout(180)
def test_a_refusal_inside_the_collect_stage_is_audited_once(tmp_path):
    nodes, ctxs, inbox = _up_to_collect(tmp_path)
    reply = _collect(ctxs[1], inbox[1], **{"noise-multiplier": 0.1})  # under the policy's minimum
    assert reply.has_error() and reply.error.code == REFUSED
    assert RECORD_KEY_STATE not in ctxs[1].state.config_records
    (entry,) = _collect_replies(nodes[0])
    assert entry["message"] == COLLECT and entry["error_code"] == REFUSED and entry["reason"] == reply.error.reason
    assert "arrays" not in entry
    assert PrivacyLedger(nodes[0]["ledger"]).releases(nodes[0]["site"]) == []  # refused before training
    assert PrivacyLedger(nodes[0]["ledger"]).counts() == []  # refused outright: no record count released either


# --------------------------------------------------------------------------- a hostile coordinator's
# SecAgg+ messages (independent review of 2026-12-06): each must leave no individual update behind.


def _dp_sgd_rows(node: dict) -> int:
    return sum(r["mechanism"] == "dp-sgd" for r in PrivacyLedger(node["ledger"]).releases())


def _sent_arrays(reply: Message) -> int:
    return 0 if reply.has_error() else sum(len(rec) for rec in reply.content.array_records.values())


def _masked_audits(node: dict) -> list[dict]:
    return [e["data"] for e in _entries(node) if e["kind"] == "reply"
            and any(a.get("masked") for a in e["data"].get("arrays", []))]


def _one_node(tmp_path, required: bool) -> tuple[dict, Context]:
    """One hospital node (its policy requiring SecAgg+ or not) and a fresh context."""
    set_task_identity(1, 0, 1)
    (node,) = health_nodes(tmp_path, (8.0,))
    node["audit-log"] = str(tmp_path / "audit.jsonl")
    if required:
        with open(node["policy"], "a") as fh:
            fh.write("require_secure_aggregation = true\n")
    return node, Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


@pytest.mark.timeout(180)
@pytest.mark.parametrize("required", [True, False], ids=["secagg-required", "secagg-optional"])
@pytest.mark.parametrize("stage", [Stage.COLLECT_MASKED_VECTORS, Stage.SETUP])
def test_a_secagg_message_of_another_type_never_sends_an_update(tmp_path, required, stage):
    """Flower's secaggplus_mod masks only type ``train``; ``train.default`` reaches the same handler unmasked."""
    node, ctx = _one_node(tmp_path, required)
    content = _fitins()
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: stage})
    reply = client_app(Message(content, dst_node_id=1, message_type="train.default", group_id="1"), ctx)
    assert reply.has_error() and reply.error.code in (REFUSED, csecagg.SECAGG_ABORTED), reply
    assert "train.default" in reply.error.reason, reply.error.reason
    assert _dp_sgd_rows(node) == 0  # refused before training
    assert _masked_audits(node) == []  # and never recorded as a masked update


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("field", "value"), [
    (Key.MOD_RANGE, 2), (Key.MOD_RANGE, 3), (Key.MOD_RANGE, 1 << 16), (Key.MOD_RANGE, (1 << 32) - 1),
    (Key.TARGET_RANGE, 0), (Key.TARGET_RANGE, -5), (Key.TARGET_RANGE, 1 << 32),
    (Key.CLIPPING_RANGE, 0.0), (Key.CLIPPING_RANGE, -1.0), (Key.CLIPPING_RANGE, float("nan")),
    (Key.CLIPPING_RANGE, float("inf")), (Key.MAX_WEIGHT, 0.0), (Key.MAX_WEIGHT, float("nan")),
])
@pytest.mark.parametrize("required", [True, False], ids=["secagg-required", "secagg-optional"])
def test_setup_with_a_weak_modulus_or_bad_quantisation_is_refused(tmp_path, field, value, required):
    """A modulus of 2 makes every mask 0: the "masked" vector was the quantised update in the clear."""
    node, ctx = _one_node(tmp_path, required)
    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
             Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: MAX_WEIGHT}
    reply = _send(ctx, 1, {**setup, field: value})
    assert reply.has_error() and reply.error.code in (REFUSED, csecagg.SECAGG_ABORTED), reply
    assert field in reply.error.reason, reply.error.reason
    assert RECORD_KEY_STATE not in ctx.state.config_records  # no keys kept for a later stage
    assert any(e["kind"] == "reply" and e["data"].get("error_code") for e in _entries(node))
    # the sound setup still passes
    ok = _send(Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}), 1, setup)
    assert not ok.has_error(), ok.error


@pytest.mark.timeout(180)
def test_share_keys_with_fewer_neighbours_than_the_policy_is_refused(tmp_path):
    """Setup says 3 shares; share-keys then names one neighbour: with one, a 32-bit mask seed is all that hides it."""
    set_task_identity(1, 0, 1)
    nodes = health_nodes(tmp_path, (8.0, 8.0))
    for node in nodes:
        node["audit-log"] = str(tmp_path / f"{node['site']}.audit.jsonl")
    ctxs = {nid: Context(run_id=1, node_id=nid, node_config=node, state=RecordDict(), run_config={})
            for nid, node in zip((1, 2), nodes)}
    keys = {}
    for nid, ctx in ctxs.items():  # the setup claims 3 shares (the policy minimum)
        reply = _send(ctx, nid, {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3,
                                 Key.THRESHOLD: 2, Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22,
                                 Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: MAX_WEIGHT})
        assert not reply.has_error(), reply.error
        sent = reply.content.config_records[RECORD_KEY_CONFIGS]
        keys[str(nid)] = [sent[Key.PUBLIC_KEY_1], sent[Key.PUBLIC_KEY_2]]
    reply = _send(ctxs[1], 1, {Key.STAGE: Stage.SHARE_KEYS, **keys, "01": keys["1"], "+2": keys["2"]})
    # itself and one neighbour, each named twice (Flower's mod reads "01" as node 1)
    assert reply.has_error() and reply.error.code in (REFUSED, csecagg.SECAGG_ABORTED), reply
    assert "neighbour" in reply.error.reason and "min_secagg_num_shares" in reply.error.reason, reply.error.reason
    assert RECORD_KEY_STATE not in ctxs[1].state.config_records
    reply = _collect(ctxs[1], [])  # a collect after it finds no protocol state: nothing is trained
    assert reply.has_error() and _dp_sgd_rows(nodes[0]) == 0, reply


@pytest.mark.timeout(180)
def test_a_plain_layout_in_the_collect_stage_is_refused_before_training(tmp_path):
    """Inside the collect stage only the FitIns layout is masked; a plain message trained, audited a reply, then aborted."""
    nodes, ctxs, inbox = _up_to_collect(tmp_path)
    from citydata import load_department
    from shared_models import build_model, default_model_config

    torch.manual_seed(0)
    model = build_model(default_model_config(load_department("health").schema))
    content = RecordDict()
    content.array_records["arrays"] = ArrayRecord(model.state_dict())
    content.config_records["config"] = ConfigRecord(dict(_fitins().config_records["fitins.config"]))
    srcs, cts = [s for s, _ in inbox[1]], [c for _, c in inbox[1]]
    reply = _send(ctxs[1], 1, {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: srcs,
                               Key.CIPHERTEXT_LIST: cts}, content)
    assert reply.has_error(), reply
    assert _dp_sgd_rows(nodes[0]) == 0
    assert not [e for e in _collect_replies(nodes[0]) if e.get("arrays")]  # no reply recorded that never left


@pytest.mark.timeout(180)
def test_a_collect_reply_without_masked_vectors_never_leaves(tmp_path, monkeypatch):
    """Defence in depth: whatever Flower's mod returns from the collect stage must carry masked vectors only."""
    nodes, ctxs, inbox = _up_to_collect(tmp_path)
    monkeypatch.setattr(csecagg, "secaggplus_mod", lambda msg, ctxt, call_next: call_next(msg, ctxt))
    reply = _collect(ctxs[1], inbox[1])
    assert reply.has_error() and reply.error.code == csecagg.SECAGG_ABORTED, reply
    assert _sent_arrays(reply) == 0
    assert _masked_audits(nodes[0]) == []


@pytest.mark.timeout(180)
def test_every_secagg_stage_reply_is_audited_with_its_flower_run(tmp_path):
    """The setup, share-keys and unmask messages carry no job config: their reply entries said ``"run": ""`` and
    could not be tied to a run. Every reply entry now names the Flower run ID of the message it answers."""
    nodes, ctxs, inbox = _up_to_collect(tmp_path)
    replies = [e["data"] for e in _entries(nodes[0]) if e["kind"] == "reply"]
    assert [r.get("stage") for r in replies] == [Stage.SETUP, Stage.SHARE_KEYS], replies
    assert all(r["flower-run"] == "1" for r in replies), replies
