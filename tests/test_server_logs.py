"""The ServerApp log (``fl-server logs``): each log event once, no colour codes where the output is not a terminal.

The ServerApp process (``flwr-serverapp``) mirrors its stdout and stderr into the log the
SuperLink keeps for the run (``flwr log``). Opacus, which the coordinator imports with the
shared models, calls ``logging.basicConfig`` and so put a second handler on the root logger:
every Flower line reached that log twice (coloured, then ``12/05/2026 10:35:15:INFO:...``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from typer.testing import CliRunner

from server import cli as server_cli
from server import flwr_calls

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

#: Lines of a real ``flwr log <run> cityfed --show`` (health, 2 nodes, 1 round over TLS on loopback), captured
#: before this fix: Flower's coloured console lines as the SuperLink stored them, the ``flwr`` CLI's own lines
#: between (the Opacus-format duplicate of each line, which no longer occurs, is left out).
CAPTURED_FLWR_LOG = "\n".join([
    "Using SuperLink: cityfed (127.0.0.1:50263)",
    "\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process",
    "Successfully installed cityfed to /tmp/cfcap/city1/state/superlink-home/apps/cityfed.cityfed.0.1.0.3e49c4d1.",
    "\x1b[92mINFO \x1b[0m:      Starting GuardedStrategy strategy:",
    "\x1b[92mINFO \x1b[0m:      \t├── Number of rounds: 1",
    "\x1b[92mINFO \x1b[0m:      [ROUND 1/1]",
    "\x1b[92mINFO \x1b[0m:      configure_train: Sampled 2 nodes (out of 2)",
    "\x1b[92mINFO \x1b[0m:      aggregate_train: Received 2 results and 0 failures",
    "\x1b[92mINFO \x1b[0m:      Strategy execution finished in 6.40s",
])
PLAIN = [
    "Using SuperLink: cityfed (127.0.0.1:50263)",
    "INFO :      Start `flwr-serverapp` process",
    "Successfully installed cityfed to /tmp/cfcap/city1/state/superlink-home/apps/cityfed.cityfed.0.1.0.3e49c4d1.",
    "INFO :      Starting GuardedStrategy strategy:",
    "INFO :      \t├── Number of rounds: 1",
    "INFO :      [ROUND 1/1]",
    "INFO :      configure_train: Sampled 2 nodes (out of 2)",
    "INFO :      aggregate_train: Received 2 results and 0 failures",
    "INFO :      Strategy execution finished in 6.40s",
]

#: What ``flwr-serverapp`` does (flwr/superlink/cli/flwr_serverapp.py), then the coordinator's ServerApp
#: (server.app:app) on a grid without nodes: one round that waits 1 s for nodes, then ends the run.
SERVERAPP = textwrap.dedent('''
    import sys
    from queue import Queue

    from flwr.supercore.logger import mirror_output_to_queue

    log_queue = Queue()
    mirror_output_to_queue(log_queue)  # stdout and stderr -> the run's log at the SuperLink

    from flwr.app import Context, RecordDict
    from flwr.serverapp import Grid

    import server.app


    class NoNodes(Grid):
        run = None

        def set_run(self, run_id):
            self.run = run_id

        def create_message(self, *a, **k):
            raise AssertionError("no node to message")

        def get_node_ids(self):
            return []

        def push_messages(self, messages):
            return []

        def pull_messages(self, message_ids):
            return []

        def send_and_receive(self, messages, *, timeout=None):
            return []


    config = {"department": "health", "num-rounds": 1, "run-dir": sys.argv[1], "round-timeout": 1, "secagg": False}
    server.app.app(NoNodes(), Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    stored = []
    while not log_queue.empty():
        stored.append(log_queue.get())
    with open(sys.argv[2], "w", encoding="utf-8") as fh:
        fh.write("".join(stored))
''')


def test_serverapp_log_holds_each_event_once_in_flowers_format(tmp_path):
    script, stored = tmp_path / "serverapp.py", tmp_path / "stored.log"
    script.write_text(SERVERAPP)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(stored)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    lines = stored.read_text(encoding="utf-8").splitlines()

    def count(text: str) -> int:
        return sum(text in line for line in lines)

    assert count("[ROUND 1/1]") == 1, lines
    assert count("Starting GuardedStrategy strategy:") == 1, lines
    assert count("Number of rounds: 1") == 1, lines
    # the coordinator's own lines (cityfed.*) appear once too, in Flower's format, INFO included
    assert count("0 node(s) connected, the round needs 1") == 1, lines
    assert [line.split(":")[0].strip() for line in lines if "0 node(s) connected" in line] == ["WARNING"]
    assert count("cityfed: deadlines:") == 1, lines
    # the ServerApp's output is not a terminal: no colour codes in the log that `fl-server logs` shows
    assert not any("\x1b[" in line for line in lines), lines[:5]


def _started_state(tmp_path) -> Path:
    """A coordinator state dir that looks started (connection and coordinator.json; nothing listens)."""
    sd = tmp_path / "state"
    server_cli.write_connection(sd, "127.0.0.1:1", None, insecure=True)
    (sd / "coordinator.json").write_text('{"address": "127.0.0.1:1"}')
    return sd


def test_fl_server_logs_show_prints_each_line_once_without_colour_codes(tmp_path, monkeypatch):
    sd = _started_state(tmp_path)
    asked = []

    def fake_flwr(state_dir, *args, **kw):
        asked.append(args)
        return CAPTURED_FLWR_LOG

    monkeypatch.setattr(server_cli, "flwr", fake_flwr)
    res = runner.invoke(server_cli.app, ["logs", "7", "--state-dir", str(sd)])  # the runner's stdout: not a terminal
    assert res.exit_code == 0, res.output
    assert asked == [("log", "7", server_cli.CONNECTION, "--show")]
    assert res.output.splitlines() == PLAIN


def test_fl_server_logs_follow_streams_each_line_once_without_colour_codes(tmp_path, monkeypatch, capfd):
    sd = _started_state(tmp_path)
    fake = tmp_path / "flwr"  # prints the captured log, as `flwr log --stream` would, line by line
    sample = tmp_path / "sample.log"
    sample.write_text(CAPTURED_FLWR_LOG + "\n", encoding="utf-8")
    fake.write_text(f"#!{sys.executable}\nimport sys\nassert sys.argv[1:] == ['log', '7', 'cityfed', '--stream'], sys.argv\n"
                    f"for line in open({str(sample)!r}, encoding='utf-8'):\n    sys.stdout.write(line)\n    sys.stdout.flush()\n")
    fake.chmod(0o755)
    monkeypatch.setattr(flwr_calls, "_bin", lambda name: str(fake) if name == "flwr" else name)  # what flwr() runs
    res = runner.invoke(server_cli.app, ["logs", "7", "--follow", "--state-dir", str(sd)])
    assert res.exit_code == 0, res.output
    out = capfd.readouterr().out + res.output  # the stream goes to the process's stdout (not a terminal here)
    assert out.splitlines() == PLAIN


def test_fl_server_logs_keeps_colour_on_a_terminal():
    """On a terminal the operator sees Flower's colours, as ``flwr log`` prints them."""

    class Terminal:
        def isatty(self) -> bool:
            return True

    assert server_cli.for_output(CAPTURED_FLWR_LOG, Terminal()) == CAPTURED_FLWR_LOG
    assert server_cli.for_output(CAPTURED_FLWR_LOG, None).splitlines() == PLAIN
