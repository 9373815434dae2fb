"""fl-sim's signal handling leaves a SIGTERM/SIGINT handler it could not have restored alone.

``signal.getsignal`` returns ``None`` for a handler installed by C code (an embedding, an extension).
Restoring ``None`` raises ``TypeError``: that error replaced the run's result (or its interruption) and
left fl-sim's own handler installed for the rest of the process (review of 2026-12-07, L7).
"""

from __future__ import annotations

import signal

import pytest

from simulations.run import RunInterrupted, stop_in_process, stop_on_signal


@pytest.mark.parametrize("context", [stop_in_process, stop_on_signal], ids=["in-process", "ray"])
def test_a_handler_python_did_not_install_is_left_alone(monkeypatch, context):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    real = signal.getsignal
    monkeypatch.setattr(signal, "getsignal", lambda s: None if s == signal.SIGTERM else real(s))
    try:
        with context():
            during = real(signal.SIGTERM)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    assert during is before[signal.SIGTERM]  # not replaced: it could not be put back


def test_sigterm_in_process_raises_run_interrupted_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as caught:
        with stop_in_process():
            signal.raise_signal(signal.SIGTERM)
    assert caught.value.exit_code == 143 and str(caught.value) == "interrupted by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(RunInterrupted) as caught:
        with stop_in_process():
            raise KeyboardInterrupt
    assert caught.value.exit_code == 130 and "Ctrl-C" in str(caught.value)


def test_a_ray_run_stopped_inside_a_comparison_says_the_comparison_is_incomplete(monkeypatch, capfd):
    """fl-sim compare --engine ray: Ray's watcher said 'fl-sim run --resume continues the run' (review L8)."""
    import threading

    import simulations.run as run

    exited = threading.Event()
    monkeypatch.setattr(run, "_ray_shutdown", lambda: None)
    monkeypatch.setattr(run.os, "_exit", lambda code: exited.set())
    import logging

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    flwr_log = logging.getLogger("flwr")
    monkeypatch.setattr(flwr_log, "disabled", flwr_log.disabled)  # the watcher silences Flower's logger: put it back
    try:
        with run.interrupt_hint("the comparison in OUT is incomplete (run the command again with --overwrite)"):
            with run.stop_on_signal():
                signal.raise_signal(signal.SIGTERM)
                assert exited.wait(10)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    err = capfd.readouterr().err
    assert "interrupted by SIGTERM" in err and "comparison in OUT is incomplete" in err and "fl-sim run --resume" not in err
    assert flwr_log.disabled  # the engine's tracebacks of the actors Ray takes down are not shown after the message
