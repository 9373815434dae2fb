"""Text a node or a data file chooses, shown to the operator: terminal control sequences, mathtext, invisible characters.

From the security review of the web/HTML surfaces (2026-12-07, findings 1, 3, 4 and 5; reproductions adapted). Each
test failed before its fix: a node's refusal reason reached the ServerApp log, results.json, the checkpoint, the audit
log and `fl-server audit show` with raw ESC/OSC/CR/LF (a forged log line, a window title, a cleared screen); `$` in a
site name was read as matplotlib mathtext (garbled, or the plot dropped); a damaged results.json showed on the console
as a clean run with no refusals; a site name could hold a right-to-left override or a zero-width space.
"""
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from test_data_errors_private import MARK, _check, _load, _write, exported  # noqa: E402,F401 (fixture)
from test_hostile_coordinator_inputs import _console, _folder  # noqa: E402

#: A refusal reason as a hostile node could send it: window title (OSC 0), clear screen, a forged green INFO line
#: after CR LF, an OSC 8 hyperlink, a right-to-left override and a zero-width space.
EVIL = ("budget exhausted\x1b]0;owned-title\x1b\\\x1b[2J\x1b[H\x1b[32mINFO : round 1: all 4 updates accepted"
        "\x1b[0m\r\n\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\ bidi\u202egnp.exe zw\u200bj\x07")
#: Characters that must never come through raw.
RAW = ("\x1b", "\r", "\n", "\x07", "\u202e", "\u200b")


def _raw_in(text: str) -> list[str]:
    return [repr(c) for c in RAW if c in text]


# -- finding 1: node text in the coordinator's log, results, checkpoint and audit log ---------------------------
def _arrays(d: dict):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(v) for k, v in d.items()})


def _replies(kind: str, reason: str):
    """A refusal (node 5) and a good reply (node 7) to one train or evaluate message."""
    from flwr.app import Error, Message, MetricRecord, RecordDict

    from flower_compat.inprocess import set_task_identity

    set_task_identity(7, 0, 1)
    glob = {"w": np.zeros(3, dtype=np.float32)}
    out = Message(RecordDict({"arrays": _arrays(glob)}), dst_node_id=1, message_type=kind)
    refusal = Message(Error(code=1, reason=reason), reply_to=Message(out.content, dst_node_id=5, message_type=kind))
    content = {"metrics": MetricRecord({"num-examples": 10, "accuracy": 0.5} if kind == "evaluate" else {"num-examples": 10})}
    if kind == "train":
        content["arrays"] = _arrays({"w": np.ones(3, dtype=np.float32)})
    good = Message(RecordDict(content), reply_to=Message(out.content, dst_node_id=7, message_type=kind))
    return glob, [refusal, good]


@pytest.fixture
def strategy_log():
    """What the strategy logs, one record per line as a handler writes it."""
    import io

    from server import strategy

    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    strategy.log.addHandler(h)
    old = strategy.log.level
    strategy.log.setLevel(logging.INFO)
    yield buf
    strategy.log.removeHandler(h)
    strategy.log.setLevel(old)


def test_a_refusal_reason_is_one_escaped_line_everywhere(tmp_path, monkeypatch, strategy_log):
    """The review's repro: the reason went raw into the log (a forged 'INFO : round 1: all 4 updates accepted' line
    after CR LF, a window title, a cleared screen), into results.json's history, the checkpoint and the audit log."""
    from privacy import audit
    from server.strategy import GuardedStrategy, load_checkpoint, make_strategy

    log_path = tmp_path / "coord" / "audit.jsonl"
    monkeypatch.setenv(audit.ENV_KEY, str(audit.ensure_signing_key(tmp_path / "coord" / "audit.key")))
    monkeypatch.setenv(audit.ENV_LOG, str(log_path))
    glob, replies = _replies("train", EVIL)
    s = GuardedStrategy(make_strategy("fedavg"), max_update_norm=10.0, run_id="run-7", checkpoint=tmp_path / "ckpt")
    s._global = glob
    s.aggregate_train(1, replies)

    lines = [ln for ln in strategy_log.getvalue().split("\n") if "node 5" in ln]
    assert strategy_log.getvalue().count("\n") == len(strategy_log.getvalue().splitlines()), "a log line was split"
    assert len(lines) == 1 and not _raw_in(lines[0]), lines
    assert "budget exhausted\\x1b]0;owned-title" in lines[0] and "\\r\\n" in lines[0] and "\\u202e" in lines[0], lines
    (ref,) = s.history["refused"]
    assert not _raw_in(ref["reason"]) and ref["reason"].startswith("budget exhausted\\x1b"), ref
    results = json.loads(json.dumps(s.history))  # what results.json holds, read back
    assert not _raw_in(results["refused"][0]["reason"])
    assert not _raw_in(load_checkpoint(tmp_path / "ckpt")["history"]["refused"][0]["reason"])
    (entry,) = [e for e in audit.AuditLog(log_path).entries() if e["kind"] == "refused"]
    assert not _raw_in(entry["data"]["reason"]) and entry["data"]["reason"] == ref["reason"], entry


def test_an_evaluation_decline_is_logged_and_kept_escaped(strategy_log):
    from server.strategy import GuardedStrategy, make_strategy

    _, replies = _replies("evaluate", EVIL)
    s = GuardedStrategy(make_strategy("fedavg"), max_update_norm=10.0, run_id="r")
    s.aggregate_evaluate(1, replies)
    lines = [ln for ln in strategy_log.getvalue().split("\n") if "declined" in ln]
    assert len(lines) == 1 and not _raw_in(lines[0]) and "\\x1b" in lines[0], strategy_log.getvalue()
    declined = s.history["rounds"][0]["evaluate"]["declined"]
    assert set(declined) == {5} and not _raw_in(declined[5]), declined


def test_a_huge_refusal_reason_is_cut_with_a_marker(strategy_log):
    """The reason had no size limit: copied into results.json, the checkpoint (rewritten every round) and the audit log."""
    from contract.text import MAX_PEER_TEXT
    from server.strategy import GuardedStrategy, make_strategy

    glob, replies = _replies("train", "policy refused: " + "x" * 100_000)
    s = GuardedStrategy(make_strategy("fedavg"), max_update_norm=10.0, run_id="r")
    s._global = glob
    s.aggregate_train(1, replies)
    reason = s.history["refused"][0]["reason"]
    assert reason.startswith("policy refused: xxx") and len(reason) < MAX_PEER_TEXT + 80, len(reason)
    assert "cut" in reason and "100016 characters" in reason, reason[-80:]
    assert len(strategy_log.getvalue()) < MAX_PEER_TEXT + 200


def test_peer_text_escapes_each_character_visibly_and_cuts_between_escapes():
    from contract.text import peer_text

    assert peer_text("a\x1bb\u202ec\u2066d\ufeffe\x85f\x7fg\tend") == "a\\x1bb\\u202ec\\u2066d\\ufeffe\\x85f\\x7fg\\tend"
    assert peer_text("Zürich – Ost, 3 € per kWh") == "Zürich – Ost, 3 € per kWh"  # printable text stays as it is
    assert peer_text(None) is None
    cut = peer_text("\x1b" * 400, limit=10)  # never half an escape
    assert cut == "\\x1b ... [cut: 399 of 400 characters received]", cut  # tail room (limit // 3) < one escape


def test_audit_show_never_prints_a_raw_control_character(tmp_path, monkeypatch):
    """An audit log written before the fix holds the raw reason: `fl-server audit show` wrote ESC ] 0 ; ... to stdout."""
    from privacy import audit
    from privacy.audit_cli import summarize
    from server.cli import app

    log_path = tmp_path / "audit.jsonl"
    monkeypatch.setenv(audit.ENV_KEY, str(audit.ensure_signing_key(tmp_path / "audit.key")))
    monkeypatch.setenv(audit.ENV_LOG, str(log_path))
    audit.audit_log_from_env().append("refused", **{"run-id": "r", "round": 1, "node": 5, "code": 1, "reason": EVIL})
    assert not _raw_in(summarize({"reason": EVIL, "more": {"text": EVIL}}, width=10_000))
    res = CliRunner().invoke(app, ["audit", "show", "--log", str(log_path)], env={"COLUMNS": "400", "FORCE_COLOR": "1"})
    assert res.exit_code == 0, res.output
    assert "budget exhausted\\x1b" in res.output and "\x1b]0;" not in res.output and "\x1b[2J" not in res.output, \
        repr(res.output)


def test_plain_takes_out_osc_sequences_and_escapes_other_control_characters():
    """plain() removed only CSI colour codes: OSC (title, hyperlink, clipboard), CR and bidi overrides got through,
    so a log file or the console's log page showed forged lines."""
    from flower_compat.logging import plain

    text = ("INFO : \x1b[32mround 1\x1b[0m done\x1b]0;title\x07 a\x1b]8;;https://e.example/\x1b\\link\x1b]8;;\x1b\\"
            "\rINFO : forged\u202e\nWARNING : next line\r\nlast\n")
    assert plain(text) == "INFO : round 1 done alink\\rINFO : forged\\u202e\nWARNING : next line\nlast\n"
    assert plain("a\x1b[1;31mb\x1b[0m\tc") == "ab\tc"


# -- finding 3: `$` in a site name is matplotlib mathtext -------------------------------------------------------
DOLLAR_NAMES = ["cost $5 and $6", r"$\undefined$", "$" + "x^{" * 200 + "1" + "}" * 200 + "$", r"a\$b$"]


@pytest.fixture
def figures(monkeypatch):
    """Figures the report closes (kept open to read their texts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    for f in kept:
        close(f)


def _shown(texts) -> list:
    """What matplotlib draws for each Text: ``(text, is_math)``."""
    return [t._preprocess_math(t.get_text()) for t in texts]


@pytest.mark.parametrize("name", DOLLAR_NAMES, ids=["two dollars", "undefined macro", "deep nesting", "escaped dollar"])
def test_a_site_name_with_dollars_is_a_literal_legend_entry(tmp_path, figures, name):
    from server.report import _plot

    _plot({name: [(1, 0.5), (2, 0.6)], "Cleveland": [(1, 0.4), (2, 0.5)]}, "accuracy per site", "accuracy",
          tmp_path / "p.png")
    assert (tmp_path / "p.png").is_file()
    (fig,) = figures
    assert (name, False) in _shown(fig.axes[0].get_legend().get_texts())


@pytest.mark.parametrize("name", DOLLAR_NAMES, ids=["two dollars", "undefined macro", "deep nesting", "escaped dollar"])
def test_a_site_name_with_dollars_is_a_literal_tick_label(tmp_path, figures, name):
    from server.report import write_compare_plot

    rows = [{"site": s, "method": m, "metrics": {"accuracy": 0.5}} for s in (name, "Cleveland") for m in ("local", "fedavg")]
    assert "compare.png" in write_compare_plot({"rows": rows}, "accuracy", tmp_path)
    (fig,) = figures
    assert (name, False) in _shown(fig.axes[0].get_xticklabels())


# -- finding 4: a damaged results.json on the console -----------------------------------------------------------
@pytest.mark.parametrize("results,why", [('{"run_id": "r1", "rounds": [', "not valid JSON"),
                                         ("\xff\xfe{}", "not UTF-8")], ids=["truncated", "not UTF-8"])
def test_console_names_a_damaged_results_json_and_says_events_are_unknown(tmp_path, monkeypatch, results, why):
    """The page said 'figures from none', 'None: no node refused a job', 'None: every reply that arrived passed
    validation': a truncated or tampered record read as a clean run."""
    sd, runs = tmp_path / "state", tmp_path / "state" / "runs"
    runs.mkdir(parents=True)
    f = _folder(runs, "damaged", "2", results="")
    (f / "results.json").write_bytes(results.encode("latin-1"))
    c, token = _console(sd, runs, ["2"], monkeypatch)
    r = c.get("/runs/damaged", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.status_code
    page = r.text
    assert "damaged/results.json" in page and why in page and "restore" in page, page[:3000]
    assert "None: no node refused a job." not in page and "None: every reply that arrived passed validation." not in page
    assert page.count("unknown: results.json is damaged") >= 2, page


def test_console_shows_a_good_results_json_as_before(tmp_path, monkeypatch):
    sd, runs = tmp_path / "state", tmp_path / "state" / "runs"
    runs.mkdir(parents=True)
    _folder(runs, "fine", "2", results={"run_id": "2", "status": "completed", "rounds": [], "refused": [], "excluded": []})
    c, token = _console(sd, runs, ["2"], monkeypatch)
    page = c.get("/runs/fine", headers={"Authorization": f"Bearer {token}"}).text
    assert "None: no node refused a job." in page and "damaged" not in page


# -- finding 5: invisible characters in site names --------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("ch", ["\u202e", "\u2066", "\u200b", "\u200f", "\ufeff", "\u2028"],
                         ids=["RLO", "LRI", "ZWSP", "RLM", "BOM", "LSEP"])
def test_site_names_with_bidi_or_invisible_characters_are_refused(tmp_path, exported, suffix, ch):  # noqa: F811
    """'bidi\\u202egnp.exe' displays as 'bidiexe.png'; 'zw\\u200bj' looks like 'zwj' (review: all ACCEPTED)."""
    f = exported["health"].copy()
    f["dataset"] = f"{MARK}bidi{ch}gnp.exe"
    f.loc[:9, "dataset"] = "Cleveland"  # rows 1-10 keep the good name
    path = _write(f, tmp_path / f"h{suffix}")
    err = _check(*_load("health", path), path, "dataset", 11, "invisible", markers=(MARK,))
    assert ch not in str(err) and f"U+{ord(ch):04X}" in err.problem, str(err)
    assert "file and ledger names" in err.fix and "invisible" in err.fix, err.fix


def test_a_personalisation_refusal_is_kept_and_logged_escaped(caplog):
    """The same text in a node's refusal of the personalise message (server/personalise.py kept it raw)."""
    from flwr.app import ArrayRecord, Error, Message, RecordDict

    from flower_compat.inprocess import set_task_identity
    from server.personalise import personalise_nodes

    set_task_identity(7, 0, 1)

    class Grid:
        def get_node_ids(self):
            return [5]

        def create_message(self, content, message_type, dst, group):
            return Message(content, dst_node_id=dst, message_type=message_type)

        def send_and_receive(self, msgs, timeout):
            return [Message(Error(code=1, reason=EVIL), reply_to=m) for m in msgs]

    with caplog.at_level(logging.WARNING, logger="cityfed.server"):
        out = personalise_nodes(Grid(), {}, ArrayRecord(), 3)
    assert out["refused"] and not _raw_in(out["refused"][0]["reason"])
    assert "\\x1b" in out["refused"][0]["reason"]
    assert not any(_raw_in(r.getMessage()) for r in caplog.records)


def test_a_secagg_stage_error_is_kept_escaped():
    """A node's error reply inside a SecAgg+ stage (server/grid.py's exchange errors, reported as refused/dropped)."""
    from flwr.app import Error, Message, RecordDict

    from flower_compat.inprocess import set_task_identity
    from server.grid import peer_error

    set_task_identity(7, 0, 1)
    reply = Message(Error(code=1, reason=EVIL), reply_to=Message(RecordDict(), dst_node_id=5, message_type="train"))
    code, reason = peer_error(reply)
    assert code == 1 and not _raw_in(reason) and "\\x1b" in reason


def test_fl_server_logs_on_a_terminal_keeps_colours_and_escapes_the_rest():
    """A log written before the cleaning still holds a node's raw text: on a terminal only colour codes act."""
    from server.flwr_calls import for_output

    class Terminal:
        def isatty(self):
            return True

    shown = for_output("\x1b[33mWARNING \x1b[0m: node 5 sent no update: " + EVIL + "\n", Terminal())
    assert shown.startswith("\x1b[33mWARNING \x1b[0m")  # Flower's colours stay
    import re

    rest = re.sub(r"\x1b\[[0-9;]*m", "", shown)  # colour codes (SGR) only: no title, link, clear screen
    assert "\x1b" not in rest and "\x07" not in rest and "\r" not in rest and "\u202e" not in rest
    assert "\\r\n" in rest  # the node's CR shows (an LF in a log written before the cleaning cannot be told apart)
