"""The tamper-evident audit log (privacy/audit.py), its CLI (privacy/audit_cli.py) and the
coordinator's entries (fl-server commands, the ServerApp's refusals/exclusions)."""

from __future__ import annotations

import base64
import json
import math
import multiprocessing
import os
import stat
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from privacy import audit, pki  # noqa: E402
from privacy.audit_cli import make_audit_app  # noqa: E402

runner = CliRunner(env={"COLUMNS": "250"})


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A department node key pair (OpenSSH P-384, as `fl-pki node-key` makes) and a second one."""
    d = tmp_path_factory.mktemp("keys")
    key, pub, _ = pki.create_node_key(d / "node", "health", "Cleveland")
    other_key, other_pub, _ = pki.create_node_key(d / "other", "health", "Hungary")
    return {"key": key, "pub": pub, "other_key": other_key, "other_pub": other_pub}


def make_log(path: Path, key: Path | None, n: int) -> audit.AuditLog:
    log = audit.AuditLog(path, key_path=key)
    for i in range(1, n + 1):
        log.append("job" if i % 2 else "release", round=i, site="Cleveland", epsilon=0.5 * i)
    return log


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, ls: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in ls))


# --------------------------------------------------------------------------- round trip


def test_append_verify_round_trip_signed(keys, tmp_path):
    log = audit.AuditLog(tmp_path / "audit.jsonl", key_path=keys["key"])
    first = log.append("approve", fab="abc123", user="ops", epsilon=float("inf"), arr=np.arange(3), f=np.float32(0.25))
    second = log.append("release", **{"run-id": "7", "round": 1}, eps=np.float64(1.5), missing=None)
    assert first["seq"] == 1 and first["prev"] == audit.GENESIS and second["prev"] == first["hash"]
    assert first["data"] == {"fab": "abc123", "user": "ops", "epsilon": "inf", "arr": [0, 1, 2], "f": 0.25}
    assert first["time"].endswith("+00:00") and base64.b64decode(first["sig"])
    assert log.entries() == [first, second]
    assert stat.S_IMODE(os.stat(log.path).st_mode) == 0o600
    head = json.loads(log.head_path.read_text())
    assert head == {"seq": 2, "hash": second["hash"], "signature": second["sig"]}

    res = audit.verify(log.path, public_key_path=keys["pub"])
    assert res.ok and res.entries == 2 and res.first_bad is None and res.signatures_checked
    assert "signed by SHA256:" in res.reason
    res = audit.verify(log.path)
    assert res.ok and not res.signatures_checked and "NOT checked" in res.reason
    # another node's key did not sign it
    res = audit.verify(log.path, public_key_path=keys["other_pub"])
    assert not res.ok and res.first_bad == 1 and "signature" in res.reason


def test_unsigned_log_verifies_chain_but_fails_when_a_key_is_expected(keys, tmp_path):
    log = make_log(tmp_path / "a.jsonl", None, 3)
    assert all("sig" not in e for e in log.entries())
    assert audit.verify(log.path).ok
    res = audit.verify(log.path, public_key_path=keys["pub"])
    assert not res.ok and res.first_bad == 1 and "not signed" in res.reason


def test_coordinator_pem_key_created_once_with_0600(tmp_path):
    key = audit.ensure_signing_key(tmp_path / "state" / "audit.key")
    pub = tmp_path / "state" / "audit.pub"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY")
    before = key.read_bytes()
    assert audit.ensure_signing_key(key) == key and key.read_bytes() == before  # never replaced
    log = make_log(tmp_path / "c.jsonl", key, 2)
    assert audit.verify(log.path, public_key_path=pub).ok


def test_values_without_json_form_are_refused(tmp_path):
    log = audit.AuditLog(tmp_path / "a.jsonl")
    with pytest.raises(audit.AuditError, match=r"fields\.thing: object value"):
        log.append("x", thing=object())
    assert log.append("x", v=[float("-inf"), float("nan"), (1, 2)], p=Path("/a"))["data"] == {
        "v": ["-inf", "nan", [1, 2]], "p": "/a"}


def test_bad_key_files_are_clear_errors(keys, tmp_path):
    with pytest.raises(audit.AuditError, match="node.pub"):
        audit.AuditLog(tmp_path / "a.jsonl", key_path=keys["pub"])  # the public half
    with pytest.raises(audit.AuditError, match="cannot read"):
        audit.AuditLog(tmp_path / "a.jsonl", key_path=tmp_path / "nope.key")
    with pytest.raises(audit.AuditError, match="does not exist"):
        audit.verify(tmp_path / "missing.jsonl")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k not in ("kind", "self")), json_values,
                              max_size=5),
       kind=st.text(min_size=1, max_size=20))
def test_arbitrary_json_fields_round_trip(fields, kind):
    with tempfile.TemporaryDirectory() as d:
        log = audit.AuditLog(Path(d) / "a.jsonl")
        log.append("before", n=1)
        entry = log.append(kind, **fields)
        assert entry["data"] == fields and entry["kind"] == kind
        assert log.entries()[-1] == entry
        res = audit.verify(log.path)
        assert res.ok and res.entries == 2, res.reason


# --------------------------------------------------------------------------- tampering


def test_every_single_flipped_byte_is_detected_at_its_entry(keys, tmp_path):
    log = make_log(tmp_path / "a.jsonl", keys["key"], 3)
    raw = log.path.read_bytes()
    head = log.head_path.read_bytes()
    bad, target = tmp_path / "b.jsonl", tmp_path / "b.jsonl.head"
    target.write_bytes(head)
    for pos in range(len(raw)):
        b = bytearray(raw)
        b[pos] ^= 0x01
        bad.write_bytes(bytes(b))
        res = audit.verify(bad, public_key_path=keys["pub"])
        expected = raw[:pos].count(b"\n") + 1  # the entry (line) holding the byte; its newline counts as its own
        assert not res.ok and res.first_bad == expected, (pos, res)
        assert f"seq {expected}" in res.reason


def test_untouched_log_verifies(keys, tmp_path):
    log = make_log(tmp_path / "a.jsonl", keys["key"], 6)
    res = audit.verify(log.path, public_key_path=keys["pub"])
    assert res.ok and res.entries == 6, res.reason


def test_deleted_entry_is_named(keys, tmp_path):
    log = make_log(tmp_path / "a.jsonl", keys["key"], 5)
    ls = lines(log.path)
    write_lines(log.path, ls[:2] + ls[3:])
    res = audit.verify(log.path, public_key_path=keys["pub"])
    assert not res.ok and res.first_bad == 3 and "seq 3 is missing" in res.reason and "deleted" in res.reason


def test_deleted_last_entry_is_a_truncation(keys, tmp_path):
    log = make_log(tmp_path / "a.jsonl", keys["key"], 5)
    write_lines(log.path, lines(log.path)[:-1])
    res = audit.verify(log.path, public_key_path=keys["pub"])
    assert not res.ok and res.first_bad == 5 and "truncated" in res.reason


def test_swapped_entries_are_named(keys, tmp_path):
    log = make_log(tmp_path / "a.jsonl", keys["key"], 5)
    ls = lines(log.path)
    ls[1], ls[2] = ls[2], ls[1]
    write_lines(log.path, ls)
    res = audit.verify(log.path, public_key_path=keys["pub"])
    assert not res.ok and res.first_bad == 2 and "reordered" in res.reason and "seq 2" in res.reason


def test_truncated_tail_names_the_missing_seq(keys, tmp_path):
    log = make_log(tmp_path / "a.jsonl", keys["key"], 5)
    write_lines(log.path, lines(log.path)[:3])
    res = audit.verify(log.path, public_key_path=keys["pub"])
    assert not res.ok and res.first_bad == 4 and res.entries == 3
    assert "entry seq 4 is missing" in res.reason and "truncated" in res.reason and "seq 5" in res.reason
    # and appending on top of the cut log is refused, so the evidence is not overwritten
    with pytest.raises(audit.AuditError, match=r"ends at seq 3 but its head file .*a\.jsonl\.head records seq 5"):
        log.append("later")


def test_partial_last_line_is_broken_then_recovered_on_next_append(keys, tmp_path):
    log = make_log(tmp_path / "a.jsonl", keys["key"], 3)
    good = log.path.read_bytes()
    partial = b'{"data":{"round":4},"hash":"ab'
    log.path.write_bytes(good + partial)  # a crash mid-write: the head still says seq 3
    res = audit.verify(log.path, public_key_path=keys["pub"])
    assert not res.ok and res.first_bad == 4 and "incomplete" in res.reason
    assert len(log.entries()) == 3  # show still works
    entry = log.append("after-crash", x=1)
    rec = log.entries()[3]
    assert rec["kind"] == "recovered" and rec["data"]["discarded-bytes"] == len(partial)
    assert entry["seq"] == 5 and entry["prev"] == rec["hash"]
    assert audit.verify(log.path, public_key_path=keys["pub"]).ok


def test_bad_signature_is_named(keys, tmp_path):
    log = make_log(tmp_path / "a.jsonl", keys["key"], 4)
    ls = lines(log.path)
    e = json.loads(ls[1])
    other = audit.load_private_key(keys["other_key"])
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    e["sig"] = base64.b64encode(other.sign(bytes.fromhex(e["hash"]), ec.ECDSA(hashes.SHA256()))).decode()
    ls[1] = audit.canonical(e)
    write_lines(log.path, ls)
    res = audit.verify(log.path, public_key_path=keys["pub"])
    assert not res.ok and res.first_bad == 2 and "bad signature" in res.reason and "seq 2" in res.reason


def test_rehashed_edit_without_the_key_fails_on_the_signature(keys, tmp_path):
    """Someone without node.key edits entry 2 and recomputes every hash: the chain verifies, the signature does not."""
    log = make_log(tmp_path / "a.jsonl", keys["key"], 4)
    ents = [json.loads(x) for x in lines(log.path)]
    ents[1]["data"]["epsilon"] = 0.01
    prev = audit.GENESIS
    for e in ents:
        e["prev"] = prev
        e["hash"] = prev = audit.entry_hash(e)
    write_lines(log.path, [audit.canonical(e) for e in ents])
    log.head_path.write_text(json.dumps({"seq": 4, "hash": ents[-1]["hash"], "signature": ents[-1]["sig"]}))
    assert audit.verify(log.path).ok  # without the public key only the chain is checked ...
    res = audit.verify(log.path, public_key_path=keys["pub"])  # ... with it the edit shows
    assert not res.ok and res.first_bad == 2 and "bad signature" in res.reason


def test_head_file_missing_or_disagreeing(keys, tmp_path):
    log = make_log(tmp_path / "a.jsonl", keys["key"], 3)
    head = log.head_path.read_bytes()
    log.head_path.unlink()
    res = audit.verify(log.path)
    assert not res.ok and "head file" in res.reason and "missing" in res.reason
    h = json.loads(head)
    h["hash"] = "0" * 64
    log.head_path.write_text(json.dumps(h))
    res = audit.verify(log.path)
    assert not res.ok and res.first_bad == 3 and "head" in res.reason


def test_off_host_anchor_catches_a_cut_with_a_rewritten_head(keys, tmp_path):
    log = make_log(tmp_path / "a.jsonl", keys["key"], 5)
    anchor = tmp_path / "offhost.head"
    anchor.write_bytes(log.head_path.read_bytes())
    ls = lines(log.path)[:3]
    write_lines(log.path, ls)
    last = json.loads(ls[-1])
    log.head_path.write_text(json.dumps({"seq": 3, "hash": last["hash"], "signature": last["sig"]}))
    assert audit.verify(log.path, public_key_path=keys["pub"]).ok  # a prefix of a valid log is valid ...
    res = audit.verify(log.path, public_key_path=keys["pub"], anchor=anchor)  # ... but not against the anchor
    assert not res.ok and res.first_bad == 4 and "anchor" in res.reason


# --------------------------------------------------------------------------- concurrency


def _append_many(path: str, key: str, worker: int, n: int) -> None:
    log = audit.AuditLog(path, key_path=key)
    for i in range(n):
        log.append("tick", worker=worker, i=i)


def test_concurrent_appends_from_processes_give_one_valid_chain(keys, tmp_path):
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), str(keys["key"]), w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    res = audit.verify(path, public_key_path=keys["pub"])
    assert res.ok and res.entries == 200, res.reason
    ents = audit.AuditLog(path).entries()
    assert [e["seq"] for e in ents] == list(range(1, 201))
    for w in range(4):
        assert [e["data"]["i"] for e in ents if e["data"]["worker"] == w] == list(range(50))


def test_append_reads_only_the_tail(tmp_path, monkeypatch):
    log = audit.AuditLog(tmp_path / "a.jsonl")
    log.append("big", blob="x" * 20000)
    log.append("small", n=1)
    read = []
    real_pread, real_read = os.pread, Path.read_bytes
    monkeypatch.setattr(os, "pread", lambda fd, n, off: read.append(n) or real_pread(fd, n, off))
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: pytest.fail("append read the whole log") if self == log.path else real_read(self))
    log.append("next", n=2)
    assert sum(read) <= 8192


# --------------------------------------------------------------------------- CLI


def _cli(log: Path, pub: Path | None):
    return make_audit_app("node", lambda: log, lambda _log: pub)


def _text(res) -> str:
    return " ".join((res.output + (res.stderr if res.stderr_bytes is not None else "")).split())


def test_cli_verify_ok_and_broken(keys, tmp_path):
    log = make_log(tmp_path / "audit.jsonl", keys["key"], 4)
    app = _cli(log.path, keys["pub"])
    res = runner.invoke(app, ["verify"])
    assert res.exit_code == 0 and "OK" in _text(res) and "4 entries" in _text(res)
    ls = lines(log.path)
    ls[1], ls[2] = ls[2], ls[1]
    write_lines(log.path, ls)
    res = runner.invoke(app, ["verify"])
    text = _text(res)
    assert res.exit_code == 1 and "BROKEN" in text and "seq 2" in text and "first broken entry (line 2)" in text
    # without a public key the log is not verified (exit 1, says how) unless a chain-only check is asked for
    good = make_log(tmp_path / "g.jsonl", keys["key"], 2)
    res = runner.invoke(_cli(good.path, None), ["verify"])
    assert res.exit_code == 1 and "NOT VERIFIED" in _text(res) and "--pub" in _text(res) and "--chain-only" in _text(res)
    res = runner.invoke(_cli(good.path, None), ["verify", "--chain-only"])
    assert res.exit_code == 0 and "signatures not checked (--chain-only)" in _text(res)
    # --log / --pub override the defaults
    res = runner.invoke(app, ["verify", "--log", str(good.path), "--pub", str(keys["other_pub"])])
    assert res.exit_code == 1 and "bad signature" in _text(res)


def test_cli_missing_log_is_a_clear_error(tmp_path, keys):
    app = _cli(tmp_path / "none.jsonl", keys["pub"])
    for cmd in (["verify"], ["show"], ["export"]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2 and "does not exist" in _text(res) and "--log" in _text(res)
        assert "Traceback" not in _text(res) and (res.exception is None or isinstance(res.exception, SystemExit))


def test_cli_unexpected_error_without_traceback_unless_debug(keys, tmp_path, monkeypatch):
    log = make_log(tmp_path / "audit.jsonl", keys["key"], 1)

    def boom(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(audit, "verify", boom)
    res = runner.invoke(_cli(log.path, keys["pub"]), ["verify"])
    assert res.exit_code == 2 and "unexpected RuntimeError: boom" in _text(res) and "--debug" in _text(res)
    assert "Traceback" not in _text(res)
    res = runner.invoke(_cli(log.path, keys["pub"]), ["verify", "--debug"])
    assert isinstance(res.exception, RuntimeError)


def test_cli_show_filters(keys, tmp_path):
    log = make_log(tmp_path / "audit.jsonl", keys["key"], 5)
    app = _cli(log.path, keys["pub"])
    res = runner.invoke(app, ["show"])
    text = _text(res)
    assert res.exit_code == 0 and "job" in text and "release" in text and "site=Cleveland" in text
    res = runner.invoke(app, ["show", "--kind", "release"])
    assert res.exit_code == 0 and "release" in _text(res) and " job " not in _text(res)
    res = runner.invoke(app, ["show", "--last", "1"])
    assert res.exit_code == 0 and "round=5" in _text(res) and "round=4" not in _text(res)


def test_cli_export_stdout_and_file(keys, tmp_path):
    log = make_log(tmp_path / "audit.jsonl", keys["key"], 3)
    app = _cli(log.path, keys["pub"])
    res = runner.invoke(app, ["export"])
    assert res.exit_code == 0 and res.stdout_bytes == log.path.read_bytes()
    out = tmp_path / "copy.jsonl"
    res = runner.invoke(app, ["export", "-o", str(out)])
    assert res.exit_code == 0 and out.read_bytes() == log.path.read_bytes()
    assert audit.verify(out, public_key_path=keys["pub"]).ok  # the copy carries its head and verifies
    # the copy is as private as the log (0600; it was written 0644 by the umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600 == stat.S_IMODE(os.stat(str(out) + ".head").st_mode)
    res = runner.invoke(app, ["export", "-o", str(out)])
    assert res.exit_code == 2 and "--force" in _text(res)
    # the off-host copy anchors the live log
    log.append("later")
    res = runner.invoke(app, ["verify", "--anchor", str(out) + ".head"])
    assert res.exit_code == 0 and "anchored entry seq 3" in _text(res)


# --------------------------------------------------------------------------- coordinator


@pytest.fixture()
def server_cli():
    from server import cli

    return cli


def _started(server_cli, tmp_path) -> Path:
    sd = tmp_path / "state"
    server_cli.write_connection(sd, "127.0.0.1:1", tmp_path / "ca.crt", insecure=False)
    (sd / "coordinator.json").write_text(json.dumps({"address": "127.0.0.1:1"}))
    return sd


def test_fl_server_commands_write_signed_coordinator_entries(server_cli, keys, tmp_path, monkeypatch):
    sd = _started(server_cli, tmp_path)
    answers = {"register": {"success": True, "node-id": 42}, "unregister": {"success": True},
               "run": {"success": True, "run-id": "77"}, "stop": {"success": True}}
    monkeypatch.setattr(server_cli, "flwr", lambda s, *args, **kw: answers[args[1] if args[0] == "supernode" else args[0]])
    base = ["--state-dir", str(sd)]
    argv = ["fl-server", "run", "--department", "health", "--name", "r1", "--state-dir", str(sd)]
    monkeypatch.setattr(sys, "argv", argv)
    for cmd in (["register", str(keys["pub"]), *base], argv[1:], ["run", "--resume", "r1", *base],
                ["stop", "77", *base], ["unregister", "42", *base]):
        res = runner.invoke(server_cli.app, cmd)
        assert res.exit_code == 0, res.output
    log, key, pub = server_cli.audit_paths(sd.resolve())
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and pub.exists()
    ents = audit.AuditLog(log).entries()
    assert [e["kind"] for e in ents] == ["register", "run", "run", "stop", "unregister"]
    fp = pki.load_public_key(keys["pub"]).fingerprint
    assert ents[0]["data"]["fingerprint"] == fp and ents[0]["data"]["node-id"] == "42"
    assert ents[0]["data"]["name"] == "health-Cleveland"
    run = ents[1]["data"]
    assert run["argv"] == argv and run["run-id"] == "77" and run["department"] == "health"
    assert run["folder"].endswith("/runs/r1") and run["resumed"] is False and run["config"]["secagg"] is True
    assert ents[2]["data"]["resumed"] is True and ents[3]["data"]["run-id"] == "77"
    assert ents[4]["data"]["fingerprint"] == fp
    assert audit.verify(log, public_key_path=pub).ok
    # `fl-server audit ...` is mounted and finds the log under $CITYFED_STATE_DIR
    monkeypatch.setenv("CITYFED_STATE_DIR", str(sd))
    res = runner.invoke(server_cli.app, ["audit", "verify"])
    assert res.exit_code == 0 and "5 entries" in _text(res) and "signed by" in _text(res)
    res = runner.invoke(server_cli.app, ["audit", "show", "--kind", "run"])
    assert res.exit_code == 0 and "run-id=77" in _text(res)


def test_coordinator_audit_failure_is_reported_not_a_traceback(server_cli, keys, tmp_path, monkeypatch):
    sd = _started(server_cli, tmp_path)
    monkeypatch.setattr(server_cli, "flwr", lambda s, *args, **kw: {"success": True, "node-id": 1})
    (sd / "audit.jsonl").mkdir()  # cannot be opened as a file
    res = runner.invoke(server_cli.app, ["register", str(keys["pub"]), "--state-dir", str(sd)])
    assert res.exit_code == 1 and "NOT recorded" in _text(res) and "audit.jsonl" in _text(res)


def _arrays(d: dict):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(v) for k, v in d.items()})


def _reply(to, node: int, *, error: str | None = None, arrays=None):
    from flwr.app import Error, Message, MetricRecord, RecordDict

    msg = Message(to.content, dst_node_id=node, message_type="train")
    if error:
        return Message(Error(code=1, reason=error), reply_to=msg)
    return Message(RecordDict({"arrays": _arrays(arrays), "metrics": MetricRecord({"num-examples": 10})}),
                   reply_to=msg)


def test_serverapp_refusals_and_exclusions_are_audited_when_the_env_says_so(keys, tmp_path, monkeypatch):
    from flwr.app import Message, RecordDict

    from flower_compat.inprocess import set_task_identity
    from server.strategy import GuardedStrategy, make_strategy

    set_task_identity(7, 0, 1)
    glob = {"w": np.zeros(3, dtype=np.float32)}
    out = Message(RecordDict({"arrays": _arrays(glob)}), dst_node_id=1, message_type="train")
    replies = [_reply(out, 5, error="policy: epsilon budget spent"),
               _reply(out, 6, arrays={"w": np.array([np.nan, 0, 0], dtype=np.float32)}),
               _reply(out, 7, arrays={"w": np.ones(3, dtype=np.float32)})]

    def run_round(history=None):
        s = GuardedStrategy(make_strategy("fedavg"), max_update_norm=10.0, run_id="run-7", history=history)
        s._global = glob
        s.aggregate_train(1, replies)
        return s

    log = tmp_path / "coord" / "audit.jsonl"
    run_round()  # simulation: no env var, nothing written
    assert not log.exists()
    key = audit.ensure_signing_key(tmp_path / "coord" / "audit.key")
    monkeypatch.setenv(audit.ENV_LOG, str(log))
    monkeypatch.setenv(audit.ENV_KEY, str(key))
    s = run_round()
    ents = audit.AuditLog(log).entries()
    assert [e["kind"] for e in ents] == ["refused", "excluded"]
    assert ents[0]["data"] == {"run-id": "run-7", "round": 1, "node": 5, "code": 1, "reason": "policy: epsilon budget spent"}
    assert ents[1]["data"]["node"] == 6 and "NaN" in ents[1]["data"]["reason"]
    assert audit.verify(log, public_key_path=tmp_path / "coord" / "audit.pub").ok
    # a resumed run does not re-audit what its restored history already holds
    run_round(history=json.loads(json.dumps(s.history)))
    assert [e["kind"] for e in audit.AuditLog(log).entries()] == ["refused", "excluded"] * 2
    s2 = GuardedStrategy(make_strategy("fedavg"), max_update_norm=10.0, run_id="run-7", history=json.loads(json.dumps(s.history)))
    s2._save()
    assert len(audit.AuditLog(log).entries()) == 4


def test_fl_server_start_passes_the_audit_log_to_the_superlink_environment(server_cli, monkeypatch, tmp_path):
    """`fl-server start` records a `start` entry and exports CITYFED_AUDIT_LOG/KEY before launching Flower."""
    from flower_compat.testing import supercore_logger
    from flower_compat.testing import superlink_cli_flower_superlink as fs  # (the module, not the package's function)

    import signal

    import uvicorn.server

    seen = {}

    def fake_superlink():
        seen.update({k: os.environ.get(k) for k in (audit.ENV_LOG, audit.ENV_KEY)})
        raise server_cli._StopRequested(signal.SIGTERM)  # the operator stopped it: a clean exit

    monkeypatch.setattr(fs, "flower_superlink", fake_superlink)
    # start installs its supervisor hooks and signal handlers: all restored after the test
    monkeypatch.setattr(fs, "SuperLinkLifespan", fs.SuperLinkLifespan)
    monkeypatch.setattr(uvicorn.server.Server, "handle_exit", uvicorn.server.Server.handle_exit)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr("server.guard.guard_installed_in_superlink", lambda: True)
    monkeypatch.setattr("server.guard.install_guard", lambda nets: None)
    monkeypatch.setattr(supercore_logger, "update_console_handler", lambda **kw: None)
    for k in (audit.ENV_LOG, audit.ENV_KEY, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"):
        monkeypatch.setenv(k, "")  # start sets them in os.environ: restored (removed) after the test
    for k in ("FLWR_HOME", "PATH"):
        monkeypatch.setenv(k, os.environ.get(k, ""))
    monkeypatch.setattr(sys, "argv", ["fl-server", "start", "--insecure"])
    sd = tmp_path / "state"
    try:
        res = runner.invoke(server_cli.app, ["start", "--insecure", "--host", "127.0.0.1", "--state-dir", str(sd)])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert res.exit_code == 0, res.output
    assert "coordinator stopped (SIGTERM)" in res.output
    log, key, pub = server_cli.audit_paths(sd.resolve())
    assert seen == {audit.ENV_LOG: str(log), audit.ENV_KEY: str(key)}
    ents = audit.AuditLog(log).entries()
    assert ents[0]["kind"] == "start" and ents[0]["data"]["insecure"] is True
    assert audit.verify(log, public_key_path=pub).ok


@pytest.mark.parametrize("role", ["node", "coordinator"])
@pytest.mark.parametrize("tamper", ["flip", "delete", "swap"])
def test_either_log_through_its_own_cli_names_the_broken_entry(keys, tmp_path, role, tamper, monkeypatch):
    """`fl-client audit verify` (node key, OpenSSH) and `fl-server audit verify` (audit key, PEM) fail on tampering."""
    if role == "node":
        from clients.cli import app as cli

        key, pub = keys["key"], keys["pub"]
        args = ["audit", "verify", "--log", str(tmp_path / "audit.jsonl"), "--pub", str(pub)]
    else:
        from server.cli import app as cli

        key, pub = tmp_path / "audit.key", tmp_path / "audit.pub"
        audit.ensure_signing_key(key, pub)
        args = ["audit", "verify", "--log", str(tmp_path / "audit.jsonl"), "--pub", str(pub)]
    log = make_log(tmp_path / "audit.jsonl", key, 5)
    assert runner.invoke(cli, args).exit_code == 0
    ls = lines(log.path)
    if tamper == "flip":
        i = ls[2].index(b'"epsilon":') + len(b'"epsilon":')
        ls[2] = ls[2][:i] + (b"9" if ls[2][i:i + 1] != b"9" else b"8") + ls[2][i + 1:]
    elif tamper == "delete":
        del ls[2]
    else:
        ls[2], ls[3] = ls[3], ls[2]
    write_lines(log.path, ls)
    res = runner.invoke(cli, args)
    assert res.exit_code == 1 and "seq 3" in _text(res), _text(res)


# --------------------------------------------------------------------------- key rotation


def test_a_replaced_node_key_starts_a_key_segment_that_verifies(keys, tmp_path):
    """DEPLOYMENT's key rotation (unregister, `fl-pki node-key --force`, register the new node.pub):
    fl-client went on appending to the same log with the new key, and `audit verify` then reported
    BROKEN with the new node.pub (entry 1) and with the old one (the first new entry), for good.
    Now the first append with another key records a ``key-changed`` entry, chained to the old
    entries and signed by the new key; verify checks each key segment with its key."""
    old = make_log(tmp_path / "audit.jsonl", keys["key"], 3)
    new = audit.AuditLog(old.path, key_path=keys["other_key"])
    entry = new.append("release", round=4)
    kinds = [e["kind"] for e in new.entries()]
    assert kinds == ["job", "release", "job", "key-changed", "release"] and entry["seq"] == 5
    changed = new.entries()[3]
    assert changed["data"]["key"] == audit.key_fingerprint(audit.load_public_key(keys["other_pub"]))
    # the new key alone: the chain binds the old entries to the new key's; their signatures are not checked
    res = audit.verify(old.path, public_key_path=keys["other_pub"])
    assert res.ok and res.signatures_checked and res.unchecked == ((1, 3),), res
    assert "entries 1-3" in res.reason and "--pub" in res.reason, res.reason
    # both keys: every signature checked
    res = audit.verify(old.path, public_key_path=[keys["other_pub"], keys["pub"]])
    assert res.ok and res.unchecked == () and "NOT" not in res.reason, res
    # the old key alone: the entries after the change are not its
    res = audit.verify(old.path, public_key_path=keys["pub"])
    assert not res.ok and res.first_bad == 4, res
    # a second append with the new key adds no second key-changed entry
    new.append("job", round=5)
    assert [e["kind"] for e in new.entries()].count("key-changed") == 1


def test_a_key_change_cannot_launder_edits_or_a_foreign_tail(keys, tmp_path):
    """Someone without the node's key cannot use a key-changed entry to rewrite history or append."""
    d = tmp_path / "k"
    intruder_key, intruder_pub, _ = pki.create_node_key(d, "health", "Switzerland")
    path = tmp_path / "audit.jsonl"
    make_log(path, keys["key"], 3)
    audit.AuditLog(path, key_path=keys["other_key"]).append("release", round=4)  # seq 4 key-changed, 5 release
    good = path.read_bytes()
    head = path.with_name("audit.jsonl.head").read_bytes()
    # an intruder's key appends: its key-changed segment is not the given key's
    audit.AuditLog(path, key_path=intruder_key).append("release", round=99)
    res = audit.verify(path, public_key_path=keys["other_pub"])
    assert not res.ok and res.first_bad == 6, res
    # an old entry edited and re-chained under the intruder's key: the new key's key-changed entry no longer links
    path.write_bytes(good)
    path.with_name("audit.jsonl.head").write_bytes(head)
    ls = lines(path)
    e = json.loads(ls[1])
    e["data"]["epsilon"] = 0.0
    forged = audit.AuditLog(tmp_path / "scratch.jsonl", key_path=intruder_key)
    e["hash"] = audit.entry_hash({k: v for k, v in e.items() if k not in ("hash", "sig")})
    e["sig"] = forged._sign(e["hash"])
    ls[1] = audit.canonical(e)
    write_lines(path, ls)
    res = audit.verify(path, public_key_path=keys["other_pub"])
    assert not res.ok and res.first_bad == 3, res  # entry 3's prev no longer matches


def test_audit_verify_cli_takes_several_public_keys(keys, tmp_path):
    log = make_log(tmp_path / "audit.jsonl", keys["key"], 2)
    audit.AuditLog(log.path, key_path=keys["other_key"]).append("release", round=3)
    app = _cli(log.path, keys["other_pub"])
    res = runner.invoke(app, ["verify"])
    text = _text(res)
    assert res.exit_code == 0 and "OK" in text and "entries 1-2" in text and "--pub" in text, text
    res = runner.invoke(app, ["verify", "--pub", str(keys["other_pub"]), "--pub", str(keys["pub"])])
    assert res.exit_code == 0 and "entries 1-2" not in _text(res), _text(res)


def test_a_crash_before_the_first_head_write_is_a_lagging_head_not_tampering(tmp_path, monkeypatch):
    """A new log gets a genesis head (seq 0) before its first entry is written.

    Found by a reliability review (2026-12-07, L1): the head file was first written after the first
    entry, so a crash (kill -9, power loss) between the two left a 1-entry log without a head, which
    `audit verify` calls BROKEN ("restore it from a copy"), with no copy to restore.
    """
    from privacy import audit as audit_mod
    from privacy.audit import AuditLog, verify

    real = audit_mod.AuditLog._write_head

    def crash_after_the_entry(self, entry):
        if entry["seq"] >= 1:
            raise KeyboardInterrupt("killed between the entry and its head")  # not an OSError: nothing handles it
        return real(self, entry)

    log = tmp_path / "audit.jsonl"
    monkeypatch.setattr(audit_mod.AuditLog, "_write_head", crash_after_the_entry)
    with pytest.raises(KeyboardInterrupt):
        AuditLog(log).append("run", step=1)
    monkeypatch.setattr(audit_mod.AuditLog, "_write_head", real)
    res = verify(log)
    assert res.ok, res
    AuditLog(log).append("run", step=2)  # the next append brings the head up to date
    res = verify(log)
    assert res.ok and len(AuditLog(log).entries()) == 2, res
    (tmp_path / "audit.jsonl.head").unlink()  # a removed head is still tampering
    assert not verify(log).ok
